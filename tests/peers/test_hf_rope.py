"""RoPE against HF transformers: ``ROPE_INIT_FUNCTIONS`` for every rope type and
``apply_rotary_pos_emb`` (Llama/GPT-NeoX ``rotate_half``, GPT-J interleaved).

HF computes ``inv_freq`` in float32 (VARIANTS H), so frequencies are compared at float32 rounding
(rtol 1e-6) and the attention factor (a Python float on both sides) to 1e-12. The rotation itself is
compared in float64 by handing HF's ``apply_rotary_pos_emb`` float64 cos/sin built *in this test*
from the textbook angle ``p * base ** (-2i / d)``; refattn's output must agree to 1e-12.
"""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply  # noqa: E402
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding, apply_rotary_pos_emb as llama_apply)

from refattn.position import rope, rope_frequencies  # noqa: E402

pytestmark = pytest.mark.peers

RNG = np.random.default_rng(20261123)
LONG = [float(x) for x in RNG.uniform(1.0, 8.0, 32)]
SHORT = [float(x) for x in RNG.uniform(1.0, 1.5, 32)]

# (rope_type, head_dim, max_position_embeddings, rope_parameters, seq_len)
CASES = [
    ("linear", 64, 4096, {"factor": 2.0, "rope_theta": 10000.0}, None),
    ("linear", 128, 4096, {"factor": 8.0, "rope_theta": 500000.0}, None),
    ("linear", 96, 2048, {"factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, None),
    ("dynamic", 64, 2048, {"factor": 2.0, "rope_theta": 10000.0}, None),
    ("dynamic", 64, 2048, {"factor": 2.0, "rope_theta": 10000.0}, 1000),
    ("dynamic", 128, 2048, {"factor": 4.0, "rope_theta": 10000.0}, 9000),
    ("yarn", 64, 4096, {"factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 1024}, None),
    ("yarn", 128, 163840, {"factor": 40.0, "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                           "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}, None),
    ("yarn", 128, 163840, {"factor": 40.0, "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                           "mscale": 1.0, "mscale_all_dim": 0.5}, None),
    ("yarn", 64, 32768, {"factor": 8.0, "rope_theta": 1e6, "original_max_position_embeddings": 4096,
                         "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0}, None),
    ("yarn", 64, 32768, {"factor": 8.0, "rope_theta": 1e6, "original_max_position_embeddings": 4096,
                         "attention_factor": 1.3}, None),
    ("yarn", 64, 16384, {"factor": None, "rope_theta": 10000.0, "original_max_position_embeddings": 4096}, None),
    ("longrope", 64, 131072, {"rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                              "short_factor": SHORT, "long_factor": LONG}, None),
    ("longrope", 64, 131072, {"rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                              "short_factor": SHORT, "long_factor": LONG}, 5000),
    ("longrope", 64, 131072, {"rope_theta": 10000.0, "original_max_position_embeddings": 4096, "factor": 2.0,
                              "attention_factor": 1.1, "short_factor": SHORT, "long_factor": LONG}, 4096),
    ("llama3", 128, 131072, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_theta": 500000.0}, None),
    ("llama3", 64, 32768, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
                           "original_max_position_embeddings": 8192, "rope_theta": 500000.0}, None),
    ("proportional", 128, 4096, {"rope_theta": 1e6, "partial_rotary_factor": 0.25}, None),
    ("proportional", 64, 4096, {"rope_theta": 1e6, "partial_rotary_factor": 0.5, "factor": 8.0}, None),
    ("proportional", 64, 4096, {"rope_theta": 10000.0}, None),
]


def hf_config(rope_type, head_dim, mpe, params):
    rp = {k: v for k, v in copy.deepcopy(params).items()}
    rp["rope_type"] = rope_type
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=mpe, rope_parameters=rp)


def test_every_hf_rope_type_is_covered():
    assert set(ROPE_INIT_FUNCTIONS) <= {c[0] for c in CASES}, sorted(ROPE_INIT_FUNCTIONS)


@pytest.mark.parametrize("rope_type, head_dim, mpe, params, seq_len", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_init_functions(rope_type, head_dim, mpe, params, seq_len):
    config = hf_config(rope_type, head_dim, mpe, params)
    hf_inv, hf_att = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    assert hf_inv.dtype == torch.float32  # the reason for rtol 1e-6 (VARIANTS H)
    scaling = dict(copy.deepcopy(params), rope_type=rope_type)  # v5 spelling: rope_theta inside
    inv, att = rope_frequencies(head_dim, scaling=scaling, seq_len=seq_len, max_position_embeddings=mpe)
    assert inv.dtype == np.float64 and inv.shape == tuple(hf_inv.shape)
    np.testing.assert_allclose(inv, hf_inv.double().numpy(), rtol=1e-6, atol=0)
    assert abs(att - hf_att) <= 1e-12 * max(1.0, abs(hf_att))


@pytest.mark.parametrize("head_dim, theta", [(64, 10000.0), (128, 500000.0), (32, 1e6)])
def test_default_frequencies(head_dim, theta):
    config = hf_config("default", head_dim, 4096, {"rope_theta": theta})
    hf_inv, hf_att = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    inv, att = rope_frequencies(head_dim, base=theta)
    np.testing.assert_allclose(inv, hf_inv.double().numpy(), rtol=1e-6, atol=0)
    assert att == hf_att == 1.0


def test_v4_rope_scaling_spelling_matches_hf():
    """HF v4's ``rope_scaling={"type": ..., "factor": ...}`` (no rope_theta inside) is accepted."""
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=4096,
                         rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=50000.0)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["linear"](config, "cpu")
    inv, _ = rope_frequencies(64, base=50000.0, scaling={"type": "linear", "factor": 4.0})
    np.testing.assert_allclose(inv, hf_inv.double().numpy(), rtol=1e-6, atol=0)


def textbook_cos_sin(positions, inv_freq, factor=1.0):
    """float64 ``(cos, sin)`` of the angle ``p * inv_freq``, ``(S, d_rot / 2)``, built here."""
    angle = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)
    return np.cos(angle) * factor, np.sin(angle) * factor


@pytest.mark.parametrize("rotary_dim", [None, 16, 8])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_apply_neox_float64(rotary_dim, base):
    b, h, s, d = 2, 3, 7, 32
    r = d if rotary_dim is None else rotary_dim
    q, k = RNG.standard_normal((2, b, h, s, d))
    positions = RNG.integers(0, 5000, size=s)
    inv = base ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    cos, sin = textbook_cos_sin(positions, inv)
    cos_hf = torch.from_numpy(np.concatenate([cos, cos], -1))[None].expand(b, s, r)  # HF: cat(freqs, freqs)
    sin_hf = torch.from_numpy(np.concatenate([sin, sin], -1))[None].expand(b, s, r)
    apply = llama_apply if rotary_dim is None else neox_apply  # GPT-NeoX's slices off rotary_dim
    hq, hk = apply(torch.from_numpy(q), torch.from_numpy(k), cos_hf, sin_hf)
    assert hq.dtype == torch.float64
    ours_q = rope(q, positions, base=base, rotary_dim=rotary_dim, style="neox")
    ours_k = rope(k, positions, base=base, rotary_dim=rotary_dim, style="neox")
    np.testing.assert_allclose(ours_q, hq.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours_k, hk.numpy(), rtol=0, atol=1e-12)


def test_apply_neox_with_attention_factor_float64():
    """yarn multiplies cos and sin by its attention factor; feed HF the same scaled cos/sin."""
    b, h, s, d = 1, 2, 9, 16
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    x = RNG.standard_normal((b, h, s, d))
    positions = np.arange(100, 100 + s)
    inv, att = rope_frequencies(d, scaling=scaling, max_position_embeddings=256)
    assert att == pytest.approx(0.1 * math.log(4.0) + 1.0, abs=1e-15)
    cos, sin = textbook_cos_sin(positions, inv, att)
    hx, _ = llama_apply(torch.from_numpy(x), torch.from_numpy(x),
                        torch.from_numpy(np.concatenate([cos, cos], -1))[None],
                        torch.from_numpy(np.concatenate([sin, sin], -1))[None])
    ours = rope(x, positions, scaling=scaling, max_position_embeddings=256)
    np.testing.assert_allclose(ours, hx.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_apply_gptj_float64(rotary_dim):
    b, h, s, d = 2, 2, 6, 16
    r = d if rotary_dim is None else rotary_dim
    x = RNG.standard_normal((b, h, s, d))
    positions = RNG.integers(0, 2048, size=(b, s))  # per-sequence positions (packed / cached)
    inv = 10000.0 ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    angle = positions[..., None].astype(np.float64) * inv  # (B, S, r/2)
    x_bshd = torch.from_numpy(x.transpose(0, 2, 1, 3).copy())  # GPT-J works in (B, S, H, D)
    rot = gptj_apply(x_bshd[..., :r], torch.from_numpy(np.sin(angle)), torch.from_numpy(np.cos(angle)))
    expect = torch.cat([rot, x_bshd[..., r:]], dim=-1).numpy().transpose(0, 2, 1, 3)
    ours = rope(x, positions, rotary_dim=rotary_dim, style="gptj")
    np.testing.assert_allclose(ours, expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim, padding_idx", [(16, 1), (15, 0), (32, None)])
def test_fairseq_sinusoidal_matches_hf_m2m100(dim, padding_idx):
    """HF's fairseq port builds the table in float32: angles up to 63 carry ~63 * 6e-8 of rounding,
    so the comparison allows 1e-5 absolute (sin/cos are bounded by 1)."""
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    from refattn.position import sinusoidal

    hf = M2M100SinusoidalPositionalEmbedding.get_embedding(64, dim, padding_idx).double().numpy()
    ours = sinusoidal(64, dim, freq="fairseq", order="concat", padding_idx=padding_idx)
    np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-5)
    if padding_idx is not None:
        assert not ours[padding_idx].any()

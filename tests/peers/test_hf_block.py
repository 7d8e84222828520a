"""Whole decoder layers against HF transformers in float64: a tiny random Llama (dense SwiGLU),
Mixtral (top-2 MoE, GQA) and DeepSeek-V3 (MLA attention with q-LoRA and the latent RMSNorm, a
group-limited sigmoid MoE with a shared expert) decoder layer equal ``refattn.block`` built from
the same weights to <= 1e-10 normwise; for the dense Llama layer the gradients too (autograd vs
``block_backward``).

The HF side: eager attention with a float64 additive causal mask, float64 RoPE tables built from the
textbook angle (``hf_float64.rope_tables``; HF's rotary module computes them in float32) passed as
``position_embeddings``, and HF's float32 casts of the RMSNorms, the routers and the eager softmax
patched as :mod:`hf_float64` describes (VARIANTS H). refattn's side: ``Block`` with RMSNorm, the
``rope`` variant (neox pairs, as Llama's ``rotate_half``) or DeepSeek's MLA through
``refattn.block.mla_mixer`` over the ``mla`` variant (``style="gptj"``: HF DeepSeek-V3's
``rope_interleave=True`` rotates pairs ``(2i, 2i+1)``; it writes the rotated halves de-interleaved, a
permutation applied to q and k alike, so the scores are the same), and the MoE of ``refattn.moe``.

The mixer normalises the latent outside ``mla`` and hands it identity down-projections (written
before ``mla`` had ``kv_norm``); ``mla`` itself now takes the latent RMSNorm, q-LoRA, YaRN and has a
backward -- checked against HF's DeepSeek-V2/V3 attention, YaRN included, in ``test_hf_bridge.py``.
This test keeps DeepSeek-V3 with default RoPE and compares the whole layer forward.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer  # noqa: E402

from refattn import block as B  # noqa: E402

from .hf_float64 import causal_mask, keep_float64, normwise, np64, randomise, rope_tables  # noqa: E402

pytestmark = pytest.mark.peers

TOL = 1e-10
BATCH, SEQ, HIDDEN = 2, 9, 32
THETA = 10000.0


@pytest.fixture
def f64(monkeypatch):
    keep_float64(monkeypatch)


def hidden(seed=0, requires_grad=False):
    x = torch.tensor(np.random.default_rng(seed).standard_normal((BATCH, SEQ, HIDDEN)))
    return x.requires_grad_(requires_grad)


def eager(cfg):
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def qkv_attention(attn, hq, hkv, dh):
    """HF ``q/k/v/o_proj`` (``nn.Linear``, ``y = x W^T``) as refattn's per-head ``x @ W`` weights."""
    w = {n: np64(getattr(attn, f"{n}_proj").weight).T for n in "qkvo"}
    return B.QKVAttention(w["q"].reshape(HIDDEN, hq, dh), w["k"].reshape(HIDDEN, hkv, dh),
                          w["v"].reshape(HIDDEN, hkv, dh), w["o"].reshape(hq, dh, HIDDEN),
                          variant="rope", params={"causal": True, "base": THETA, "style": "neox"})


def dense_mlp(mlp):
    return B.FFN(np64(mlp.up_proj.weight).T, np64(mlp.down_proj.weight).T, np64(mlp.gate_proj.weight).T)


def stacked_experts(experts):
    gu, down = np64(experts.gate_up_proj), np64(experts.down_proj)
    f = gu.shape[1] // 2
    return B.FFN(w_gate=gu[:, :f].transpose(0, 2, 1), w_up=gu[:, f:].transpose(0, 2, 1),
                 w_down=down.transpose(0, 2, 1))


def run_hf(layer, x, rot_dim):
    return layer(x, attention_mask=causal_mask(BATCH, SEQ),
                 position_embeddings=rope_tables(SEQ, rot_dim, THETA, BATCH))


# -- Llama -----------------------------------------------------------------------------------------
def llama(hq=4, hkv=2, seed=0):
    cfg = eager(LlamaConfig(hidden_size=HIDDEN, intermediate_size=48, num_attention_heads=hq,
                            num_key_value_heads=hkv, rms_norm_eps=1e-5, rope_theta=THETA))
    layer = randomise(LlamaDecoderLayer(cfg, layer_idx=0), seed=seed, std=0.2)
    dh = HIDDEN // hq
    blk = B.Block(qkv_attention(layer.self_attn, hq, hkv, dh), dense_mlp(layer.mlp), eps=1e-5,
                  attn_norm=np64(layer.input_layernorm.weight),
                  ffn_norm=np64(layer.post_attention_layernorm.weight))
    return layer, blk, dh


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)])
def test_llama_decoder_layer_forward(f64, hq, hkv):
    layer, blk, dh = llama(hq, hkv)
    x = hidden()
    with torch.no_grad():
        y = run_hf(layer, x, dh)
    assert normwise(B.block_forward(np64(x), blk), np64(y)) <= TOL


def test_llama_decoder_layer_backward(f64):
    layer, blk, dh = llama(4, 2, seed=3)
    x = hidden(seed=3, requires_grad=True)
    y = run_hf(layer, x, dh)
    dout = np.random.default_rng(4).standard_normal(y.shape)
    y.backward(torch.tensor(dout))
    g = B.block_backward(np64(x), blk, dout)
    a = layer.self_attn
    want = {"x": np64(x.grad), "attn_norm": np64(layer.input_layernorm.weight.grad),
            "ffn_norm": np64(layer.post_attention_layernorm.weight.grad),
            "w_q": np64(a.q_proj.weight.grad).T.reshape(HIDDEN, 4, dh),
            "w_k": np64(a.k_proj.weight.grad).T.reshape(HIDDEN, 2, dh),
            "w_v": np64(a.v_proj.weight.grad).T.reshape(HIDDEN, 2, dh),
            "w_o": np64(a.o_proj.weight.grad).T.reshape(4, dh, HIDDEN),
            "w_gate": np64(layer.mlp.gate_proj.weight.grad).T, "w_up": np64(layer.mlp.up_proj.weight.grad).T,
            "w_down": np64(layer.mlp.down_proj.weight.grad).T}
    for name, w in want.items():
        assert normwise(g[name], w) <= TOL, name


def test_llama_without_the_patch_differs_at_float32_size():
    layer, blk, dh = llama()
    x = hidden()
    with torch.no_grad():
        y = run_hf(layer, x, dh)
    err = normwise(B.block_forward(np64(x), blk), np64(y))
    assert TOL < err < 1e-5, err  # HF's float32 RMSNorm and softmax: rounding, not semantics


# -- Mixtral ---------------------------------------------------------------------------------------
def test_mixtral_decoder_layer_forward(f64):
    hq, hkv, e = 4, 2, 6
    cfg = eager(MixtralConfig(hidden_size=HIDDEN, intermediate_size=24, num_attention_heads=hq,
                              num_key_value_heads=hkv, num_local_experts=e, num_experts_per_tok=2,
                              rms_norm_eps=1e-5, rope_theta=THETA))
    layer = randomise(MixtralDecoderLayer(cfg, layer_idx=0), seed=7, std=0.2)
    dh = HIDDEN // hq
    x = hidden(seed=7)
    with torch.no_grad():
        y = run_hf(layer, x, dh)
    moe_ffn = B.MoE(np64(layer.mlp.gate.weight).T, stacked_experts(layer.mlp.experts),
                    routing={"preset": "mixtral"})
    blk = B.Block(qkv_attention(layer.self_attn, hq, hkv, dh), moe_ffn, eps=1e-5,
                  attn_norm=np64(layer.input_layernorm.weight),
                  ffn_norm=np64(layer.post_attention_layernorm.weight))
    ours, routing = B.block_forward(np64(x), blk, return_routing=True)
    assert normwise(ours, np64(y)) <= TOL
    assert len(set(routing.indices.ravel())) == e  # every expert is used


# -- DeepSeek-V3 -----------------------------------------------------------------------------------
def deepseek(q_lora, seed):
    h, dn, dr, dv, dc = 4, 6, 4, 5, 10
    cfg = eager(DeepseekV3Config(hidden_size=HIDDEN, intermediate_size=40, moe_intermediate_size=12,
                                 num_attention_heads=h, num_key_value_heads=h, n_routed_experts=16,
                                 num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                                 routed_scaling_factor=2.5, kv_lora_rank=dc, q_lora_rank=q_lora,
                                 qk_rope_head_dim=dr, qk_nope_head_dim=dn, v_head_dim=dv,
                                 first_k_dense_replace=0, rms_norm_eps=1e-6, rope_theta=THETA,
                                 rope_interleave=True))
    layer = randomise(DeepseekV3DecoderLayer(cfg, layer_idx=0), seed=seed, std=0.2)
    a = layer.self_attn
    kv_a = np64(a.kv_a_proj_with_mqa.weight).T  # (d, d_c + d_rope)
    kv_b = np64(a.kv_b_proj.weight).reshape(h, dn + dv, dc)
    q = ({"w_q": np64(a.q_proj.weight).T.reshape(HIDDEN, h, dn + dr)} if q_lora is None else
         {"w_dq": np64(a.q_a_proj.weight).T, "q_norm": np64(a.q_a_layernorm.weight),
          "w_uq": np64(a.q_b_proj.weight).T.reshape(q_lora, h, dn + dr)})
    mixer = B.mla_mixer(w_dkv=kv_a[:, :dc], w_kr=kv_a[:, dc:], kv_norm=np64(a.kv_a_layernorm.weight),
                        w_uk=kv_b[:, :dn].transpose(0, 2, 1), w_uv=kv_b[:, dn:].transpose(0, 2, 1),
                        w_o=np64(a.o_proj.weight).T.reshape(h, dv, HIDDEN), eps=1e-6,
                        params={"causal": True, "base": THETA, "style": "gptj"}, **q)
    mlp = layer.mlp
    se = mlp.shared_experts
    moe_ffn = B.MoE(np64(mlp.gate.weight).T, stacked_experts(mlp.experts),
                    shared=B.FFN(np64(se.up_proj.weight).T, np64(se.down_proj.weight).T,
                                 np64(se.gate_proj.weight).T),
                    routing={"preset": "deepseek_v3", "k": 4, "n_group": 4, "topk_group": 2,
                             "selection_bias": np64(mlp.gate.e_score_correction_bias)})
    blk = B.Block(mixer, moe_ffn, eps=1e-6, attn_norm=np64(layer.input_layernorm.weight),
                  ffn_norm=np64(layer.post_attention_layernorm.weight))
    return layer, blk, dr


@pytest.mark.parametrize("q_lora", [None, 12])
@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_deepseek_v3_decoder_layer_forward(f64, q_lora, form):
    layer, blk, dr = deepseek(q_lora, seed=11)
    blk = B.Block(B.Mixer(blk.attention.variant, blk.attention.project, blk.attention.w_o,
                          {**blk.attention.params, "form": form}), blk.ffn, eps=blk.eps,
                  attn_norm=blk.attn_norm, ffn_norm=blk.ffn_norm)
    x = hidden(seed=11)
    with torch.no_grad():
        y = run_hf(layer, x, dr)
    ours, routing = B.block_forward(np64(x), blk, return_routing=True)
    assert normwise(ours, np64(y)) <= TOL
    assert all(len(set(row // 4)) <= 2 for row in routing.indices)  # experts of <= topk_group groups

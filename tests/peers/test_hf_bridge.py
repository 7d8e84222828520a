"""The transformers bridge (refattn.hf) against HF's own attention modules, in float64.

For every family a tiny random config (``bridge_configs.py``) goes through
:func:`refattn.hf.attention_spec`, and the variant with those parameters must reproduce the HF
module's output -- *after* its output projection -- to <= 1e-10 normwise, and the gradient of the
hidden states, with padding. This path is written here, independently of ``check_module``'s
capture: q, k, v come from the module's own projection submodules (``q_proj``... and Qwen3/Gemma3's
``q_norm``/``k_norm``), the attention is ``refattn.attention`` with the spec's parameters, the output
goes through the module's ``o_proj``; the HF side runs the whole module. The 4-d mask (causal,
window, padding; HF's ``finfo.min`` convention) is built in this test, and the float64 RoPE tables
from ``refattn.position.rope_frequencies`` (checked against HF's ``ROPE_INIT_FUNCTIONS`` in
``test_hf_rope.py``; HF's rotary modules compute in float32). HF's float32 casts are patched as
``hf_float64.keep_float64`` says (VARIANTS H): ``softmax(dtype=float32)`` in every eager attention,
the RMSNorms' ``.to(float32)``, DeepSeek-V2's rotary ``.float()``.

Then :func:`refattn.hf.check_module` must PASS every family at <= 1e-10 (forward and input
gradients) and must FAIL, naming the stage, a module with one thing wrong: its scale, its window
edge, its RoPE pairing. Bad input is a named error. The quirks it warns about are checked too.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

import refattn  # noqa: E402
from refattn import hf  # noqa: E402
from refattn.errors import ParameterError, ShapeError  # noqa: E402
from refattn.position import rope_frequencies  # noqa: E402

from .bridge_configs import CASES, CONFIGS, H, HOOKED, HOOKED_CASES, SPARSE  # noqa: E402
from .hf_float64 import keep_float64, normwise, np64  # noqa: E402

pytestmark = [pytest.mark.peers, pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = 1e-10
B, S = 2, 9


@pytest.fixture
def f64(monkeypatch):
    keep_float64(monkeypatch)


def hidden(seed=0):
    return torch.tensor(np.random.default_rng(seed).standard_normal((B, S, H)))


def padding():
    keep = np.ones((B, S), dtype=bool)
    keep[1, :2] = False  # left padding in the second sequence
    return keep


def mask4(keep, window=None):
    """HF's additive 4-d mask, written out: 0 where key j is visible to query i, finfo.min elsewhere."""
    m = np.full((B, 1, S, S), np.finfo(np.float64).min)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                ok = j <= i and keep[b, j] and (window is None or j >= i - window[0])
                if ok:
                    m[b, 0, i, j] = 0.0
    return torch.tensor(m)


def tables(spec, module, layout):
    p = spec.params
    dim = p.get("rotary_dim") or (module.config.qk_rope_head_dim if spec.variant == "mla" else module.head_dim
                                   if hasattr(module, "head_dim") else module.head_size)
    inv, att = rope_frequencies(dim, base=p.get("base"), scaling=p.get("scaling"), seq_len=S,
                                max_position_embeddings=p.get("max_position_embeddings"))
    freqs = np.arange(S)[:, None] * inv
    if layout == "complex":
        return torch.tensor(np.broadcast_to(att * np.exp(1j * freqs), (B,) + freqs.shape).copy())
    if layout == "concat":
        freqs = np.concatenate([freqs, freqs], -1)
    return (torch.tensor(np.broadcast_to(np.cos(freqs) * att, (B,) + freqs.shape).copy()),
            torch.tensor(np.broadcast_to(np.sin(freqs) * att, (B,) + freqs.shape).copy()))


LAYOUT = {"gpt_oss": "half", "deepseek_v2": "complex"}


def project(m, x, mt):
    """q, k, v (B, H, S, D) before RoPE, from the module's projection submodules."""
    b, s, _ = x.shape
    if mt == "gpt_neox":
        qkv = m.query_key_value(x).view(b, s, -1, 3 * m.head_size).transpose(1, 2)
        return qkv.chunk(3, dim=-1)
    if mt == "phi3":
        qkv = m.qkv_proj(x)
        nq, nkv = m.config.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
        parts = (qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:])
    else:
        parts = (m.q_proj(x), m.k_proj(x), m.v_proj(x))
    q, k, v = (t.view(b, s, -1, m.head_dim).transpose(1, 2) for t in parts)
    if hasattr(m, "q_norm"):
        q, k = m.q_norm(q), m.k_norm(k)
    return q, k, v


def mla_weights(m):
    c = m.config
    h, dn, dr, dv, dc = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                         c.kv_lora_rank)
    kv_a = np64(m.kv_a_proj_with_mqa.weight).T
    kv_b = np64(m.kv_b_proj.weight).reshape(h, dn + dv, dc)
    arrays = {"w_dkv": kv_a[:, :dc], "w_kr": kv_a[:, dc:], "w_uk": kv_b[:, :dn].transpose(0, 2, 1),
              "w_uv": kv_b[:, dn:].transpose(0, 2, 1)}
    extra = {"kv_norm": np64(m.kv_a_layernorm.weight)}
    if m.q_lora_rank is None:
        extra["w_q"] = np64(m.q_proj.weight).T.reshape(H, h, dn + dr)
    else:
        extra.update(w_dq=np64(m.q_a_proj.weight).T, q_norm=np64(m.q_a_layernorm.weight),
                     w_uq=np64(m.q_b_proj.weight).T.reshape(m.q_lora_rank, h, dn + dr))
    return arrays, extra


@pytest.mark.parametrize("name, layer", CASES)
def test_spec_reproduces_the_hf_module_forward_and_backward(f64, name, layer):
    config, _ = CONFIGS[name]
    spec = hf.attention_spec(config, layer)
    m = hf.build_layer(config, layer, seed=7)
    mt = spec.model_type
    keep = padding()
    rows = torch.tensor(keep[:, :, None].astype(np.float64))
    x = hidden(3).requires_grad_(True)
    dy = torch.tensor(np.random.default_rng(4).standard_normal((B, S, H))) * rows
    window = spec.params.get("window")
    pe = tables(spec, m, LAYOUT.get(mt, "concat"))
    y = m(x, position_embeddings=pe, attention_mask=mask4(keep, window))[0]
    y.backward(dy)
    want_y, want_dx = np64(y * rows), np64(x.grad)

    x2 = hidden(3).requires_grad_(True)
    params = dict(spec.params, mask=keep[:, None, None, :])
    if spec.variant == "mla":
        arrays, extra = mla_weights(m)
        inputs = {"q": np64(x2), "hidden": np64(x2), **arrays}
        params.update(extra)
        out = refattn.attention(variant="mla", **inputs, **params)
    else:
        q, k, v = project(m, x2, mt)
        inputs = {"q": np64(q), "k": np64(k), "v": np64(v)}
        if "sinks" in spec.module_params:
            params["sinks"] = np64(m.sinks)
        out = refattn.attention(**inputs, variant=spec.variant, **params)
    a = torch.tensor(out.transpose(0, 2, 1, 3).reshape(B, S, -1)).requires_grad_(True)
    o_proj = m.dense if mt == "gpt_neox" else m.o_proj
    y2 = o_proj(a)
    assert normwise(np64(y2 * rows), want_y) <= TOL
    y2.backward(dy)
    dout = np64(a.grad).reshape(B, S, -1, out.shape[-1]).transpose(0, 2, 1, 3)
    g = refattn.attention_backward(dout=dout, variant=spec.variant, **inputs, **params)
    if spec.variant == "mla":
        dx = g["q"] + g["hidden"]
    else:
        dq, dk, dv, extras = g
        torch.autograd.backward([q, k, v], [torch.tensor(dq), torch.tensor(dk), torch.tensor(dv)])
        dx = np64(x2.grad)
        if "sinks" in spec.module_params:
            assert normwise(extras["sinks"], np64(m.sinks.grad)) <= TOL
    assert normwise(dx, want_dx) <= TOL


@pytest.mark.parametrize("name, layer", CASES)
def test_check_module_passes_every_family(name, layer):
    config, _ = CONFIGS[name]
    m = hf.build_layer(config, layer, seed=1)
    am = padding().astype(np.int64)
    res = hf.check_module(m, np.random.default_rng(0).standard_normal((B, S, H)), attention_mask=am)
    assert res.verdict == "PASS", res.message
    want = {"out", "dq", "dk", "dv"} if res.spec.variant != "mla" else {
        "out", "dhidden", "dw_dkv", "dw_kr", "dw_uk", "dw_uv", "dkv_norm"}
    assert want <= set(res.results)
    assert all(r["normwise_rel"] <= TOL for r in res.results.values())
    assert not res.stages


def test_check_module_leaves_the_module_alone():
    config, _ = CONFIGS["llama"]
    m = hf.build_layer(config, 0, seed=1).float()
    before = {n: p.clone() for n, p in m.named_parameters()}
    impl = m.config._attn_implementation
    hf.check_module(m, np.random.default_rng(0).standard_normal((1, 5, H)), grad=False)
    assert m.config._attn_implementation == impl
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_without_the_patch_hf_rounds_to_float32():
    m = hf.build_layer(CONFIGS["mistral"][0], 0, seed=1)
    res = hf.check_module(m, np.random.default_rng(0).standard_normal((1, 7, H)), keep_float64=False,
                          quirks=False)
    err = res.results["out"]["normwise_rel"]
    assert res.verdict == "FAIL" and 1e-10 < err < 1e-5, err


def test_numpy_integer_layer_and_torch_hidden_states():
    cfg = CONFIGS["qwen2"][0]
    assert hf.attention_spec(cfg, np.int64(2)).layer_type == "sliding_attention"
    m = hf.build_layer(cfg, np.int32(2), seed=0)
    assert hf.check_module(m, torch.randn(1, 6, H, dtype=torch.float32), grad=False).passed


def test_position_ids_move_the_rope():
    m = hf.build_layer(CONFIGS["llama"][0], 0, seed=2)
    x = np.random.default_rng(1).standard_normal((2, 6, H))
    res = hf.check_module(m, x, position_ids=np.array([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]]))
    assert res.passed, res.message


# -- spec mapping -------------------------------------------------------------------------------------
def test_spec_rules():
    s = hf.attention_spec(CONFIGS["mistral"][0], 0)
    assert s.variant == "rope" and s.params["window"] == (3, 0) and s.params["scale"] == 8 ** -0.5
    g = hf.attention_spec(CONFIGS["gemma2"][0], 0)
    assert g.params["scale"] == 12 ** -0.5 and g.params["softcap"] == 3.0 and g.params["window"] == (3, 0)
    assert "window" not in hf.attention_spec(CONFIGS["gemma2"][0], 1).params
    g3 = hf.attention_spec(CONFIGS["gemma3"][0], 0), hf.attention_spec(CONFIGS["gemma3"][0], 5)
    assert g3[0].params["base"] == 100.0 and "scaling" not in g3[0].params and "window" in g3[0].params
    assert g3[1].params["base"] == 5000.0 and g3[1].params["scaling"]["factor"] == 4.0
    assert hf.attention_spec(CONFIGS["gpt_oss"][0], 0).module_params.keys() == {"sinks"}
    assert hf.attention_spec(CONFIGS["phi3"][0], 0).params["rotary_dim"] == 4
    assert hf.attention_spec(CONFIGS["gpt_neox"][0], 0).params["rotary_dim"] == 4
    assert hf.attention_spec(CONFIGS["gpt_neox"][0], 0).params["base"] == 500.0
    d2, d3 = hf.attention_spec(CONFIGS["deepseek_v2"][0], 0), hf.attention_spec(CONFIGS["deepseek_v3"][0], 0)
    assert d2.variant == d3.variant == "mla" and d2.params["style"] == d3.params["style"] == "gptj"
    assert "w_q" in d2.module_params and "w_uq" in d3.module_params


def test_gemma3_softcap_in_the_config_is_not_applied_and_warned():
    cfg = dict(CONFIGS["gemma3"][0], attn_logit_softcapping=2.0)
    spec = hf.attention_spec(cfg, 0)
    assert "softcap" not in spec.params
    assert any("never passed to the attention function" in w for w in spec.warnings)
    m = hf.build_layer(cfg, 0, seed=1)
    with pytest.warns(hf.QuirkWarning, match="attn_logit_softcapping=2.0"):
        res = hf.check_module(m, np.random.default_rng(0).standard_normal((1, 6, H)))
    assert res.passed  # HF's Gemma3 does not soft-cap; neither does the spec


@pytest.mark.parametrize("cfg, match", [
    (dict(model_type="bert", hidden_size=32, num_attention_heads=4),
     r"^config\['model_type'\]: 'bert' is not supported"),
    (dict(CONFIGS["llama"][0], rope_scalng={"factor": 2.0}), r"^config\['rope_scalng'\]: not a field of LlamaConfig"),
    (dict(CONFIGS["gemma3"][0], use_bidirectional_attention=True), r"^config.use_bidirectional_attention"),
    (dict(CONFIGS["qwen2"][0], layer_types=["full_attention", "chunked_attention"] * 2),
     r"^config.layer_types\[1\]: 'chunked_attention' is not supported"),
    (dict(CONFIGS["deepseek_v3"][0], attention_bias=True), r"^config.attention_bias: True is not supported"),
    (dict(CONFIGS["llama"][0], num_key_value_heads=3), r"^config.num_key_value_heads: expected a divisor"),
    (dict(CONFIGS["llama"][0], rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                             "fudge": 1}), r"^config.rope_parameters\['fudge'\]: not a parameter"),
    ({"hidden_size": 32}, r"^config: expected a 'model_type' string"),
])
def test_unsupported_configs_are_named_errors(cfg, match):
    with pytest.raises(ParameterError, match=match):
        hf.attention_spec(cfg, 1)


def test_layer_index_errors():
    cfg = CONFIGS["llama"][0]
    with pytest.raises(ParameterError, match=r"^layer_idx: expected a layer index in \[0, 3\]"):
        hf.attention_spec(cfg, 4)
    with pytest.raises(ParameterError, match="^layer_idx: expected"):
        hf.attention_spec(cfg, -1)
    with pytest.raises(ParameterError, match="^layer_idx: expected"):
        hf.attention_spec(cfg, 1.0)


def test_bad_inputs_to_check_module():
    m = hf.build_layer(CONFIGS["llama"][0], 0, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 5, H))
    with pytest.raises(ParameterError, match="^hidden_states: expected finite values, got 5 NaN"):
        hf.check_module(m, np.where(np.arange(H) == 3, np.nan, x))
    with pytest.raises(ShapeError, match=r"^hidden_states: expected \(B, S, 32\)"):
        hf.check_module(m, x[..., :16])
    with pytest.raises(ShapeError, match="^attention_mask: expected the \\(B, S\\) padding mask"):
        hf.check_module(m, x, attention_mask=np.ones((1, 1, 5, 5)))
    with pytest.raises(ParameterError, match="^attention_mask: sequence 0 is all padding"):
        hf.check_module(m, x, attention_mask=np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ParameterError, match="^module: expected a transformers attention module"):
        hf.check_module(torch.nn.Linear(2, 2), x)
    with pytest.raises(ParameterError, match="^tolerance: expected a finite number >= 0"):
        hf.check_module(m, x, tolerance=-1.0)


# -- deliberately wrong modules: check_module fails them and says where --------------------------------
def test_wrong_scale_is_named():
    m = hf.build_layer(CONFIGS["llama"][0], 0, seed=1)
    m.scaling = m.scaling * 1.25  # a module that attends with the wrong scale
    res = hf.check_module(m, np.random.default_rng(0).standard_normal((2, 8, H)))
    assert res.verdict == "FAIL"
    assert res.stages == [f"scale: the module passes scaling={8 ** -0.5 * 1.25!r} to its attention function; "
                          f"the config gives {8 ** -0.5!r} (head_dim ** -0.5)"]
    assert "stage scale:" in res.message


def test_window_edge_off_by_one_is_named_and_the_worst_key_is_at_the_edge():
    from transformers.models.mistral.modeling_mistral import MistralAttention

    cfg, _ = CONFIGS["mistral"]  # sliding_window=4: window (3, 0)
    base = hf.build_layer(cfg, 1, seed=5)

    class WideWindow(MistralAttention):
        """Builds its own causal window mask of W + 1 tokens: one key too many at the left edge."""

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            s = hidden_states.shape[1]
            i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
            keep = (j <= i) & (j > i - (self.config.sliding_window + 1))
            mask = torch.full((s, s), torch.finfo(torch.float64).min, dtype=torch.float64)
            mask = mask.masked_fill(keep, 0.0)[None, None]
            return super().forward(hidden_states, position_embeddings, mask, **kwargs)

    m = WideWindow(base.config, 1)
    m.load_state_dict(base.state_dict())
    m.double()
    res = hf.check_module(m, np.random.default_rng(0).standard_normal((2, 10, H)), grad=False)
    assert res.verdict == "FAIL"
    assert len(res.stages) == 1 and res.stages[0].startswith("mask: the module's attention mask shows key 0 to "
                                                              "query 4 (batch 0)")
    assert "one key left of the window's left edge" in res.stages[0]
    b, h, i, j = res.worst["index"]
    assert j == i - 4 and res.worst["relation"] == "one key left of the window's left edge"


def test_rope_pairing_is_named(monkeypatch):
    from transformers.models.llama import modeling_llama

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J pairs where Llama rotates halves
        half = cos.shape[-1] // 2
        c, s_ = cos.unsqueeze(unsqueeze_dim)[..., :half], sin.unsqueeze(unsqueeze_dim)[..., :half]

        def rot(x):
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * c - b * s_, b * c + a * s_], -1).flatten(-2)
        return rot(q), rot(k)

    m = hf.build_layer(dict(CONFIGS["llama"][0], rope_scaling=None), 0, seed=1)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", interleaved)
    res = hf.check_module(m, np.random.default_rng(0).standard_normal((2, 8, H)), grad=False)
    assert res.verdict == "FAIL"
    assert res.stages[0].startswith("RoPE: the module rotates q with 'gptj' pairs; the config's model uses "
                                    "'neox' pairs")


# -- quirks found by comparing ------------------------------------------------------------------------
def test_quirks_measured():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = hf.check_module(hf.build_layer(CONFIGS["gpt_oss"][0], 0, seed=1),
                            np.random.default_rng(0).standard_normal((1, 6, H)))
    assert r.passed
    text = " | ".join(str(w.message) for w in seen if issubclass(w.category, hf.QuirkWarning))
    assert "ignores the sinks" in text  # the sdpa path drops gpt-oss's sinks
    assert "inv_freq is computed in float32" in text
    assert "softmax(dtype=torch.float32)" not in text  # gpt-oss's eager softmax keeps the dtype
    r1 = hf.check_module(hf.build_layer(CONFIGS["qwen3"][0], 0, seed=1),
                         np.random.default_rng(0).standard_normal((1, 6, H)), grad=False)
    assert any("eager_attention_forward: softmax(dtype=torch.float32)" in w and "(forward: .to(torch.float32))"
               in w for w in r1.warnings)  # the eager softmax and the q/k RMSNorms
    r2 = hf.check_module(hf.build_layer(CONFIGS["deepseek_v2"][0], 0, seed=1),
                         np.random.default_rng(0).standard_normal((1, 6, H)), grad=False)
    assert any("apply_rotary_emb: .float()" in w for w in r2.warnings)
    r3 = hf.check_module(hf.build_layer(CONFIGS["gemma2"][0], 0, seed=1),
                         np.random.default_rng(0).standard_normal((1, 6, H)), grad=False)
    assert any("does not support `softcap`" in w for w in r3.warnings)
    r4 = hf.check_module(hf.build_layer(dict(CONFIGS["deepseek_v3"][0], rms_norm_eps=1e-5), 0, seed=1),
                         np.random.default_rng(0).standard_normal((1, 6, H)), grad=False)
    assert r4.passed and any("eps=config.rms_norm_eps (1e-05)" in w for w in r4.warnings)


# -- the per-model hooks: GPT-J, BLOOM, Falcon, MPT; T5 ------------------------------------------------
def _width(cfg):
    return cfg.get("hidden_size", cfg.get("n_embd", cfg.get("d_model")))


@pytest.mark.parametrize("name, layer", HOOKED_CASES)
def test_check_module_passes_hooked_families(name, layer):
    cfg, _ = HOOKED[name]
    m = hf.build_layer(cfg, layer, seed=1)
    res = hf.check_module(m, np.random.default_rng(0).standard_normal((B, S, _width(cfg))),
                          attention_mask=padding().astype(np.int64))
    assert res.verdict == "PASS", res.message
    assert {"out", "dq", "dk", "dv"} <= set(res.results)
    assert all(r["normwise_rel"] <= TOL for r in res.results.values())


def _alibi_rows(slopes, keep):
    p = (np.cumsum(keep, -1) - 1) * keep  # BLOOM/Falcon count key positions over the tokens
    return slopes[None, :, None] * p[:, None, :]


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_hooked_spec_reproduces_the_module_forward(f64, name):
    """Written out per family: q, k, v from the module's fused projection (its own reshape helpers
    only), refattn's variant with the spec's parameters, the module's output projection; the HF side
    runs the whole module with inputs built here."""
    cfg, (layer, *_) = HOOKED[name]
    spec = hf.attention_spec(cfg, layer)
    m = hf.build_layer(cfg, layer, seed=2)
    d = _width(cfg)
    keep = padding()
    rows = torch.tensor(keep[:, :, None].astype(np.float64))
    x = torch.tensor(np.random.default_rng(5).standard_normal((B, S, d)))
    mask = mask4(keep) if spec.params.get("causal") else torch.tensor(
        np.where(keep[:, None, None, :], 0.0, np.finfo(np.float64).min))
    params = dict(spec.params, mask=keep[:, None, None, :])
    mt = spec.model_type
    with torch.no_grad():
        if mt == "gptj":
            inv, _ = rope_frequencies(cfg["rotary_dim"], base=10000.0)
            ang = np.arange(64)[:, None] * inv
            m.embed_positions = torch.tensor(np.concatenate([np.sin(ang), np.cos(ang)], 1))
            y = m(x, attention_mask=mask, position_ids=torch.arange(S)[None].repeat(B, 1))[0]
            q, k, v = (getattr(m, f"{n}_proj")(x).view(B, S, 4, -1).transpose(1, 2) for n in "qkv")
            out_proj = m.out_proj
        elif mt == "bloom":
            alibi = torch.tensor(_alibi_rows(spec.params["alibi_slopes"], keep).reshape(B * 16, 1, S))
            y = m(x, torch.zeros_like(x), alibi, mask)[0]
            q, k, v = m._reshape(m.query_key_value(x))
            out_proj = m.dense
        elif mt == "falcon":
            kw = {}
            alibi = None
            if spec.variant == "alibi":
                slopes = spec.params["alibi_slopes"] * math.sqrt(m.head_dim)
                alibi = torch.tensor(_alibi_rows(slopes, keep).reshape(B * 4, 1, S))
            else:
                kw["position_embeddings"] = tables(spec, m, "concat")
            y = m(x, alibi, mask, **kw)[0]
            q, k, v = (t.transpose(1, 2) for t in m._split_heads(m.query_key_value(x)))
            out_proj = m.dense
        elif mt == "mpt":
            slopes = spec.params["alibi_slopes"]
            bias = torch.tensor(slopes[:, None, None] * (np.arange(S) - (S - 1)))
            y = m(x, bias, attention_mask=mask < -1)[0]
            qkv = m.Wqkv(x).clamp(-m.clip_qkv, m.clip_qkv)
            q, k, v = (t.reshape(B, S, 6, -1).transpose(1, 2) for t in qkv.chunk(3, dim=2))
            out_proj = m.out_proj
        else:  # t5
            y = m(x, mask=mask)[0]
            q, k, v = (getattr(m, n)(x).view(B, S, 4, -1).transpose(1, 2) for n in "qkv")
            params["table"] = np64(m.relative_attention_bias.weight)
            out_proj = m.o
        out = refattn.attention(np64(q), np64(k), np64(v), variant=spec.variant, **params)
        y2 = out_proj(torch.tensor(out.transpose(0, 2, 1, 3).reshape(B, S, -1)))
    assert normwise(np64(y2 * rows), np64(y * rows)) <= TOL


def test_hooked_quirks():
    x = np.random.default_rng(0).standard_normal((1, 6, H))
    falcon = hf.check_module(hf.build_layer(HOOKED["falcon_alibi"][0], 0, seed=1), x, grad=False)
    assert falcon.passed and any("ALiBi counted twice" in w for w in falcon.warnings)
    mpt_cfg = dict(HOOKED["mpt"][0], attn_config={"alibi": False, "qk_ln": True, "alibi_bias_max": 4})
    spec = hf.attention_spec(mpt_cfg, 0)
    assert [w.split(": ", 1)[1].split(" is not")[0] for w in spec.warnings] == [
        "config.attn_config.alibi=False", "config.attn_config.qk_ln=True", "config.attn_config.alibi_bias_max=4"]
    bloom = hf.check_module(hf.build_layer(HOOKED["bloom"][0], 0, seed=1),
                            np.random.default_rng(0).standard_normal((1, 6, 64)), grad=False)
    assert any("ALiBi slopes are built in float32" in w for w in bloom.warnings)  # 16 heads: 2**-0.5 ...
    gptj = hf.check_module(hf.build_layer(HOOKED["gptj"][0], 0, seed=1), x, grad=False)
    assert any("(_attn: .to(torch.float32))" in w for w in gptj.warnings)


def test_hooked_errors():
    with pytest.raises(ParameterError, match="^config: transformers 5.23.0 refused this gptj config: .*rotary_dim"):
        hf.attention_spec(dict(HOOKED["gptj"][0], rotary_dim=None), 0)
    m = hf.build_layer(HOOKED["bloom"][0], 0, seed=1)
    gap = np.ones((1, 6), dtype=np.int64)
    gap[0, 2] = 0
    with pytest.raises(ParameterError, match="^attention_mask: BLOOM counts ALiBi positions over the tokens"):
        hf.check_module(m, np.random.default_rng(0).standard_normal((1, 6, 64)), attention_mask=gap)
    from transformers.models.t5.modeling_t5 import T5Attention
    cfg = hf.spec.load_config(HOOKED["t5_encoder"][0])
    t5 = T5Attention(cfg, has_relative_attention_bias=False, layer_idx=1)
    with pytest.raises(ParameterError, match="^module: this T5Attention has no relative_attention_bias"):
        hf.check_module(t5, np.random.default_rng(0).standard_normal((1, 6, H)))
    bare = hf.build_layer(HOOKED["mpt"][0], 0, seed=0)
    del bare.config
    with pytest.raises(ParameterError, match=r"^module: expected a transformers attention module with .config"):
        hf.check_module(bare, np.zeros((1, 4, 36)))
    assert hf.check_module(bare, np.random.default_rng(0).standard_normal((1, 4, 36)),
                           config=hf.spec.load_config(HOOKED["mpt"][0]), layer_idx=0, grad=False).passed


# -- the sparse hooks: Longformer (global tokens) and BigBird (random blocks) ------------------------------
def _sparse(name, seed=0):
    cfg, layer, s = SPARSE[name]
    m = hf.build_layer(cfg, layer, seed=1)
    return cfg, layer, m, torch.tensor(np.random.default_rng(seed).standard_normal((B, s, cfg["hidden_size"])))


def _globals(s):
    g = np.zeros((B, s), dtype=bool)
    g[0, [0, 5, s - 1]] = True
    g[1, 3] = True
    return g


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_check_module_passes_sparse_families(name):
    cfg, layer, m, x = _sparse(name)
    kw = {"global_mask": _globals(x.shape[1])} if name == "longformer" else {}
    res = hf.check_module(m, x, **kw)
    assert res.verdict == "PASS", res.message
    want = {"out", "dq", "dk", "dv"} | ({"dq_global", "dk_global", "dv_global"} if kw else set())
    assert set(res.results) == want and all(r["normwise_rel"] <= TOL for r in res.results.values())


def test_sparse_spec_reproduces_the_module_forward(f64):
    """Longformer: the module with global tokens against the spec's longformer; BigBird: the module in
    training mode (random blocks drawn) against the spec's bigbird given HF's table, captured at
    ``torch_gather_b2`` (as tests/peers/test_hf_bigbird.py does)."""
    cfg, layer, m, x = _sparse("longformer")
    spec = hf.attention_spec(cfg, layer)
    s = x.shape[1]
    g = _globals(s)
    mask = torch.tensor(g * 10000.0)
    with torch.no_grad():
        y = m(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
              is_global_attn=True)[0]
        proj = {n: np64(getattr(m, n)(x).view(B, s, 2, -1).transpose(1, 2))
                for n in ("query", "key", "value", "query_global", "key_global", "value_global")}
    out = refattn.attention(proj["query"], proj["key"], proj["value"], variant="longformer", global_mask=g,
                            q_global=proj["query_global"], k_global=proj["key_global"],
                            v_global=proj["value_global"], **spec.params)
    assert normwise(out.transpose(0, 2, 1, 3).reshape(B, s, -1), np64(y)) <= TOL

    cfg, layer, m, x = _sparse("big_bird", seed=1)
    spec = hf.attention_spec(cfg, layer)
    s = x.shape[1]
    m.train()
    tables = []
    orig = m.torch_gather_b2
    m.torch_gather_b2 = lambda params, indices: (tables.append(indices.clone()), orig(params, indices))[1]
    from transformers.models.big_bird.modeling_big_bird import BigBirdModel
    blocked, band, fm, tm = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(B, s, dtype=torch.float64), 2)
    with torch.no_grad():
        y = m(x, band_mask=band, from_mask=fm, to_mask=tm, from_blocked_mask=blocked, to_blocked_mask=blocked)[0]
        q, k, v = (np64(getattr(m, n)(x).view(B, s, 2, -1).transpose(1, 2)) for n in ("query", "key", "value"))
    out = refattn.attention(q, k, v, variant="bigbird", rand_attn=np64(tables[0][0]).astype(np.int64), **spec.params)
    assert normwise(out.transpose(0, 2, 1, 3).reshape(B, s, -1), np64(y)) <= TOL


def test_sparse_errors():
    cfg, layer, m, x = _sparse("longformer")
    with pytest.raises(ShapeError, match="^hidden_states: longformer needs S a multiple of attention_window 8"):
        hf.check_module(m, x[:, :12])
    with pytest.raises(ParameterError, match="^attention_mask: padding is not supported for longformer"):
        hf.check_module(m, x, attention_mask=np.ones((B, 16), dtype=np.int64) - np.eye(B, 16, dtype=np.int64))
    with pytest.raises(ParameterError, match="^layer_idx: layer 0 of the config has attention_window 4, the module 8"):
        hf.check_module(m, x, layer_idx=0)
    with pytest.raises(ParameterError, match="^global_mask: only for longformer modules"):
        hf.check_module(hf.build_layer(CONFIGS["llama"][0], 0), np.zeros((1, 4, H)), global_mask=np.ones((1, 4), bool))
    cfg, layer, m, x = _sparse("big_bird")
    with pytest.raises(ShapeError, match=r"^hidden_states: BigBird's block-sparse attention needs S .* got S=14"):
        hf.check_module(m, x[:, :14])
    with pytest.raises(ParameterError, match="^config.attention_type: 'original_full' is not supported"):
        hf.attention_spec(dict(cfg, attention_type="original_full"), 0)
    assert any("in eval mode HF draws no random blocks" in w for w in hf.check_module(m, x, grad=False).warnings)

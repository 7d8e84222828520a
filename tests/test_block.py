"""Block pieces against definitions written here (loops with ``math.fsum`` for the norms and FFNs,
tests/reference.py's loop attention for the token mixer), and every backward against central
finite differences in float64.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import refattn
from refattn import block as B
from refattn import moe, pipeline
from refattn.errors import ParameterError, RefattnError, ShapeError

from fd_variants import fd_grad
from reference import reference_attention


# -- definitions, written out ------------------------------------------------------------------------
def ref_rms(x, w, eps):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        r = 1.0 / math.sqrt(math.fsum(v * v for v in row) / len(row) + eps)
        out[idx] = [row[i] * r * w[i] for i in range(len(row))]
    return out


def ref_layer(x, w, b, eps):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        mu = math.fsum(row) / len(row)
        var = math.fsum((v - mu) ** 2 for v in row) / len(row)
        out[idx] = [(row[i] - mu) / math.sqrt(var + eps) * w[i] + b[i] for i in range(len(row))]
    return out


ACTS = {"silu": lambda a: a / (1 + math.exp(-a)), "gelu": lambda a: 0.5 * a * (1 + math.erf(a / math.sqrt(2))),
        "gelu_tanh": lambda a: 0.5 * a * (1 + math.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))),
        "relu": lambda a: max(a, 0.0)}


def ref_ffn(x, w_up, w_down, w_gate=None, act="silu", b_up=None, b_down=None):
    d, f = w_up.shape
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        up = [math.fsum(row[i] * w_up[i, j] for i in range(d)) + (0 if b_up is None else b_up[j]) for j in range(f)]
        if w_gate is None:
            h = [ACTS[act](a) for a in up]
        else:
            g = [math.fsum(row[i] * w_gate[i, j] for i in range(d)) for j in range(f)]
            h = [ACTS[act](g[j]) * up[j] for j in range(f)]
        out[idx] = [math.fsum(h[j] * w_down[j, i] for j in range(f)) + (0 if b_down is None else b_down[i])
                    for i in range(d)]
    return out


def weights(d=8, hq=4, hkv=2, dh=3, dv=None, f=10, seed=0):
    rng = np.random.default_rng(seed)
    dv = dh if dv is None else dv
    return {"w_q": rng.standard_normal((d, hq, dh)) / math.sqrt(d),
            "w_k": rng.standard_normal((d, hkv, dh)) / math.sqrt(d),
            "w_v": rng.standard_normal((d, hkv, dv)) / math.sqrt(d),
            "w_o": rng.standard_normal((hq, dv, d)) / math.sqrt(hq * dv),
            "w_up": rng.standard_normal((d, f)) / math.sqrt(d),
            "w_down": rng.standard_normal((f, d)) / math.sqrt(f),
            "w_gate": rng.standard_normal((d, f)) / math.sqrt(d),
            "attn_norm": 1 + 0.1 * rng.standard_normal(d), "ffn_norm": 1 + 0.1 * rng.standard_normal(d),
            "attn_norm_bias": 0.1 * rng.standard_normal(d), "ffn_norm_bias": 0.1 * rng.standard_normal(d)}


def ref_block(x, w, *, norm="rms", eps=1e-6, gated=True, act="silu", **attn):
    """The pre-norm block of the docstring with the loop attention of tests/reference.py."""
    def nrm(a, which):
        if norm == "rms":
            return ref_rms(a, w[f"{which}_norm"], eps)
        return ref_layer(a, w[f"{which}_norm"], w[f"{which}_norm_bias"], eps)
    u = nrm(x, "attn")
    q, k, v = (np.einsum("bsd,dhe->bhse", u, w[n]) for n in ("w_q", "w_k", "w_v"))
    out, _ = reference_attention(q, k, v, **attn)
    h = x + np.einsum("bhse,hed->bsd", out, w["w_o"])
    return h + ref_ffn(nrm(h, "ffn"), w["w_up"], w["w_down"], w["w_gate"] if gated else None, act)


def make_block(w, *, norm="rms", eps=1e-6, gated=True, act="silu", variant="sdpa", params=None, ffn=None):
    att = B.QKVAttention(w["w_q"], w["w_k"], w["w_v"], w["w_o"], variant=variant, params=params)
    ffn = ffn or B.FFN(w["w_up"], w["w_down"], w["w_gate"] if gated else None, act)
    extra = dict(attn_norm_bias=w["attn_norm_bias"], ffn_norm_bias=w["ffn_norm_bias"]) if norm == "layer" else {}
    return B.Block(att, ffn, norm=norm, eps=eps, attn_norm=w["attn_norm"], ffn_norm=w["ffn_norm"], **extra)


# -- norms and FFN ---------------------------------------------------------------------------------
def test_rms_and_layer_norm_equal_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7)) * 3
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    np.testing.assert_allclose(B.rms_norm(x, w, eps=1e-5), ref_rms(x, w, 1e-5), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(B.layer_norm(x, w, b, eps=1e-5), ref_layer(x, w, b, 1e-5), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(B.rms_norm(x), ref_rms(x, np.ones(7), 1e-6), rtol=1e-14)
    np.testing.assert_allclose(B.layer_norm(x), ref_layer(x, np.ones(7), np.zeros(7), 1e-5), rtol=1e-13, atol=1e-14)
    # a zero row: 0 with eps > 0; with eps = 0 a named error instead of 0/0
    assert np.all(B.rms_norm(np.zeros((1, 4)), eps=1e-6) == 0)
    assert np.all(B.layer_norm(np.full((1, 4), 3.0), eps=1e-6) == 0)
    np.testing.assert_allclose(B.rms_norm(x, eps=0.0), ref_rms(x, np.ones(7), 0.0), rtol=1e-14)
    with pytest.raises(ParameterError, match=r"^eps: expected eps > 0 for x with a row of zero mean square"):
        B.rms_norm(np.zeros((2, 4)), eps=0.0)
    with pytest.raises(ParameterError, match=r"^eps: expected eps > 0 for x with a row of zero variance"):
        B.layer_norm_backward(np.ones((2, 4)), None, np.ones((2, 4)), eps=0)


@pytest.mark.parametrize("act", B.ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_equals_its_definition(act, gated):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5))
    wu, wd, wg = rng.standard_normal((5, 4)), rng.standard_normal((4, 5)), rng.standard_normal((5, 4))
    bu, bd = (None, None) if gated else (rng.standard_normal(4), rng.standard_normal(5))
    got = B.ffn(x, B.FFN(wu, wd, wg if gated else None, act, bu, bd))
    np.testing.assert_allclose(got, ref_ffn(x, wu, wd, wg if gated else None, act, bu, bd), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("act", B.ACTIVATIONS)
def test_activation_derivatives_match_finite_differences(act):
    a = np.linspace(-4, 4, 37) + 0.013  # avoid relu's kink at 0
    fd = (B.activation(a + 1e-6, act) - B.activation(a - 1e-6, act)) / 2e-6
    np.testing.assert_allclose(B.activation_grad(a, act), fd, rtol=1e-7, atol=1e-8)


def test_norm_backward_matches_finite_differences():
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((3, 6)), rng.standard_normal(6), rng.standard_normal(6)
    dy = rng.standard_normal((3, 6))
    dx, dw = B.rms_norm_backward(x, w, dy, eps=1e-3)
    for arr, g in ((x, dx), (w, dw)):
        for idx, want in fd_grad(lambda: float(np.sum(B.rms_norm(x, w, eps=1e-3) * dy)), arr).items():
            assert g[idx] == pytest.approx(want, rel=1e-7, abs=1e-8)
    dx, dw, db = B.layer_norm_backward(x, w, dy, eps=1e-3)
    for arr, g in ((x, dx), (w, dw), (b, db)):
        for idx, want in fd_grad(lambda: float(np.sum(B.layer_norm(x, w, b, eps=1e-3) * dy)), arr).items():
            assert g[idx] == pytest.approx(want, rel=1e-7, abs=1e-8)


@pytest.mark.parametrize("gated, act, biases", [(True, "silu", False), (True, "gelu", False),
                                                (False, "gelu_tanh", True), (False, "relu", True)])
def test_ffn_backward_matches_finite_differences(gated, act, biases):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4))
    w = {"w_up": rng.standard_normal((4, 5)), "w_down": rng.standard_normal((5, 4))}
    if gated:
        w["w_gate"] = rng.standard_normal((4, 5))
    if biases:
        w["b_up"], w["b_down"] = rng.standard_normal(5), rng.standard_normal(4)
    dy = rng.standard_normal(x.shape)
    weights_ = B.FFN(activation=act, **w)
    dx, g = B.ffn_backward(x, weights_, dy)
    assert set(g) == set(w)

    def loss():
        return float(np.sum(B.ffn(x, B.FFN(activation=act, **w)) * dy))

    for name, arr, grad in [("x", x, dx)] + [(n, w[n], g[n]) for n in w]:
        for idx, want in fd_grad(loss, arr).items():
            assert grad[idx] == pytest.approx(want, rel=1e-7, abs=1e-8), (name, idx)


# -- the block -------------------------------------------------------------------------------------
BLOCKS = [dict(attn=dict(causal=True)),
          dict(attn=dict(causal=True), norm="layer", gated=False, act="gelu"),
          dict(attn=dict(), hkv=4),
          dict(attn=dict(causal=True, window=(2, 0)), hkv=1),
          dict(attn=dict(causal=True, alibi_slopes=[2.0 ** (-2 * (h + 1)) for h in range(4)]),
               variant="alibi", pass_params=dict(causal=True)),  # the paper's slopes, 4 heads
          dict(attn=dict(causal=True, softcap=2.0), dv=5)]


@pytest.mark.parametrize("case", BLOCKS, ids=[str(c) for c in BLOCKS])
def test_block_forward_equals_its_composition(case):
    rng = np.random.default_rng(4)
    w = weights(hkv=case.get("hkv", 2), dv=case.get("dv"))
    x = rng.standard_normal((2, 6, 8))
    blk = make_block(w, norm=case.get("norm", "rms"), gated=case.get("gated", True), act=case.get("act", "silu"),
                     variant=case.get("variant", "sdpa"), params=case.get("pass_params", case["attn"]))
    got = B.block_forward(x, blk)
    want = ref_block(x, w, norm=case.get("norm", "rms"), gated=case.get("gated", True),
                     act=case.get("act", "silu"), **case["attn"])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_the_attention_runs_through_the_one_pipeline(monkeypatch):
    calls = []
    real = pipeline.run

    def spy(variant, backend="numpy", inputs=None, params=None, **kw):
        calls.append((getattr(variant, "name", variant), sorted(inputs), kw.get("dout") is not None))
        return real(variant, backend, inputs, params, **kw)

    monkeypatch.setattr(pipeline, "run", spy)
    w = weights(dh=4)
    x = np.random.default_rng(0).standard_normal((1, 5, 8))
    blk = make_block(w, variant="rope", params={"causal": True})
    B.block_forward(x, blk)
    B.block_backward(x, blk, np.ones_like(x))
    assert calls == [("rope", ["k", "q", "v"], False)] * 2 + [("rope", ["k", "q", "v"], True)]


@pytest.mark.parametrize("case", [dict(), dict(norm="layer", gated=False, act="gelu"),
                                  dict(variant="rope", params={"causal": True, "base": 100.0}),
                                  dict(variant="t5", params={"causal": True}, t5=True),
                                  dict(biases=True)])
def test_block_backward_matches_finite_differences(case):
    rng = np.random.default_rng(5)
    w = weights(d=6, hq=2, hkv=1, dh=4, f=7)
    x = rng.standard_normal((2, 4, 6))
    dout = rng.standard_normal(x.shape)
    norm = case.get("norm", "rms")
    params = case.get("params", {"causal": True})
    table = rng.standard_normal((32, 2)) if case.get("t5") else None
    bias = {n: rng.standard_normal(s) * 0.1 for n, s in (("b_q", (2, 4)), ("b_k", (1, 4)), ("b_v", (1, 4)),
                                                         ("b_o", (6,)))} if case.get("biases") else {}

    def blk():
        att = B.QKVAttention(w["w_q"], w["w_k"], w["w_v"], w["w_o"], variant=case.get("variant", "sdpa"),
                             params=params, inputs=None if table is None else {"table": table}, **bias)
        ffn = B.FFN(w["w_up"], w["w_down"], None if case.get("gated") is False else w["w_gate"],
                    case.get("act", "silu"))
        extra = dict(attn_norm_bias=w["attn_norm_bias"], ffn_norm_bias=w["ffn_norm_bias"]) if norm == "layer" else {}
        return B.Block(att, ffn, norm=norm, eps=1e-5, attn_norm=w["attn_norm"], ffn_norm=w["ffn_norm"], **extra)

    g = B.block_backward(x, blk(), dout)

    def loss():
        return float(np.sum(B.block_forward(x, blk()) * dout))

    names = ["w_q", "w_k", "w_v", "w_o", "w_up", "w_down", "attn_norm", "ffn_norm"]
    names += ["w_gate"] if case.get("gated") is not False else []
    names += ["attn_norm_bias", "ffn_norm_bias"] if norm == "layer" else []
    targets = [("x", x)] + [(n, w[n]) for n in names] + list(bias.items())
    if table is not None:
        targets.append(("attention.table", table))
    assert {n for n, _ in targets} <= set(g)
    for name, arr in targets:
        for idx, want in fd_grad(loss, arr, max_entries=12).items():
            assert g[name][idx] == pytest.approx(want, rel=1e-6, abs=1e-8), (name, idx)


def moe_ffn(d=8, e=4, f=3, seed=6, **routing):
    rng = np.random.default_rng(seed)
    ex = B.FFN(rng.standard_normal((e, d, f)) / math.sqrt(d), rng.standard_normal((e, f, d)) / math.sqrt(f),
               rng.standard_normal((e, d, f)) / math.sqrt(d))
    return B.MoE(rng.standard_normal((d, e)), ex, routing=routing)


def test_moe_block_is_attention_then_routed_experts_and_dropped_tokens_pass_the_residual():
    rng = np.random.default_rng(7)
    w = weights()
    x = rng.standard_normal((2, 6, 8))
    m = moe_ffn(k=2, capacity_factor=0.5)
    blk = make_block(w, params={"causal": True}, ffn=m)
    y, routing = B.block_forward(x, blk, return_routing=True)
    dense = make_block(w, params={"causal": True}, ffn=B.FFN(np.zeros((8, 1)), np.zeros((1, 8))))
    h = B.block_forward(x, dense)  # attention and residual only: the FFN adds exactly zero
    v = B.rms_norm(h, w["ffn_norm"], eps=1e-6)
    r = moe.route(v, m.w_router, k=2, capacity_factor=0.5)
    np.testing.assert_array_equal(routing.indices, r.indices)
    np.testing.assert_allclose(y, h + moe.moe_forward(v, r, m.experts), rtol=1e-14, atol=1e-15)
    gone = r.dropped.all(axis=1).reshape(2, 6)
    assert gone.any()
    np.testing.assert_array_equal(y[gone], h[gone])  # through the residual, unchanged


def test_moe_block_backward_matches_finite_differences():
    rng = np.random.default_rng(8)
    w = weights(d=6, hq=2, hkv=1, dh=4)
    x = rng.standard_normal((1, 5, 6))
    m = moe_ffn(d=6, e=4, k=2, normalize="topk")
    dout = rng.standard_normal(x.shape)
    blk = make_block(w, params={"causal": True}, ffn=m)
    g = B.block_backward(x, blk, dout)

    def loss():
        return float(np.sum(B.block_forward(x, blk) * dout))

    for name, arr in [("x", x), ("w_q", w["w_q"]), ("w_router", m.w_router), ("w_up", m.experts.w_up),
                      ("w_gate", m.experts.w_gate), ("w_down", m.experts.w_down), ("ffn_norm", w["ffn_norm"])]:
        for idx, want in fd_grad(loss, arr, max_entries=10).items():
            assert g[name][idx] == pytest.approx(want, rel=1e-6, abs=1e-8), (name, idx)


# -- DeepSeek MLA as a mixer -----------------------------------------------------------------------
def ref_mla(u, wt, *, base=10000.0, eps=1e-6):
    """DeepSeek-V3 MLA written out: q, normalised latent, per-head K/V, interleaved (gptj) RoPE on the
    decoupled part shared by all heads, causal softmax, output projection."""
    b, s, d = u.shape
    h, dc, dn = wt["w_uk"].shape
    dr = wt["w_kr"].shape[1]
    q = np.einsum("bsd,dhe->bhse", u, wt["w_q"])
    c = ref_rms(u @ wt["w_dkv"], wt["kv_norm"], eps)
    kr = u @ wt["w_kr"]

    def rot(a):  # pairs (2i, 2i+1), angle p * base^(-2i/dr)
        out = a.copy()
        for p in range(s):
            for i in range(dr // 2):
                th = p * base ** (-2 * i / dr)
                x0, x1 = a[..., p, 2 * i], a[..., p, 2 * i + 1]
                out[..., p, 2 * i] = x0 * math.cos(th) - x1 * math.sin(th)
                out[..., p, 2 * i + 1] = x0 * math.sin(th) + x1 * math.cos(th)
        return out

    q_rope, k_rope = rot(q[..., dn:]), rot(kr)
    out = np.zeros((b, h, s, wt["w_uv"].shape[2]))
    for bb in range(b):
        for hh in range(h):
            kn = c[bb] @ wt["w_uk"][hh]
            vv = c[bb] @ wt["w_uv"][hh]
            sc = (q[bb, hh, :, :dn] @ kn.T + q_rope[bb, hh] @ k_rope[bb].T) / math.sqrt(dn + dr)
            sc = np.where(np.tril(np.ones((s, s), bool)), sc, -np.inf)
            p = np.exp(sc - sc.max(axis=1, keepdims=True))
            out[bb, hh] = (p / p.sum(axis=1, keepdims=True)) @ vv
    return np.einsum("bhse,hed->bsd", out, wt["w_o"])


def test_mla_mixer_with_latent_norm_equals_mla_written_out():
    rng = np.random.default_rng(9)
    d, h, dc, dn, dr, dv = 8, 2, 6, 4, 4, 5
    wt = {"w_q": rng.standard_normal((d, h, dn + dr)) / 3, "w_dkv": rng.standard_normal((d, dc)) / 3,
          "w_kr": rng.standard_normal((d, dr)) / 3, "w_uk": rng.standard_normal((h, dc, dn)) / 3,
          "w_uv": rng.standard_normal((h, dc, dv)) / 3, "w_o": rng.standard_normal((h, dv, d)) / 3,
          "kv_norm": 1 + 0.1 * rng.standard_normal(dc)}
    u = rng.standard_normal((2, 5, d))
    for form in ("naive", "absorbed"):
        mixer = B.mla_mixer(**wt, params={"causal": True, "style": "gptj", "form": form})
        zero_ffn = B.FFN(np.zeros((d, 1)), np.zeros((1, d)))
        y = B.block_forward(u, B.Block(mixer, zero_ffn, eps=1e-6))
        want = u + ref_mla(ref_rms(u, np.ones(d), 1e-6), wt)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)
    with pytest.raises(ParameterError, match=r"^attention: the block's backward needs a QKVAttention"):
        B.block_backward(u, B.Block(mixer, zero_ffn), np.ones_like(u))


# -- the registered variant ------------------------------------------------------------------------
def test_registered_block_equals_the_python_api_and_takes_json_params():
    var = refattn.variants.get("block")
    arrays = var.example((1, 2, 6, 6, 4, 1), np.random.default_rng(0), var.parse_params({}))
    rng = np.random.default_rng(1)
    ffn_norm, w_gate = 1 + 0.1 * rng.standard_normal(8), rng.standard_normal((8, 16)) / 3
    got = refattn.attention(variant="block", **arrays, attention="rope",
                            attention_params='{"causal": true, "base": 500.0}', ffn_norm=ffn_norm,
                            w_gate=w_gate)
    blk = B.Block(B.QKVAttention(arrays["w_q"], arrays["w_k"], arrays["w_v"], arrays["w_o"], "rope",
                                 {"causal": True, "base": 500.0}),
                  B.FFN(arrays["w_up"], arrays["w_down"], w_gate), ffn_norm=ffn_norm)
    np.testing.assert_array_equal(got, B.block_forward(arrays["x"], blk))
    g = refattn.attention_backward(variant="block", dout=np.ones_like(got), **arrays, attention="rope",
                                   attention_params={"causal": True, "base": 500.0}, ffn_norm=ffn_norm,
                                   w_gate=w_gate)
    assert set(g) == set(var.inputs) | {"ffn_norm", "w_gate"}


@pytest.mark.parametrize("kw, exc, match", [
    (dict(attention="paged"), ParameterError, r"^attention: expected a variant on q, k, v"),
    (dict(attention="t5"), ParameterError, r"^inputs: variant 't5' also takes table; pass them"),
    (dict(attention="block"), ParameterError, r"^attention: expected a variant on q, k, v"),
    (dict(attention="nope_such"), RefattnError, r"^variant: expected one of"),
    (dict(attention_params="{causal"), ParameterError, r"^attention_params: expected a dict or JSON"),
    (dict(attention_params="[1, 2]"), ParameterError, r"^attention_params: expected a dict or JSON"),
    (dict(attention_params={"return_lse": True}), ParameterError, r"^attention_params: the block uses"),
    (dict(attention_params={"layout": "bshd"}), ParameterError, r"^attention_params: the block uses"),
    (dict(attention_params={"causal": "sideways"}), ParameterError, r"^causal:"),
    (dict(norm="batch"), ParameterError, r"^norm: expected one of 'rms', 'layer'"),
    (dict(eps=-1.0), ParameterError, r"^eps: expected a finite number >= 0"),
    (dict(attn_norm_bias=np.zeros(8)), ParameterError, r"^norm: RMSNorm has no bias"),
    (dict(attn_norm=np.ones(7)), ShapeError, r"^attn_norm: expected shape \(8,\)"),
    (dict(ffn_norm_bias=np.ones(9), norm="layer"), ShapeError, r"^ffn_norm_bias: expected shape \(8,\)"),
    (dict(w_gate=np.ones((8, 3))), ShapeError, r"^w_gate: expected shape \(8, 16\)"),
    (dict(activation="tanh"), ParameterError, r"^activation: expected one of"),
])
def test_block_bad_input_is_a_named_error(kw, exc, match):
    var = refattn.variants.get("block")
    arrays = var.example((1, 2, 4, 4, 4, 1), np.random.default_rng(0), var.parse_params({}))
    with pytest.raises(exc, match=match):
        refattn.attention(variant="block", **arrays, **kw)


@pytest.mark.parametrize("name, value, match", [
    ("x", np.ones((4, 8)), r"^x: expected \(B, S, d\)"),
    ("w_k", np.ones((8, 1, 3)), r"^w_k: expected shape \(8, n, 4\)"),
    ("w_o", np.ones((2, 4, 7)), r"^w_o: expected shape \(2, 4, 8\)"),
    ("w_down", np.ones((16, 7)), r"^w_down: expected shape \(16, 8\)"),
    ("w_q", np.full((8, 2, 4), np.nan), r"^w_q: expected finite values"),
    ("x", np.full((1, 4, 8), np.inf), r"^x: expected finite values"),
])
def test_block_shapes_and_values_are_checked(name, value, match):
    var = refattn.variants.get("block")
    arrays = var.example((1, 2, 4, 4, 4, 1), np.random.default_rng(0), var.parse_params({}))
    arrays[name] = value
    with pytest.raises(RefattnError, match=match):
        refattn.attention(variant="block", **arrays)


def test_block_on_numba_runs_the_attention_on_numba():
    if "numba" not in refattn.backends.available():
        pytest.skip("numba is not installed")
    var = refattn.variants.get("block")
    arrays = var.example((2, 4, 40, 40, 8, 2), np.random.default_rng(0), var.parse_params({}))
    kw = dict(attention="gqa", attention_params=json.dumps({"causal": True, "window": [7, 0]}))
    a = refattn.attention(variant="block", backend="numba", **arrays, **kw)
    b = refattn.attention(variant="block", **arrays, **kw)
    assert np.linalg.norm(a - b) <= 1e-13 * np.linalg.norm(b)
    with pytest.raises(RefattnError, match=r"^backend: expected one of numpy for variant 'flash'"):
        refattn.attention(variant="block", backend="numba", **arrays, attention="flash")


@pytest.mark.parametrize("name", ["x", "w_q", "w_k", "w_v", "w_o", "w_up", "w_down", "attn_norm",
                                  "ffn_norm", "w_gate"])
def test_nan_and_inf_in_every_block_array_are_named(name):
    var = refattn.variants.get("block")
    arrays = var.example((1, 2, 4, 4, 4, 1), np.random.default_rng(0), var.parse_params({}))
    params = {"attn_norm": np.ones(8), "ffn_norm": np.ones(8), "w_gate": np.ones((8, 16))}
    target = arrays if name in arrays else params
    for value in (np.nan, -np.inf):
        target[name] = np.array(target[name], dtype=float)
        target[name].flat[1] = value
        with pytest.raises(ParameterError, match=rf"^{name}: expected finite values, got 1 (NaN|-inf) entries"):
            refattn.attention(variant="block", **arrays, **params)

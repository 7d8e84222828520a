"""MLA as DeepSeek-V2/V3 compute it (VARIANTS C): the latent RMSNorm, q with and without q-LoRA,
the decoupled RoPE with HF's scalings (YaRN's mscale in the softmax scale and on cos/sin),
neox or interleaved pairs, causal and padding masks, naive = absorbed, and the backward.

The reference here is DeepSeek's layer written out with loops over tokens, heads and pairs
(``mla_by_loops``): every RMSNorm, projection, rotation (a complex product per pair) and softmax
spelled out. Its RoPE frequencies come from :func:`refattn.position.rope_frequencies`, which
``tests/peers/test_hf_rope.py`` checks against HF's ``ROPE_INIT_FUNCTIONS`` for every rope type;
the softmax factor ``m(f, mscale_all_dim)²`` is written here from VARIANTS C. Gradients are checked
against central finite differences of the variant's own forward. The float64 comparison with HF's
DeepSeek-V2/V3 attention modules is in ``tests/peers/test_hf_bridge.py``.
"""

from __future__ import annotations

import cmath
import json
import math

import numpy as np
import pytest

import refattn
from refattn import pipeline
from refattn.backends import get as get_backend
from refattn.errors import ParameterError, ShapeError
from refattn.position import rope_frequencies
from fd_variants import fd_grad

NP = get_backend("numpy")
YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 8, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}


def dims(b=2, h=3, sq=4, sk=6, dn=6, dr=4, dv=5, dc=8, dm=12, dq=7):
    return dict(b=b, h=h, sq=sq, sk=sk, dn=dn, dr=dr, dv=dv, dc=dc, dm=dm, dq=dq)


def weights(rng, d, q_mode):
    """Inputs and parameters of the variant for ``q_mode`` in 'heads', 'dense', 'lora'."""
    b, h, sq, sk, dn, dr, dv, dc, dm, dq = (d[n] for n in ("b", "h", "sq", "sk", "dn", "dr", "dv", "dc",
                                                           "dm", "dq"))
    arrays = {"hidden": rng.standard_normal((b, sk, dm)),
              "w_dkv": rng.standard_normal((dm, dc)) / math.sqrt(dm),
              "w_uk": rng.standard_normal((h, dc, dn)) / math.sqrt(dc),
              "w_uv": rng.standard_normal((h, dc, dv)) / math.sqrt(dc),
              "w_kr": rng.standard_normal((dm, dr)) / math.sqrt(dm)}
    params = {"kv_norm": 1.0 + 0.1 * rng.standard_normal(dc)}
    if q_mode == "heads":
        arrays["q"] = rng.standard_normal((b, h, sq, dn + dr))
    else:
        arrays["q"] = arrays["hidden"][:, sk - sq:].copy()  # self-attention: the last Sq tokens
        params["q_input"] = "hidden"
        if q_mode == "dense":
            params["w_q"] = rng.standard_normal((dm, h, dn + dr)) / math.sqrt(dm)
        else:
            params.update(w_dq=rng.standard_normal((dm, dq)) / math.sqrt(dm),
                          q_norm=1.0 + 0.1 * rng.standard_normal(dq),
                          w_uq=rng.standard_normal((dq, h, dn + dr)) / math.sqrt(dq))
    return arrays, params


def rms(x, w, eps):
    return [x[t] / math.sqrt(sum(v * v for v in x) / len(x) + eps) * w[t] for t in range(len(x))]


def rotate(x, p, inv_freq, att, style):
    out = list(x)
    r = len(x)
    for i in range(r // 2):
        a, b = (i, i + r // 2) if style == "neox" else (2 * i, 2 * i + 1)
        z = complex(x[a], x[b]) * cmath.exp(1j * p * inv_freq[i]) * att
        out[a], out[b] = z.real, z.imag
    return out


def mla_by_loops(arrays, params, *, style, causal, scaling=None, mask=None, eps=1e-6, mpe=None):
    """``(out (B, H, Sq, d_v), lse)`` of DeepSeek's MLA, token by token (module docstring)."""
    hid, q_in = arrays["hidden"], arrays["q"]
    w_dkv, w_uk, w_uv, w_kr = (arrays[n] for n in ("w_dkv", "w_uk", "w_uv", "w_kr"))
    b, sk, dm = hid.shape
    h, dc, dn = w_uk.shape
    dr, dv = w_kr.shape[1], w_uv.shape[2]
    sq = q_in.shape[-2] if q_in.ndim == 3 else q_in.shape[2]
    inv_freq, att = rope_frequencies(dr, scaling=scaling, max_position_embeddings=mpe)
    scale = 1 / math.sqrt(dn + dr)
    if scaling and scaling.get("mscale_all_dim"):
        m = 0.1 * scaling["mscale_all_dim"] * math.log(scaling["factor"]) + 1  # VARIANTS C
        scale *= m * m
    s = sk - sq
    out, lse = np.zeros((b, h, sq, dv)), np.full((b, h, sq), -np.inf)
    for bb in range(b):
        c, kr = [], []
        for t in range(sk):
            raw = [sum(hid[bb, t, e] * w_dkv[e, f] for e in range(dm)) for f in range(dc)]
            c.append(rms(raw, params["kv_norm"], eps) if "kv_norm" in params else raw)
            pre = [sum(hid[bb, t, e] * w_kr[e, f] for e in range(dm)) for f in range(dr)]
            kr.append(rotate(pre, t, inv_freq, att, style))
        for hh in range(h):
            for i in range(sq):
                if q_in.ndim == 4:
                    qv = list(q_in[bb, hh, i])
                elif "w_q" in params:
                    qv = [sum(q_in[bb, i, e] * params["w_q"][e, hh, f] for e in range(dm))
                          for f in range(dn + dr)]
                else:
                    a = [sum(q_in[bb, i, e] * params["w_dq"][e, r] for e in range(dm))
                         for r in range(params["w_dq"].shape[1])]
                    n = rms(a, params["q_norm"], eps)
                    qv = [sum(n[r] * params["w_uq"][r, hh, f] for r in range(len(n))) for f in range(dn + dr)]
                qr = rotate(qv[dn:], i + s, inv_freq, att, style)
                scores = {}
                for j in range(sk):
                    if causal and j > i + s:
                        continue
                    if mask is not None and not mask[bb, 0, 0, j]:
                        continue
                    k_nope = [sum(c[j][f] * w_uk[hh, f, e] for f in range(dc)) for e in range(dn)]
                    dot = sum(qv[e] * k_nope[e] for e in range(dn)) + sum(qr[e] * kr[j][e] for e in range(dr))
                    scores[j] = scale * dot
                if not scores:
                    continue
                mx = max(scores.values())
                z = sum(math.exp(v - mx) for v in scores.values())
                lse[bb, hh, i] = mx + math.log(z)
                for j, v in scores.items():
                    vj = [sum(c[j][f] * w_uv[hh, f, e] for f in range(dc)) for e in range(dv)]
                    out[bb, hh, i] += math.exp(v - mx) / z * np.array(vj)
    return out, lse


def run(arrays, params, dout=None):
    return pipeline.run("mla", "numpy", arrays, params, dout=dout)


CONFIGS = [  # (q_mode, style, scaling, causal, padding)
    ("heads", "neox", None, True, False),
    ("dense", "gptj", None, True, True),
    ("lora", "gptj", YARN, True, False),
    ("lora", "neox", YARN, False, True),
    ("dense", "neox", {"rope_type": "linear", "factor": 2.0}, True, False),
    ("lora", "gptj", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}, True, True),
]


@pytest.mark.parametrize("q_mode, style, scaling, causal, padding", CONFIGS)
@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_deepseek_mla_equals_the_layer_written_out(q_mode, style, scaling, causal, padding, form):
    rng = np.random.default_rng(hash((q_mode, style, causal, padding)) % 2 ** 32)
    d = dims()
    arrays, params = weights(rng, d, q_mode)
    mask = None
    if padding:  # left padding: the first key of batch 1 is padding
        mask = np.ones((d["b"], 1, 1, d["sk"]), dtype=bool)
        mask[1, ..., :2] = False
        params["mask"] = mask
    params.update(style=style, causal=causal, form=form, scaling=scaling, return_lse=True)
    got = run(arrays, params).outputs
    want = mla_by_loops(arrays, params, style=style, causal=causal, scaling=scaling, mask=mask)
    np.testing.assert_allclose(got["out"], want[0], atol=1e-12, rtol=0)
    np.testing.assert_allclose(got["lse"], want[1], atol=1e-12, rtol=0)


def test_scaling_as_json_text_and_the_softmax_mscale():
    rng = np.random.default_rng(5)
    arrays, params = weights(rng, dims(), "lora")
    a = run(arrays, dict(params, scaling=YARN)).outputs["out"]
    b = run(arrays, dict(params, scaling=json.dumps(YARN))).outputs["out"]
    np.testing.assert_array_equal(a, b)
    m = 0.1 * 0.707 * math.log(40.0) + 1
    explicit = run(arrays, dict(params, scaling=YARN, scale=m * m / math.sqrt(10))).outputs["out"]
    np.testing.assert_allclose(a, explicit, atol=1e-14, rtol=0)
    no_mscale = run(arrays, dict(params, scaling=YARN, scale=1 / math.sqrt(10))).outputs["out"]
    assert np.max(np.abs(a - no_mscale)) > 1e-3  # the factor matters


def test_without_the_new_parameters_mla_is_unchanged():
    """The original inputs alone: no latent norm, per-head q, default RoPE (golden kvcache_mla_*)."""
    var = refattn.variants.get("mla")
    arrays = var.example((1, 2, 3, 5, 8, 2), np.random.default_rng(0), None)
    got = run(arrays, {"causal": True}).outputs["out"]
    want = mla_by_loops(arrays, {}, style="neox", causal=True)[0]
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("q_mode, style, scaling, causal, padding", CONFIGS[:4])
@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_backward_finite_differences(q_mode, style, scaling, causal, padding, form):
    rng = np.random.default_rng(11)
    d = dims(b=2, h=2, sq=3, sk=5, dn=4, dr=4, dv=3, dc=6, dm=8, dq=5)
    arrays, params = weights(rng, d, q_mode)
    if padding:
        mask = np.ones((d["b"], 1, 1, d["sk"]), dtype=bool)
        mask[0, ..., 0] = False
        params["mask"] = mask
    params.update(style=style, causal=causal, form=form, scaling=scaling)
    dout = rng.standard_normal((d["b"], d["h"], d["sq"], d["dv"]))
    grads = run(arrays, params, dout=dout).grads
    learnable = [n for n in ("kv_norm", "w_q", "w_dq", "q_norm", "w_uq") if n in params]
    assert set(grads) == {"q", "hidden", "w_dkv", "w_uk", "w_uv", "w_kr", *learnable}
    values = {**arrays, **{n: params[n] for n in learnable}}

    def loss():
        p = {**params, **{n: values[n] for n in learnable}}
        return float(np.sum(run({n: values[n] for n in arrays}, p).outputs["out"] * dout))

    for name, a in values.items():
        for idx, want in fd_grad(loss, a, max_entries=12).items():
            assert abs(grads[name][idx] - want) <= 1e-7 * max(1.0, abs(want)), (name, idx)


def test_attention_backward_returns_the_dict():
    rng = np.random.default_rng(2)
    arrays, params = weights(rng, dims(), "lora")
    dout = rng.standard_normal((2, 3, 4, 5))
    g = refattn.attention_backward(dout=dout, variant="mla", **arrays, **params, causal=True)
    assert isinstance(g, dict) and g["q"].shape == arrays["q"].shape and g["q_norm"].shape == (7,)


def test_numba_backend_runs_the_new_forms():
    if "numba" not in refattn.backends.available():
        pytest.skip("numba backend not available")
    rng = np.random.default_rng(3)
    arrays, params = weights(rng, dims(), "lora")
    params.update(scaling=YARN, style="gptj", causal=True)
    dout = rng.standard_normal((2, 3, 4, 5))
    a = pipeline.run("mla", "numpy", arrays, params, dout=dout)
    b = pipeline.run("mla", "numba", arrays, params, dout=dout)
    np.testing.assert_allclose(b.outputs["out"], a.outputs["out"], atol=1e-12, rtol=0)
    for n in a.grads:
        np.testing.assert_allclose(b.grads[n], a.grads[n], atol=1e-11, rtol=0, err_msg=n)


def test_named_errors():
    rng = np.random.default_rng(4)
    arrays, params = weights(rng, dims(), "lora")
    with pytest.raises(ParameterError, match="^w_dq: a query projection needs q_input='hidden'"):
        run(dict(arrays, q=rng.standard_normal((2, 3, 4, 10))), {"w_dq": params["w_dq"]})
    with pytest.raises(ParameterError, match="^q_input: 'hidden' needs a query projection"):
        run(arrays, {"q_input": "hidden"})
    with pytest.raises(ParameterError, match="^w_uq: q-LoRA needs"):
        run(arrays, {"q_input": "hidden", "w_dq": params["w_dq"]})
    with pytest.raises(ParameterError, match="^w_q: given together with the q-LoRA"):
        run(arrays, dict(params, w_q=np.zeros((12, 3, 10))))
    with pytest.raises(ShapeError, match=r"^kv_norm: expected shape \(8,\)"):
        run(arrays, dict(params, kv_norm=np.ones(7)))
    with pytest.raises(ShapeError, match=r"^w_uq: expected \(7, 3, 10\)"):
        run(arrays, dict(params, w_uq=params["w_uq"][:, :2]))
    with pytest.raises(ShapeError, match="^q: expected the queries' hidden states"):
        run(dict(arrays, q=rng.standard_normal((2, 3, 4, 10))), params)
    with pytest.raises(ParameterError, match="^norm_eps: expected a finite number >= 0"):
        run(arrays, dict(params, norm_eps=-1.0))
    with pytest.raises(ParameterError, match="^q_input: expected one of"):
        run(arrays, dict(params, q_input="latent"))
    with pytest.raises(ParameterError, match="^kv_norm: expected finite values"):
        run(arrays, dict(params, kv_norm=np.full(8, np.nan)))
    with pytest.raises(ParameterError, match=r"^scaling\['factor'\]: "):
        run(arrays, dict(params, scaling={"rope_type": "yarn", "factor": None, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 4}))
    with pytest.raises(ShapeError, match="^mask: expected a shape broadcastable"):
        run(arrays, dict(params, mask=np.ones((3, 1, 1, 6), dtype=bool)))

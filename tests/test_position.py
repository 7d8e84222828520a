"""Position encodings and the position variants (VARIANTS B), against loops over the definitions.

Independent formulations used here: sinusoidal tables and ALiBi/T5 biases written as Python loops;
RoPE as complex multiplication ``(x_a + i x_b) * exp(i p theta)``; Transformer-XL scores per pair;
attention through ``tests/reference.py`` (loops, no refattn code).
"""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest

import refattn
import refattn.backends
import refattn.variants
from refattn import position as P
from refattn.errors import ParameterError, RefattnError, ShapeError
from reference import reference_attention

RNG = np.random.default_rng(6)


def rand(*shape):
    return RNG.standard_normal(shape)


# -- sinusoidal ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["interleaved", "concat"])
def test_sinusoidal_paper_loop(order):
    n, d, base = 13, 10, 10000.0
    table = P.sinusoidal(n, d, base, order=order)
    for p in range(n):
        for i in range(d // 2):
            angle = p / base ** (2 * i / d)
            sin_at, cos_at = (2 * i, 2 * i + 1) if order == "interleaved" else (i, d // 2 + i)
            assert table[p, sin_at] == pytest.approx(math.sin(angle), abs=1e-15)
            assert table[p, cos_at] == pytest.approx(math.cos(angle), abs=1e-15)


@pytest.mark.parametrize("d", [8, 9])
def test_sinusoidal_fairseq_loop(d):
    n, pad = 12, 1
    table = P.sinusoidal(n, d, freq="fairseq", order="concat", padding_idx=pad)
    half = d // 2
    for p in range(n):
        for i in range(half):
            angle = p * math.exp(-i * math.log(10000.0) / (half - 1))
            want_sin, want_cos = (0.0, 0.0) if p == pad else (math.sin(angle), math.cos(angle))
            assert table[p, i] == pytest.approx(want_sin, abs=1e-15)
            assert table[p, half + i] == pytest.approx(want_cos, abs=1e-15)
    if d % 2:
        assert np.all(table[:, -1] == 0)


def test_sinusoidal_errors():
    with pytest.raises(ParameterError, match="dim"):
        P.sinusoidal(4, 7)
    with pytest.raises(ParameterError, match="order"):
        P.sinusoidal(4, 8, order="zigzag")
    with pytest.raises(ParameterError, match="order"):
        P.sinusoidal(4, 8, freq="fairseq")  # fairseq is [sin | cos]


# -- RoPE -------------------------------------------------------------------------------------------------
def rope_by_complex(x, positions, base, rotary_dim, style):
    """Rotation of each pair as a complex product, element by element."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    r = rotary_dim
    for idx in np.ndindex(*x.shape[:-2]):
        for s, p in enumerate(positions):
            for i in range(r // 2):
                a, b = (i, i + r // 2) if style == "neox" else (2 * i, 2 * i + 1)
                z = complex(x[idx + (s, a)], x[idx + (s, b)]) * cmath.exp(1j * p * base ** (-2 * i / r))
                out[idx + (s, a)], out[idx + (s, b)] = z.real, z.imag
    return out


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_rope_is_a_complex_rotation(style, rotary_dim):
    x = rand(2, 3, 5, 8)
    pos = np.array([0, 3, 7, 100, 4096])
    got = P.rope(x, pos, base=500.0, rotary_dim=rotary_dim, style=style)
    np.testing.assert_allclose(got, rope_by_complex(x, pos, 500.0, rotary_dim or 8, style), atol=1e-13, rtol=0)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 3.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_relative_position_property_and_norm(style, scaling):
    q, k = rand(16), rand(16)
    dots = []
    for p0 in (0, 5, 91, 1234):
        rq = P.rope(q[None], [p0 + 7], style=style, scaling=scaling)[0]
        rk = P.rope(k[None], [p0], style=style, scaling=scaling)[0]
        assert np.linalg.norm(rq) == pytest.approx(np.linalg.norm(q), rel=1e-14)
        dots.append(rq @ rk)
    np.testing.assert_allclose(dots, dots[0], rtol=1e-12, atol=1e-12)


def test_rope_linear_scaling_divides_positions():
    x = rand(1, 2, 6, 8)
    pos = np.arange(10, 16)
    got = P.rope(x, pos, scaling={"rope_type": "linear", "factor": 4.0})
    np.testing.assert_allclose(got, P.rope(x, pos / 4.0), atol=1e-13, rtol=0)


def test_rope_v4_and_v5_spellings_agree():
    x = rand(1, 1, 4, 8)
    v4 = P.rope(x, [1, 2, 3, 4], base=50000.0, scaling={"type": "linear", "factor": 2.0})
    v5 = P.rope(x, [1, 2, 3, 4], scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0})
    np.testing.assert_array_equal(v4, v5)


def test_rope_per_batch_positions():
    x = rand(2, 3, 4, 8)
    pos = np.array([[0, 1, 2, 3], [10, 11, 12, 13]])
    got = P.rope(x, pos)
    for b in range(2):
        np.testing.assert_allclose(got[b], rope_by_complex(x[b], pos[b], 10000.0, 8, "neox"), atol=1e-13)


@pytest.mark.parametrize("kwargs, name", [
    (dict(rotary_dim=5), "rotary_dim"),
    (dict(rotary_dim=10), "rotary_dim"),
    (dict(scaling={"rope_type": "ntk-by-parts", "factor": 2.0}), r"scaling\['rope_type'\]"),
    (dict(scaling={"rope_type": "linear", "factr": 2.0}), "factr"),
    (dict(scaling={"rope_type": "linear"}), "factor"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0}), "max_position_embeddings"),
    (dict(base=10000.0, scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}), "rope_theta"),
    (dict(scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3,
                   "original_max_position_embeddings": 16}, max_position_embeddings=64), "short_factor"),
    (dict(style="llama"), "style"),
    (dict(scaling="linear"), "scaling"),
])
def test_rope_bad_input(kwargs, name):
    with pytest.raises(RefattnError, match=name):
        P.rope(rand(1, 1, 3, 8), [0, 1, 2], **kwargs)


def test_rope_bad_positions():
    with pytest.raises(ShapeError, match="positions"):
        P.rope(rand(1, 1, 3, 8), [0, 1])
    with pytest.raises(ParameterError, match="positions"):
        P.rope(rand(1, 1, 3, 8), [0, -1, 2])


def test_rope_variant_equals_rotate_then_reference():
    q, k, v = rand(2, 4, 5, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    out, lse = refattn.attention(q, k, v, variant="rope", causal=True, return_lse=True, style="gptj",
                                 base=1000.0)
    rq = rope_by_complex(q, np.arange(4, 9), 1000.0, 8, "gptj")  # bottom-right: queries at 4..8
    rk = rope_by_complex(k, np.arange(9), 1000.0, 8, "gptj")
    ref_out, ref_lse = reference_attention(rq, rk, v, causal=True)
    np.testing.assert_allclose(out, ref_out, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-12)


def test_rope_variant_scaling_as_json_and_errors():
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    a = refattn.attention(q, k, v, variant="rope", scaling='{"rope_type": "linear", "factor": 2}')
    b = refattn.attention(q, k, v, variant="rope", scaling={"rope_type": "linear", "factor": 2})
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ParameterError, match="scaling"):
        refattn.attention(q, k, v, variant="rope", scaling="{not json")
    with pytest.raises(ShapeError, match="q_positions"):
        refattn.attention(q, k, v, variant="rope", q_positions=np.arange(3))


# -- ALiBi ------------------------------------------------------------------------------------------------
def paper_slopes(n):
    """Press et al.'s reference code, written out."""
    def pow2(m):
        start = 2 ** (-2 ** -(math.log2(m) - 3))
        return [start * start ** i for i in range(m)]
    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + paper_slopes(2 * c)[0::2][: n - c]


def test_alibi_slopes_paper_code():
    # the paper's code accumulates start * start ** i (a few ulps off); ours is 2 ** exponent, exact
    for n in range(1, 80):
        np.testing.assert_allclose(P.alibi_slopes(n), paper_slopes(n), rtol=1e-14, atol=0)


def test_alibi_slopes_exact_powers_of_two():
    for n in range(1, 80):
        c = 2 ** math.floor(math.log2(n))
        want = [2.0 ** (-8 * (h + 1) / c) for h in range(c)]
        want += [2.0 ** (-8 * (2 * h + 1) / (2 * c)) for h in range(n - c)]  # even-indexed of 2c heads
        assert list(P.alibi_slopes(n)) == want


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_alibi_bias_loop(alignment):
    h, sq, sk = 3, 4, 7
    bias = P.alibi_bias(h, sq, sk, alignment=alignment)
    s = sk - sq if alignment == "bottom_right" else 0
    m = paper_slopes(h)
    for hh, i, j in np.ndindex(h, sq, sk):
        assert bias[hh, i, j] == pytest.approx(-m[hh] * abs(i + s - j), rel=1e-15, abs=0)


def test_alibi_variant_default_slopes():
    q, k, v = rand(1, 6, 5, 8), rand(1, 6, 7, 8), rand(1, 6, 7, 8)
    out, lse = refattn.attention(q, k, v, variant="alibi", causal=True, return_lse=True)
    ref = reference_attention(q, k, v, causal=True, alibi_slopes=paper_slopes(6))
    np.testing.assert_allclose(out, ref[0], atol=1e-12)
    np.testing.assert_allclose(lse, ref[1], atol=1e-12)


# -- T5 -----------------------------------------------------------------------------------------------------
def bucket_loop(r, bidirectional, num_buckets, max_distance):
    nb, ret = num_buckets, 0
    if bidirectional:
        nb //= 2
        ret = nb if r > 0 else 0
        n = abs(r)
    else:
        n = max(-r, 0)
    max_exact = nb // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact))
    return ret + min(val, nb - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bucket_loop(bidirectional):
    rel = np.arange(-400, 401)
    got = P.t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert [int(g) for g in got] == [bucket_loop(int(r), bidirectional, 32, 128) for r in rel]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_variant_loop(bidirectional):
    b, h, sq, sk = 1, 2, 4, 6
    q, k, v = rand(b, h, sq, 8), rand(b, h, sk, 8), rand(b, h, sk, 8)
    table = rand(32, h)
    bias = np.zeros((1, h, sq, sk))
    for hh, i, j in np.ndindex(h, sq, sk):
        bias[0, hh, i, j] = table[bucket_loop(j - (i + sk - sq), bidirectional, 32, 128), hh]
    var = refattn.variants.get("t5")
    p = var.parse_params({"bidirectional": bidirectional, "causal": not bidirectional, "return_lse": True})
    out, lse = var.forward(refattn.backends.get("numpy"), {"q": q, "k": k, "v": v, "table": table}, p)
    ref = reference_attention(q, k, v, scale=1.0, bias=bias, causal=not bidirectional)
    np.testing.assert_allclose(out, ref[0], atol=1e-12)
    np.testing.assert_allclose(lse, ref[1], atol=1e-12)


def test_t5_bad_table():
    var = refattn.variants.get("t5")
    arrays = {"q": rand(1, 2, 3, 4), "k": rand(1, 2, 3, 4), "v": rand(1, 2, 3, 4), "table": rand(32, 3)}
    with pytest.raises(ShapeError, match="table"):
        var.forward(refattn.backends.get("numpy"), arrays, var.parse_params({}))
    with pytest.raises(ParameterError, match="max_distance"):
        P.t5_relative_bucket(np.arange(3), num_buckets=32, max_distance=4)


# -- Transformer-XL -------------------------------------------------------------------------------------
def txl_inputs(b=2, h=2, sq=4, mem=3, d=6):
    sk = sq + mem
    return dict(q=rand(b, h, sq, d), k=rand(b, h, sk, d), v=rand(b, h, sk, d), pos_k=rand(h, sk, d),
                bias_u=rand(h, d), bias_v=rand(h, d))


def test_transformer_xl_shift_equals_direct():
    a = txl_inputs()
    args = (a["q"], a["k"], a["pos_k"], a["bias_u"], a["bias_v"])
    direct = P.transformer_xl_bias(*args, form="direct")
    shift = P.transformer_xl_bias(*args, form="shift")
    np.testing.assert_allclose(shift, direct, atol=1e-13, rtol=0)
    assert np.isneginf(direct[..., 0, -1]).all()  # future keys of the first query


@pytest.mark.parametrize("form", ["shift", "direct"])
def test_transformer_xl_variant_loop(form):
    a = txl_inputs()
    q, k, r, u, w = a["q"], a["k"], a["pos_k"], a["bias_u"], a["bias_v"]
    b, h, sq, d = q.shape
    sk = k.shape[2]
    scale = 1 / math.sqrt(d)
    bias = np.zeros((b, h, sq, sk))
    for bb, hh, i, j in np.ndindex(b, h, sq, sk):
        dist = i + sk - sq - j
        if dist >= 0:  # a + b + c + d, minus the (a) term that the reference adds itself
            bias[bb, hh, i, j] = scale * (u[hh] @ k[bb, hh, j] + (q[bb, hh, i] + w[hh]) @ r[hh, dist])
    var = refattn.variants.get("transformer_xl")
    out, lse = var.forward(refattn.backends.get("numpy"), a, var.parse_params({"form": form, "return_lse": True}))
    ref = reference_attention(q, k, a["v"], causal=True, bias=bias)
    np.testing.assert_allclose(out, ref[0], atol=1e-12)
    np.testing.assert_allclose(lse, ref[1], atol=1e-12)


def test_transformer_xl_errors():
    a = txl_inputs()
    var = refattn.variants.get("transformer_xl")
    with pytest.raises(ParameterError, match="causal"):
        var.forward(refattn.backends.get("numpy"), a, var.parse_params({"causal": False}))
    a["pos_k"] = a["pos_k"][:, :-1]
    with pytest.raises(ShapeError, match="pos_k"):
        var.forward(refattn.backends.get("numpy"), a, var.parse_params({}))


def test_nope_is_plain_attention():
    """nope against the loop-over-definition reference (not against sdpa, which is the same code)."""
    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 4)
    out, lse = refattn.attention(q, k, v, variant="nope", causal=True, return_lse=True)
    want = reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out, want[0], rtol=0, atol=1e-14)
    np.testing.assert_allclose(lse, want[1], rtol=0, atol=1e-14)


# -- the other backends run the same variants --------------------------------------------------------------
@pytest.mark.parametrize("name", ["rope", "alibi", "t5", "transformer_xl", "nope"])
def test_numba_backend_agrees(name):
    from refattn import backends
    if "numba" not in backends.available():
        pytest.skip("numba backend not available")
    var = refattn.variants.get(name)
    p = var.parse_params({"return_lse": True, **({} if "causal" in var.drop else {"causal": True})})
    arrays = var.example((1, 4, 5, 7, 8, 2), np.random.default_rng(1), p)
    ref = var.forward(backends.get("numpy"), arrays, p)
    got = var.forward(backends.get("numba"), arrays, p)
    for a, b in zip(got, ref):
        assert np.linalg.norm(a - b) <= var.tolerance * np.linalg.norm(b)
    if var.backward is not None:
        dout = np.random.default_rng(2).standard_normal(ref[0].shape)
        ref_g = var.backward(backends.get("numpy"), arrays, dout, p)
        got_g = var.backward(backends.get("numba"), arrays, dout, p)
        for a, b in zip(list(got_g[:3]) + [got_g[3][n] for n in sorted(ref_g[3])],
                        list(ref_g[:3]) + [ref_g[3][n] for n in sorted(ref_g[3])]):
            assert np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(b)


# -- gradients against central finite differences ------------------------------------------------------
def grads_of(var, arrays, p, extra_names=()):
    be = refattn.backends.get("numpy")

    def grads(dout):
        dq, dk, dv, extras = var.backward(be, arrays, dout, p)
        return {"q": dq, "k": dk, "v": dv, **extras}
    return grads


@pytest.mark.parametrize("params", [
    {"causal": True},
    {"style": "gptj", "rotary_dim": 4, "layout": "bshd"},
    {"scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
     "max_position_embeddings": 16, "bias": np.linspace(-1, 1, 7)},
])
def test_rope_backward_finite_differences(params):
    from fd_variants import check_variant_grads
    var = refattn.variants.get("rope")
    p = var.parse_params(params)
    arrays = var.example((1, 4, 5, 7, 8, 2), np.random.default_rng(3), p)
    check_variant_grads(var, refattn.backends.get("numpy"), arrays, p, grads_of(var, arrays, p), "qkv")
    if "bias" in params:  # the user's bias gradient comes back in the user's shape
        dout = np.ones((1, 4, 5, 8))
        assert var.backward(refattn.backends.get("numpy"), arrays, dout, p)[3]["bias"].shape == (7,)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_backward_finite_differences(bidirectional):
    from fd_variants import check_variant_grads
    var = refattn.variants.get("t5")
    p = var.parse_params({"bidirectional": bidirectional, "causal": not bidirectional, "num_buckets": 8,
                          "max_distance": 10})
    arrays = var.example((2, 2, 5, 12, 4, 1), np.random.default_rng(4), p)
    check_variant_grads(var, refattn.backends.get("numpy"), arrays, p, grads_of(var, arrays, p),
                        ["q", "k", "v", "table"])


@pytest.mark.parametrize("form", ["shift", "direct"])
def test_transformer_xl_backward_finite_differences(form):
    from fd_variants import check_variant_grads
    var = refattn.variants.get("transformer_xl")
    p = var.parse_params({"form": form})
    arrays = var.example((2, 4, 3, 5, 4, 2), np.random.default_rng(5), p)  # GQA: 4 query heads, 2 KV
    check_variant_grads(var, refattn.backends.get("numpy"), arrays, p, grads_of(var, arrays, p),
                        ["q", "k", "v", "pos_k", "bias_u", "bias_v"])


def test_rope_variant_position_errors_name_the_argument():
    q, k, v = rand(1, 2, 3, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    with pytest.raises(ParameterError, match="^k_positions"):
        refattn.attention(q, k, v, variant="rope", k_positions=[0, 1, -2, 3])
    with pytest.raises(ParameterError, match="q_positions"):  # bottom-right with Sq > Sk: negative
        refattn.attention(k, q, q, variant="rope")

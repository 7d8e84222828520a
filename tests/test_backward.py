"""``attention_backward`` against central finite differences of ``attention`` in float64.

For an upstream gradient ``dout`` the scalar ``f = sum(attention(...) * dout)`` has gradient
``(dq, dk, dv)`` (and ``extras["bias"]``, ``extras["sinks"]``). Every entry of every small input is
perturbed by ``+-h`` and the normwise relative error of the central differences must be <= 1e-6.
The forward itself is pinned to the loop reference in ``test_core.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn

H = 1e-5
MAX_REL_ERR = 1e-6


def make_qkv(seed, b, hq, sq, sk, d, hkv, dv=None):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, dv or d)))


def central_differences(f, x):
    """``df/dx`` entry by entry: ``(f(x + h e) - f(x - h e)) / 2h``."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += H
        xm[idx] -= H
        grad[idx] = (f(xp) - f(xm)) / (2 * H)
    return grad


def check_gradients(q, k, v, seed=0, allow_zero=False, **kw):
    """Compare every gradient ``attention_backward`` returns with central differences."""
    out = refattn.attention(q, k, v, **kw)
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    dq, dk, dv, extras = refattn.attention_backward(q, k, v, dout, **kw)
    assert set(extras) == {n for n in ("bias", "sinks") if kw.get(n) is not None}
    inputs = dict(q=q, k=k, v=v, **{n: np.asarray(kw[n], float) for n in extras})
    analytic = dict(q=dq, k=dk, v=dv, **extras)

    def loss(name, x):
        arrays = {**inputs, name: x}
        params = {**kw, **{n: arrays[n] for n in extras}}
        return float(np.sum(refattn.attention(arrays["q"], arrays["k"], arrays["v"], **params) * dout))

    for name, x in inputs.items():
        assert analytic[name].shape == x.shape, name
        fd = central_differences(lambda y: loss(name, y), x)
        scale = np.linalg.norm(fd)
        if allow_zero and scale < 1e-8:  # e.g. every row sees at most one key: dq = 0
            assert np.linalg.norm(analytic[name]) < 1e-8, name
            continue
        assert scale > 1e-8, f"{name}: zero gradient, the check would be vacuous"
        err = np.linalg.norm(analytic[name] - fd) / scale
        assert err <= MAX_REL_ERR, f"d{name}: normwise relative error {err:.2e}"
    return dq, dk, dv, extras


# (B, Hq, Sq, Sk, D, Hkv)
SQUARE = (1, 2, 4, 4, 3, 2)
WIDE = (1, 2, 3, 6, 3, 1)     # Sq < Sk
TALL = (2, 2, 5, 3, 2, 2)     # Sq > Sk: causal bottom-right leaves empty rows


def _mask_with_empty_row(shape):
    b, hq, sq, sk = shape[:4]
    m = np.random.default_rng(3).random((b, hq, sq, sk)) < 0.7
    m[0, 0, 1] = False
    m[0, 1, 2, 0] = True
    return m


CASES = {
    "plain": (SQUARE, {}),
    "scale": (WIDE, dict(scale=0.6)),
    "causal_bottom_right": (WIDE, dict(causal=True)),
    "causal_bottom_right_empty_rows": (TALL, dict(causal=True)),
    "causal_top_left": (TALL, dict(causal="top_left")),
    "window": (WIDE, dict(window=(1, 1))),
    "window_causal_top_left": (TALL, dict(window=(1, 0), causal=True, alignment="top_left")),
    "mask_empty_row": (SQUARE, dict(mask=_mask_with_empty_row(SQUARE))),
    "bias_full": (SQUARE, dict(bias=np.random.default_rng(4).standard_normal(SQUARE[:3] + (4,)))),
    "bias_head_key": (WIDE, dict(bias=np.random.default_rng(5).standard_normal((1, 2, 1, 6)))),
    "bias_2d": (TALL, dict(bias=np.random.default_rng(6).standard_normal((5, 3)))),
    "bias_key": (WIDE, dict(bias=np.random.default_rng(7).standard_normal(6), causal=True)),
    "softcap": (SQUARE, dict(softcap=0.8, scale=1.5)),
    "alibi": (WIDE, dict(alibi_slopes=[0.5, 0.25])),
    "alibi_flash_causal": (WIDE, dict(alibi_slopes=[0.5, 0.25], alibi_form="flash", causal=True)),
    "sinks": (SQUARE, dict(sinks=[0.3, -0.7])),
    "sinks_empty_rows": (TALL, dict(sinks=[1.2, -0.1], causal=True)),
    "gqa": ((1, 4, 3, 4, 2, 2), dict(causal=True)),
    "mqa": ((2, 3, 3, 4, 2, 1), {}),
    "head_map": ((1, 3, 3, 4, 2, 2), dict(head_map=[1, 1, 0])),
    "dropout_seed": (SQUARE, dict(dropout_p=0.3, dropout_seed=1234)),
    "dropout_mask": (WIDE, dict(dropout_p=0.25,
                                dropout_mask=np.random.default_rng(8).random((3, 6)) < 0.7)),
    "everything": (TALL, dict(causal=True, window=(2, 0), softcap=2.0, alibi_slopes=[0.3, 0.1],
                              bias=np.random.default_rng(9).standard_normal((1, 2, 5, 3)),
                              sinks=[0.2, -0.4], dropout_p=0.2, dropout_seed=7, scale=0.9)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_central_differences(name):
    shape, kw = CASES[name]
    q, k, v = make_qkv(10, *shape)
    check_gradients(q, k, v, **kw)


def test_gradients_dv_differs_from_d():
    q, k, v = make_qkv(11, 1, 2, 3, 5, 2, 1, dv=4)
    dq, dk, dv, _ = check_gradients(q, k, v, causal=True)
    assert dv.shape == v.shape == (1, 1, 5, 4)


def test_gradients_bshd_layout():
    q, k, v = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in make_qkv(12, 1, 2, 3, 5, 2, 1))
    dq, dk, dv, _ = check_gradients(q, k, v, layout="bshd", causal=True, sinks=[0.1, 0.5])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("variant", ["mha", "gqa", "flash"])
def test_aliases_share_the_gradient(variant):
    q, k, v = make_qkv(13, 1, 2, 3, 4, 2, 2)
    dout = np.random.default_rng(0).standard_normal((1, 2, 3, 2))
    want = refattn.attention_backward(q, k, v, dout, causal=True)
    got = refattn.attention_backward(q, k, v, dout, variant=variant, causal=True)
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)
    check_gradients(q, k, v, variant=variant, causal=True)


def test_empty_rows_have_zero_gradient():
    q, k, v = make_qkv(14, 1, 2, 5, 3, 2, 2)
    dout = np.ones((1, 2, 5, 2))
    dq, dk, dv, extras = refattn.attention_backward(q, k, v, dout, causal=True, sinks=[0.5, 1.0])
    assert np.all(dq[:, :, :2] == 0)  # rows 0 and 1 see no key (Sq - Sk = 2)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv)) and np.all(np.isfinite(extras["sinks"]))


def test_bias_constant_along_keys_has_zero_gradient():
    """Softmax ignores a per-row constant, so the gradient of a ``(.., Sq, 1)`` bias is 0 (each row
    of dS sums to zero), up to rounding."""
    q, k, v = make_qkv(16, 1, 2, 3, 6, 3, 1)
    bias = np.random.default_rng(7).standard_normal((2, 3, 1))
    dout = np.random.default_rng(8).standard_normal((1, 2, 3, 3))
    *_, extras = refattn.attention_backward(q, k, v, dout, bias=bias, causal=True)
    assert extras["bias"].shape == (2, 3, 1)
    np.testing.assert_allclose(extras["bias"], 0.0, atol=1e-14)
    *_, with_sinks = refattn.attention_backward(q, k, v, dout, bias=bias, sinks=[0.5, 2.0])
    assert np.all(np.abs(with_sinks["bias"]) > 1e-6)  # not with a sink: it competes with the row


def test_no_extras_without_learnable_extras():
    q, k, v = make_qkv(15, 1, 2, 3, 4, 2, 2)
    *_, extras = refattn.attention_backward(q, k, v, np.ones((1, 2, 3, 2)), causal=True, softcap=3.0,
                                            alibi_slopes=[0.1, 0.2], dropout_p=0.1, dropout_seed=3)
    assert extras == {}


@st.composite
def gradient_cases(draw):
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    b, sq, sk, d, dv = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3)), 2
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = draw(st.sampled_from([True, "top_left", "bottom_right"]))
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 3)), draw(st.integers(-1, 3)))
    if draw(st.booleans()):
        kw["mask"] = rng.random((b, hq, sq, sk)) < 0.7
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(b, hq, sq, sk), (1, hq, 1, sk), (sq, sk)]))
        kw["bias"] = rng.standard_normal(shape)
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.5, 4.0))
    if draw(st.booleans()):
        kw["alibi_slopes"] = rng.random(hq)
    if draw(st.booleans()):
        kw["sinks"] = rng.standard_normal(hq)
    if draw(st.booleans()):
        kw["head_map"] = rng.integers(0, hkv, hq)
    if draw(st.booleans()):
        kw["dropout_p"] = 0.3
        kw["dropout_seed"] = draw(st.integers(0, 2 ** 64 - 1))
    return make_qkv(seed, b, hq, sq, sk, d, hkv, dv), kw


@settings(max_examples=25)
@given(gradient_cases())
def test_random_cases_against_central_differences(case):
    (q, k, v), kw = case
    check_gradients(q, k, v, allow_zero=True, **kw)

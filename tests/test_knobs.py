"""Every core knob a variant declares is honoured, on numpy and on numba.

A variant keeps a knob in its schema only when its definition uses it and this test covers it
(issue "one call"): for each (variant, knob) the knob set to a non-default value must change what
the variant computes in the way the knob says (a different output, the LSE in base 2, NaN rows,
the bshd layout ...), and numba (default tiles and 16x16 tiles) must agree with numpy to 1e-12
normwise. What each knob means is checked against independent definitions in test_core.py and
test_backward.py; here it is the contract "declared => honoured" for every family.
"""

import math

import numpy as np
import pytest

import refattn
from refattn import backends, variants
from test_one_call import case_of, numba_backends

CORE_KNOBS = ("scale", "causal", "alignment", "window", "mask", "bias", "softcap", "alibi_slopes",
              "alibi_form", "sinks", "head_map", "dropout_p", "dropout_seed", "dropout_mask",
              "return_lse", "layout", "empty_row", "lse_base", "compute_dtype")


def dims(var, arrays):
    """``(B, Hq, Hkv, Sq, Sk)`` of a case from its q and the variant's keys."""
    q = np.asarray(arrays["q"])
    b, hq, sq = q.shape[0], q.shape[1], q.shape[2]
    out = refattn.attention(variant=var.name, **arrays, **case_of(var.name)[2])
    if "k" in arrays:
        hkv, sk = np.shape(arrays["k"])[1:3]
    elif "k_pages" in arrays:
        hkv, sk = np.shape(arrays["k_pages"])[2], int(np.max(arrays["seq_lens"]))
    else:  # mla: per-head keys from the latent of every hidden state
        hkv, sk = hq, np.shape(arrays["hidden"])[1]
    return b, hq, hkv, sq, sk, out.shape


def knob_call(var, knob, arrays, base):
    """``(params_with, params_without, check)`` for ``knob``; ``check(with_res, without_res)``
    says whether the knob did what it says (results are tuples (out, lse))."""
    rng = np.random.default_rng(17)
    b, hq, hkv, sq, sk, _ = dims(var, arrays)
    default = {n: d for n, d, _ in var.parameters()}[knob]
    changed = lambda a, b_: not np.allclose(a[0], b_[0], equal_nan=True)  # noqa: E731
    if knob == "scale":
        if var.name == "linear":  # normalised, scale cancels up to eps: test it unnormalised
            return {"scale": 0.37, "normalize": False}, {"normalize": False}, changed
        return {"scale": 0.37}, {}, changed
    if knob == "causal":
        return {"causal": not bool(default)}, {}, changed
    causal = {"causal": True} if "causal" in var.fields() else {}  # some variants are causal anyway
    if knob == "alignment":
        return {"alignment": "top_left", **causal}, causal, changed
    if knob == "window":
        return {"window": (5, 3)}, {}, changed
    if knob == "mask":
        return {"mask": rng.random((b, 1, sq, sk)) > 0.3}, {}, changed
    if knob == "bias":
        return {"bias": rng.standard_normal((1, hq, sq, sk))}, {}, changed
    if knob == "softcap":
        return {"softcap": 0.2}, {}, changed
    if knob == "alibi_slopes":
        return {"alibi_slopes": rng.random(hq) + 0.1}, {}, changed
    if knob == "alibi_form":
        s = rng.random(hq) + 0.1
        same = {"alibi_slopes": s, **causal}
        return ({**same, "alibi_form": "flash"}, same,
                lambda a, b_: np.allclose(a[0], b_[0]) and not np.allclose(a[1], b_[1]))
    if knob == "sinks":
        return {"sinks": rng.standard_normal(hq)}, {}, changed
    if knob == "head_map":
        hm = (np.arange(hq)[::-1] % hkv).astype(np.int64)
        return {"head_map": hm}, {}, changed
    if knob in ("dropout_p", "dropout_seed"):
        return {"dropout_p": 0.3, "dropout_seed": 7}, {}, changed
    if knob == "dropout_mask":
        return {"dropout_p": 0.3, "dropout_mask": rng.random((b, hq, sq, sk)) > 0.3}, {}, changed
    if knob == "lse_base":
        return ({"lse_base": 2}, {},
                lambda a, b_: np.allclose(a[1], b_[1] / math.log(2), equal_nan=True))
    if knob == "empty_row":
        mask = np.ones((b, 1, sq, sk), bool)
        mask[:, :, 1] = False  # row 1 sees nothing
        return ({"empty_row": "nan", "mask": mask}, {"mask": mask},
                lambda a, b_: np.isnan(a[0][:, :, 1]).all() and (b_[0][:, :, 1] == 0).all()
                and np.array_equal(a[0][:, :, 2:], b_[0][:, :, 2:]))
    raise AssertionError(knob)


def run(var, arrays, params, backend="numpy"):
    """``(out, lse)``; ``(out,)`` for variants with no LSE (the linear and ssm families)."""
    if "return_lse" not in var.fields():
        return (refattn.attention(variant=var.name, backend=backend, **arrays, **params),)
    res = refattn.attention(variant=var.name, backend=backend, **arrays, **params, return_lse=True)
    return res if isinstance(res, tuple) else (res, None)


CASES = [(v.name, k) for v in variants.list() for k in CORE_KNOBS
         if k in v.fields() and k not in ("return_lse", "layout", "compute_dtype")]


@pytest.mark.parametrize("name, knob", CASES)
def test_declared_knob_is_honoured_on_every_backend(name, knob):
    var, arrays, base = case_of(name)
    with_p, without_p, check = knob_call(var, knob, arrays, base)
    got = run(var, arrays, {**base, **with_p})
    ref = run(var, arrays, {**base, **without_p})
    assert check(got, ref), f"{name}: {knob} declared but not honoured"
    for be in numba_backends() if "numba" in var.backends else []:
        other = run(var, arrays, {**base, **with_p}, be)
        for a, b in zip(other, got):
            fin = np.isfinite(b)
            np.testing.assert_array_equal(np.isfinite(a), fin)
            assert np.linalg.norm(a[fin] - b[fin]) <= 1e-12 * np.linalg.norm(b[fin]), (name, knob, be)


@pytest.mark.parametrize("name", [v.name for v in variants.list() if "layout" in v.fields()])
def test_declared_layout_bshd_is_the_transpose(name):
    var, arrays, base = case_of(name)
    hl = np.shape(arrays["q"])[1:3]  # (H, L): every per-token array (q, k, v, gates, beta) moves
    t = {n: (np.ascontiguousarray(np.swapaxes(a, 1, 2))
             if n in ("q", "k", "v") or (np.ndim(a) >= 3 and np.shape(a)[1:3] == hl) else a) for n, a in arrays.items()}
    want = run(var, arrays, base)
    for be in ["numpy"] + (numba_backends()[:1] if "numba" in var.backends else []):
        got = run(var, t, {**base, "layout": "bshd"}, be)
        np.testing.assert_allclose(got[0], np.swapaxes(want[0], 1, 2), rtol=0, atol=1e-12)
        if len(want) > 1:
            np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [v.name for v in variants.list() if "compute_dtype" in v.fields()])
def test_declared_compute_dtype_float32_on_numba(name):
    var, arrays, base = case_of(name)
    if "numba" not in backends.available():
        pytest.skip("numba backend not available")
    want = run(var, arrays, base)
    got = run(var, arrays, {**base, "compute_dtype": "float32"}, "numba")
    err = np.linalg.norm(got[0] - want[0]) / np.linalg.norm(want[0])
    assert 0 < err <= 64 * 2.0 ** -23, (name, err)  # float32 storage is visible, and bounded
    with pytest.raises(refattn.ParameterError, match=r"^compute_dtype: backend 'numpy' computes in"):
        run(var, arrays, {**base, "compute_dtype": "float32"})


@pytest.mark.parametrize("name", [v.name for v in variants.list() if "return_lse" in v.fields()])
def test_declared_return_lse_returns_the_lse(name):
    var, arrays, base = case_of(name)
    out = refattn.attention(variant=name, **arrays, **base)
    got = refattn.attention(variant=name, **arrays, **base, return_lse=True)
    assert isinstance(got, tuple) and len(got) == 2
    np.testing.assert_array_equal(got[0], out)
    assert got[1].shape == np.shape(arrays["q"])[:3]  # (B, Hq, Sq)

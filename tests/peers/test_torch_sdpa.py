"""sdpa against ``torch.nn.functional.scaled_dot_product_attention`` in float64 (dropout off).

PyTorch's conventions and ours: ``is_causal`` is top-left aligned (our ``causal="top_left"``); a
boolean ``attn_mask`` keeps True pairs (ours too); a float ``attn_mask`` is added to the scores (our
``bias``); ``enable_gqa=True`` makes query head ``h`` read KV head ``h // (Hq // Hkv)`` (ours). Outputs
and autograd gradients must agree to <= 1e-12 normwise relative error.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn

torch = pytest.importorskip("torch", reason="torch not installed: pip install 'refattn[peers]'")
F = torch.nn.functional

pytestmark = pytest.mark.peers

TOL = 1e-12


def normwise(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(seed, b, hq, sq, sk, d, hkv, dv=None):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, dv or d)))


def torch_sdpa(q, k, v, dout=None, attn_mask=None, **kw):
    """Torch's output, and with ``dout`` its gradients (dq, dk, dv[, d attn_mask])."""
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tm = None
    if attn_mask is not None:
        tm = torch.tensor(attn_mask, requires_grad=attn_mask.dtype != np.bool_)
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, dropout_p=0.0, **kw)
    if dout is None:
        return out.detach().numpy()
    out.backward(torch.tensor(dout))
    grads = [t.grad.numpy() for t in (tq, tk, tv)]
    if tm is not None and tm.requires_grad:
        grads.append(tm.grad.numpy())
    return out.detach().numpy(), grads


def rand_mask(shape, seed, p=0.7):
    """A random boolean mask with at least one visible key per row (no fully masked rows)."""
    rng = np.random.default_rng(seed)
    m = rng.random(shape) < p
    m[..., rng.integers(0, shape[-1])] = True
    return m


# (torch kwargs, our kwargs, shape (B, Hq, Sq, Sk, D, Hkv, Dv), mask kind)
CASES = {
    "plain": ({}, {}, (2, 3, 5, 5, 4, 3, 4), None),
    "plain_sq_ne_sk": ({}, {}, (1, 2, 3, 7, 4, 2, 5), None),
    "causal_square": (dict(is_causal=True), dict(causal="top_left"), (2, 2, 6, 6, 3, 2, 3), None),
    "causal_sq_lt_sk": (dict(is_causal=True), dict(causal="top_left"), (1, 2, 3, 7, 4, 2, 4), None),
    "causal_sq_gt_sk": (dict(is_causal=True), dict(causal=True, alignment="top_left"),
                        (1, 2, 7, 4, 4, 2, 4), None),
    "scale": (dict(scale=0.3), dict(scale=0.3), (1, 2, 4, 6, 8, 2, 3), None),
    "bool_mask_4d": ({}, {}, (2, 2, 5, 6, 3, 2, 3), "bool_4d"),
    "bool_mask_2d": ({}, {}, (2, 2, 5, 6, 3, 2, 3), "bool_2d"),
    "float_mask_4d": ({}, {}, (2, 2, 5, 6, 3, 2, 3), "float_4d"),
    "float_mask_head_key": ({}, {}, (2, 2, 5, 6, 3, 2, 3), "float_1h1k"),
    "gqa": (dict(enable_gqa=True), {}, (2, 6, 5, 7, 4, 2, 3), None),
    "gqa_causal_scale": (dict(enable_gqa=True, is_causal=True, scale=0.8),
                         dict(causal="top_left", scale=0.8), (1, 4, 6, 6, 4, 1, 4), None),
    "gqa_bool_mask": (dict(enable_gqa=True), {}, (1, 4, 5, 6, 3, 2, 3), "bool_4d"),
}


def _mask(kind, shape, seed):
    b, hq, sq, sk = shape[:4]
    if kind is None:
        return None
    if kind == "bool_4d":
        return rand_mask((b, hq, sq, sk), seed)
    if kind == "bool_2d":
        return rand_mask((sq, sk), seed)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, hq, sq, sk) if kind == "float_4d" else (1, hq, 1, sk))


def _ours(kind, mask):
    if mask is None:
        return {}
    return {"mask": mask} if kind.startswith("bool") else {"bias": mask}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_torch(name):
    tkw, okw, shape, kind = CASES[name]
    q, k, v = inputs(1, *shape)
    mask = _mask(kind, shape, 2)
    want = torch_sdpa(q, k, v, attn_mask=mask, **tkw)
    got = refattn.attention(q, k, v, **okw, **_ours(kind, mask))
    assert normwise(got, want) <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_torch_autograd(name):
    tkw, okw, shape, kind = CASES[name]
    q, k, v = inputs(3, *shape)
    mask = _mask(kind, shape, 4)
    dout = np.random.default_rng(5).standard_normal(shape[:3] + (shape[6],))
    want_out, want = torch_sdpa(q, k, v, dout=dout, attn_mask=mask, **tkw)
    dq, dk, dv, extras = refattn.attention_backward(q, k, v, dout, **okw, **_ours(kind, mask))
    got = [dq, dk, dv] + ([extras["bias"]] if "bias" in extras else [])
    assert len(got) == len(want)
    for name_, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert g.shape == w.shape, name_
        assert normwise(g, w) <= TOL, (name_, normwise(g, w))


def test_fully_masked_rows():
    """A row with no visible key: PyTorch 2.13 on CPU returns 0 (our default); were it NaN
    (older versions, other kernels) it would be our ``empty_row="nan"``."""
    q, k, v = inputs(6, 1, 2, 4, 5, 3, 2)
    mask = rand_mask((1, 2, 4, 5), 7)
    mask[0, 1, 2] = False
    want = torch_sdpa(q, k, v, attn_mask=mask)
    empty_row = "nan" if np.isnan(want[0, 1, 2]).all() else "zero"
    got = refattn.attention(q, k, v, mask=mask, empty_row=empty_row)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert normwise(got[ok], want[ok]) <= TOL
    assert np.all(got[0, 1, 2] == 0) or empty_row == "nan"


def test_lse_matches_torch_cpu_flash_kernel():
    """The natural-log LSE, shape (B, H, Sq), from PyTorch's CPU flash kernel (a private op; the
    test skips where it is absent)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        pytest.skip("torch has no _scaled_dot_product_flash_attention_for_cpu")
    q, k, v = inputs(8, 2, 2, 5, 7, 4, 2)
    out_t, lse_t = op(*(torch.tensor(a) for a in (q, k, v)), is_causal=True)
    out, lse = refattn.attention(q, k, v, causal="top_left", return_lse=True)
    assert normwise(out, out_t.numpy()) <= TOL
    assert normwise(lse, lse_t.numpy()) <= TOL


def test_torch_tensors_are_accepted_as_inputs():
    q, k, v = inputs(9, 1, 2, 3, 4, 5, 2)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    got = refattn.attention(tq, tk, tv, causal="top_left")
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert normwise(got, torch_sdpa(q, k, v, is_causal=True)) <= TOL

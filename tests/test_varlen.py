"""Packed (varlen) batches in refattn.attention, and the signature adapters of refattn.adapters.

Varlen is checked against a second formulation: one long sequence with a block-diagonal mask
built here by loops (query i of sequence s sees key j of the same sequence iff the per-sequence
causal/window rule admits it). Adapters are checked with fake peer functions written here that
implement the peer's documented signature on top of an independent dense formulation.
"""

import math

import numpy as np
import pytest

import refattn
from refattn import adapters, impl
from refattn.errors import ParameterError, ShapeError

CQ = np.array([0, 3, 3, 10, 12])  # a sequence with no query
CK = np.array([0, 5, 9, 15, 15])  # and one with no key


def packed(seed=0, hq=4, hkv=2, d=8, cq=CQ, ck=CK):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((cq[-1], hq, d)), rng.standard_normal((ck[-1], hkv, d)),
            rng.standard_normal((ck[-1], hkv, d)))


def block_mask(cq, ck, causal=False, window=None):
    m = np.zeros((cq[-1], ck[-1]), bool)
    for s in range(len(cq) - 1):
        sq, sk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        for i in range(sq):
            for j in range(sk):
                rel = j - (i + sk - sq)
                ok = (not causal or rel <= 0) and (
                    window is None or ((window[0] < 0 or rel >= -window[0]) and
                                       (window[1] < 0 or rel <= window[1])))
                m[cq[s] + i, ck[s] + j] = ok
    return m


def as_one_sequence(x):
    return x.transpose(1, 0, 2)[None]  # (total, H, D) -> (1, H, total, D)


@pytest.mark.parametrize("params", [{}, {"causal": True}, {"window": (2, 1)},
                                    {"causal": True, "softcap": 3.0}])
def test_varlen_equals_block_diagonal_mask(params):
    q, k, v = packed()
    out, lse = refattn.attention(q, k, v, cu_seqlens_q=CQ, cu_seqlens_k=CK, return_lse=True,
                                 **params)
    mask = block_mask(CQ, CK, params.get("causal", False), params.get("window"))
    rest = {n: val for n, val in params.items() if n not in ("causal", "window")}
    want, want_lse = refattn.attention(*map(as_one_sequence, (q, k, v)), mask=mask,
                                       return_lse=True, **rest)
    assert out.shape == (CQ[-1], 4, 8) and lse.shape == (4, CQ[-1])
    np.testing.assert_allclose(out, want[0].transpose(1, 0, 2), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse[0]))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[0][np.isfinite(want_lse[0])],
                               rtol=1e-14)
    # the sequence with no key: output 0, LSE -inf
    assert np.all(out[10:12] == 0) and np.all(np.isneginf(lse[:, 10:12]))


def test_varlen_alibi_per_sequence_by_hand():
    q, k, v = packed(seed=1)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    out = refattn.attention(q, k, v, cu_seqlens_q=CQ, cu_seqlens_k=CK, alibi_slopes=slopes,
                            causal=True)
    # sequence 2: rows 3..9, keys 9..14; bottom-right offset 6 - 7 = -1
    for h in range(4):
        for i in range(7):
            pos = i - 1
            js = [j for j in range(6) if j <= pos]
            if not js:
                assert np.all(out[3 + i, h] == 0)
                continue
            sc = np.array([q[3 + i, h] @ k[9 + j, h // 2] / math.sqrt(8) - slopes[h] * abs(pos - j)
                           for j in js])
            p = np.exp(sc - sc.max())
            want = (p / p.sum()) @ v[[9 + j for j in js], h // 2]
            np.testing.assert_allclose(out[3 + i, h], want, rtol=1e-13, atol=1e-14)


def test_varlen_backward_equals_block_diagonal():
    q, k, v = packed(seed=2)
    dout = np.random.default_rng(3).standard_normal((CQ[-1], 4, 8))
    dq, dk, dv, extras = refattn.attention_backward(q, k, v, dout, cu_seqlens_q=CQ,
                                                    cu_seqlens_k=CK, causal=True)
    mask = block_mask(CQ, CK, causal=True)
    wq, wk, wv, _ = refattn.attention_backward(*map(as_one_sequence, (q, k, v, dout)), mask=mask)
    for got, want in ((dq, wq), (dk, wk), (dv, wv)):
        np.testing.assert_allclose(got, want[0].transpose(1, 0, 2), rtol=0, atol=1e-13)
    assert extras == {}


@pytest.mark.parametrize("cq, ck, message", [
    (np.array([0, 3, 2, 12]), np.array([0, 5, 9, 15]), "cu_seqlens_q: expected non-decreasing"),
    (np.array([0, 3, 12]), np.array([0, 5, 9, 15]), "cu_seqlens_k: expected 3 offsets"),
    (np.array([1, 3, 12]), np.array([0, 9, 15]), "cu_seqlens_q: expected the first offset 0"),
    (np.array([0, 3, 11]), np.array([0, 9, 15]), "cu_seqlens_q: expected the last offset to equal"),
    (np.array([0.0, 3, 12]), np.array([0, 9, 15]), "cu_seqlens_q: expected an integer array"),
    (np.array([0, 12]), None, "cu_seqlens_k: expected offsets"),
])
def test_varlen_offsets_are_validated(cq, ck, message):
    q, k, v = packed(cq=np.array([0, 12]), ck=np.array([0, 15]))
    with pytest.raises((ParameterError, ShapeError), match=message):
        refattn.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)


def test_varlen_rejects_dense_only_parameters():
    q, k, v = packed()
    with pytest.raises(ParameterError, match="mask: not supported with cu_seqlens"):
        refattn.attention(q, k, v, cu_seqlens_q=CQ, cu_seqlens_k=CK, mask=np.ones((12, 15), bool))
    with pytest.raises(ParameterError, match="dropout_p: not supported with cu_seqlens"):
        refattn.attention(q, k, v, cu_seqlens_q=CQ, cu_seqlens_k=CK, dropout_p=0.1, dropout_seed=1)
    with pytest.raises(ShapeError, match=r"q: expected rank 3 \(total, H, D\)"):
        refattn.attention(q[None], k, v, cu_seqlens_q=CQ, cu_seqlens_k=CK)


# -- adapters -----------------------------------------------------------------------------------------
def dense(q, k, v, keep, scale, softcap=0.0, slopes=None, offset=0):
    """Independent dense attention in (B, H, S, D) with a keep-mask (S_q, S_k)."""
    hq, hkv = q.shape[1], k.shape[1]
    k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if slopes is not None:
        i = np.arange(q.shape[2])[:, None]
        j = np.arange(k.shape[2])[None]
        s = s - np.asarray(slopes)[None, :, None, None] * np.abs(i + offset - j)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                         return_attn_probs=False):
    """flash-attn's documented flash_attn_func signature, (B, S, H, D), bottom-right windows."""
    assert dropout_p == 0.0 and alibi_slopes is None or alibi_slopes.dtype == np.float32
    q, k, v = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    rel = np.arange(sk)[None] - (np.arange(sq)[:, None] + sk - sq)
    left, right = window_size
    right = 0 if causal else right
    keep = ((left < 0) | (rel >= -left)) & ((right < 0) | (rel <= right))
    scale = softmax_scale or 1 / math.sqrt(q.shape[-1])
    out = dense(q, k, v, keep, scale, softcap, alibi_slopes, sk - sq).transpose(0, 2, 1, 3)
    return (out, None, None) if return_attn_probs else out


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                **kw):
    assert cu_seqlens_q.dtype == np.int32 and max_seqlen_q == np.diff(cu_seqlens_q).max()
    outs = []
    for s in range(len(cu_seqlens_q) - 1):
        rq = slice(cu_seqlens_q[s], cu_seqlens_q[s + 1])
        rk = slice(cu_seqlens_k[s], cu_seqlens_k[s + 1])
        outs.append(fake_flash_attn_func(q[None, rq], k[None, rk], v[None, rk], **kw)[0])
    return np.concatenate(outs)


def _case(seed=0, b=2, hq=4, hkv=2, sq=7, sk=11, d=8, **params):
    rng = np.random.default_rng(seed)
    return dict(q=rng.standard_normal((b, hq, sq, d)), k=rng.standard_normal((b, hkv, sk, d)),
                v=rng.standard_normal((b, hkv, sk, d)), **params)


FLASH_PARAMS = [{}, {"causal": True}, {"window": (3, 1)}, {"causal": True, "window": (2, -1)},
                {"softcap": 2.0, "scale": 0.3},
                {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625]), "causal": True}]


@pytest.mark.parametrize("params", FLASH_PARAMS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_flash_adapter(params, layout):
    case = _case(**params)
    if layout == "bshd":
        case.update({n: case[n].transpose(0, 2, 1, 3) for n in "qkv"}, layout="bshd")
    ref = refattn.attention(**case)
    got = impl.call(fake_flash_attn_func, case, adapter="flash")["out"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("params", FLASH_PARAMS[:4])
def test_varlen_adapter_on_dense_and_packed_cases(params):
    case = _case(**params)
    got = impl.call(fake_flash_attn_varlen_func, case, adapter="varlen")["out"]
    np.testing.assert_allclose(got, refattn.attention(**case), rtol=0, atol=1e-13)
    q, k, v = packed(seed=4, cq=np.array([0, 3, 10]), ck=np.array([0, 5, 15]))
    pcase = dict(q=q, k=k, v=v, cu_seqlens_q=np.array([0, 3, 10]),
                 cu_seqlens_k=np.array([0, 5, 15]), **params)
    got = impl.call(fake_flash_attn_varlen_func, pcase, adapter="varlen")["out"]
    np.testing.assert_allclose(got, refattn.attention(**pcase), rtol=0, atol=1e-13)


def test_adapters_refuse_what_they_cannot_express():
    case = _case(mask=np.ones((7, 11), bool))
    with pytest.raises(ParameterError, match="mask: not expressible in the 'flash' signature"):
        impl.call(fake_flash_attn_func, case, adapter="flash")
    with pytest.raises(ParameterError, match="softcap: not expressible in the 'sdpa' signature"):
        adapters.signature_call("sdpa", _case(), {"softcap": 3.0})
    with pytest.raises(ParameterError, match="alignment: flash-attn aligns causal"):
        impl.call(fake_flash_attn_func, _case(causal="top_left"), adapter="flash")
    with pytest.raises(ParameterError, match="adapter: expected one of"):
        impl.call(fake_flash_attn_func, _case(), adapter="xformers")
    with pytest.raises(ParameterError, match="block_q: not expressible in the 'flash' signature"):
        impl.call(fake_flash_attn_func, _case(block_q=4), adapter="flash")


SDPA_PARAMS = [{}, {"causal": "top_left"}, {"causal": True}, {"window": (2, 3)},
               {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625]), "causal": True},
               {"mask": np.random.default_rng(9).random((2, 1, 7, 11)) < 0.7},
               {"head_map": np.array([1, 1, 0, 1])}]


@pytest.mark.parametrize("params", SDPA_PARAMS)
def test_sdpa_adapter_with_torch_float64(params):
    torch = pytest.importorskip("torch", reason="the sdpa adapter test calls PyTorch's SDPA")
    case = _case(seed=5, **params)
    if "mask" in params:  # every row keeps a key (torch's SDPA gives NaN for empty rows)
        case["mask"][..., 0] = True
    call = adapters.signature_call("sdpa", {n: case[n] for n in "qkv"},
                                   {n: val for n, val in case.items() if n not in "qkv"})
    if params == {"causal": "top_left"}:
        assert call.kwargs.get("is_causal") is True and "attn_mask" not in call.kwargs
    got = impl.call(torch.nn.functional.scaled_dot_product_attention, case, adapter="sdpa",
                    framework="torch")["out"]
    np.testing.assert_allclose(got, refattn.attention(**case), rtol=0, atol=1e-13)


def test_torch_grads_through_flash_style_adapter():
    torch = pytest.importorskip("torch", reason="autograd gradients need PyTorch")

    def torch_flash(q, k, v, softmax_scale=None, causal=False, **_):  # (B, S, H, D) in torch
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    case = _case(seed=6, sq=9, sk=9, causal=True)
    dout = np.random.default_rng(7).standard_normal((2, 4, 9, 8))
    got = impl.grads(torch_flash, case, dout, adapter="flash", framework="torch")
    dq, dk, dv, _ = refattn.attention_backward(case["q"], case["k"], case["v"], dout, causal=True)
    for name, want in (("dq", dq), ("dk", dk), ("dv", dv)):
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-12)


def test_numpy_framework_dtypes_and_backward_functions():
    case = _case(seed=8, causal=True)
    seen = {}

    def fwd(q, k, v, **params):
        seen["dtype"] = q.dtype
        return refattn.attention(q, k, v, **params)

    impl.call(fwd, case, dtype="bf16")
    assert str(seen["dtype"]) == "bfloat16"
    impl.call(fwd, case)
    assert seen["dtype"] == np.float64

    def bwd(q, k, v, dout, **params):
        seen["dout"] = dout.dtype
        return refattn.attention_backward(q, k, v, dout, **params)

    dout = np.random.default_rng(9).standard_normal(case["q"].shape)
    got = impl.grads(bwd, case, dout, framework="numpy", dtype="fp16")
    assert seen["dout"] == np.float16
    r = {n: np.asarray(case[n], np.float16).astype(np.float64) for n in "qkv"}
    want = refattn.attention_backward(r["q"], r["k"], r["v"], dout.astype(np.float16), causal=True)
    for name, w in zip(("dq", "dk", "dv"), want):
        np.testing.assert_allclose(got[name], w, rtol=0, atol=1e-13)
    with pytest.raises(ParameterError, match="adapter: gradients with framework 'numpy'"):
        impl.grads(bwd, case, dout, framework="numpy", adapter="flash")
    with pytest.raises(ParameterError, match="framework: expected one of 'numpy', 'torch', 'jax'"):
        impl.call(fwd, case, framework="mxnet")


FLEX_PARAMS = [{"causal": True, "softcap": 3.0},
               {"window": (2, 3), "alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
               {"mask": np.random.default_rng(10).random((2, 1, 7, 11)) < 0.6,
                "bias": np.random.default_rng(11).standard_normal((4, 7, 11)),
                "head_map": np.array([1, 0, 0, 1])}]


@pytest.mark.parametrize("params", FLEX_PARAMS)
def test_flex_adapter_with_torch_float64(params):
    pytest.importorskip("torch", reason="the flex adapter test calls PyTorch's flex_attention")
    import warnings
    from torch.nn.attention.flex_attention import flex_attention

    case = _case(seed=12, **params)
    if "mask" in case:
        case["mask"][..., 3, :] = False  # an empty row: output 0, LSE -inf in both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flex's eager-mode notice
        got = impl.call(flex_attention, case, adapter="flex", framework="torch", want_lse=True)
    out, lse = refattn.attention(**case, return_lse=True)
    np.testing.assert_allclose(got["out"], out, rtol=0, atol=1e-13)
    finite = np.isfinite(lse)
    np.testing.assert_array_equal(np.isfinite(got["lse"]), finite)
    np.testing.assert_allclose(got["lse"][finite], lse[finite], rtol=0, atol=1e-12)
    with pytest.raises(ParameterError, match="adapter: 'flex' passes torch score_mod"):
        impl.call(flex_attention, case, adapter="flex")

"""Sub-rectangles in global coordinates (``rect=``, :mod:`refattn.subrect`).

The reference is the single call on the whole problem; the rectangles of a random chunking, merged
with ``merge_states`` per query chunk (sinks applied once afterwards), must equal it to 1e-13
normwise, forward and backward (dq summed over KV chunks, dk/dv over query chunks), on the numpy and
the numba backends.
"""

import zlib

import numpy as np
import pytest

import refattn
from refattn.backends import get
from refattn.errors import ParameterError, ShapeError
from refattn.subrect import Rect

TOL = 1e-13


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    fin = np.isfinite(b)
    a, b = np.where(fin, a, 0), np.where(fin, b, 0)  # empty rows: -inf in both (checked apart)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def cuts(rng, n, parts):
    inner = np.sort(rng.choice(np.arange(1, n), size=parts - 1, replace=False))
    return [0, *map(int, inner), n]


def chunked(q, k, v, variant, backend, qb, kb, sinks=None, **kw):
    """``(out, lse)`` of the whole problem from its rectangles, merged per query chunk."""
    sq, sk = q.shape[2], k.shape[2]
    merge = get("numpy").merge_states
    outs, lses = [], []
    for a, b in zip(qb, qb[1:]):
        state = None
        for c, d in zip(kb, kb[1:]):
            part = refattn.attention(q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], variant=variant,
                                     backend=backend, rect=(a, c, sq, sk), return_lse=True, **kw)
            state = part if state is None else merge(*state, *part)
        outs.append(state[0])
        lses.append(state[1])
    out, lse = np.concatenate(outs, axis=2), np.concatenate(lses, axis=2)
    if sinks is not None:
        out = out * get("numpy").sink_factor(lse, sinks)[..., None]
    return out, lse


def inputs(rng, b=1, hq=4, hkv=2, sq=160, sk=200, d=8):
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, d)))


CASES = {
    "causal_bottom_right": ("sdpa", dict(causal=True), {}),
    "causal_top_left": ("sdpa", dict(causal="top_left"), {}),
    "window": ("sdpa", dict(window=(23, 5)), {}),
    "causal_window_top_left": ("sdpa", dict(causal="top_left", window=(30, 0)), {}),
    "alibi": ("sdpa", dict(causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])), {}),
    "alibi_noncausal": ("sdpa", dict(alibi_slopes=np.array([0.3, 0.2, 0.1, 0.05])), {}),
    "dropout": ("sdpa", dict(causal=True, dropout_p=0.25, dropout_seed=11), {}),
    "gqa_softcap": ("gqa", dict(softcap=3.0), {}),
    "sliding_window": ("sliding_window", dict(window=(17, 0)), {}),
    "bigbird": ("bigbird", dict(block_size=16, num_random_blocks=2, seed=4), dict(sq=256, sk=256)),
    "block_sparse": ("block_sparse", dict(block_size=16, causal=True), dict(sq=192, sk=192)),
}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_rectangles_equal_the_whole_call(case, backend):
    variant, kw, shape = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    q, k, v = inputs(rng, **shape)
    if variant == "block_sparse":
        kw = dict(kw, block_mask=rng.random((12, 12)) < 0.4)
    want, want_lse = refattn.attention(q, k, v, variant=variant, backend=backend, return_lse=True, **kw)
    for _ in range(2):
        qb, kb = cuts(rng, q.shape[2], 4), cuts(rng, k.shape[2], 5)
        out, lse = chunked(q, k, v, variant, backend, qb, kb, **kw)
        assert rel(out, want) <= TOL, (qb, kb)
        assert rel(lse, want_lse) <= TOL, (qb, kb)
        assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_sinks_apply_once_after_the_merge(backend):
    rng = np.random.default_rng(5)
    q, k, v = inputs(rng)
    sinks = np.array([0.5, -1.0, 2.0, 0.0])
    want, want_lse = refattn.attention(q, k, v, causal=True, sinks=sinks, backend=backend, return_lse=True)
    out, lse = chunked(q, k, v, "sdpa", backend, cuts(rng, 160, 3), cuts(rng, 200, 4), sinks=sinks,
                       causal=True)
    assert rel(out, want) <= TOL and rel(lse, want_lse) <= TOL


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(19, 4), dropout_p=0.2, dropout_seed=2)],
                         ids=["causal", "window_dropout"])
def test_rectangle_gradients_sum_to_the_whole_backward(kw, backend):
    rng = np.random.default_rng(9)
    q, k, v = inputs(rng, sq=96, sk=112)
    dout = rng.standard_normal((1, 4, 96, 8))
    out, lse = refattn.attention(q, k, v, backend=backend, return_lse=True, **kw)
    want = refattn.attention_backward(q, k, v, dout, backend=backend, **kw)
    qb, kb = cuts(rng, 96, 3), cuts(rng, 112, 4)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for a, b in zip(qb, qb[1:]):
        for c, d in zip(kb, kb[1:]):
            rect = Rect(a, c, 96, 112, out=out[:, :, a:b], lse=lse[:, :, a:b])
            gq, gk, gv, extras = refattn.attention_backward(
                q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], dout[:, :, a:b], backend=backend, rect=rect, **kw)
            assert extras == {}
            dq[:, :, a:b] += gq
            dk[:, :, c:d] += gk
            dv[:, :, c:d] += gv
    for got, exp in zip((dq, dk, dv), want[:3]):
        assert rel(got, exp) <= 1e-12


@pytest.mark.parametrize("kw, match", [
    (dict(sinks=np.zeros(4)), "sinks: not supported on a sub-rectangle"),
    (dict(mask=np.ones((16, 16), bool)), "mask: not supported"),
    (dict(bias=np.zeros((16, 16))), "bias: not supported"),
    (dict(dropout_p=0.1, dropout_mask=np.ones((16, 16), bool)), "dropout_mask: not supported"),
    (dict(empty_row="nan"), "empty_row: expected 'zero'"),
    (dict(lse_base=2), "lse_base: expected e"),
    (dict(causal=True, alibi_slopes=np.ones(4), alibi_form="flash"), "alibi_form: expected 'symmetric'"),
])
def test_refused_knobs_name_themselves(kw, match):
    q = k = v = np.zeros((1, 4, 16, 8))
    with pytest.raises(ParameterError, match=match):
        refattn.attention(q, k, v, rect=(0, 0, 32, 32), **kw)


def test_rect_is_checked():
    q = k = v = np.zeros((1, 2, 16, 8))
    with pytest.raises(ShapeError, match="rect: expected rows 20 .. 35"):
        refattn.attention(q, k, v, rect=(20, 0, 32, 32))
    with pytest.raises(ParameterError, match="rect: expected \\(q0, k0, Sq, Sk\\)"):
        refattn.attention(q, k, v, rect=(0, 0, 32))
    with pytest.raises(ParameterError, match="rect"):  # a variant that does not declare subrect
        refattn.attention(q, k, v, variant="flash", rect=(0, 0, 16, 16))
    with pytest.raises(ParameterError, match="needs rect.out and rect.lse"):
        refattn.attention_backward(q, k, v, np.zeros((1, 2, 16, 8)), rect=(0, 0, 16, 16))


def test_block_sparse_selection_is_refused_on_a_rectangle():
    rng = np.random.default_rng(1)
    q, k, v = inputs(rng, sq=64, sk=64)
    with pytest.raises(ParameterError, match="block_mask: expected an explicit block mask"):
        refattn.attention(q, k, v, variant="block_sparse", block_size=16, rect=(0, 0, 64, 64))

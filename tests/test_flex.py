"""FlexAttention descriptions as the reference (refattn.flex and the ``flex`` variant).

mask_mods become Patterns evaluated block by block: checked against dense masks written here (loops
over the definition), for several tile sizes, with and without the dense shortcut, for masks that
depend on the batch entry and the head; the block-by-block path never evaluates more than
``B * H * block**2`` pairs at once. The ``flex`` variant is checked against sdpa with the equivalent
declarative knobs (mask, softcap, ALiBi, window), and its gradients -- through a score_mod refattn
cannot express otherwise -- against finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="refattn.flex needs torch (pip install 'refattn[peers]')")

import refattn  # noqa: E402
from refattn.errors import ParameterError, ShapeError  # noqa: E402
from refattn.flex import pattern_from_mask_mod  # noqa: E402
from refattn.patterns import EMPTY, FULL, PARTIAL  # noqa: E402

import flex_mods as M  # noqa: E402
from fd_variants import fd_grad  # noqa: E402

RNG = np.random.default_rng(8)


def dense(fn, b, h, sq, sk):
    out = np.zeros((b, h, sq, sk), dtype=bool)
    for bb in range(b):
        for hh in range(h):
            for i in range(sq):
                for j in range(sk):
                    out[bb, hh, i, j] = bool(fn(torch.tensor(bb), torch.tensor(hh), torch.tensor(i),
                                                torch.tensor(j)))
    return out


@pytest.mark.parametrize("fn", [M.causal, M.sliding, M.document, M.per_head_window, M.scalar_reshape])
@pytest.mark.parametrize("block, limit", [(128, 1 << 24), (4, 1 << 24), (5, 1), (3, 1)])
def test_pattern_equals_the_mask_mod(fn, block, limit):
    b, h, sq, sk = 2, 3, 17, 13
    p = pattern_from_mask_mod(fn, b, h, sq, sk, block_size=block, dense_limit=limit)
    want = dense(fn, b, h, sq, sk)
    assert np.array_equal(np.broadcast_to(p.mask(sq, sk), want.shape), want)
    for bq, bk in ((block, block), (4, 6), (1, 1)):  # tile codes on any grid are exact once refined
        lay = p.block_layout(bq, bk, sq=sq, sk=sk)
        for ti in range(lay.shape[2]):
            for tj in range(lay.shape[3]):
                t = want[:, :, ti * bq:(ti + 1) * bq, tj * bk:(tj + 1) * bk]
                code = np.where(t.all(axis=(2, 3)), FULL, np.where(t.any(axis=(2, 3)), PARTIAL, EMPTY))
                assert np.array_equal(np.broadcast_to(lay[:, :, ti, tj], code.shape), code)


def test_only_partial_tiles_are_stored_and_batch_head_axes_dropped():
    p = pattern_from_mask_mod(M.sliding, 2, 4, 512, 512, block_size=64)
    assert p.codes.shape == (1, 1, 8, 8)  # depends on neither b nor h
    assert p.masks.shape == (15, 64, 64)  # the 8 diagonal and 7 sub-diagonal tiles
    q = pattern_from_mask_mod(M.document, 2, 4, 20, 20, block_size=8)
    assert q.codes.shape == (2, 1, 3, 3)


def test_block_by_block_never_evaluates_more_than_a_tile_row():
    sizes = []

    def counted(b, h, q, kv):
        sizes.append(int(np.prod(np.broadcast_shapes(b.shape, h.shape, q.shape, kv.shape))))
        return q >= kv

    pattern_from_mask_mod(counted, 2, 2, 300, 300, block_size=64, dense_limit=1000)
    assert max(sizes) <= 2 * 2 * 64 * 64
    sizes.clear()
    pattern_from_mask_mod(counted, 1, 1, 30, 30, block_size=8)  # under the limit: one dense call
    assert sizes == [900]


@pytest.mark.parametrize("mods, knobs", [
    ((M.document, M.softcap), {"softcap": 3.0}),
    ((M.sliding, M.alibi), {"causal": True, "window": (4, 0), "alibi_slopes": np.arange(1, 5) * 0.25}),
    ((M.causal, None), {"causal": True}),
    ((None, M.softcap), {"softcap": 3.0}),
])
def test_flex_variant_equals_the_declarative_knobs(mods, knobs):
    q, k, v = RNG.standard_normal((2, 4, 20, 8)), RNG.standard_normal((2, 2, 20, 8)), RNG.standard_normal((2, 2, 20, 8))
    if mods[0] is M.document:
        knobs = dict(knobs, mask=dense(M.document, 2, 1, 20, 20))
    out, lse = refattn.attention(q, k, v, variant="flex", mask_mod=mods[0], score_mod=mods[1], block_size=8,
                                 return_lse=True)
    want, want_lse = refattn.attention(q, k, v, return_lse=True, **knobs)
    np.testing.assert_allclose(out, want, atol=1e-13, rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=1e-13, rtol=0)
    d = RNG.standard_normal(out.shape)
    for a, b in zip(refattn.attention_backward(q, k, v, d, variant="flex", mask_mod=mods[0], score_mod=mods[1]),
                    refattn.attention_backward(q, k, v, d, **knobs)):
        if isinstance(a, np.ndarray):
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


def test_an_extra_mask_is_intersected_with_the_mask_mod():
    q, k, v = (RNG.standard_normal((2, 2, 9, 4)) for _ in range(3))
    extra = RNG.random((2, 1, 9, 9)) < 0.7
    got = refattn.attention(q, k, v, variant="flex", mask_mod=M.causal, mask=extra, block_size=4)
    np.testing.assert_allclose(got, refattn.attention(q, k, v, causal=True, mask=extra), atol=1e-13, rtol=0)


def test_module_strings_and_numba():
    q, k, v = (RNG.standard_normal((1, 2, 33, 8)) for _ in range(3))
    a = refattn.attention(q, k, v, variant="flex", mask_mod="flex_mods:sliding", score_mod="flex_mods:alibi")
    b = refattn.attention(q, k, v, causal=True, window=(4, 0), alibi_slopes=np.array([0.25, 0.5]))
    np.testing.assert_allclose(a, b, atol=1e-13, rtol=0)
    if "numba" in refattn.backends.available():
        c = refattn.attention(q, k, v, variant="flex", mask_mod=M.sliding, score_mod=M.alibi, backend="numba")
        np.testing.assert_allclose(c, b, atol=1e-13, rtol=0)


def test_backward_through_a_nonlinear_score_mod_finite_differences():
    var = refattn.variants.get("flex")
    p = var.parse_params({"mask_mod": M.document, "score_mod": M.square, "block_size": 4})
    arrays = {"q": RNG.standard_normal((2, 2, 12, 4)), "k": RNG.standard_normal((2, 1, 12, 4)),
              "v": RNG.standard_normal((2, 1, 12, 4))}
    NP = refattn.backends.get("numpy")
    dout = RNG.standard_normal((2, 2, 12, 4))
    dq, dk, dv, extras = var.backward(NP, arrays, dout, p)
    assert extras == {}
    for name, g in (("q", dq), ("k", dk), ("v", dv)):
        def loss():
            return float(np.sum(var.forward(NP, arrays, p)[0] * dout))
        for idx, want in fd_grad(loss, arrays[name], max_entries=15).items():
            assert abs(g[idx] - want) <= 1e-7 * max(1.0, abs(want)), (name, idx)


def test_errors():
    q = k = v = RNG.standard_normal((1, 1, 6, 4))
    with pytest.raises(ParameterError, match="^mask_mod: expected a boolean result"):
        refattn.attention(q, k, v, variant="flex", mask_mod=M.not_bool)
    with pytest.raises(ParameterError, match="^mask_mod: module 'flex_mods' has no attribute 'nope'"):
        refattn.attention(q, k, v, variant="flex", mask_mod="flex_mods:nope")
    with pytest.raises(ParameterError, match="^score_mod: returned NaN"):
        refattn.attention(q, k, v, variant="flex", score_mod=M.nan_mod)
    with pytest.raises(ParameterError, match="^mask_mod: expected a callable or 'module:function', got int"):
        refattn.attention(q, k, v, variant="flex", mask_mod=3)
    with pytest.raises(ParameterError, match="^causal: not an input or parameter of variant 'flex'"):
        refattn.attention(q, k, v, variant="flex", causal=True)
    with pytest.raises(ParameterError, match="^score_mod: evaluated densely on B\\*H\\*Sq\\*Sk = 36 scores"):
        from refattn.flex import score_mod_scores
        score_mod_scores(M.softcap, np.zeros((1, 1, 6, 6)), dense_limit=10)
    p = pattern_from_mask_mod(M.causal, 1, 1, 6, 6)
    with pytest.raises(ShapeError, match="^mask_mod: the pattern was evaluated for Sq=6, Sk=6"):
        p.mask(7, 7)
    with pytest.raises(ParameterError, match="^block_size: expected an integer >= 1"):
        pattern_from_mask_mod(M.causal, 1, 1, 6, 6, block_size=0)

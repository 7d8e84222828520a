"""The foundation's :class:`refattn.patterns.Pattern` (causal, window, alignment, dense mask) against a
loop over the definitions (``tests/reference.py``): ``mask``, ``block_layout`` codes and ``tile_plan``.
The expected tile codes are counted here from the loop mask, pair by pair."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refattn.errors import ParameterError
from refattn.patterns import EMPTY, FULL, PARTIAL, Pattern
from reference import diagonal_offset, element, is_visible


def loop_mask(sq, sk, *, causal=False, window=None, alignment="bottom_right", dense=None, nb=1, nh=1):
    """``(nb, nh, sq, sk)`` visibility, one pair at a time."""
    s = diagonal_offset(alignment, sq, sk)
    out = np.zeros((nb, nh, sq, sk), dtype=bool)
    for b, h, i, j in np.ndindex(out.shape):
        out[b, h, i, j] = is_visible(i, j, s=s, causal=causal, window=window) and (
            dense is None or bool(element(dense, b, h, i, j)))
    return out


def expected_layout(mask, bq, bk):
    """Tile codes counted from a dense ``(Bm, Hm, sq, sk)`` mask; ragged last tiles count only
    in-range pairs."""
    nb, nh, sq, sk = mask.shape
    nbq, nbk = -(-sq // bq), -(-sk // bk)
    out = np.zeros((nb, nh, nbq, nbk), dtype=np.int8)
    for b, h, ti, tj in np.ndindex(out.shape):
        tile = mask[b, h, ti * bq:(ti + 1) * bq, tj * bk:(tj + 1) * bk]
        out[b, h, ti, tj] = EMPTY if not tile.any() else FULL if tile.all() else PARTIAL
    return out


@st.composite
def patterns(draw, with_dense=True):
    sq, sk = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kw = dict(causal=draw(st.booleans()), alignment=draw(st.sampled_from(["bottom_right", "top_left"])))
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 8)), draw(st.integers(-1, 8)))
    nb = nh = 1
    if with_dense and draw(st.booleans()):
        shape = draw(st.sampled_from([(sq, sk), (2, 1, sq, sk), (1, 3, sq, 1), (2, 3, 1, sk)]))
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        kw["dense"] = rng.random(shape) < draw(st.sampled_from([0.3, 0.8, 1.0]))
        if len(shape) == 4:
            nb, nh = shape[0], shape[1]
    return sq, sk, nb, nh, kw


@settings(max_examples=100)
@given(patterns())
def test_mask_equals_loop_definition(case):
    sq, sk, nb, nh, kw = case
    want = loop_mask(sq, sk, nb=nb, nh=nh, **kw)
    got = Pattern(**kw).mask(sq, sk)
    assert got.dtype == np.bool_ and got.ndim == 4 and got.shape[2:] == (sq, sk)
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
    rows = slice(sq // 3, sq - sq // 4)
    chunk = Pattern(**kw).mask(sq, sk, rows)
    np.testing.assert_array_equal(np.broadcast_to(chunk, want[:, :, rows].shape), want[:, :, rows])


@settings(max_examples=100)
@given(patterns(), st.data())
def test_block_layout_codes_are_exact(case, data):
    sq, sk, nb, nh, kw = case
    bq, bk = data.draw(st.integers(1, sq + 3)), data.draw(st.integers(1, sk + 3))
    pattern = Pattern(**kw)
    got = pattern.block_layout(bq, bk, sq=sq, sk=sk)
    want = expected_layout(loop_mask(sq, sk, nb=nb, nh=nh, **kw), bq, bk)
    assert got.ndim == 4 and got.shape[2:] == want.shape[2:]
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)


@settings(max_examples=100)
@given(patterns(), st.data())
def test_tile_plan_reconstructs_the_mask(case, data):
    sq, sk, nb, nh, kw = case
    bq, bk = data.draw(st.integers(1, sq + 3)), data.draw(st.integers(1, sk + 3))
    layout, index, masks = Pattern(**kw).tile_plan(bq, bk, sq=sq, sk=sk)
    want = loop_mask(sq, sk, nb=nb, nh=nh, **kw)
    lb, lh, nbq, nbk = layout.shape
    assert index.shape == layout.shape and masks.shape[1:] == (bq, bk)
    assert sorted(index[layout == PARTIAL].tolist()) == list(range(masks.shape[0]))
    assert np.all(index[layout != PARTIAL] == -1)
    rebuilt = np.zeros((lb, lh, nbq * bq, nbk * bk), dtype=bool)
    for b, h, ti, tj in np.ndindex(layout.shape):
        tile = {EMPTY: np.zeros((bq, bk), bool), FULL: np.ones((bq, bk), bool)}.get(
            int(layout[b, h, ti, tj]))
        if tile is None:
            tile = masks[index[b, h, ti, tj]]
            assert tile.any() and not tile[:sq - ti * bq, :sk - tj * bk].all()  # really partial
        rebuilt[b, h, ti * bq:(ti + 1) * bq, tj * bk:(tj + 1) * bk] = tile
    np.testing.assert_array_equal(np.broadcast_to(rebuilt[:, :, :sq, :sk], want.shape), want)
    # a partial tile is padded with False beyond sq/sk
    for b, h, ti, tj in zip(*np.nonzero(layout == PARTIAL)):
        tile = masks[index[b, h, ti, tj]]
        assert not tile[sq - ti * bq:].any() and not tile[:, sk - tj * bk:].any()


@pytest.mark.parametrize("sq,sk,kw,s,lo,hi", [
    (4, 6, dict(causal=True), 2, None, 0),
    (6, 4, dict(causal=True, alignment="top_left"), 0, None, 0),
    (5, 5, dict(window=(3, 0)), 0, -3, 0),
    (3, 7, dict(window=(-1, 2), causal=True), 4, None, 0),
    (3, 7, dict(window=(2, -1)), 4, -2, None),
    (3, 7, dict(window=(1, 2), alignment="top_left"), 0, -1, 2),
    (3, 7, {}, 4, None, None),
])
def test_band(sq, sk, kw, s, lo, hi):
    assert Pattern(**kw).band(sq, sk) == (s, lo, hi)


def test_causal_window_examples():
    """Hand-written masks for two small cases."""
    # bottom-right causal, Sq=2, Sk=4: row 0 sees keys 0..2, row 1 sees 0..3
    np.testing.assert_array_equal(Pattern(causal=True).mask(2, 4)[0, 0],
                                  [[1, 1, 1, 0], [1, 1, 1, 1]])
    # sliding window of 2 tokens including self, top-left, Sq=Sk=4
    np.testing.assert_array_equal(Pattern(window=(1, 0), alignment="top_left").mask(4, 4)[0, 0],
                                  [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    # Sq > Sk bottom-right causal: the first Sq - Sk rows are empty
    m = Pattern(causal=True).mask(5, 3)[0, 0]
    assert not m[:2].any() and m[2:].sum() == 6


def test_is_band_only():
    assert Pattern(causal=True, window=(2, 0)).is_band_only
    assert Pattern().is_band_only
    assert not Pattern(dense=np.ones((2, 2), bool)).is_band_only


def test_invalid_patterns():
    with pytest.raises(ParameterError, match="alignment"):
        Pattern(alignment="middle")
    with pytest.raises(ParameterError, match="window"):
        Pattern(window=(-2, 0))
    with pytest.raises(ParameterError, match="mask"):
        Pattern(dense=np.ones((2, 2)))
    with pytest.raises(ParameterError):
        Pattern(causal=True).block_layout(0, 4, sq=4, sk=4)

"""The Pattern algebra: every predicate against its definition written here as a loop, exact tile
codes against a reduction of the dense mask, the set algebra, slices, per-head/batch variation, and
the cost promise (structured patterns classify tiles without any per-element work)."""


import numpy as np
import pytest

from refattn.errors import ParameterError, ShapeError
from refattn.patterns import (EMPTY, FULL, PARTIAL, BlockSparse, Dilated, Global, Heads,
                              Intersection, LocalBlocks, Pattern, RandomKeys, Summary, Union,
                              blocks_from_table, random_keys)

RNG = np.random.default_rng(7)
SHAPES = [(13, 13), (7, 19), (19, 7)]
ALIGN = ["bottom_right", "top_left"]


def loop_mask(pred, sq, sk, b=1, h=1):
    return np.array([[[[bool(pred(bb, hh, i, j)) for j in range(sk)] for i in range(sq)]
                      for hh in range(h)] for bb in range(b)])


def offset(alignment, sq, sk):
    return sk - sq if alignment == "bottom_right" else 0


def tile_codes(mask, bq, bk):
    """Codes from the dense mask, by brute force."""
    bm, hm, sq, sk = mask.shape
    out = np.zeros((bm, hm, -(-sq // bq), -(-sk // bk)), dtype=np.int8)
    for idx in np.ndindex(out.shape):
        b, h, ti, tj = idx
        t = mask[b, h, ti * bq:(ti + 1) * bq, tj * bk:(tj + 1) * bk]
        out[idx] = FULL if t.all() else PARTIAL if t.any() else EMPTY
    return out


def check_pattern(pat, want, sq, sk):
    """mask, slices, block_layout, tile_plan and count all agree with ``want`` (B, H, Sq, Sk)."""
    m = pat.mask(sq, sk)
    np.testing.assert_array_equal(np.broadcast_to(m, want.shape), want)
    np.testing.assert_array_equal(np.broadcast_to(pat.mask(sq, sk, rows=slice(2, 5)),
                                                  want[:, :, 2:5].shape), want[:, :, 2:5])
    np.testing.assert_array_equal(np.broadcast_to(pat.mask(sq, sk, rows=slice(1, 6), cols=slice(3, None)),
                                                  want[:, :, 1:6, 3:].shape), want[:, :, 1:6, 3:])
    for bq, bk in ((1, 1), (3, 4), (4, 4), (5, 2), (64, 64)):
        lay = pat.block_layout(bq, bk, sq=sq, sk=sk)
        np.testing.assert_array_equal(np.broadcast_to(lay, tile_codes(want, bq, bk).shape),
                                      tile_codes(want, bq, bk), err_msg=f"{pat!r} tiles {bq}x{bk}")
        layout, index, masks = pat.tile_plan(bq, bk, sq=sq, sk=sk)
        assert (index[layout == PARTIAL] == np.arange(masks.shape[0])).all()
        for b, h, ti, tj in zip(*np.nonzero(layout == PARTIAL)):
            wb = want[min(b, want.shape[0] - 1), min(h, want.shape[1] - 1)]
            tile = wb[ti * bq:(ti + 1) * bq, tj * bk:(tj + 1) * bk]
            got = masks[index[b, h, ti, tj]]
            np.testing.assert_array_equal(got[:tile.shape[0], :tile.shape[1]], tile)
            assert not got[tile.shape[0]:].any() and not got[:, tile.shape[1]:].any()
    counts = np.broadcast_to(pat.count(sq, sk, block=4), want.shape[:2])
    np.testing.assert_array_equal(counts, want.sum(axis=(2, 3)))
    assert abs(pat.density(sq, sk) - want.mean()) < 1e-15


@pytest.mark.parametrize("sq, sk", SHAPES)
@pytest.mark.parametrize("al", ALIGN)
def test_band_and_dense(sq, sk, al):
    s = offset(al, sq, sk)
    check_pattern(Pattern(causal=True, alignment=al), loop_mask(lambda b, h, i, j: j <= i + s, sq, sk), sq, sk)
    check_pattern(Pattern(window=(3, 1), alignment=al),
                  loop_mask(lambda b, h, i, j: i + s - 3 <= j <= i + s + 1, sq, sk), sq, sk)
    dense = RNG.random((2, 3, sq, sk)) < 0.6
    check_pattern(Pattern(causal=True, dense=dense, alignment=al),
                  loop_mask(lambda b, h, i, j: j <= i + s and dense[b, h, i, j], sq, sk, 2, 3), sq, sk)


@pytest.mark.parametrize("sq, sk", SHAPES)
@pytest.mark.parametrize("al", ALIGN)
def test_predicates(sq, sk, al):
    s = offset(al, sq, sk)
    cases = [
        (Dilated(steps=(2, 3), dilation=3, alignment=al),
         lambda b, h, i, j: (j - i - s) % 3 == 0 and -6 <= j - i - s <= 9),
        (Dilated(steps=(-1, 0), dilation=4, causal=True, alignment=al),
         lambda b, h, i, j: (i + s - j) % 4 == 0 and j <= i + s),
        (LocalBlocks(block=4, alignment=al), lambda b, h, i, j: j // 4 == (i + s) // 4),
        (Summary(block=5, c=2), lambda b, h, i, j: j % 5 >= 3),
        (Global(tokens=[0, 4, 12], alignment=al),
         lambda b, h, i, j: (i + s) in (0, 4, 12) or j in (0, 4, 12)),
        (Global(tokens=[2, 5], rows=False, causal=True, alignment=al),
         lambda b, h, i, j: j in (2, 5) and j <= i + s),
    ]
    for pat, pred in cases:
        check_pattern(pat, loop_mask(pred, sq, sk), sq, sk)


def test_global_mask_per_batch():
    g = RNG.random((3, 11)) < 0.3
    check_pattern(Global(tokens=g), loop_mask(lambda b, h, i, j: g[b, i] or g[b, j], 11, 11, 3), 11, 11)


def test_block_sparse_and_random_keys():
    lay = RNG.random((2, 3, 4)) < 0.5  # (H, nbq, nbk), ragged last blocks for 11 x 14
    check_pattern(BlockSparse(layout=lay, block_q=4, block_k=4),
                  loop_mask(lambda b, h, i, j: lay[h, i // 4, j // 4], 11, 14, 1, 2), 11, 14)
    table = RNG.integers(0, 14, (2, 11, 3))
    table[0, 0] = [4, 4, 4]
    check_pattern(RandomKeys(table=table),
                  loop_mask(lambda b, h, i, j: j in set(table[h, i]), 11, 14, 1, 2), 11, 14)
    bt = RNG.integers(0, 3, (1, 2, 11, 2))  # block table with block 5 (ragged last: 14 = 5+5+4)
    check_pattern(RandomKeys(table=bt, block=5),
                  loop_mask(lambda b, h, i, j: j // 5 in set(bt[0, h, i]), 11, 14, 1, 2), 11, 14)


def test_algebra_is_a_set_algebra():
    sq = sk = 12
    a = Pattern(window=(2, 0))
    b = Global(tokens=[3, 7])
    c = Summary(block=4, c=1)
    ma, mb, mc = (p.mask(sq, sk) for p in (a, b, c))
    check_pattern(a | b, ma | mb, sq, sk)
    check_pattern(a & c, ma & mc, sq, sk)
    check_pattern((a | b) & Pattern(causal=True), (ma | mb) & np.tril(np.ones((sq, sk), bool)), sq, sk)
    check_pattern(a | b | c, ma | mb | mc, sq, sk)
    assert len((a | b | c).parts) == 3  # flattened, each part once
    assert isinstance(a & c, Intersection) and isinstance(a | b, Union)
    # a pair admitted by two parts is still a single True (no counts in a set)
    assert (a | a).mask(sq, sk).dtype == np.bool_
    with pytest.raises(ParameterError, match="expected a Pattern"):
        a | np.ones((3, 3), bool)


def test_per_head_variation():
    parts = (Pattern(causal=True), Dilated(steps=(-1, 0), dilation=3, causal=True), Pattern(window=(1, 1)))
    pat = Heads(parts=parts)
    want = np.concatenate([p.mask(10, 10) for p in parts], axis=1)
    assert pat.mask(10, 10).shape == (1, 3, 10, 10)
    check_pattern(pat, want, 10, 10)
    with pytest.raises(ShapeError, match="without head variation"):
        Heads(parts=(pat,)).mask(10, 10)


def test_is_band_only_and_repr():
    assert Pattern(causal=True, window=(4, 0)).is_band_only
    assert not Pattern(dense=np.ones((2, 2), bool)).is_band_only
    for p in (Dilated(), Global(tokens=[1]), Pattern() | Pattern(causal=True), Summary(block=2)):
        assert not p.is_band_only
    r = repr(Pattern(window=(4, 0)) | Global(tokens=[0, 9]))
    assert "window=(4, 0)" in r and "tokens=[0, 9]" in r and "|" in r
    assert repr(BlockSparse(layout=np.ones((2, 2), bool), block_q=8, block_k=8)) == \
        "BlockSparse(layout(1, 1, 2, 2), block=(8, 8))"


def test_errors():
    with pytest.raises(ParameterError, match="dilation: expected an integer >= 1, got 0"):
        Dilated(dilation=0)
    with pytest.raises(ShapeError, match=r"layout: expected 3 x 2 blocks for Sq=9, Sk=8 with blocks of 4 x 4, got 2 x 2"):
        BlockSparse(layout=np.ones((2, 2), bool), block_q=4, block_k=4).mask(9, 8)
    with pytest.raises(ParameterError, match="layout: expected a boolean"):
        BlockSparse(layout=np.ones((2, 2)), block_q=4, block_k=4)
    with pytest.raises(ShapeError, match="table: expected 5 rows of indices < 6"):
        RandomKeys(table=np.full((5, 2), 6)).mask(5, 6)
    with pytest.raises(ParameterError, match="tokens: expected non-negative integer"):
        Global(tokens=[-1])
    with pytest.raises(ShapeError, match="global_mask: expected length 8"):
        Global(tokens=np.ones(5, bool)).mask(8, 8)
    with pytest.raises(ParameterError, match="c: expected at most block=2"):
        Summary(block=2, c=3)


def test_seeded_tables():
    t = random_keys(3, 6, 10, 4, heads=2)
    assert t.shape == (2, 6, 4)
    assert all(len(set(row)) == 4 for row in t.reshape(-1, 4))
    np.testing.assert_array_equal(t, random_keys(3, 6, 10, 4, heads=2))
    lay = blocks_from_table(np.array([[[0, 2], [1, 1]]]), 3)
    np.testing.assert_array_equal(lay, [[[True, False, True], [False, True, False]]])


def test_block_structured_patterns_cost_o_tiles(monkeypatch):
    """BigBird-sized block layouts at N = 16384 are classified from prefix sums: no call to
    ``keep`` (per-element work) and well under a second, for aligned and unaligned tiles."""
    n, b = 16384, 64
    nb = n // b
    lay = np.abs(np.arange(nb)[:, None] - np.arange(nb)[None, :]) <= 1
    lay[:, [0, -1]] = lay[[0, -1], :] = True
    lay = np.stack([lay | (RNG.random((nb, nb)) < 0.01) for _ in range(4)])
    pat = BlockSparse(layout=lay, block_q=b, block_k=b)

    def no_elements(*a, **k):
        raise AssertionError("per-element work on a block-structured pattern")
    monkeypatch.setattr(BlockSparse, "keep", no_elements)
    layout, index, masks = pat.tile_plan(b, b, sq=n, sk=n)   # aligned: FULL/EMPTY only
    assert masks.shape[0] == 0 and (layout != PARTIAL).all()
    for tile in (96, 128, 256):  # unaligned tiles: exact codes, still no element work
        layout = pat.block_layout(tile, tile, sq=n, sk=n)
        assert (layout == PARTIAL).any()
    monkeypatch.undo()
    small = BlockSparse(layout=lay[:, :8, :8], block_q=b, block_k=b)  # codes are exact: check one
    np.testing.assert_array_equal(small.block_layout(96, 96, sq=512, sk=512),
                                  tile_codes(small.mask(512, 512), 96, 96))
    assert pat.density(n, n) == pytest.approx(lay.mean(), abs=1e-12)
    band = Pattern(causal=True, window=(1023, 0))
    elements = []
    real_keep = Pattern.keep

    def counting(self, i, j, sq, sk):
        elements.append(np.size(i) * np.size(j))
        return real_keep(self, i, j, sq, sk)
    monkeypatch.setattr(Pattern, "keep", counting)
    layout, index, masks = band.tile_plan(128, 128, sq=n, sk=n)
    assert masks.shape[0] == (n // 128) + (n // 128 - 8)  # diagonal + lower edge
    assert sum(elements) <= masks.shape[0] * 128 * 128  # element work on the PARTIAL tiles only


# -- compositions: any tree of predicates keeps mask, codes, plan and count consistent -------------
from hypothesis import given, settings, strategies as st  # noqa: E402


def leaves(draw, sq, sk):
    al = draw(st.sampled_from(ALIGN))
    kind = draw(st.sampled_from(["band", "dilated", "local", "summary", "global", "blocks", "keys",
                                 "dense"]))
    if kind == "band":
        return Pattern(causal=draw(st.booleans()), window=(draw(st.integers(-1, 5)), draw(st.integers(-1, 5))),
                       alignment=al)
    if kind == "dilated":
        return Dilated(steps=(draw(st.integers(-1, 3)), draw(st.integers(-1, 3))),
                       dilation=draw(st.integers(1, 4)), causal=draw(st.booleans()), alignment=al)
    if kind == "local":
        return LocalBlocks(block=draw(st.integers(1, 6)), alignment=al)
    if kind == "summary":
        b = draw(st.integers(1, 6))
        return Summary(block=b, c=draw(st.integers(0, b)))
    if kind == "global":
        return Global(tokens=draw(st.lists(st.integers(0, sk - 1), max_size=3)),
                      rows=draw(st.booleans()), cols=draw(st.booleans()), alignment=al)
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    if kind == "blocks":
        bq, bk = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        return BlockSparse(layout=rng.random((2, -(-sq // bq), -(-sk // bk))) < 0.5, block_q=bq, block_k=bk)
    if kind == "keys":
        blk = draw(st.integers(1, 4))
        return RandomKeys(table=rng.integers(0, -(-sk // blk), (2, sq, 2)), block=blk)
    return Pattern(dense=rng.random((1, 2, sq, sk)) < 0.5, causal=draw(st.booleans()), alignment=al)


@st.composite
def trees(draw):
    sq, sk = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    a, b, c = (leaves(draw, sq, sk) for _ in range(3))
    ma, mb, mc = (np.broadcast_to(p.mask(sq, sk), (1, 2, sq, sk)) for p in (a, b, c))
    op = draw(st.sampled_from(["a", "a|b", "a&b", "(a|b)&c", "(a&b)|c", "a|b|c"]))
    pat = {"a": lambda: a, "a|b": lambda: a | b, "a&b": lambda: a & b, "(a|b)&c": lambda: (a | b) & c,
           "(a&b)|c": lambda: (a & b) | c, "a|b|c": lambda: a | b | c}[op]()
    want = {"a": ma, "a|b": ma | mb, "a&b": ma & mb, "(a|b)&c": (ma | mb) & mc, "(a&b)|c": (ma & mb) | mc,
            "a|b|c": ma | mb | mc}[op]
    return pat, want, sq, sk, draw(st.integers(1, 6)), draw(st.integers(1, 6))


@settings(max_examples=300, deadline=None)
@given(trees())
def test_compositions_exact_codes(case):
    pat, want, sq, sk, bq, bk = case
    m = pat.mask(sq, sk)
    np.testing.assert_array_equal(np.broadcast_to(m, want.shape), want)
    lay = pat.block_layout(bq, bk, sq=sq, sk=sk)
    np.testing.assert_array_equal(np.broadcast_to(lay, (1, 2) + lay.shape[2:]), tile_codes(want, bq, bk))
    layout, index, masks = pat.tile_plan(bq, bk, sq=sq, sk=sk)
    np.testing.assert_array_equal(layout, lay)
    np.testing.assert_array_equal(np.broadcast_to(pat.count(sq, sk, block=bq), (1, 2)),
                                  want.sum(axis=(2, 3)))

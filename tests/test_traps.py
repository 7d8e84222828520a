"""The traps where hand-written sparse references go wrong (issue 5, item 5). Each test pins one;
each was checked to fail when its trap is reintroduced (the mutation is named in each docstring).

Expected values are computed here from the definitions with explicit loops or closed forms.
"""

import math

import numpy as np
import pytest

import refattn
from refattn.patterns import Pattern
from refattn.variants.sparse.bigbird import multiplicity, refattn_rand_attn, window_and_global
from reference import reference_attention


def qkv(b=1, h=2, s=16, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, h, s, d)) for _ in range(3))


def once_and_twice(q, k, v, visible, twice):
    """Reference outputs with each visible pair once, and with the pairs in ``twice`` counted twice."""
    once, _ = reference_attention(q, k, v, mask=visible)
    bias = np.where(twice, math.log(2.0), 0.0)  # exp(s + log 2) = 2 exp(s): a second copy
    doubled, _ = reference_attention(q, k, v, mask=visible, bias=bias)
    return once, doubled


def test_global_key_inside_window_counted_once():
    """Mutation tried: hybrid/longformer as the merge (``merge_states``) of a window pass and a
    global-column pass -- the global key inside the window is then counted twice."""
    q, k, v = qkv()
    s = 16
    g = 6
    visible = np.array([[abs(i - j) <= 2 or j == g or i == g for j in range(s)] for i in range(s)])
    twice = np.array([[abs(i - j) <= 2 and j == g and i != g for j in range(s)] for i in range(s)])
    once, doubled = once_and_twice(q, k, v, visible, twice)
    assert np.abs(once - doubled).max() > 1e-3  # the trap is live in this case
    for variant, params in (("hybrid", dict(local=2, tokens=(g,))),
                            ("longformer", dict(attention_window=4, global_tokens=(g,)))):
        out = refattn.attention(q, k, v, variant=variant, **params)
        np.testing.assert_allclose(out, once, rtol=0, atol=1e-12, err_msg=variant)


def test_bigbird_seen_random_block_counted_once_by_default():
    """Mutation tried: ``bigbird_layers`` building the multiplicity levels for ``duplicates="once"``
    too (a random block equal to a window block counted twice)."""
    bs, L = 4, 32
    q, k, v = qkv(s=L, seed=1)
    table = np.array([[[2], [3], [4], [5], [6], [7]]] * 2)  # row q names block q+1: its window block
    visible = np.array([[window_and_global(8)[i // bs, j // bs] for j in range(L)] for i in range(L)])
    twice = np.array([[0 < i // bs < 7 and j // bs == i // bs + 1 for j in range(L)] for i in range(L)])
    once, doubled = once_and_twice(q, k, v, visible, twice)
    assert np.abs(once - doubled).max() > 1e-3
    out = refattn.attention(q, k, v, variant="bigbird", block_size=bs, num_random_blocks=1,
                            rand_attn=table)
    np.testing.assert_allclose(out, once, rtol=0, atol=1e-12)
    hf = refattn.attention(q, k, v, variant="bigbird", block_size=bs, num_random_blocks=1,
                           rand_attn=table, duplicates="hf")
    np.testing.assert_allclose(hf, doubled, rtol=0, atol=1e-12)


def test_global_rows_attend_to_all_keys():
    """Mutation tried: ``Global(..., rows=False)`` in hybrid -- global rows see only their window and
    the global columns. Here a global row's output must equal full attention's row."""
    q, k, v = qkv(seed=2)
    full = refattn.attention(q, k, v)
    for variant, params in (("hybrid", dict(local=1, tokens=(9,))),
                            ("longformer", dict(attention_window=2, global_tokens=(9,))),
                            ("global", dict(tokens=(9,)))):
        out = refattn.attention(q, k, v, variant=variant, **params)
        np.testing.assert_allclose(out[:, :, 9], full[:, :, 9], rtol=0, atol=1e-13, err_msg=variant)
        assert np.abs(out[:, :, 3] - full[:, :, 3]).max() > 1e-3  # non-global rows are sparse
    bs, L = 4, 32  # BigBird: the first and last blocks are global rows
    q, k, v = qkv(s=L, seed=3)
    full = refattn.attention(q, k, v)
    out = refattn.attention(q, k, v, variant="bigbird", block_size=bs, num_random_blocks=1)
    np.testing.assert_allclose(out[:, :, :bs], full[:, :, :bs], rtol=0, atol=1e-13)
    np.testing.assert_allclose(out[:, :, -bs:], full[:, :, -bs:], rtol=0, atol=1e-13)


def test_exact_zero_scores_are_kept():
    """Mutation tried: the backend's mask test written as ``visible & (s != 0)`` ("nonzero" sparse
    bookkeeping). A zero query row has every score exactly 0: its weights are exp(0 - 0) each, so the
    output is the plain mean of the visible values and the LSE is log(#visible)."""
    q, k, v = qkv(seed=4)
    q[:, :, 5] = 0.0
    q[:, :, 0] = 0.0
    k[:, :, 7] = 0.0  # and a zero key: score exactly 0 among non-zero ones for every other row
    for variant, params, vis5 in (
            ("sliding_window", dict(window=(2, 2)), [3, 4, 5, 6, 7]),
            ("strided", dict(stride=3), [2, 3, 4, 5]),
            ("hybrid", dict(local=1, tokens=(12,)), [4, 5, 6, 12])):
        out, lse = refattn.attention(q, k, v, variant=variant, return_lse=True, **params)
        np.testing.assert_allclose(out[:, :, 5], v[:, :, vis5].mean(axis=2), rtol=0, atol=1e-14)
        np.testing.assert_allclose(lse[:, :, 5], math.log(len(vis5)), rtol=0, atol=1e-14)
    # row 6 of the window (2, 2) sees keys 4..8 incl. key 7 whose score is exactly 0
    out = refattn.attention(q, k, v, variant="sliding_window", window=(2, 2))
    x = np.einsum("bhd,bhjd->bhj", q[:, :, 6], k[:, :, 4:9]) / 2.0
    w = np.exp(x - x.max(-1, keepdims=True))
    want = np.einsum("bhj,bhjd->bhd", w / w.sum(-1, keepdims=True), v[:, :, 4:9])
    np.testing.assert_allclose(out[:, :, 6], want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("sq, sk", [(6, 6), (4, 11), (9, 5)])
def test_window_bounds_at_both_ends(alignment, sq, sk):
    """Mutation tried: ``rel > lo`` instead of ``rel >= lo`` in the band (and ``rel < hi``): the
    keys exactly ``left`` before and ``right`` after ``i + s`` must be visible, one further must not."""
    left, right = 2, 1
    s = sk - sq if alignment == "bottom_right" else 0
    pat = Pattern(window=(left, right), alignment=alignment)
    m = pat.mask(sq, sk)[0, 0]
    for i in range(sq):
        for j in range(sk):
            assert m[i, j] == (i + s - left <= j <= i + s + right), (i, j)
    for i in (0, sq - 1):  # the first and last rows, both edges, in the attention itself
        lo, hi = i + s - left, i + s + right
        for j, want in ((lo - 1, False), (lo, True), (hi, True), (hi + 1, False)):
            if 0 <= j < sk:
                v = np.zeros((1, 1, sk, 1))
                v[0, 0, j] = 1.0
                q = np.zeros((1, 1, sq, 1))
                out = refattn.attention(q, np.zeros((1, 1, sk, 1)), v, variant="sliding_window",
                                        window=(left, right), alignment=alignment)
                assert (out[0, 0, i, 0] > 0) == want, (i, j)
    # causal windows: Dilated with dilation 1 must agree with the band
    from refattn.patterns import Dilated
    d = Dilated(steps=(left, right), dilation=1, alignment=alignment)
    np.testing.assert_array_equal(d.mask(sq, sk)[0, 0], m)


def test_our_bigbird_generator_never_repeats_and_hf_duplicates_count_twice():
    """Mutations tried: drawing from every block (``allowed = arange(nb)``), and building the
    multiplicity with ``mult[...] = 1`` instead of adding (a repeated block then counts once)."""
    for nb, r, seed in ((8, 1, 0), (12, 3, 5), (20, 2, 9)):
        t = refattn_rand_attn(nb, r, heads=4, seed=seed)
        assert multiplicity(t, nb).max() == 1
    nb = 8
    t = np.array([[[0], [2], [3], [4], [5], [7]]])  # every row names a seen block
    m = multiplicity(t, nb)
    assert m[0, 1, 0] == 2 and m[0, 2, 2] == 2 and m[0, 6, 7] == 2 and m[0, 3, 0] == 1
    # with duplicates="hf" the LSE of block row 2 is log(sum_set e^s + sum_{block 2} e^s)
    q, k, v = qkv(h=1, s=32, seed=6)
    _, lse = refattn.attention(q, k, v, variant="bigbird", block_size=4, num_random_blocks=1,
                               rand_attn=t, duplicates="hf", return_lse=True)
    i = 9
    x = q[0, 0, i] @ k[0, 0].T / 2.0
    vis = [j for j in range(32) if j // 4 in (0, 1, 2, 3, 7)]
    want = np.logaddexp(np.logaddexp.reduce(x[vis]), np.logaddexp.reduce(x[8:12]))
    assert abs(lse[0, 0, i] - want) < 1e-12

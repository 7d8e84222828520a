"""Dropout: the hand-written Philox4x64-10 and the keep-mask rule, pinned to ``numpy.random.Philox``.

DESIGN section 3: key ``(seed, b*Hq + h)``; pair ``(i, j)`` reads word ``n % 4`` (``n = i*Sk + j``)
of the block for counter ``(n // 4, 0, 0, 0)``; ``u = (w >> 11) * 2**-53``; keep iff ``u >= p``;
kept probabilities are scaled by ``1/(1-p)`` and the LSE is unaffected. numpy increments its counter
before generating, so ``Philox(key, counter=(c - 1) % 2**256).random_raw(4)`` is the block for ``c``.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn import dropout as philox
from refattn.backends.numpy_ import NumpyBackend
from reference import philox_keep_mask, reference_attention

COUNTERS = [0, 1, 2, 3, 4, 5, 255, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1, 2 ** 33 + 12345,
            2 ** 48 + 7, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 2, 2 ** 64 - 1]
SEEDS = [0, 1, 42, 2 ** 32 + 3, 2 ** 63 + 11, 2 ** 64 - 1]
STREAMS = [0, 1, 7, 2 ** 40, 2 ** 64 - 1]


def numpy_block(seed, stream, c):
    # the key as a uint64 array: a Python list with a word >= 2**63 goes through float64 in numpy
    key = np.array([seed, stream], dtype=np.uint64)
    return np.random.Philox(key=key, counter=(c - 1) % 2 ** 256).random_raw(4)


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_block_equals_numpy(seed):
    for stream in STREAMS:
        words = philox.philox4x64(np.array(COUNTERS, dtype=np.uint64), seed, stream)
        got = np.stack(words, axis=-1)
        want = np.stack([numpy_block(seed, stream, c) for c in COUNTERS])
        np.testing.assert_array_equal(got, want)


def test_philox_many_random_counters_equal_numpy():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2 ** 64, size=200, dtype=np.uint64)
    seeds = rng.integers(0, 2 ** 64, size=200, dtype=np.uint64)
    streams = rng.integers(0, 2 ** 20, size=200, dtype=np.uint64)
    got = np.stack(philox.philox4x64(counters, seeds, streams), axis=-1)
    want = np.stack([numpy_block(int(s), int(t), int(c)) for s, t, c in zip(seeds, streams, counters)])
    np.testing.assert_array_equal(got, want)


def test_numpy_counter_convention():
    """The block for counter ``c`` is what numpy yields first after ``counter=c - 1`` (so a fresh
    ``Philox(key)`` -- counter 0 -- starts with the block for counter 1)."""
    first = np.random.Philox(key=[5, 6]).random_raw(8)
    np.testing.assert_array_equal(first[:4], np.stack(philox.philox4x64(np.uint64(1), 5, 6)))
    np.testing.assert_array_equal(first[4:], np.stack(philox.philox4x64(np.uint64(2), 5, 6)))


def test_mulhilo64_against_python_integers():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2 ** 64, size=500, dtype=np.uint64)
    b = rng.integers(0, 2 ** 64, size=500, dtype=np.uint64)
    a[:3] = [0, 2 ** 64 - 1, 2 ** 64 - 1]
    b[:3] = [2 ** 64 - 1, 2 ** 64 - 1, 1]
    with np.errstate(over="ignore"):
        hi, lo = philox.mulhilo64(a, b)
    products = [int(x) * int(y) for x, y in zip(a, b)]
    assert [int(h) for h in hi] == [p >> 64 for p in products]
    assert [int(x) for x in lo] == [p & (2 ** 64 - 1) for p in products]


@pytest.mark.parametrize("seed,p", [(0, 0.5), (2 ** 64 - 1, 0.1), (123456789012345, 0.9)])
def test_keep_mask_element_by_element(seed, p):
    b, h, sq, sk = 2, 3, 5, 7  # Sk = 7: blocks of 4 words straddle rows
    got = philox.keep_mask(seed, p, b, h, sq, sk)
    assert got.shape == (b, h, sq, sk) and got.dtype == np.bool_
    np.testing.assert_array_equal(got, philox_keep_mask(seed, p, b, h, sq, sk))
    # a chunk of rows is the same slice of the full mask
    np.testing.assert_array_equal(philox.keep_mask(seed, p, b, h, sq, sk, slice(2, 4)), got[:, :, 2:4])


def test_uniforms_are_the_top_53_bits():
    n = np.arange(40, dtype=np.uint64)
    u = philox.uniforms(99, np.uint64(3), n)
    for idx in range(40):
        w = int(numpy_block(99, 3, idx // 4)[idx % 4])
        assert u[idx] == (w >> 11) * 2.0 ** -53
    assert np.all((u >= 0) & (u < 1))


def test_keep_fraction_is_close_to_one_minus_p():
    p = 0.3
    keep = philox.keep_mask(2024, p, 2, 4, 128, 128)
    n = keep.size
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(keep.mean() - (1 - p)) < 5 * sigma
    # and per head (stream) as well, each with its own stream
    per_head = keep.mean(axis=(2, 3))
    assert np.all(np.abs(per_head - (1 - p)) < 5 * np.sqrt(p * (1 - p) / (128 * 128)))
    assert not np.array_equal(keep[0, 0], keep[0, 1]) and not np.array_equal(keep[0, 0], keep[1, 0])


@pytest.mark.parametrize("variant", ["sdpa", "flash"])
@pytest.mark.parametrize("kw", [{}, dict(causal=True, sinks=[0.3, -0.2, 1.0, 0.0]),
                                dict(window=(2, 1), alignment="top_left", softcap=2.0)])
def test_output_with_seed_equals_reference_with_explicit_mask(variant, kw):
    b, hq, sq, sk, d, hkv = 2, 4, 5, 6, 3, 2
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s) for s in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d)))
    p, seed = 0.35, 2 ** 40 + 17
    extra = dict(block_q=2, block_k=4) if variant == "flash" else {}
    out, lse = refattn.attention(q, k, v, variant=variant, dropout_p=p, dropout_seed=seed,
                                 return_lse=True, **kw, **extra)
    keep = philox_keep_mask(seed, p, b, hq, sq, sk)  # streams count query heads: b*Hq + h
    ref_out, ref_lse = reference_attention(q, k, v, keep=keep, dropout_p=p, **kw)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    # the same as passing that mask explicitly
    np.testing.assert_allclose(
        refattn.attention(q, k, v, variant=variant, dropout_p=p, dropout_mask=keep, **kw, **extra),
        ref_out, rtol=1e-12, atol=1e-12)
    # scaled by 1/(1-p): without the scale the reference differs
    assert not np.allclose(out, reference_attention(q, k, v, keep=keep, dropout_p=0.0, **kw)[0])
    # the LSE is unaffected by dropout
    _, lse_plain = refattn.attention(q, k, v, return_lse=True, **kw)
    np.testing.assert_allclose(lse, lse_plain, rtol=1e-14, atol=0)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_dropout_does_not_depend_on_chunking():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 9, 4)) for _ in range(3))
    from refattn.patterns import Pattern
    from refattn.backends.base import Dropout
    kw = dict(pattern=Pattern(causal=True), scale=0.5, head_map=np.arange(2),
              dropout=Dropout(p=0.4, seed=77))
    whole = NumpyBackend().attend(q, k, v, **kw)
    chunked = NumpyBackend(chunk_elements=1).attend(q, k, v, **kw)  # one row per chunk
    for a, b in zip(whole, chunked):  # equal up to the rounding of a different matmul blocking
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)

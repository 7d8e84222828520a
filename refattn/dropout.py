"""Counter-based dropout masks: Philox4x64-10, identical on every backend (DESIGN section 3).

The keep-mask of one attention call is a pure function of ``(seed, b, h, i, j)``:

* key ``(seed, b * Hq + h)`` (two 64-bit words);
* the pair ``(i, j)`` has flat index ``n = i * Sk + j``; it reads word ``n % 4`` of the Philox
  block for the 256-bit counter ``(n // 4, 0, 0, 0)``;
* ``u = (word >> 11) * 2**-53`` is uniform on ``[0, 1)``; the pair is **kept iff** ``u >= p``, and
  kept probabilities are scaled by ``1 / (1 - p)``.

The generator is written out here with numpy ``uint64`` arithmetic so it can be read and
re-implemented (numba and CUDA do the same steps). It equals ``numpy.random.Philox``:
``Philox(key=np.array([seed, b*Hq + h], dtype=np.uint64), counter=(c - 1) % 2**256).random_raw(4)``
is the block for counter ``c`` (numpy increments its counter before generating; pass the key as a
uint64 array: numpy converts a list holding a word >= 2**63 through float64);
``tests/test_dropout.py`` pins this.
"""

from __future__ import annotations

import numpy as np

PHILOX_M0 = np.uint64(0xD2E7470EE14C6C93)
PHILOX_M1 = np.uint64(0xCA5A826395121157)
PHILOX_W0 = np.uint64(0x9E3779B97F4A7C15)
PHILOX_W1 = np.uint64(0xBB67AE8584CAA73B)
PHILOX_ROUNDS = 10

_LO32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def mulhilo64(a: np.ndarray, b) -> tuple[np.ndarray, np.ndarray]:
    """High and low 64-bit halves of the 128-bit product ``a * b`` (uint64, elementwise)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    a0, a1 = a & _LO32, a >> _32
    b0, b1 = b & _LO32, b >> _32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> _32) + (p01 & _LO32) + (p10 & _LO32)
    hi = p11 + (p01 >> _32) + (p10 >> _32) + (mid >> _32)
    return hi, a * b  # uint64 multiplication wraps: the low half


def philox4x64(counter0: np.ndarray, key0, key1) -> tuple[np.ndarray, ...]:
    """Philox4x64-10 blocks for counters ``(counter0, 0, 0, 0)``; returns the four output words.

    ``counter0``, ``key0`` and ``key1`` broadcast against each other (uint64).
    """
    with np.errstate(over="ignore"):
        c0 = np.asarray(counter0, dtype=np.uint64)
        k0 = np.asarray(key0, dtype=np.uint64)
        k1 = np.asarray(key1, dtype=np.uint64)
        shape = np.broadcast_shapes(c0.shape, k0.shape, k1.shape)
        c0, k0, k1 = (np.broadcast_to(x, shape).copy() for x in (c0, k0, k1))
        c1 = np.zeros(shape, np.uint64)
        c2 = np.zeros(shape, np.uint64)
        c3 = np.zeros(shape, np.uint64)
        for r in range(PHILOX_ROUNDS):
            if r:
                k0 = k0 + PHILOX_W0
                k1 = k1 + PHILOX_W1
            hi0, lo0 = mulhilo64(PHILOX_M0, c0)
            hi1, lo1 = mulhilo64(PHILOX_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        return c0, c1, c2, c3


def uniforms(seed: int, stream: np.ndarray, flat_index: np.ndarray) -> np.ndarray:
    """``u`` on ``[0, 1)`` for pairs with flat index ``n = i * Sk + j`` in stream ``b * Hq + h``.

    ``stream`` and ``flat_index`` broadcast; the result has their broadcast shape.
    """
    n = np.asarray(flat_index, dtype=np.uint64)
    words = philox4x64(n >> np.uint64(2), np.uint64(seed), stream)
    w = np.choose((n & np.uint64(3)).astype(np.intp), words)
    return (w >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def keep_mask(seed: int, p: float, batch: int, heads: int, sq: int, sk: int,
              rows: slice = slice(None), *, row0: int = 0, col0: int = 0,
              stride=None) -> np.ndarray:
    """Boolean keep-mask of shape ``(batch, heads, r, sk)`` for query rows ``rows``.

    Pair ``(i, j)`` reads the counter ``(row0 + i) * stride + col0 + j`` (``stride`` None: ``sk``):
    a sub-rectangle of a larger problem passes its global origin and the whole problem's ``Sk``."""
    i = np.arange(sq, dtype=np.uint64)[rows] + np.uint64(row0)
    j = np.arange(sk, dtype=np.uint64) + np.uint64(col0)
    stream = np.arange(batch * heads, dtype=np.uint64).reshape(batch, heads, 1, 1)
    flat = (i[:, None] * np.uint64(sk if stride is None else stride) + j[None, :])[None, None]
    return uniforms(seed, stream, flat) >= p

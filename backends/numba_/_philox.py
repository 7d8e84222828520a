"""Philox4x64-10 in numba, step for step as :mod:`refattn.dropout` (DESIGN section 3).

The pair ``(i, j)`` of stream ``b * Hq + h`` has flat index ``n = i * Sk + j`` and reads word
``n % 4`` of the block for counter ``(n // 4, 0, 0, 0)`` under key ``(seed, stream)``;
``u = (word >> 11) * 2**-53`` and the pair is kept iff ``u >= p``. Every constant is a ``uint64``
so numba never promotes to float; uint64 products wrap as in numpy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from refattn.dropout import PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1

_LO32 = np.uint64(0xFFFFFFFF)
_U0 = np.uint64(0)
_U2 = np.uint64(2)
_U3 = np.uint64(3)
_U11 = np.uint64(11)
_U32 = np.uint64(32)
_TWO_M53 = 2.0 ** -53


@njit(cache=True)
def mulhilo64(a, b):
    """High and low 64-bit halves of the 128-bit product ``a * b``."""
    a0, a1 = a & _LO32, a >> _U32
    b0, b1 = b & _LO32, b >> _U32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> _U32) + (p01 & _LO32) + (p10 & _LO32)
    hi = p11 + (p01 >> _U32) + (p10 >> _U32) + (mid >> _U32)
    return hi, a * b


@njit(cache=True)
def philox_block(counter0, key0, key1):
    """The four words of the Philox4x64-10 block for counter ``(counter0, 0, 0, 0)``."""
    c0, c1, c2, c3 = counter0, _U0, _U0, _U0
    k0, k1 = key0, key1
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0, lo0 = mulhilo64(PHILOX_M0, c0)
        hi1, lo1 = mulhilo64(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@njit(cache=True)
def word_to_uniform(w):
    return np.float64(w >> _U11) * _TWO_M53


@njit(cache=True)
def keep_row(seed, stream, n0, p, keep):
    """``keep[jj] = u(seed, stream, n0 + jj) >= p`` for one tile row (consecutive flat indices)."""
    c = keep.shape[0]
    n = np.uint64(n0)
    block = philox_block(n >> _U2, seed, stream)
    for jj in range(c):
        if jj > 0 and (n & _U3) == _U0:
            block = philox_block(n >> _U2, seed, stream)
        keep[jj] = word_to_uniform(block[np.int64(n & _U3)]) >= p
        n = n + np.uint64(1)


@njit(cache=True)
def uniforms(seed, stream, flat_index):
    """``u`` for 1-d arrays ``stream`` and ``flat_index`` (uint64, same length): the test hook that
    pins this generator to :func:`refattn.dropout.uniforms` bit for bit."""
    out = np.empty(flat_index.shape[0])
    for t in range(flat_index.shape[0]):
        n = flat_index[t]
        block = philox_block(n >> _U2, seed, stream[t])
        out[t] = word_to_uniform(block[np.int64(n & _U3)])
    return out

"""A branch-free ``exp`` that LLVM vectorises (numba has no vector libm here without SVML).

``exp(x) = 2**n * exp(r)`` with ``n = round(x / ln 2)`` and ``r = x - n ln 2`` (Cody-Waite, two-part
``ln 2``), ``|r| <= ln(2)/2``; ``exp(r)`` by its Taylor polynomial to degree 13 (truncation error
below 4e-18 relative), evaluated by Estrin's scheme. ``2**n`` is built from the exponent bits in two
halves so subnormal results are right. ``n`` is rounded by adding ``1.5 * 2**52`` (the sum's low
mantissa bits are then ``n`` as an integer, read by a bitcast): AVX2 has no vector float-to-int64
conversion, and ``int(floor(...))`` made LLVM convert lane by lane (this change alone made the
vectorised exponential 1.7x faster). Accuracy: at most 2 ulp from ``numpy.exp`` (measured in
``tests/test_numba.py``), far inside the backend's 1e-12 contract. ``x = -inf`` (a hidden pair)
gives exactly 0; arguments above 710 are clamped to 710, which gives ``inf`` as ``exp`` does
(arguments here are ``<= 0``: scores minus a running max or an LSE, so only a bug elsewhere gets
there, and then it shows as ``inf``, never as a wrapped exponent).
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm: low bits zero, so n * LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_C = tuple(1.0 / math.factorial(k) for k in range(14))
_FLOOR_X = -746.0  # exp(-746) rounds to 0
_CEIL_X = 710.0  # exp(710) overflows to inf (2**1024 and beyond)


@intrinsic
def _int64_bits_as_float64(typingctx, x):
    if x != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def _float64_bits_as_int64(typingctx, x):
    if x != types.float64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


#: 1.5 * 2**52: ``x + _SHIFTER`` rounds ``x`` to an integer held in the low mantissa bits
_SHIFTER = 6755399441055744.0
_SHIFTER_BITS = 0x4338000000000000  # its bit pattern


@njit(cache=True, fastmath={"contract"})
def fexp(x):
    x = min(max(x, _FLOOR_X), _CEIL_X)
    t = x * _LOG2E + _SHIFTER  # round(x / ln 2) + 1.5 * 2**52, exactly (|x / ln 2| < 2**11)
    ni = _float64_bits_as_int64(t) - _SHIFTER_BITS
    n = t - _SHIFTER
    r = (x - n * _LN2_HI) - n * _LN2_LO
    # exp(r) = sum_k r^k / k!, k <= 13, by Estrin's scheme: pairs, then quads, then eights. Its
    # dependency chain is 5 operations deep where Horner's is 13: the loops over a row were bound
    # by that latency (1.4x faster measured; at most 2 ulp from numpy.exp where Horner had 1)
    r2 = r * r
    r4 = r2 * r2
    b0 = (_C[0] + _C[1] * r) + (_C[2] + _C[3] * r) * r2
    b1 = (_C[4] + _C[5] * r) + (_C[6] + _C[7] * r) * r2
    b2 = (_C[8] + _C[9] * r) + (_C[10] + _C[11] * r) * r2
    b3 = _C[12] + _C[13] * r
    p = (b0 + b1 * r4) + (b2 + b3 * r4) * (r4 * r4)
    n1 = ni >> 1
    n2 = ni - n1
    return (p * _int64_bits_as_float64((n1 + 1023) << 52)) * _int64_bits_as_float64((n2 + 1023) << 52)

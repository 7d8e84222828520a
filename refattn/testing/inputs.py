"""Input distributions that find bugs: the q, k, v an attention kernel is checked on.

Standard-normal inputs give scores of a few units, where almost every kernel is right. Real kernels
go wrong where the scores are large, where a few channels dominate, where rows are nearly one-hot,
and where scores tie exactly. :func:`make` draws q, k, v of a case's shape from one of these
distributions; ``refattn compare --inputs NAME`` and ``refattn compare --impl`` (a default
:data:`BATTERY`) and :func:`refattn.testing.strategies.attention_inputs` (``inputs=``) use it.

``normal``
    q, k, v standard normal (the variant's own ``example``).
``large``
    logits past the exponential's range of the tested dtype: q and k scaled so that each row's
    largest score ``scale * q.k`` is about ``1.25 ln(max(dtype))`` (13.9 for fp16, 111 for bf16 and
    fp32, 887 for float64), where ``exp`` of an unshifted score overflows. A kernel without the
    running-max subtraction returns inf/NaN here; a correct one is unaffected.
``outliers``
    standard normal with a few outlier channels: 2 of every 64 feature dimensions (at least one)
    hold values 20x larger, in q and k alike, as LLM activations do -- Dettmers et al., *LLM.int8():
    8-bit Matrix Multiplication for Transformers at Scale*, NeurIPS 2022, §3 (outlier features up to
    20x the others' magnitude in a few dimensions); Sun et al., *Massive Activations in Large
    Language Models*, 2024. The scores are then dominated by those channels.
``peaked``
    near one-hot rows: every query is aligned with one key (its own position modulo Sk), whose score
    exceeds the others' by about 16 on average: the softmax puts nearly all the weight (typically
    more than 99.9%) on that key.
``ties``
    small integers (-2..2) in q and k and repeated key rows, so that many scores are exactly equal:
    ties in the row maximum and in the keys that share it.
``extreme``
    float64 only: magnitudes whose scores reach 1e+300 (the oracle's own range; numba against numpy).

Every distribution is a function of ``(shape, rng, dtype)`` alone: the same seed gives the same
arrays. Values are float64; the caller rounds them to the tested dtype (``large`` already keeps
them within its range).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import ParameterError

DISTRIBUTIONS = ("normal", "large", "outliers", "peaked", "ties", "extreme")
#: what ``refattn compare --impl`` runs by default: each must pass
BATTERY = ("normal", "large", "outliers", "peaked", "ties")
#: outlier channels per 64 dimensions, and their magnitude
OUTLIER_CHANNELS, OUTLIER_FACTOR = 2, 20.0


def exp_range(dtype: Optional[str]) -> float:
    """``ln`` of the largest finite value of ``dtype`` (float64 when None)."""
    if dtype in (None, "fp64", "float64"):
        return math.log(np.finfo(np.float64).max)
    from .. import numerics
    return math.log(float(numerics.finfo(dtype).max))


def _qkv(shape, rng):
    b, hq, sq, sk, d, hkv = shape
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, d)))


def _head_of(hq, hkv):
    return np.arange(hq) // max(1, hq // hkv)


def make(name: str, shape, rng, dtype: Optional[str] = None, scale: Optional[float] = None) -> dict:
    """``{"q", "k", "v"}`` of ``shape = (B, Hq, Sq, Sk, D, Hkv)`` drawn from distribution ``name``
    (module docstring) with the generator ``rng``; ``dtype`` is the tested precision (it sets the
    ``large`` logits), ``scale`` the score scale (default ``1/sqrt(D)``)."""
    if name not in DISTRIBUTIONS:
        raise ParameterError(f"inputs: expected one of {', '.join(DISTRIBUTIONS)}, got {name!r}")
    b, hq, sq, sk, d, hkv = (int(x) for x in shape)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = _qkv(shape, rng)
    if name == "large":
        target = 1.25 * exp_range(dtype)
        # a row's largest scale * q.k for unit-variance q, k is about scale * sqrt(D * 2 ln Sk)
        typical = abs(scale) * math.sqrt(d * 2.0 * math.log(max(sk, 2)))
        c = math.sqrt(target / max(typical, 1e-300))
        q, k = q * c, k * c
    elif name == "outliers":
        n = max(1, OUTLIER_CHANNELS * d // 64)
        channels = rng.choice(d, size=n, replace=False)
        q[..., channels] *= OUTLIER_FACTOR
        k[..., channels] *= OUTLIER_FACTOR
    elif name == "peaked":
        k = k / np.linalg.norm(k, axis=-1, keepdims=True) * math.sqrt(d)
        target = (np.arange(sq) % sk)  # each query's key
        kh = k[:, _head_of(hq, hkv)][:, :, target]  # (B, Hq, Sq, D)
        gap = 16.0 / (abs(scale) * d)  # scale * q.k_target ~ 16 more than the others
        q = 0.05 * q + gap * kh
    elif name == "ties":
        q = rng.integers(-2, 3, size=q.shape).astype(np.float64)
        k = rng.integers(-2, 3, size=k.shape).astype(np.float64)
        k[:, :, 1::2] = k[:, :, 0:-1:2][:, :, :k[:, :, 1::2].shape[2]]  # every odd key repeats the one before
    elif name == "extreme":
        if dtype not in (None, "fp64", "float64"):
            raise ParameterError(f"inputs: 'extreme' scores exceed every low-precision range; it "
                                 f"applies to float64, got dtype {dtype!r}")
        e = rng.uniform(0.0, 150.0)  # scores up to ~1e300 (q and k each up to ~1e150)
        q, k = q * 10.0 ** e, k * 10.0 ** e
    return {"q": q, "k": k, "v": v}

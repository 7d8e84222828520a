"""Host-side planning for the kernels: tile plans from the Pattern, and the parameter records.

Everything that decides *which* pairs are computed happens here, with the code the CPU backends use
(:meth:`refattn.patterns.Pattern.tile_plan` / :meth:`~refattn.patterns.Pattern.band`), so the device
code is the arithmetic only:

* a band-only pattern (causal and/or window, nothing else) sends no layout at all: the kernels
  classify each tile from the band ``(s, lo, hi)`` as ``Pattern._band_classify`` does, and the
  per-tile ranges below are computed in O(number of tiles) -- a 1M-token causal plan is a few
  arrays of 16K integers, not a 16K x 32K layout;
* any other pattern sends ``Pattern.tile_plan``'s layout (EMPTY / PARTIAL / FULL per tile), the
  index of each PARTIAL tile and its ``block_q x block_k`` mask.

:func:`attend_record` fills the ``AttendParams`` record (:mod:`._abi`) through a *device*: an object
with ``put(array, dtype) -> device array`` and ``address(device array) -> int``. No CuPy here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from refattn.errors import ParameterError
from refattn.patterns import EMPTY

from . import _abi


@dataclass
class TilePlan:
    """What the kernels need from a Pattern for one ``(sq, sk)`` and tile size."""

    block_q: int
    block_k: int
    nbq: int
    nbk: int
    band: tuple                      # (s, lo, hi), unbounded sides +-_abi.UNBOUNDED
    layout: Optional[np.ndarray]     # int8 (Lb, Lh, nbq, nbk), or None: band only
    pindex: Optional[np.ndarray]     # int32, same shape
    pmasks: Optional[np.ndarray]     # uint8 (n_partial, block_q, block_k)
    q_tile_lo: np.ndarray            # int64 (nbq,): first key tile non-empty anywhere
    q_tile_hi: np.ndarray            # ... one past the last (lo == hi: none)
    k_tile_lo: np.ndarray            # int64 (nbk,): first query tile non-empty anywhere
    k_tile_hi: np.ndarray


def band_ranges(n_tiles: int, block: int, extent: int, other: int, first_off: int,
                last_off: int, other_block: int):
    """For tiles of ``block`` along an axis of ``extent``, the range of tiles (of ``other_block``)
    along the other axis (of extent ``other``) holding a visible pair: positions
    ``[start + first_off, end + last_off]`` clipped to ``[0, other - 1]``."""
    start = np.arange(n_tiles, dtype=np.int64) * block
    end = np.minimum(start + block, extent) - 1
    first = np.maximum(0, start + first_off)
    last = np.minimum(other - 1, end + last_off)
    some = first <= last
    lo = np.where(some, first // other_block, 0).astype(np.int64)
    hi = np.where(some, last // other_block + 1, 0).astype(np.int64)
    return lo, hi


def _ranges(nonempty):
    """Per row of a boolean matrix: ``[first True, last True + 1)``, or ``[0, 0)``."""
    any_ = nonempty.any(axis=1)
    first = np.argmax(nonempty, axis=1)
    last = nonempty.shape[1] - np.argmax(nonempty[:, ::-1], axis=1)
    return (np.where(any_, first, 0).astype(np.int64), np.where(any_, last, 0).astype(np.int64))


def plan_tiles(pattern, sq: int, sk: int, block_q: int, block_k: int) -> TilePlan:
    """The tile plan of ``pattern`` for ``sq`` queries, ``sk`` keys and ``block_q x block_k`` tiles."""
    s, lo, hi = pattern.band(sq, sk)
    lo = -_abi.UNBOUNDED if lo is None else int(lo)
    hi = _abi.UNBOUNDED if hi is None else int(hi)
    nbq, nbk = -(-sq // block_q), -(-sk // block_k)
    if pattern.is_band_only:
        # query tile [i0, i1] sees keys [i0 + s + lo, i1 + s + hi]; key tile [j0, j1] is seen by
        # queries [j0 - s - hi, j1 - s - lo] (lo <= 0 <= hi, so these unions are intervals)
        qlo, qhi = band_ranges(nbq, block_q, sq, sk, s + lo, s + hi, block_k)
        klo, khi = band_ranges(nbk, block_k, sk, sq, -s - hi, -s - lo, block_q)
        return TilePlan(block_q, block_k, nbq, nbk, (int(s), lo, hi), None, None, None,
                        qlo, qhi, klo, khi)
    layout, pindex, pmasks = pattern.tile_plan(block_q, block_k, sq=sq, sk=sk)
    nonempty = (layout != EMPTY).any(axis=(0, 1))
    qlo, qhi = _ranges(nonempty)
    klo, khi = _ranges(nonempty.T)
    return TilePlan(block_q, block_k, nbq, nbk, (int(s), lo, hi),
                    np.ascontiguousarray(layout, dtype=np.int8),
                    np.ascontiguousarray(pindex, dtype=np.int32),
                    np.ascontiguousarray(pmasks, dtype=np.uint8), qlo, qhi, klo, khi)


def _dims(a):
    return tuple(int(n) for n in np.shape(a))


def attend_record(dev, plan: TilePlan, *, q, k, v, head_map, scale, score_mod=None, sinks=None,
                  dropout=None, hkv: int, sk: int, dv: int, extra: Optional[dict] = None):
    """The ``AttendParams`` record of one call (a 0-d numpy record) and the device arrays it points
    to (keep them alive until the kernels have run).

    ``q``, ``k``, ``v`` are device arrays already (``k``/``v`` may be pages: ``hkv``, ``sk`` and ``dv``
    give the logical geometry); ``extra`` holds further fields by name (outputs, backward arrays,
    paging), device arrays or numbers.
    """
    b, hq, sq, d = _dims(q)
    keep = []

    def put(x, dtype):
        a = dev.put(x, dtype)
        keep.append(a)
        return a

    s, lo, hi = plan.band
    f = dict(q=q, k=k, v=v, head_map=put(np.asarray(head_map), np.int64),
             B=b, Hq=hq, Hkv=hkv, Sq=sq, Sk=sk, D=d, Dv=dv,
             block_q=plan.block_q, block_k=plan.block_k, nbq=plan.nbq, nbk=plan.nbk,
             q_tile_lo=put(plan.q_tile_lo, np.int64), q_tile_hi=put(plan.q_tile_hi, np.int64),
             k_tile_lo=put(plan.k_tile_lo, np.int64), k_tile_hi=put(plan.k_tile_hi, np.int64),
             band_s=s, band_lo=lo, band_hi=hi, lay_b=1, lay_h=1,
             scale=scale, alibi_offset=s)
    if plan.layout is not None:
        f.update(layout=put(plan.layout, np.int8), pindex=put(plan.pindex, np.int32),
                 pmasks=put(plan.pmasks, np.uint8), lay_b=plan.layout.shape[0],
                 lay_h=plan.layout.shape[1])
    if sinks is not None:
        f["sinks"] = put(sinks, np.float64)
    if score_mod is not None:
        if score_mod.softcap is not None:
            f["softcap"] = float(score_mod.softcap)
        if score_mod.alibi_slopes is not None:
            f["alibi"] = _abi.ALIBI[score_mod.alibi_form]
            f["slopes"] = put(score_mod.alibi_slopes, np.float64)
        if score_mod.bias is not None:
            bias = score_mod.bias
            f["bias"] = put(bias, np.float64)
            f["bias_b"], f["bias_h"], f["bias_i"], f["bias_j"] = _dims(bias)
    if dropout is not None:
        f["drop_p"], f["drop_scale"] = float(dropout.p), float(dropout.scale)
        if dropout.mask is not None:
            f["dropout"] = _abi.DROP_MASK
            f["drop_mask"] = put(dropout.mask, np.uint8)
            f["dm_b"], f["dm_h"], f["dm_i"], f["dm_j"] = _dims(dropout.mask)
        else:
            if dropout.shifted:  # the CUDA kernels read the counter i * Sk + j of the call itself
                raise ParameterError("dropout_seed: the cupy backend has no Philox counter offset for "
                                     "a sub-rectangle (rect=); use the numpy or numba backend")
            f["dropout"] = _abi.DROP_PHILOX
            f["seed"] = int(dropout.seed)
    f.update(extra or {})
    return _abi.record(_abi.ATTEND_PARAMS, dev.address, **f), keep


def head_groups(head_map, hkv: int):
    """``(group_ptr, group_idx)``: the query heads reading KV head ``g`` are
    ``group_idx[group_ptr[g]:group_ptr[g + 1]]`` (ascending)."""
    head_map = np.asarray(head_map, dtype=np.int64)
    idx = np.argsort(head_map, kind="stable").astype(np.int64)
    ptr = np.searchsorted(head_map[idx], np.arange(hkv + 1)).astype(np.int64)
    return ptr, idx

"""Which keys each query may see: :class:`Pattern`.

A Pattern is pure description. It never materialises an ``Sq x Sk`` matrix unless asked to
(:meth:`Pattern.mask`), and it imports no backend. Backends read it two ways:

* :meth:`Pattern.mask` -- a dense boolean array broadcastable to ``(B, H, Sq, Sk)`` (True = the key is
  visible), optionally for a slice of query rows only, so a reference can work in query chunks;
* :meth:`Pattern.block_layout` -- for tiles of ``block_q x block_k``, whether each tile is
  :data:`EMPTY` (skip it), :data:`FULL` (every pair visible: no per-element test needed) or
  :data:`PARTIAL`.

Conventions (DESIGN section 3)
-------------------------------
*Alignment.* The diagonal offset is ``s = Sk - Sq`` with ``alignment="bottom_right"`` (the default:
flash-attn >= 2.1, FlashInfer, KV-cache decode) and ``s = 0`` with ``alignment="top_left"`` (PyTorch's
``is_causal``).

*Causal.* Query ``i`` sees key ``j`` iff ``j <= i + s``.

*Window* ``(left, right)``, ``-1`` meaning unbounded on that side: key ``j`` is visible iff
``i + s - left <= j <= i + s + right``. A causal sliding window of ``w`` tokens including the query's
own position is ``(w - 1, 0)``.

*Dense mask.* A boolean array broadcastable to ``(B, H, Sq, Sk)``; True keeps the pair.

The parts combine by intersection: a pair is visible iff every part admits it, and it is counted
once. With ``Sk < Sq`` and bottom-right alignment the first ``Sq - Sk`` rows of a causal pattern see
no key at all: those are *empty rows* (output 0, LSE ``-inf``; see :func:`refattn.attention`).

The sparse family extends this class with more predicates; the methods above are the whole
interface the backends rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .errors import ParameterError, ShapeError, fmt_shape

#: :meth:`Pattern.block_layout` codes.
EMPTY, PARTIAL, FULL = 0, 1, 2

ALIGNMENTS = ("bottom_right", "top_left")


def diagonal_offset(alignment: str, sq: int, sk: int) -> int:
    """``s``: ``sk - sq`` for bottom-right alignment, ``0`` for top-left."""
    if alignment == "bottom_right":
        return sk - sq
    if alignment == "top_left":
        return 0
    raise ParameterError(f"alignment: expected one of {ALIGNMENTS}, got {alignment!r}")


@dataclass(frozen=True, eq=False)
class Pattern:
    """Visibility of keys to queries: causal and window band, optional dense mask.

    Parameters
    ----------
    causal:
        Keep only keys ``j <= i + s``.
    window:
        ``(left, right)`` with ``-1`` = unbounded, or None for no window.
    alignment:
        ``"bottom_right"`` (default, ``s = Sk - Sq``) or ``"top_left"`` (``s = 0``).
    dense:
        Boolean array broadcastable to ``(B, H, Sq, Sk)``, True = visible; stored as given
        (rank is padded to 4 with leading 1s).
    """

    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    alignment: str = "bottom_right"
    dense: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self):
        diagonal_offset(self.alignment, 0, 0)  # validates the name
        if self.window is not None:
            if len(self.window) != 2:
                raise ParameterError(f"window: expected (left, right), got {self.window!r}")
            for side, w in zip(("left", "right"), self.window):
                if int(w) != w or w < -1:
                    raise ParameterError(
                        f"window: expected {side} an integer >= -1 (-1 = unbounded), got {w!r}")
            object.__setattr__(self, "window", (int(self.window[0]), int(self.window[1])))
        if self.dense is not None:
            d = np.asarray(self.dense)
            if d.dtype != np.bool_:
                raise ParameterError(f"mask: expected a boolean array (True = keep), got dtype {d.dtype}")
            if d.ndim > 4 or d.ndim < 2:
                raise ShapeError(f"mask: expected rank 2 to 4 broadcastable to (B, H, Sq, Sk), "
                                 f"got shape {fmt_shape(d.shape)}")
            object.__setattr__(self, "dense", d.reshape((1,) * (4 - d.ndim) + d.shape))

    # -- the band ---------------------------------------------------------------------------
    def band(self, sq: int, sk: int) -> Tuple[int, Optional[int], Optional[int]]:
        """``(s, lo, hi)``: key ``j`` passes the band iff ``lo <= j - (i + s) <= hi``.

        ``lo``/``hi`` are None where unbounded. Causal and window intersect: causal sets
        ``hi = min(hi, 0)``.
        """
        s = diagonal_offset(self.alignment, sq, sk)
        lo = hi = None
        if self.window is not None:
            left, right = self.window
            lo = None if left < 0 else -left
            hi = None if right < 0 else right
        if self.causal:
            hi = 0 if hi is None else min(hi, 0)
        return s, lo, hi

    @property
    def has_band(self) -> bool:
        return self.causal or (self.window is not None and self.window != (-1, -1))

    # -- dense views ------------------------------------------------------------------------
    def mask(self, sq: int, sk: int, rows: slice = slice(None)) -> np.ndarray:
        """Dense boolean mask, shape ``(Bm, Hm, r, sk)`` broadcastable to ``(B, H, r, sk)``.

        ``rows`` selects query rows (a slice of ``range(sq)``) so callers can work in chunks;
        ``Bm``/``Hm`` are 1 unless the dense mask varies over batch or heads.
        """
        i = np.arange(sq)[rows]
        j = np.arange(sk)
        s, lo, hi = self.band(sq, sk)
        rel = j[None, :] - (i[:, None] + s)
        keep = np.ones((i.size, sk), dtype=bool)
        if lo is not None:
            keep &= rel >= lo
        if hi is not None:
            keep &= rel <= hi
        keep = keep[None, None]
        if self.dense is not None:
            self._check_dense(sq, sk)
            d = self.dense if self.dense.shape[2] == 1 else self.dense[:, :, rows]
            keep = keep & d
        return keep

    def _check_dense(self, sq: int, sk: int):
        d = self.dense
        if d.shape[2] not in (1, sq) or d.shape[3] not in (1, sk):
            raise ShapeError(f"mask: expected a shape broadcastable to (B, H, {sq}, {sk}), "
                             f"got {fmt_shape(d.shape)}")

    def block_layout(self, block_q: int, block_k: int, *, sq: int, sk: int) -> np.ndarray:
        """Classify ``block_q x block_k`` tiles: :data:`EMPTY`, :data:`PARTIAL` or :data:`FULL`.

        Returns int8 of shape ``(Bm, Hm, ceil(sq/block_q), ceil(sk/block_k))`` (Bm, Hm as in
        :meth:`mask`). The band part is classified analytically from each tile's extreme values of
        ``j - i`` in O(number of tiles); with a dense mask the whole mask is reduced tile by
        tile, so every code is exact (a PARTIAL tile has at least one visible and one hidden pair).
        The last row/column of tiles may be ragged; only in-range pairs count.
        """
        if block_q < 1 or block_k < 1:
            raise ParameterError(f"block_q/block_k: expected >= 1, got {block_q}, {block_k}")
        nbq, nbk = -(-sq // block_q), -(-sk // block_k)
        i0 = np.arange(nbq) * block_q
        i1 = np.minimum(i0 + block_q, sq) - 1
        j0 = np.arange(nbk) * block_k
        j1 = np.minimum(j0 + block_k, sk) - 1
        s, lo, hi = self.band(sq, sk)
        # extreme values of rel = j - (i + s) over each tile
        rel_min = j0[None, :] - (i1[:, None] + s)
        rel_max = j1[None, :] - (i0[:, None] + s)
        full = np.ones((nbq, nbk), dtype=bool)
        empty = np.zeros((nbq, nbk), dtype=bool)
        if lo is not None:
            full &= rel_min >= lo
            empty |= rel_max < lo
        if hi is not None:
            full &= rel_max <= hi
            empty |= rel_min > hi
        if self.dense is None:
            return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)[None, None]
        # With a dense mask, reduce the whole mask tile by tile (exact, O(sq * sk)).
        m = self.mask(sq, sk)
        pad = np.zeros(m.shape[:2] + (nbq * block_q, nbk * block_k), dtype=np.int32)
        pad[:, :, :sq, :sk] = m
        counts = pad.reshape(m.shape[:2] + (nbq, block_q, nbk, block_k)).sum(axis=(3, 5))
        sizes = (i1 - i0 + 1)[:, None] * (j1 - j0 + 1)[None, :]
        layout = np.where(counts == 0, EMPTY, np.where(counts == sizes, FULL, PARTIAL))
        return layout.astype(np.int8)

    @property
    def is_band_only(self) -> bool:
        """True when visibility is the causal/window band alone: compiled backends may then test
        pairs analytically (``lo <= j - (i + s) <= hi``) instead of reading :meth:`tile_plan`."""
        return type(self) is Pattern and self.dense is None

    def tile_plan(self, block_q: int, block_k: int, *, sq: int, sk: int):
        """What a tiled kernel needs: ``(layout, index, masks)``.

        ``layout`` is :meth:`block_layout`; ``index`` (int32, same shape) numbers the PARTIAL tiles
        ``0..n-1`` in C order (``-1`` elsewhere); ``masks`` (bool ``(n, block_q, block_k)``) holds
        each partial tile's visibility, padded with False beyond ``sq``/``sk``. Memory is
        O(partial tiles), not O(sq * sk). Subclasses may override with something cheaper.
        """
        layout = self.block_layout(block_q, block_k, sq=sq, sk=sk)
        partial = layout == PARTIAL
        index = np.full(layout.shape, -1, dtype=np.int32)
        index[partial] = np.arange(int(partial.sum()), dtype=np.int32)
        masks = np.zeros((int(partial.sum()), block_q, block_k), dtype=bool)
        bm, hm, nbq, _ = layout.shape
        for ti in range(nbq):
            if not partial[:, :, ti].any():
                continue
            rows = slice(ti * block_q, min(sq, (ti + 1) * block_q))
            m = np.broadcast_to(self.mask(sq, sk, rows), (bm, hm, rows.stop - rows.start, sk))
            for b, h, tj in zip(*np.nonzero(partial[:, :, ti])):
                cols = slice(tj * block_k, min(sk, (tj + 1) * block_k))
                masks[index[b, h, ti, tj], :rows.stop - rows.start, :cols.stop - cols.start] = \
                    m[b, h, :, cols]
        return layout, index, masks

    def density(self, sq: int, sk: int) -> float:
        """Fraction of visible (query, key) pairs, averaged over any batch/head variation."""
        return float(np.mean(self.mask(sq, sk)))

"""Which keys each query may see: :class:`Pattern` and its algebra.

A Pattern is pure description. It never materialises an ``Sq x Sk`` matrix unless asked to
(:meth:`Pattern.mask`), and it imports no backend. Backends read it two ways:

* :meth:`Pattern.mask` -- a dense boolean array broadcastable to ``(B, H, Sq, Sk)`` (True = the key is
  visible), optionally for a slice of query rows (and of key columns) only, so a reference can work
  in query chunks;
* :meth:`Pattern.block_layout` / :meth:`Pattern.tile_plan` -- for tiles of ``block_q x block_k``,
  whether each tile is :data:`EMPTY` (skip it), :data:`FULL` (every pair visible: no per-element test
  needed) or :data:`PARTIAL`, plus the element masks of the partial tiles.

Conventions (DESIGN section 3)
-------------------------------
*Alignment.* The diagonal offset is ``s = Sk - Sq`` with ``alignment="bottom_right"`` (the default:
flash-attn >= 2.1, FlashInfer, KV-cache decode) and ``s = 0`` with ``alignment="top_left"`` (PyTorch's
``is_causal``). The *position* of query row ``i`` is ``i + s``; key ``j`` is at position ``j``.

*Causal.* Query ``i`` sees key ``j`` iff ``j <= i + s``.

*Window* ``(left, right)``, ``-1`` meaning unbounded on that side: key ``j`` is visible iff
``i + s - left <= j <= i + s + right``. A causal sliding window of ``w`` tokens including the query's
own position is ``(w - 1, 0)``.

*Dense mask.* A boolean array broadcastable to ``(B, H, Sq, Sk)``; True keeps the pair.

*Explicit offset.* ``offset=s`` fixes the diagonal offset whatever ``Sq``, ``Sk`` and the alignment
say: how a sub-rectangle of a larger problem keeps its band (:meth:`Pattern.subrect`).

*Sub-rectangles.* :meth:`Pattern.subrect` views rows ``q0 ..`` and keys ``k0 ..`` of a problem of
``Sq x Sk`` pairs as a pattern of their own, in *global* coordinates: local pair ``(i, j)`` is visible
iff the whole problem's pair ``(q0 + i, k0 + j)`` is. A band alone becomes a band with the offset
``s + q0 - k0`` (compiled backends keep their analytic fast path); any other pattern a
:class:`SubRect` view that asks the whole pattern about shifted rows, keys and tiles.

The algebra
-----------
Every pattern class is a subclass of :class:`Pattern` and keeps its fields ``causal``, ``window``,
``alignment`` and ``dense``: a pattern's own predicate is always *intersected* with them. The
predicates (sections D and H of VARIANTS.md):

==========================  ==========================================================================
:class:`Pattern`            the causal/window band and a dense mask (nothing else)
:class:`Dilated`            ``rel = j - (i+s)``: ``rel % d == 0`` and ``-left*d <= rel <= right*d``
:class:`LocalBlocks`        ``j // l == (i+s) // l`` (Sparse Transformer *fixed*, part A)
:class:`Summary`            ``j % l >= l - c`` (Sparse Transformer *fixed*, part B: summary columns)
:class:`Global`             rows at global positions see every key; every row sees global keys
:class:`BlockSparse`        an explicit block layout ``(Hm, nbq, nbk)`` over row/column *indices*
:class:`RandomKeys`         explicit per-row key tables ``(Hm, Sq, r)`` (random attention)
:class:`Union`              ``a | b``: a pair is visible if any part admits it -- *once*
:class:`Intersection`       ``a & b``: a pair is visible if every part admits it
:class:`Heads`              head ``h`` uses ``parts[h]`` (per-head variation)
==========================  ==========================================================================

A Pattern is a *set* of ``(b, h, i, j)``: in a union a pair admitted by two parts (a global key that is
also inside the window) is visible once, never twice. Multisets (HF BigBird's repeated blocks) are
built by the variants from several patterns merged with ``merge_states``.

Every ``mask`` and ``block_layout`` result has leading dims ``(Bm, Hm)``: 1 unless the pattern varies
over batch (``Global`` from a ``(B, S)`` mask) or heads (``Heads``, per-head ``BlockSparse`` layouts).

Empty rows: with ``Sk < Sq`` and bottom-right alignment the first ``Sq - Sk`` rows of a causal pattern
see no key at all (output 0, LSE ``-inf``; see :func:`refattn.attention`).

Tile classification cost: the band, :class:`Dilated`, :class:`LocalBlocks`, :class:`Global`,
:class:`Summary`, :class:`BlockSparse` and :class:`RandomKeys` classify tiles in O(tiles + S) (no
``Sq x Sk`` work), and for these leaves (alone, :attr:`Pattern.exact_classify`) the codes are already
exact. In compositions (``|``, ``&``, a band intersected with a predicate, a dense mask) only the
tiles still :data:`PARTIAL` after that are evaluated element by element, so every code
:meth:`block_layout` returns is exact and block-structured patterns (BigBird, block_sparse) cost
O(tiles + blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

import numpy as np

from .errors import ParameterError, ShapeError, fmt_shape
from .validate import check_int, check_window

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


@dataclass(frozen=True)
class Tiles:
    """Tile extents for classification: inclusive row ``[i0, i1]`` and column ``[j0, j1]`` ranges."""

    i0: np.ndarray
    i1: np.ndarray
    j0: np.ndarray
    j1: np.ndarray
    sq: int
    sk: int

    @classmethod
    def grid(cls, block_q: int, block_k: int, sq: int, sk: int) -> "Tiles":
        i0 = np.arange(-(-sq // block_q)) * block_q
        j0 = np.arange(-(-sk // block_k)) * block_k
        return cls(i0, np.minimum(i0 + block_q, sq) - 1, j0, np.minimum(j0 + block_k, sk) - 1, sq, sk)

    @property
    def shape(self):
        return (self.i0.size, self.j0.size)


def _codes(full, empty):
    """int8 codes from boolean FULL/EMPTY arrays (EMPTY wins, for empty tiles of size 0)."""
    return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _as4(a):
    a = np.asarray(a)
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


def _prefix2d(on):
    """Inclusive 2-d prefix sums over the last two axes, zero-padded in front."""
    c = np.zeros(on.shape[:-2] + (on.shape[-2] + 1, on.shape[-1] + 1), dtype=np.int64)
    c[..., 1:, 1:] = on.cumsum(-2).cumsum(-1)
    return c


def _box_sum(c, r0, r1, c0, c1):
    """Sums over boxes ``[r0, r1] x [c0, c1]`` (inclusive; r*, c* broadcast) from :func:`_prefix2d`."""
    return c[..., r1 + 1, c1 + 1] - c[..., r0, c1 + 1] - c[..., r1 + 1, c0] + c[..., r0, c0]


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
    offset:
        None (the offset follows ``alignment``) or the diagonal offset ``s`` itself, whatever
        ``Sq`` and ``Sk`` are (a sub-rectangle's band: :meth:`subrect`).

    Subclasses add a predicate of their own, which is intersected with these five.
    """

    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    alignment: str = "bottom_right"
    dense: Optional[np.ndarray] = field(default=None, repr=False)
    offset: Optional[int] = None

    #: whether :meth:`classify` takes tiles at any position (not only a grid from 0): what
    #: :class:`SubRect` needs to ask the whole pattern about shifted tiles
    _shift_safe = True

    def __post_init__(self):
        diagonal_offset(self.alignment, 0, 0)  # validates the name
        object.__setattr__(self, "window", check_window(self.window))
        if self.offset is not None:
            object.__setattr__(self, "offset", check_int(self.offset, "offset"))
        if self.dense is not None:
            d = np.asarray(self.dense)
            if d.dtype != np.bool_:
                raise ParameterError(f"mask: expected a boolean array (True = keep), got dtype {d.dtype}")
            if d.ndim > 4 or d.ndim < 2:
                raise ShapeError(f"mask: expected rank 2 to 4 broadcastable to (B, H, Sq, Sk), "
                                 f"got shape {fmt_shape(d.shape)}")
            object.__setattr__(self, "dense", d.reshape((1,) * (4 - d.ndim) + d.shape))

    # -- the band ---------------------------------------------------------------------------
    def diagonal(self, sq: int, sk: int) -> int:
        """``s``: the explicit ``offset`` when given, else :func:`diagonal_offset` of the alignment."""
        return self.offset if self.offset is not None else diagonal_offset(self.alignment, sq, sk)

    def band(self, sq: int, sk: int) -> Tuple[int, Optional[int], Optional[int]]:
        """``(s, lo, hi)``: key ``j`` passes the band iff ``lo <= j - (i + s) <= hi``.

        ``lo``/``hi`` are None where unbounded. Causal and window intersect: causal sets
        ``hi = min(hi, 0)``. ``s`` is the diagonal offset for every pattern class.
        """
        s = self.diagonal(sq, sk)
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

    @property
    def is_band_only(self) -> bool:
        """True when visibility is the causal/window band alone: compiled backends may then test
        pairs analytically (``lo <= j - (i + s) <= hi``) instead of reading :meth:`tile_plan`."""
        return type(self) is Pattern and self.dense is None

    # -- sub-rectangles ---------------------------------------------------------------------
    def subrect(self, q0: int, k0: int, sq: int, sk: int) -> "Pattern":
        """This pattern seen from rows ``q0 ..`` and keys ``k0 ..`` of its ``sq x sk`` problem.

        The result's local pair ``(i, j)`` is visible iff this pattern's ``(q0 + i, k0 + j)`` is,
        for any local extent that fits (``q0 + rows <= sq``, ``k0 + keys <= sk``), and its band's
        offset is ``s + q0 - k0`` (ALiBi's ``|i + s - j|`` in global positions). A band alone is
        again a band (:attr:`is_band_only`: the analytic fast path of compiled backends); anything
        else is a :class:`SubRect` view.
        """
        q0, k0 = check_int(q0, "q0", 0), check_int(k0, "k0", 0)
        sq, sk = check_int(sq, "sq", 0), check_int(sk, "sk", 0)
        if self.is_band_only:
            return Pattern(causal=self.causal, window=self.window, alignment=self.alignment,
                           offset=self.diagonal(sq, sk) + q0 - k0)
        return SubRect(parent=self, q0=q0, k0=k0, sq=sq, sk=sk)

    # -- the algebra ------------------------------------------------------------------------
    def __or__(self, other: "Pattern") -> "Pattern":
        _check_pattern(other, "|")
        return Union(parts=_flatten(Union, self) + _flatten(Union, other), alignment=self.alignment)

    def __and__(self, other: "Pattern") -> "Pattern":
        _check_pattern(other, "&")
        return Intersection(parts=_flatten(Intersection, self) + _flatten(Intersection, other),
                            alignment=self.alignment)

    # -- element-wise evaluation (the definition) -------------------------------------------
    def keep(self, i: np.ndarray, j: np.ndarray, sq: int, sk: int) -> np.ndarray:
        """Visibility of rows ``i`` (1-d int array) against keys ``j`` (1-d int array).

        Returns bool ``(Bm, Hm, len(i), len(j))``. This is the definition; :meth:`mask` and the
        tile machinery call it.
        """
        i = np.asarray(i, dtype=np.int64)
        j = np.asarray(j, dtype=np.int64)
        out = _as4(self._band_keep(i, j, sq, sk))
        if self.dense is not None:
            self._check_dense(sq, sk)
            d = self.dense
            ii = i if d.shape[2] > 1 else np.zeros_like(i)
            jj = j if d.shape[3] > 1 else np.zeros_like(j)
            out = out & d[:, :, ii[:, None], jj[None, :]]
        own = self._own_keep(i, j, sq, sk)
        if own is not None:
            out = out & _as4(own)
        return out

    def _band_keep(self, i, j, sq, sk):
        s, lo, hi = self.band(sq, sk)
        rel = j[None, :] - (i[:, None] + s)
        keep = np.ones(rel.shape, dtype=bool)
        if lo is not None:
            keep &= rel >= lo
        if hi is not None:
            keep &= rel <= hi
        return keep

    def _own_keep(self, i, j, sq, sk):
        """The subclass's own predicate (bool, broadcastable to (Bm, Hm, len(i), len(j))), or None."""
        return None

    def mask(self, sq: int, sk: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Dense boolean mask, shape ``(Bm, Hm, r, c)`` broadcastable to ``(B, H, r, c)``.

        ``rows`` selects query rows (a slice of ``range(sq)``) so callers can work in chunks;
        ``cols`` likewise for keys. ``Bm``/``Hm`` are 1 unless the pattern varies over batch or
        heads.
        """
        return self.keep(np.arange(sq)[rows], np.arange(sk)[cols], sq, sk)

    def _check_dense(self, sq: int, sk: int):
        d = self.dense
        if d.shape[2] not in (1, sq) or d.shape[3] not in (1, sk):
            raise ShapeError(f"mask: expected a shape broadcastable to (B, H, {sq}, {sk}), "
                             f"got {fmt_shape(d.shape)}")

    # -- tiles ------------------------------------------------------------------------------
    def classify(self, tiles: Tiles) -> np.ndarray:
        """Conservative tile codes ``(Bm, Hm, nbq, nbk)``: EMPTY and FULL are certain, PARTIAL may
        be either. O(tiles) for the band and every structured predicate (see the module doc)."""
        codes = _as4(self._band_classify(tiles))
        if self.dense is not None:
            codes = np.minimum(codes, np.full(self.dense.shape[:2] + (1, 1), PARTIAL, np.int8))
        own = self._own_classify(tiles)
        if own is not None:
            codes = np.minimum(codes, _as4(own))
        return codes

    def _band_classify(self, t: Tiles):
        s, lo, hi = self.band(t.sq, t.sk)
        rel_min = t.j0[None, :] - (t.i1[:, None] + s)
        rel_max = t.j1[None, :] - (t.i0[:, None] + s)
        full = np.ones(t.shape, dtype=bool)
        empty = np.zeros(t.shape, dtype=bool)
        if lo is not None:
            full &= rel_min >= lo
            empty |= rel_max < lo
        if hi is not None:
            full &= rel_max <= hi
            empty |= rel_min > hi
        return _codes(full, empty)

    def _own_classify(self, tiles: Tiles):
        """Codes of the subclass's own predicate, or None (everything visible)."""
        return None

    #: True when :meth:`_own_classify` is exact (PARTIAL = some visible and some hidden pair)
    _exact_own = True

    @property
    def exact_classify(self) -> bool:
        """Whether :meth:`classify` is already exact (a leaf with an exact predicate and nothing
        intersected with it): then :meth:`block_layout` does no per-element work at all."""
        own = type(self)._own_classify is not Pattern._own_classify
        return self.dense is None and self._exact_own and not (own and self.has_band)

    def _plan(self, block_q, block_k, sq, sk, want_masks, want_counts=False):
        tiles = Tiles.grid(check_int(block_q, "block_q", 1), check_int(block_k, "block_k", 1), sq, sk)
        layout = np.array(self.classify(tiles), dtype=np.int8, copy=True)
        masks = {}
        visible = np.zeros(layout.shape[:2], dtype=np.int64)  # pairs in tiles decided element-wise
        if not (want_masks or want_counts) and self.exact_classify:
            return layout, masks, visible, tiles
        bk = int(block_k)
        for ti in np.nonzero((layout == PARTIAL).any(axis=(0, 1, 3)))[0]:
            partial = layout[:, :, ti] == PARTIAL          # (Bm, Hm, nbk)
            cols = np.nonzero(partial.any(axis=(0, 1)))[0]
            i = np.arange(tiles.i0[ti], tiles.i1[ti] + 1)
            j = (cols[:, None] * bk + np.arange(bk)[None, :]).reshape(-1)   # whole tiles ...
            inside = j < sk                                                   # ... ragged end hidden
            k = self.keep(i, np.minimum(j, sk - 1), sq, sk) & inside
            k = np.broadcast_to(k, layout.shape[:2] + k.shape[2:])
            k = k.reshape(k.shape[:3] + (cols.size, bk))                      # (Bm, Hm, r, n, bk)
            counts = k.sum(axis=(2, 4))                                       # (Bm, Hm, n)
            sizes = i.size * (tiles.j1[cols] - tiles.j0[cols] + 1)
            codes = _codes(counts == sizes, counts == 0)
            sub = layout[:, :, ti, cols]
            # pairs of tiles that stay PARTIAL (those refined to FULL are counted by their size)
            visible += np.where((sub == PARTIAL) & (codes == PARTIAL), counts, 0).sum(axis=-1)
            layout[:, :, ti, cols] = np.where(sub == PARTIAL, codes, sub)
            if want_masks:
                masks[ti] = (cols, k)
        return layout, masks, visible, tiles

    def block_layout(self, block_q: int, block_k: int, *, sq: int, sk: int) -> np.ndarray:
        """Classify ``block_q x block_k`` tiles: :data:`EMPTY`, :data:`PARTIAL` or :data:`FULL`.

        Returns int8 of shape ``(Bm, Hm, ceil(sq/block_q), ceil(sk/block_k))``. Every code is
        exact (a PARTIAL tile has at least one visible and one hidden pair): tiles are classified
        analytically first (:meth:`classify`), then only the tiles still undecided are evaluated
        element by element. The last row/column of tiles may be ragged; only in-range pairs count.
        """
        return self._plan(block_q, block_k, sq, sk, want_masks=False)[0]

    def tile_plan(self, block_q: int, block_k: int, *, sq: int, sk: int):
        """What a tiled kernel needs: ``(layout, index, masks)``.

        ``layout`` is :meth:`block_layout`; ``index`` (int32, same shape) numbers the PARTIAL tiles
        ``0..n-1`` in C order (``-1`` elsewhere); ``masks`` (bool ``(n, block_q, block_k)``) holds
        each partial tile's visibility, padded with False beyond ``sq``/``sk``. Memory is
        O(partial tiles), not O(sq * sk); no work is done on tiles classified analytically.
        """
        layout, found, _, _ = self._plan(block_q, block_k, sq, sk, want_masks=True)
        partial = layout == PARTIAL
        index = np.full(layout.shape, -1, dtype=np.int32)
        index[partial] = np.arange(int(partial.sum()), dtype=np.int32)
        masks = np.zeros((int(partial.sum()), block_q, block_k), dtype=bool)
        for ti, (cols, k) in found.items():  # k: (Bm, Hm, rows, len(cols), block_k)
            b, h, c = np.nonzero(partial[:, :, ti, cols])
            masks[index[b, h, ti, cols[c]], :k.shape[2]] = np.moveaxis(k, 2, 3)[b, h, c]
        return layout, index, masks

    def count(self, sq: int, sk: int, block: int = 256) -> np.ndarray:
        """Number of visible pairs per ``(Bm, Hm)`` (int64), from the tile plan (no Sq x Sk work
        for structured patterns)."""
        layout, _, visible, tiles = self._plan(block, block, sq, sk, want_masks=False,
                                               want_counts=True)
        sizes = (tiles.i1 - tiles.i0 + 1)[:, None] * (tiles.j1 - tiles.j0 + 1)[None, :]
        return np.where(layout == FULL, sizes, 0).sum(axis=(2, 3)).astype(np.int64) + visible

    def density(self, sq: int, sk: int) -> float:
        """Fraction of visible (query, key) pairs, averaged over any batch/head variation."""
        return float(np.mean(self.count(sq, sk)) / (sq * sk)) if sq * sk else 0.0

    # -- description ------------------------------------------------------------------------
    def _own_repr(self) -> list:
        return []

    def __repr__(self):
        parts = self._own_repr()
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.offset is not None:
            parts.append(f"offset={self.offset}")
        elif self.alignment != "bottom_right":
            parts.append(f"alignment={self.alignment!r}")
        if self.dense is not None:
            parts.append(f"dense{fmt_shape(self.dense.shape)}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _check_pattern(other, op):
    if not isinstance(other, Pattern):
        raise ParameterError(f"pattern: expected a Pattern on both sides of {op!r}, got "
                             f"{type(other).__name__}")


def _plain(p: Pattern) -> bool:
    return not p.causal and p.window is None and p.dense is None


def _flatten(cls, p):
    return tuple(p.parts) if type(p) is cls and _plain(p) else (p,)


# -- combinators --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class _Combination(Pattern):
    """Common part of :class:`Union` and :class:`Intersection`: ``parts`` combined pairwise by
    ``_op`` (``|`` or ``&``) into a mask where each pair is present at most once."""

    parts: tuple = ()
    _exact_own = False
    _symbol = ""

    def __post_init__(self):
        super().__post_init__()
        for p in self.parts:
            _check_pattern(p, self._symbol)
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts:
            raise ParameterError("parts: expected at least one pattern, got none")

    @staticmethod
    def _op(a, b):
        raise NotImplementedError

    def _own_keep(self, i, j, sq, sk):
        out = None
        for p in self.parts:
            k = p.keep(i, j, sq, sk)
            out = k if out is None else self._op(out, k)
        return out

    def _own_repr(self):
        return [f" {self._symbol} ".join(map(repr, self.parts))]


@dataclass(frozen=True, eq=False, repr=False)
class Union(_Combination):
    """``parts[0] | parts[1] | ...``: visible if any part admits the pair, counted once.

    Tile codes: FULL if some part is FULL, EMPTY if every part is EMPTY.
    """

    _symbol = "|"
    _op = staticmethod(np.logical_or)

    def _own_classify(self, tiles):
        codes = [p.classify(tiles) for p in self.parts]
        full = np.logical_or.reduce(np.broadcast_arrays(*[c == FULL for c in codes]))
        empty = np.logical_and.reduce(np.broadcast_arrays(*[c == EMPTY for c in codes]))
        return _codes(full, empty)


@dataclass(frozen=True, eq=False, repr=False)
class Intersection(_Combination):
    """``parts[0] & parts[1] & ...``: visible if every part admits the pair.

    Tile codes: the least of the parts' (EMPTY < PARTIAL < FULL).
    """

    _symbol = "&"
    _op = staticmethod(np.logical_and)

    def _own_classify(self, tiles):
        codes = np.broadcast_arrays(*[p.classify(tiles) for p in self.parts])
        return np.minimum.reduce(codes) if len(codes) > 1 else codes[0]


@dataclass(frozen=True, eq=False, repr=False)
class Heads(Pattern):
    """Per-head variation: head ``h`` uses ``parts[h]`` (so ``Hm = len(parts)``).

    Every part must have ``Hm == 1`` (batch variation is allowed and broadcast).
    """

    parts: tuple = ()

    @property
    def _exact_own(self):
        return all(p.exact_classify for p in self.parts)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts:
            raise ParameterError("parts: expected one pattern per head, got none")
        for p in self.parts:
            _check_pattern(p, "Heads")

    def _stack(self, arrays):
        arrays = [_as4(a) for a in arrays]
        for a in arrays:
            if a.shape[1] != 1:
                raise ShapeError(f"parts: expected patterns without head variation inside Heads, "
                                 f"got one with {a.shape[1]} heads")
        bm = max(a.shape[0] for a in arrays)
        return np.concatenate([np.broadcast_to(a, (bm, 1) + a.shape[2:]) for a in arrays], axis=1)

    def _own_keep(self, i, j, sq, sk):
        return self._stack([p.keep(i, j, sq, sk) for p in self.parts])

    def _own_classify(self, tiles):
        return self._stack([p.classify(tiles) for p in self.parts])

    def _own_repr(self):
        return [f"heads=[{', '.join(map(repr, self.parts))}]"]


def _shift_safe(p: Pattern) -> bool:
    """Whether ``p`` and every part of it classify tiles at any position (:class:`SubRect`)."""
    parts = getattr(p, "parts", ()) if isinstance(p, (_Combination, Heads)) else ()
    return type(p)._shift_safe and all(_shift_safe(q) for q in parts)


@dataclass(frozen=True, eq=False, repr=False)
class SubRect(Pattern):
    """Rows ``q0 ..`` and keys ``k0 ..`` of ``parent``'s ``sq x sk`` problem as a pattern of their
    own (:meth:`Pattern.subrect`): local ``(i, j)`` is visible iff ``parent``'s
    ``(q0 + i, k0 + j)`` is. ``keep`` and ``classify`` ask ``parent`` in global coordinates (tiles
    shifted, so block and band classification stay O(tiles)); ``band`` is the parent's with the
    offset ``s + q0 - k0``. The local extent passed to its methods must fit the problem."""

    parent: Pattern = None
    q0: int = 0
    k0: int = 0
    sq: int = 0
    sk: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_pattern(self.parent, "subrect")
        if not _shift_safe(self.parent):
            raise ParameterError(f"pattern: {self.parent!r} classifies tiles only on its own grid "
                                 f"from row 0 and cannot be viewed as a sub-rectangle")

    def _fits(self, sq, sk):
        if self.q0 + sq > self.sq or self.k0 + sk > self.sk:
            raise ShapeError(f"rect: expected rows {self.q0} .. {self.q0 + sq - 1} and keys {self.k0} .. "
                             f"{self.k0 + sk - 1} inside the problem's {self.sq} x {self.sk}, got "
                             f"{sq} rows and {sk} keys")

    def band(self, sq, sk):
        self._fits(sq, sk)
        s, lo, hi = self.parent.band(self.sq, self.sk)
        return s + self.q0 - self.k0, lo, hi

    def diagonal(self, sq, sk):
        return self.band(sq, sk)[0]

    def keep(self, i, j, sq, sk):
        self._fits(sq, sk)
        return self.parent.keep(np.asarray(i, dtype=np.int64) + self.q0,
                                np.asarray(j, dtype=np.int64) + self.k0, self.sq, self.sk)

    def classify(self, tiles: Tiles) -> np.ndarray:
        self._fits(tiles.sq, tiles.sk)
        return self.parent.classify(Tiles(tiles.i0 + self.q0, tiles.i1 + self.q0, tiles.j0 + self.k0,
                                          tiles.j1 + self.k0, self.sq, self.sk))

    @property
    def exact_classify(self) -> bool:
        return self.parent.exact_classify

    def __repr__(self):
        return (f"SubRect({self.parent!r}, rows from {self.q0}, keys from {self.k0} of "
                f"{self.sq} x {self.sk})")


# -- predicates ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Dilated(Pattern):
    """Dilated window: with ``rel = j - (i + s)``, visible iff ``rel % dilation == 0`` and
    ``-left * dilation <= rel <= right * dilation`` (``steps = (left, right)``, ``-1`` =
    unbounded). ``dilation = 1`` is the plain window ``(left, right)``."""

    steps: Tuple[int, int] = (-1, -1)
    dilation: int = 1
    _exact_own = False  # with dilation > 1 a PARTIAL tile may hold no multiple of d

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "dilation", check_int(self.dilation, "dilation", 1))
        if len(self.steps) != 2:
            raise ParameterError(f"steps: expected (left, right), got {self.steps!r}")
        object.__setattr__(self, "steps", tuple(check_int(w, "steps", -1) for w in self.steps))

    def _range(self, sq, sk):
        s = self.diagonal(sq, sk)
        left, right = self.steps
        d = self.dilation
        return s, (None if left < 0 else -left * d), (None if right < 0 else right * d)

    def _own_keep(self, i, j, sq, sk):
        s, lo, hi = self._range(sq, sk)
        rel = j[None, :] - (i[:, None] + s)
        keep = rel % self.dilation == 0
        if lo is not None:
            keep &= rel >= lo
        if hi is not None:
            keep &= rel <= hi
        return keep

    def _own_classify(self, t):
        s, lo, hi = self._range(t.sq, t.sk)
        rel_min = t.j0[None, :] - (t.i1[:, None] + s)
        rel_max = t.j1[None, :] - (t.i0[:, None] + s)
        empty = np.zeros(t.shape, dtype=bool)
        full = np.full(t.shape, self.dilation == 1)
        if lo is not None:
            empty |= rel_max < lo
            full &= rel_min >= lo
        if hi is not None:
            empty |= rel_min > hi
            full &= rel_max <= hi
        if self.dilation > 1:  # no multiple of d in [rel_min, rel_max]
            empty |= (rel_max // self.dilation) * self.dilation < rel_min
        return _codes(full, empty)

    def _own_repr(self):
        return [f"steps={self.steps}", f"dilation={self.dilation}"]


@dataclass(frozen=True, eq=False, repr=False)
class LocalBlocks(Pattern):
    """Same block: visible iff ``j // block == (i + s) // block`` (Sparse Transformer *fixed*, A)."""

    block: int = 1

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "block", check_int(self.block, "block", 1))

    def _own_keep(self, i, j, sq, sk):
        s = self.diagonal(sq, sk)
        return (j[None, :] // self.block) == ((i[:, None] + s) // self.block)

    def _own_classify(self, t):
        s = self.diagonal(t.sq, t.sk)
        qb0, qb1 = (t.i0 + s) // self.block, (t.i1 + s) // self.block
        kb0, kb1 = t.j0 // self.block, t.j1 // self.block
        empty = (qb1[:, None] < kb0[None, :]) | (kb1[None, :] < qb0[:, None])
        full = (qb0 == qb1)[:, None] & (kb0 == kb1)[None, :] & (qb0[:, None] == kb0[None, :])
        return _codes(full, empty)

    def _own_repr(self):
        return [f"block={self.block}"]


class _KeyFlags:
    """Shared tile logic for predicates that depend on one axis only (a flag per position)."""

    @staticmethod
    def classify_axis(flags, lo, hi):
        """For inclusive ranges ``[lo, hi]`` of a ``(..., n)`` flag array: (all set, none set)."""
        c = np.zeros(flags.shape[:-1] + (flags.shape[-1] + 1,), dtype=np.int64)
        c[..., 1:] = np.cumsum(flags, axis=-1)
        lo_c = np.clip(lo, 0, flags.shape[-1])
        hi_c = np.clip(hi + 1, 0, flags.shape[-1])
        n = c[..., hi_c] - c[..., lo_c]
        size = np.maximum(hi - lo + 1, 0)
        inside = hi_c - lo_c
        return (n == size) & (inside == size), n == 0


@dataclass(frozen=True, eq=False, repr=False)
class Summary(Pattern):
    """Summary columns: visible iff ``j % block >= block - c`` (Sparse Transformer *fixed*, B)."""

    block: int = 1
    c: int = 1

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "block", check_int(self.block, "block", 1))
        object.__setattr__(self, "c", check_int(self.c, "c", 0))
        if self.c > self.block:
            raise ParameterError(f"c: expected at most block={self.block} summary columns, got {self.c}")

    def _flags(self, sk):
        return np.arange(sk) % self.block >= self.block - self.c

    def _own_keep(self, i, j, sq, sk):
        return np.broadcast_to((j % self.block >= self.block - self.c)[None, :], (i.size, j.size))

    def _own_classify(self, t):
        full, empty = _KeyFlags.classify_axis(self._flags(t.sk), t.j0, t.j1)
        return np.broadcast_to(_codes(full, empty)[None, :], t.shape)

    def _own_repr(self):
        return [f"block={self.block}", f"c={self.c}"]


@dataclass(frozen=True, eq=False, repr=False)
class Global(Pattern):
    """Global tokens: a row whose position ``i + s`` is global sees every key (``rows=True``); every
    row sees a key ``j`` that is global (``cols=True``).

    ``tokens`` is a 1-d array of positions (ints), or a boolean array ``(S,)`` or ``(Bm, S)`` (one
    row per batch item, Longformer's ``global_attention_mask``) whose length ``S`` must be the key
    length ``Sk``.
    """

    tokens: object = ()
    rows: bool = True
    cols: bool = True

    def __post_init__(self):
        super().__post_init__()
        t = np.asarray(self.tokens)
        if t.dtype == np.bool_:
            if t.ndim not in (1, 2):
                raise ShapeError(f"tokens: expected a boolean (S,) or (B, S) array, got shape "
                                 f"{fmt_shape(t.shape)}")
            t = t.reshape((1,) * (2 - t.ndim) + t.shape)
        else:
            t = t.reshape(-1)
            if t.size and (t.dtype.kind not in "iu" or t.min() < 0):
                raise ParameterError(f"tokens: expected non-negative integer positions or a boolean "
                                     f"mask, got {self.tokens!r}")
            t = np.unique(t.astype(np.int64))
        object.__setattr__(self, "tokens", t)

    def flags(self, n: int) -> np.ndarray:
        """``(Bm, n)`` bool: is position ``p`` (``0 <= p < n``) global?"""
        t = self.tokens
        if t.dtype == np.bool_:
            if t.shape[1] != n:
                raise ShapeError(f"global_mask: expected length {n} (the key length), got "
                                 f"{t.shape[1]}")
            return t
        out = np.zeros((1, n), dtype=bool)
        out[0, t[t < n]] = True
        return out

    def _row_flags(self, i, sq, sk):
        """(Bm, len(i)): is the query at row i (position i + s) global?"""
        s = self.diagonal(sq, sk)
        p = i + s
        if self.tokens.dtype != np.bool_:  # positions: any query position may be global
            return np.isin(p, self.tokens)[None, :]
        f = self.flags(sk)  # a mask covers positions 0..Sk-1
        ok = (p >= 0) & (p < sk)
        return np.where(ok[None, :], f[:, np.clip(p, 0, sk - 1)], False)

    def _own_keep(self, i, j, sq, sk):
        out = np.zeros((1, 1, i.size, j.size), dtype=bool)
        if self.rows:
            out = out | self._row_flags(i, sq, sk)[:, None, :, None]
        if self.cols:
            out = out | self.flags(sk)[:, j][:, None, None, :]
        return out

    def _own_classify(self, t):
        f = self.flags(t.sk)
        bm = max(f.shape[0], 1)
        full = np.zeros((bm,) + t.shape, dtype=bool)
        empty = np.ones_like(full)
        if self.rows:
            rows = self._row_flags(np.arange(t.sq), t.sq, t.sk)   # (Bm, Sq), by row index
            rf, re = _KeyFlags.classify_axis(rows, t.i0, t.i1)
            full |= rf[:, :, None]
            empty &= re[:, :, None]
        if self.cols:
            cf, ce = _KeyFlags.classify_axis(f, t.j0, t.j1)
            full |= cf[:, None, :]
            empty &= ce[:, None, :]
        return _codes(full, empty)[:, None]

    def _own_repr(self):
        t = self.tokens
        what = (f"mask{fmt_shape(t.shape)}" if t.dtype == np.bool_ else
                f"tokens={t.tolist() if t.size <= 8 else f'<{t.size} positions>'}")
        return [what] + (["rows only"] if not self.cols else []) + (["cols only"] if not self.rows else [])


@dataclass(frozen=True, eq=False, repr=False)
class BlockSparse(Pattern):
    """An explicit block layout: pair ``(i, j)`` is visible iff
    ``layout[..., i // block_q, j // block_k]`` (row and column *indices*, not positions).

    ``layout`` is bool ``(nbq, nbk)``, ``(Hm, nbq, nbk)`` or ``(Bm, Hm, nbq, nbk)`` with
    ``nbq = ceil(Sq / block_q)``, ``nbk = ceil(Sk / block_k)`` (the last block may be ragged).
    Tiles are classified from 2-d prefix sums of the layout: O(tiles + blocks), never O(Sq * Sk).
    """

    layout: object = None
    block_q: int = 1
    block_k: int = 1

    def __post_init__(self):
        super().__post_init__()
        lay = np.asarray(self.layout)
        if lay.dtype != np.bool_ or lay.ndim < 2 or lay.ndim > 4:
            raise ParameterError(f"layout: expected a boolean (nbq, nbk), (H, nbq, nbk) or "
                                 f"(B, H, nbq, nbk) array, got dtype {lay.dtype} shape "
                                 f"{fmt_shape(lay.shape)}")
        object.__setattr__(self, "layout", _as4(lay))
        object.__setattr__(self, "block_q", check_int(self.block_q, "block_q", 1))
        object.__setattr__(self, "block_k", check_int(self.block_k, "block_k", 1))
        object.__setattr__(self, "_prefix", _prefix2d(self.layout))

    def _check(self, sq, sk):
        want = (-(-sq // self.block_q), -(-sk // self.block_k))
        if self.layout.shape[2:] != want:
            raise ShapeError(f"layout: expected {want[0]} x {want[1]} blocks for Sq={sq}, Sk={sk} "
                             f"with blocks of {self.block_q} x {self.block_k}, got "
                             f"{self.layout.shape[2]} x {self.layout.shape[3]}")

    def _own_keep(self, i, j, sq, sk):
        self._check(sq, sk)
        return self.layout[:, :, (i // self.block_q)[:, None], (j // self.block_k)[None, :]]

    def _own_classify(self, t):
        self._check(t.sq, t.sk)
        r0, r1 = t.i0 // self.block_q, t.i1 // self.block_q
        c0, c1 = t.j0 // self.block_k, t.j1 // self.block_k
        on = _box_sum(self._prefix, r0[:, None], r1[:, None], c0[None, :], c1[None, :])
        area = (r1 - r0 + 1)[:, None] * (c1 - c0 + 1)[None, :]
        return _codes(on == area, on == 0)

    def count(self, sq: int, sk: int, block: int = 256) -> np.ndarray:
        """Visible pairs per ``(Bm, Hm)`` from the block layout alone (O(blocks))."""
        if not self.exact_classify:
            return super().count(sq, sk, block)
        self._check(sq, sk)
        rows = np.diff(np.minimum(np.arange(self.layout.shape[2] + 1) * self.block_q, sq))
        cols = np.diff(np.minimum(np.arange(self.layout.shape[3] + 1) * self.block_k, sk))
        return np.einsum("bhrc,r,c->bh", self.layout.astype(np.int64), rows, cols)

    def _own_repr(self):
        return [f"layout{fmt_shape(self.layout.shape)}", f"block=({self.block_q}, {self.block_k})"]


@dataclass(frozen=True, eq=False, repr=False)
class RandomKeys(Pattern):
    """Explicit per-row keys: row ``i`` sees the keys ``j`` with ``j // block`` in
    ``table[..., i, :]`` (``block = 1``: key indices; ``block > 1``: key-block indices, NSA's selected
    blocks). A set: a key listed twice is visible once. ``table`` is int ``(Sq, r)``,
    ``(Hm, Sq, r)`` or ``(Bm, Hm, Sq, r)``; see :func:`random_keys` for a seeded table. Tiles are
    classified exactly from the table in O(Sq * r * ceil(block / block_k)), never O(Sq * Sk)."""

    table: object = None
    block: int = 1
    _shift_safe = False  # its tile classification assumes the grid from row 0, key 0

    def __post_init__(self):
        super().__post_init__()
        t = np.asarray(self.table)
        if t.dtype.kind not in "iu" or t.ndim < 2 or t.ndim > 4 or (t.size and t.min() < 0):
            raise ParameterError(f"table: expected non-negative integer key indices (Sq, r), "
                                 f"(H, Sq, r) or (B, H, Sq, r), got dtype {t.dtype} shape "
                                 f"{fmt_shape(t.shape)}")
        object.__setattr__(self, "table", _as4(t).astype(np.int64))
        object.__setattr__(self, "block", check_int(self.block, "block", 1))

    def _check(self, sq, sk):
        t = self.table
        nk = -(-sk // self.block)
        if t.shape[2] != sq or (t.size and t.max() >= nk):
            raise ShapeError(f"table: expected {sq} rows of indices < {nk}, got shape "
                             f"{fmt_shape(t.shape)} with max {t.max() if t.size else None}")

    def _own_keep(self, i, j, sq, sk):
        self._check(sq, sk)
        t = self.table[:, :, i]                              # (Bm, Hm, r_i, r)
        rows = np.zeros(t.shape[:3] + (-(-sk // self.block),), dtype=bool)
        np.put_along_axis(rows, t, True, axis=-1)
        return rows[..., j // self.block]

    def _own_classify(self, tiles):
        self._check(tiles.sq, tiles.sk)
        t = self.table
        bm, hm, sq, r = t.shape
        bq = tiles.i1[0] - tiles.i0[0] + 1 if tiles.i0.size else 1
        bk = tiles.j1[0] - tiles.j0[0] + 1 if tiles.j0.size else 1
        srt = np.sort(t, axis=-1)
        first = np.ones(srt.shape, dtype=bool)
        first[..., 1:] = srt[..., 1:] != srt[..., :-1]       # count each (i, key block) once
        b, h, i, _ = np.nonzero(first)
        kb = srt[first]
        lo = kb * self.block                                  # key range [lo, hi] of the block
        hi = np.minimum(lo + self.block, tiles.sk) - 1
        counts = np.zeros((bm, hm) + tiles.shape, dtype=np.int64)
        t0, t1 = lo // bk, hi // bk
        for m in range(int((t1 - t0).max(initial=0)) + 1):   # the tiles each key range touches
            tj = t0 + m
            ok = tj <= t1
            tjc = np.minimum(tj, tiles.j0.size - 1)
            overlap = np.minimum(hi, tiles.j1[tjc]) - np.maximum(lo, tiles.j0[tjc]) + 1
            np.add.at(counts, (b[ok], h[ok], i[ok] // bq, tj[ok]), overlap[ok])
        sizes = (tiles.i1 - tiles.i0 + 1)[:, None] * (tiles.j1 - tiles.j0 + 1)[None, :]
        return _codes(counts == sizes, counts == 0)

    def _own_repr(self):
        return [f"table{fmt_shape(self.table.shape)}"] + ([f"block={self.block}"] if self.block > 1 else [])


# -- constructors -------------------------------------------------------------------------------
def random_keys(seed: int, sq: int, sk: int, r: int, heads: int = 1) -> np.ndarray:
    """A seeded ``(heads, sq, r)`` table of ``r`` distinct keys per row, drawn uniformly from
    ``range(sk)`` with ``numpy.random.default_rng(seed)`` (row by row, head by head)."""
    if r > sk:
        raise ParameterError(f"r: expected at most Sk={sk} random keys per row, got {r}")
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(sk, size=r, replace=False) for _ in range(sq)])
                     for _ in range(heads)]).reshape(heads, sq, r)


def blocks_from_table(table: np.ndarray, nbk: int) -> np.ndarray:
    """Bool layout ``(..., nbq, nbk)`` from a per-block-row table ``(..., nbq, r)`` of column blocks."""
    table = np.asarray(table)
    out = np.zeros(table.shape[:-1] + (nbk,), dtype=bool)
    np.put_along_axis(out, table.astype(np.int64), True, axis=-1)
    return out


def pattern_fields(p: Pattern) -> dict:
    """The dataclass fields of a pattern (for tests and pictures)."""
    return {f.name: getattr(p, f.name) for f in fields(p)}

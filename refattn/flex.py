"""FlexAttention as a reference input: a ``mask_mod`` as a Pattern, a ``score_mod`` in float64.

PyTorch's ``torch.nn.attention.flex_attention`` describes attention by two callables on index
tensors: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (which pairs are visible) and
``score_mod(score, b, h, q_idx, kv_idx) -> score`` (how a score is modified). This module turns them
into refattn's terms, so the flex description itself is the reference (the ``flex`` variant, and
``refattn compare --flex module:mask_mod[,module:score_mod] --impl ...``):

* :func:`pattern_from_mask_mod` ``(mask_mod, B, H, Sq, Sk)`` evaluates ``mask_mod`` **block by
  block** (``block_size`` x ``block_size`` tiles, 128 by default, as ``create_block_mask``) and keeps
  a :class:`MaskModPattern`: the code of every tile (empty, full, partial) and the element masks of
  the partial tiles only -- never one dense ``B x H x Sq x Sk`` tensor beyond
  :data:`DENSE_LIMIT` elements (2**24, 16 MiB of booleans; below it the whole mask is evaluated at
  once). Memory: ``B * H * ceil(Sq/bs) * ceil(Sk/bs)`` codes plus ``bs**2`` booleans per partial tile
  (stored once when the mask does not depend on ``b`` or ``h``).
* :func:`score_mod_scores` evaluates ``score_mod`` in float64 through torch on the CPU, on the
  scores ``scale * q·k`` (dense, at most :data:`DENSE_LIMIT` elements), together with its
  derivative ``d score_mod / d score`` (autograd), which the ``flex`` variant's backward needs.

Both callables are evaluated the way ``create_block_mask`` calls them: on broadcast index tensors
``b (B, 1, 1, 1)``, ``h (1, H, 1, 1)``, ``q_idx (1, 1, r, 1)``, ``kv_idx (1, 1, 1, c)`` (int64) --
and, when a callable does not broadcast (Python control flow on a value), through ``torch.vmap``
over the four indices, as torch does. Needs torch (the ``peers`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import BackendUnavailable, ParameterError, ShapeError, fmt_shape
from .patterns import EMPTY, FULL, PARTIAL, Pattern, _box_sum, _codes, _prefix2d
from .validate import check_int

__all__ = ["DENSE_LIMIT", "MaskModPattern", "pattern_from_mask_mod", "score_mod_scores", "resolve"]

#: the largest number of elements (B * H * Sq * Sk) evaluated as one dense tensor
DENSE_LIMIT = 1 << 24


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"refattn.flex: needs torch, the 'peers' extra: pip install "
                                 f"'refattn[peers]' ({exc})") from None
    return torch


def resolve(fn, name: str) -> Optional[Callable]:
    """A callable, or ``"module:function"`` loaded (:func:`refattn.impl.load`), or None."""
    if fn is None or callable(fn):
        return fn
    if isinstance(fn, str):
        from .impl import load
        try:
            return load(fn)
        except ParameterError as exc:
            raise ParameterError(f"{name}:" + str(exc).split(":", 1)[1]) from None
    raise ParameterError(f"{name}: expected a callable or 'module:function', got {type(fn).__name__}")


def _indices(torch, b, h, rows, cols):
    return (torch.arange(b).view(b, 1, 1, 1), torch.arange(h).view(1, h, 1, 1),
            torch.as_tensor(rows).view(1, 1, -1, 1), torch.as_tensor(cols).view(1, 1, 1, -1))


def _call(fn, name, torch, args, shape):
    """``fn(*args)`` broadcast to ``shape``; through ``torch.vmap`` when it does not broadcast."""
    try:
        out = fn(*args)
        out = torch.as_tensor(out)
        return torch.broadcast_to(out, shape)
    except Exception:  # noqa: BLE001 -- a mod written for scalars: evaluate it as torch does
        pass
    lead = args[:-4]
    b, h, i, j = (a.reshape(-1) for a in args[-4:])
    f = fn
    if lead:  # score_mod: the score is indexed with the four indices
        score = lead[0]
        f = lambda bb, hh, ii, jj: fn(score[bb, hh, ii, jj], bb, hh, ii, jj)  # noqa: E731
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        f = torch.vmap(f, in_dims=dims)
    try:
        return torch.broadcast_to(torch.as_tensor(f(b, h, i, j)), shape)
    except Exception as exc:  # noqa: BLE001
        raise ParameterError(f"{name}: could not be evaluated on index tensors (broadcast or vmap): "
                             f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True, eq=False, repr=False)
class MaskModPattern(Pattern):
    """A mask_mod evaluated tile by tile: ``codes (Bm, Hm, nbq, nbk)`` (EMPTY/FULL/PARTIAL),
    ``index`` (same shape, the partial tile's row in ``masks``, -1 elsewhere) and ``masks (n, bs, bs)``
    for the partial tiles (False beyond ``Sq``/``Sk``). Built by :func:`pattern_from_mask_mod`; valid
    for exactly its ``(sq, sk)``."""

    codes: object = None
    index: object = None
    masks: object = None
    block: int = 128
    sq: int = 0
    sk: int = 0
    name: str = "mask_mod"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "_full", _prefix2d(self.codes == FULL))
        object.__setattr__(self, "_empty", _prefix2d(self.codes == EMPTY))

    def _check(self, sq, sk):
        if (sq, sk) != (self.sq, self.sk):
            raise ShapeError(f"mask_mod: the pattern was evaluated for Sq={self.sq}, Sk={self.sk}, used "
                             f"with Sq={sq}, Sk={sk}")

    def _own_keep(self, i, j, sq, sk):
        self._check(sq, sk)
        bs = self.block
        ti, tj = (i // bs)[:, None], (j // bs)[None, :]
        code = self.codes[:, :, ti, tj]
        idx = self.index[:, :, ti, tj]
        part = self.masks[np.maximum(idx, 0), (i % bs)[:, None], (j % bs)[None, :]] if self.masks.size else False
        return (code == FULL) | ((code == PARTIAL) & part)

    def _own_classify(self, t):
        self._check(t.sq, t.sk)
        bs = self.block
        r0, r1 = (t.i0 // bs)[:, None], (t.i1 // bs)[:, None]
        c0, c1 = (t.j0 // bs)[None, :], (t.j1 // bs)[None, :]
        area = (r1 - r0 + 1) * (c1 - c0 + 1)
        return _codes(_box_sum(self._full, r0, r1, c0, c1) == area,
                      _box_sum(self._empty, r0, r1, c0, c1) == area)

    _exact_own = False  # exact only on its own grid; other grids are refined element-wise

    def _own_repr(self):
        n = int((self.codes == PARTIAL).sum())
        return [self.name, f"tiles{fmt_shape(self.codes.shape)} of {self.block}", f"{n} partial"]


def pattern_from_mask_mod(mask_mod, B, H, Sq, Sk, *, block_size: int = 128,
                          dense_limit: int = DENSE_LIMIT) -> MaskModPattern:
    """``mask_mod`` as a :class:`MaskModPattern` for ``B`` batch entries, ``H`` heads, ``Sq`` queries
    and ``Sk`` keys (module docstring). ``mask_mod`` is a callable or ``"module:function"``; True =
    visible. At most ``block_size**2 * B * H`` elements are evaluated at a time once
    ``B * H * Sq * Sk`` exceeds ``dense_limit``."""
    torch = _torch()
    fn = resolve(mask_mod, "mask_mod")
    if fn is None:
        raise ParameterError("mask_mod: expected a callable or 'module:function', got None")
    b, h = check_int(B, "B", 1), check_int(H, "H", 1)
    sq, sk = check_int(Sq, "Sq", 1), check_int(Sk, "Sk", 1)
    bs = check_int(block_size, "block_size", 1)
    limit = check_int(dense_limit, "dense_limit", 1)
    nbq, nbk = -(-sq // bs), -(-sk // bs)
    codes = np.empty((b, h, nbq, nbk), dtype=np.int8)
    masks, index = [], np.full((b, h, nbq, nbk), -1, dtype=np.int32)
    name = getattr(fn, "__name__", "mask_mod")

    def tile_masks(rows, cols):
        with torch.no_grad():
            out = _call(fn, "mask_mod", torch, _indices(torch, b, h, rows, cols), (b, h, len(rows), len(cols)))
        if out.dtype != torch.bool:
            raise ParameterError(f"mask_mod: expected a boolean result (True = visible), got {out.dtype}")
        return out.numpy()

    whole = tile_masks(np.arange(sq), np.arange(sk)) if b * h * sq * sk <= limit else None
    for ti in range(nbq):
        rows = np.arange(ti * bs, min(sq, (ti + 1) * bs))
        band = whole[:, :, rows] if whole is not None else None
        for tj in range(nbk):
            cols = np.arange(tj * bs, min(sk, (tj + 1) * bs))
            m = band[..., cols] if band is not None else tile_masks(rows, cols)
            n_on = m.sum(axis=(2, 3))
            codes[:, :, ti, tj] = _codes(n_on == m.shape[2] * m.shape[3], n_on == 0)
            for bb, hh in zip(*np.nonzero(codes[:, :, ti, tj] == PARTIAL)):
                tile = np.zeros((bs, bs), dtype=bool)
                tile[:m.shape[2], :m.shape[3]] = m[bb, hh]
                index[bb, hh, ti, tj] = len(masks)
                masks.append(tile)
    stacked = np.array(masks, dtype=bool).reshape(-1, bs, bs)
    codes, index, stacked = _shrink(codes, index, stacked)
    return MaskModPattern(codes=codes, index=index, masks=stacked, block=bs, sq=sq, sk=sk, name=name)


def _shrink(codes, index, masks):
    """Drop the batch/head axes when the mask does not depend on them (one copy of each tile)."""
    for axis in (0, 1):
        if codes.shape[axis] == 1:
            continue
        first = np.take(codes, [0], axis=axis)
        if not (codes == first).all():
            continue
        fi = np.take(index, [0], axis=axis)
        b0 = np.moveaxis(fi, axis, 0)[0]
        ok = all(np.array_equal(masks[a[a >= 0]], masks[b0[a >= 0]]) for a in np.moveaxis(index, axis, 0))
        if ok:
            codes, index = first, fi
    used = np.unique(index[index >= 0])
    remap = np.full(max(len(masks), 1), -1, dtype=np.int32)
    remap[used] = np.arange(used.size)
    index = np.where(index >= 0, remap[np.maximum(index, 0)], -1).astype(np.int32)
    return codes, index, masks[used]


def score_mod_scores(score_mod, scores: np.ndarray, *, dense_limit: int = DENSE_LIMIT):
    """``(modified, derivative)``: ``score_mod`` applied to ``scores (B, H, Sq, Sk)`` in float64 with
    torch on the CPU, and ``d modified / d score`` elementwise (autograd). Errors when the scores
    exceed ``dense_limit`` elements (the evaluation is dense)."""
    torch = _torch()
    fn = resolve(score_mod, "score_mod")
    n = int(np.prod(scores.shape))
    if n > dense_limit:
        raise ParameterError(f"score_mod: evaluated densely on B*H*Sq*Sk = {n} scores, more than the "
                             f"limit {dense_limit} (refattn.flex.DENSE_LIMIT)")
    b, h, sq, sk = scores.shape
    s = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = _call(fn, "score_mod", torch, (s,) + _indices(torch, b, h, np.arange(sq), np.arange(sk)),
                    (b, h, sq, sk))
        if not out.is_floating_point():
            raise ParameterError(f"score_mod: expected a floating score, got {out.dtype}")
        out = out.to(torch.float64)
        grad = torch.autograd.grad(out.sum(), s, allow_unused=True)[0] if out.requires_grad else None
    d = np.zeros(scores.shape) if grad is None else grad.detach().numpy()
    return out.detach().numpy(), d

"""Longformer attention with Hugging Face semantics (VARIANTS sections D and H).

* Local part: query ``i`` sees keys ``j = i + s + t * dilation`` for ``|t| <= w``, with ``w`` the
  one-sided window: ``attention_window // 2`` (HF: ``attention_window`` is the *total* span and must be
  even) or ``attention_window`` itself with ``one_sided=True`` (the paper's ``w``). ``dilation`` may be
  one value per query head.
* Global tokens (``global_mask`` ``(B, S)`` / ``(S,)`` bool, or ``global_tokens`` positions; the mask
  wins when both are given): every row sees every global key -- **once**: a global key inside the
  window is not counted twice (HF removes it from the window and keeps it as a global column) -- and
  a global row sees every key.
* Projections: global rows are computed from ``q_global``, ``k_global``, ``v_global`` (HF's
  ``query_global``/``key_global``/``value_global`` outputs, same shapes as ``q, k, v``) over all keys;
  the other rows use ``q, k, v`` (global columns included). Without them, ``q, k, v`` serve both.
* Scores: ``scale * q.k`` with ``scale = 1/sqrt(D)`` (HF divides the query by ``sqrt(D)``).

HF computes the softmax in float32 (VARIANTS H); refattn in float64. HF pads the sequence to a
multiple of ``attention_window`` with masked tokens; the pattern needs no padding (same attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from ...patterns import Dilated, Global, Heads
from .. import Variant, param_field, register
from ..core import CoreParams, check_dout, finish, prepare, to_layout
from . import (COMMON, PATTERNS, SPARSE_DROP, _per_head, _posint, _shape, attend_pattern,
                     sparse_example, with_core)


@dataclass(frozen=True)
class LongformerParams(CoreParams):
    attention_window: int = param_field(64, "HF's total window span (even): one-sided w = "
                                            "attention_window // 2; with one_sided=True, w itself")
    one_sided: bool = param_field(False, "attention_window is the one-sided w (the paper's form)")
    dilation: Any = param_field(1, "dilation of the window, or one value per query head")
    global_mask: Any = param_field(None, "bool (B, S) or (S,): True = global token (HF's "
                                         "global_attention_mask); overrides global_tokens")
    global_tokens: Any = param_field((0,), "global positions when global_mask is None; () = none")
    q_global: Any = param_field(None, "queries of the global rows (q's shape); default q")
    k_global: Any = param_field(None, "keys for the global rows (k's shape); default k")
    v_global: Any = param_field(None, "values for the global rows (v's shape); default v")


def one_sided(p: LongformerParams) -> int:
    w = _posint(p.attention_window, "attention_window", 0)
    if p.one_sided:
        return w
    if w % 2:
        raise ParameterError(f"attention_window: expected an even total span (HF), got {w}; "
                             f"pass one_sided=True for the one-sided w")
    return w // 2


def _global_pattern(pre, p, rows, cols):
    b, _, _, sk = _shape(pre)
    if p.global_mask is not None:
        g = np.asarray(V.to_numpy(p.global_mask, "global_mask"))
        if g.dtype != np.bool_ or g.ndim not in (1, 2) or g.shape[-1] != sk or (
                g.ndim == 2 and g.shape[0] not in (1, b)):
            raise ShapeError(f"global_mask: expected bool ({b}, {sk}) or ({sk},), got "
                             f"{g.dtype} {fmt_shape(g.shape)}")
    else:
        g = np.asarray(() if p.global_tokens is None else p.global_tokens).reshape(-1)
        if g.size and (g.dtype.kind not in "iu" or g.min() < 0 or g.max() >= sk):
            raise ParameterError(f"global_tokens: expected integer positions in [0, {sk}), got "
                                 f"{p.global_tokens!r}")
        g = g.astype(np.int64)
    return Global(tokens=g, rows=rows, cols=cols, alignment=pre.pattern.alignment)


def local_pattern(pre, p):
    w = one_sided(p)
    al = pre.pattern.alignment
    d = _per_head(p.dilation, "dilation", _shape(pre)[1])
    if isinstance(d, list):
        return Heads(parts=tuple(Dilated(steps=(w, w), dilation=x, alignment=al) for x in d), alignment=al)
    return Dilated(steps=(w, w), dilation=d, alignment=al)


def _projections(pre, p):
    """``(qg, kg, vg)`` in bhsd, or None when none was given."""
    given = [getattr(p, n) is not None for n in ("q_global", "k_global", "v_global")]
    if not any(given):
        return None
    out = []
    for name, ref in (("q_global", pre.q), ("k_global", pre.k), ("v_global", pre.v)):
        a = getattr(p, name)
        if a is None:
            out.append(ref)
            continue
        a = V.as_compute(a, name, p.compute_dtype)
        V.check_rank4(a, name, p.layout)
        a = np.ascontiguousarray(to_layout(a, p))
        if a.shape != ref.shape:
            raise ShapeError(f"{name}: expected the shape of {name[0]} "
                             f"{fmt_shape(to_layout(ref, p).shape)}, got {fmt_shape(to_layout(a, p).shape)}")
        if not np.all(np.isfinite(a)):
            raise ParameterError(f"{name}: expected finite values")
        out.append(a)
    return tuple(out)


def _plan(backend, arrays, p):
    """``(pre, parts)``: parts is ``[(pattern, (q, k, v) or None, row_select or None)]``."""
    pre = prepare(backend, arrays, p)
    b, hq, sq, sk = _shape(pre)
    local = local_pattern(pre, p)
    proj = _projections(pre, p)
    if proj is None:
        every = local | _global_pattern(pre, p, rows=True, cols=True)
        return pre, [(with_core(pre.pattern, every), None, None)]
    grows = _global_pattern(pre, p, rows=True, cols=False)
    is_global = grows._row_flags(np.arange(sq), sq, sk)[:, None, :, None]   # (Bm, 1, Sq, 1)
    return pre, [(with_core(pre.pattern, local | _global_pattern(pre, p, rows=False, cols=True)),
                  None, ~is_global),
                 (with_core(pre.pattern, grows), proj, is_global)]


def _forward(backend, arrays, p):
    pre, parts = _plan(backend, arrays, p)
    out = lse = None
    for pattern, qkv, rows in parts:
        o, l = attend_pattern(backend, pre, pattern, *(qkv or ()))
        o, l = backend.to_numpy(o), backend.to_numpy(l)
        if rows is None:
            out, lse = o, l
        else:
            out = np.where(rows, o, 0.0 if out is None else out)
            lse = np.where(rows[..., 0], l, -np.inf if lse is None else lse)
    return finish(out, lse, p)


def _backward(backend, arrays, dout, p):
    """Each part's gradient with ``dout`` restricted to its rows; the global projections'
    gradients come back in ``extras`` (``q_global``, ``k_global``, ``v_global``)."""
    pre, parts = _plan(backend, arrays, p)
    dout = check_dout(dout, pre, p)
    grads, extras = [0.0, 0.0, 0.0], {}
    for n, (pattern, qkv, rows) in enumerate(parts):
        q, k, v = qkv or (pre.q, pre.k, pre.v)
        kw = {**pre.primitive_kwargs(), "pattern": pattern}
        o, l = backend.attend(q, k, v, **kw)
        d = dout if rows is None else np.where(rows, dout, 0.0)
        *g, ex = backend.attend_backward(q, k, v, o, l, d, **kw)
        g = [backend.to_numpy(x) for x in g]
        if n == 0:
            grads = g
            extras.update({k_: backend.to_numpy(x) for k_, x in ex.items()})
        else:
            for name, x in zip(("q_global", "k_global", "v_global"), g):
                extras[name] = to_layout(x, p)
            for k_, x in ex.items():
                extras[k_] = extras.get(k_, 0.0) + backend.to_numpy(x)
    if "bias" in extras:
        extras["bias"] = extras["bias"].reshape(np.shape(p.bias))
    return (*[to_layout(g, p) for g in grads], extras)


def _pattern(backend, arrays, p):
    parts = [pattern for pattern, _, _ in _plan(backend, arrays, p)[1]]
    return parts[0] if len(parts) == 1 else parts[0] | parts[1]


PATTERNS["longformer"] = _pattern

register(Variant(
    name="longformer",
    doc="Longformer with HF semantics: sliding window of one-sided w = attention_window // 2 (or "
    "one_sided=True), optional per-head dilation, global tokens from global_mask (B, S) with "
    "separate q_global/k_global/v_global for the global rows; a global key inside the window "
    "counts once.",
    citation="Beltagy et al., Longformer: The Long-Document Transformer, 2020; HF transformers "
    "LongformerSelfAttention", params=LongformerParams, forward=_forward, backward=_backward,
    example=sparse_example((1, 4, 512, 512, 32, 4)), default_shape=(1, 4, 512, 512, 32, 4),
    drop=SPARSE_DROP, **COMMON))

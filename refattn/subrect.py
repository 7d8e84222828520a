"""Attend a sub-rectangle of a larger problem in global coordinates: the ``rect=`` parameter.

A call with ``rect=(q0, k0, Sq, Sk)`` computes the partial attention state ``(out, lse)`` of its
query rows (global rows ``q0 .. q0 + rows - 1``) over its keys (global keys ``k0 .. k0 + keys - 1``)
*exactly as the whole ``Sq x Sk`` problem sees those pairs*, so that the states of a row's key
chunks merged with ``merge_states`` equal the whole problem's row (``refattn.distributed`` runs one
such call per (query chunk, KV chunk) task)::

    out_r, lse_r = refattn.attention(q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], variant="sdpa",
                                     causal=True, rect=(a, c, Sq, Sk), return_lse=True)

What sees global positions:

* the causal/window band: its diagonal offset is the whole problem's ``s`` (``Sk - Sq``
  bottom-right, 0 top-left), so a local pair ``(i, j)`` is tested as ``(q0 + i, k0 + j)``
  (:meth:`refattn.patterns.Pattern.subrect`; the local band offset is ``s + q0 - k0``);
* ALiBi: ``-slope * |(q0 + i) + s - (k0 + j)|``, the same offset;
* Pattern tiles (BigBird's blocks, ``block_sparse``'s layout): the variant builds the whole
  problem's pattern and attends its sub-rectangle view;
* Philox dropout: the counter of local ``(i, j)`` is ``(q0 + i) * Sk + (k0 + j)``, the whole
  problem's ``i * Sk + j``, in the stream ``b * Hq + h`` (batch and heads are never split).

Conventions and what is refused (a :class:`~refattn.errors.ParameterError` naming the knob):

* ``sinks``: a sink enters the denominator once per row, so it is applied once after the last
  merge (``out *= 1 / (1 + exp(sink - lse))``), never per rectangle;
* ``empty_row="nan"`` and ``lse_base=2``: a state is ``(0, -inf)`` when empty and in natural log,
  as ``merge_states`` needs; apply them after the merge;
* ``alibi_form="flash"`` (``+slope * j``, which would need the global key index in the LSE);
* ``mask``, ``bias``, ``dropout_mask``: whole ``Sq x Sk`` arrays (use a Pattern variant, e.g.
  ``block_sparse`` with a ``block_mask``);
* variants that do not declare ``subrect`` (see :class:`refattn.variants.Variant`): ``rect`` is not
  one of their parameters. Declared: sdpa, mha, mqa, gqa, sliding_window (local), bigbird and
  block_sparse with an explicit ``block_mask`` (its data-dependent selections need the whole q, k).

Backward: ``attention_backward(..., rect=Rect(q0, k0, Sq, Sk, out=O, lse=L))`` gives the rectangle's
share of the gradients -- dq for its rows (sum over the row's key chunks), dk and dv for its keys
(sum over the query chunks). ``P = exp(S - L)`` and ``delta = rowsum(dout * O)`` need the *whole*
problem's output ``O`` and normaliser ``L`` on the rectangle's rows (with sinks: ``O`` after the
sink factor and ``L = logaddexp(lse, sink)``; the sinks' own gradient is the caller's:
``-sum exp(sink - L) * delta``), so ``out`` and ``lse`` are required there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import ParameterError, ShapeError, fmt_shape
from .validate import check_int

#: the knobs a sub-rectangle refuses, with the reason (module docstring)
REFUSED = {
    "sinks": "a sink is applied once per row after the states are merged "
             "(out *= 1 / (1 + exp(sink - lse))), never per rectangle",
    "mask": "an Sq x Sk array; use a Pattern variant (block_sparse with block_mask)",
    "bias": "an Sq x Sk array; use a Pattern variant (block_sparse with block_mask)",
    "dropout_mask": "an Sq x Sk array; use dropout_seed (its Philox counter is global)",
}


@dataclass(frozen=True)
class Rect:
    """Where a call's rows and keys sit in the whole problem (module docstring).

    ``q0``, ``k0``: global index of the call's first query row and first key; ``sq``, ``sk``: the
    whole problem's query and key lengths. ``out`` and ``lse`` (backward only): the whole
    problem's output and normaliser on the call's rows, ``out`` in the call's layout.
    """

    q0: int
    k0: int
    sq: int
    sk: int
    out: Optional[np.ndarray] = None
    lse: Optional[np.ndarray] = None

    @classmethod
    def of(cls, value) -> "Rect":
        """A :class:`Rect` from itself or a ``(q0, k0, Sq, Sk)`` tuple, with its integers checked."""
        if isinstance(value, Rect):
            r = value
        else:
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 4:
                raise ParameterError(f"rect: expected (q0, k0, Sq, Sk) or a refattn.subrect.Rect, "
                                     f"got {value!r}")
            r = cls(*value)
        return cls(check_int(r.q0, "rect q0", 0), check_int(r.k0, "rect k0", 0),
                   check_int(r.sq, "rect Sq", 1), check_int(r.sk, "rect Sk", 1), r.out, r.lse)

    def check(self, sq: int, sk: int) -> "Rect":
        """The call's ``sq`` rows and ``sk`` keys must lie inside the problem."""
        if self.q0 + sq > self.sq or self.k0 + sk > self.sk:
            raise ShapeError(f"rect: expected rows {self.q0} .. {self.q0 + sq - 1} and keys "
                             f"{self.k0} .. {self.k0 + sk - 1} inside the problem's {self.sq} x "
                             f"{self.sk}, got {sq} rows and {sk} keys from ({self.q0}, {self.k0})")
        return self

    def state(self, out_shape: tuple, lse_shape: tuple):
        """``(out, lse)`` for the backward, checked against the shapes the call's rows need."""
        if self.out is None or self.lse is None:
            raise ParameterError("rect: the backward of a sub-rectangle needs rect.out and rect.lse, "
                                 "the whole problem's output and normaliser on its rows, got "
                                 f"{'no out' if self.out is None else 'out'} and "
                                 f"{'no lse' if self.lse is None else 'lse'}")
        out, lse = np.asarray(self.out), np.asarray(self.lse, dtype=np.float64)
        for name, a, want in (("rect.out", out, out_shape), ("rect.lse", lse, lse_shape)):
            if a.shape != tuple(want):
                raise ShapeError(f"{name}: expected {fmt_shape(want)} (the call's rows), got "
                                 f"{fmt_shape(a.shape)}")
        return out, lse


def refuse(params, extra: dict = ()) -> None:
    """Raise for every knob of ``params`` (a parsed core dataclass) a sub-rectangle refuses."""
    for name, why in {**REFUSED, **dict(extra)}.items():
        if getattr(params, name, None) is not None:
            raise ParameterError(f"{name}: not supported on a sub-rectangle (rect=): {why}")
    if getattr(params, "empty_row", "zero") != "zero":
        raise ParameterError("empty_row: expected 'zero' on a sub-rectangle (rect=): an empty state "
                             "is (0, -inf) for merge_states; apply 'nan' after the merge")
    if getattr(params, "lse_base", None) in (2, "2"):
        raise ParameterError(f"lse_base: expected e on a sub-rectangle (rect=): merge_states works in "
                             f"natural log; divide by ln 2 after the merge, got {params.lse_base!r}")
    if getattr(params, "alibi_form", "symmetric") != "symmetric":
        raise ParameterError("alibi_form: expected 'symmetric' on a sub-rectangle (rect=): 'flash' "
                             "adds +slope * j, whose LSE depends on the global key index")

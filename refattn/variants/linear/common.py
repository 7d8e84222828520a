"""What every scan-based variant of the family shares: the parameters of the scan, input checks
in one place, and the call of the backend's ``linear_scan`` (forward and adjoint).

Arrays are checked here and nowhere else: rank and agreement of ``q, k, v``, per-step arrays
(gates, ``beta``) against them, finiteness, the gate's range, the state's shape. Every message
starts with the argument's name and says what was expected and what came.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from .. import param_field

#: evaluation orders of the scan (Backend.linear_scan)
FORMS = ("recurrent", "chunked", "parallel")
LAYOUTS = ("bhsd", "bshd")


@dataclass(frozen=True)
class ScanParams:
    """Knobs of every variant built on ``linear_scan``."""

    scale: Optional[float] = param_field(None, "o_t = scale * S_t^T q_t; default 1/sqrt(Dk)")
    form: str = param_field("recurrent", "'recurrent' (the definition, step by step), 'chunked' "
                            "(chunks of chunk_size steps) or 'parallel' (the masked-attention "
                            "form, O(L^2)); all equal to float64 rounding")
    chunk_size: int = param_field(64, "steps per chunk of form='chunked', and the backward's "
                                  "checkpoint interval")
    initial_state: Any = param_field(None, "(B, H, Dk, Dv) state before the first step (fla "
                                     "layout: keys x values); default zeros")
    return_final_state: bool = param_field(False, "also return the state after the last step, "
                                           "(B, H, Dk, Dv)")
    layout: str = param_field("bhsd", "'bhsd' (B, H, L, D) or 'bshd' (B, L, H, D), fla's, for q, "
                              "k, v, the per-step gates and beta, and the output")


def check_scan_params(p) -> int:
    """The scan's knobs (form, chunk_size, layout, return_final_state); returns chunk_size."""
    V.check_choice(p.form, "form", FORMS)
    V.check_choice(p.layout, "layout", LAYOUTS)
    V.check_bool(p.return_final_state, "return_final_state")
    return V.check_int(p.chunk_size, "chunk_size", 1)


def finite(a: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(a)):
        raise ParameterError(f"{name}: expected finite values, got {int(np.sum(~np.isfinite(a)))} "
                             f"NaN/Inf entries")
    return a


def array(x, name: str, ndim: int, what: str) -> np.ndarray:
    """``x`` as a finite float64 copy of rank ``ndim`` (``what`` names the dims for messages)."""
    a = V.as_compute(x, name)
    if a.ndim != ndim:
        raise ShapeError(f"{name}: expected rank {ndim} {what}, got shape {fmt_shape(a.shape)}")
    return finite(a, name)


def to_bhsd(a: np.ndarray, layout: str) -> np.ndarray:
    """A per-step array (rank >= 3) from the caller's layout to ``(B, H, L, ...)``."""
    return np.ascontiguousarray(a.swapaxes(1, 2)) if layout == "bshd" else a


def to_caller(a: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(a.swapaxes(1, 2)) if layout == "bshd" else a


def qkv(arrays: dict, p, names=("q", "k", "v")) -> tuple:
    """``q, k, v`` as finite float64 ``(B, H, L, D)`` arrays (from ``p.layout``), checked to agree:
    the same batch, heads and length, and the key dim of ``q`` and ``k``."""
    order = "(B, H, L, D)" if p.layout == "bhsd" else "(B, L, H, D)"
    out = []
    for n in names:
        a = array(arrays[n], n, 4, f"{order} in layout {p.layout!r}")
        out.append(to_bhsd(a, p.layout))
    q, k, v = out
    b, h, n, d = q.shape
    for name, a in (("k", k), ("v", v)):
        if a.shape[:3] != (b, h, n):
            raise ShapeError(f"{name}: expected batch, heads and length {(b, h, n)} as q (bhsd), "
                             f"got {a.shape[:3]} (shape {fmt_shape(np.shape(arrays[name]))} in "
                             f"layout {p.layout!r})")
    if k.shape[3] != d:
        raise ShapeError(f"k: expected key dim {d} as q, got {k.shape[3]}")
    for name, a in (("q", q), ("v", v)):
        if a.shape[3] == 0:
            raise ShapeError(f"{name}: expected a non-empty head dim, got shape "
                             f"{fmt_shape(np.shape(arrays[name]))}")
    return q, k, v


def per_step(x, name: str, p, q: np.ndarray, per_dim: bool) -> np.ndarray:
    """A per-step array (gate or beta): ``(B, H, L)`` or, with ``per_dim``, ``(B, H, L, Dk)`` in
    ``bhsd`` (``(B, L, H[, Dk])`` with ``layout="bshd"``), finite, float64, returned in bhsd."""
    b, h, n, d = q.shape
    want = (b, h, n) + ((d,) if per_dim else ())
    if p.layout == "bshd":
        want_caller = (b, n, h) + want[3:]
    else:
        want_caller = want
    a = V.as_compute(x, name)
    if a.shape != want_caller:
        dims = ("(B, H, L" if p.layout == "bhsd" else "(B, L, H") + (", Dk)" if per_dim else ")")
        raise ShapeError(f"{name}: expected shape {fmt_shape(want_caller)} {dims} in layout "
                         f"{p.layout!r}, got {fmt_shape(a.shape)}")
    return to_bhsd(finite(a, name), p.layout)


def log_gate(x, name: str, p, q, per_dim: bool) -> np.ndarray:
    """A log-gate ``g = log(alpha)``: finite and ``<= 0`` (``alpha = exp(g)`` in ``(0, 1]``)."""
    g = per_step(x, name, p, q, per_dim)
    if g.size and g.max() > 0:
        where = np.unravel_index(int(np.argmax(g)), g.shape)
        raise ParameterError(f"{name}: expected log-gates <= 0 (alpha = exp({name}) in (0, 1]), got "
                             f"{g.max():.6g} at (b, h, t{', c' if per_dim else ''}) = "
                             f"{tuple(int(i) for i in where)}")
    return g


def unit_interval_beta(x, p, q, high: float = 2.0) -> np.ndarray:
    """The delta rule's write strength ``beta``, in ``[0, high]``."""
    beta = per_step(x, "beta", p, q, per_dim=False)
    if beta.size and (beta.min() < 0 or beta.max() > high):
        raise ParameterError(f"beta: expected values in [0, {high:g}] (fla: sigmoid, or twice it "
                             f"with allow_neg_eigval), got values in [{beta.min():.6g}, "
                             f"{beta.max():.6g}]")
    return beta


def state(x, name: str, shape: tuple, what: str = "(B, H, Dk, Dv)") -> Optional[np.ndarray]:
    """An optional state array of exactly ``shape``."""
    if x is None:
        return None
    a = V.as_compute(x, name)
    if a.shape != tuple(shape):
        raise ShapeError(f"{name}: expected shape {fmt_shape(shape)} {what}, got {fmt_shape(a.shape)}")
    return finite(a, name)


def caller_shape(shape_bhsd, layout: str) -> tuple:
    """A ``(B, H, L, ...)`` shape as the caller sees it in ``layout``."""
    s = tuple(shape_bhsd)
    return (s[0], s[2], s[1]) + s[3:] if layout == "bshd" else s


def dout_for(dout, out_shape_bhsd: tuple, layout: str) -> np.ndarray:
    """The upstream gradient, checked against the output's shape (in the caller's layout), in bhsd."""
    want = caller_shape(out_shape_bhsd, layout)
    d = V.as_compute(dout, "dout")
    if d.shape != want:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(want)}, got "
                         f"{fmt_shape(d.shape)}")
    return to_bhsd(finite(d, "dout"), layout)


def l2norm(x: np.ndarray, eps: float = 1e-6) -> tuple:
    """fla's ``l2norm``: ``x / sqrt(sum x^2 + eps)`` along the last axis; returns ``(y, rstd)``."""
    rstd = 1.0 / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)
    return x * rstd, rstd


def l2norm_backward(dy: np.ndarray, y: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    """``dx`` of :func:`l2norm`: ``rstd * (dy - y * sum(dy * y))``."""
    return rstd * (dy - y * np.sum(dy * y, axis=-1, keepdims=True))


def example_qkv(shape, rng, params, unit_keys: bool = False) -> dict:
    """Random ``q, k, v`` for ``(B, Hq, Sq, Sk, D, Hkv)``: B = B, H = Hq, L = Sq, Dk = Dv = D (Sk
    and Hkv do not apply to a recurrence), in the layout of ``params``."""
    b, h, n, _, d, _ = shape
    q, k, v = (rng.standard_normal((b, h, n, d)) for _ in range(3))
    if unit_keys:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    arrays = {"q": q, "k": k, "v": v}
    if getattr(params, "layout", "bhsd") == "bshd":
        arrays = {n_: np.ascontiguousarray(a.swapaxes(1, 2)) for n_, a in arrays.items()}
    return arrays


def in_layout(a: np.ndarray, params) -> np.ndarray:
    """An example's per-step array (made in bhsd) in the layout of ``params``."""
    return to_caller(a, getattr(params, "layout", "bhsd"))

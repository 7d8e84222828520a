"""``mamba2``: Mamba-2's SSD (state space duality) with Mamba-2's layouts, on ``linear_scan``.

Per batch entry and head ``h`` (head dim ``P``, state ``N``, group ``g(h) = h // (H / G)``)::

    dt    = softplus(dt_raw + dt_bias)        (softplus and the bias only when asked)
    h_t   = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T         (P x N; A scalar per head)
    y_t   = h_t C_t + D_h x_t                               (D per head, or per head and P)
    out   = y * silu(z)                                     (when z is given)

Shapes: ``x`` ``(b, l, h, p)``, ``dt`` ``(b, l, h)``, ``A`` ``(h,)``, ``B`` and ``C``
``(b, l, g, n)``, ``z`` like ``x``, ``D`` ``(h,)`` or ``(h, p)``, ``dt_bias`` ``(h,)``, the state
``(b, h, p, n)`` -- the layouts of ``mamba_chunk_scan_combined`` (its state is the transpose of fla's
``(n, p)``). As a scan: ``q = C``, ``k = B``, ``v = dt x``, one log-gate ``dt A`` per head.

Forms: ``"chunked"`` (the SSD algorithm, chunks of ``chunk_size``; the default), ``"recurrent"``
and ``"parallel"`` -- the masked-attention dual ``y = (L o C B^T)(dt x)`` with
``L_ij = exp(sum_{k=j+1..i} dt_k A)`` for ``j <= i``. Equal to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import validate as V
from ...errors import ShapeError, fmt_shape
from .. import Variant, param_field, register
from ..linear import common as C
from .mamba import sigmoid, silu, silu_grad, softplus

FORMS = ("chunked", "recurrent", "parallel")


@dataclass(frozen=True)
class Mamba2Params:
    D: Any = param_field(None, "(h,) or (h, p) skip connection: y += D x")
    z: Any = param_field(None, "(b, l, h, p) gate: out = y * silu(z)")
    dt_bias: Any = param_field(None, "(h,) added to dt before the softplus")
    dt_softplus: bool = param_field(False, "dt = softplus(dt + dt_bias)")
    initial_state: Any = param_field(None, "(b, h, p, n) state before the first step; default zeros")
    return_final_state: bool = param_field(False, "also return the last state (b, h, p, n)")
    form: str = param_field("chunked", "'chunked' (SSD), 'recurrent' or 'parallel' (the "
                            "masked-attention dual, O(l^2))")
    chunk_size: int = param_field(64, "steps per chunk of form='chunked'")


@dataclass
class Prepared:
    x: np.ndarray  # (b, h, l, p)
    dt_raw: np.ndarray  # (b, h, l)
    dt: np.ndarray
    A: np.ndarray
    B: np.ndarray  # as given, (b, l, g, n)
    C: np.ndarray
    D: Any
    z: Any  # (b, h, l, p)
    init: Any  # (b, h, n, p): fla's layout for the scan
    chunk: int


def prepare(arrays, p: Mamba2Params) -> Prepared:
    V.check_choice(p.form, "form", FORMS)
    chunk = V.check_int(p.chunk_size, "chunk_size", 1)
    V.check_bool(p.return_final_state, "return_final_state")
    x = C.array(arrays["x"], "x", 4, "(b, l, h, p)")
    b, n_steps, h, hp = x.shape
    if h == 0 or hp == 0:
        raise ShapeError(f"x: expected at least one head and a non-empty head dim, got "
                         f"{fmt_shape(x.shape)}")
    dt = C.array(arrays["dt"], "dt", 3, "(b, l, h)")
    if dt.shape != (b, n_steps, h):
        raise ShapeError(f"dt: expected shape {fmt_shape((b, n_steps, h))} (b, l, h), got "
                         f"{fmt_shape(dt.shape)}")
    A = C.array(arrays["A"], "A", 1, "(h,)")
    if A.shape != (h,):
        raise ShapeError(f"A: expected shape ({h},) (one per head), got {fmt_shape(A.shape)}")
    Bm = C.array(arrays["B"], "B", 4, "(b, l, g, n)")
    g = Bm.shape[2]
    if Bm.shape[:2] != (b, n_steps) or g == 0 or h % g or Bm.shape[3] == 0:
        raise ShapeError(f"B: expected shape ({b}, {n_steps}, g, n) with g dividing h={h} and "
                         f"n >= 1, got {fmt_shape(Bm.shape)}")
    Cm = C.array(arrays["C"], "C", 4, "(b, l, g, n)")
    if Cm.shape != Bm.shape:
        raise ShapeError(f"C: expected shape {fmt_shape(Bm.shape)} as B, got {fmt_shape(Cm.shape)}")
    n = Bm.shape[3]
    D = None
    if p.D is not None:
        D = C.finite(V.as_compute(p.D, "D"), "D")
        if D.shape not in ((h,), (h, hp)):
            raise ShapeError(f"D: expected shape ({h},) or ({h}, {hp}), got {fmt_shape(D.shape)}")
    z = None
    if p.z is not None:
        z = C.array(p.z, "z", 4, "(b, l, h, p)")
        if z.shape != x.shape:
            raise ShapeError(f"z: expected shape {fmt_shape(x.shape)} as x, got {fmt_shape(z.shape)}")
        z = z.transpose(0, 2, 1, 3)
    raw = dt
    if p.dt_bias is not None:
        bias = C.array(p.dt_bias, "dt_bias", 1, "(h,)")
        if bias.shape != (h,):
            raise ShapeError(f"dt_bias: expected shape ({h},), got {fmt_shape(bias.shape)}")
        raw = dt + bias
    step = softplus(raw) if V.check_bool(p.dt_softplus, "dt_softplus") else raw
    init = C.state(p.initial_state, "initial_state", (b, h, hp, n), "(b, h, p, n)")
    return Prepared(x=x.transpose(0, 2, 1, 3), dt_raw=raw.transpose(0, 2, 1),
                    dt=step.transpose(0, 2, 1), A=A, B=Bm, C=Cm, D=D, z=z,
                    init=None if init is None else np.ascontiguousarray(init.swapaxes(2, 3)),
                    chunk=chunk)


def per_head(x: np.ndarray, h: int) -> np.ndarray:
    """``B``/``C`` ``(b, l, g, n)`` as per-head ``(b, h, l, n)`` (head ``h`` reads group ``h // (H/G)``)."""
    return np.ascontiguousarray(np.repeat(x.transpose(0, 2, 1, 3), h // x.shape[2], axis=1))


def reduce_heads(grad: np.ndarray, g: int) -> np.ndarray:
    b, h, n_steps, n = grad.shape
    return grad.reshape(b, g, h // g, n_steps, n).sum(axis=2).transpose(0, 2, 1, 3)


def _operands(pre: Prepared):
    h = pre.x.shape[1]
    return (per_head(pre.C, h), per_head(pre.B, h), pre.dt[..., None] * pre.x,
            pre.dt * pre.A[None, :, None])


def _skip(pre: Prepared):
    """``D x`` as ``(b, h, l, p)``, or None."""
    if pre.D is None:
        return None
    d = pre.D[None, :, None, None] if pre.D.ndim == 1 else pre.D[None, :, None, :]
    return d * pre.x


def forward(backend, arrays, p: Mamba2Params):
    pre = prepare(arrays, p)
    q, k, v, decay = _operands(pre)
    o, s = backend.linear_scan(q, k, v, decay=decay, form=p.form, chunk_size=pre.chunk,
                               initial_state=pre.init)
    y = backend.to_numpy(o)
    skip = _skip(pre)
    if skip is not None:
        y = y + skip
    if pre.z is not None:
        y = y * silu(pre.z)
    return {"out": np.ascontiguousarray(y.transpose(0, 2, 1, 3)),
            "final_state": np.ascontiguousarray(backend.to_numpy(s).swapaxes(2, 3))}


def backward(backend, arrays, dout, p: Mamba2Params):
    pre = prepare(arrays, p)
    d_out = C.array(dout, "dout", 4, "(b, l, h, p)")
    want = pre.x.transpose(0, 2, 1, 3).shape
    if d_out.shape != want:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(want)}, got "
                         f"{fmt_shape(d_out.shape)}")
    d_out = d_out.transpose(0, 2, 1, 3)
    q, k, v, decay = _operands(pre)
    grads = {}
    dy = d_out
    skip = _skip(pre)
    if pre.z is not None:
        o, _ = backend.linear_scan(q, k, v, decay=decay, chunk_size=pre.chunk, initial_state=pre.init)
        y = backend.to_numpy(o) + (0.0 if skip is None else skip)
        grads["z"] = (d_out * y * silu_grad(pre.z)).transpose(0, 2, 1, 3)
        dy = d_out * silu(pre.z)
    g = backend.linear_scan_backward(q, k, v, dy, decay=decay, chunk_size=pre.chunk,
                                     initial_state=pre.init)
    dx = g["v"] * pre.dt[..., None]
    ddt = np.sum(g["v"] * pre.x, axis=-1) + g["decay"] * pre.A[None, :, None]
    grads["A"] = np.sum(g["decay"] * pre.dt, axis=(0, 2))
    grads["B"] = reduce_heads(g["k"], pre.B.shape[2])
    grads["C"] = reduce_heads(g["q"], pre.C.shape[2])
    if pre.D is not None:
        dd = pre.D[None, :, None, None] if pre.D.ndim == 1 else pre.D[None, :, None, :]
        dx = dx + dy * dd
        grads["D"] = np.sum(dy * pre.x, axis=(0, 2, 3) if pre.D.ndim == 1 else (0, 2))
    if p.dt_softplus:
        ddt = ddt * sigmoid(pre.dt_raw)
    if p.dt_bias is not None:
        grads["dt_bias"] = ddt.sum(axis=(0, 2))
    grads["x"] = dx.transpose(0, 2, 1, 3)
    grads["dt"] = ddt.transpose(0, 2, 1)
    if pre.init is not None:
        grads["initial_state"] = g["initial_state"].swapaxes(2, 3)
    return grads


def example(shape, rng, params):
    """``(B, Hq, Sq, Sk, D, Hkv)`` -> b = B, l = Sq, h = Hq, p = n = D, g = Hkv;
    ``dt = softplus(N(-2, 1))``, ``A = -exp(U(0, 1))`` (Mamba-2's test draws)."""
    b, h, n_steps, _, d, g = shape
    return {"x": rng.standard_normal((b, n_steps, h, d)),
            "dt": softplus(rng.standard_normal((b, n_steps, h)) - 2.0),
            "A": -np.exp(rng.random(h)),
            "B": rng.standard_normal((b, n_steps, g, d)),
            "C": rng.standard_normal((b, n_steps, g, d))}


register(Variant(
    name="mamba2", family="ssm",
    doc="Mamba-2 SSD: scalar decay exp(dt A) per head, h_t = a_t h + dt x B^T, y = h C + D x; the "
    "chunked SSD algorithm equals the recurrence and the masked-attention dual (L o C B^T)(dt x).",
    citation="Dao and Gu, Transformers are SSMs: Generalized Models and Efficient Algorithms "
    "Through Structured State Space Duality, ICML 2024",
    params=Mamba2Params, forward=forward, backward=backward, backends=("numpy", "numba"),
    tolerance=1e-12, inputs=("x", "dt", "A", "B", "C"),
    input_shapes={"x": "(b, l, h, p)", "dt": "(b, l, h)", "A": "(h,)", "B": "(b, l, g, n)",
                  "C": "(b, l, g, n)"},
    outputs=("out", "final_state"), example=example, default_shape=(1, 8, 256, 256, 64, 1)))

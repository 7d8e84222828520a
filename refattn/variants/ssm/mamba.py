"""``mamba``: the selective scan (S6) with the shapes and semantics of mamba's
``selective_scan_ref`` (real ``A``), on the backend's ``linear_scan``.

Per batch entry ``b`` and channel ``d`` (state ``h`` of size ``N``)::

    delta = softplus(delta_raw + delta_bias)      (softplus and the bias only when asked)
    h_t   = exp(delta_t A_d) * h_{t-1} + delta_t B_t u_t       (elementwise over N)
    y_t   = C_t . h_t + D_d u_t
    out   = y * silu(z)                            (when z is given)

Shapes: ``u``, ``delta``, ``z`` ``(B, D, L)``; ``A`` ``(D, N)``; ``B`` and ``C`` each either
``(D, N)`` (fixed), ``(B, N, L)`` (selective, shared by every channel) or ``(B, G, N, L)``
(grouped: channel ``d`` reads group ``d // (D / G)``); ``D`` and ``delta_bias`` ``(D,)``; the state
``(B, D, N)`` -- mamba's ``last_state`` layout. Each channel is one "head" of the scan with key dim
``N``, value dim 1: ``q = C``, ``k = B``, ``v = delta u``, per-key-dim log-gate ``delta A``.

``softplus(x) = log(1 + e^x)`` exactly; PyTorch's ``F.softplus`` returns ``x`` itself above 20 (a
difference below ``2.1e-9``, relative ``1e-10``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import validate as V
from ...errors import ShapeError, fmt_shape
from .. import Variant, param_field, register
from ..linear import common as C

FORMS = ("recurrent", "chunked", "parallel")


@dataclass(frozen=True)
class MambaParams:
    D: Any = param_field(None, "(D,) skip connection: y += D u")
    z: Any = param_field(None, "(B, D, L) gate: out = y * silu(z)")
    delta_bias: Any = param_field(None, "(D,) added to delta before the softplus")
    delta_softplus: bool = param_field(False, "delta = softplus(delta + delta_bias) (mamba's "
                                       "delta_softplus)")
    initial_state: Any = param_field(None, "(B, D, N) state before the first step; default zeros")
    return_final_state: bool = param_field(False, "also return the last state (B, D, N), mamba's "
                                           "return_last_state")
    form: str = param_field("recurrent", "the scan's form: 'recurrent', 'chunked' or 'parallel'")
    chunk_size: int = param_field(64, "steps per chunk of form='chunked'")


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def silu(x):
    return x * sigmoid(x)


def silu_grad(x):
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@dataclass
class Prepared:
    u: np.ndarray
    delta_raw: np.ndarray  # delta (+ bias), before the softplus
    delta: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: Any
    z: Any
    init: Any
    chunk: int


def _selective(x, name, b, d, n, length):
    """``B``/``C`` in one of its three forms (module docstring); returns the checked array."""
    a = V.as_compute(x, name)
    if a.ndim == 2:
        ok = a.shape == (d, n)
    elif a.ndim == 3:
        ok = a.shape == (b, n, length)
    elif a.ndim == 4:
        ok = a.shape[0] == b and a.shape[2:] == (n, length) and a.shape[1] >= 1 and d % a.shape[1] == 0
    else:
        ok = False
    if not ok:
        raise ShapeError(f"{name}: expected shape ({d}, {n}) (D, N), ({b}, {n}, {length}) "
                         f"(B, N, L) or ({b}, G, {n}, {length}) (B, G, N, L) with G dividing "
                         f"D={d}, got {fmt_shape(a.shape)}")
    return C.finite(a, name)


def prepare(arrays, p: MambaParams) -> Prepared:
    V.check_choice(p.form, "form", FORMS)
    chunk = V.check_int(p.chunk_size, "chunk_size", 1)
    V.check_bool(p.return_final_state, "return_final_state")
    u = C.array(arrays["u"], "u", 3, "(B, D, L)")
    b, d, n_steps = u.shape
    delta = C.array(arrays["delta"], "delta", 3, "(B, D, L)")
    if delta.shape != u.shape:
        raise ShapeError(f"delta: expected shape {fmt_shape(u.shape)} as u (B, D, L), got "
                         f"{fmt_shape(delta.shape)}")
    A = C.array(arrays["A"], "A", 2, "(D, N) (real)")
    if A.shape[0] != d or A.shape[1] == 0:
        raise ShapeError(f"A: expected shape ({d}, N) with N >= 1 (D of u), got {fmt_shape(A.shape)}")
    n = A.shape[1]
    Bm = _selective(arrays["B"], "B", b, d, n, n_steps)
    Cm = _selective(arrays["C"], "C", b, d, n, n_steps)
    per_channel = {}
    for name in ("D", "delta_bias"):
        x = getattr(p, name)
        if x is not None:
            a = C.array(x, name, 1, "(D,)")
            if a.shape != (d,):
                raise ShapeError(f"{name}: expected shape ({d},) (one per channel), got "
                                 f"{fmt_shape(a.shape)}")
            per_channel[name] = a
    z = None
    if p.z is not None:
        z = C.array(p.z, "z", 3, "(B, D, L)")
        if z.shape != u.shape:
            raise ShapeError(f"z: expected shape {fmt_shape(u.shape)} as u (B, D, L), got "
                             f"{fmt_shape(z.shape)}")
    raw = delta + per_channel["delta_bias"][:, None] if "delta_bias" in per_channel else delta
    dt = softplus(raw) if V.check_bool(p.delta_softplus, "delta_softplus") else raw
    init = C.state(p.initial_state, "initial_state", (b, d, n), "(B, D, N)")
    return Prepared(u=u, delta_raw=raw, delta=dt, A=A, B=Bm, C=Cm, D=per_channel.get("D"), z=z,
                    init=init, chunk=chunk)


def per_channel_bc(x: np.ndarray, b: int, d: int, n_steps: int) -> np.ndarray:
    """``B`` or ``C`` as the scan's keys/queries ``(B, D, L, N)`` (every channel its own row)."""
    n = x.shape[-2] if x.ndim >= 3 else x.shape[1]
    if x.ndim == 2:  # (D, N): the same at every step
        return np.broadcast_to(x[None, :, None, :], (b, d, n_steps, n))
    if x.ndim == 3:  # (B, N, L): the same for every channel
        return np.broadcast_to(x.transpose(0, 2, 1)[:, None], (b, d, n_steps, n))
    g = x.shape[1]  # (B, G, N, L): channel d reads group d // (D / G)
    return np.repeat(x.transpose(0, 1, 3, 2), d // g, axis=1)


def reduce_bc(grad: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The gradient ``(B, D, L, N)`` of :func:`per_channel_bc`'s output summed back to ``like``'s shape."""
    if like.ndim == 2:
        return grad.sum(axis=(0, 2))
    if like.ndim == 3:
        return grad.sum(axis=1).transpose(0, 2, 1)
    b, d, n_steps, n = grad.shape
    g = like.shape[1]
    return grad.reshape(b, g, d // g, n_steps, n).sum(axis=2).transpose(0, 1, 3, 2)


def scan_operands(pre: Prepared) -> dict:
    """The selective scan as ``linear_scan`` operands: one head per (batch, channel)."""
    b, d, n_steps = pre.u.shape
    return dict(q=np.ascontiguousarray(per_channel_bc(pre.C, b, d, n_steps)),
                k=np.ascontiguousarray(per_channel_bc(pre.B, b, d, n_steps)),
                v=(pre.delta * pre.u)[..., None],
                decay=pre.delta[..., None] * pre.A[None, :, None, :],
                initial_state=None if pre.init is None else pre.init[..., None])


def _finish(pre: Prepared, y: np.ndarray) -> np.ndarray:
    if pre.D is not None:
        y = y + pre.D[:, None] * pre.u
    return y if pre.z is None else y * silu(pre.z)


def forward(backend, arrays, p: MambaParams):
    pre = prepare(arrays, p)
    ops = scan_operands(pre)
    o, s = backend.linear_scan(ops["q"], ops["k"], ops["v"], decay=ops["decay"], form=p.form,
                               chunk_size=pre.chunk, initial_state=ops["initial_state"])
    y = backend.to_numpy(o)[..., 0]
    return {"out": _finish(pre, y), "final_state": backend.to_numpy(s)[..., 0]}


def backward(backend, arrays, dout, p: MambaParams):
    """Gradients of every input and of ``D``, ``z``, ``delta_bias``, ``initial_state`` where given."""
    pre = prepare(arrays, p)
    d_out = C.array(dout, "dout", 3, "(B, D, L)")
    if d_out.shape != pre.u.shape:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(pre.u.shape)}, got "
                         f"{fmt_shape(d_out.shape)}")
    ops = scan_operands(pre)
    grads = {}
    dy = d_out
    if pre.z is not None:  # out = y silu(z)
        o, _ = backend.linear_scan(ops["q"], ops["k"], ops["v"], decay=ops["decay"],
                                   chunk_size=pre.chunk, initial_state=ops["initial_state"])
        y = backend.to_numpy(o)[..., 0]
        if pre.D is not None:
            y = y + pre.D[:, None] * pre.u
        grads["z"] = d_out * y * silu_grad(pre.z)
        dy = d_out * silu(pre.z)
    g = backend.linear_scan_backward(ops["q"], ops["k"], ops["v"], dy[..., None],
                                     decay=ops["decay"], chunk_size=pre.chunk,
                                     initial_state=ops["initial_state"])
    dv = g["v"][..., 0]  # d (delta u)
    ddecay = g["decay"]  # d (delta A), (B, D, L, N)
    du = dv * pre.delta
    ddelta = dv * pre.u + np.einsum("bdln,dn->bdl", ddecay, pre.A)
    grads["A"] = np.einsum("bdln,bdl->dn", ddecay, pre.delta)
    grads["B"] = reduce_bc(g["k"], pre.B)
    grads["C"] = reduce_bc(g["q"], pre.C)
    if pre.D is not None:  # y += D u
        du = du + dy * pre.D[:, None]
        grads["D"] = np.sum(dy * pre.u, axis=(0, 2))
    if p.delta_softplus:
        ddelta = ddelta * sigmoid(pre.delta_raw)
    if p.delta_bias is not None:
        grads["delta_bias"] = ddelta.sum(axis=(0, 2))
    grads["u"], grads["delta"] = du, ddelta
    if pre.init is not None:
        grads["initial_state"] = g["initial_state"][..., 0]
    return grads


def example(shape, rng, params):
    """``(B, Hq, Sq, Sk, D, Hkv)`` -> batch B, channels Hq, length Sq, state N = D; selective
    ``B, C`` ``(B, N, L)``; ``A = -exp(N(0, 0.5))`` (negative: decaying), ``delta`` in (0, 1)."""
    b, h, n_steps, _, n, _ = shape
    return {"u": rng.standard_normal((b, h, n_steps)),
            "delta": 0.5 / (1.0 + np.exp(-rng.standard_normal((b, h, n_steps)))),
            "A": -np.exp(rng.normal(0.0, 0.5, (h, n))),
            "B": rng.standard_normal((b, n, n_steps)),
            "C": rng.standard_normal((b, n, n_steps))}


register(Variant(
    name="mamba", family="ssm",
    doc="Mamba's selective scan (S6), mamba's selective_scan_ref semantics: h_t = exp(delta_t A) h + "
    "delta_t B_t u_t, y = C_t h_t + D u, optional silu(z) gate, delta_bias and softplus; B/C fixed "
    "(D, N), selective (B, N, L) or grouped (B, G, N, L).",
    citation="Gu and Dao, Mamba: Linear-Time Sequence Modeling with Selective State Spaces, 2023",
    params=MambaParams, forward=forward, backward=backward, backends=("numpy", "numba"),
    tolerance=1e-12, inputs=("u", "delta", "A", "B", "C"),
    input_shapes={"u": "(B, D, L)", "delta": "(B, D, L)", "A": "(D, N)",
                  "B": "(D, N) | (B, N, L) | (B, G, N, L)", "C": "(D, N) | (B, N, L) | (B, G, N, L)"},
    outputs=("out", "final_state"), example=example, default_shape=(2, 64, 256, 256, 16, 1)))

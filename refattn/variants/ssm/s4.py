"""``s4``: a linear time-invariant state space layer, discretised, as a recurrence or as a
convolution with its kernel (VARIANTS section E).

Per channel ``h`` (continuous ``x' = A x + B u``, ``y = C x + D u`` with a dense real ``A``
``(N, N)``, ``B``, ``C`` ``(N,)``, step ``dt > 0``)::

    zoh:       A_bar = expm(dt A),                  B_bar = (integral_0^dt expm(s A) ds) B
    bilinear:  A_bar = (I - dt/2 A)^-1 (I + dt/2 A), B_bar = (I - dt/2 A)^-1 dt B
    x_t = A_bar x_{t-1} + B_bar u_t,   y_t = C x_t + D u_t              ("recurrent")
    K_l = C A_bar^l B_bar,  y_t = sum_{j<=t} K_{t-j} u_j + C A_bar^{t+1} x_{-1} + D u_t
                                                                        ("convolution", "fft")

ZOH's ``B_bar`` comes from one matrix exponential of the block matrix ``[[A, B], [0, 0]] dt`` (its
top-right column), so a singular ``A`` needs no inverse. ``"fft"`` convolves through a real FFT of
length ``2L`` (no wrap-around). Shapes: ``u`` ``(B, H, L)``, ``A`` ``(H, N, N)``, ``B``, ``C``
``(H, N)``, ``dt`` ``(H,)``, ``D`` ``(H,)``, state ``(B, H, N)``. The three forms agree to float64
rounding for a stable ``A_bar`` (spectral radius < 1); the convolution forms read ``A_bar``'s powers,
so an unstable one loses them to overflow sooner than the recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from .. import Variant, param_field, register
from ..linear import common as C

FORMS = ("recurrent", "convolution", "fft")
METHODS = ("zoh", "bilinear")


def discretize(A, B, dt, method: str = "zoh") -> tuple:
    """``(A_bar, B_bar)`` ``(H, N, N)``, ``(H, N)`` of ``A`` ``(H, N, N)``, ``B`` ``(H, N)``, ``dt``
    ``(H,)`` by zero-order hold (``"zoh"``) or the bilinear (Tustin) rule."""
    from scipy.linalg import expm

    A, B, dt = (np.asarray(a, dtype=np.float64) for a in (A, B, dt))
    V.check_choice(method, "method", METHODS)
    h, n, _ = A.shape
    a_bar, b_bar = np.empty_like(A), np.empty_like(B)
    eye = np.eye(n)
    for i in range(h):
        if method == "zoh":
            block = np.zeros((n + 1, n + 1))
            block[:n, :n], block[:n, n] = A[i], B[i]
            e = expm(dt[i] * block)
            a_bar[i], b_bar[i] = e[:n, :n], e[:n, n]
        else:
            left = eye - 0.5 * dt[i] * A[i]
            a_bar[i] = np.linalg.solve(left, eye + 0.5 * dt[i] * A[i])
            b_bar[i] = np.linalg.solve(left, dt[i] * B[i])
    return a_bar, b_bar


def kernel(A, B, C, dt, length: int, method: str = "zoh") -> np.ndarray:
    """The convolution kernel ``K`` ``(H, length)``: ``K_l = C A_bar^l B_bar``."""
    a_bar, b_bar = discretize(A, B, dt, method)
    return np.einsum("hn,hln->hl", np.asarray(C, np.float64), _powers(a_bar, b_bar, length))


def _powers(a_bar, x, length):
    """``A_bar^l x`` for ``l < length``: ``(H, length, N)`` for ``x`` ``(H, N)``, or
    ``(B, H, length, N)`` for ``x`` ``(B, H, N)``."""
    out = np.empty(x.shape[:-1] + (length, x.shape[-1]))
    cur = x
    for step in range(length):
        out[..., step, :] = cur
        cur = np.einsum("hnm,...hm->...hn", a_bar, cur)
    return out


@dataclass(frozen=True)
class S4Params:
    D: Any = param_field(None, "(H,) skip connection: y += D u")
    discretization: str = param_field("zoh", "'zoh' (zero-order hold) or 'bilinear'")
    form: str = param_field("recurrent", "'recurrent', 'convolution' (kernel, direct sum) or 'fft' "
                            "(kernel, FFT convolution)")
    initial_state: Any = param_field(None, "(B, H, N) state before the first step; default zeros")
    return_final_state: bool = param_field(False, "also return the last state (B, H, N)")


def _prepare(arrays, p: S4Params):
    V.check_choice(p.form, "form", FORMS)
    V.check_choice(p.discretization, "discretization", METHODS)
    V.check_bool(p.return_final_state, "return_final_state")
    u = C.array(arrays["u"], "u", 3, "(B, H, L)")
    b, h, _ = u.shape
    A = C.array(arrays["A"], "A", 3, "(H, N, N)")
    if A.shape[0] != h or A.shape[1] != A.shape[2] or A.shape[1] == 0:
        raise ShapeError(f"A: expected shape ({h}, N, N) with N >= 1 (H of u), got {fmt_shape(A.shape)}")
    n = A.shape[1]
    Bv = C.array(arrays["B"], "B", 2, "(H, N)")
    Cv = C.array(arrays["C"], "C", 2, "(H, N)")
    for name, a in (("B", Bv), ("C", Cv)):
        if a.shape != (h, n):
            raise ShapeError(f"{name}: expected shape ({h}, {n}) (H, N), got {fmt_shape(a.shape)}")
    dt = C.array(arrays["dt"], "dt", 1, "(H,)")
    if dt.shape != (h,):
        raise ShapeError(f"dt: expected shape ({h},) (one step per channel), got {fmt_shape(dt.shape)}")
    if np.any(dt <= 0):
        raise ParameterError(f"dt: expected steps > 0, got min {dt.min():.6g}")
    D = None
    if p.D is not None:
        D = C.array(p.D, "D", 1, "(H,)")
        if D.shape != (h,):
            raise ShapeError(f"D: expected shape ({h},), got {fmt_shape(D.shape)}")
    init = C.state(p.initial_state, "initial_state", (b, h, n), "(B, H, N)")
    return u, A, Bv, Cv, dt, D, init


def _forward(backend, arrays, p: S4Params):
    u, A, Bv, Cv, dt, D, init = _prepare(arrays, p)
    b, h, length = u.shape
    n = A.shape[1]
    a_bar, b_bar = discretize(A, Bv, dt, p.discretization)
    x0 = np.zeros((b, h, n)) if init is None else init
    if p.form == "recurrent":
        y = np.empty((b, h, length))
        x = x0
        for t in range(length):
            x = np.einsum("hnm,bhm->bhn", a_bar, x) + b_bar[None] * u[:, :, t, None]
            y[:, :, t] = np.einsum("hn,bhn->bh", Cv, x)
        final = x
    else:
        powers = _powers(a_bar, b_bar, length)  # A_bar^l B_bar, (H, L, N)
        k = np.einsum("hn,hln->hl", Cv, powers)
        if p.form == "convolution":
            y = np.zeros((b, h, length))
            for t in range(length):
                y[:, :, t] = np.sum(k[None, :, t::-1] * u[:, :, : t + 1], axis=-1)
        else:
            size = 2 * max(length, 1)
            y = np.fft.irfft(np.fft.rfft(k, size)[None] * np.fft.rfft(u, size), size)[..., :length]
        free = _powers(a_bar, np.einsum("hnm,bhm->bhn", a_bar, x0), length)  # A_bar^{t+1} x0
        y = y + np.einsum("hn,bhln->bhl", Cv, free)
        final = np.einsum("hln,bhl->bhn", powers[:, ::-1], u)  # sum_j A_bar^{L-1-j} B_bar u_j
        final = final + (free[:, :, -1] if length else x0)
    if D is not None:
        y = y + D[None, :, None] * u
    return {"out": y, "final_state": final}


def _discretize_backward(A, B, dt, method, d_abar, d_bbar):
    """``(dA, dB, ddt)`` from the gradients of ``A_bar``, ``B_bar`` (per channel). ZOH: the
    adjoint of ``expm``'s Frechet derivative at ``X = dt [[A, B], [0, 0]]`` is its Frechet
    derivative at ``X^T`` (``scipy.linalg.expm_frechet``). Bilinear: ``A_bar = P R``, ``B_bar =
    P dt B`` with ``P = (I - dt/2 A)^-1``, ``R = I + dt/2 A``, ``dP^-1 = -P^T dP P^T``."""
    from scipy.linalg import expm_frechet

    h, n, _ = A.shape
    dA, dB, ddt = np.empty_like(A), np.empty_like(B), np.empty(h)
    eye = np.eye(n)
    for i in range(h):
        if method == "zoh":
            block = np.zeros((n + 1, n + 1))
            block[:n, :n], block[:n, n] = A[i], B[i]
            d_e = np.zeros((n + 1, n + 1))
            d_e[:n, :n], d_e[:n, n] = d_abar[i], d_bbar[i]
            g = expm_frechet(dt[i] * block.T, d_e, compute_expm=False)  # dL/dX
            dA[i], dB[i] = dt[i] * g[:n, :n], dt[i] * g[:n, n]
            ddt[i] = np.sum(g * block)
        else:
            P = np.linalg.inv(eye - 0.5 * dt[i] * A[i])
            R = eye + 0.5 * dt[i] * A[i]
            dR = P.T @ d_abar[i]
            d_dtb = P.T @ d_bbar[i]
            dP = d_abar[i] @ R.T + np.outer(d_bbar[i], dt[i] * B[i])
            d_left = -P.T @ dP @ P.T  # left = I - dt/2 A
            dA[i] = 0.5 * dt[i] * (dR - d_left)
            dB[i] = dt[i] * d_dtb
            ddt[i] = 0.5 * np.sum((dR - d_left) * A[i]) + np.dot(d_dtb, B[i])
    return dA, dB, ddt


def _backward(backend, arrays, dout, p: S4Params):
    """Gradients of ``out`` (every form computes the same function) by the adjoint recurrence
    ``g_t = C dy_t + A_bar^T g_{t+1}``: ``dA_bar = sum_t g_t x_{t-1}^T``, ``dB_bar = sum_t g_t u_t``,
    ``du_t = B_bar . g_t + D dy_t``, ``dC = sum_t dy_t x_t``, then through the discretisation."""
    u, A, Bv, Cv, dt, D, init = _prepare(arrays, p)
    b, h, length = u.shape
    dy = C.array(dout, "dout", 3, "(B, H, L)")
    if dy.shape != u.shape:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(u.shape)}, got "
                         f"{fmt_shape(dy.shape)}")
    a_bar, b_bar = discretize(A, Bv, dt, p.discretization)
    xs = np.empty((b, h, length + 1, A.shape[1]))  # x_{-1}, x_0, ..., x_{L-1}
    xs[:, :, 0] = 0.0 if init is None else init
    for t in range(length):
        xs[:, :, t + 1] = np.einsum("hnm,bhm->bhn", a_bar, xs[:, :, t]) + b_bar[None] * u[:, :, t, None]
    g = np.zeros((b, h, A.shape[1]))
    d_abar, d_bbar, du = np.zeros_like(a_bar), np.zeros_like(b_bar), np.empty_like(u)
    for t in range(length - 1, -1, -1):
        g = Cv[None] * dy[:, :, t, None] + g  # dL/dx_t (g held A_bar^T g_{t+1})
        d_abar += np.einsum("bhn,bhm->hnm", g, xs[:, :, t])
        d_bbar += np.sum(g * u[:, :, t, None], axis=0)
        du[:, :, t] = np.einsum("hn,bhn->bh", b_bar, g)
        g = np.einsum("hnm,bhn->bhm", a_bar, g)  # A_bar^T g_t
    grads = {"C": np.einsum("bhl,bhln->hn", dy, xs[:, :, 1:])}
    grads["A"], grads["B"], grads["dt"] = _discretize_backward(A, Bv, dt, p.discretization,
                                                               d_abar, d_bbar)
    if D is not None:
        du = du + D[None, :, None] * dy
        grads["D"] = np.sum(dy * u, axis=(0, 2))
    grads["u"] = du
    if init is not None:
        grads["initial_state"] = g
    return grads


def _example(shape, rng, params):
    """``(B, Hq, Sq, Sk, D, Hkv)`` -> batch B, channels Hq, length Sq, state N = D. ``A``:
    HiPPO-LegS (``A_nk = -sqrt(2n+1) sqrt(2k+1)`` below the diagonal, ``-(n+1)`` on it),
    ``B_n = sqrt(2n+1)``, ``C ~ N(0, 1)``, ``dt`` log-uniform in ``[1e-3, 1e-1]`` (S4's init)."""
    b, h, length, _, n, _ = shape
    r = np.sqrt(2 * np.arange(n) + 1.0)
    legs = -np.tril(np.outer(r, r), -1) - np.diag(np.arange(1, n + 1.0))
    return {"u": rng.standard_normal((b, h, length)), "A": np.broadcast_to(legs, (h, n, n)).copy(),
            "B": np.broadcast_to(r, (h, n)).copy(), "C": rng.standard_normal((h, n)),
            "dt": np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), h))}


register(Variant(
    name="s4", family="ssm",
    doc="S4: LTI state space layer with a dense real A per channel, discretised by ZOH or the "
    "bilinear rule; recurrence == convolution with the kernel K_l = C A_bar^l B_bar (direct or FFT).",
    citation="Gu, Goel, Re, Efficiently Modeling Long Sequences with Structured State Spaces, ICLR 2022",
    params=S4Params, forward=_forward, backward=_backward, backends=("numpy",), tolerance=1e-12,
    inputs=("u", "A", "B", "C", "dt"),
    input_shapes={"u": "(B, H, L)", "A": "(H, N, N)", "B": "(H, N)", "C": "(H, N)", "dt": "(H,)"},
    outputs=("out", "final_state"), example=_example, default_shape=(2, 16, 256, 256, 16, 1)))

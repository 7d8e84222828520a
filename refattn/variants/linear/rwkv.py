"""``rwkv``: RWKV-4's WKV (VARIANTS section E), on the backend's ``wkv`` primitive.

Per batch entry and channel ``c`` (``k, v`` ``(B, T, C)``; decay rate ``w`` and bonus ``u`` ``(C,)``)::

    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{-(t-1-i) w + k_i}     + e^{u + k_t})

``w`` is the decay *rate*: RWKV's and HF's ``time_decay`` parameter is ``log w`` (their kernels use
``-exp(time_decay)`` as the log-decay), their ``time_first`` is ``u``. The running maximum: why a
primitive of its own and not a mode of ``linear_scan`` is in the docstring of
:meth:`refattn.backends.base.Backend.wkv`. State ``(B, 3, C)``: ``(a, b, p)``, the numerator
``a e^p`` and denominator ``b e^p`` of the sums over the tokens seen (empty: ``0, 0, -inf``; HF
starts its max state at ``-1e38``, the same thing); an ``initial_state`` is the prefix the sums
start from: it decays by ``e^{-w}`` per token like any earlier token.

Forms: ``"recurrent"`` (the stable running-maximum recurrence: the backend's primitive) and
``"parallel"`` (the direct sums above, every row shifted by its own largest exponent: O(T^2 C)).
They agree to rounding even where ``e^{k}`` overflows. The backward is the derivative of the direct
sums (``y_t`` is a softmax-weighted average of the values over the exponents), the same numpy code
on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from .. import Variant, param_field, register
from . import common as C

FORMS = ("recurrent", "parallel")


@dataclass(frozen=True)
class RwkvParams:
    form: str = param_field("recurrent", "'recurrent' (the running-maximum recurrence) or "
                            "'parallel' (the direct sums, O(T^2))")
    initial_state: Any = param_field(None, "(B, 3, C) state (a, b, p): numerator a e^p, "
                                     "denominator b e^p of the earlier tokens; default empty",
                                     masking=True)  # p = -inf is the empty state
    return_final_state: bool = param_field(False, "also return the state after the last token, "
                                           "(B, 3, C)")


@dataclass
class _Prepared:
    k: np.ndarray
    v: np.ndarray
    w: np.ndarray
    u: np.ndarray
    init: Any


def _prepare(arrays, p: RwkvParams) -> _Prepared:
    V.check_choice(p.form, "form", FORMS)
    V.check_bool(p.return_final_state, "return_final_state")
    k = C.array(arrays["k"], "k", 3, "(B, T, C)")
    v = C.array(arrays["v"], "v", 3, "(B, T, C)")
    if v.shape != k.shape:
        raise ShapeError(f"v: expected shape {fmt_shape(k.shape)} as k (B, T, C), got "
                         f"{fmt_shape(v.shape)}")
    b, _, c = k.shape
    w, u = (C.array(arrays[n], n, 1, "(C,)") for n in ("w", "u"))
    for name, a in (("w", w), ("u", u)):
        if a.shape != (c,):
            raise ShapeError(f"{name}: expected shape ({c},) (one per channel, C of k), got "
                             f"{fmt_shape(a.shape)}")
    init = None
    if p.initial_state is not None:
        init = V.as_compute(p.initial_state, "initial_state")
        if init.shape != (b, 3, c):
            raise ShapeError(f"initial_state: expected shape {fmt_shape((b, 3, c))} (B, 3, C): "
                             f"(a, b, p), got {fmt_shape(init.shape)}")
        a_, den, top = init[:, 0], init[:, 1], init[:, 2]
        if not (np.all(np.isfinite(a_)) and np.all(np.isfinite(den)) and np.all(den >= 0)
                and not np.any(np.isnan(top)) and not np.any(np.isposinf(top))):
            raise ParameterError("initial_state: expected finite a, finite b >= 0 and p finite or "
                                 "-inf (the empty state), got values outside that")
    return _Prepared(k=k, v=v, w=w, u=u, init=init)


def _exponents(pre: _Prepared, t: int) -> tuple:
    """Row ``t`` of the direct sums: the exponents of tokens ``0..t`` (the last with the bonus
    ``u``) and of the initial state, ``(B, t+1, C)`` and ``(B, C)`` (``-inf`` without one)."""
    i = np.arange(t + 1)
    e = pre.k[:, : t + 1] - ((t - 1 - i)[None, :, None] * pre.w[None, None, :])
    e[:, t] = pre.u + pre.k[:, t]
    if pre.init is None:
        e0 = np.full((pre.k.shape[0], pre.k.shape[2]), -np.inf)
    else:
        e0 = pre.init[:, 2] - t * pre.w
    return e, e0


def _parallel(pre: _Prepared) -> tuple:
    """The direct sums, row by row, each shifted by its largest exponent."""
    b, n, c = pre.k.shape
    y = np.empty((b, n, c))
    a0 = np.zeros((b, c)) if pre.init is None else pre.init[:, 0]
    b0 = np.zeros((b, c)) if pre.init is None else pre.init[:, 1]
    for t in range(n):
        e, e0 = _exponents(pre, t)
        m = np.maximum(e.max(axis=1), e0)
        x, x0 = np.exp(e - m[:, None]), np.exp(e0 - m)
        y[:, t] = (np.sum(x * pre.v[:, : t + 1], axis=1) + x0 * a0) / (np.sum(x, axis=1) + x0 * b0)
    # the state after the last token: every token decayed to T-1, the initial state T times
    e = pre.k - ((n - 1 - np.arange(n))[None, :, None] * pre.w[None, None, :])
    e0 = (np.full((b, c), -np.inf) if pre.init is None else pre.init[:, 2] - n * pre.w)
    top = np.maximum(e.max(axis=1) if n else np.full((b, c), -np.inf), e0)
    safe = np.where(np.isfinite(top), top, 0.0)
    x, x0 = np.exp(e - safe[:, None]), np.exp(e0 - safe)
    final = np.stack([np.sum(x * pre.v, axis=1) + x0 * a0, np.sum(x, axis=1) + x0 * b0, top], axis=1)
    return y, final


def _forward(backend, arrays, p: RwkvParams):
    pre = _prepare(arrays, p)
    if p.form == "parallel":
        y, state = _parallel(pre)
    else:
        y, state = backend.wkv(pre.k, pre.v, w=pre.w, u=pre.u, initial_state=pre.init)
    return {"out": backend.to_numpy(y), "final_state": backend.to_numpy(state)}


def _backward(backend, arrays, dout, p: RwkvParams):
    """Derivative of the direct sums: with weights ``P_ti = e^{e_ti} / den_t`` (the initial state's
    ``W_t = e^{e0_t} / den_t``), ``y_t = sum_i P_ti v_i + W_t a0``, ``den_t`` including ``W b0``:
    ``d e_ti = P_ti (v_i - y_t) dy_t``, ``dv_i = sum_t P_ti dy_t``, ``da0 = sum_t W_t dy_t``,
    ``db0 = -sum_t W_t y_t dy_t``, ``dp0 = sum_t W_t (a0 - y_t b0) dy_t``."""
    pre = _prepare(arrays, p)
    b, n, c = pre.k.shape
    d = C.array(dout, "dout", 3, "(B, T, C)")
    if d.shape != pre.k.shape:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(pre.k.shape)}, got "
                         f"{fmt_shape(d.shape)}")
    a0 = np.zeros((b, c)) if pre.init is None else pre.init[:, 0]
    b0 = np.zeros((b, c)) if pre.init is None else pre.init[:, 1]
    dk, dv = np.zeros((b, n, c)), np.zeros((b, n, c))
    dw, du = np.zeros(c), np.zeros(c)
    dinit = np.zeros((b, 3, c))
    for t in range(n):
        e, e0 = _exponents(pre, t)
        m = np.maximum(e.max(axis=1), e0)
        x, x0 = np.exp(e - m[:, None]), np.exp(e0 - m)
        den = np.sum(x, axis=1) + x0 * b0
        pw, w0 = x / den[:, None], x0 / den
        y = np.sum(pw * pre.v[:, : t + 1], axis=1) + w0 * a0
        dy = d[:, t]
        de = pw * (pre.v[:, : t + 1] - y[:, None]) * dy[:, None]  # d out / d exponent
        dv[:, : t + 1] += pw * dy[:, None]
        dk[:, : t + 1] += de
        du += np.sum(de[:, t], axis=0)
        dw -= np.sum(de[:, :t] * (t - 1 - np.arange(t))[None, :, None], axis=(0, 1))
        de0 = w0 * (a0 - y * b0) * dy
        dinit[:, 0] += w0 * dy
        dinit[:, 1] -= w0 * y * dy
        dinit[:, 2] += de0
        dw -= t * np.sum(de0, axis=0)
    grads = {"k": dk, "v": dv, "w": dw, "u": du}
    if pre.init is not None:
        grads["initial_state"] = dinit
    return grads


def _example(shape, rng, params):
    """``k, v`` ``(B, T, C)`` with ``T = Sq``, ``C = Hq * D``; ``w = exp(N(-1, 0.5))``, ``u ~ N(0, 1)``."""
    b, h, n, _, d, _ = shape
    c = h * d
    return {"k": rng.standard_normal((b, n, c)), "v": rng.standard_normal((b, n, c)),
            "w": np.exp(rng.normal(-1.0, 0.5, c)), "u": rng.standard_normal(c)}


register(Variant(
    name="rwkv", family="linear",
    doc="RWKV-4 WKV: per channel, a decaying (rate w) exponentially weighted average of the values "
    "with weights e^{k_i} and a bonus u for the current token; the numerically stable running-"
    "maximum recurrence (its own backend primitive, wkv) equals the direct sums.",
    citation="Peng et al., RWKV: Reinventing RNNs for the Transformer Era, EMNLP 2023 Findings",
    params=RwkvParams, forward=_forward, backward=_backward, backends=("numpy", "numba"),
    tolerance=1e-12, inputs=("k", "v", "w", "u"),
    input_shapes={"k": "(B, T, C)", "v": "(B, T, C)", "w": "(C,)", "u": "(C,)"},
    outputs=("out", "final_state"), example=_example, default_shape=(1, 8, 256, 256, 64, 8)))

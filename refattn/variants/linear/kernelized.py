"""Feature-map linear attention: ``linear`` (Katharopoulos et al.) and ``performer`` (FAVOR+).

Both compute ``phi(q)^T S`` with ``S = sum_j phi(k_j) v_j^T`` (causal: the prefix up to ``i``,
through the backend's ``linear_scan``; non-causal: the whole sum, the scan's final state) and
normalise by ``phi(q)^T z``, ``z = sum_j phi(k_j)``: the values are extended by a column of ones,
so one scan carries both. State layout (fla's, keys x values): ``(B, H, Dk, Dv + 1)`` with the last
column ``z`` when normalising.

``linear``: ``out_i = scale phi(q_i)^T S_i / (scale phi(q_i)^T z_i + eps)`` (``normalize=True``,
the paper's form, ``eps = 1e-6``) or ``scale phi(q_i)^T S_i`` (``normalize=False``, fla's
``linear_attn`` default). ``phi``: ``"elu+1"`` (``elu(x) + 1``, the paper's), ``"relu"`` or
``"identity"``. ``scale`` defaults to 1 (the paper has none; fla uses ``Dk^-1/2``).

``performer`` (FAVOR+, the Performer reference code ``fast_attention``): with ``m`` random features
``omega`` ``(m, D)`` and ``x' = x sqrt(scale)`` (``scale = 1/sqrt(D)``: ``x' = x D^(-1/4)``),
softmax kernel ``phi(x) = m^(-1/2) (exp(omega x' - |x'|^2 / 2 - stab) + eps)`` where ``stab`` is the
maximum of ``omega x'`` over the features of each query row, and over the features and all
positions of each (batch, head) for keys; ``eps = 1e-6``. ReLU kernel ``phi(x) = m^(-1/2)
relu(omega x) + eps``, ``eps = 1e-3`` (no ``x'``). ``out = phi(q)^T S / phi(q)^T z`` (no eps).
``omega``: orthogonal (default: ``D x D`` blocks, each the transposed Q of the QR of a Gaussian
matrix, stacked to ``m`` rows, the rows scaled by the norms of the rows of an ``m x D`` Gaussian
matrix: chi-distributed) or i.i.d. Gaussian, drawn with ``numpy.random.default_rng(seed)`` in that
order -- or an explicit ``omega``, so a user can feed in their implementation's draw. ``performer``
has no ``initial_state``/``final_state``: the key stabiliser is a maximum over the whole call's keys,
so a state carried from one call into the next would mix two stabilisers. It has no backward either
(the maxima make it piecewise; a gradient check would test the stabiliser, not the estimator).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from .. import Variant, param_field, register
from . import common as C
from .common import ScanParams

FEATURE_MAPS = ("elu+1", "relu", "identity")
KERNELS = ("softmax", "relu")
FEATURES = ("orthogonal", "iid")
#: the Performer reference's numerical stabilisers
FAVOR_EPS = {"softmax": 1e-6, "relu": 1e-3}


def feature_map(x: np.ndarray, name: str) -> tuple:
    """``(phi(x), phi'(x))`` elementwise for ``name`` in :data:`FEATURE_MAPS`."""
    if name == "elu+1":
        e = np.exp(np.minimum(x, 0.0))
        return np.where(x > 0, x + 1.0, e), np.where(x > 0, 1.0, e)
    if name == "relu":
        return np.maximum(x, 0.0), (x > 0).astype(np.float64)
    return x, np.ones_like(x)


def _check_eps(eps, name="eps"):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
            math.isfinite(eps) and eps >= 0):
        raise ParameterError(f"{name}: expected a finite number >= 0, got {eps!r}")
    return float(eps)


def _scan_features(backend, fq, fk, v, p, chunk, normalize, init, causal):
    """``phi(q)^T S`` (and ``phi(q)^T z`` as the last column when normalising) for every row, and
    the final state."""
    va = np.concatenate([v, np.ones(v.shape[:3] + (1,))], axis=-1) if normalize else v
    o, s = backend.linear_scan(fq, fk, va, form=p.form, chunk_size=chunk, initial_state=init)
    o, s = backend.to_numpy(o), backend.to_numpy(s)
    if not causal:  # every query reads the state after the last key
        o = np.einsum("bhtk,bhkv->bhtv", fq, s)
    return o, s, va


# -- linear ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearParams(ScanParams):
    scale: Optional[float] = param_field(1.0, "multiplies phi(q), numerator and denominator (the "
                                         "paper: 1; fla's linear_attn: Dk^-1/2; None: Dk^-1/2)")
    initial_state: Any = param_field(None, "(B, H, Dk, Dv + 1) state (S with z as the last column) "
                                     "with normalize, (B, H, Dk, Dv) without; default zeros")
    return_final_state: bool = param_field(False, "also return the state after the last key "
                                           "(shape as initial_state)")
    feature_map: str = param_field("elu+1", "phi: 'elu+1' (the paper), 'relu' or 'identity'")
    normalize: bool = param_field(True, "divide by scale phi(q)^T z + eps (the paper); False: fla's "
                                  "unnormalised form")
    eps: float = param_field(1e-6, "added to the normaliser scale phi(q)^T z")
    causal: bool = param_field(False, "prefix sums (query i sees keys j <= i); False: every key")


@dataclass
class _LinearPrepared:
    fq: np.ndarray
    dfq: np.ndarray
    fk: np.ndarray
    dfk: np.ndarray
    v: np.ndarray
    init: Any
    scale: float
    chunk: int
    eps: float


def _linear_prepare(arrays, p: LinearParams) -> _LinearPrepared:
    chunk = C.check_scan_params(p)
    V.check_choice(p.feature_map, "feature_map", FEATURE_MAPS)
    normalize = V.check_bool(p.normalize, "normalize")
    V.check_bool(p.causal, "causal")
    eps = _check_eps(p.eps)
    q, k, v = C.qkv(arrays, p)
    b, h, n, dk = q.shape
    scale = V.check_scale(p.scale, dk)
    fq, dfq = feature_map(q, p.feature_map)
    fk, dfk = feature_map(k, p.feature_map)
    width = v.shape[3] + (1 if normalize else 0)
    init = C.state(p.initial_state, "initial_state", (b, h, dk, width),
                   "(B, H, Dk, Dv + 1) with normalize" if normalize else "(B, H, Dk, Dv)")
    return _LinearPrepared(fq=scale * fq, dfq=scale * dfq, fk=fk, dfk=dfk, v=v, init=init,
                           scale=scale, chunk=chunk, eps=eps)


def _linear_forward(backend, arrays, p: LinearParams):
    pre = _linear_prepare(arrays, p)
    o, s, _ = _scan_features(backend, pre.fq, pre.fk, pre.v, p, pre.chunk, p.normalize, pre.init,
                             p.causal)
    dv = pre.v.shape[3]
    out = o[..., :dv] / (o[..., dv:] + pre.eps) if p.normalize else o
    return {"out": C.to_caller(out, p.layout), "final_state": s}


def _linear_backward(backend, arrays, dout, p: LinearParams):
    pre = _linear_prepare(arrays, p)
    o, s, va = _scan_features(backend, pre.fq, pre.fk, pre.v, p, pre.chunk, p.normalize, pre.init,
                              p.causal)
    dv = pre.v.shape[3]
    d = C.dout_for(dout, pre.v.shape, p.layout)
    if p.normalize:  # out = num / (den + eps)
        den = o[..., dv:] + pre.eps
        d_raw = np.concatenate([d / den, -np.sum(d * o[..., :dv], axis=-1, keepdims=True) / den ** 2],
                               axis=-1)
    else:
        d_raw = d
    if p.causal:
        g = backend.linear_scan_backward(pre.fq, pre.fk, va, d_raw, chunk_size=pre.chunk,
                                         initial_state=pre.init)
        dfq = g["q"]
    else:  # o = fq S_final: the scan sees only the final state's gradient
        dfq = np.einsum("bhtv,bhkv->bhtk", d_raw, s)
        g = backend.linear_scan_backward(pre.fq, pre.fk, va, np.zeros_like(d_raw),
                                         chunk_size=pre.chunk, initial_state=pre.init,
                                         dfinal_state=np.einsum("bhtk,bhtv->bhkv", pre.fq, d_raw))
    grads = {"q": C.to_caller(pre.dfq * dfq, p.layout),
             "k": C.to_caller(pre.dfk * g["k"], p.layout),
             "v": C.to_caller(g["v"][..., :dv], p.layout)}
    if pre.init is not None:
        grads["initial_state"] = g["initial_state"]
    return grads


def _linear_example(shape, rng, params):
    return C.example_qkv(shape, rng, params)


register(Variant(
    name="linear", family="linear",
    doc="Linear attention (Katharopoulos et al.): feature map phi (elu+1, relu, identity), "
    "out = phi(q)^T S / (phi(q)^T z + eps), S = sum phi(k) v^T, z = sum phi(k); causal by prefix "
    "sums (the scan), non-causal from the final state.",
    citation="Katharopoulos et al., Transformers are RNNs: Fast Autoregressive Transformers with "
    "Linear Attention, ICML 2020",
    params=LinearParams, forward=_linear_forward, backward=_linear_backward,
    backends=("numpy", "numba"), tolerance=1e-12, inputs=("q", "k", "v"),
    input_shapes={"q": "(B, H, L, Dk)", "k": "(B, H, L, Dk)", "v": "(B, H, L, Dv)"},
    outputs=("out", "final_state"), example=_linear_example))


# -- performer ---------------------------------------------------------------------------------------
def draw_omega(num_features: int, dim: int, seed: int, features: str = "orthogonal") -> np.ndarray:
    """FAVOR+ random features ``(num_features, dim)`` from ``numpy.random.default_rng(seed)``.

    ``"orthogonal"`` (the Performer's ``create_projection_matrix`` with ``scaling=0``): full
    ``dim x dim`` blocks, each ``Q^T`` of the QR decomposition of a standard Gaussian matrix, then
    the first rows of one more block, stacked; then every row is multiplied by the norm of a row of
    a standard Gaussian ``(num_features, dim)`` matrix (so row norms are chi-distributed, as for
    i.i.d. Gaussian rows). ``"iid"``: a standard Gaussian ``(num_features, dim)`` matrix.
    """
    m = V.check_int(num_features, "num_features", 1)
    d = V.check_int(dim, "dim", 1)
    V.check_choice(features, "features", FEATURES)
    rng = np.random.default_rng(V.check_int(seed, "seed", 0))
    if features == "iid":
        return rng.standard_normal((m, d))
    blocks = []
    for _ in range(m // d):
        qmat, _ = np.linalg.qr(rng.standard_normal((d, d)))
        blocks.append(qmat.T)
    rest = m - (m // d) * d
    if rest:
        qmat, _ = np.linalg.qr(rng.standard_normal((d, d)))
        blocks.append(qmat.T[:rest])
    norms = np.linalg.norm(rng.standard_normal((m, d)), axis=1)
    return norms[:, None] * np.vstack(blocks)


def favor_features(x: np.ndarray, omega: np.ndarray, kernel: str, *, is_query: bool, eps: float,
                   scale: float) -> np.ndarray:
    """FAVOR+ features ``(B, H, L, m)`` of ``x`` ``(B, H, L, D)`` (module docstring)."""
    m = omega.shape[0]
    if kernel == "relu":
        return m ** -0.5 * np.maximum(x @ omega.T, 0.0) + eps
    xs = x * math.sqrt(scale)
    proj = xs @ omega.T
    half_norm = 0.5 * np.sum(xs * xs, axis=-1, keepdims=True)
    if proj.size == 0:
        return proj
    stab = proj.max(axis=-1, keepdims=True) if is_query else proj.max(axis=(-2, -1), keepdims=True)
    return m ** -0.5 * (np.exp(proj - half_norm - stab) + eps)


@dataclass(frozen=True)
class PerformerParams:
    num_features: Optional[int] = param_field(None, "m random features (default 256; with omega: "
                                              "its row count)")
    features: Optional[str] = param_field(None, "'orthogonal' (default) or 'iid' Gaussian rows")
    seed: Optional[int] = param_field(None, "numpy default_rng seed of the draw (default 0)")
    omega: Any = param_field(None, "(m, D) explicit random features, instead of a draw")
    kernel: str = param_field("softmax", "'softmax' (positive random features) or 'relu'")
    causal: bool = param_field(False, "prefix sums (query i sees keys j <= i); False: every key")
    scale: Optional[float] = param_field(None, "softmax temperature approximated: exp(scale q.k); "
                                         "default 1/sqrt(D) (softmax kernel only)")
    feature_eps: Optional[float] = param_field(None, "added to every feature; default 1e-6 "
                                               "(softmax) or 1e-3 (relu), the reference's")
    form: str = param_field("recurrent", "the scan's form: 'recurrent', 'chunked' or 'parallel'")
    chunk_size: int = param_field(64, "steps per chunk of form='chunked'")
    layout: str = param_field("bhsd", "'bhsd' (B, H, L, D) or 'bshd' (B, L, H, D)")


def performer_omega(p: PerformerParams, d: int) -> np.ndarray:
    """``omega`` of a call: the explicit one (checked) or the draw from its parameters."""
    if p.omega is not None:
        given = [n for n in ("num_features", "features", "seed") if getattr(p, n) is not None]
        omega = C.array(p.omega, "omega", 2, "(m, D)")
        if given and not (given == ["num_features"] and p.num_features == omega.shape[0]):
            raise ParameterError(f"omega: given together with {', '.join(given)}, which describe a "
                                 f"draw; give omega or the draw's parameters")
        if omega.shape[1] != d or omega.shape[0] == 0:
            raise ShapeError(f"omega: expected shape (m, {d}) with m >= 1, got {fmt_shape(omega.shape)}")
        return omega
    m = 256 if p.num_features is None else p.num_features
    return draw_omega(m, d, 0 if p.seed is None else p.seed,
                      "orthogonal" if p.features is None else p.features)


def _performer_forward(backend, arrays, p: PerformerParams):
    V.check_choice(p.form, "form", C.FORMS)
    V.check_choice(p.layout, "layout", C.LAYOUTS)
    chunk = V.check_int(p.chunk_size, "chunk_size", 1)
    V.check_choice(p.kernel, "kernel", KERNELS)
    causal = V.check_bool(p.causal, "causal")
    q, k, v = C.qkv(arrays, p)
    d = q.shape[3]
    if p.kernel == "relu" and p.scale is not None:
        raise ParameterError(f"scale: applies to kernel='softmax' (the ReLU kernel has no "
                             f"temperature), got scale={p.scale!r} with kernel='relu'")
    scale = V.check_scale(p.scale, d)
    eps = FAVOR_EPS[p.kernel] if p.feature_eps is None else _check_eps(p.feature_eps, "feature_eps")
    omega = performer_omega(p, d)
    fq = favor_features(q, omega, p.kernel, is_query=True, eps=eps, scale=scale)
    fk = favor_features(k, omega, p.kernel, is_query=False, eps=eps, scale=scale)
    o, _, _ = _scan_features(backend, fq, fk, v, p, chunk, True, None, causal)
    dv = v.shape[3]
    return {"out": C.to_caller(o[..., :dv] / o[..., dv:], p.layout)}


register(Variant(
    name="performer", family="linear",
    doc="Performer FAVOR+: softmax attention approximated with m positive random features "
    "(orthogonal or i.i.d., from seed or an explicit omega), or the ReLU kernel; causal by "
    "prefix sums. Not exact: equals softmax attention only as m grows.",
    citation="Choromanski et al., Rethinking Attention with Performers, ICLR 2021",
    params=PerformerParams, forward=_performer_forward, backends=("numpy", "numba"),
    tolerance=1e-12, inputs=("q", "k", "v"),
    input_shapes={"q": "(B, H, L, D)", "k": "(B, H, L, D)", "v": "(B, H, L, Dv)"},
    outputs=("out",), example=_linear_example))

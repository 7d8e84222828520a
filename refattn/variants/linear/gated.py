"""fla's gated recurrences: ``gla``, ``simple_gla``, ``retention``, ``delta_rule``,
``gated_delta_rule`` -- each one call of the backend's ``linear_scan`` (VARIANTS section E).

Per (batch, head), state ``S`` ``(Dk, Dv)`` (fla's layout), ``t = 0 .. L-1``::

    gla               S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          g_t (Dk,) <= 0
    simple_gla        S_t = exp(g_t) S_{t-1} + k_t v_t^T                g_t scalar <= 0
    retention         S_t = gamma_h S_{t-1} + k_t v_t^T                 gamma_h = 1 - 2^(-5-h)
    delta_rule        S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    gated_delta_rule  S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    o_t = scale * S_t^T q_t,   scale = 1/sqrt(Dk) unless given

Gates are log-gates (``alpha = exp(g)``, fla's ``g``/``gk``), finite and ``<= 0``; ``beta`` is in
``[0, 2]`` (fla's ``sigmoid``, or twice it with ``allow_neg_eigval``). ``qk_l2norm=True`` normalises
q and k as fla's ``use_qk_l2norm_in_kernel`` (``x / sqrt(sum x^2 + 1e-6)``) before the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import validate as V
from .. import Variant, param_field, register
from . import common as C
from .common import ScanParams


@dataclass(frozen=True)
class DeltaParams(ScanParams):
    qk_l2norm: bool = param_field(False, "L2-normalise q and k over the head dim before the scan "
                                  "(fla's use_qk_l2norm_in_kernel: x / sqrt(sum x^2 + 1e-6))")


@dataclass(frozen=True)
class Spec:
    """How a variant feeds the scan: its gate (None, ``"dim"``, ``"head"`` or ``"retention"``) and
    whether it uses the delta rule."""

    gate: object = None
    delta: bool = False


def retention_gammas(h: int) -> np.ndarray:
    """RetNet's per-head decays ``gamma_h = 1 - 2^(-5-h)``, ``h = 0 .. H-1``."""
    return 1.0 - 2.0 ** (-5.0 - np.arange(h))


@dataclass
class Prepared:
    q: np.ndarray  # scaled (and normalised) queries, bhsd
    k: np.ndarray
    v: np.ndarray
    decay: object
    beta: object
    init: object
    scale: float
    chunk: int
    norms: object  # (q_unit, rstd_q, k_unit, rstd_k) with qk_l2norm


def prepare(arrays, p, spec: Spec) -> Prepared:
    chunk = C.check_scan_params(p)
    q, k, v = C.qkv(arrays, p)
    b, h, n, dk = q.shape
    scale = V.check_scale(p.scale, dk)
    decay = None
    if spec.gate in ("dim", "head"):
        decay = C.log_gate(arrays["g"], "g", p, q, per_dim=spec.gate == "dim")
    elif spec.gate == "retention":
        decay = np.broadcast_to(np.log1p(-(2.0 ** (-5.0 - np.arange(h))))[None, :, None],
                                (b, h, n)).copy()
    beta = C.unit_interval_beta(arrays["beta"], p, q) if spec.delta else None
    norms = None
    if spec.delta and V.check_bool(p.qk_l2norm, "qk_l2norm"):
        (q, rq), (k, rk) = C.l2norm(q), C.l2norm(k)
        norms = (q, rq, k, rk)
    init = C.state(p.initial_state, "initial_state", (b, h, dk, v.shape[3]))
    return Prepared(q=scale * q, k=k, v=v, decay=decay, beta=beta, init=init, scale=scale,
                    chunk=chunk, norms=norms)


def forward_of(spec: Spec):
    def forward(backend, arrays, p):
        pre = prepare(arrays, p, spec)
        o, s = backend.linear_scan(pre.q, pre.k, pre.v, decay=pre.decay, beta=pre.beta,
                                   form=p.form, chunk_size=pre.chunk, initial_state=pre.init)
        return {"out": C.to_caller(backend.to_numpy(o), p.layout), "final_state": backend.to_numpy(s)}
    return forward


def backward_of(spec: Spec):
    def backward(backend, arrays, dout, p):
        pre = prepare(arrays, p, spec)
        d = C.dout_for(dout, pre.v.shape, p.layout)
        g = backend.linear_scan_backward(pre.q, pre.k, pre.v, d, decay=pre.decay, beta=pre.beta,
                                         chunk_size=pre.chunk, initial_state=pre.init)
        dq, dk = pre.scale * g["q"], g["k"]
        if pre.norms is not None:
            qu, rq, ku, rk = pre.norms
            dq, dk = C.l2norm_backward(dq, qu, rq), C.l2norm_backward(dk, ku, rk)
        grads = {"q": dq, "k": dk, "v": g["v"]}
        if spec.gate in ("dim", "head"):
            grads["g"] = g["decay"]
        if spec.delta:
            grads["beta"] = g["beta"]
        grads = {n: C.to_caller(a, p.layout) for n, a in grads.items()}
        if pre.init is not None:
            grads["initial_state"] = g["initial_state"]
        return grads
    return backward


# -- examples: q, k, v and the variant's own inputs --------------------------------------------------
def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def example_of(spec: Spec):
    def example(shape, rng, params):
        arrays = C.example_qkv(shape, rng, params, unit_keys=spec.delta)
        b, h, n, _, d, _ = shape
        if spec.gate == "dim":  # fla's GLA: logsigmoid(x) / 16
            arrays["g"] = C.in_layout(_logsigmoid(rng.standard_normal((b, h, n, d))) / 16, params)
        elif spec.gate == "head":
            arrays["g"] = C.in_layout(_logsigmoid(rng.standard_normal((b, h, n)) + 2.0), params)
        if spec.delta:
            arrays["beta"] = C.in_layout(1.0 / (1.0 + np.exp(-rng.standard_normal((b, h, n)))), params)
        return arrays
    return example


def _register(name, spec, doc, citation, params=ScanParams, extra_shapes=None):
    inputs = ("q", "k", "v") + (("g",) if spec.gate in ("dim", "head") else ()) + (
        ("beta",) if spec.delta else ())
    shapes = {"q": "(B, H, L, Dk)", "k": "(B, H, L, Dk)", "v": "(B, H, L, Dv)"}
    shapes.update(extra_shapes or {})
    register(Variant(
        name=name, family="linear", doc=doc, citation=citation, params=params,
        forward=forward_of(spec), backward=backward_of(spec), backends=("numpy", "numba"),
        tolerance=1e-12, inputs=inputs, input_shapes=shapes, outputs=("out", "final_state"),
        example=example_of(spec), default_shape=(1, 8, 256, 256, 64, 8)))


_register("gla", Spec(gate="dim"),
          "Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t; "
          "log-gates g (B, H, L, Dk) <= 0 (fla's gk).",
          "Yang et al., Gated Linear Attention Transformers with Hardware-Efficient Training, ICML 2024",
          extra_shapes={"g": "(B, H, L, Dk)"})
_register("simple_gla", Spec(gate="head"),
          "GLA with one scalar log-gate per head and step: S_t = exp(g_t) S_{t-1} + k_t v_t^T "
          "(fla's simple_gla; Lightning Attention-2, Mamba-2 without the SSM names).",
          "Yang et al., GLA, ICML 2024; Qin et al., Lightning Attention-2, 2024",
          extra_shapes={"g": "(B, H, L)"})
_register("retention", Spec(gate="retention"),
          "RetNet's retention, recurrent form: S_t = gamma_h S_{t-1} + k_t v_t^T with the fixed "
          "per-head decay gamma_h = 1 - 2^(-5-h) (no group norm, no xPos: those are layer pieces).",
          "Sun et al., Retentive Network: A Successor to Transformer for Large Language Models, 2023")
_register("delta_rule", Spec(delta=True),
          "DeltaNet: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; the chunked (WY) and "
          "parallel forms equal the recurrence.",
          "Schlag et al., Linear Transformers Are Secretly Fast Weight Programmers, ICML 2021; "
          "Yang et al., Parallelizing Linear Transformers with the Delta Rule, NeurIPS 2024",
          params=DeltaParams, extra_shapes={"beta": "(B, H, L)"})
_register("gated_delta_rule", Spec(gate="head", delta=True),
          "Gated DeltaNet: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, one "
          "log-gate per head and step.",
          "Yang, Kautz, Hatamizadeh, Gated Delta Networks: Improving Mamba2 with Delta Rule, ICLR 2025",
          params=DeltaParams, extra_shapes={"g": "(B, H, L)", "beta": "(B, H, L)"})

"""Transformer block pieces (VARIANTS section G): RMSNorm, LayerNorm, dense (GLU or plain) FFN, and a
pre-norm block that composes any registered attention variant with a dense FFN or a mixture of
experts; the registered ``block`` variant (a dense-FFN block on any q, k, v attention variant).

Everything is float64 numpy and written to be read. Conventions (all tested):

* **RMSNorm** ``y = x / sqrt(mean(x², axis=-1) + eps) * weight`` (Zhang & Sennrich 2019; HF
  ``LlamaRMSNorm``, whose float32 cast is not made here: float64 throughout). ``weight`` defaults to
  ones.
* **LayerNorm** ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance (mean
  of squared deviations), over the last axis (Ba et al. 2016; ``torch.nn.LayerNorm``).
* **FFN** on the last axis of ``x (..., d)``: gated (GLU, Shazeer 2020) when ``w_gate`` is given,
  ``(act(x W_gate) * (x W_up)) W_down`` -- SwiGLU for ``activation="silu"`` (Llama, Mixtral,
  DeepSeek), GeGLU for ``"gelu"``; plain otherwise, ``act(x W_up + b_up) W_down + b_down`` (GPT-2's
  GELU MLP, T5/Switch's ReLU ``DenseReluDense``). Weights are ``(d, f)`` and ``(f, d)`` (``x @ W``;
  HF's ``nn.Linear.weight`` is the transpose). Activations: ``silu(a) = a·sigmoid(a)``, ``gelu`` the
  exact ``a·Φ(a)`` (erf), ``gelu_tanh`` the tanh approximation, ``relu``.
* **Pre-norm block** (GPT-2/Llama order)::

      h = x + Attention(Norm_attn(x))
      y = h + FFN(Norm_ffn(h))          # or MoE(Norm_ffn(h)): routing + experts (refattn.moe)

  ``Attention`` is a registered attention variant, always run through :func:`refattn.pipeline.run`
  (on the block's backend): :class:`QKVAttention` projects ``u = Norm_attn(x)`` to
  ``q = u W_q`` (``(B, Hq, S, D)``), ``k``, ``v`` and maps the variant's ``out`` ``(B, Hq, S, Dv)``
  back with ``W_o``: ``a[b, s] = Σ_h out[b, h, s] @ W_o[h]``; :class:`Mixer` does the same for any
  variant, with a ``project(u) -> inputs`` function (:func:`mla_mixer` builds DeepSeek-V3's MLA).
  Projection weights keep their heads: ``w_q (d, Hq, D)``, ``w_k (d, Hkv, D)``, ``w_v (d, Hkv, Dv)``,
  ``w_o (Hq, Dv, d)`` (HF's ``q_proj.weight.T.reshape(d, Hq, D)``; ``o_proj.weight.T.reshape(Hq,
  Dv, d)``).

Backward: :func:`rms_norm_backward`, :func:`layer_norm_backward`, :func:`ffn_backward` and
:func:`block_backward` (a :class:`QKVAttention` block with a dense FFN, or with an MoE whose routing
is held fixed -- the gradient flows through the combine weights into the router); each is checked
against central finite differences.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np

from .. import validate as V
from ..errors import ParameterError, ShapeError, fmt_shape
from . import Variant, param_field, register

__all__ = ["ACTIVATIONS", "NORMS", "activation", "activation_grad", "rms_norm", "rms_norm_backward",
           "layer_norm", "layer_norm_backward", "FFN", "ffn", "ffn_backward", "QKVAttention",
           "Mixer", "mla_mixer", "MoE", "Block", "block_forward", "block_backward"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
NORMS = ("rms", "layer")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# -- checks ------------------------------------------------------------------------------------------
def finite(a, name: str) -> np.ndarray:
    """``a`` as a float64 array with finite values (the one rule, :func:`refattn.validate.check_finite`)."""
    return V.check_finite(V.as_compute(a, name), name)


def shaped(a, name: str, shape: tuple, meaning: str) -> np.ndarray:
    """A finite float64 array of exactly ``shape`` (``None`` entries: any size >= 1)."""
    arr = finite(a, name)
    if arr.ndim != len(shape) or any(w is not None and w != h for w, h in zip(shape, arr.shape)) \
            or 0 in arr.shape:
        want = "(" + ", ".join("n" if w is None else str(w) for w in shape) + \
               ("," if len(shape) == 1 else "") + ")"
        raise ShapeError(f"{name}: expected shape {want} {meaning}, got {fmt_shape(arr.shape)}")
    return arr


def check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(eps) and eps >= 0):
        raise ParameterError(f"{name}: expected a finite number >= 0, got {eps!r}")
    return float(eps)


# -- activations -------------------------------------------------------------------------------------
def _erf(x):
    """``scipy.special.erf``, imported when a GELU needs it: importing scipy.special costs ~0.3 s,
    and every ``import refattn`` registers this module."""
    from scipy.special import erf
    return erf(x)


def activation(a: np.ndarray, name: str) -> np.ndarray:
    """``silu(a) = a / (1 + exp(-a))``, ``gelu(a) = a·Φ(a) = a/2·(1 + erf(a/√2))``,
    ``gelu_tanh(a) = a/2·(1 + tanh(√(2/π)·(a + 0.044715·a³)))``, ``relu(a) = max(a, 0)``."""
    V.check_choice(name, "activation", ACTIVATIONS)
    if name == "silu":
        return a * _sigmoid(a)
    if name == "gelu":
        return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * a * (1.0 + np.tanh(_SQRT_2_OVER_PI * (a + 0.044715 * a ** 3)))
    return np.maximum(a, 0.0)


def activation_grad(a: np.ndarray, name: str) -> np.ndarray:
    """The derivative of :func:`activation` at ``a`` (relu: 0 at 0)."""
    if name == "silu":
        s = _sigmoid(a)
        return s * (1.0 + a * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(a / math.sqrt(2.0))) + a * np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (a + 0.044715 * a ** 3)
        t = np.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * a * a)
    return (a > 0).astype(np.float64)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-a))`` without overflow warnings for large ``|a|``."""
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# -- norms -------------------------------------------------------------------------------------------
def _norm_weight(weight, name, d):
    return np.ones(d) if weight is None else shaped(weight, name, (d,), "(one per feature)")


def _denominator(spread, eps, what):
    """``sqrt(spread + eps)``; a zero with ``eps = 0`` is an error, not a silent 0/0."""
    den = np.sqrt(spread + check_eps(eps))
    if np.any(den == 0):
        raise ParameterError(f"eps: expected eps > 0 for x with a row of zero {what} "
                             f"({int(np.sum(den == 0))} rows), got eps = 0")
    return den


def rms_norm(x, weight=None, *, eps: float = 1e-6) -> np.ndarray:
    """``x / sqrt(mean(x², -1) + eps) * weight`` over the last axis (module docstring)."""
    x = finite(x, "x")
    w = _norm_weight(weight, "weight", x.shape[-1])
    return x / _denominator(np.mean(x * x, axis=-1, keepdims=True), eps, "mean square") * w


def rms_norm_backward(x, weight, dy, *, eps: float = 1e-6) -> tuple:
    """``(dx, dweight)`` of :func:`rms_norm` for the upstream gradient ``dy``.

    With ``r = 1/sqrt(mean(x²) + eps)`` and ``g = dy * weight``:
    ``dx = r·g - x·r³·mean(g·x)``, ``dweight = Σ dy·x·r`` over every leading axis.
    """
    x, dy = finite(x, "x"), finite(dy, "dy")
    w = _norm_weight(weight, "weight", x.shape[-1])
    r = 1.0 / _denominator(np.mean(x * x, axis=-1, keepdims=True), eps, "mean square")
    g = dy * w
    dx = r * g - x * r ** 3 * np.mean(g * x, axis=-1, keepdims=True)
    dw = (dy * x * r).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx, dw


def layer_norm(x, weight=None, bias=None, *, eps: float = 1e-5) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis, biased variance."""
    x = finite(x, "x")
    d = x.shape[-1]
    w = _norm_weight(weight, "weight", d)
    b = np.zeros(d) if bias is None else shaped(bias, "bias", (d,), "(one per feature)")
    xc = x - np.mean(x, axis=-1, keepdims=True)
    return xc / _denominator(np.mean(xc * xc, axis=-1, keepdims=True), eps, "variance") * w + b


def layer_norm_backward(x, weight, dy, *, eps: float = 1e-5) -> tuple:
    """``(dx, dweight, dbias)`` of :func:`layer_norm`: with ``n = (x - mean)·r`` and
    ``g = dy * weight``, ``dx = r·(g - mean(g) - n·mean(g·n))``."""
    x, dy = finite(x, "x"), finite(dy, "dy")
    d = x.shape[-1]
    w = _norm_weight(weight, "weight", d)
    xc = x - np.mean(x, axis=-1, keepdims=True)
    r = 1.0 / _denominator(np.mean(xc * xc, axis=-1, keepdims=True), eps, "variance")
    n = xc * r
    g = dy * w
    dx = r * (g - np.mean(g, axis=-1, keepdims=True) - n * np.mean(g * n, axis=-1, keepdims=True))
    return dx, (dy * n).reshape(-1, d).sum(axis=0), dy.reshape(-1, d).sum(axis=0)


def _norm(kind, x, weight, bias, eps):
    if kind == "rms":
        if bias is not None:
            raise ParameterError("norm: RMSNorm has no bias; give norm='layer' for a LayerNorm bias")
        return rms_norm(x, weight, eps=eps)
    return layer_norm(x, weight, bias, eps=eps)


def _norm_backward(kind, x, weight, bias, dy, eps):
    if kind == "rms":
        dx, dw = rms_norm_backward(x, weight, dy, eps=eps)
        return dx, dw, None
    return layer_norm_backward(x, weight, dy, eps=eps)


# -- FFN ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FFN:
    """A feed-forward network's weights: ``w_up (d, f)``, ``w_down (f, d)``, ``w_gate (d, f)`` or
    None, optional biases ``b_up (f,)``, ``b_down (d,)`` (plain FFN only), and the activation.

    Stacked experts (:mod:`refattn.moe`) use the same record with a leading expert axis:
    ``w_gate``/``w_up (E, d, f)``, ``w_down (E, f, d)``.
    """

    w_up: Any
    w_down: Any
    w_gate: Any = None
    activation: str = "silu"
    b_up: Any = None
    b_down: Any = None

    def checked(self, d: int, prefix: str = "", stacked: Optional[bool] = None) -> "FFN":
        """Validated float64 copy for inputs with ``d`` features; messages name the weights
        ``prefix + "w_up"`` etc. ``stacked``: True requires a leading expert axis, False forbids it,
        None accepts either (stacked FFNs are summed)."""
        V.check_choice(self.activation, "activation", ACTIVATIONS)
        pre = prefix
        up = finite(self.w_up, pre + "w_up")
        want = {True: "(E, d, f)", False: "(d, f)", None: "(d, f) or (E, d, f)"}[stacked]
        if (up.ndim not in (2, 3) or (stacked is True and up.ndim != 3)
                or (stacked is False and up.ndim != 2) or up.shape[-2] != d or 0 in up.shape):
            raise ShapeError(f"{pre}w_up: expected {want} with d = {d} (the features of x), "
                             f"got {fmt_shape(up.shape)}")
        lead = up.shape[:-2]
        f = up.shape[-1]
        down = shaped(self.w_down, pre + "w_down", lead + (f, d), "(f, d): back to the model width")
        gate = None
        if self.w_gate is not None:
            gate = shaped(self.w_gate, pre + "w_gate", up.shape, "as w_up")
        if (self.b_up is not None or self.b_down is not None) and (gate is not None or lead):
            raise ParameterError(f"{pre}b_up: biases apply to a plain (non-gated, non-stacked) FFN")
        b_up = None if self.b_up is None else shaped(self.b_up, pre + "b_up", (f,), "(f,)")
        b_down = None if self.b_down is None else shaped(self.b_down, pre + "b_down", (d,), "(d,)")
        return FFN(up, down, gate, self.activation, b_up, b_down)

    @property
    def stacked(self) -> bool:
        return np.ndim(self.w_up) == 3


def _ffn_one(x, w_up, w_down, w_gate, act, b_up=None, b_down=None):
    """``(y, cache)`` of one FFN on ``x (n, d)``."""
    a = x @ w_up if b_up is None else x @ w_up + b_up
    if w_gate is None:
        g = None
        h = activation(a, act)
    else:
        g = x @ w_gate
        h = activation(g, act) * a
    y = h @ w_down if b_down is None else h @ w_down + b_down
    return y, (a, g, h)


def _ffn_one_backward(x, w_up, w_down, w_gate, act, cache, dy):
    """``(dx, {w_up, w_down, w_gate?, b_up, b_down})`` of :func:`_ffn_one`."""
    a, g, h = cache
    dh = dy @ w_down.T
    grads = {"w_down": h.T @ dy, "b_down": dy.sum(axis=0)}
    if w_gate is None:
        da = dh * activation_grad(a, act)
        dx = da @ w_up.T
    else:
        da = dh * activation(g, act)
        dg = dh * a * activation_grad(g, act)
        grads["w_gate"] = x.T @ dg
        dx = da @ w_up.T + dg @ w_gate.T
    grads["w_up"] = x.T @ da
    grads["b_up"] = da.sum(axis=0)
    return dx, grads


def ffn(x, weights: FFN) -> np.ndarray:
    """The FFN of the module docstring on ``x (..., d)``; a stacked (3-D) FFN is the sum of its
    members (DeepSeek's shared experts)."""
    x = finite(x, "x")
    w = weights.checked(x.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    if not w.stacked:
        y, _ = _ffn_one(flat, w.w_up, w.w_down, w.w_gate, w.activation, w.b_up, w.b_down)
    else:
        y = sum(_ffn_one(flat, w.w_up[e], w.w_down[e], None if w.w_gate is None else w.w_gate[e],
                         w.activation)[0] for e in range(w.w_up.shape[0]))
    return y.reshape(x.shape)


def ffn_backward(x, weights: FFN, dy) -> tuple:
    """``(dx, grads)`` of :func:`ffn`: ``grads`` has ``w_up``, ``w_down``, ``w_gate`` (gated) and
    ``b_up``/``b_down`` (where given), in the weights' shapes."""
    x, dy = finite(x, "x"), finite(dy, "dy")
    w = weights.checked(x.shape[-1])
    if dy.shape != x.shape:
        raise ShapeError(f"dy: expected the output's shape {fmt_shape(x.shape)}, got {fmt_shape(dy.shape)}")
    flat, dflat = x.reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1])
    members = [None] if not w.stacked else list(range(w.w_up.shape[0]))
    dx = np.zeros_like(flat)
    grads = {}
    for e in members:
        pick = (lambda a: a) if e is None else (lambda a: None if a is None else a[e])
        args = (pick(w.w_up), pick(w.w_down), pick(w.w_gate), w.activation)
        _, cache = _ffn_one(flat, *args, w.b_up, w.b_down)
        ddx, g = _ffn_one_backward(flat, *args, cache, dflat)
        dx += ddx
        for n, a in g.items():
            if e is None:
                grads[n] = a
            else:
                grads.setdefault(n, []).append(a)
    if w.stacked:
        grads = {n: np.stack(a) for n, a in grads.items() if n not in ("b_up", "b_down")}
    else:
        grads = {n: a for n, a in grads.items() if not (n == "b_up" and w.b_up is None)
                 and not (n == "b_down" and w.b_down is None)}
    if w.w_gate is None:
        grads.pop("w_gate", None)
    return dx.reshape(x.shape), grads


# -- token mixers: a registered attention variant between two projections ---------------------------
def _attention_params(params, name: str = "attention_params") -> dict:
    """A variant's parameters from a dict or its JSON text (for the CLI and golden cases)."""
    if params is None:
        return {}
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError as exc:
            raise ParameterError(f"{name}: expected a dict or JSON object text, got {params!r} "
                                 f"({exc})") from None
    if not isinstance(params, dict):
        raise ParameterError(f"{name}: expected a dict or JSON object text, got {params!r}")
    bad = sorted(n for n in params if n.startswith("return_") or n == "layout" and params[n] != "bhsd")
    if bad:
        raise ParameterError(f"{name}: the block uses the variant's out in layout bhsd, so "
                             f"{bad[0]!r} cannot be set, got {bad[0]}={params[bad[0]]!r}")
    return dict(params)


def _out_projection(out, w_o, b_o):
    """``a[b, s] = Σ_h out[b, h, s] @ w_o[h] (+ b_o)`` for ``out (B, H, S, Dv)``, ``w_o (H, Dv, d)``."""
    a = np.einsum("bhse,hed->bsd", out, w_o)
    return a if b_o is None else a + b_o


@dataclass(frozen=True)
class QKVAttention:
    """Attention through a registered variant on ``q, k, v``: ``q = u @ w_q (+ b_q)`` per head
    (``w_q (d, Hq, D)``, ``w_k (d, Hkv, D)``, ``w_v (d, Hkv, Dv)``), the variant ``variant`` with
    ``params`` (a dict or JSON text; e.g. ``variant="rope", params={"causal": True, "base": 1e4}``)
    and extra ``inputs`` (t5's ``table``...), then ``w_o (Hq, Dv, d)`` (+ ``b_o``)."""

    w_q: Any
    w_k: Any
    w_v: Any
    w_o: Any
    variant: str = "sdpa"
    params: Any = None
    b_q: Any = None
    b_k: Any = None
    b_v: Any = None
    b_o: Any = None
    inputs: Any = None

    def checked(self, d: int) -> "QKVAttention":
        from .. import pipeline
        var = pipeline.variant_of(self.variant)
        if not var.on_qkv:
            raise ParameterError(f"attention: expected a variant on q, k, v (the block projects to "
                                 f"them); {var.name!r} takes {', '.join(var.inputs)} -- use "
                                 f"refattn.block.Mixer with a project function for it")
        w_q = shaped(self.w_q, "w_q", (d, None, None), f"(d, Hq, D) with d = {d}")
        hq, dh = w_q.shape[1:]
        w_k = shaped(self.w_k, "w_k", (d, None, dh), f"(d, Hkv, D) with d = {d}, D = {dh}")
        hkv = w_k.shape[1]
        w_v = shaped(self.w_v, "w_v", (d, hkv, None), f"(d, Hkv, Dv) with d = {d}, Hkv = {hkv}")
        dv = w_v.shape[2]
        w_o = shaped(self.w_o, "w_o", (hq, dv, d), f"(Hq, Dv, d) = ({hq}, {dv}, {d})")
        b = {n: None if getattr(self, n) is None else shaped(getattr(self, n), n, shape, meaning)
             for n, shape, meaning in (("b_q", (hq, dh), "(Hq, D)"), ("b_k", (hkv, dh), "(Hkv, D)"),
                                       ("b_v", (hkv, dv), "(Hkv, Dv)"), ("b_o", (d,), "(d,)"))}
        extra = dict(self.inputs or {})
        clash = sorted(set(extra) & {"q", "k", "v"})
        if clash:
            raise ParameterError(f"inputs: {clash[0]!r} is made by the projections; give only the "
                                 f"variant's other inputs ({', '.join(var.inputs[3:]) or 'none'})")
        missing = [n for n in var.inputs[3:] if n not in extra]
        if missing:
            raise ParameterError(f"inputs: variant {var.name!r} also takes {', '.join(missing)}; "
                                 f"pass them as QKVAttention(..., inputs={{...}}) (the registered "
                                 f"block variant makes only q, k, v)")
        return replace(self, w_q=w_q, w_k=w_k, w_v=w_v, w_o=w_o, variant=var.name,
                       params=_attention_params(self.params, "params"), inputs=extra, **b)

    def project(self, u) -> dict:
        def proj(w, bias):
            y = np.einsum("bsd,dhe->bhse", u, w)
            return y if bias is None else y + bias[None, :, None, :]
        return {"q": proj(self.w_q, self.b_q), "k": proj(self.w_k, self.b_k),
                "v": proj(self.w_v, self.b_v), **self.inputs}


@dataclass(frozen=True)
class Mixer:
    """Any registered attention variant as a token mixer: ``project(u)`` maps the normalised hidden
    states ``u (B, S, d)`` to the variant's inputs (a dict by name), the variant runs with
    ``params``, and ``w_o (H, Dv, d)`` (+ ``b_o``) maps its ``out (B, H, S, Dv)`` back."""

    variant: str
    project: Callable
    w_o: Any
    params: Any = None
    b_o: Any = None

    def checked(self, d: int) -> "Mixer":
        from .. import pipeline
        var = pipeline.variant_of(self.variant)
        if not callable(self.project):
            raise ParameterError(f"project: expected a function u -> inputs of {var.name!r}, got "
                                 f"{type(self.project).__name__}")
        w_o = shaped(self.w_o, "w_o", (None, None, d), f"(H, Dv, d) with d = {d}")
        b_o = None if self.b_o is None else shaped(self.b_o, "b_o", (d,), "(d,)")
        return replace(self, variant=var.name, w_o=w_o, b_o=b_o,
                       params=_attention_params(self.params, "params"))


def mla_mixer(*, w_dkv, w_kr, w_uk, w_uv, w_o, w_q=None, w_dq=None, q_norm=None, w_uq=None,
              kv_norm=None, eps: float = 1e-6, params=None) -> Mixer:
    """DeepSeek-V2/V3 Multi-head Latent Attention as a :class:`Mixer` over refattn's ``mla`` variant.

    Weights (``x @ W`` layout): ``w_dkv (d, d_c)`` and ``w_kr (d, d_rope)`` (HF's
    ``kv_a_proj_with_mqa`` split), ``kv_norm (d_c,)`` (HF's ``kv_a_layernorm``), ``w_uk (H, d_c,
    d_nope)`` and ``w_uv (H, d_c, d_v)`` (``kv_b_proj``), ``w_o (H, d_v, d)``; queries from
    ``w_q (d, H, d_nope + d_rope)`` or, with q-LoRA, ``u @ w_dq`` (``(d, d_q)``), RMSNorm with
    ``q_norm (d_q,)``, then ``w_uq (d_q, H, d_nope + d_rope)``. ``params`` go to ``mla`` (``causal``,
    ``base``, ``style="gptj"`` for DeepSeek's interleaved rope, ``scale``...).

    This mixer predates ``mla``'s own ``kv_norm``/q-LoRA parameters (which :mod:`refattn.hf` uses);
    it computes the normalised latent ``c = RMSNorm(u @ w_dkv) * kv_norm`` and the rope input
    ``u @ w_kr`` here and hands ``mla`` ``hidden = [c, u @ w_kr]`` with identity down-projections
    ``[[I], [0]]`` and ``[[0], [I]]`` (multiplying by 1 and adding zeros is exact in floating point).
    """
    w_dkv, w_kr = finite(w_dkv, "w_dkv"), finite(w_kr, "w_kr")
    for n, a in (("w_dkv", w_dkv), ("w_kr", w_kr)):
        if a.ndim != 2 or a.shape[0] != w_dkv.shape[0]:
            raise ShapeError(f"{n}: expected (d, n) with d = {w_dkv.shape[0] if w_dkv.ndim else '?'}, "
                             f"got {fmt_shape(a.shape)}")
    d, dc = w_dkv.shape
    dr = w_kr.shape[1]
    if (w_q is None) == (w_dq is None):
        raise ParameterError("w_q: expected either w_q or the q-LoRA weights (w_dq, w_uq), got "
                             + ("both" if w_q is not None else "neither"))
    if w_dq is not None and w_uq is None:
        raise ParameterError("w_uq: the q-LoRA path needs w_dq and w_uq")
    w_q = None if w_q is None else finite(w_q, "w_q")
    w_dq = None if w_dq is None else finite(w_dq, "w_dq")
    w_uq = None if w_uq is None else finite(w_uq, "w_uq")
    kv_norm = None if kv_norm is None else shaped(kv_norm, "kv_norm", (dc,), "(d_c,)")
    eye = np.eye(dc + dr)

    def project(u):
        if w_q is not None:
            q = np.einsum("bsd,dhe->bhse", u, w_q)
        else:
            q = np.einsum("bsr,rhe->bhse", rms_norm(u @ w_dq, q_norm, eps=eps), w_uq)
        c = rms_norm(u @ w_dkv, kv_norm, eps=eps)
        return {"q": q, "hidden": np.concatenate([c, u @ w_kr], axis=-1), "w_dkv": eye[:, :dc],
                "w_kr": eye[:, dc:], "w_uk": w_uk, "w_uv": w_uv}

    return Mixer("mla", project, w_o, params=params)


# -- the block ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoE:
    """An MoE feed-forward for :class:`Block`: ``w_router (d, E)``, stacked ``experts``
    (:class:`FFN` with ``(E, d, f)`` weights), optional ``shared`` experts, and ``routing``: the
    keyword arguments of :func:`refattn.moe.route` (``preset``, ``k``, ``capacity_factor``...)."""

    w_router: Any
    experts: FFN
    shared: Optional[FFN] = None
    routing: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Block:
    """A pre-norm block (module docstring): ``attention`` (:class:`QKVAttention` or
    :class:`Mixer`), ``ffn`` (:class:`FFN` or :class:`MoE`), ``norm`` ``"rms"`` or ``"layer"`` with
    ``eps``, and the two norms' weights (default ones) and LayerNorm biases (default zeros)."""

    attention: Any
    ffn: Any
    norm: str = "rms"
    eps: float = 1e-6
    attn_norm: Any = None
    ffn_norm: Any = None
    attn_norm_bias: Any = None
    ffn_norm_bias: Any = None


def _block_input(x, block):
    x = finite(x, "x")
    if x.ndim != 3 or 0 in x.shape:
        raise ShapeError(f"x: expected (B, S, d) hidden states, got {fmt_shape(x.shape)}")
    if not isinstance(block, Block):
        raise ParameterError(f"block: expected a refattn.block.Block, got {type(block).__name__}")
    V.check_choice(block.norm, "norm", NORMS)
    check_eps(block.eps)
    if not isinstance(block.attention, (QKVAttention, Mixer)):
        raise ParameterError(f"attention: expected a QKVAttention or a Mixer, got "
                             f"{type(block.attention).__name__}")
    if not isinstance(block.ffn, (FFN, MoE)):
        raise ParameterError(f"ffn: expected an FFN or an MoE, got {type(block.ffn).__name__}")
    d = x.shape[2]
    for name in ("attn_norm", "ffn_norm", "attn_norm_bias", "ffn_norm_bias"):
        if getattr(block, name) is not None:  # checked here so that messages name them
            shaped(getattr(block, name), name, (d,), "(one per feature)")
    return x, block.attention.checked(d)


def _attend(mixer, u, backend, dout=None):
    """The variant's result on the mixer's inputs, through the one pipeline."""
    from .. import pipeline
    return pipeline.run(mixer.variant, backend, mixer.project(u), mixer.params, dout=dout,
                        forward=dout is None)


def _moe_parts(moe: MoE, v):
    from .moe import route
    return route(v, moe.w_router, **dict(moe.routing))


def block_forward(x, block: Block, *, backend="numpy", return_routing: bool = False):
    """The block's output ``y (B, S, d)`` for ``x (B, S, d)`` (module docstring); with
    ``return_routing=True`` (an MoE block) ``(y, routing)``. The attention variant runs on
    ``backend`` (a name or a Backend instance) through :func:`refattn.pipeline.run`."""
    x, mixer = _block_input(x, block)
    V.check_bool(return_routing, "return_routing")
    u = _norm(block.norm, x, block.attn_norm, block.attn_norm_bias, block.eps)
    out = np.asarray(_attend(mixer, u, backend).outputs["out"], dtype=np.float64)
    h = x + _out_projection(out, mixer.w_o, mixer.b_o)
    v = _norm(block.norm, h, block.ffn_norm, block.ffn_norm_bias, block.eps)
    routing = None
    if isinstance(block.ffn, FFN):
        f = ffn(v, block.ffn)
    else:
        from .moe import moe_forward
        routing = _moe_parts(block.ffn, v)
        f = moe_forward(v, routing, block.ffn.experts, block.ffn.shared)
    y = h + f
    return (y, routing) if return_routing else y


def block_backward(x, block: Block, dout, *, backend="numpy") -> dict:
    """Gradients of ``sum(block_forward(x, block) * dout)``: ``x``, ``attn_norm``, ``ffn_norm``
    (and ``attn_norm_bias``, ``ffn_norm_bias`` for LayerNorm), ``w_q``, ``w_k``, ``w_v``, ``w_o``
    (and given biases), the FFN's weights (``w_up``, ``w_down``, ``w_gate``, ``b_up``, ``b_down``)
    or the MoE's (``w_router``, ``w_gate``, ``w_up``, ``w_down``, ``router_bias``, ``shared_*``;
    routing held fixed), and the attention variant's own extra gradients as ``attention.<name>``.
    Needs a :class:`QKVAttention` (a :class:`Mixer`'s projection is opaque)."""
    x, mixer = _block_input(x, block)
    if not isinstance(mixer, QKVAttention):
        raise ParameterError("attention: the block's backward needs a QKVAttention (a Mixer's "
                             "project function cannot be differentiated)")
    dy = finite(dout, "dout")
    if dy.shape != x.shape:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(x.shape)}, got {fmt_shape(dy.shape)}")
    kind, eps = block.norm, block.eps
    u = _norm(kind, x, block.attn_norm, block.attn_norm_bias, eps)
    out = np.asarray(_attend(mixer, u, backend).outputs["out"], dtype=np.float64)
    h = x + _out_projection(out, mixer.w_o, mixer.b_o)
    v = _norm(kind, h, block.ffn_norm, block.ffn_norm_bias, eps)
    grads = {}
    if isinstance(block.ffn, FFN):
        dv, g = ffn_backward(v, block.ffn, dy)
    else:
        from .moe import moe_backward
        moe = block.ffn
        routing = _moe_parts(moe, v)
        g = moe_backward(v, moe.w_router, routing, moe.experts, dy, moe.shared)
        dv = g.pop("x")
        for n in ("combine", "weights"):
            g.pop(n)
    grads.update(g)
    dh_norm, grads["ffn_norm"], db = _norm_backward(kind, h, block.ffn_norm, block.ffn_norm_bias, dv, eps)
    if db is not None:
        grads["ffn_norm_bias"] = db
    dh = dy + dh_norm
    grads["w_o"] = np.einsum("bhse,bsd->hed", out, dh)
    if mixer.b_o is not None:
        grads["b_o"] = dh.sum(axis=(0, 1))
    d_out = np.einsum("bsd,hed->bhse", dh, mixer.w_o)
    res = _attend(mixer, u, backend, dout=d_out)
    att = {n: np.asarray(a, dtype=np.float64) for n, a in res.grads.items()}
    du = np.zeros_like(u)
    for n in ("q", "k", "v"):
        dp = att.pop(n)
        grads[f"w_{n}"] = np.einsum("bsd,bhse->dhe", u, dp)
        if getattr(mixer, f"b_{n}") is not None:
            grads[f"b_{n}"] = dp.sum(axis=(0, 2))
        du += np.einsum("bhse,dhe->bsd", dp, getattr(mixer, f"w_{n}"))
    grads.update({f"attention.{n}": a for n, a in att.items()})
    dx_norm, grads["attn_norm"], db = _norm_backward(kind, x, block.attn_norm, block.attn_norm_bias, du, eps)
    if db is not None:
        grads["attn_norm_bias"] = db
    grads["x"] = dh + dx_norm
    return grads


# -- the registered variant ----------------------------------------------------------------------
@dataclass(frozen=True)
class BlockParams:
    """Parameters of the registered ``block`` variant (a dense FFN)."""

    attention: str = param_field("sdpa", "attention variant on q, k, v (run through the one pipeline on the block's backend)")
    attention_params: Any = param_field(None, "its parameters: a dict or JSON text, e.g. '{\"causal\": true}'")
    norm: str = param_field("rms", "'rms' (RMSNorm) or 'layer' (LayerNorm), both pre-norm")
    eps: float = param_field(1e-6, "the norms' epsilon")
    attn_norm: Any = param_field(None, "(d,) weight of the attention's norm; default ones")
    ffn_norm: Any = param_field(None, "(d,) weight of the FFN's norm; default ones")
    attn_norm_bias: Any = param_field(None, "(d,) LayerNorm bias before the attention; default zeros")
    ffn_norm_bias: Any = param_field(None, "(d,) LayerNorm bias before the FFN; default zeros")
    w_gate: Any = param_field(None, "(d, f) gate projection: a gated FFN (SwiGLU with silu)")
    activation: str = param_field("silu", "FFN activation: silu, gelu, gelu_tanh, relu")


def _variant_block(arrays, p: BlockParams) -> Block:
    attention = QKVAttention(arrays["w_q"], arrays["w_k"], arrays["w_v"], arrays["w_o"],
                             variant=p.attention, params=_attention_params(p.attention_params))
    return Block(attention, FFN(arrays["w_up"], arrays["w_down"], p.w_gate, p.activation),
                 norm=p.norm, eps=p.eps, attn_norm=p.attn_norm, ffn_norm=p.ffn_norm,
                 attn_norm_bias=p.attn_norm_bias, ffn_norm_bias=p.ffn_norm_bias)


def _block_forward(backend, arrays, p: BlockParams):
    return {"out": block_forward(arrays["x"], _variant_block(arrays, p), backend=backend)}


def _block_backward(backend, arrays, dout, p: BlockParams):
    g = block_backward(arrays["x"], _variant_block(arrays, p), dout, backend=backend)
    out = {n: g[n] for n in ("x", "w_q", "w_k", "w_v", "w_o", "w_up", "w_down")}
    for n in ("attn_norm", "ffn_norm", "attn_norm_bias", "ffn_norm_bias", "w_gate"):
        if getattr(p, n) is not None:
            out[n] = g[n]
    out.update({n: a for n, a in g.items() if n.startswith("attention.")})
    return out


def _block_example(shape, rng, params):
    """Self-attention over the Sq tokens (Sk is not used): ``x (B, Sq, d)`` with ``d = Hq·D``,
    projections per head, an FFN of width ``2d``; weights scaled by 1/sqrt(fan_in)."""
    b, hq, sq, sk, dh, hkv = shape
    d, f = hq * dh, 2 * hq * dh
    return {"x": rng.standard_normal((b, sq, d)),
            "w_q": rng.standard_normal((d, hq, dh)) / math.sqrt(d),
            "w_k": rng.standard_normal((d, hkv, dh)) / math.sqrt(d),
            "w_v": rng.standard_normal((d, hkv, dh)) / math.sqrt(d),
            "w_o": rng.standard_normal((hq, dh, d)) / math.sqrt(hq * dh),
            "w_up": rng.standard_normal((d, f)) / math.sqrt(d),
            "w_down": rng.standard_normal((f, d)) / math.sqrt(f)}


register(Variant(
    name="block", family="block",
    doc="Pre-norm transformer block: h = x + W_o·Attn(Norm(x) W_q, W_k, W_v), y = h + FFN(Norm(h)); "
    "any attention variant on q, k, v (through the one pipeline, on the block's backend), RMSNorm or "
    "LayerNorm, SwiGLU (w_gate) or plain GELU/ReLU FFN. Backward for every weight.",
    citation="Xiong et al., On Layer Normalization in the Transformer Architecture, ICML 2020; "
    "Touvron et al., LLaMA, 2023", params=BlockParams, forward=_block_forward,
    backward=_block_backward, backends=("numpy", "numba"),
    inputs=("x", "w_q", "w_k", "w_v", "w_o", "w_up", "w_down"),
    input_shapes={"x": "(B, S, d)", "w_q": "(d, Hq, D)", "w_k": "(d, Hkv, D)", "w_v": "(d, Hkv, Dv)",
                  "w_o": "(Hq, Dv, d)", "w_up": "(d, f)", "w_down": "(f, d)"},
    outputs=("out",), example=_block_example, default_shape=(2, 4, 64, 64, 16, 2), tolerance=1e-12))

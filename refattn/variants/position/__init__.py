"""Position variants: ``rope``, ``alibi``, ``t5``, ``transformer_xl``, ``nope`` (VARIANTS section B).

Each is sdpa (:mod:`refattn.variants.core`, every core knob still works) plus a position term built
with :mod:`refattn.position`, then the backend's ``attend``, so every backend with ``attend`` runs them:

* ``rope``: q and k rotated at their positions, then sdpa. Keys sit at ``0 .. Sk-1`` and query ``i``
  at ``i + s`` (``s = Sk - Sq`` bottom-right, 0 top-left) unless ``q_positions``/``k_positions`` are
  given. ``scaling`` is HF's dict (or its JSON text, for the CLI and golden files).
* ``alibi``: sdpa with ``alibi_slopes`` defaulting to the paper's slopes for ``Hq`` heads.
* ``t5``: sdpa with ``scale=1`` by default and the bias ``table[bucket(j - (i + s)), h]`` from the
  input ``table (num_buckets, Hq)``.
* ``transformer_xl``: causal; keys are ``[memory; segment]``; inputs ``pos_k (Hq, Sk, D)`` (``W_R R_d``
  for distances ``d``), ``bias_u``, ``bias_v (Hq, D)``; score ``scale * ((q + u)·k + (q + v)·W_R R)``.
* ``nope``: no position information at all (sdpa under another name, for baselines).

LSE: as sdpa's, over the modified scores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from refattn.backends.base import ScoreMod
from . import encodings as P
from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from ...patterns import diagonal_offset
from .. import Variant, param_field, register
from ..core import (CoreParams, _backward, _forward, backward_prepared, example as core_example,
                   finish, prepare, to_layout)

_BACKENDS = ("numpy", "numba", "cupy")


def alignment_of(p: CoreParams) -> str:
    """The alignment actually used: ``causal="top_left"|"bottom_right"`` overrides ``alignment``."""
    return p.causal if isinstance(p.causal, str) else p.alignment


def with_bias(pre, extra, scale_by: float = 1.0):
    """``pre`` with ``extra`` (broadcastable to ``(B, Hq, Sq, Sk)``) added to its score bias."""
    sm = pre.score_mod or ScoreMod()
    extra = np.asarray(np.asarray(extra, dtype=np.float64) * scale_by, dtype=pre.q.dtype)  # compute dtype
    extra = extra.reshape((1,) * (4 - extra.ndim) + extra.shape)
    bias = extra if sm.bias is None else sm.bias + extra
    mod = ScoreMod(softcap=sm.softcap, alibi_slopes=sm.alibi_slopes, alibi_form=sm.alibi_form, bias=bias)
    return dataclasses.replace(pre, score_mod=mod)


def attend_finish(backend, pre, p):
    out, lse = backend.attend(pre.q, pre.k, pre.v, **pre.primitive_kwargs())
    return finish(backend.to_numpy(out), backend.to_numpy(lse), p)


def reduce_to(x, shape):
    """Sum ``x`` (4-d) down to a user's broadcastable ``shape`` (rank <= 4, numpy rules)."""
    shape = tuple(shape)
    padded = (1,) * (4 - len(shape)) + shape
    axes = tuple(a for a in range(4) if padded[a] == 1 and x.shape[a] != 1)
    return (x.sum(axis=axes, keepdims=True) if axes else x).reshape(shape)


def user_bias_grad(extras, p):
    """Keep ``extras["bias"]`` only where the caller gave a bias, in the caller's shape."""
    ds = extras.pop("bias", None)
    if ds is not None and p.bias is not None:
        extras["bias"] = reduce_to(ds, np.shape(p.bias))
    return ds, extras


def to_caller(grads, p):
    return tuple(to_layout(g, p) for g in grads)


# -- rope ----------------------------------------------------------------------------------------------
def parse_scaling(scaling):
    """An HF scaling dict from a dict, None, or its JSON text (``--param 'scaling={"rope_type": ...}'``)."""
    if scaling is None or isinstance(scaling, dict):
        return scaling
    if isinstance(scaling, str):
        try:
            value = json.loads(scaling)
        except json.JSONDecodeError as exc:
            raise ParameterError(f"scaling: expected a dict or its JSON text, got {scaling!r} ({exc.msg})")
        if isinstance(value, dict):
            return value
    raise ParameterError(f"scaling: expected a dict or its JSON text, got {scaling!r}")


@dataclass(frozen=True)
class RopeParams(CoreParams):
    base: Optional[float] = param_field(None, "RoPE base theta; default 10000 (or the dict's rope_theta)")
    rotary_dim: Optional[int] = param_field(None, "rotate the first rotary_dim dims (even, <= D); default D")
    style: str = param_field("neox", "'neox' (rotate_half, HF Llama) or 'gptj' (interleaved pairs)")
    # annotated str so the CLI passes --param scaling='{"rope_type": ...}' through as text; a dict works too
    scaling: Optional[str] = param_field(None, "HF rope_scaling / rope_parameters dict, or its JSON text")
    max_position_embeddings: Optional[int] = param_field(None, "needed by 'dynamic' and 'longrope'")
    q_positions: Any = param_field(None, "(Sq,) or (B, Sq) query positions; default i + s")
    k_positions: Any = param_field(None, "(Sk,) or (B, Sk) key positions; default 0 .. Sk-1")


def rope_positions(p, sq, sk):
    """``(q_positions, k_positions)``: the given ones, or ``i + s`` and ``0 .. Sk-1``."""
    s = diagonal_offset(alignment_of(p), sq, sk)
    qp = np.arange(sq) + s if p.q_positions is None else p.q_positions
    kp = np.arange(sk) if p.k_positions is None else p.k_positions
    if p.q_positions is None and s < 0:
        raise ParameterError(f"q_positions: default positions i + s are negative (Sq={sq} > Sk={sk}, "
                             f"bottom-right); pass q_positions= or alignment='top_left'")
    return qp, kp


def _rotate(x, positions, name, **kw):
    """:func:`refattn.position.rope`, with errors about ``positions`` naming ``name`` instead."""
    try:
        return P.rope(x, positions, **kw)
    except (ShapeError, ParameterError) as exc:
        if not str(exc).startswith("positions:"):
            raise
        raise type(exc)(name + str(exc)[len("positions"):]) from None


def _rope_prepare(backend, arrays, p: RopeParams):
    """Prepared inputs with q and k rotated, and ``rotate(x, which, inverse)`` for the gradients."""
    pre = prepare(backend, arrays, p)
    sq = pre.q.shape[2]
    qp, kp = rope_positions(p, sq, pre.k.shape[2])
    # one seq_len for q and k (dynamic / longrope choose their frequencies from it)
    seq_len = int(max(np.max(qp, initial=0), np.max(kp, initial=0))) + 1
    kw = dict(base=p.base, rotary_dim=p.rotary_dim, style=p.style, scaling=parse_scaling(p.scaling),
              max_position_embeddings=p.max_position_embeddings, seq_len=seq_len)

    def rotate(x, which, inverse=False):
        return _rotate(x, qp if which == "q" else kp, f"{which}_positions", inverse=inverse, **kw)

    dtype = pre.q.dtype  # the compute dtype (rope itself works in float64)
    pre = dataclasses.replace(pre, q=backend.asarray(rotate(pre.q, "q"), dtype=dtype),
                              k=backend.asarray(rotate(pre.k, "k"), dtype=dtype))
    return pre, rotate


def _rope_forward(backend, arrays, p: RopeParams):
    return attend_finish(backend, _rope_prepare(backend, arrays, p)[0], p)


def _rope_backward(backend, arrays, dout, p: RopeParams):
    """The rotation is linear: ``dq = R(p)ᵀ dq_rotated``, ``dk = R(p')ᵀ dk_rotated``."""
    pre, rotate = _rope_prepare(backend, arrays, p)
    dq, dk, dv, extras = backward_prepared(backend, pre, dout, p)
    _, extras = user_bias_grad(extras, p)
    return (*to_caller((rotate(dq, "q", True), rotate(dk, "k", True), dv), p), extras)


register(Variant(
    name="rope", family="position",
    doc="Rotary position embedding: q and k rotated by position-dependent angles (neox or gptj "
    "pairing, partial rotary_dim, HF scalings linear/dynamic/yarn/longrope/llama3/proportional), then sdpa.",
    citation="Su et al., RoFormer: Enhanced Transformer with Rotary Position Embedding, 2021",
    params=RopeParams, forward=_rope_forward, backward=_rope_backward, backends=_BACKENDS,
    example=core_example))


# -- alibi ---------------------------------------------------------------------------------------------
def _alibi_params(arrays, p):
    if p.alibi_slopes is not None:
        return p
    q = V.to_numpy(arrays["q"], "q")
    if q.ndim != 4:
        V.check_rank4(q, "q", p.layout)
    hq = q.shape[1] if p.layout == "bhsd" else q.shape[2]
    return dataclasses.replace(p, alibi_slopes=P.alibi_slopes(hq))


def _alibi_forward(backend, arrays, p):
    return _forward(None)(backend, arrays, _alibi_params(arrays, p))


def _alibi_backward(backend, arrays, dout, p):
    return _backward(None)(backend, arrays, dout, _alibi_params(arrays, p))


register(Variant(
    name="alibi", family="position",
    doc="ALiBi: sdpa plus -slope_h * |i + s - j| with the paper's slopes for Hq heads (including "
    "non-powers of two) unless alibi_slopes= is given; alibi_form='flash' for flash-attn's LSE.",
    citation="Press et al., Train Short, Test Long: Attention with Linear Biases, ICLR 2022",
    params=CoreParams, forward=_alibi_forward, backward=_alibi_backward, backends=_BACKENDS,
    example=core_example))


# -- t5 --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class T5Params(CoreParams):
    scale: Optional[float] = param_field(1.0, "score scale; T5 uses 1 (no 1/sqrt(D))")
    bidirectional: bool = param_field(True, "encoder (True) or decoder buckets (False)")
    num_buckets: int = param_field(32, "rows of the table (the example builds one this size)")
    max_distance: int = param_field(128, "distance where the logarithmic buckets end")


def _t5_prepare(backend, arrays, p: T5Params):
    pre = prepare(backend, arrays, p)
    table = V.as_compute(arrays["table"], "table")
    hq, sq, sk = pre.q.shape[1], pre.q.shape[2], pre.k.shape[2]
    if table.shape != (p.num_buckets, hq):
        raise ShapeError(f"table: expected ({p.num_buckets}, {hq}) = (num_buckets, Hq), "
                         f"got {fmt_shape(table.shape)}")
    buckets = P.t5_relative_bucket(P.relative_distances(sq, sk, alignment_of(p)),
                                   bidirectional=p.bidirectional, num_buckets=p.num_buckets,
                                   max_distance=p.max_distance)
    bias = np.moveaxis(table[buckets], -1, 0)  # = P.t5_bias(table, ...), (H, Sq, Sk)
    return with_bias(pre, bias[None]), buckets


def _t5_forward(backend, arrays, p: T5Params):
    return attend_finish(backend, _t5_prepare(backend, arrays, p)[0], p)


def _t5_backward(backend, arrays, dout, p: T5Params):
    """``extras["table"]``: the score gradient summed per (bucket, head)."""
    pre, buckets = _t5_prepare(backend, arrays, p)
    dq, dk, dv, extras = backward_prepared(backend, pre, dout, p)
    ds, extras = user_bias_grad(extras, p)
    per_pair = ds.sum(axis=0)  # (H, Sq, Sk)
    dtable = np.zeros((p.num_buckets, per_pair.shape[0]))
    for h in range(per_pair.shape[0]):
        np.add.at(dtable[:, h], buckets, per_pair[h])
    extras["table"] = dtable
    return (*to_caller((dq, dk, dv), p), extras)


def _t5_example(shape, rng, params):
    out = core_example(shape, rng, params)
    out["table"] = rng.standard_normal((getattr(params, "num_buckets", 32), shape[1]))
    return out


register(Variant(
    name="t5", family="position",
    doc="T5 relative position bias: a learned table (num_buckets, Hq) looked up by the bucket of "
    "j - (i + s) (exact below num_buckets/4 or /2, logarithmic up to max_distance); scale 1.",
    citation="Raffel et al., Exploring the Limits of Transfer Learning with a Unified Text-to-Text "
    "Transformer, JMLR 2020", params=T5Params, forward=_t5_forward, backward=_t5_backward,
    backends=_BACKENDS,
    inputs=("q", "k", "v", "table"), example=_t5_example,
    input_shapes={"table": "(num_buckets, Hq)"}))


# -- transformer_xl --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TXLParams(CoreParams):
    causal: Any = param_field(True, "fixed: Transformer-XL is causal, bottom-right over [memory; segment]")
    form: str = param_field("shift", "'shift' (the relative-shift trick) or 'direct' (per-pair lookup)")


def _txl_prepare(backend, arrays, p: TXLParams):
    pre = prepare(backend, arrays, p)
    q, k, pos_k, u, w = P._txl_check(pre.q, pre.k[:, pre.head_map], arrays["pos_k"], arrays["bias_u"],
                                     arrays["bias_v"])
    bias = P.transformer_xl_bias(q, k, pos_k, u, w, form=p.form)
    bias = np.where(np.isfinite(bias), bias, 0.0)  # future pairs: hidden by the causal mask anyway
    return with_bias(pre, bias, pre.scale), (k, pos_k, u, w)


def _txl_forward(backend, arrays, p: TXLParams):
    return attend_finish(backend, _txl_prepare(backend, arrays, p)[0], p)


def _txl_backward(backend, arrays, dout, p: TXLParams):
    """Gradients of q, k, v and ``extras`` ``pos_k``, ``bias_u``, ``bias_v`` (and ``bias``).

    With ``ds`` the score gradient and ``G[i, d] = ds[i, i + s - d]`` (0 where ``d > i + s``):
    ``dq += scale G pos_k``, ``dk_j += scale sum_i ds_ij u``, ``du = scale sum ds_ij k_j``,
    ``dv_bias = scale sum G pos_k``, ``dpos_k[d] = scale sum_i G[i, d] (q_i + v_bias)``.
    """
    pre, (k, pos_k, u, w) = _txl_prepare(backend, arrays, p)
    dq, dk, dv, extras = backward_prepared(backend, pre, dout, p)
    ds, extras = user_bias_grad(extras, p)
    sq, sk = pre.q.shape[2], k.shape[2]
    j_of = np.arange(sq)[:, None] + (sk - sq) - np.arange(sk)[None, :]  # [i, d] -> key j = i + s - d
    idx = np.broadcast_to(np.clip(j_of, 0, sk - 1), ds.shape)
    g = np.where(j_of >= 0, np.take_along_axis(ds, idx, axis=-1), 0.0)  # ds by distance
    scale = pre.scale
    dq = dq + scale * np.einsum("bhid,hde->bhie", g, pos_k)
    dk_extra = scale * np.einsum("bhij,he->bhje", ds, u)
    np.add.at(dk, (slice(None), pre.head_map), dk_extra)
    extras["bias_u"] = scale * np.einsum("bhij,bhje->he", ds, k)
    extras["bias_v"] = scale * np.einsum("bhid,hde->he", g, pos_k)
    extras["pos_k"] = scale * np.einsum("bhid,bhie->hde", g, pre.q + w[None, :, None, :])
    return (*to_caller((dq, dk, dv), p), extras)


def _txl_example(shape, rng, params):
    b, hq, sq, sk, d, hkv = shape
    out = core_example(shape, rng, params)
    out["pos_k"] = rng.standard_normal((hq, sk, d))
    out["bias_u"] = rng.standard_normal((hq, d))
    out["bias_v"] = rng.standard_normal((hq, d))
    return out


register(Variant(
    name="transformer_xl", family="position",
    doc="Transformer-XL relative attention: scale * ((q_i + u)·k_j + (q_i + v)·W_R R_{i+s-j}) over "
    "[memory; segment] keys, causal; form='shift' (rel-shift trick) or 'direct' -- equal.",
    citation="Dai et al., Transformer-XL: Attentive Language Models beyond a Fixed-Length Context, ACL 2019",
    params=TXLParams, forward=_txl_forward, backward=_txl_backward, backends=_BACKENDS,
    inputs=("q", "k", "v", "pos_k", "bias_u", "bias_v"), example=_txl_example,
    input_shapes={"pos_k": "(Hq, Sk, D)", "bias_u": "(Hq, D)", "bias_v": "(Hq, D)"},
    drop=("causal", "alignment")))


# -- nope -------------------------------------------------------------------------------------------------
register(Variant(
    name="nope", family="position",
    doc="No position encoding (NoPE): plain sdpa, the baseline every position scheme is compared with.",
    citation="Kazemnejad et al., The Impact of Positional Encoding on Length Generalization in "
    "Transformers, NeurIPS 2023", params=CoreParams, forward=_forward(None), backward=_backward(None),
    backends=_BACKENDS, example=core_example))

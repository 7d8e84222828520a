"""Dense core: ``sdpa``, ``mha``, ``mqa``, ``gqa`` and ``flash`` (VARIANTS section A).

All five compute ``O = softmax(mods(scale * Q Kᵀ)) V`` with the same knobs; ``mha``/``mqa``/``gqa``
additionally check the head relation, and ``flash`` evaluates the forward with FlashAttention's tiled
online softmax, spelled out for reading, instead of the backend's ``attend``.

Conventions (all tested; see also :mod:`refattn.patterns`)
----------------------------------------------------------
* ``layout="bhsd"`` (default) or ``"bshd"``; ``mask``/``bias``/``dropout_mask`` are always
  ``(B, H, Sq, Sk)``-ordered, broadcast with numpy rules from the right (rank <= 4).
* GQA/MQA: query head ``h`` uses KV head ``h // (Hq // Hkv)``; ``head_map`` (length Hq) overrides.
* ``scale`` defaults to ``1/sqrt(D)``.
* Alignment: ``s = Sk - Sq`` (``"bottom_right"``, default) or ``0`` (``"top_left"``, PyTorch's
  ``is_causal``); ``causal=True`` uses ``alignment``; ``causal="top_left"|"bottom_right"`` sets both.
  Causal: key ``j`` visible iff ``j <= i + s``. Window ``(left, right)``, -1 unbounded:
  ``i + s - left <= j <= i + s + right``. ALiBi uses the same ``s``.
* Score order: scale -> softcap -> ALiBi and bias -> mask -> softmax (float64, max-subtracted).
* Sinks: a per-head logit in the denominator only; the LSE excludes it.
* Empty rows (no visible key): output 0 and LSE ``-inf``; ``empty_row="nan"`` gives NaN outputs
  (xformers-style) with the LSE still ``-inf``.
* LSE: natural log, shape ``(B, Hq, Sq)``; ``lse_base=2`` returns ``lse / ln 2`` (FlashInfer).
* Dropout on probabilities, scaled by ``1/(1-p)``; LSE unaffected; mask from Philox4x64-10
  (:mod:`refattn.dropout`) with ``dropout_seed``, or ``dropout_mask`` (True = keep).
* ``rect=(q0, k0, Sq, Sk)`` (variants declaring ``subrect``): the call's arrays are rows ``q0 ..``
  and keys ``k0 ..`` of a larger ``Sq x Sk`` problem, every position-dependent knob sees global
  positions, and the result is that sub-rectangle's partial state (:mod:`refattn.subrect`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from refattn.backends.base import Dropout, ScoreMod
from .. import validate as V
from ..errors import ParameterError, ShapeError, fmt_shape
from .. import subrect
from ..patterns import ALIGNMENTS, Pattern
from ..subrect import Rect
from . import Variant, param_field, register

CAUSAL_VALUES = (False, True, "bottom_right", "top_left")


@dataclass(frozen=True)
class CoreParams:
    """Knobs of the dense core variants (every default is the plain softmax attention)."""

    scale: Optional[float] = param_field(None, "score scale; default 1/sqrt(D)")
    causal: Any = param_field(False, "False, True (uses alignment), 'bottom_right' or 'top_left'")
    alignment: str = param_field("bottom_right", "diagonal offset s = Sk-Sq ('bottom_right') or 0 ('top_left')")
    window: Optional[tuple] = param_field(None, "(left, right), -1 = unbounded; key j visible iff i+s-left <= j <= i+s+right")
    mask: Any = param_field(None, "bool array broadcastable to (B, H, Sq, Sk), True = keep")
    bias: Any = param_field(None, "additive float array broadcastable to (B, H, Sq, Sk); -inf hides a pair",
                            masking=True)
    softcap: Optional[float] = param_field(None, "cap c: s = c * tanh(s / c), before bias and mask")
    alibi_slopes: Any = param_field(None, "(Hq,) ALiBi slopes; bias -slope * |i + s - j|")
    alibi_form: str = param_field("symmetric", "'symmetric' (-slope*|i+s-j|) or 'flash' (+slope*j, flash-attn's causal kernel)")
    sinks: Any = param_field(None, "(Hq,) sink logits in the softmax denominator; LSE excludes them")
    head_map: Any = param_field(None, "(Hq,) KV head of each query head; default h // (Hq // Hkv)")
    dropout_p: float = param_field(0.0, "dropout probability in [0, 1)")
    dropout_seed: Optional[int] = param_field(None, "Philox4x64-10 seed for the dropout mask")
    dropout_mask: Any = param_field(None, "explicit bool keep-mask broadcastable to (B, H, Sq, Sk)")
    return_lse: bool = param_field(False, "also return the log-sum-exp (B, Hq, Sq)")
    layout: str = param_field("bhsd", "'bhsd' or 'bshd' for q, k, v and the output")
    empty_row: str = param_field("zero", "rows with no visible key: 'zero' (LSE -inf) or 'nan'")
    lse_base: Any = param_field(math.e, "e (natural log) or 2")
    compute_dtype: str = param_field("float64", "float64; numba/cupy also take float32")
    rect: Any = param_field(None, "(q0, k0, Sq, Sk): the arrays are rows q0.. and keys k0.. of an Sq x Sk "
                                  "problem; the partial state in global coordinates (refattn.subrect)")


@dataclass(frozen=True)
class FlashParams(CoreParams):
    block_q: int = param_field(64, "query tile size Br of the tiled reference")
    block_k: int = param_field(64, "key tile size Bc of the tiled reference")


@dataclass
class Prepared:
    """Validated inputs in ``bhsd`` layout and the compute dtype, plus the primitive records.

    ``pattern`` is the *whole* problem's; with a ``rect`` (:mod:`refattn.subrect`) the arrays are
    its sub-rectangle, ``shape`` is the whole problem's ``(B, Hq, Sq, Sk)``, and
    :meth:`primitive_kwargs` hands the backend the pattern's sub-rectangle view.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    head_map: np.ndarray
    pattern: Pattern
    scale: float
    score_mod: Optional[ScoreMod]
    sinks: Optional[np.ndarray]
    dropout: Optional[Dropout]
    rect: Optional[Rect] = None

    @property
    def shape(self) -> tuple:
        """``(B, Hq, Sq, Sk)`` of the whole problem (of the arrays themselves without a rect)."""
        b, hq, sq, _ = self.q.shape
        if self.rect is not None:
            return b, hq, self.rect.sq, self.rect.sk
        return b, hq, sq, self.k.shape[2]

    def primitive_kwargs(self, pattern: Optional[Pattern] = None):
        """The backend primitives' keywords; ``pattern`` (a whole-problem pattern) replaces
        ``self.pattern``, and with a rect its sub-rectangle view is what the backend gets."""
        pattern = self.pattern if pattern is None else pattern
        if self.rect is not None:
            pattern = pattern.subrect(self.rect.q0, self.rect.k0, self.rect.sq, self.rect.sk)
        return dict(pattern=pattern, scale=self.scale, head_map=self.head_map,
                    score_mod=self.score_mod, sinks=self.sinks, dropout=self.dropout)


def _lse_base(value):
    if value == 2 or value == "2":
        return 2
    if value in ("e",) or (isinstance(value, float) and value == math.e):
        return math.e
    raise ParameterError(f"lse_base: expected e (math.e or 'e') or 2, got {value!r}")


def prepare(backend, arrays: dict, p: CoreParams, heads: Optional[str] = None) -> Prepared:
    """Validate everything and build the primitive records (one place for every core variant)."""
    V.check_choice(p.layout, "layout", V.LAYOUTS)
    V.check_choice(p.compute_dtype, "compute_dtype", V.COMPUTE_DTYPES)
    if p.compute_dtype not in backend.compute_dtypes:
        raise ParameterError(f"compute_dtype: backend {backend.name!r} computes in "
                             f"{', '.join(backend.compute_dtypes)}, got {p.compute_dtype!r}")
    V.check_choice(p.alignment, "alignment", ALIGNMENTS)
    V.check_choice(p.alibi_form, "alibi_form", ("symmetric", "flash"))
    V.check_choice(p.empty_row, "empty_row", ("zero", "nan"))
    _lse_base(p.lse_base)
    V.check_bool(p.return_lse, "return_lse")
    if not (isinstance(p.causal, (bool, np.bool_)) or (isinstance(p.causal, str)
                                                       and p.causal in ALIGNMENTS)):
        raise ParameterError(f"causal: expected one of {CAUSAL_VALUES}, got {p.causal!r}")

    q, k, v = (V.as_compute(arrays[n], n, p.compute_dtype, copy=False) for n in ("q", "k", "v"))
    for name, a in (("q", q), ("k", k), ("v", v)):
        V.check_rank4(a, name, p.layout, "Dv" if name == "v" else "D")
    if p.layout == "bshd":
        q, k, v = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
    V.check_qkv(q, k, v, p.layout)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if heads == "mha" and hkv != hq:
        raise ShapeError(f"k: expected as many KV heads as query heads ({hq}) for variant 'mha', "
                         f"got {hkv}")
    if heads == "mqa" and hkv != 1:
        raise ShapeError(f"k: expected 1 KV head for variant 'mqa', got {hkv}")
    head_map = V.head_map_for(hq, hkv, p.head_map)

    rect = None
    if p.rect is not None:  # a sub-rectangle: refuse what it cannot honour (refattn.subrect)
        subrect.refuse(p)
        rect = Rect.of(p.rect).check(sq, sk)
    alignment = p.causal if isinstance(p.causal, str) else p.alignment
    target = (b, hq, sq, sk)
    dense = None if p.mask is None else V.check_broadcast(p.mask, "mask", target, kind="bool")
    pattern = Pattern(causal=bool(p.causal), window=V.check_window(p.window), alignment=alignment,
                      dense=dense)

    softcap = V.check_positive(p.softcap, "softcap")
    slopes = None if p.alibi_slopes is None else V.check_per_head(p.alibi_slopes, "alibi_slopes", hq)
    bias = None if p.bias is None else V.check_broadcast(p.bias, "bias", target, dtype=p.compute_dtype)
    _, lo, hi = pattern.band(*((sq, sk) if rect is None else (rect.sq, rect.sk)))
    if slopes is not None and p.alibi_form == "flash" and not (lo is None and hi == 0):
        # flash-attn adds +slope*j only in its causal kernel (is_causal = left < 0 and right == 0);
        # its non-causal and local kernels use the symmetric form, so nothing computes this one.
        raise ParameterError(
            f"alibi_form: expected 'symmetric' unless the band is causal with no left window "
            f"('flash' is flash-attn's causal-kernel form, +slope*j), got 'flash' with "
            f"causal={p.causal!r}, window={p.window!r}")
    score_mod = ScoreMod(softcap=softcap, alibi_slopes=slopes, alibi_form=p.alibi_form, bias=bias)
    sinks = None if p.sinks is None else V.check_per_head(p.sinks, "sinks", hq)

    drop_mask = None
    if p.dropout_mask is not None:
        drop_mask = V.check_broadcast(p.dropout_mask, "dropout_mask", target, kind="bool")
    dp = V.check_dropout(p.dropout_p, p.dropout_seed, drop_mask)
    dropout = None
    if dp > 0 or drop_mask is not None:
        origin = {} if rect is None else dict(row0=rect.q0, col0=rect.k0, stride=rect.sk)
        dropout = Dropout(p=dp, seed=p.dropout_seed, mask=drop_mask, **origin)
    scale = V.check_scale(p.scale, d)
    V.check_score_range(q, k, scale, bias)
    return Prepared(q=q, k=k, v=v, head_map=head_map, pattern=pattern,
                    scale=scale,
                    score_mod=None if score_mod.is_identity else score_mod, sinks=sinks,
                    dropout=dropout, rect=rect)


def finish(out, lse, p: CoreParams):
    """Apply the output conventions: empty rows, LSE base, layout."""
    if p.empty_row == "nan":
        out = np.where(np.isneginf(lse)[..., None], np.nan, out)
    if _lse_base(p.lse_base) == 2:
        lse = lse / math.log(2.0)
    if p.layout == "bshd":
        out = out.transpose(0, 2, 1, 3)
    return out, lse


def to_layout(x, p: CoreParams):
    return x.transpose(0, 2, 1, 3) if p.layout == "bshd" else x


# -- forward / backward of sdpa and its head-relation aliases ---------------------------------------
def _forward(heads):
    def forward(backend, arrays, p):
        pre = prepare(backend, arrays, p, heads)
        out, lse = backend.attend(pre.q, pre.k, pre.v, **pre.primitive_kwargs())
        return finish(backend.to_numpy(out), backend.to_numpy(lse), p)
    return forward


def check_dout(dout, pre: Prepared, p: CoreParams) -> np.ndarray:
    """The upstream gradient in the compute dtype and ``bhsd``, checked against the output's shape
    (both shapes reported in the caller's layout)."""
    dout = V.as_compute(dout, "dout", p.compute_dtype, copy=False)
    b, hq, sq, _ = pre.q.shape
    dv = pre.v.shape[3]
    want = (b, hq, sq, dv) if p.layout == "bhsd" else (b, sq, hq, dv)
    if dout.shape != want:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(want)}, "
                         f"got {fmt_shape(dout.shape)}")
    return np.ascontiguousarray(to_layout(dout, p))


def forward_state(backend, pre: Prepared, p: CoreParams, forward):
    """``(out, lse)`` the backward needs: ``forward()`` recomputed, or on a sub-rectangle the whole
    problem's output and normaliser on its rows, given in ``rect`` (:mod:`refattn.subrect`)."""
    if pre.rect is None:
        return forward()
    b, hq, sq, _ = pre.q.shape
    out_shape = (b, hq, sq, pre.v.shape[3]) if p.layout == "bhsd" else (b, sq, hq, pre.v.shape[3])
    out, lse = pre.rect.state(out_shape, (b, hq, sq))
    out = np.ascontiguousarray(to_layout(V.as_compute(out, "rect.out", p.compute_dtype), p))
    return backend.asarray(out, dtype=out.dtype), backend.asarray(lse)


def backward_prepared(backend, pre: Prepared, dout, p: CoreParams):
    """``(dq, dk, dv, extras)`` of ``attend`` on prepared inputs, in ``bhsd`` (``dout`` in
    ``p.layout``). The forward is recomputed for the ``out`` and ``lse`` the backward needs (a
    sub-rectangle is given them: :func:`forward_state`); ``extras["bias"]`` has the prepared (4-d)
    bias's shape."""
    dout = check_dout(dout, pre, p)
    kw = pre.primitive_kwargs()
    out, lse = forward_state(backend, pre, p, lambda: backend.attend(pre.q, pre.k, pre.v, **kw))
    dq, dk, dv, extras = backend.attend_backward(pre.q, pre.k, pre.v, out, lse, dout, **kw)
    return (*(backend.to_numpy(g) for g in (dq, dk, dv)),
            {n: backend.to_numpy(g) for n, g in extras.items()})


def backward_for_caller(backend, pre: Prepared, dout, p: CoreParams):
    """:func:`backward_prepared` with ``dq, dk, dv`` in the caller's layout and the bias gradient
    in the shape the caller passed the bias in."""
    dq, dk, dv, extras = backward_prepared(backend, pre, dout, p)
    if "bias" in extras:
        extras["bias"] = extras["bias"].reshape(np.shape(p.bias))
    return (*(to_layout(g, p) for g in (dq, dk, dv)), extras)


def _backward(heads):
    def backward(backend, arrays, dout, p):
        return backward_for_caller(backend, prepare(backend, arrays, p, heads), dout, p)
    return backward


# -- flash: the tiled online-softmax reference ----------------------------------------------------
def flash_tiles(backend, pre: Prepared, block_q: int, block_k: int, stats: Optional[list] = None):
    """FlashAttention's forward, tile by tile (VARIANTS A, *flash*). Returns ``(out, lse)``.

    For each query tile, over key tiles ``t``: ``m_new = max(m, rowmax(S_t))``,
    ``l = exp(m - m_new) * l + rowsum(exp(S_t - m_new))``,
    ``O = exp(m - m_new) * O + exp(S_t - m_new) @ V_t``; finally ``O / l`` and ``lse = m + log l``.
    The rescaling uses the *running* max ``m_new``, never the tile's own max. Masked pairs are
    ``-inf``; a row whose running max is still ``-inf`` contributes nothing yet. If ``stats`` is a
    list, ``(i0, j0, m, l)`` is appended after every tile, for teaching. Each tile's scores come
    from ``backend.scores`` (the numpy backend's: the same score modifications and mask as
    ``attend``), so only the softmax bookkeeping differs from sdpa.
    """
    xp = backend.xp
    q, k, v = pre.q, pre.k[:, pre.head_map], pre.v[:, pre.head_map]
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    out = xp.zeros((b, h, sq, v.shape[3]))
    lse = xp.full((b, h, sq), -xp.inf)
    for i0 in range(0, sq, block_q):
        rows = slice(i0, min(sq, i0 + block_q))
        m = xp.full((b, h, rows.stop - i0, 1), -xp.inf)
        l = xp.zeros_like(m)
        acc = xp.zeros((b, h, rows.stop - i0, v.shape[3]))
        keep_rows = backend.dropout_keep(pre.dropout, b, h, sq, sk, rows)  # None without dropout
        for j0 in range(0, sk, block_k):
            cols = slice(j0, min(sk, j0 + block_k))
            s, _ = backend.scores(q[:, :, rows], k[:, :, cols], rows, sq, sk, pattern=pre.pattern,
                                  scale=pre.scale, score_mod=pre.score_mod, cols=cols)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            m_safe = xp.where(xp.isfinite(m_new), m_new, 0.0)
            alpha = xp.exp(m - m_safe)  # rescales what was accumulated under the old max
            e = xp.exp(s - m_safe)
            l = alpha * l + e.sum(axis=-1, keepdims=True)
            if keep_rows is not None:  # l (the normaliser) never sees dropout
                keep = keep_rows if keep_rows.shape[3] == 1 else keep_rows[..., cols]
                e = xp.where(keep, e * pre.dropout.scale, 0.0)
            acc = alpha * acc + e @ v[:, :, cols]
            m = m_new
            if stats is not None:
                stats.append((i0, j0, m.copy(), l.copy()))
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, :, rows] = xp.where(l > 0, acc / l, 0.0)
            lse[:, :, rows] = (m + xp.log(l))[..., 0]  # an empty row: -inf + log 0 = -inf
    if pre.sinks is not None:
        out = out / (1.0 + xp.exp(pre.sinks[None, :, None] - lse))[..., None]
    return out, lse


def _flash_forward(backend, arrays, p: FlashParams):
    bq, bk = V.check_int(p.block_q, "block_q", 1), V.check_int(p.block_k, "block_k", 1)
    pre = prepare(backend, arrays, p)
    out, lse = flash_tiles(backend, pre, bq, bk)
    return finish(backend.to_numpy(out), backend.to_numpy(lse), p)


def example(shape, rng, params=None):
    """Random ``q, k, v`` for ``shape = (B, Hq, Sq, Sk, D, Hkv)`` (the CLI and golden cases), in
    the layout of ``params`` (the parsed dataclass): bhsd, or bshd with ``layout="bshd"``."""
    b, hq, sq, sk, d, hkv = shape
    arrays = {"q": rng.standard_normal((b, hq, sq, d)),
              "k": rng.standard_normal((b, hkv, sk, d)),
              "v": rng.standard_normal((b, hkv, sk, d))}
    if getattr(params, "layout", "bhsd") == "bshd":
        arrays = {n: np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for n, a in arrays.items()}
    return arrays


_CITE_SDPA = "Vaswani et al., Attention Is All You Need, NeurIPS 2017"
_COMMON = dict(family="core", backends=("numpy", "numba", "cupy"), tolerance=1e-12, example=example)
_SUBRECT = dict(_COMMON, subrect=True)

register(Variant(
    name="sdpa", doc="Scaled dot-product attention with every knob (causal, window, mask, bias, "
    "softcap, ALiBi, sinks, dropout, GQA head maps); the definition every other variant reduces to.",
    citation=_CITE_SDPA, params=CoreParams, forward=_forward(None), backward=_backward(None), **_SUBRECT))
register(Variant(
    name="mha", doc="Multi-head attention: sdpa with as many KV heads as query heads.",
    citation=_CITE_SDPA, params=CoreParams, forward=_forward("mha"), backward=_backward("mha"),
    drop=("head_map",), **_SUBRECT))
register(Variant(
    name="mqa", doc="Multi-query attention: sdpa with one KV head shared by every query head.",
    citation="Shazeer, Fast Transformer Decoding: One Write-Head is All You Need, 2019",
    params=CoreParams, forward=_forward("mqa"), backward=_backward("mqa"),
    default_shape=(1, 8, 256, 256, 64, 1), drop=("head_map",), **_SUBRECT))
register(Variant(
    name="gqa", doc="Grouped-query attention: query head h reads KV head h // (Hq // Hkv); "
    "head_map= allows uneven groupings (QCQA).",
    citation="Ainslie et al., GQA: Training Generalized Multi-Query Transformer Models, EMNLP 2023",
    params=CoreParams, forward=_forward("gqa"), backward=_backward("gqa"),
    default_shape=(1, 8, 256, 256, 64, 2), **_SUBRECT))
register(Variant(
    name="flash", doc="FlashAttention's tiled online-softmax forward spelled out (tiles block_q x "
    "block_k, running max and sum); equals sdpa to float64 rounding. Backward as sdpa.",
    citation="Dao et al., FlashAttention, NeurIPS 2022; Dao, FlashAttention-2, ICLR 2024",
    params=FlashParams, forward=_flash_forward, backward=_backward(None), family="core",
    backends=("numpy",), tolerance=1e-12, example=example, emulate_as="sdpa",
    drop=("compute_dtype",)))


# -- flex: a FlexAttention description (mask_mod, score_mod) as the reference ----------------------
@dataclass(frozen=True)
class FlexParams(CoreParams):
    # annotated str so the CLI passes --param mask_mod=module:function through; a callable works too
    mask_mod: Optional[str] = param_field(None, "FlexAttention mask_mod(b, h, q_idx, kv_idx) -> bool, a "
                                                "callable or 'module:function'; default: every pair")
    score_mod: Optional[str] = param_field(None, "FlexAttention score_mod(score, b, h, q_idx, kv_idx), a "
                                                 "callable or 'module:function', evaluated in float64")
    block_size: int = param_field(128, "tile size of the block-by-block mask_mod evaluation")


_FLEX_DROP = ("causal", "alignment", "window", "bias", "softcap", "alibi_slopes", "alibi_form",
              "sinks", "dropout_p", "dropout_seed", "dropout_mask")


def _flex_prepare(backend, arrays, p: FlexParams):
    """Prepared inputs with the mask_mod's Pattern and the score_mod as an additive term
    ``score_mod(s) - s`` on ``s = scale q·k``; also ``d score_mod / d s`` (None without a score_mod)."""
    from .. import flex
    pre = prepare(backend, arrays, p)
    b, hq, sq, _ = pre.q.shape
    sk = pre.k.shape[2]
    pattern = pre.pattern  # a boolean mask= (optional) is intersected with the mask_mod
    if p.mask_mod is not None:
        mm = flex.pattern_from_mask_mod(p.mask_mod, b, hq, sq, sk, block_size=p.block_size)
        pattern = mm if pattern.dense is None else pattern & mm
    deriv, mod = None, None
    if p.score_mod is not None:
        q, k = backend.to_numpy(pre.q), backend.to_numpy(pre.k)[:, pre.head_map]
        s = pre.scale * np.einsum("bhid,bhjd->bhij", q, k)
        modified, deriv = flex.score_mod_scores(p.score_mod, s)
        if np.isnan(modified).any() or np.isposinf(modified).any():
            raise ParameterError("score_mod: returned NaN or +inf scores")
        with np.errstate(invalid="ignore"):
            mod = ScoreMod(bias=np.where(np.isneginf(modified), -np.inf, modified - s))
    from dataclasses import replace
    return replace(pre, pattern=pattern, score_mod=mod), deriv


def _flex_forward(backend, arrays, p: FlexParams):
    pre, _ = _flex_prepare(backend, arrays, p)
    out, lse = backend.attend(pre.q, pre.k, pre.v, **pre.primitive_kwargs())
    return finish(backend.to_numpy(out), backend.to_numpy(lse), p)


def _flex_backward(backend, arrays, dout, p: FlexParams):
    """With a score_mod, the score gradient ``dS'`` of the modified scores is multiplied by
    ``d score_mod / d s`` before ``dq = scale dS K`` and ``dk = scale dSᵀ Q`` (GQA: summed over the
    group); tensors the score_mod captures get no gradient."""
    pre, deriv = _flex_prepare(backend, arrays, p)
    dq, dk, dv, extras = backward_prepared(backend, pre, dout, p)
    if deriv is not None:
        if "bias" not in extras:
            raise ParameterError("score_mod: its gradient is not emulated at low precision; use "
                                 "baseline='inputs_only'")
        ds = extras.pop("bias") * deriv
        q, k = backend.to_numpy(pre.q), backend.to_numpy(pre.k)
        dq = pre.scale * np.einsum("bhij,bhjd->bhid", ds, k[:, pre.head_map])
        dk = np.zeros(k.shape)
        np.add.at(dk, (slice(None), pre.head_map), pre.scale * np.einsum("bhij,bhid->bhjd", ds, q))
    return (*(to_layout(g, p) for g in (dq, dk, dv)), {})


register(Variant(
    name="flex", doc="A FlexAttention description as the reference: mask_mod evaluated block by block "
    "into a Pattern (refattn.flex), score_mod evaluated in float64 through torch on the CPU; sdpa "
    "otherwise (scale, GQA head_map). Needs torch.",
    citation="Dong et al., Flex Attention: A Programming Model for Generating Optimized Attention "
    "Kernels, 2024", params=FlexParams, forward=_flex_forward, backward=_flex_backward, family="core",
    backends=("numpy", "numba"), tolerance=1e-12, example=example, drop=_FLEX_DROP))

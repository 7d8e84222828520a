"""Sparse attention (family ``sparse``, VARIANTS section D): every variant is a :class:`Pattern`.

Each variant here builds a :mod:`refattn.patterns` Pattern from its parameters (and, for the
data-dependent selections, from pooled ``q``/``k``) and calls the backend's ``attend`` with it -- no
attention loop of its own. A Pattern is a *set* of pairs: a key admitted twice (global and inside
the window) is counted once.

Shared conventions (see :mod:`refattn.variants.core`): every sparse variant accepts all the core knobs
(``scale``, ``causal``, ``alignment``, ``window``, ``mask``, ``bias``, ``softcap``, ALiBi, ``sinks``,
dropout, ``head_map``, ``layout``, ``return_lse``, ...). The core ``causal``/``window``/``mask`` are
*intersected* with the variant's pattern; the variant's own window-like parameters have their own
names (``local``, ``steps``, ``recent``, ...). Positions: query row ``i`` is at position ``i + s``
(``s = Sk - Sq`` bottom-right, ``0`` top-left); key ``j`` at ``j``. Rows that see no key give
output 0 and LSE ``-inf``.

Gradients (``attention_backward``) treat the pattern as a constant -- for the data-dependent
selections (``block_sparse`` by threshold/top-k, ``seer``) that is FlashAttention's block-skipping
semantics; ``nsa`` has no backward.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from ...patterns import (BlockSparse, Dilated, Global, Heads, Intersection, LocalBlocks, Pattern,
                        RandomKeys, Summary, blocks_from_table, random_keys)
from .. import Variant, param_field, register
from ..core import CoreParams, Prepared, backward_for_caller, example as core_example, finish, prepare


# -- the one forward/backward every pattern variant uses --------------------------------------
def with_core(core: Pattern, pattern: Optional[Pattern]) -> Pattern:
    """``core & pattern``; just one of them when the other admits everything."""
    if pattern is None:
        return core
    if not core.causal and core.window is None and core.dense is None:
        return pattern
    return Intersection(parts=(core, pattern), alignment=core.alignment)


def prepared(backend, arrays, p, build: Callable) -> Prepared:
    """``prepare`` (all core validation) with the pattern replaced by ``core & build(p, pre)``."""
    pre = prepare(backend, arrays, p)
    pre.pattern = with_core(pre.pattern, build(p, pre))
    return pre


def attend_pattern(backend, pre: Prepared, pattern: Optional[Pattern] = None, q=None, k=None, v=None):
    """``backend.attend`` on ``pre``'s arrays (or the given ones) with ``pattern`` (default:
    ``pre.pattern``) and ``pre``'s scale, head map, score modification, sinks and dropout."""
    kw = pre.primitive_kwargs(pattern)
    return backend.attend(pre.q if q is None else q, pre.k if k is None else k,
                          pre.v if v is None else v, **kw)


def pattern_variant(build: Callable):
    """``(forward, backward)`` for a variant that is ``core & build(p, pre)`` through ``attend``."""
    def forward(backend, arrays, p):
        pre = prepared(backend, arrays, p, build)
        out, lse = attend_pattern(backend, pre)
        return finish(backend.to_numpy(out), backend.to_numpy(lse), p)

    def backward(backend, arrays, dout, p):
        return backward_for_caller(backend, prepared(backend, arrays, p, build), dout, p)
    return forward, backward


def sparse_example(default_shape):
    """An ``example`` that uses ``default_shape`` when the caller passes no shape."""
    def example(shape, rng, params=None):
        return core_example(tuple(shape) if shape is not None else default_shape, rng, params)
    example.default_shape = default_shape
    return example


def _pair(value, name, minimum=-1):
    """``(left, right)`` from a pair or a single int ``w`` (= ``(w, w)``)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = (value, value)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ParameterError(f"{name}: expected an integer or a pair (left, right), got {value!r}")
    return (V.check_int(value[0], f"{name} (left; -1 = unbounded)", minimum),
            V.check_int(value[1], f"{name} (right; -1 = unbounded)", minimum))


def _posint(value, name, minimum=1):
    return V.check_int(value, name, minimum)


def _per_head(value, name, hq, minimum=1):
    """An int, or one int per query head (a tuple of length Hq)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        vals = [_posint(v, name, minimum) for v in value]
        if len(vals) != hq:
            raise ShapeError(f"{name}: expected one value per query head ({hq}), got {len(vals)}")
        return vals
    return _posint(value, name, minimum)


def _shape(pre):
    """``(B, Hq, Sq, Sk)`` of the whole problem (a sub-rectangle's too: patterns are global)."""
    return pre.shape


def _heads_mode(mode, hq, part_a, part_b):
    V.check_choice(mode, "mode", ("union", "heads"))
    if mode == "union":
        return part_a | part_b
    return Heads(parts=tuple(part_a if h % 2 == 0 else part_b for h in range(hq)),
                 alignment=part_a.alignment)


COMMON = dict(family="sparse", backends=("numpy", "numba", "cupy"), tolerance=1e-12)

#: variant name -> ``pattern(backend, arrays, params) -> Pattern`` (for pictures: ``refattn mask``)
PATTERNS: dict = {}


def pattern_of(variant, arrays: dict, p) -> Pattern:
    """The Pattern a variant attends with for ``arrays`` and parsed params ``p`` (``refattn mask``).

    Sparse variants register theirs in :data:`PATTERNS` (BigBird: the set of visible pairs;
    Longformer: window | global rows | global columns; NSA: selected blocks | window); any other
    variant whose parameters are the core ones gets its core pattern (causal, window, mask).
    """
    from refattn.backends import get
    backend = get("numpy")
    if tuple(variant.inputs) != ("q", "k", "v"):
        raise ParameterError(f"variant: {variant.name!r} has no query x key pattern to draw (its "
                             f"inputs are {', '.join(variant.inputs)}); draw a variant on q, k, v")
    if variant.name in PATTERNS:
        return PATTERNS[variant.name](backend, arrays, p)
    if isinstance(p, CoreParams):
        return prepare(backend, arrays, p).pattern
    raise ParameterError(f"variant: {variant.name!r} has no attention pattern to draw")


#: core knobs no sparse variant declares: ALiBi's 'flash' form exists only in flash-attn's dense
#: causal kernel, and every pattern here has a band or blocks of its own
SPARSE_DROP = ("alibi_form",)


def _register(name, doc, citation, params, build, default_shape=(1, 4, 256, 256, 32, 4), drop=(), **kw):
    forward, backward = pattern_variant(build)
    PATTERNS[name] = lambda backend, arrays, p: prepared(backend, arrays, p, build).pattern
    return register(Variant(name=name, doc=doc, citation=citation, params=params, forward=forward,
                            backward=kw.pop("backward", backward),
                            example=sparse_example(default_shape), default_shape=default_shape,
                            drop=SPARSE_DROP + tuple(drop),
                            **{**COMMON, **kw}))


# -- sliding_window ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SlidingWindowParams(CoreParams):
    window: Any = param_field((127, 0), "(left, right) or w = (w, w); key j visible iff "
                                        "i+s-left <= j <= i+s+right (-1 = unbounded)")

    def __post_init__(self):  # window=w is shorthand for (w, w)
        if getattr(super(), "__post_init__", None):
            super().__post_init__()
        if self.window is None:
            raise ParameterError("window: expected (left, right) or w for sliding_window, got None")
        object.__setattr__(self, "window", _pair(self.window, "window"))


def _sliding(p, pre):
    return None  # the core band *is* the pattern (band-only: the fastest kernels apply)


_register("sliding_window",
          "Local attention: key j visible iff i+s-left <= j <= i+s+right; a causal window of w "
          "tokens including self is window=(w-1, 0), a symmetric one window=w.",
          "Beltagy et al., Longformer, 2020; Child et al., Sparse Transformers, 2019",
          SlidingWindowParams, _sliding, aliases=("local",), subrect=True)


# -- dilated ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DilatedParams(CoreParams):
    steps: Any = param_field((8, 8), "(left, right) window in steps of dilation (-1 = unbounded)")
    dilation: Any = param_field(2, "gap d between visible keys, or one d per query head")


def _dilated(p, pre):
    steps = _pair(p.steps, "steps")
    _, hq, _, _ = _shape(pre)
    d = _per_head(p.dilation, "dilation", hq)
    if isinstance(d, list):
        return Heads(parts=tuple(Dilated(steps=steps, dilation=x, alignment=pre.pattern.alignment)
                                 for x in d), alignment=pre.pattern.alignment)
    return Dilated(steps=steps, dilation=d, alignment=pre.pattern.alignment)


_register("dilated",
          "Dilated sliding window: keys j = i + s + t*dilation for t in [-left, right] (steps); "
          "per-head dilation with dilation=(d_0, ..., d_{H-1}).",
          "Beltagy et al., Longformer: The Long-Document Transformer, 2020 (dilated sliding window)",
          DilatedParams, _dilated)


# -- strided / fixed (Sparse Transformer) --------------------------------------------------------
@dataclass(frozen=True)
class StridedParams(CoreParams):
    stride: int = param_field(16, "stride l: A sees i-l < j <= i, B sees (i-j) % l == 0, j <= i")
    mode: str = param_field("union", "'union' (A | B on every head) or 'heads' (even heads A, odd B)")


def _strided(p, pre):
    stride = _posint(p.stride, "stride")
    al = pre.pattern.alignment
    a = Pattern(causal=True, window=(stride - 1, 0), alignment=al)
    b = Dilated(steps=(-1, 0), dilation=stride, causal=True, alignment=al)
    return _heads_mode(p.mode, _shape(pre)[1], a, b)


_register("strided",
          "Sparse Transformer strided pattern (causal): head type A sees the previous `stride` "
          "positions (i - j < stride), type B every stride-th one ((i - j) % stride == 0); "
          "mode='union' gives every head A | B, mode='heads' alternates A and B over heads.",
          "Child et al., Generating Long Sequences with Sparse Transformers, 2019",
          StridedParams, _strided, drop=("causal",))


@dataclass(frozen=True)
class FixedParams(CoreParams):
    block: int = param_field(16, "block length l: A sees keys in the query's block (j//l == (i+s)//l)")
    c: int = param_field(2, "summary columns: B sees keys with j % l >= l - c")
    mode: str = param_field("union", "'union' (A | B on every head) or 'heads' (even heads A, odd B)")
    causal: Any = param_field(True, "the Sparse Transformer's fixed pattern is causal (set False "
                                    "for the bidirectional form)")


def _fixed(p, pre):
    block = _posint(p.block, "block")
    c = _posint(p.c, "c", 0)
    if c > block:
        raise ParameterError(f"c: expected at most block={block} summary columns, got {c}")
    al = pre.pattern.alignment
    return _heads_mode(p.mode, _shape(pre)[1], LocalBlocks(block=block, alignment=al),
                       Summary(block=block, c=c, alignment=al))


_register("fixed",
          "Sparse Transformer fixed pattern: A = same block of length l (j//l == (i+s)//l), "
          "B = summary columns (j % l >= l - c); causal by default; union or alternating heads.",
          "Child et al., Generating Long Sequences with Sparse Transformers, 2019",
          FixedParams, _fixed)


# -- global / hybrid / streaming ----------------------------------------------------------------
def _tokens(value, name="tokens"):
    t = np.asarray(value)
    if t.dtype == np.bool_:
        return t
    t = t.reshape(-1)
    if t.size and (t.dtype.kind not in "iu" or t.min() < 0):
        raise ParameterError(f"{name}: expected non-negative integer positions or a boolean mask, "
                             f"got {value!r}")
    return t.astype(np.int64)


def _global(pre, tokens, name="tokens", rows=True, cols=True):
    t = _tokens(tokens, name)
    b, _, _, sk = _shape(pre)
    if t.dtype == np.bool_:
        if t.ndim not in (1, 2) or t.shape[-1] != sk or (t.ndim == 2 and t.shape[0] not in (1, b)):
            raise ShapeError(f"{name}: expected a boolean mask of shape ({sk},) or ({b}, {sk}), "
                             f"got {fmt_shape(t.shape)}")
    elif t.size and t.max() >= sk:
        raise ParameterError(f"{name}: expected positions < Sk={sk}, got {int(t.max())}")
    return Global(tokens=t, rows=rows, cols=cols, alignment=pre.pattern.alignment)


@dataclass(frozen=True)
class GlobalParams(CoreParams):
    tokens: Any = param_field((0,), "global positions G (ints) or a bool mask (S,) / (B, S)")


_register("global",
          "Global tokens alone: rows at positions in G see every key, every row sees the keys in G.",
          "Beltagy et al., Longformer, 2020; Zaheer et al., Big Bird, NeurIPS 2020",
          GlobalParams, lambda p, pre: _global(pre, p.tokens))


@dataclass(frozen=True)
class HybridParams(CoreParams):
    local: Any = param_field((32, 32), "local window (left, right) or w = (w, w), as in sliding_window")
    tokens: Any = param_field((0,), "global positions G (ints) or a bool mask (S,) / (B, S)")


def _hybrid(p, pre):
    local = Pattern(window=_pair(p.local, "local"), alignment=pre.pattern.alignment)
    return local | _global(pre, p.tokens)


_register("hybrid",
          "Local + global: the union of a sliding window and global tokens; global rows see every "
          "key, every row sees the global keys, a global key inside the window is counted once.",
          "Beltagy et al., Longformer, 2020; Ainslie et al., ETC, EMNLP 2020",
          HybridParams, _hybrid)


@dataclass(frozen=True)
class StreamingParams(CoreParams):
    n_sink: int = param_field(4, "attention-sink tokens: keys 0..n_sink-1 are always visible")
    recent: int = param_field(64, "causal window of this many tokens including the query itself")
    causal: Any = param_field(True, "StreamingLLM is causal; the sinks are visible only where "
                                    "causal allows")


def _streaming(p, pre):
    n_sink = _posint(p.n_sink, "n_sink", 0)
    recent = _posint(p.recent, "recent", 1)
    al = pre.pattern.alignment
    window = Pattern(window=(recent - 1, 0), alignment=al)
    if n_sink == 0:
        return window
    return window | Global(tokens=np.arange(n_sink), rows=False, alignment=al)


_register("streaming",
          "StreamingLLM: the first n_sink tokens (attention sinks) plus a causal window of the "
          "`recent` latest tokens; a sink inside the window is counted once.",
          "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024",
          StreamingParams, _streaming, drop=("causal",))


# -- random -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomParams(CoreParams):
    r: int = param_field(8, "random keys (block=1) or key blocks (block>1) per query row / block row")
    block: int = param_field(1, "1: random keys per row; b > 1: random b x b blocks per block row")
    seed: int = param_field(0, "seed of numpy.random.default_rng for the draw (per head)")
    table: Any = param_field(None, "explicit table instead of the seed: (Hq, Sq, r) key indices, or "
                                   "(Hq, nbq, r) key-block indices with block > 1")


def _random(p, pre):
    b, hq, sq, sk = _shape(pre)
    r = _posint(p.r, "r", 0)
    block = _posint(p.block, "block")
    rows, cols = -(-sq // block), -(-sk // block)
    if p.table is not None:
        table = np.asarray(V.to_numpy(p.table, "table"))
        if table.dtype.kind not in "iu" or table.ndim != 3 or table.shape[:2] != (hq, rows):
            raise ShapeError(f"table: expected integer indices of shape ({hq}, {rows}, r), got "
                             f"{table.dtype} {fmt_shape(table.shape)}")
        if table.size and (table.min() < 0 or table.max() >= cols):
            raise ParameterError(f"table: expected indices in [0, {cols}), got [{table.min()}, {table.max()}]")
    else:
        seed = _posint(p.seed, "seed", 0)
        if r > cols:
            raise ParameterError(f"r: expected at most {cols} (the key {'blocks' if block > 1 else 'length'}), "
                                 f"got {r}")
        table = random_keys(seed, rows, cols, r, heads=hq)
    if block == 1:
        return RandomKeys(table=table, alignment=pre.pattern.alignment)
    return BlockSparse(layout=blocks_from_table(table, cols), block_q=block, block_k=block,
                       alignment=pre.pattern.alignment)


_register("random",
          "Random attention: each query row sees r keys drawn without replacement (or each block row "
          "r key blocks), per head, from `seed` or an explicit `table`; a set (repeats count once).",
          "Zaheer et al., Big Bird, NeurIPS 2020 (random component)",
          RandomParams, _random)


# -- block_sparse: explicit, threshold or top-k ---------------------------------------------------
@dataclass(frozen=True)
class BlockSparseParams(CoreParams):
    block_size: int = param_field(32, "block size b (query and key blocks)")
    block_mask: Any = param_field(None, "explicit bool block mask (nbq, nbk), (Hq, nbq, nbk) or "
                                        "(B, Hq, nbq, nbk); True = compute the block")
    select: str = param_field("topk", "without block_mask: 'topk' or 'threshold' on pooled scores")
    topk: int = param_field(4, "blocks kept per block row with select='topk' (forced ones included)")
    tau: float = param_field(0.05, "probability threshold with select='threshold'")


def pool_blocks(x, block: int, how: str = "mean"):
    """Pool ``(B, H, S, D)`` over blocks of ``block`` positions (the last may be ragged):
    ``how`` in ``mean``, ``max``, ``min``."""
    b, h, s, d = x.shape
    nb = -(-s // block)
    starts = np.arange(nb) * block
    if how == "mean":
        sums = np.add.reduceat(x, starts, axis=2)
        return sums / np.diff(np.append(starts, s))[None, None, :, None]
    ufunc = {"max": np.maximum, "min": np.minimum}[how]
    return ufunc.reduceat(x, starts, axis=2)


def forced_blocks(nbq, nbk, block, sq, sk, s):
    """Bool ``(nbq, nbk)``: the first key block and each row block's diagonal block -- the key
    block holding the position ``i + s`` of the block row's last row."""
    forced = np.zeros((nbq, nbk), dtype=bool)
    forced[:, 0] = True
    last = np.minimum((np.arange(nbq) + 1) * block, sq) - 1 + s
    diag = np.clip(last // block, 0, nbk - 1)
    ok = (last >= 0)
    forced[np.arange(nbq)[ok], diag[ok]] = True
    return forced


def future_blocks(nbq, nbk, block, sq, s):
    """Bool ``(nbq, nbk)``: key blocks entirely after every position of the block row (causal)."""
    last = np.minimum((np.arange(nbq) + 1) * block, sq) - 1 + s
    return (np.arange(nbk) * block)[None, :] > last[:, None]


def select_blocks(scores, forced, k=None, tau=None):
    """Block selection from ``(..., nbq, nbk)`` scores (probabilities; ``-1`` marks a block that
    may not be chosen): ``forced`` blocks always, then the top ``k`` (counting the forced ones; ties
    broken by the lower index) or every block with score ``>= tau``."""
    keep = np.broadcast_to(forced, scores.shape).copy()
    if tau is not None:
        return keep | (scores >= tau)
    # stable sort on -score: equal scores keep index order (lower index first)
    order = np.argsort(-np.where(keep, np.inf, scores), axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[-1]), axis=-1)
    return keep | ((ranks < k) & (scores >= 0))


def _pooled_probs(qp, kp, scale, head_map, hidden):
    """``softmax(scale * qp kpᵀ)`` over key blocks (per query head), hidden blocks excluded
    (probability 0, score -1 so they are never selected)."""
    s = scale * (qp @ np.swapaxes(kp[:, head_map], -1, -2))
    s = np.where(hidden, -np.inf, s)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = np.where(e.sum(-1, keepdims=True) > 0, e / e.sum(-1, keepdims=True), 0.0)
    return np.where(hidden, -1.0, prob)


def _block_geometry(p, pre):
    b, hq, sq, sk = _shape(pre)
    block = _posint(p.block_size, "block_size")
    s = pre.pattern.band(sq, sk)[0]
    return b, hq, sq, sk, block, -(-sq // block), -(-sk // block), s


def _block_sparse(p, pre):
    b, hq, sq, sk, block, nbq, nbk, s = _block_geometry(p, pre)
    al = pre.pattern.alignment
    if p.block_mask is not None:
        lay = np.asarray(V.to_numpy(p.block_mask, "block_mask"))
        if lay.dtype != np.bool_:
            raise ParameterError(f"block_mask: expected a boolean array, got dtype {lay.dtype}")
        ok = lay.ndim in (2, 3, 4) and lay.shape[-2:] == (nbq, nbk) and (
            lay.ndim < 3 or lay.shape[-3] in (1, hq)) and (lay.ndim < 4 or lay.shape[0] in (1, b))
        if not ok:
            raise ShapeError(f"block_mask: expected (nbq, nbk) = ({nbq}, {nbk}), optionally with "
                             f"leading (B={b}, Hq={hq}), got {fmt_shape(lay.shape)}")
        return BlockSparse(layout=lay, block_q=block, block_k=block, alignment=al)
    if pre.rect is not None:
        raise ParameterError(f"block_mask: expected an explicit block mask on a sub-rectangle (rect=): "
                             f"select={p.select!r} pools the whole q and k, got none")
    V.check_choice(p.select, "select", ("topk", "threshold"))
    hidden = future_blocks(nbq, nbk, block, sq, s) if pre.pattern.causal else np.zeros((nbq, nbk), bool)
    probs = _pooled_probs(pool_blocks(pre.q, block), pool_blocks(pre.k, block), pre.scale,
                          pre.head_map, hidden)
    forced = forced_blocks(nbq, nbk, block, sq, sk, s) & ~hidden
    if p.select == "topk":
        keep = select_blocks(probs, forced, k=_posint(p.topk, "topk"))
    else:
        tau = V.check_positive(p.tau, "tau")
        keep = select_blocks(probs, forced, tau=tau) & ~hidden
    return BlockSparse(layout=keep, block_q=block, block_k=block, alignment=al)


_register("block_sparse",
          "Block-sparse attention: exact attention on the kept b x b blocks. Blocks from an explicit "
          "block_mask, or selected from pooled scores softmax(mean_q(block) . mean_k(block)^T * "
          "scale) per query head: top-k per block row or probability >= tau; the first key block "
          "and the diagonal block are always kept; with causal, future blocks never are.",
          "Dao et al., FlashAttention (block-sparse), NeurIPS 2022; Jiang et al., MInference, 2024",
          BlockSparseParams, _block_sparse, default_shape=(1, 4, 512, 512, 32, 4), subrect=True)


# -- seer -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeerParams(CoreParams):
    block_size: int = param_field(32, "block size b (query and key blocks)")
    select: str = param_field("topk", "'topk' or 'threshold' on the gate's block probabilities")
    topk: int = param_field(4, "blocks kept per block row with select='topk' (forced ones included)")
    tau: float = param_field(0.05, "probability threshold with select='threshold'")
    w_q: Any = param_field(None, "(D, Dg) map of the avg-pooled Q; default identity (Dg = D)")
    w_k: Any = param_field(None, "(3D, Dg) map of the pooled K [avg; max; min]; default [I; 0; 0]")


def seer_gate(q, k, *, block_size, w_q=None, w_k=None, head_map=None, causal=False, s=0):
    """SeerAttention's AttnGate probabilities ``(B, Hq, nbq, nbk)``: ``softmax(Q' K'ᵀ / sqrt(Dg))``
    with ``Q' = avgpool(Q) W_q`` and ``K' = [avgpool(K); maxpool(K); minpool(K)] W_k`` (concatenated
    on the feature axis); with ``causal``, future blocks get probability 0 (score -1 marks them)."""
    d = q.shape[-1]
    w_q = np.eye(d) if w_q is None else np.asarray(w_q, dtype=np.float64)
    w_k = np.vstack([np.eye(d), np.zeros((2 * d, d))]) if w_k is None else np.asarray(w_k, np.float64)
    if w_q.shape[0] != d or w_k.shape != (3 * d, w_q.shape[1]):
        raise ShapeError(f"w_q, w_k: expected ({d}, Dg) and ({3 * d}, Dg), got "
                         f"{fmt_shape(w_q.shape)} and {fmt_shape(w_k.shape)}")
    qg = pool_blocks(q, block_size) @ w_q
    kg = np.concatenate([pool_blocks(k, block_size, h) for h in ("mean", "max", "min")], -1) @ w_k
    nbq, nbk = qg.shape[2], kg.shape[2]
    hidden = future_blocks(nbq, nbk, block_size, q.shape[2], s) if causal else np.zeros((nbq, nbk), bool)
    hm = V.head_map_for(q.shape[1], k.shape[1], head_map)  # GQA's h // (Hq // Hkv), validated
    return _pooled_probs(qg, kg, 1.0 / math.sqrt(w_q.shape[1]), hm, hidden)


def seer_ground_truth(q, k, *, block_size, scale=None, causal=False, alignment="bottom_right"):
    """SeerAttention's training target ``(B, H, nbq, nbk)``: the true attention map (dense softmax
    of ``scale q kᵀ``, causal optional, same head count for q and k) max-pooled over ``b x b``
    blocks, each block row then divided by its sum."""
    from refattn.backends import get
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pat = Pattern(causal=causal, alignment=alignment)
    _, lse = get("numpy").attend(q, k, np.zeros(k.shape[:3] + (1,)), pattern=pat, scale=scale,
                                 head_map=np.arange(h))
    nbq, nbk = -(-sq // block_size), -(-sk // block_size)
    out = np.zeros((b, h, nbq, nbk))
    for bi in range(nbq):
        rows = slice(bi * block_size, min(sq, (bi + 1) * block_size))
        sc = np.where(pat.mask(sq, sk, rows), scale * q[:, :, rows] @ np.swapaxes(k, -1, -2), -np.inf)
        prob = np.exp(sc - np.where(np.isfinite(lse[:, :, rows]), lse[:, :, rows], np.inf)[..., None])
        out[:, :, bi] = np.maximum.reduceat(prob.max(axis=2), np.arange(nbk) * block_size, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tot = out.sum(-1, keepdims=True)
        return np.where(tot > 0, out / tot, 0.0)


def _seer(p, pre):
    b, hq, sq, sk, block, nbq, nbk, s = _block_geometry(p, pre)
    V.check_choice(p.select, "select", ("topk", "threshold"))
    probs = seer_gate(pre.q, pre.k, block_size=block, w_q=p.w_q, w_k=p.w_k, head_map=pre.head_map,
                      causal=pre.pattern.causal, s=s)
    hidden = probs < 0
    forced = forced_blocks(nbq, nbk, block, sq, sk, s) & ~hidden
    if p.select == "topk":
        keep = select_blocks(probs, forced, k=_posint(p.topk, "topk"))
    else:
        keep = select_blocks(probs, forced, tau=V.check_positive(p.tau, "tau")) & ~hidden
    return BlockSparse(layout=keep, block_q=block, block_k=block, alignment=pre.pattern.alignment)


_register("seer",
          "SeerAttention-style gate: block scores softmax(Q'K'^T/sqrt(Dg)) from avg-pooled Q and "
          "[avg; max; min]-pooled K through the given linear maps w_q, w_k; top-k or threshold -> "
          "block mask (first and diagonal blocks forced) -> exact block-sparse attention. "
          "seer_ground_truth() gives the training target (true map max-pooled, row-normalised).",
          "Gao et al., SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, 2024",
          SeerParams, _seer, default_shape=(1, 4, 512, 512, 32, 4))


# -- nsa --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NSAParams(CoreParams):
    cmp_block: int = param_field(16, "compression block length l (tokens per compressed key)")
    cmp_stride: int = param_field(8, "compression stride d (l and sel_block are multiples of d)")
    cmp_weight: Any = param_field(None, "(l,) weights of the compression map phi (a weighted sum "
                                        "over the block's positions); default the mean")
    sel_block: int = param_field(32, "selection block size l'")
    n_select: int = param_field(4, "selected blocks per query, counting the forced ones")
    n_local: int = param_field(2, "forced local blocks: the query's own block and the ones before")
    recent: int = param_field(32, "sliding-window branch: the latest `recent` tokens incl. self")
    gates: Any = param_field(None, "(B, Hq, Sq, 3) gates in (0, 1) for [compressed, selected, "
                                   "window]; default 1/3 each")
    causal: Any = param_field(True, "NSA is causal")


def compress(x, block, stride, weight=None):
    """``(B, H, nc, D)``: block ``c`` is ``phi(x[c*stride : c*stride + block])`` for every full block
    (``nc = (S - block) // stride + 1``); ``phi`` is the mean or the weighted sum with ``weight``."""
    b, h, s, d = x.shape
    nc = max(0, (s - block) // stride + 1)
    w = np.full(block, 1.0 / block) if weight is None else V.as_compute(weight, "cmp_weight")
    if w.shape != (block,):
        raise ShapeError(f"cmp_weight: expected shape ({block},), got {fmt_shape(w.shape)}")
    idx = np.arange(nc)[:, None] * stride + np.arange(block)[None, :]
    return np.einsum("bhcld,l->bhcd", x[:, :, idx], w)


def nsa_importance_map(nc, nsel, cmp_block, cmp_stride, sel_block):
    """``W (nc, nsel)``: ``p_slc = p_cmp @ W`` is NSA eq. 9,
    ``p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[l'/d * j - m - n]`` (out-of-range terms 0)."""
    a, c = sel_block // cmp_stride, cmp_block // cmp_stride
    w = np.zeros((nc, nsel))
    for j in range(nsel):
        for m in range(a):
            for n in range(c):
                if 0 <= a * j - m - n < nc:
                    w[a * j - m - n, j] += 1.0
    return w


def nsa_selection(p_cmp, *, group, positions, sk, cmp_block, cmp_stride, sel_block, n_select, n_local):
    """Selected blocks ``(B, Hq, rows, n_select)`` (key-block indices of size ``sel_block``) for
    query rows at ``positions`` (``i + s``), from their compressed probabilities ``p_cmp``.

    Importance: NSA eq. 9 (:func:`nsa_importance_map`), summed over the query heads of each GQA
    group (``group`` = query heads per KV head). Blocks starting after the query's position are not
    candidates; block 0 and the ``n_local`` latest blocks are forced; the rest by score, ties to the
    lower index. Rows with fewer candidates than ``n_select`` (or a sequence with fewer than
    ``n_select`` blocks) repeat their first selected block (a set: counted once).
    """
    b, hq, rows, nc = p_cmp.shape
    nsel = -(-sk // sel_block)
    p_slc = p_cmp @ nsa_importance_map(nc, nsel, cmp_block, cmp_stride, sel_block)
    p_slc = p_slc.reshape(b, hq // group, group, rows, nsel).sum(axis=2)
    p_slc = np.repeat(p_slc, group, axis=1)
    blocks = np.arange(nsel)[None, :]
    cur = np.clip(positions // sel_block, 0, nsel - 1)[:, None]
    cand = blocks * sel_block <= positions[:, None]                          # (rows, nsel)
    forced = ((blocks == 0) | ((blocks <= cur) & (blocks > cur - n_local))) & cand
    keep = select_blocks(np.where(cand, p_slc, -1.0), forced, k=n_select) & cand
    width = min(n_select, nsel)
    order = np.argsort(~keep, axis=-1, kind="stable")[..., :width]       # kept blocks first, by index
    table = np.take_along_axis(np.broadcast_to(np.arange(nsel), keep.shape), order, -1)
    n_kept = keep.sum(-1, keepdims=True)
    table = np.where(np.arange(width) < n_kept, table, table[..., :1])
    return np.concatenate([table, np.repeat(table[..., :1], n_select - width, axis=-1)], axis=-1)


#: query rows per chunk when NSA computes compressed probabilities and selections
NSA_CHUNK_ROWS = 256


def _nsa_forward(backend, arrays, p, want_pattern=False):
    pre = prepare(backend, arrays, p)
    b, hq, sq, sk = _shape(pre)
    al = pre.pattern.alignment
    s = pre.pattern.band(sq, sk)[0]
    ell, d, ell2 = (_posint(getattr(p, n), n) for n in ("cmp_block", "cmp_stride", "sel_block"))
    if ell % d or ell2 % d:
        raise ParameterError(f"cmp_block, sel_block: expected multiples of cmp_stride={d}, got {ell}, {ell2}")
    n_select, n_local = _posint(p.n_select, "n_select"), _posint(p.n_local, "n_local", 0)
    if n_local + 1 > n_select:
        raise ParameterError(f"n_select: expected at least n_local + 1 = {n_local + 1} (forced blocks), "
                             f"got {n_select}")
    gates = np.full((1, 1, 1, 3), 1.0 / 3) if p.gates is None else V.as_compute(p.gates, "gates")
    if gates.shape not in ((1, 1, 1, 3), (b, hq, sq, 3)):
        raise ShapeError(f"gates: expected ({b}, {hq}, {sq}, 3), got {fmt_shape(gates.shape)}")
    if np.any((gates <= 0) | (gates >= 1)):
        raise ParameterError("gates: expected values in (0, 1) (sigmoid outputs)")

    # 1. compressed branch: block c (tokens c*d .. c*d+l-1) visible once all its tokens are <= i + s
    kc, vc = compress(pre.k, ell, d, p.cmp_weight), compress(pre.v, ell, d, p.cmp_weight)
    nc = kc.shape[2]
    last_token = np.arange(nc) * d + ell - 1
    cmp_vis = Pattern(dense=(last_token[None, :] <= (np.arange(sq) + s)[:, None]), alignment=al)
    if nc:
        o_cmp, lse_cmp = backend.attend(pre.q, kc, vc, pattern=cmp_vis, scale=pre.scale,
                                        head_map=pre.head_map)
        o_cmp, lse_cmp = backend.to_numpy(o_cmp), backend.to_numpy(lse_cmp)
    else:  # shorter than one compressed block: that branch sees nothing (output 0, LSE -inf)
        o_cmp, lse_cmp = np.zeros(pre.q.shape[:3] + pre.v.shape[3:]), np.full(pre.q.shape[:3], -np.inf)
    # 2. selected branch: the top-n blocks of size l' (per GQA group), causal inside them;
    #    compressed probabilities exp(S - lse) in query chunks (memory O(chunk * nc))
    group = hq // pre.k.shape[1]
    kc_h = np.swapaxes(kc[:, pre.head_map], -1, -2)
    table = np.zeros((b, hq, sq, n_select), dtype=np.int64)
    for r0 in range(0, sq, NSA_CHUNK_ROWS):
        rows = slice(r0, min(sq, r0 + NSA_CHUNK_ROWS))
        lse_r = lse_cmp[:, :, rows, None]
        fin = np.isfinite(lse_r)
        x = np.where(cmp_vis.mask(sq, nc, rows) & fin, pre.scale * (pre.q[:, :, rows] @ kc_h), -np.inf)
        p_cmp = np.exp(x - np.where(fin, lse_r, 0.0))                 # hidden blocks: exactly 0
        table[:, :, rows] = nsa_selection(p_cmp, group=group, positions=np.arange(sq)[rows] + s, sk=sk,
                                          cmp_block=ell, cmp_stride=d, sel_block=ell2,
                                          n_select=n_select, n_local=n_local)
    sel = with_core(pre.pattern, RandomKeys(table=table, block=ell2, alignment=al))
    # 3. sliding window of `recent` tokens
    win = with_core(pre.pattern, Pattern(window=(_posint(p.recent, "recent") - 1, 0), alignment=al))
    if want_pattern:
        return sel | win
    o_sel, _ = attend_pattern(backend, pre, sel)
    o_win, lse_win = attend_pattern(backend, pre, win)
    out = (gates[..., 0:1] * o_cmp + gates[..., 1:2] * backend.to_numpy(o_sel)
           + gates[..., 2:3] * backend.to_numpy(o_win))
    return finish(out, backend.to_numpy(lse_win), p)


PATTERNS["nsa"] = lambda backend, arrays, p: _nsa_forward(backend, arrays, p, want_pattern=True)

register(Variant(
    name="nsa",
    doc="Native Sparse Attention: gates g (B, Hq, Sq, 3) mix three branches -- compressed (blocks "
    "of l tokens every d, compressed by the mean or given weights, visible once complete), selected "
    "(top-n blocks of l' tokens ranked by compressed-attention probabilities summed over the GQA "
    "group; block 0 and n_local local blocks forced; ties to the lower index) and a sliding window "
    "of `recent` tokens. Deterministic. return_lse gives the window branch's LSE; the core "
    "mask/window/bias/sinks/dropout apply to the selected and window branches (token keys) only; "
    "rows that see no complete compressed block get 0 from that branch.",
    citation="Yuan et al., Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse "
    "Attention, ACL 2025", params=NSAParams, forward=_nsa_forward, backward=None,
    example=sparse_example((1, 4, 256, 256, 32, 2)),
    drop=SPARSE_DROP + ("head_map", "empty_row"), **COMMON))


# BigBird and Longformer live beside this module and register when the family loads.
from . import bigbird, longformer  # noqa: E402,F401

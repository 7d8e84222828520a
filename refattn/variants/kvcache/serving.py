"""KV cache, serving and distribution: cache, decode masks, paged KV, MLA, state merging, cascade,
ring attention and expected-attention pruning (VARIANTS section C).

Every function here is readable numpy glue around the backend primitives ``attend`` and
``merge_states`` (:mod:`refattn.backends.base`); the registered variants (``decode``, ``paged``,
``mla``, ``cascade``, ``ring``, ``expected_attention``) are in :mod:`refattn.variants.kvcache`.

Conventions
-----------
* Arrays are ``bhsd``: ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, Dv)``; query
  head ``h`` reads KV head ``h // (Hq // Hkv)``.
* Decoding is bottom-right: the ``Sq`` queries of sequence ``b`` are its *last* ``Sq`` tokens, i.e.
  query ``i`` sits at position ``L_b - Sq + i`` where ``L_b`` is the sequence's cached length, and sees
  key ``j`` iff ``j <= L_b - Sq + i`` (causal) and ``j < L_b``. A window ``(left, right)`` is relative
  to the same position; vLLM's ``sliding_window=W`` is ``(W - 1, 0)``.
* A state is ``(o, lse)`` with ``lse`` natural-log over the keys it covers, ``-inf`` (and ``o = 0``)
  when it covers none. :func:`merge_states` is exact: merging the states of disjoint key sets gives
  the state of their union.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ...errors import ParameterError, ShapeError, fmt_shape
from ...patterns import Pattern
from ...validate import (as_compute, check_finite, check_int, check_qkv, check_scale, check_score_range, head_map_for,
                         int_array as check_int_array, to_numpy)

__all__ = ["KVCache", "decode_mask", "validate_block_table", "gather_paged", "scatter_paged",
           "mla_project", "mla_queries", "mla_softmax_scale", "yarn_mscale", "mla_cache_bytes",
           "merge_states", "shard_indices", "ring_attention", "ring_attention_backward", "RingReport",
           "rope_average_rotation", "expected_attention_scores", "expected_attention_key_scores",
           "expected_attention_keep", "decode_attention",
           "paged_attention", "mla_attention", "cascade_attention", "expected_attention"]


def _backend(backend):
    from ... import backends
    return backends.get(backend) if isinstance(backend, str) else backend


def _int(value, name, minimum=0):
    return check_int(value, name, minimum)


def int_array(x, name, shape=None) -> np.ndarray:
    """``x`` as an int64 array, checked to be integral (and of ``shape`` when given)."""
    return check_int_array(x, name, shape)


# -- decode masks -----------------------------------------------------------------------------------
def decode_mask(seq_lens, sq: int, sk: int, *, causal: bool = True, window=None,
                name: str = "seq_lens") -> np.ndarray:
    """``(B, 1, Sq, Sk)`` visibility for queries that are the last ``Sq`` tokens of each sequence.

    Key ``j`` is visible to query ``i`` of sequence ``b`` iff ``j < L_b`` and, with
    ``p = L_b - Sq + i``, ``j <= p`` (causal) and ``p - left <= j <= p + right`` (window, -1 unbounded).
    ``seq_lens`` must lie in ``[Sq, Sk]``: a query position beyond the cache is an error (named
    ``name`` in messages).
    """
    if sq > sk:
        raise ShapeError(f"q: expected Sq <= Sk (the queries are the last Sq tokens of a cache of Sk "
                         f"slots), got Sq={sq} > Sk={sk}")
    lens = int_array(seq_lens, name)
    if lens.ndim != 1:
        raise ShapeError(f"{name}: expected shape (B,), got {fmt_shape(lens.shape)}")
    if lens.size and (lens.max() > sk or lens.min() < sq):
        raise ParameterError(f"{name}: expected lengths in [Sq, Sk] = [{sq}, {sk}] (queries are the "
                             f"last Sq tokens of a cache of Sk slots), got values in "
                             f"[{lens.min()}, {lens.max()}]")
    p = (lens[:, None] - sq + np.arange(sq)[None, :])[:, None, :, None]  # (B, 1, Sq, 1)
    j = np.arange(sk)[None, None, None, :]
    keep = np.broadcast_to(j < lens[:, None, None, None], (lens.size, 1, sq, sk)).copy()
    if causal:
        keep &= j <= p
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= j >= p - left
        if right >= 0:
            keep &= j <= p + right
    return keep


# -- the cache --------------------------------------------------------------------------------------
class KVCache:
    """A KV cache for ``batch`` sequences that advance together, optionally a sliding window.

    ``append(k, v)`` adds ``n`` tokens (``k (B, Hkv, n, D)``, ``v (B, Hkv, n, Dv)``) at positions
    ``length .. length + n - 1``. Without ``window`` the cache holds ``capacity`` tokens and appending
    past it is an error. With ``window=W`` it is a ring buffer of ``W`` slots: the token at position
    ``t`` lives in slot ``t % W`` and evicts position ``t - W`` -- exactly what a causal sliding window
    of ``W`` tokens (``(W - 1, 0)``, the query included) needs.

    :meth:`attend` runs decode attention for queries at given positions; a position at or beyond
    :attr:`length` (not cached yet), or one whose window reaches evicted tokens, is an error.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, capacity: Optional[int] = None, *,
                 value_dim: Optional[int] = None, window: Optional[int] = None):
        self.batch = _int(batch, "batch", 1)
        self.num_kv_heads = _int(num_kv_heads, "num_kv_heads", 1)
        self.head_dim = _int(head_dim, "head_dim", 1)
        self.value_dim = self.head_dim if value_dim is None else _int(value_dim, "value_dim", 1)
        self.window = None if window is None else _int(window, "window", 1)
        if self.window is None and capacity is None:
            raise ParameterError("capacity: expected the number of tokens to hold (or window=), got None")
        self.slots = self.window if self.window is not None else _int(capacity, "capacity", 1)
        self._k = np.zeros((self.batch, self.num_kv_heads, self.slots, self.head_dim))
        self._v = np.zeros((self.batch, self.num_kv_heads, self.slots, self.value_dim))
        self._pos = np.full(self.slots, -1, dtype=np.int64)  # position held by each slot, -1 = empty
        self.length = 0  # tokens appended so far = the next position

    def append(self, k, v) -> "KVCache":
        """Add ``n`` tokens; returns ``self``."""
        k, v = check_finite(as_compute(k, "k"), "k"), check_finite(as_compute(v, "v"), "v")
        want_k = (self.batch, self.num_kv_heads, k.shape[2] if k.ndim == 4 else -1, self.head_dim)
        if k.ndim != 4 or k.shape != want_k:
            raise ShapeError(f"k: expected (B, Hkv, n, D) = ({self.batch}, {self.num_kv_heads}, n, "
                             f"{self.head_dim}), got {fmt_shape(k.shape)}")
        n = k.shape[2]
        if v.shape != (self.batch, self.num_kv_heads, n, self.value_dim):
            raise ShapeError(f"v: expected ({self.batch}, {self.num_kv_heads}, {n}, {self.value_dim}), "
                             f"got {fmt_shape(v.shape)}")
        if self.window is None and self.length + n > self.slots:
            raise ShapeError(f"k: appending {n} tokens to a cache holding {self.length} of capacity "
                             f"{self.slots} (no window, so nothing is evicted)")
        positions = self.length + np.arange(n)
        if self.window is not None and n > self.window:  # only the last W survive
            k, v, positions = k[:, :, -self.window:], v[:, :, -self.window:], positions[-self.window:]
        slots = positions % self.slots
        self._k[:, :, slots], self._v[:, :, slots], self._pos[slots] = k, v, positions
        self.length += n
        return self

    @property
    def positions(self) -> np.ndarray:
        """Positions held, in slot order (ring-buffer order with a window)."""
        return self._pos[self._pos >= 0]

    def contiguous(self):
        """``(k, v, positions)`` of the held tokens, sorted by position."""
        slots = np.nonzero(self._pos >= 0)[0]
        slots = slots[np.argsort(self._pos[slots])]
        return self._k[:, :, slots], self._v[:, :, slots], self._pos[slots]

    def attend(self, q, *, q_positions=None, scale=None, head_map=None, backend="numpy"):
        """Causal attention of ``q (B, Hq, Sq, D)`` over the cache: ``(out, lse)``.

        ``q_positions (Sq,)`` default to the last ``Sq`` appended positions. Query at position ``p``
        sees cached keys at positions ``<= p`` (and ``>= p - W + 1`` with a window).
        """
        q = as_compute(q, "q")
        if q.ndim != 4 or q.shape[0] != self.batch or q.shape[3] != self.head_dim:
            raise ShapeError(f"q: expected ({self.batch}, Hq, Sq, {self.head_dim}), got {fmt_shape(q.shape)}")
        sq = q.shape[2]
        qp = (np.arange(self.length - sq, self.length) if q_positions is None
              else int_array(q_positions, "q_positions", (sq,)))
        if qp.size and (qp.max() >= self.length or qp.min() < 0):
            raise ParameterError(f"q_positions: expected positions in [0, {self.length}) (tokens in the "
                                 f"cache), got values in [{qp.min()}, {qp.max()}]")
        k, v, kp = self.contiguous()
        if self.window is not None and qp.size:
            need, oldest = max(0, int(qp.min()) - self.window + 1), int(kp.min())
            if need < oldest:
                raise ParameterError(f"q_positions: position {qp.min()} needs keys from {need}, but the "
                                     f"window cache only holds positions >= {oldest} (evicted)")
        keep = kp[None, :] <= qp[:, None]
        if self.window is not None:
            keep &= kp[None, :] > qp[:, None] - self.window
        from ... import pipeline  # sdpa with the cache's visibility as its mask, through the one path
        res = pipeline.run("sdpa", backend, {"q": q, "k": k, "v": v},
                           {"mask": keep, "scale": scale, "head_map": head_map})
        return res.outputs["out"], res.outputs["lse"]


# -- paged KV ---------------------------------------------------------------------------------------
def validate_block_table(block_table, seq_lens, num_blocks: int, block_size: int):
    """``(table, lens)`` as int64 after checking them against a pool of ``num_blocks`` pages.

    ``block_table (B, max_blocks)``: sequence ``b``'s token ``t`` lives in page
    ``block_table[b, t // block_size]`` at row ``t % block_size``. The first
    ``ceil(seq_lens[b] / block_size)`` entries of each row must be page indices in
    ``[0, num_blocks)``; later entries are ignored (padding such as -1 is fine).
    """
    block_size = _int(block_size, "block_size", 1)
    table = int_array(block_table, "block_table")
    if table.ndim != 2:
        raise ShapeError(f"block_table: expected (B, max_blocks), got {fmt_shape(table.shape)}")
    lens = int_array(seq_lens, "seq_lens", (table.shape[0],))
    if lens.size and lens.min() < 0:
        raise ParameterError(f"seq_lens: expected lengths >= 0, got {lens.min()}")
    needed = -(-lens // block_size)
    if needed.size and needed.max() > table.shape[1]:
        b = int(np.argmax(needed))
        raise ShapeError(f"block_table: too short: sequence {b} has {lens[b]} tokens = {needed[b]} blocks "
                         f"of {block_size}, but the table has {table.shape[1]} columns")
    used = np.arange(table.shape[1])[None, :] < needed[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if np.any(bad):
        b, c = (int(x[0]) for x in np.nonzero(bad))
        raise ParameterError(f"block_table: expected page indices in [0, {num_blocks}) for used blocks, "
                             f"got {table[b, c]} at [{b}, {c}]")
    return table, lens


def gather_paged(pages, block_table, seq_lens):
    """Gather paged KV ``pages (num_blocks, block_size, Hkv, D)`` into ``(B, Hkv, max(seq_lens), D)``.

    Positions past a sequence's length are zero. The table is validated (:func:`validate_block_table`).
    """
    pages = as_compute(pages, "pages")
    if pages.ndim != 4:
        raise ShapeError(f"pages: expected (num_blocks, block_size, Hkv, D), got {fmt_shape(pages.shape)}")
    nblocks, bs = pages.shape[:2]
    table, lens = validate_block_table(block_table, seq_lens, nblocks, bs)
    lmax = int(lens.max()) if lens.size else 0
    t = np.arange(lmax)
    valid = t[None, :] < lens[:, None]  # (B, L)
    page = np.where(valid, table[:, np.minimum(t // bs, table.shape[1] - 1)], 0) if lmax else \
        np.zeros((len(lens), 0), dtype=np.int64)
    rows = pages[page, (t % bs)[None, :]]  # (B, L, Hkv, D)
    rows = np.where(valid[:, :, None, None], rows, 0.0)
    return np.ascontiguousarray(rows.transpose(0, 2, 1, 3))


def scatter_paged(grad, block_table, seq_lens, pages_shape):
    """The adjoint of :func:`gather_paged`: ``grad (B, Hkv, L, D)`` summed into zeros of
    ``pages_shape`` at the rows the table maps each (sequence, position < seq_len) to."""
    table, lens = int_array(block_table, "block_table"), int_array(seq_lens, "seq_lens")
    bs = pages_shape[1]
    out = np.zeros(pages_shape)
    b_idx, t_idx = np.nonzero(np.arange(grad.shape[2])[None, :] < lens[:, None])
    np.add.at(out, (table[b_idx, t_idx // bs], t_idx % bs), grad[b_idx, :, t_idx])
    return out


# -- MLA --------------------------------------------------------------------------------------------
def mla_project(hidden, w_dkv, w_uk, w_uv, w_kr, *, kv_norm=None, eps: float = 1e-6):
    """DeepSeek MLA projections of ``hidden (B, Sk, d_model)``.

    Returns ``(c, k_nope, v, k_rope_pre)``: latent ``c = hidden @ w_dkv (B, Sk, d_c)`` -- with
    ``kv_norm (d_c,)`` given, ``c = RMSNorm(hidden @ w_dkv) * kv_norm`` (HF's ``kv_a_layernorm``,
    ``x / sqrt(mean(x²) + eps)``) --, ``k_nope = c @ w_uk (B, H, Sk, d_nope)`` with
    ``w_uk (H, d_c, d_nope)``, ``v = c @ w_uv (B, H, Sk, d_v)`` with ``w_uv (H, d_c, d_v)``, and the
    shared key part ``hidden @ w_kr (B, Sk, d_rope)`` (RoPE still to be applied).
    """
    h = as_compute(hidden, "hidden")
    w_dkv, w_uk, w_uv, w_kr = (as_compute(a, n) for a, n in ((w_dkv, "w_dkv"), (w_uk, "w_uk"),
                                                                (w_uv, "w_uv"), (w_kr, "w_kr")))
    if h.ndim != 3:
        raise ShapeError(f"hidden: expected (B, Sk, d_model), got {fmt_shape(h.shape)}")
    dm = h.shape[2]
    if w_dkv.ndim != 2 or w_dkv.shape[0] != dm:
        raise ShapeError(f"w_dkv: expected ({dm}, d_c), got {fmt_shape(w_dkv.shape)}")
    dc = w_dkv.shape[1]
    for name, w in (("w_uk", w_uk), ("w_uv", w_uv)):
        if w.ndim != 3 or w.shape[1] != dc:
            raise ShapeError(f"{name}: expected (H, {dc}, d), got {fmt_shape(w.shape)}")
    if w_uk.shape[0] != w_uv.shape[0]:
        raise ShapeError(f"w_uv: expected {w_uk.shape[0]} heads as w_uk, got {w_uv.shape[0]}")
    if w_kr.ndim != 2 or w_kr.shape[0] != dm or w_kr.shape[1] % 2:
        raise ShapeError(f"w_kr: expected ({dm}, d_rope) with d_rope even, got {fmt_shape(w_kr.shape)}")
    c = h @ w_dkv
    if kv_norm is not None:
        c = rms_norm(c, _vector(kv_norm, "kv_norm", dc, "(d_c,) = the latent width"), eps)
    return c, np.einsum("bsc,hcn->bhsn", c, w_uk), np.einsum("bsc,hcv->bhsv", c, w_uv), h @ w_kr


def _vector(a, name: str, n: int, meaning: str) -> np.ndarray:
    arr = check_finite(as_compute(a, name), name)
    if arr.shape != (n,):
        raise ShapeError(f"{name}: expected shape ({n},) {meaning}, got {fmt_shape(arr.shape)}")
    return arr


def rms_norm(x, weight, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x², -1) + eps) * weight`` -- :func:`refattn.block.rms_norm`, the one
    definition (DeepSeek's ``kv_a_layernorm`` and ``q_a_layernorm``)."""
    from ..block import rms_norm as _rms
    return _rms(x, weight, eps=eps)


def mla_queries(q, *, num_heads: int, d_qk: int, w_q=None, w_dq=None, q_norm=None, w_uq=None,
                eps: float = 1e-6) -> tuple:
    """Per-head MLA queries ``(B, H, Sq, d_nope + d_rope)`` from ``q``, and what the backward needs.

    Without projection weights ``q`` already is ``(B, H, Sq, d_qk)``. With ``w_q (d_model, H, d_qk)``
    it is the queries' hidden states ``(B, Sq, d_model)`` and the result ``q @ w_q``; with q-LoRA
    (DeepSeek's ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``) ``w_dq (d_model, d_q)``, optional
    ``q_norm (d_q,)`` (default ones; the RMSNorm is always applied, as DeepSeek does) and
    ``w_uq (d_q, H, d_qk)``: ``RMSNorm(q @ w_dq) * q_norm @ w_uq``. Returns ``(q_heads, parts)`` with
    ``parts`` the intermediate arrays by name.
    """
    x = check_finite(as_compute(q, "q"), "q")
    lora = w_dq is not None or w_uq is not None or q_norm is not None
    if w_q is not None and lora:
        raise ParameterError("w_q: given together with the q-LoRA weights (w_dq, q_norm, w_uq); give one "
                             "query projection")
    if w_q is None and not lora:
        if x.ndim != 4 or x.shape[1] != num_heads or x.shape[3] != d_qk:
            raise ShapeError(f"q: expected (B, {num_heads}, Sq, {d_qk}) = (B, H, Sq, d_nope + d_rope) "
                             f"per-head queries, got {fmt_shape(x.shape)}")
        return x, {}
    if x.ndim != 3:
        raise ShapeError(f"q: expected the queries' hidden states (B, Sq, d_model) with "
                         f"{'w_q' if w_q is not None else 'q-LoRA'}, got {fmt_shape(x.shape)}")
    dm = x.shape[2]
    if w_q is not None:
        w = check_finite(as_compute(w_q, "w_q"), "w_q")
        if w.shape != (dm, num_heads, d_qk):
            raise ShapeError(f"w_q: expected ({dm}, {num_heads}, {d_qk}) = (d_model, H, d_nope + d_rope), "
                             f"got {fmt_shape(w.shape)}")
        return np.einsum("bsd,dhe->bhse", x, w), {"q_in": x, "w_q": w}
    if w_dq is None or w_uq is None:
        missing = "w_dq" if w_dq is None else "w_uq"
        raise ParameterError(f"{missing}: q-LoRA needs w_dq (d_model, d_q) and w_uq (d_q, H, d_nope + "
                             f"d_rope) (q_norm optional), got no {missing}")
    a_w = check_finite(as_compute(w_dq, "w_dq"), "w_dq")
    if a_w.ndim != 2 or a_w.shape[0] != dm:
        raise ShapeError(f"w_dq: expected ({dm}, d_q) = (d_model, q-LoRA rank), got {fmt_shape(a_w.shape)}")
    dq = a_w.shape[1]
    b_w = check_finite(as_compute(w_uq, "w_uq"), "w_uq")
    if b_w.shape != (dq, num_heads, d_qk):
        raise ShapeError(f"w_uq: expected ({dq}, {num_heads}, {d_qk}) = (d_q, H, d_nope + d_rope), "
                         f"got {fmt_shape(b_w.shape)}")
    norm_w = np.ones(dq) if q_norm is None else _vector(q_norm, "q_norm", dq, "(d_q,) = the q-LoRA rank")
    a = x @ a_w
    n = rms_norm(a, norm_w, eps)
    return np.einsum("bsr,rhe->bhse", n, b_w), {"q_in": x, "w_dq": a_w, "w_uq": b_w, "q_norm": norm_w,
                                                 "q_a": a, "q_n": n}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's ``m(f, a) = 0.1 * a * ln(f) + 1`` for ``f > 1``, else 1 (DeepSeek's ``yarn_get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(d_qk: int, scaling=None, max_position_embeddings=None) -> float:
    """DeepSeek's MLA softmax scale: ``1/sqrt(d_nope + d_rope)``, times ``m(factor, mscale_all_dim)²``
    when ``scaling`` (HF's rope dict) has a non-default ``rope_type`` and a non-zero
    ``mscale_all_dim`` (HF DeepSeek-V2/V3 ``yarn_apply_mscale``; VARIANTS C). ``factor`` None falls back
    to ``max_position_embeddings / original_max_position_embeddings``, as the YaRN frequencies do."""
    scale = 1.0 / math.sqrt(d_qk)
    if not isinstance(scaling, dict):
        return scale
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    m_all = scaling.get("mscale_all_dim")
    if rtype == "default" or not m_all:
        return scale
    factor = scaling.get("factor")
    if factor is None:
        ompe = scaling.get("original_max_position_embeddings")
        if ompe is None or max_position_embeddings is None:
            raise ParameterError("scaling['factor']: the softmax mscale needs a factor (or "
                                 "original_max_position_embeddings and max_position_embeddings), got none")
        factor = max_position_embeddings / ompe
    m = yarn_mscale(float(factor), float(m_all))
    return scale * m * m


def mla_cache_bytes(num_heads: int, d_nope: int, d_rope: int, d_v: int, d_c: int,
                    bytes_per_element: int = 2) -> dict:
    """KV-cache bytes per token (per layer) of the two MLA forms.

    ``naive``: the expanded keys and values of every head, ``H * (d_nope + d_rope + d_v)`` elements;
    ``absorbed``: the latent and the shared RoPE key, ``d_c + d_rope`` elements (DeepSeek-V2: 512 + 64).
    """
    naive = num_heads * (d_nope + d_rope + d_v) * bytes_per_element
    absorbed = (d_c + d_rope) * bytes_per_element
    return {"naive": naive, "absorbed": absorbed, "ratio": naive / absorbed}


# -- merging ----------------------------------------------------------------------------------------
def merge_states(*states, backend="numpy"):
    """Merge ``(o, lse)`` states over disjoint key sets: ``(o, lse)`` of their union.

    ``lse = logaddexp(lse_a, lse_b)``, ``o = o_a e^(lse_a - lse) + o_b e^(lse_b - lse)``, folded left
    to right with the backend's ``merge_states``; empty states (``lse = -inf``) contribute nothing and
    an all-empty merge is ``(0, -inf)``. Sinks are not part of a state: apply them after the merge.
    """
    if not states:
        raise ParameterError("states: expected at least one (o, lse) state, got none")
    be = _backend(backend)
    for n, st in enumerate(states):
        if len(st) != 2 or np.shape(st[0])[:-1] != np.shape(st[1]):
            raise ShapeError(f"states[{n}]: expected (o (..., Dv), lse (...)), got shapes "
                             f"{[fmt_shape(np.shape(a)) for a in st]}")
    return functools.reduce(lambda a, b: be.merge_states(a[0], a[1], b[0], b[1]), states)


# -- ring attention ---------------------------------------------------------------------------------
def shard_indices(n: int, num_devices: int, sharding: str = "zigzag") -> list:
    """Token indices held by each of ``num_devices`` devices.

    ``"contiguous"``: ``np.array_split(range(n), P)``. ``"zigzag"``: split into ``2P`` chunks and give
    device ``r`` chunks ``r`` and ``2P - 1 - r``, which balances causal work (early rows see few keys).
    """
    if sharding == "contiguous":
        return np.array_split(np.arange(n), num_devices)
    if sharding == "zigzag":
        chunks = np.array_split(np.arange(n), 2 * num_devices)
        return [np.concatenate([chunks[r], chunks[2 * num_devices - 1 - r]]) for r in range(num_devices)]
    raise ParameterError(f"sharding: expected 'zigzag' or 'contiguous', got {sharding!r}")


@dataclass
class RingReport:
    """The per-step schedule of a simulated ring.

    ``steps[t][r]`` is a dict for device ``r`` at step ``t``: ``kv_from`` (whose KV shard it holds),
    ``pairs`` (visible query-key pairs it computes; 0 means the step is skipped) and ``computed``.
    ``bytes_per_step[t]`` is the KV traffic after step ``t`` (every device sends its current K and V
    shard to device ``r + 1``; nothing after the last step).
    """

    num_devices: int
    sharding: str
    steps: list = field(default_factory=list)
    bytes_per_step: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes_per_step))

    def work_per_device(self) -> list:
        return [sum(step[r]["pairs"] for step in self.steps) for r in range(self.num_devices)]

    def table(self) -> str:
        """A printable schedule: one line per step, ``device<-kv shard:pairs``."""
        lines = []
        for t, step in enumerate(self.steps):
            cells = "  ".join(f"d{r}<-kv{c['kv_from']}:{c['pairs']}" for r, c in enumerate(step))
            lines.append(f"step {t}: {cells}  | sends {self.bytes_per_step[t]} B")
        lines.append(f"work per device: {self.work_per_device()}  total bytes: {self.total_bytes}")
        return "\n".join(lines)


@dataclass
class _RingPlan:
    """Validated inputs, shards, the global mask and the schedule shared by forward and backward."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    qs: list
    ks: list
    mask: np.ndarray
    scale: float
    head_map: np.ndarray
    report: RingReport

    def blocks(self):
        """``(r, src, keep)`` for every (device, step) with at least one visible pair, in order."""
        for t, step in enumerate(self.report.steps):
            for r, cell in enumerate(step):
                if cell["computed"]:
                    yield r, cell["kv_from"], self.mask[np.ix_(self.qs[r], self.ks[cell["kv_from"]])]

    def shard(self, a, ix):
        return a[:, :, ix]


def _ring_plan(q, k, v, num_devices, causal, alignment, sharding, scale, head_map, bytes_per_element,
               moving=1):
    p = _int(num_devices, "num_devices", 1)
    q, k, v = (as_compute(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    check_qkv(q, k, v, "bhsd")
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qs, ks = shard_indices(sq, p, sharding), shard_indices(sk, p, sharding)
    mask = Pattern(causal=causal, alignment=alignment).mask(sq, sk)[0, 0]
    report = RingReport(num_devices=p, sharding=sharding)
    itemsize = _int(bytes_per_element, "bytes_per_element", 1)
    for t in range(p):
        step = []
        for r in range(p):
            src = (r - t) % p
            pairs = int(mask[np.ix_(qs[r], ks[src])].sum()) * b * hq
            step.append({"kv_from": src, "pairs": pairs, "computed": pairs > 0})
        report.steps.append(step)
        sent = sum(b * hkv * len(ks[(r - t) % p]) * (d + v.shape[3]) * itemsize for r in range(p))
        report.bytes_per_step.append(moving * sent if t < p - 1 else 0)
    scale = check_scale(scale, d)
    check_score_range(q, k, scale)
    return _RingPlan(q=q, k=k, v=v, qs=qs, ks=ks, mask=mask, scale=scale,
                     head_map=head_map_for(hq, hkv, head_map), report=report)


def ring_attention(q, k, v, *, num_devices: int, causal: bool = False, alignment: str = "bottom_right",
                   sharding: str = "zigzag", scale=None, head_map=None, backend="numpy",
                   bytes_per_element: int = 8):
    """Ring attention on ``num_devices`` simulated devices: ``(out, lse, RingReport)``.

    Device ``r`` holds query shard ``r`` and, at step ``t``, KV shard ``(r - t) mod P`` (shards move
    one device forward per step). Each device attends its queries to the KV shard it holds, with the
    mask of the *global* positions (causal: key ``j`` visible iff ``j <= i + s``), skips steps with no
    visible pair, and folds the partial result into its running state with ``merge_states``. Equals
    full attention to float64 rounding for any ``P``, causal or not (tested). The report counts
    ``bytes_per_element`` bytes per K/V element moved (8: the float64 simulation; 2 for bf16).
    """
    be = _backend(backend)
    plan = _ring_plan(q, k, v, num_devices, causal, alignment, sharding, scale, head_map, bytes_per_element)
    b, hq, sq, _ = plan.q.shape
    dv = plan.v.shape[3]
    states = [(np.zeros((b, hq, len(ix), dv)), np.full((b, hq, len(ix)), -np.inf)) for ix in plan.qs]
    for r, src, keep in plan.blocks():
        o, lse = be.attend(*(be.asarray(plan.shard(a, ix)) for a, ix in
                             ((plan.q, plan.qs[r]), (plan.k, plan.ks[src]), (plan.v, plan.ks[src]))),
                           pattern=Pattern(dense=keep), scale=plan.scale, head_map=plan.head_map)
        merged = be.merge_states(states[r][0], states[r][1], be.to_numpy(o), be.to_numpy(lse))
        states[r] = (be.to_numpy(merged[0]), be.to_numpy(merged[1]))
    out = np.zeros((b, hq, sq, dv))
    lse = np.full((b, hq, sq), -np.inf)
    for ix, (o, l) in zip(plan.qs, states):
        out[:, :, ix], lse[:, :, ix] = o, l
    return out, lse, plan.report


def ring_attention_backward(q, k, v, dout, *, num_devices: int, causal: bool = False,
                            alignment: str = "bottom_right", sharding: str = "zigzag", scale=None,
                            head_map=None, backend="numpy", bytes_per_element: int = 8):
    """Gradients of :func:`ring_attention`: ``(dq, dk, dv, RingReport)``.

    The ring backward: the final ``out`` and ``lse`` of each query shard are known, so every block
    ``(r, src)`` computes its share of the gradients with ``attend_backward`` (``P = exp(S - lse)``,
    ``delta = rowsum(dout * out)``); ``dq`` stays on device ``r``, ``dk``/``dv`` travel with the KV
    shard (the report counts K, V, dK and dV moving: twice the forward's bytes).
    """
    be = _backend(backend)
    out, lse, _ = ring_attention(q, k, v, num_devices=num_devices, causal=causal, alignment=alignment,
                                 sharding=sharding, scale=scale, head_map=head_map, backend=be)
    plan = _ring_plan(q, k, v, num_devices, causal, alignment, sharding, scale, head_map,
                      bytes_per_element, moving=2)
    dout = as_compute(dout, "dout")
    if dout.shape != out.shape:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(out.shape)}, got {fmt_shape(dout.shape)}")
    dq, dk, dv = np.zeros(plan.q.shape), np.zeros(plan.k.shape), np.zeros(plan.v.shape)
    for r, src, keep in plan.blocks():
        qi, ki = plan.qs[r], plan.ks[src]
        args = [be.asarray(a) for a in (plan.shard(plan.q, qi), plan.shard(plan.k, ki), plan.shard(plan.v, ki),
                                        out[:, :, qi], lse[:, :, qi], dout[:, :, qi])]
        g = be.attend_backward(*args, pattern=Pattern(dense=keep), scale=plan.scale, head_map=plan.head_map)
        dq[:, :, qi] += be.to_numpy(g[0])
        dk[:, :, ki] += be.to_numpy(g[1])
        dv[:, :, ki] += be.to_numpy(g[2])
    return dq, dk, dv, plan.report


# -- expected attention -----------------------------------------------------------------------------
def rope_average_rotation(dim: int, positions, **rope_kwargs) -> np.ndarray:
    """The mean RoPE rotation matrix over ``positions``: ``(dim, dim)``, ``mean_p R(p)`` where
    ``rope(x, p) = R(p) x`` (:func:`refattn.position.rope`; ``rope_kwargs`` are its keywords).

    Expected Attention (kvpress) averages the rotation over the next ``n`` positions and applies it
    to pre-RoPE query statistics: ``mu -> R mu``, ``cov -> R cov Rᵀ``.
    """
    from ..position.encodings import rope

    dim = _int(dim, "dim", 1)
    pos = np.asarray(positions)
    basis = np.broadcast_to(np.eye(dim)[:, None, :], (dim, pos.size, dim))
    columns = rope(basis, pos, **rope_kwargs)  # [i, t] = R(p_t) e_i, column i of R(p_t)
    return columns.mean(axis=1).T


def expected_attention_scores(k, mu, cov=None, *, scale=None) -> np.ndarray:
    """Log expected attention of each key for future queries ``q ~ N(mu, cov)``: ``(B, H, Sk)``.

    ``log E[exp(scale * q·k)] = scale * mu·k + scale**2 * kᵀ cov k / 2`` (the Gaussian moment
    generating function); with ``scale = 1/sqrt(D)`` (default) the second term is ``kᵀΣk / (2D)``.
    ``k (B, Hkv, Sk, D)``; ``mu (B, H, D)`` and ``cov (B, H, D, D)`` (symmetric positive
    semi-definite; None: the mean term only) per query head, ``H`` a multiple of ``Hkv`` -- query
    head ``h`` reads KV head ``h // (H // Hkv)``.
    """
    k, mu = as_compute(k, "k"), as_compute(mu, "mu")
    if k.ndim != 4:
        raise ShapeError(f"k: expected (B, Hkv, Sk, D), got {fmt_shape(k.shape)}")
    b, hkv, sk, d = k.shape
    if mu.ndim != 3 or mu.shape[0] != b or mu.shape[2] != d:
        raise ShapeError(f"mu: expected ({b}, H, {d}) = (B, query heads, D), got {fmt_shape(mu.shape)}")
    h = mu.shape[1]
    kh = k[:, head_map_for(h, hkv)]
    s = check_scale(scale, d)
    out = s * np.einsum("bhd,bhkd->bhk", mu, kh)
    if cov is not None:
        cov = as_compute(cov, "cov")
        if cov.shape != (b, h, d, d):
            raise ShapeError(f"cov: expected ({b}, {h}, {d}, {d}) = (B, H, D, D), got {fmt_shape(cov.shape)}")
        out = out + 0.5 * s * s * np.einsum("bhkd,bhde,bhke->bhk", kh, cov, kh)
    return out


def expected_attention_key_scores(log_scores, num_kv_heads: int, *, v=None, n_sink: int = 0,
                                  epsilon: float = 0.0) -> np.ndarray:
    """Per-KV-head key scores ``(B, Hkv, Sk)`` from :func:`expected_attention_scores` (kvpress's rule).

    The first ``n_sink`` keys are set aside; over the others each query head's log scores go through
    a softmax, the query heads of a group are averaged, and with ``v (B, Hkv, Sk, Dv)`` the result
    becomes ``(score + epsilon) * ||v_j||``. Sink keys get the maximum score, so they are kept.
    """
    b, h, sk = log_scores.shape
    n_sink = _int(n_sink, "n_sink")
    if n_sink >= sk:
        raise ParameterError(f"n_sink: expected fewer sink tokens than the {sk} keys, got {n_sink}")
    x = log_scores[..., n_sink:]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    p = p.reshape(b, num_kv_heads, h // num_kv_heads, sk - n_sink).mean(axis=2)
    if v is not None:
        p = (p + epsilon) * np.linalg.norm(as_compute(v, "v")[..., n_sink:, :], axis=-1)
    sinks = np.full((b, num_kv_heads, n_sink), p.max())
    return np.concatenate([sinks, p], axis=-1)


def expected_attention_keep(scores, ratio: float) -> np.ndarray:
    """Boolean mask of ``scores``'s shape keeping the ``max(1, int(Sk * (1 - ratio)))`` highest-scoring
    keys of each row (kvpress's count); ties are broken towards the earlier key (a stable sort).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
        raise ParameterError(f"ratio: expected the fraction of keys to drop, in [0, 1), got {ratio!r}")
    sk = scores.shape[-1]
    n_keep = max(1, int(sk * (1 - ratio)))
    order = np.argsort(-scores, axis=-1, kind="stable")
    keep = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n_keep], True, axis=-1)
    return keep


# -- deprecated entry points (one release): thin wrappers of refattn.attention ---------------------------
def _deprecated(name: str, variant: str, arrays: dict, backend, params: dict):
    import warnings

    import refattn

    warnings.warn(f"refattn.kvcache.{name} is deprecated and will be removed in the next release; "
                  f"call refattn.attention(..., variant={variant!r}) with the same inputs and "
                  f"parameters", DeprecationWarning, stacklevel=3)
    return refattn.attention(variant=variant, backend=backend, **arrays, **params)


def decode_attention(q, k, v, *, cache_seqlens=None, backend="numpy", **params):
    """Deprecated: ``refattn.attention(q, k, v, variant="decode", cache_seqlens=...)``."""
    return _deprecated("decode_attention", "decode", {"q": q, "k": k, "v": v}, backend,
                       dict(params, cache_seqlens=cache_seqlens))


def paged_attention(q, k_pages, v_pages, block_table, seq_lens, *, backend="numpy", **params):
    """Deprecated: ``refattn.attention(q, k_pages, v_pages, block_table, seq_lens, variant="paged")``."""
    return _deprecated("paged_attention", "paged", {"q": q, "k_pages": k_pages, "v_pages": v_pages,
                                                    "block_table": block_table, "seq_lens": seq_lens},
                       backend, params)


def mla_attention(q, hidden, w_dkv, w_uk, w_uv, w_kr, *, form="absorbed", backend="numpy", **params):
    """Deprecated: ``refattn.attention(q, hidden, w_dkv, w_uk, w_uv, w_kr, variant="mla")``."""
    return _deprecated("mla_attention", "mla", {"q": q, "hidden": hidden, "w_dkv": w_dkv, "w_uk": w_uk,
                                                "w_uv": w_uv, "w_kr": w_kr}, backend,
                       dict(params, form=form))


def cascade_attention(q, k, v, prefix_k, prefix_v, *, backend="numpy", **params):
    """Deprecated: ``refattn.attention(q, k, v, prefix_k, prefix_v, variant="cascade")``."""
    return _deprecated("cascade_attention", "cascade", {"q": q, "k": k, "v": v, "prefix_k": prefix_k,
                                                        "prefix_v": prefix_v}, backend, params)


def expected_attention(q, k, v, mu, cov, *, ratio=0.5, backend="numpy", **params):
    """Deprecated: ``refattn.attention(q, k, v, mu, cov, variant="expected_attention", ratio=...)``."""
    return _deprecated("expected_attention", "expected_attention",
                       {"q": q, "k": k, "v": v, "mu": mu, "cov": cov}, backend, dict(params, ratio=ratio))

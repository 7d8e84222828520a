"""BigBird ITC block-sparse attention with Hugging Face semantics (VARIANTS sections D and H).

With ``b = block_size`` and ``nb = L / b`` blocks (``rand_attn`` in HF's layout ``(H, nb - 2, r)``;
row ``q - 1`` belongs to query block ``q``):

* query blocks ``0`` and ``nb - 1`` are global: they see every key;
* every query block sees key blocks ``0`` and ``nb - 1`` (global columns);
* query block ``q`` in ``1 .. nb - 2`` sees its window ``q - 1, q, q + 1`` and its ``r`` random
  blocks ``rand_attn[h, q - 1]`` (per head).

Random blocks come from (``generator=``):

* ``"refattn"`` (default): per head and block row, ``r`` distinct blocks drawn uniformly (numpy
  ``default_rng(seed)``, head-major, row by row) from the blocks that are neither window nor global --
  never a block already seen;
* ``"hf"``: HF's generators reproduced from ``seed`` (HF seeds ``np.random.seed(seed)`` with the layer
  index, training mode): for ``L in {1024, 3072, 4096}`` the older generator, run in a
  ``max_position_embeddings`` frame with ``last_idx=1024`` (it can name window or global blocks),
  otherwise the per-head generator (``_bigbird_block_rand_mask_with_head``, which never does);
* ``"hf_eval"``: HF in eval mode -- an all-zero table (every random block is block 0);
* or an explicit ``rand_attn``.

When the table names a block already seen, ``duplicates="once"`` (default) counts every key once
(the Pattern is a set); ``duplicates="hf"`` counts it as HF does -- twice (or more): the attention is
then over a multiset, computed as ``merge_states`` of one pass per multiplicity layer.

``L <= (5 + 2 r) b`` falls back to full attention with a :class:`BigBirdFallbackWarning`, exactly
where HF's ``BigBirdModel`` switches to ``original_full``. ``L % b != 0`` is an error unless
``pad=True``: HF pads to a multiple of ``b`` with masked keys; here the last block is ragged (the
same attention on the real tokens) and the generator runs for the padded length, as HF's does.
Self-attention only (``Sq == Sk``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from ...patterns import BlockSparse
from .. import Variant, param_field, register
from ..core import CoreParams, check_dout, finish, forward_state, prepare, to_layout
from . import COMMON, PATTERNS, SPARSE_DROP, attend_pattern, sparse_example, with_core


class BigBirdFallbackWarning(UserWarning):
    """The sequence is too short for block-sparse BigBird: full attention is used, as in HF."""


@dataclass(frozen=True)
class BigBirdParams(CoreParams):
    block_size: int = param_field(64, "block size b (HF config.block_size)")
    num_random_blocks: int = param_field(3, "random blocks r per block row and head (HF config)")
    rand_attn: Any = param_field(None, "explicit random blocks (Hq, nb-2, r) in HF's layout")
    seed: int = param_field(0, "seed of the random blocks (generator 'refattn' or 'hf')")
    generator: str = param_field("refattn", "'refattn' (never a seen block), 'hf' (HF's generators, "
                                            "training mode) or 'hf_eval' (HF eval: all zeros)")
    max_position_embeddings: int = param_field(4096, "HF config value: the frame of HF's older "
                                                     "generator (L in {1024, 3072, 4096})")
    duplicates: str = param_field("once", "'once': a key counts once; 'hf': a repeated block counts "
                                          "as often as HF's table names it")
    pad: bool = param_field(False, "allow L % block_size != 0 (HF pads; the last block is ragged)")


# -- HF's generators, reproduced -------------------------------------------------------------------
def hf_rand_attn(seq_len: int, block_size: int, r: int, heads: int, seed: int,
                 max_position_embeddings: int = 4096, training: bool = True) -> np.ndarray:
    """The ``(heads, nb - 2, r)`` table HF ``BigBirdBlockSparseAttention`` draws after
    ``np.random.seed(seed)`` (a ``numpy.random.RandomState(seed)`` here), for ``seq_len`` (padded)."""
    nb = seq_len // block_size
    if not training:
        return np.zeros((heads, nb - 2, r), dtype=np.int32)
    rng = np.random.RandomState(seed)
    if seq_len in (1024, 3072, 4096):  # HF: "old plans used in paper"
        frame = max_position_embeddings
        if frame // block_size - 2 < nb - 2:
            raise ParameterError(f"max_position_embeddings: expected at least L={seq_len} for HF's "
                                 f"generator at this length, got {frame}")
        tables = [_hf_block_rand_mask(rng, frame, block_size, r, last_idx=1024)[:nb - 2]
                  for _ in range(heads)]
    else:
        plan_len, plan_r = _hf_rand_attn_plan(seq_len, block_size, r)
        tables = _hf_block_rand_mask_with_head(rng, seq_len, block_size, heads, plan_len, plan_r)
    return np.stack(tables).astype(np.int64)


def _hf_block_rand_mask(rng, length, bs, r, last_idx=-1):
    """HF ``_bigbird_block_rand_mask`` (training mode), including its missing ``-3``/``-4``."""
    nb = length // bs
    rand_attn = np.zeros((nb - 2, r), dtype=np.int32)
    middle_seq = np.arange(1, nb - 1, dtype=np.int32)
    last = nb - 1
    if last_idx > 2 * bs:
        last = (last_idx // bs) - 1
    for i in range(1, nb - 1):
        start, end = i - 2, i
        if i == 1:
            choice = middle_seq[2:last]
        elif i == 2:
            choice = middle_seq[3:last]
        elif i in (nb - 3, nb - 2):
            choice = middle_seq[:last]
        elif start > last:
            choice = middle_seq[:last]
        elif end + 1 == last:
            choice = middle_seq[:start]
        else:
            choice = np.concatenate((middle_seq[:start], middle_seq[end + 1:last]))
        drawn = rng.permutation(choice)[:r]
        if drawn.size != r:
            raise ParameterError(f"num_random_blocks: HF's generator has only {drawn.size} blocks to "
                                 f"draw from for block row {i}, got r={r}")
        rand_attn[i - 1, :] = drawn
    return rand_attn


def _hf_rand_attn_plan(seq_len, bs, r):
    """HF ``_get_rand_attn_plan``."""
    nb = seq_len // bs
    if 2 * r + 5 < nb:
        return [(2 * r + 5) * bs, seq_len], [r, 0]
    if r + 5 < nb:
        return [(r + 5) * bs, seq_len], [r // 2, r - r // 2]
    return [seq_len], [r]


def _hf_single_row(rng, block_id, to_start, to_end, r):
    """HF ``_get_single_block_row_attention`` (window 1 left/right, one global block each side)."""
    perm = rng.permutation(np.arange(to_start, to_end, dtype=np.int32))
    illegal = set(range(block_id - 1, block_id + 2)) | {0, to_end - 1}
    if block_id == 1:
        illegal.add(to_end - 2)
    if block_id == to_end - 2:
        illegal.add(1)
    return np.array([x for x in perm if x not in illegal][:r], dtype=np.int32)


def _hf_block_rand_mask_with_head(rng, seq_len, bs, heads, plan_len, plan_r):
    """HF ``_bigbird_block_rand_mask_with_head`` (training mode, default window/global sizes)."""
    nb = seq_len // bs
    plan_blocks = np.array(plan_len) // bs
    max_plan = plan_len.index(seq_len)
    tables = [np.zeros((nb, int(np.sum(plan_r[:max_plan + 1]))), dtype=np.int32) for _ in range(heads)]

    def fill(rows, lo, hi, to_start, to_end, count):
        for row in rows:
            for h in range(heads):
                # as HF: a short draw raises (or, of size 1, broadcasts) on assignment
                tables[h][row, lo:lo + count] = _hf_single_row(rng, row, to_start, to_end, count)

    for plan_idx in range(max_plan + 1):
        rnd = 0
        if plan_idx > 0:
            if plan_r[plan_idx] > 0:
                rnd = int(np.sum(plan_r[:plan_idx]))
                fill(range(1, plan_blocks[plan_idx - 1]), rnd, None, plan_blocks[plan_idx - 1],
                     plan_blocks[plan_idx], plan_r[plan_idx])
            for pl in range(plan_idx):
                if plan_r[pl] == 0:
                    continue
                lo = int(np.sum(plan_r[:pl])) if pl > 0 else 0
                start = plan_blocks[pl - 1] if pl > 0 else 0
                fill(range(plan_blocks[plan_idx - 1], plan_blocks[plan_idx]), lo, None, start,
                     plan_blocks[pl], plan_r[pl])
        if plan_r[plan_idx] == 0:
            continue
        first_row, to_start = 1, 0
        if plan_idx > 0:
            rnd = int(np.sum(plan_r[:plan_idx]))
            first_row = to_start = plan_blocks[plan_idx - 1]
        fill(range(first_row, plan_blocks[plan_idx]), rnd, None, to_start, plan_blocks[plan_idx],
             plan_r[plan_idx])
    return [t[1:nb - 1] for t in tables]


# -- our generator and the layout ----------------------------------------------------------------
def window_and_global(nb: int) -> np.ndarray:
    """Bool ``(nb, nb)``: the blocks every query block sees without random ones (ITC)."""
    q = np.arange(nb)
    seen = np.abs(q[:, None] - q[None, :]) <= 1
    seen[:, [0, nb - 1]] = True
    seen[[0, nb - 1], :] = True
    return seen


def refattn_rand_attn(nb: int, r: int, heads: int, seed: int) -> np.ndarray:
    """``(heads, nb - 2, r)``: per head (outer) and block row ``q`` (inner), ``r`` distinct blocks
    from those ``q`` does not already see (``numpy.random.default_rng(seed).choice`` without
    replacement, sorted). Never a window or global block."""
    rng = np.random.default_rng(seed)
    seen = window_and_global(nb)
    out = np.zeros((heads, nb - 2, r), dtype=np.int64)
    for h in range(heads):
        for q in range(1, nb - 1):
            allowed = np.nonzero(~seen[q])[0]
            if allowed.size < r:
                raise ParameterError(f"num_random_blocks: block row {q} has only {allowed.size} "
                                     f"unseen blocks, got r={r}")
            out[h, q - 1] = np.sort(rng.choice(allowed, size=r, replace=False))
    return out


def multiplicity(rand_attn: np.ndarray, nb: int) -> np.ndarray:
    """Int ``(H, nb, nb)``: how often HF's computation counts each block (window and global blocks
    once, plus one for every time ``rand_attn`` names the block in that row)."""
    heads = rand_attn.shape[0]
    mult = np.broadcast_to(window_and_global(nb).astype(np.int64), (heads, nb, nb)).copy()
    h, row, _ = np.indices(rand_attn.shape)
    np.add.at(mult, (h, row + 1, rand_attn), 1)
    return mult


def threshold(block_size: int, r: int) -> int:
    """HF's ``max_tokens_to_attend``: ``L <= (5 + 2 r) b`` means full attention."""
    return (5 + 2 * r) * block_size


def bigbird_rand_attn(p: BigBirdParams, seq_len: int, heads: int) -> np.ndarray:
    """The random-block table for ``p`` at (padded) length ``seq_len``, validated."""
    bs, r = p.block_size, p.num_random_blocks
    nb = -(-seq_len // bs)
    if p.rand_attn is not None:
        return V.int_array(p.rand_attn, "rand_attn", (heads, nb - 2, r), 0, nb,
                           meaning="(Hq, nb-2, r) of block indices")
    V.check_choice(p.generator, "generator", ("refattn", "hf", "hf_eval"))
    V.check_int(p.seed, "seed", 0)
    if p.generator == "refattn":
        return refattn_rand_attn(nb, r, heads, int(p.seed))
    return hf_rand_attn(nb * bs, bs, r, heads, int(p.seed), p.max_position_embeddings,
                        training=p.generator == "hf")


def bigbird_layers(p: BigBirdParams, seq_len: int, heads: int, alignment="bottom_right"):
    """The patterns to attend over: ``[layout]`` (a set), or one per multiplicity level with
    ``duplicates="hf"``; None when the length falls back to full attention."""
    bs = V.check_int(p.block_size, "block_size", 1)
    r = V.check_int(p.num_random_blocks, "num_random_blocks", 0)
    V.check_int(p.max_position_embeddings, "max_position_embeddings", 0)
    V.check_choice(p.duplicates, "duplicates", ("once", "hf"))
    if seq_len % bs and not p.pad:
        raise ShapeError(f"q: expected a sequence length that is a multiple of block_size={bs}, got "
                         f"{seq_len} (pass pad=True to pad as HF does)")
    if seq_len <= threshold(bs, r):
        warnings.warn(f"bigbird: sequence length {seq_len} <= (5 + 2*num_random_blocks) * block_size "
                      f"= {threshold(bs, r)}: full attention is used, as HF BigBirdModel does",
                      BigBirdFallbackWarning, stacklevel=4)
        return None
    nb = -(-seq_len // bs)
    mult = multiplicity(bigbird_rand_attn(p, seq_len, heads), nb)
    levels = 1 if p.duplicates == "once" else int(mult.max())
    return [BlockSparse(layout=mult > level, block_q=bs, block_k=bs, alignment=alignment)
            for level in range(levels)]


def _setup(backend, arrays, p):
    pre = prepare(backend, arrays, p)
    b, hq, sq, sk = pre.shape  # the whole problem's (a sub-rectangle's pattern is global)
    if sk != sq:
        raise ShapeError(f"k: expected Sk == Sq = {sq} (BigBird is self-attention), got {sk}")
    layers = bigbird_layers(p, sq, hq, pre.pattern.alignment)
    pats = [pre.pattern] if layers is None else [with_core(pre.pattern, lay) for lay in layers]
    if len(pats) > 1 and (pre.sinks is not None or pre.dropout is not None):
        raise ParameterError("duplicates: 'hf' with repeated blocks cannot be combined with sinks or "
                             "dropout (a multiset has no single dropout mask); use duplicates='once'")
    return pre, pats


def _attend_layers(backend, pre, pats):
    """``(out, lse)`` over the multiplicity layers, merged: each extra level is one more copy of
    its keys."""
    out, lse = attend_pattern(backend, pre, pats[0])
    for pat in pats[1:]:
        o2, l2 = attend_pattern(backend, pre, pat)
        out, lse = backend.merge_states(out, lse, o2, l2)
    return out, lse


def _forward(backend, arrays, p):
    pre, pats = _setup(backend, arrays, p)
    out, lse = _attend_layers(backend, pre, pats)
    return finish(backend.to_numpy(out), backend.to_numpy(lse), p)


def _backward(backend, arrays, dout, p):
    """Gradients; with several multiplicity layers, each layer's ``attend_backward`` with the
    *merged* output and LSE gives that layer's share (the multiset's sum splits over layers)."""
    pre, pats = _setup(backend, arrays, p)
    dout = check_dout(dout, pre, p)
    out, lse = forward_state(backend, pre, p, lambda: _attend_layers(backend, pre, pats))
    grads, extras = None, {}
    for pat in pats:
        kw = pre.primitive_kwargs(pat)
        *g, ex = backend.attend_backward(pre.q, pre.k, pre.v, out, lse, dout, **kw)
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        for name, x in ex.items():  # a bias gradient also sums over the layers
            extras[name] = x if name not in extras else extras[name] + x
    grads = [to_layout(backend.to_numpy(g), p) for g in grads]
    extras = {n: backend.to_numpy(g) for n, g in extras.items()}
    if "bias" in extras:
        extras["bias"] = extras["bias"].reshape(np.shape(p.bias))
    return (*grads, extras)


PATTERNS["bigbird"] = lambda backend, arrays, p: _setup(backend, arrays, p)[1][0]

register(Variant(
    name="bigbird",
    doc="BigBird ITC block-sparse attention with HF semantics: global first/last blocks, a 3-block "
    "window and r random blocks per head (rand_attn (H, nb-2, r), or seeded: our generator never "
    "draws a seen block, generator='hf' reproduces HF's); duplicates='once'|'hf'; L <= (5+2r)b "
    "falls back to full attention with a warning, as HF does; L % b != 0 needs pad=True.",
    citation="Zaheer et al., Big Bird: Transformers for Longer Sequences, NeurIPS 2020; HF "
    "transformers BigBirdBlockSparseAttention", params=BigBirdParams, forward=_forward,
    backward=_backward, example=sparse_example((1, 4, 1024, 1024, 64, 4)),
    default_shape=(1, 4, 1024, 1024, 64, 4), drop=SPARSE_DROP + ("alignment",), subrect=True,
    **COMMON))

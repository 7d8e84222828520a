"""Serving variants: ``decode``, ``paged``, ``mla``, ``cascade``, ``ring``, ``expected_attention``
(VARIANTS section C). Each gathers or projects with readable glue from :mod:`refattn.kvcache` and
then calls the backend's ``attend`` (and ``merge_states``), so every backend with those runs them.

* ``decode``: sdpa where the ``Sq`` queries are the last tokens of each sequence; ``cache_seqlens
  (B,)`` (default all ``Sk``) gives each sequence's cached length. Causal by default.
* ``paged``: the same over KV stored in pages ``(num_blocks, block_size, Hkv, D)`` addressed by a
  ``block_table (B, max_blocks)`` and ``seq_lens (B,)``; equals ``decode`` on the gathered cache.
* ``mla``: DeepSeek's Multi-head Latent Attention from ``hidden (B, Sk, d_model)`` and the weights;
  ``form="naive"`` expands per-head K/V, ``form="absorbed"`` attends in the latent space. Equal.
* ``cascade``: a prefix ``prefix_k/prefix_v (Hkv, Sp, D)`` shared by every request, plus per-request
  suffixes ``k, v``; attention over each part merged with ``merge_states`` equals attention over
  ``[prefix; suffix]`` (prefix fully visible, suffix bottom-right causal).
* ``ring``: ``num_devices`` simulated devices passing KV shards around a ring (zig-zag sharding).
* ``expected_attention``: attention after dropping the keys with the lowest expected attention under
  Gaussian future queries ``N(mu, cov)`` per query head (kvpress's scoring: softmax over keys, mean
  over the group, optional ``||v||`` weighting, sink tokens and RoPE averaging).

All return the LSE over the keys actually attended (``(B, Hq, Sq)``, natural log).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import serving as KV
from ..position import encodings as P
from ... import validate as V
from ...errors import ParameterError, ShapeError, fmt_shape
from ...patterns import Pattern
from refattn.backends.base import ScoreMod
from .. import Variant, param_field, register
from ..core import CoreParams, backward_prepared, example as core_example, prepare, to_layout
from ..position import (_rotate, attend_finish, parse_scaling, rope_positions, to_caller,
                       user_bias_grad)

_BACKENDS = ("numpy", "numba", "cupy")


def _attend(backend, q, k, v, *, pattern, scale, head_map):
    V.check_score_range(q, k, scale)  # made (projected, compressed) q and k: checked here
    out, lse = backend.attend(backend.asarray(q), backend.asarray(k), backend.asarray(v),
                              pattern=pattern, scale=scale, head_map=head_map)
    return backend.to_numpy(out), backend.to_numpy(lse)


def _qkv(arrays, names=("q", "k", "v")):
    q, k, v = (V.as_compute(arrays[n], n) for n in names)
    for n, a in zip(names, (q, k, v)):
        V.check_rank4(a, n, "bhsd", "Dv" if n == names[2] else "D")
    V.check_qkv(q, k, v, "bhsd")
    return q, k, v


def _causal_alignment(p):
    """``(causal, alignment)`` from ``p.causal`` (False, True, 'bottom_right', 'top_left') and ``p.alignment``."""
    V.check_choice(p.alignment, "alignment", ("bottom_right", "top_left"))
    if not (isinstance(p.causal, bool) or p.causal in ("bottom_right", "top_left")):
        raise ParameterError(f"causal: expected False, True, 'bottom_right' or 'top_left', got {p.causal!r}")
    return bool(p.causal), (p.causal if isinstance(p.causal, str) else p.alignment)


# -- decode / paged ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeParams(CoreParams):
    causal: Any = param_field(True, "queries see keys up to their own position (bottom-right)")
    sliding_window: Optional[int] = param_field(None, "vLLM-style window of W tokens = window (W-1, 0)")
    cache_seqlens: Any = param_field(None, "(B,) cached length of each sequence, in [Sq, Sk]; default Sk")


def _decode_prepare(backend, arrays, p, seq_lens, name="cache_seqlens"):
    if p.alignment != "bottom_right" or p.causal == "top_left":
        raise ParameterError("alignment: decoding is bottom-right (queries are the last tokens), "
                             f"got {p.causal if p.causal == 'top_left' else p.alignment!r}")
    _causal_alignment(p)
    window = V.check_window(p.window)
    if p.sliding_window is not None:
        w = p.sliding_window
        if window is not None:
            raise ParameterError("sliding_window: given together with window=; give one")
        window = (V.check_int(w, "sliding_window", 1) - 1, 0)
    pre = prepare(backend, arrays, dataclasses.replace(p, causal=False, window=None))
    b, sq, sk = pre.q.shape[0], pre.q.shape[2], pre.k.shape[2]
    lens = np.full(b, sk) if seq_lens is None else KV.int_array(seq_lens, name, (b,))
    keep = KV.decode_mask(lens, sq, sk, causal=bool(p.causal), window=window, name=name)
    if pre.pattern.dense is not None:
        keep = keep & pre.pattern.dense
    pre = dataclasses.replace(pre, pattern=Pattern(dense=keep))
    sm = pre.score_mod
    if sm is not None and sm.alibi_slopes is not None and sm.alibi_form == "symmetric":
        # ALiBi distances are to each sequence's own query position L_b - Sq + i, not Sk - Sq + i
        pos = (lens[:, None] - sq + np.arange(sq)[None, :])[:, None, :, None]
        alibi = -sm.alibi_slopes[None, :, None, None] * np.abs(pos - np.arange(sk))
        pre = dataclasses.replace(pre, score_mod=ScoreMod(
            softcap=sm.softcap, bias=alibi if sm.bias is None else sm.bias + alibi))
    return pre


def _decode(backend, arrays, p, seq_lens, name="cache_seqlens"):
    return attend_finish(backend, _decode_prepare(backend, arrays, p, seq_lens, name), p)


def _decode_grads(backend, arrays, dout, p, seq_lens, name="cache_seqlens"):
    """``(dq, dk, dv, extras)`` in ``bhsd``; ``extras`` has ``bias`` (caller's shape) and ``sinks``."""
    pre = _decode_prepare(backend, arrays, p, seq_lens, name)
    dq, dk, dv, extras = backward_prepared(backend, pre, dout, p)
    _, extras = user_bias_grad(extras, p)
    return dq, dk, dv, extras


def _decode_forward(backend, arrays, p: DecodeParams):
    return _decode(backend, arrays, p, p.cache_seqlens)


def _decode_backward(backend, arrays, dout, p: DecodeParams):
    dq, dk, dv, extras = _decode_grads(backend, arrays, dout, p, p.cache_seqlens)
    return (*to_caller((dq, dk, dv), p), extras)


register(Variant(
    name="decode", family="kvcache",
    doc="Decode against a KV cache: the Sq queries are the last tokens of each sequence (cache_seqlens "
    "per batch entry), bottom-right causal, optional sliding window; equals the last rows of causal sdpa.",
    citation="Pope et al., Efficiently Scaling Transformer Inference, MLSys 2023",
    params=DecodeParams, forward=_decode_forward, backward=_decode_backward, backends=_BACKENDS,
    example=core_example, drop=("alignment", "alibi_form")))


@dataclass(frozen=True)
class PagedParams(DecodeParams):
    block_size: Optional[int] = param_field(None, "tokens per page; default: read from k_pages "
                                                  "(the example builds pages of 4 tokens)")


def _block_size(p, default: int = 4) -> int:
    bs = getattr(p, "block_size", None)
    return default if bs is None else V.check_int(bs, "block_size", 1)


def _paged_inputs(arrays, p: PagedParams):
    kp, vp = (V.as_compute(arrays[n], n) for n in ("k_pages", "v_pages"))
    if kp.ndim != 4:
        raise ShapeError(f"k_pages: expected (num_blocks, block_size, Hkv, D), got {fmt_shape(kp.shape)}")
    bs = _block_size(p, kp.shape[1])
    for n, a in (("k_pages", kp), ("v_pages", vp)):
        if a.ndim != 4 or a.shape[1] != bs:
            raise ShapeError(f"{n}: expected (num_blocks, block_size={bs}, Hkv, D), "
                             f"got {fmt_shape(a.shape)}")
    if kp.shape[:3] != vp.shape[:3]:
        raise ShapeError(f"v_pages: expected {fmt_shape(kp.shape[:3])} + (Dv,) as k_pages, "
                         f"got {fmt_shape(vp.shape)}")
    k = KV.gather_paged(kp, arrays["block_table"], arrays["seq_lens"])
    v = KV.gather_paged(vp, arrays["block_table"], arrays["seq_lens"])
    if p.layout == "bshd":
        k, v = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (k, v))
    return {"q": arrays["q"], "k": k, "v": v}, kp.shape, vp.shape


def _paged_forward(backend, arrays, p: PagedParams):
    return _decode(backend, _paged_inputs(arrays, p)[0], p, arrays["seq_lens"], "seq_lens")


def _paged_backward(backend, arrays, dout, p: PagedParams):
    """Gradients keyed by input: ``q``, and ``k_pages``/``v_pages`` scattered back into page-shaped
    arrays (rows no sequence uses get 0), plus ``bias``/``sinks`` where given."""
    gathered, k_shape, v_shape = _paged_inputs(arrays, p)
    dq, dk, dv, extras = _decode_grads(backend, gathered, dout, p, arrays["seq_lens"], "seq_lens")
    table, lens = KV.validate_block_table(arrays["block_table"], arrays["seq_lens"], k_shape[0], k_shape[1])
    return {"q": to_layout(dq, p), "k_pages": KV.scatter_paged(dk, table, lens, k_shape),
            "v_pages": KV.scatter_paged(dv, table, lens, v_shape), **extras}


def _paged_example(shape, rng, params):
    """Pages for random lengths in ``[Sq, Sk]``, scattered over a shuffled pool with spare pages."""
    b, hq, sq, sk, d, hkv = shape
    bs = _block_size(params)
    if sq > sk:
        raise ShapeError(f"shape: expected Sq <= Sk (the queries are the last Sq tokens of each "
                         f"sequence), got Sq={sq} > Sk={sk}")
    q = core_example(shape, rng, params)["q"]
    lens = rng.integers(sq, sk + 1, size=b)
    lens[0] = sk  # the longest sequence fills the cache
    needed = -(-lens // bs)
    nblocks = int(needed.sum()) + 2
    perm = rng.permutation(nblocks)
    table = np.full((b, int(needed.max()) + 1), -1, dtype=np.int64)  # -1: unused padding
    start = 0
    for i, n in enumerate(needed):
        table[i, :n] = perm[start:start + n]
        start += n
    return {"q": q, "k_pages": rng.standard_normal((nblocks, bs, hkv, d)),
            "v_pages": rng.standard_normal((nblocks, bs, hkv, d)), "block_table": table, "seq_lens": lens}


register(Variant(
    name="paged", family="kvcache",
    doc="Paged KV (vLLM): pages (num_blocks, block_size, Hkv, D), block_table (B, max_blocks), "
    "seq_lens (B,); equals decode over the gathered contiguous cache. Bad tables are errors.",
    citation="Kwon et al., Efficient Memory Management for LLM Serving with PagedAttention, SOSP 2023",
    params=PagedParams, forward=_paged_forward, backward=_paged_backward, backends=_BACKENDS,
    inputs=("q", "k_pages", "v_pages", "block_table", "seq_lens"), example=_paged_example,
    input_shapes={"q": "(B, Hq, Sq, D)", "k_pages": "(num_blocks, block_size, Hkv, D)",
                  "v_pages": "(num_blocks, block_size, Hkv, Dv)", "block_table": "(B, max_blocks) int",
                  "seq_lens": "(B,) int"},
    drop=("alignment", "alibi_form", "cache_seqlens")))


# -- MLA --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLAParams:
    form: str = param_field("absorbed", "'naive' (expand per-head K/V) or 'absorbed' (attend in latent space)")
    scale: Optional[float] = param_field(None, "score scale; default 1/sqrt(d_nope + d_rope), times "
                                               "m(factor, mscale_all_dim)^2 for YaRN with mscale_all_dim")
    causal: Any = param_field(False, "False, True, 'bottom_right' or 'top_left'")
    alignment: str = param_field("bottom_right", "diagonal offset s = Sk-Sq ('bottom_right') or 0")
    mask: Any = param_field(None, "bool array broadcastable to (B, H, Sq, Sk), True = keep (padding)")
    base: Optional[float] = param_field(None, "RoPE base of the decoupled rope part; default 10000 "
                                              "(or the scaling dict's rope_theta)")
    style: str = param_field("neox", "RoPE pairing of the rope part: 'neox' or 'gptj' (DeepSeek: interleaved)")
    # annotated str so the CLI passes --param scaling='{"rope_type": "yarn", ...}' through as text
    scaling: Optional[str] = param_field(None, "HF rope_scaling / rope_parameters dict (or its JSON "
                                               "text) of the rope part: linear, dynamic, yarn, ...")
    max_position_embeddings: Optional[int] = param_field(None, "needed by 'dynamic', 'longrope' and a "
                                                               "yarn dict without a factor")
    q_positions: Any = param_field(None, "(Sq,) query positions; default i + s")
    k_positions: Any = param_field(None, "(Sk,) key positions; default 0 .. Sk-1")
    kv_norm: Any = param_field(None, "(d_c,) weight of the latent RMSNorm (HF kv_a_layernorm); "
                                     "default: no norm")
    q_input: str = param_field("heads", "'heads': q is (B, H, Sq, d_nope + d_rope); 'hidden': q is the "
                                        "queries' hidden states (B, Sq, d_model), projected by w_q or q-LoRA")
    w_q: Any = param_field(None, "(d_model, H, d_nope + d_rope) query projection (q_input='hidden')")
    w_dq: Any = param_field(None, "(d_model, d_q) q-LoRA down-projection (HF q_a_proj; q_input='hidden')")
    q_norm: Any = param_field(None, "(d_q,) weight of the q-LoRA RMSNorm (HF q_a_layernorm); default ones")
    w_uq: Any = param_field(None, "(d_q, H, d_nope + d_rope) q-LoRA up-projection (HF q_b_proj)")
    norm_eps: float = param_field(1e-6, "epsilon of both latent RMSNorms (HF DeepSeek: 1e-6)")
    return_lse: bool = param_field(False, "also return the log-sum-exp (B, Hq, Sq)")


#: parameters of mla that are learnable arrays (their gradients are returned when given)
MLA_LEARNABLE = ("kv_norm", "w_q", "w_dq", "q_norm", "w_uq")


@dataclass
class _MLA:
    """Everything the MLA forward and backward share (one place for the projections)."""

    hidden: np.ndarray
    c_raw: np.ndarray           # hidden @ w_dkv, before the latent norm
    c: np.ndarray               # the latent (normalised when kv_norm is given), (B, Sk, d_c)
    k_nope: np.ndarray          # (B, H, Sk, d_nope)
    v: np.ndarray               # (B, H, Sk, d_v)
    q_heads: np.ndarray         # (B, H, Sq, d_nope + d_rope), before RoPE
    q_parts: dict               # the query projection's intermediates (empty for q_input='heads')
    q_rope: np.ndarray          # rotated rope part of q, (B, H, Sq, d_rope)
    k_rope: np.ndarray          # rotated shared rope key, (B, 1, Sk, d_rope)
    d_nope: int
    scale: float
    pattern: Pattern
    rotate: Any                 # rotate(x, "q" | "k", inverse) with the call's positions and scaling
    eps: float

    def naive_qkv(self):
        b, h, sk = self.k_nope.shape[:3]
        k = np.concatenate([self.k_nope, np.broadcast_to(self.k_rope, (b, h, sk, self.k_rope.shape[3]))], axis=-1)
        q = np.concatenate([self.q_heads[..., :self.d_nope], self.q_rope], axis=-1)
        return q, k, self.v


def _mla_prepare(arrays, p: MLAParams) -> _MLA:
    V.check_choice(p.form, "form", ("naive", "absorbed"))
    V.check_choice(p.q_input, "q_input", ("heads", "hidden"))
    causal, alignment = _causal_alignment(p)
    from ...variants.block import check_eps
    eps = check_eps(p.norm_eps, "norm_eps")
    c, k_nope, v, k_rope = KV.mla_project(arrays["hidden"], arrays["w_dkv"], arrays["w_uk"],
                                          arrays["w_uv"], arrays["w_kr"], kv_norm=p.kv_norm, eps=eps)
    c_raw = V.as_compute(arrays["hidden"], "hidden") @ V.as_compute(arrays["w_dkv"], "w_dkv")
    b, sk, dc = c.shape
    h, d_nope, d_rope = k_nope.shape[1], k_nope.shape[3], k_rope.shape[2]
    projections = [n for n in ("w_q", "w_dq", "q_norm", "w_uq") if getattr(p, n) is not None]
    if p.q_input == "heads" and projections:
        raise ParameterError(f"{projections[0]}: a query projection needs q_input='hidden' (q the queries' "
                             f"hidden states (B, Sq, d_model)), got q_input='heads'")
    if p.q_input == "hidden" and not projections:
        raise ParameterError("q_input: 'hidden' needs a query projection, w_q or q-LoRA (w_dq, w_uq), got none")
    q_heads, q_parts = KV.mla_queries(arrays["q"], num_heads=h, d_qk=d_nope + d_rope, w_q=p.w_q,
                                      w_dq=p.w_dq, q_norm=p.q_norm, w_uq=p.w_uq, eps=eps)
    if q_heads.shape[0] != b:
        raise ShapeError(f"q: expected batch {b} as hidden, got {q_heads.shape[0]}")
    sq = q_heads.shape[2]
    qp, kp = rope_positions(p, sq, sk)
    scaling = parse_scaling(p.scaling)
    seq_len = int(max(np.max(qp, initial=0), np.max(kp, initial=0))) + 1
    kw = dict(base=p.base, style=p.style, scaling=scaling, max_position_embeddings=p.max_position_embeddings,
              seq_len=seq_len)

    def rotate(x, which, inverse=False):
        return _rotate(x, qp if which == "q" else kp, f"{which}_positions", inverse=inverse, **kw)

    q_rope = rotate(q_heads[..., d_nope:], "q")
    k_rope = rotate(k_rope[:, None], "k")  # (B, 1, Sk, d_rope): one for all heads
    if p.scale is None:
        scale = KV.mla_softmax_scale(d_nope + d_rope, scaling, p.max_position_embeddings)
    else:
        scale = V.check_scale(p.scale, d_nope + d_rope)
    dense = None if p.mask is None else V.check_broadcast(p.mask, "mask", (b, h, sq, sk), kind="bool")
    pattern = Pattern(causal=causal, alignment=alignment, dense=dense)
    return _MLA(hidden=V.as_compute(arrays["hidden"], "hidden"), c_raw=c_raw, c=c, k_nope=k_nope, v=v,
                q_heads=q_heads, q_parts=q_parts, q_rope=q_rope, k_rope=k_rope, d_nope=d_nope,
                scale=scale, pattern=pattern, rotate=rotate, eps=eps)


def mla(backend, arrays, p: MLAParams):
    """MLA forward: ``(out (B, H, Sq, d_v), lse)`` in the form ``p.form``."""
    m = _mla_prepare(arrays, p)
    h = m.k_nope.shape[1]
    if p.form == "naive":
        q, k, v = m.naive_qkv()
        return _attend(backend, q, k, v, pattern=m.pattern, scale=m.scale, head_map=np.arange(h))
    w_uk = V.as_compute(arrays["w_uk"], "w_uk")
    w_uv = V.as_compute(arrays["w_uv"], "w_uv")
    q_lat = np.einsum("bhqn,hcn->bhqc", m.q_heads[..., :m.d_nope], w_uk)  # q_nope·(W_UK c) = (W_UK^T q_nope)·c
    qf = np.concatenate([q_lat, m.q_rope], axis=-1)
    kf = np.concatenate([m.c[:, None], m.k_rope], axis=-1)  # (B, 1, Sk, d_c + d_rope): the cache itself
    o_lat, lse = _attend(backend, qf, kf, m.c[:, None], pattern=m.pattern, scale=m.scale,
                         head_map=np.zeros(h, dtype=np.intp))
    return np.einsum("bhqc,hcv->bhqv", o_lat, w_uv), lse


def _mla_backward(backend, arrays, dout, p: MLAParams):
    """Gradients keyed by input name (``q``, ``hidden``, ``w_dkv``, ``w_uk``, ``w_uv``, ``w_kr``) and
    by learnable parameter where given (``kv_norm``, ``w_q``, ``w_dq``, ``q_norm``, ``w_uq``).

    Both forms compute the same function, so one chain rule serves both: ``attend_backward`` on the
    expanded (naive) q, k, v, then back through the RoPE (its transpose), the per-head
    up-projections, the latent RMSNorm and the down-projections; the rope key's gradient is summed
    over the heads that share it.
    """
    from ...variants.block import rms_norm_backward

    m = _mla_prepare(arrays, p)
    b, h, sk, _ = m.k_nope.shape
    q, k, v = m.naive_qkv()
    out, lse = _attend(backend, q, k, v, pattern=m.pattern, scale=m.scale, head_map=np.arange(h))
    dout = V.as_compute(dout, "dout")
    if dout.shape != out.shape:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(out.shape)}, got {fmt_shape(dout.shape)}")
    g = backend.attend_backward(*(backend.asarray(a) for a in (q, k, v, out, lse, dout)),
                                pattern=m.pattern, scale=m.scale, head_map=np.arange(h))
    dq, dk, dv = (np.asarray(backend.to_numpy(x), dtype=np.float64) for x in g[:3])
    dn = m.d_nope
    dq_heads = np.concatenate([dq[..., :dn], m.rotate(dq[..., dn:], "q", True)], axis=-1)
    dk_nope = dk[..., :dn]
    dk_rope = m.rotate(dk[..., dn:].sum(axis=1, keepdims=True), "k", True)[:, 0]  # (B, Sk, d_rope)
    w_uk, w_uv, w_dkv, w_kr = (V.as_compute(arrays[n], n) for n in ("w_uk", "w_uv", "w_dkv", "w_kr"))
    grads = {"w_uk": np.einsum("bsc,bhsn->hcn", m.c, dk_nope),
             "w_uv": np.einsum("bsc,bhsv->hcv", m.c, dv)}
    dc = np.einsum("bhsn,hcn->bsc", dk_nope, w_uk) + np.einsum("bhsv,hcv->bsc", dv, w_uv)
    if p.kv_norm is not None:
        dc, grads["kv_norm"] = rms_norm_backward(m.c_raw, V.as_compute(p.kv_norm, "kv_norm"), dc, eps=m.eps)
    grads["w_dkv"] = np.einsum("bsd,bsc->dc", m.hidden, dc)
    grads["w_kr"] = np.einsum("bsd,bsr->dr", m.hidden, dk_rope)
    grads["hidden"] = dc @ w_dkv.T + dk_rope @ w_kr.T
    qp = m.q_parts
    if not qp:
        grads["q"] = dq_heads
    elif "w_q" in qp:
        grads["w_q"] = np.einsum("bsd,bhse->dhe", qp["q_in"], dq_heads)
        grads["q"] = np.einsum("bhse,dhe->bsd", dq_heads, qp["w_q"])
    else:
        grads["w_uq"] = np.einsum("bsr,bhse->rhe", qp["q_n"], dq_heads)
        d_n = np.einsum("bhse,rhe->bsr", dq_heads, qp["w_uq"])
        d_a, d_norm = rms_norm_backward(qp["q_a"], qp["q_norm"], d_n, eps=m.eps)
        if p.q_norm is not None:
            grads["q_norm"] = d_norm
        grads["w_dq"] = np.einsum("bsd,bsr->dr", qp["q_in"], d_a)
        grads["q"] = d_a @ qp["w_dq"].T
    order = ("q", "hidden", "w_dkv", "w_uk", "w_uv", "w_kr") + MLA_LEARNABLE
    return {n: grads[n] for n in order if n in grads}


def mla_example_dims(d):
    """``(d_nope, d_rope, d_c, d_model)`` the example makes for head dim ``D = d_nope + d_rope``
    (golden makers of the query and norm weights use the same)."""
    d_rope = 2 * max(1, d // 8)
    return max(1, d - d_rope), d_rope, max(4, d // 2), 2 * d


def _mla_example(shape, rng, params):
    """Weights scaled by 1/sqrt(fan_in); ``D = d_nope + d_rope`` with ``d_rope = 2 * max(1, D // 8)``.
    With ``q_input='hidden'`` q is the queries' hidden states ``(B, Sq, d_model)`` (the query
    projection itself is a parameter: give ``w_q`` or the q-LoRA weights)."""
    b, hq, sq, sk, d, hkv = shape
    d_nope, d_rope, d_c, d_model = mla_example_dims(d)
    q_shape = (b, sq, d_model) if getattr(params, "q_input", "heads") == "hidden" else (b, hq, sq, d_nope + d_rope)
    return {"q": rng.standard_normal(q_shape),
            "hidden": rng.standard_normal((b, sk, d_model)),
            "w_dkv": rng.standard_normal((d_model, d_c)) / np.sqrt(d_model),
            "w_uk": rng.standard_normal((hq, d_c, d_nope)) / np.sqrt(d_c),
            "w_uv": rng.standard_normal((hq, d_c, d)) / np.sqrt(d_c),
            "w_kr": rng.standard_normal((d_model, d_rope)) / np.sqrt(d_model)}


register(Variant(
    name="mla", family="kvcache",
    doc="Multi-head Latent Attention as DeepSeek-V2/V3 compute it: latent c = RMSNorm(h W_DKV) "
    "(kv_norm), per-head K/V up-projected, a decoupled RoPE key shared by all heads (any HF scaling, "
    "YaRN mscale in the softmax scale, neox or interleaved pairs), q per head or from hidden states "
    "(w_q or q-LoRA with its RMSNorm), causal and padding masks; naive and absorbed forms agree; "
    "backward for every input and weight. refattn.kvcache.mla_cache_bytes gives each form's cache size.",
    citation="DeepSeek-AI, DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts "
    "Language Model, 2024; DeepSeek-AI, DeepSeek-V3 Technical Report, 2024", params=MLAParams,
    forward=mla, backward=_mla_backward, backends=_BACKENDS,
    inputs=("q", "hidden", "w_dkv", "w_uk", "w_uv", "w_kr"), example=_mla_example,
    input_shapes={"q": "(B, H, Sq, d_nope + d_rope), or (B, Sq, d_model) with q_input='hidden'",
                  "hidden": "(B, Sk, d_model)", "w_dkv": "(d_model, d_c)", "w_uk": "(H, d_c, d_nope)",
                  "w_uv": "(H, d_c, d_v)", "w_kr": "(d_model, d_rope)"}))


# -- cascade ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CascadeParams:
    causal: bool = param_field(True, "suffix keys bottom-right causal (the prefix is always fully visible)")
    scale: Optional[float] = param_field(None, "score scale; default 1/sqrt(D)")
    head_map: Any = param_field(None, "(Hq,) KV head of each query head; default h // (Hq // Hkv)")
    return_lse: bool = param_field(False, "also return the log-sum-exp (B, Hq, Sq)")


def _cascade_parts(arrays, p: CascadeParams):
    """Validated ``(q, parts, scale, head_map)``; ``parts`` = [(k, v, pattern)] for prefix and suffix."""
    causal = V.check_bool(p.causal, "causal")
    q, k, v = _qkv(arrays)
    pk, pv = V.as_compute(arrays["prefix_k"], "prefix_k"), V.as_compute(arrays["prefix_v"], "prefix_v")
    b, hq, sq, d = q.shape
    hkv, ss = k.shape[1], k.shape[2]
    if pk.ndim != 3 or pk.shape[0] != hkv or pk.shape[2] != d:
        raise ShapeError(f"prefix_k: expected ({hkv}, Sp, {d}) = (Hkv, Sp, D), got {fmt_shape(pk.shape)}")
    if pv.shape != pk.shape[:2] + (v.shape[3],):
        raise ShapeError(f"prefix_v: expected {fmt_shape(pk.shape[:2] + (v.shape[3],))}, got {fmt_shape(pv.shape)}")
    if causal and sq > ss:
        raise ShapeError(f"q: the {sq} queries are the last tokens of the {ss}-token suffix, so Sq <= Sk "
                         f"is needed with causal=True")
    shared = (np.broadcast_to(pk, (b,) + pk.shape), np.broadcast_to(pv, (b,) + pv.shape))
    parts = [(*shared, Pattern()), (k, v, Pattern(causal=causal))]
    return q, parts, V.check_scale(p.scale, d), V.head_map_for(hq, hkv, p.head_map)


def _cascade_forward(backend, arrays, p: CascadeParams):
    q, parts, scale, hm = _cascade_parts(arrays, p)
    states = [_attend(backend, q, k, v, pattern=pat, scale=scale, head_map=hm) for k, v, pat in parts]
    out, lse = KV.merge_states(*states, backend=backend)
    return backend.to_numpy(out), backend.to_numpy(lse)


def _cascade_backward(backend, arrays, dout, p: CascadeParams):
    """Each part's gradients from ``attend_backward`` with the merged ``out``/``lse``; the shared
    prefix's gradients (``extras["prefix_k"]``, ``["prefix_v"]``) are summed over the batch."""
    q, parts, scale, hm = _cascade_parts(arrays, p)
    out, lse = _cascade_forward(backend, arrays, p)
    dout = V.as_compute(dout, "dout")
    if dout.shape != out.shape:
        raise ShapeError(f"dout: expected the output's shape {fmt_shape(out.shape)}, got {fmt_shape(dout.shape)}")
    grads = []
    for k, v, pat in parts:
        g = backend.attend_backward(*(backend.asarray(a) for a in (q, k, v, out, lse, dout)), pattern=pat,
                                    scale=scale, head_map=hm)
        grads.append([backend.to_numpy(x) for x in g[:3]])
    (dq_p, dpk, dpv), (dq_s, dk, dv) = grads
    return dq_p + dq_s, dk, dv, {"prefix_k": dpk.sum(axis=0), "prefix_v": dpv.sum(axis=0)}


def _cascade_example(shape, rng, params):
    b, hq, sq, sk, d, hkv = shape
    out = core_example(shape, rng, params)
    sp = max(1, sk // 2 + 1)
    out["prefix_k"] = rng.standard_normal((hkv, sp, d))
    out["prefix_v"] = rng.standard_normal((hkv, sp, d))
    return out


register(Variant(
    name="cascade", family="kvcache",
    doc="Cascade attention: a shared prefix attended once, per-request suffixes attended separately, "
    "merged with merge_states; equals attention over [prefix; suffix].",
    citation="Ye et al., FlashInfer (cascade inference), 2024; Juravsky et al., Hydragen, 2024",
    params=CascadeParams, forward=_cascade_forward, backward=_cascade_backward, backends=_BACKENDS,
    inputs=("q", "k", "v", "prefix_k", "prefix_v"), example=_cascade_example,
    input_shapes={"prefix_k": "(Hkv, Sp, D)", "prefix_v": "(Hkv, Sp, Dv)"}))


# -- ring ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RingParams:
    num_devices: int = param_field(4, "P simulated devices in the ring")
    sharding: str = param_field("zigzag", "'zigzag' (2P chunks, device r holds r and 2P-1-r) or 'contiguous'")
    causal: Any = param_field(False, "False, True, 'bottom_right' or 'top_left'")
    alignment: str = param_field("bottom_right", "diagonal offset s = Sk-Sq ('bottom_right') or 0")
    scale: Optional[float] = param_field(None, "score scale; default 1/sqrt(D)")
    head_map: Any = param_field(None, "(Hq,) KV head of each query head; default h // (Hq // Hkv)")
    return_lse: bool = param_field(False, "also return the log-sum-exp (B, Hq, Sq)")


def _ring_args(arrays, p: RingParams):
    q, k, v = _qkv(arrays)
    causal, alignment = _causal_alignment(p)
    return (q, k, v), dict(num_devices=p.num_devices, causal=causal, alignment=alignment,
                           sharding=p.sharding, scale=p.scale, head_map=p.head_map)


def _ring_forward(backend, arrays, p: RingParams):
    qkv, kw = _ring_args(arrays, p)
    out, lse, _ = KV.ring_attention(*qkv, backend=backend, **kw)
    return out, lse


def _ring_backward(backend, arrays, dout, p: RingParams):
    qkv, kw = _ring_args(arrays, p)
    dq, dk, dv, _ = KV.ring_attention_backward(*qkv, dout, backend=backend, **kw)
    return dq, dk, dv, {}


register(Variant(
    name="ring", family="kvcache",
    doc="Ring attention on P simulated devices: query shards stay, KV shards rotate P steps, partial "
    "results merged with merge_states; causal with zig-zag sharding; equals full attention. "
    "refattn.kvcache.ring_attention also returns the per-step schedule and bytes moved.",
    citation="Liu et al., Ring Attention with Blockwise Transformers for Near-Infinite Context, 2023",
    params=RingParams, forward=_ring_forward, backward=_ring_backward, backends=_BACKENDS,
    example=core_example))


# -- expected attention --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpectedParams:
    ratio: float = param_field(0.5, "fraction of keys dropped per KV head; max(1, int(Sk * (1 - ratio))) kept")
    use_covariance: bool = param_field(True, "include the kᵀ cov k / (2D) term (False: mean only)")
    future_positions: int = param_field(0, "n > 0: mu, cov are pre-RoPE; average RoPE over positions Sk .. Sk+n-1")
    base: Optional[float] = param_field(None, "RoPE base for the averaging; default 10000")
    n_sink: int = param_field(0, "first keys always kept (kvpress: 4)")
    use_vnorm: bool = param_field(False, "multiply key scores by ||v_j|| (kvpress's default)")
    epsilon: float = param_field(0.0, "added to scores before the ||v|| rescaling")
    causal: Any = param_field(False, "False, True, 'bottom_right' or 'top_left' on the kept keys")
    alignment: str = param_field("bottom_right", "diagonal offset s = Sk-Sq ('bottom_right') or 0")
    scale: Optional[float] = param_field(None, "score scale; default 1/sqrt(D) (also in the expectation)")
    return_lse: bool = param_field(False, "also return the log-sum-exp (B, Hq, Sq)")


def _expected_forward(backend, arrays, p: ExpectedParams):
    q, k, v = _qkv(arrays)
    causal, alignment = _causal_alignment(p)
    b, hq, _, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    hm = V.head_map_for(hq, hkv)
    mu, cov = V.as_compute(arrays["mu"], "mu"), V.as_compute(arrays["cov"], "cov")
    if mu.shape != (b, hq, d):
        raise ShapeError(f"mu: expected ({b}, {hq}, {d}) = (B, Hq, D), got {fmt_shape(mu.shape)}")
    if cov.shape != (b, hq, d, d):
        raise ShapeError(f"cov: expected ({b}, {hq}, {d}, {d}) = (B, Hq, D, D), got {fmt_shape(cov.shape)}")
    n_future = KV._int(p.future_positions, "future_positions")
    if n_future:
        rot = KV.rope_average_rotation(d, np.arange(sk, sk + n_future), base=p.base)
        mu, cov = mu @ rot.T, rot @ cov @ rot.T
    log_e = KV.expected_attention_scores(k, mu, cov if V.check_bool(p.use_covariance, "use_covariance") else None,
                                         scale=p.scale)
    scores = KV.expected_attention_key_scores(log_e, hkv, v=v if V.check_bool(p.use_vnorm, "use_vnorm") else None,
                                              n_sink=p.n_sink, epsilon=p.epsilon)
    keep = KV.expected_attention_keep(scores, p.ratio)[:, hm, None, :]  # (B, Hq, 1, Sk)
    pattern = Pattern(causal=causal, alignment=alignment, dense=keep)
    return _attend(backend, q, k, v, pattern=pattern, scale=V.check_scale(p.scale, d), head_map=hm)


def _expected_example(shape, rng, params):
    b, hq, sq, sk, d, hkv = shape
    out = core_example(shape, rng, params)
    a = rng.standard_normal((b, hq, d, d)) / np.sqrt(d)
    out["mu"] = rng.standard_normal((b, hq, d))
    out["cov"] = a @ np.swapaxes(a, -1, -2)
    return out


register(Variant(
    name="expected_attention", family="kvcache",
    doc="KV pruning by expected attention (kvpress): keys scored by log E[exp(scale q·k)] = scale mu·k "
    "+ scale^2 kᵀcov k / 2 for q ~ N(mu, cov) per query head (optionally RoPE-averaged), softmax, "
    "group mean, optional ||v|| and sinks; the lowest `ratio` dropped, then sdpa.",
    citation="Devoto et al., Expected Attention: KV-cache Compression by Estimating Attention from "
    "Future Queries Distribution, 2025", params=ExpectedParams, forward=_expected_forward,
    backends=_BACKENDS, inputs=("q", "k", "v", "mu", "cov"), example=_expected_example,
    input_shapes={"mu": "(B, Hq, D)", "cov": "(B, Hq, D, D)"}))

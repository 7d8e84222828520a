"""Adapters: a refattn case expressed in the calling conventions of common attention APIs.

A *case* is ``q, k, v`` plus refattn parameters (``causal``, ``window``, ``scale``, ...; see
:mod:`refattn.variants.core`). :func:`signature_call` turns it into the positional and keyword
arguments of one of these signatures, and back:

``"refattn"``
    ``fn(q, k, v, **params)`` exactly like :func:`refattn.attention` (the case's layout; packed
    batches get ``cu_seqlens_q``/``cu_seqlens_k`` as keywords). Returns ``out`` or ``(out, lse)``.
``"sdpa"``
    PyTorch's ``scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
    is_causal=False, scale=None, enable_gqa=False)``, layout ``(B, H, S, D)``. A plain causal
    pattern with top-left alignment (or ``Sq == Sk``) becomes ``is_causal=True``; any other
    visibility becomes a boolean ``attn_mask`` (True = attend) built from refattn's own
    :class:`~refattn.patterns.Pattern`; ALiBi and ``bias`` become a float ``attn_mask`` holding
    the additive bias and ``-inf`` on hidden pairs, **in the tested dtype** (the rounding of the
    bias is then part of what is measured). ``head_map`` is expanded by repeating K/V heads;
    ``Hq != Hkv`` passes ``enable_gqa=True``. Not expressible: softcap, sinks, dropout.
``"flex"``
    PyTorch's ``flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
    enable_gqa=False, return_lse=False)``, layout ``(B, H, S, D)``, framework ``"torch"`` only.
    Visibility (causal, window, mask) becomes a ``mask_mod`` reading refattn's own
    ``Pattern.mask`` and a ``block_mask`` from ``create_block_mask``; softcap, ALiBi and ``bias``
    become a ``score_mod`` (softcap on the score, then refattn's additive bias tensor, ``-inf`` where
    hidden). Not expressible: sinks, dropout.
``"flash"``
    flash-attn's ``flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None)``, layout ``(B, S, H, D)``; causal and
    windows are bottom-right aligned there (top-left with ``Sq != Sk`` is not expressible);
    ``alibi_slopes`` are passed as float32. Not expressible: mask, bias, sinks, head_map, dropout.
    With ``want_lse`` it also passes ``return_attn_probs=True`` and reads ``(out, lse, ...)``.
``"varlen"``
    flash-attn's ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None)`` with packed ``(total, H, D)`` tensors and int32 offsets. A
    dense case is packed as ``B`` sequences of equal length; its output is unpacked again.

Packed (variable-length) batches
--------------------------------
:func:`varlen_attention` backs ``refattn.attention(..., cu_seqlens_q=, cu_seqlens_k=)``: q is
``(total_q, Hq, D)``, k/v ``(total_k, Hkv, D|Dv)``; sequence ``i`` owns rows
``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q and ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k and v,
exactly as flash-attn's varlen API. Each sequence is attended on its own (alignment, causal and
window relative to that sequence's own lengths); outputs are packed back to ``(total_q, Hq, Dv)``
and the LSE is ``(Hq, total_q)`` (flash-attn's varlen layout). A sequence with no keys gives
output 0 (NaN with ``empty_row="nan"``) and LSE ``-inf``. ``mask``, ``bias``, ``dropout_mask``,
dropout and ``layout`` are errors with packed batches: their ``(B, H, Sq, Sk)`` shape or the
Philox batch index has no meaning there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import ParameterError, ShapeError, fmt_shape

ADAPTERS = ("refattn", "sdpa", "flex", "flash", "varlen")
_VARLEN_FORBIDDEN = ("mask", "bias", "dropout_mask", "layout", "dropout_seed")


# -- packed batches ------------------------------------------------------------------------------------
def check_cu_seqlens(cu, name: str, total: int) -> np.ndarray:
    """Validated offsets: 1-d integers, ``cu[0] == 0``, non-decreasing, ``cu[-1] == total``."""
    from .validate import to_numpy
    if cu is None:
        raise ParameterError(f"{name}: expected offsets (B + 1,) together with the other "
                             f"cu_seqlens, got None")
    a = np.asarray(to_numpy(cu, name))
    if a.dtype.kind not in "iu":
        raise ParameterError(f"{name}: expected an integer array of offsets, got dtype {a.dtype}")
    if a.ndim != 1 or a.size < 2:
        raise ShapeError(f"{name}: expected shape (B + 1,) with B >= 1, got {fmt_shape(a.shape)}")
    if a[0] != 0:
        raise ParameterError(f"{name}: expected the first offset 0, got {int(a[0])}")
    if np.any(np.diff(a) < 0):
        at = int(np.argmax(np.diff(a) < 0))
        raise ParameterError(f"{name}: expected non-decreasing offsets, got {int(a[at])} then "
                             f"{int(a[at + 1])} at position {at}")
    if a[-1] != total:
        raise ParameterError(f"{name}: expected the last offset to equal the packed length "
                             f"{total}, got {int(a[-1])}")
    return a.astype(np.int64)


def _check_packed(a, name):
    if np.ndim(a) != 3:
        raise ShapeError(f"{name}: expected rank 3 (total, H, D) with cu_seqlens, got shape "
                         f"{fmt_shape(np.shape(a))}")


def varlen_apply(one: Callable, q, k, v, cu_seqlens_q, cu_seqlens_k, *, dout=None,
                 params: Optional[dict] = None) -> dict:
    """Split packed ``q, k, v`` (and ``dout``) per sequence, call
    ``one(q_i, k_i, v_i, dout_i, {"layout": "bshd"}) -> dict`` on ``(1, S_i, H, D)`` views, and pack
    the results: ``out``/``dq`` ``(total_q, ...)``, ``dk``/``dv`` ``(total_k, ...)``, ``lse``
    ``(Hq, total_q)``. Sequences with no query or no key are filled per the empty-row convention.
    """
    from .validate import to_numpy
    params = params or {}
    bad = [n for n in _VARLEN_FORBIDDEN if params.get(n) is not None]
    if params.get("dropout_p", 0):
        bad.insert(0, "dropout_p")
    if bad:
        raise ParameterError(f"{bad[0]}: not supported with cu_seqlens (packed batches have no "
                             f"(B, H, Sq, Sk) layout or batch index); got {bad[0]}={params[bad[0]]!r}")
    q, k, v = (to_numpy(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    for a, n in ((q, "q"), (k, "k"), (v, "v")):
        _check_packed(a, n)
    cq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    ck = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if cq.size != ck.size:
        raise ShapeError(f"cu_seqlens_k: expected {cq.size} offsets as in cu_seqlens_q "
                         f"({cq.size - 1} sequences), got {ck.size}")
    if v.shape[0] != k.shape[0]:
        raise ShapeError(f"v: expected packed length {k.shape[0]} as in k, got {v.shape[0]}")
    if dout is not None:
        dout = to_numpy(dout, "dout")
        want = q.shape[:2] + v.shape[2:]
        if dout.shape != want:
            raise ShapeError(f"dout: expected the output's shape {fmt_shape(want)}, got "
                             f"{fmt_shape(dout.shape)}")
    hq, dv = q.shape[1], v.shape[2]
    empty_value = np.nan if params.get("empty_row") == "nan" else 0.0
    parts = {n: [] for n in ("out", "lse", "dq", "dk", "dv")}
    returned = set()
    for i in range(cq.size - 1):
        rq, rk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        sq, sk = rq.stop - rq.start, rk.stop - rk.start
        if sq == 0 or sk == 0:  # nothing to attend: empty rows / keys nobody reads
            res = {"out": np.full((sq, hq, dv), empty_value if sk == 0 else 0.0),
                   "lse": np.full((hq, sq), -np.inf), "dq": np.zeros((sq,) + q.shape[1:]),
                   "dk": np.zeros((sk,) + k.shape[1:]), "dv": np.zeros((sk,) + v.shape[1:])}
        else:
            d_i = None if dout is None else dout[rq][None]
            res = {n: a[0] for n, a in one(q[rq][None], k[rk][None], v[rk][None], d_i,
                                           {"layout": "bshd"}).items()}
            returned |= set(res)
        for n, a in res.items():
            parts[n].append(a)
    if not returned:  # every sequence was empty
        returned = {"out", "lse"} if dout is None else {"dq", "dk", "dv"}
    return {n: np.concatenate(parts[n], axis=-1 if n == "lse" else 0) for n in sorted(returned)}


def varlen_attention(arrays: dict, cu_seqlens_q, cu_seqlens_k, *, variant="sdpa", backend="numpy",
                     dout=None, **params):
    """:func:`refattn.attention` (or with ``dout``, :func:`refattn.attention_backward`) on a packed
    batch: ``arrays`` holds packed ``q, k, v``; see the module docstring. Returns what those return,
    packed. Each sequence runs through the one pipeline (:func:`refattn.pipeline.run`)."""
    from . import pipeline

    var = pipeline.variant_of(variant)
    if not var.on_qkv or len(var.inputs) != 3:
        raise ParameterError(f"cu_seqlens_q: packed batches need a variant on q, k, v only; "
                             f"{var.name!r} takes {', '.join(var.inputs)}")
    if "lse" not in var.outputs:  # the linear family: a state per sequence, not packed here yet
        raise ParameterError(f"cu_seqlens_q: packed batches need an attention variant (with an "
                             f"LSE); {var.name!r} has no LSE: call it once per sequence")
    return_lse = params.pop("return_lse", False) is True
    params = {n: val for n, val in params.items() if not n.startswith("return_")}

    def one(q_i, k_i, v_i, d_i, extra):
        res = pipeline.run(var, backend, {"q": q_i, "k": k_i, "v": v_i}, {**params, **extra},
                           dout=d_i, forward=d_i is None)
        if d_i is not None:
            return {"dq": res.grads["q"], "dk": res.grads["k"], "dv": res.grads["v"]}
        return {"out": res.outputs["out"], "lse": res.outputs["lse"]}

    res = varlen_apply(one, arrays["q"], arrays["k"], arrays["v"], cu_seqlens_q, cu_seqlens_k,
                       dout=dout, params=params)
    if dout is not None:
        return res["dq"], res["dk"], res["dv"], {}
    return (res["out"], res["lse"]) if return_lse else res["out"]


# -- signatures ---------------------------------------------------------------------------------------
def _identity(a):
    return a


@dataclass
class Data:
    """An array the caller converts to the tested dtype (q, k, v, a float attn_mask)."""

    array: np.ndarray


@dataclass
class SignatureCall:
    """Arguments for the user's function and how to read its result back.

    ``args``/``kwargs`` hold numpy arrays; :class:`Data` wraps those to be given in the tested
    dtype (everything else keeps its dtype: bool masks, int32 offsets, float32 slopes).
    ``unpack(result_as_numpy) -> {"out": ..., "lse": ...}`` in the case's own layout;
    ``to_case``/``from_case`` move an output- or input-shaped array (out, dout, dq, dk, dv) between
    the signature's layout and the case's.
    """

    args: list
    kwargs: dict
    unpack: Callable
    to_case: Callable = _identity
    from_case: Callable = _identity
    grads: bool = True


def _core_params(params: dict, adapter: str):
    from .variants.core import CoreParams
    known = set(CoreParams.__dataclass_fields__)
    extra = sorted(set(params) - known - {"cu_seqlens_q", "cu_seqlens_k"})
    if extra:
        raise ParameterError(f"{extra[0]}: not expressible in the {adapter!r} signature (it knows "
                             f"only the core knobs); use adapter='refattn'")
    return CoreParams(**{n: val for n, val in params.items() if n in known})


def _refuse(p, adapter, names):
    for n in names:
        val = getattr(p, n)
        if val is not None and val is not False and not (n == "dropout_p" and val == 0):
            raise ParameterError(f"{n}: not expressible in the {adapter!r} signature, got "
                                 f"{n}={'an array' if hasattr(val, 'shape') else repr(val)}; "
                                 f"use adapter='refattn'")


def _bhsd(a, layout):
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)) if layout == "bshd" else a


def _unpacker(to_case, want_lse, lse_to_case=_identity):
    """``unpack`` for functions returning ``out`` or ``(out, lse, ...)``."""
    def unpack(res):
        out, lse = (res[0], res[1]) if isinstance(res, (tuple, list)) else (res, None)
        got = {"out": to_case(out)}
        if want_lse and lse is not None:
            got["lse"] = lse_to_case(lse)
        return got
    return unpack


@dataclass
class FlexMods:
    """What the ``flex`` adapter needs, torch-free: the keep-mask ``(Bm, Hm, Sq, Sk)``, the additive
    score tensor (or None) and the softcap. :mod:`refattn.impl` turns it into ``score_mod`` and
    ``block_mask``."""

    keep: np.ndarray
    additive: Optional[np.ndarray]
    softcap: Optional[float]
    #: the ``flex`` variant: the user's own mask_mod / score_mod (callables), passed on as they are,
    #: and ``(B, H)`` for ``create_block_mask``
    mask_mod: Optional[object] = None
    score_mod: Optional[object] = None
    batch_heads: Optional[tuple] = None


def _torch_style(arrays, params, adapter, refused):
    """A core case prepared by refattn itself for the ``(B, H, S, D)`` PyTorch signatures:
    ``(p, pre, args, kwargs, keep, additive, to_case)``. ``keep`` is the Pattern's own mask;
    ``additive`` the bias and ALiBi terms (``-inf`` where hidden), evaluated by the numpy backend's
    ``scores`` on zero queries, or None when there are none."""
    from . import backends
    from .backends.base import ScoreMod
    from .variants.core import prepare

    p = _core_params(params, adapter)
    _refuse(p, adapter, refused)
    be = backends.get("numpy")
    pre = prepare(be, arrays, p)
    q, k, v = pre.q, pre.k, pre.v
    sq, sk = q.shape[2], k.shape[2]
    kw = {"scale": pre.scale}
    if p.head_map is not None:  # any grouping, by repeating K/V heads
        k, v = k[:, pre.head_map], v[:, pre.head_map]
    if q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    keep = np.ascontiguousarray(pre.pattern.mask(sq, sk))
    mod, additive = pre.score_mod, None
    if mod is not None and (mod.alibi_slopes is not None or mod.bias is not None):
        additive, _ = be.scores(np.zeros(q.shape[:3] + (k.shape[3],)), pre.k[:, pre.head_map],
                                slice(None), sq, sk, pattern=pre.pattern, scale=1.0,
                                score_mod=ScoreMod(alibi_slopes=mod.alibi_slopes,
                                                   alibi_form=mod.alibi_form, bias=mod.bias))

    def to_case(a):
        return _bhsd(a, p.layout)
    return p, pre, [Data(q), Data(k), Data(v)], kw, keep, additive, to_case


def _sdpa_call(arrays, params):
    p, pre, args, kw, keep, additive, to_case = _torch_style(
        arrays, params, "sdpa", ("softcap", "sinks", "dropout_p", "dropout_mask"))
    pat = pre.pattern
    plain_causal = (pat.causal and pat.dense is None and pat.window in (None, (-1, -1))
                    and pat.band(pre.q.shape[2], pre.k.shape[2])[0] == 0)
    if additive is not None:  # float mask: bias + ALiBi, -inf where hidden
        kw["attn_mask"] = Data(additive)
    elif plain_causal:
        kw["is_causal"] = True
    elif pat.has_band or pat.dense is not None:
        kw["attn_mask"] = keep
    return SignatureCall(args, kw, _unpacker(to_case, False), to_case, to_case,
                         grads=p.head_map is None)


def _flex_call(arrays, params, want_lse):
    params = dict(params)
    own = {n: params.pop(n) for n in ("mask_mod", "score_mod", "block_size") if n in params}
    p, pre, args, kw, keep, additive, to_case = _torch_style(
        arrays, params, "flex", ("sinks", "dropout_p", "dropout_mask"))
    kw["score_mod"] = FlexMods(keep, additive, p.softcap and pre.score_mod.softcap)
    if own.get("mask_mod") is not None or own.get("score_mod") is not None:  # the flex variant
        from .flex import resolve
        kw["score_mod"] = FlexMods(keep, None, None, mask_mod=resolve(own.get("mask_mod"), "mask_mod"),
                                   score_mod=resolve(own.get("score_mod"), "score_mod"),
                                   batch_heads=tuple(pre.q.shape[:2]))
    if want_lse:
        kw["return_lse"] = True
    return SignatureCall(args, kw, _unpacker(to_case, want_lse), to_case, to_case,
                         grads=p.head_map is None)


def _flash_kwargs(p, adapter, lens):
    """flash-attn keywords for the core params ``p``; ``lens`` = [(sq, sk)] per sequence."""
    _refuse(p, adapter, ("mask", "bias", "sinks", "head_map", "dropout_p", "dropout_mask"))
    aligned = p.causal if isinstance(p.causal, str) else p.alignment
    if aligned == "top_left" and (p.causal or p.window is not None) and any(a != b for a, b in lens):
        raise ParameterError(f"alignment: flash-attn aligns causal masks and windows bottom-right; "
                             f"top-left with Sq != Sk is not expressible in the {adapter!r} signature")
    kw = {"softmax_scale": p.scale, "causal": bool(p.causal)}
    if p.window is not None:
        kw["window_size"] = tuple(int(w) for w in p.window)
    if p.softcap is not None:
        kw["softcap"] = float(p.softcap)
    if p.alibi_slopes is not None:
        from .validate import as_compute
        kw["alibi_slopes"] = as_compute(p.alibi_slopes, "alibi_slopes", "float32")
    return kw


def _flash_call(arrays, params, want_lse):
    p = _core_params(params, "flash")
    from .validate import as_compute, check_qkv
    q, k, v = (_bhsd(as_compute(arrays[n], n), p.layout) for n in ("q", "k", "v"))
    check_qkv(q, k, v, "bhsd")
    kw = _flash_kwargs(p, "flash", [(q.shape[2], k.shape[2])])
    if want_lse:
        kw["return_attn_probs"] = True
    q, k, v = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))

    def to_case(a):  # (B, S, H, D) <-> the case's layout
        return a if p.layout == "bshd" else np.ascontiguousarray(a.transpose(0, 2, 1, 3))
    return SignatureCall([Data(q), Data(k), Data(v)], kw, _unpacker(to_case, want_lse), to_case,
                         to_case)


def _varlen_call(arrays, params, want_lse):
    from .validate import as_compute
    params = dict(params)
    cq, ck = params.pop("cu_seqlens_q", None), params.pop("cu_seqlens_k", None)
    p = _core_params(params, "varlen")
    q, k, v = (as_compute(arrays[n], n) for n in ("q", "k", "v"))
    packed_from = None
    if cq is None and ck is None:  # a dense case: B sequences of equal length
        q, k, v = (_bhsd(a, p.layout).transpose(0, 2, 1, 3) for a in (q, k, v))
        packed_from = q.shape
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        cq, ck = np.arange(b + 1) * sq, np.arange(b + 1) * sk
        q, k, v = (a.reshape((-1,) + a.shape[2:]) for a in (q, k, v))
    elif p.layout != "bhsd":
        raise ParameterError("layout: not supported with cu_seqlens (packed is (total, H, D))")
    for a, n in ((q, "q"), (k, "k"), (v, "v")):
        _check_packed(a, n)
    cq = check_cu_seqlens(cq, "cu_seqlens_q", q.shape[0]).astype(np.int32)
    ck = check_cu_seqlens(ck, "cu_seqlens_k", k.shape[0]).astype(np.int32)
    lens = list(zip(np.diff(cq), np.diff(ck)))
    kw = _flash_kwargs(p, "varlen", lens)
    if want_lse:
        kw["return_attn_probs"] = True
    args = [Data(np.ascontiguousarray(q)), Data(np.ascontiguousarray(k)),
            Data(np.ascontiguousarray(v)), cq, ck, int(np.diff(cq).max()), int(np.diff(ck).max())]

    def to_case(a):  # packed (total, H, D) -> the dense case's layout
        if packed_from is None:
            return a
        a = a.reshape((packed_from[0], -1) + a.shape[1:])
        return a if p.layout == "bshd" else np.ascontiguousarray(a.transpose(0, 2, 1, 3))

    def from_case(a):
        if packed_from is None:
            return a
        a = a if p.layout == "bshd" else a.transpose(0, 2, 1, 3)
        return np.ascontiguousarray(a.reshape((-1,) + a.shape[2:]))

    def lse_to_case(lse):  # (Hq, B*Sq) -> (B, Hq, Sq) for a dense case
        if packed_from is None:
            return lse
        b, sq, hq = packed_from[:3]
        return np.ascontiguousarray(lse.reshape(hq, b, sq).transpose(1, 0, 2))
    return SignatureCall(args, kw, _unpacker(to_case, want_lse, lse_to_case), to_case, from_case)


def _refattn_call(arrays, params, want_lse):
    kw = dict(params)
    if want_lse:
        kw["return_lse"] = True

    def unpack(res):
        if isinstance(res, (tuple, list)):
            return {"out": res[0], "lse": res[1]} if len(res) > 1 else {"out": res[0]}
        return {"out": res}
    return SignatureCall([Data(arrays["q"]), Data(arrays["k"]), Data(arrays["v"])], kw, unpack)


def signature_call(adapter: str, arrays: dict, params: dict, *, want_lse: bool = False) -> SignatureCall:
    """The call of ``adapter``'s signature for a case (module docstring)."""
    from .validate import check_choice
    check_choice(adapter, "adapter", ADAPTERS)
    if adapter == "refattn":
        return _refattn_call(arrays, params, want_lse)
    if adapter == "varlen":
        return _varlen_call(arrays, params, want_lse)
    if "cu_seqlens_q" in params or "cu_seqlens_k" in params:
        raise ParameterError(f"cu_seqlens_q: a packed case needs adapter 'varlen' or 'refattn', "
                             f"got adapter={adapter!r}")
    if adapter == "flex":
        return _flex_call(arrays, params, want_lse)
    if adapter == "sdpa":
        if want_lse:
            raise ParameterError("lse: the 'sdpa' signature returns no LSE")
        return _sdpa_call(arrays, params)
    return _flash_call(arrays, params, want_lse)

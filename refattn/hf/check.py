"""``check_module``: an HF attention module against the float64 oracle.

The module (a float64 copy of it, in eval mode) runs in eager mode on ``hidden_states``, with
HF's float32 casts patched (:mod:`refattn.hf.float64`), the position tables and the 4-d mask the
model would give it, and its attention captured where it attends (:mod:`refattn.hf.capture`, or
the family's hook in :mod:`refattn.hf.hooks`). The oracle is the layer's variant
(:func:`refattn.hf.attention_spec`, parameters from the *config*, never from what the module
passes its attention function) run through :func:`refattn.pipeline.run` on the captured inputs:
for RoPE models ``q`` and ``k`` *before* the rotation and ``v``; for DeepSeek's MLA the hidden
states and the module's weights. Compared: the attention output (before the output projection),
and with ``grad=True`` the input gradients for an upstream gradient drawn from ``seed``.

What is the same on both sides by construction, and so not under test: the projections before
the capture point (and the q/k norms of Qwen3/Gemma3), the position tables (built in float64 from
the config with :func:`refattn.position.rope_frequencies`; HF's own are float32, a quirk warned
about) and the padding mask given. Under test: everything from there to the output -- RoPE
application and pairing, scale, causal and window masks (HF's mask builder included), softcap,
sinks, GQA head mapping, the softmax, MLA's latent path.

Padding: ``attention_mask (B, S)`` (1 = token, 0 = padding) hides padding keys on both sides;
rows of padding *queries* are not compared (HF fills them with an average over every key, refattn
with 0: neither is used by a model), and the upstream gradient is 0 there.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import numerics, pipeline, validate as V
from ..errors import ParameterError, ShapeError, fmt_shape


class QuirkWarning(UserWarning):
    """An HF model's eager code deviates from its config, from its sdpa path or from float64."""


@dataclass
class HFCheck:
    """The verdict of :func:`check_module`.

    ``verdict`` is ``"PASS"`` when every compared array has a normwise relative error
    ``||actual - oracle|| / ||oracle|| <= tolerance`` and the same non-finite entries; ``results``
    maps each array (``out``, ``dq``, ``dk``, ``dv``, ``dsinks``; MLA: ``dhidden``, ``dw_dkv`` ...)
    to :func:`refattn.numerics.metrics` plus ``verdict``; ``worst`` is :func:`refattn.report.analyse`'s
    worst ``(b, h, i, j)`` of the output (key ``j`` where a key explains the error), ``lines`` its
    account; ``stages`` what the capture shows at each stage where the module departs from the
    config (the scale and softcap it passes its attention function, the mask it attends with, the
    RoPE it applied -- each named, with the first offending pair or the pairing that would match);
    ``warnings`` the peer quirks measured on this run; ``message`` all of it as text.
    """

    verdict: str
    spec: object
    results: dict
    tolerance: float
    worst: Optional[dict] = None
    lines: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


@dataclass
class Run:
    """One captured run: ``actual`` (bhsd numpy arrays by result name), the oracle's ``inputs`` and
    ``params``, ``dout`` (bhsd) and ``grad_map`` (result name -> oracle gradient name, or a function
    of the oracle's gradient dict)."""

    actual: dict
    inputs: dict
    params: dict
    dout: Optional[np.ndarray] = None
    grad_map: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    stages: list = field(default_factory=list)


# -- inputs -----------------------------------------------------------------------------------------
def _torch():
    from . import _require
    return _require()[0]


def _hidden(hidden_states, torch):
    x = V.as_compute(hidden_states, "hidden_states")
    V.check_finite(x, "hidden_states")
    if x.ndim != 3 or 0 in x.shape:
        raise ShapeError(f"hidden_states: expected (B, S, hidden_size), got {fmt_shape(x.shape)}")
    return torch.tensor(x, dtype=torch.float64).requires_grad_(True)


def _padding(attention_mask, b, s):
    if attention_mask is None:
        return None
    m = V.to_numpy(attention_mask, "attention_mask")
    if m.ndim != 2:
        raise ShapeError(f"attention_mask: expected the (B, S) padding mask (1 = token, 0 = padding; "
                         f"check_module builds the 4-d mask the model would), got {fmt_shape(m.shape)}")
    if m.shape != (b, s):
        raise ShapeError(f"attention_mask: expected shape ({b}, {s}) as hidden_states, got {fmt_shape(m.shape)}")
    if m.dtype.kind not in "biu" or not np.isin(m, (0, 1)).all():
        raise ParameterError("attention_mask: expected 0/1 or booleans (1 = token, 0 = padding)")
    keep = m.astype(bool)
    if not keep.any(axis=1).all():
        raise ParameterError(f"attention_mask: sequence {int(np.argmin(keep.any(axis=1)))} is all padding")
    return keep


def _positions(position_ids, b, s):
    if position_ids is None:
        return np.broadcast_to(np.arange(s), (b, s)).copy()
    p = V.int_array(position_ids, "position_ids")
    if p.ndim == 1:
        p = np.broadcast_to(p, (b, p.shape[0])).copy()
    if p.shape != (b, s):
        raise ShapeError(f"position_ids: expected ({b}, {s}) or ({s},), got {fmt_shape(p.shape)}")
    if p.size and p.min() < 0:
        raise ParameterError(f"position_ids: expected positions >= 0, got {p.min()}")
    return p


def hf_mask(config, x, keep, window: bool, causal: bool = True):
    """The 4-d additive float64 mask HF's model builds for this layer (its masking utilities, eager)."""
    torch = _torch()
    from transformers import masking_utils as mu
    cfg = copy.copy(config)
    cfg._attn_implementation = "eager"
    am = None if keep is None else torch.tensor(keep.astype(np.int64))
    if not causal:
        with torch.no_grad():
            return mu.create_bidirectional_mask(config=cfg, inputs_embeds=x.detach(), attention_mask=am)
    fn = mu.create_sliding_window_causal_mask if window else mu.create_causal_mask
    with torch.no_grad():
        return fn(config=cfg, inputs_embeds=x.detach(), attention_mask=am, past_key_values=None,
                  position_ids=None)


def _np(t):
    return t.detach().cpu().numpy().astype(np.float64)


def _bhsd(t):
    return _np(t).transpose(0, 2, 1, 3)


def _dout(shape, seed, keep):
    """An upstream gradient (B, H, S, Dv) drawn from ``seed``, 0 at padding query rows."""
    d = np.random.default_rng(seed).standard_normal(shape)
    if keep is not None:
        d = d * keep[:, None, :, None]
    return d


# -- the runners ------------------------------------------------------------------------------------
def _module_run(m, spec, rt, x, keep, pos, float64: bool, log=None):
    """One forward of the module with its attention captured; returns the capture record."""
    torch = _torch()
    from .capture import interface_capture
    from .families import rope_tables
    from .float64 import float64_casts
    import contextlib

    cfg = m.config
    pe = rope_tables(spec, cfg, pos, rt.rope) if rt.rope else None
    mask = hf_mask(cfg, x, keep, "window" in spec.params, bool(spec.params.get("causal", True)))
    casts = float64_casts(log) if float64 else contextlib.nullcontext()
    with casts, torch.enable_grad(), interface_capture(m, rt.modeling(), rt.rotary) as rec:
        kwargs = {"mask" if spec.variant == "t5" else "attention_mask": mask}
        if pe is not None:
            kwargs["position_embeddings"] = pe
        m(x, **kwargs)
    if len(rec.calls) != 1:
        raise ParameterError(f"module: expected one call of its attention function, saw {len(rec.calls)} "
                             f"(is it a {spec.model_type} attention module?)")
    return rec


def _rope_run(m, spec, rt, x, keep, pos, grad, seed, float64, log, positions_given):
    torch = _torch()
    rec = _module_run(m, spec, rt, x, keep, pos, float64, log)
    if len(rec.rotary) != 1:
        raise ParameterError(f"module: expected one call of {' or '.join(rt.rotary)} (where q and k are "
                             f"captured before RoPE), saw {len(rec.rotary)}")
    call = rec.calls[0]
    q_pre, k_pre = rec.rotary[0]
    v = call["value"]
    out = call["out"]
    params = dict(spec.params)
    if keep is not None:
        params["mask"] = keep[:, None, None, :]
    if positions_given:
        params["q_positions"] = pos
        params["k_positions"] = pos
    targets = [q_pre, k_pre, v]
    names = ["dq", "dk", "dv"]
    grad_map = {"dq": "q", "dk": "k", "dv": "v"}
    if "sinks" in spec.module_params:
        params["sinks"] = _np(m.sinks)
        targets.append(m.sinks)
        names.append("dsinks")
        grad_map["dsinks"] = "sinks"
    actual = {"out": _bhsd(out)}
    dout = None
    if not grad:
        grad_map = {}
    else:
        dout = _dout(actual["out"].shape, seed, keep)
        gs = torch.autograd.grad(out, targets, torch.tensor(dout.transpose(0, 2, 1, 3)), allow_unused=True)
        for n, g in zip(names, gs):
            if g is None:
                raise ParameterError(f"module: its output does not depend on {n[1:]} (captured tensor)")
            actual[n] = _np(g)
    inputs = {"q": _np(q_pre), "k": _np(k_pre), "v": _np(v)}
    stages = _stage_scale(call, spec.params["scale"], "head_dim ** -0.5" if "query_pre_attn_scalar"
                          not in " ".join(spec.notes) else "query_pre_attn_scalar ** -0.5")
    stages += _stage_softcap(call, spec.params.get("softcap"))
    stages += _stage_mask(call, spec.params, keep)
    stages += _stage_rope(call, q_pre, spec.params, pos)
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map,
               stages=stages), rec


def _t5_run(m, spec, rt, x, keep, pos, grad, seed, float64, log, positions_given):
    torch = _torch()
    if not getattr(m, "has_relative_attention_bias", False):
        raise ParameterError("module: this T5Attention has no relative_attention_bias (HF gives layers > 0 "
                             "layer 0's position bias); check the stack's layer 0, or a module built with "
                             "has_relative_attention_bias=True")
    rec = _module_run(m, spec, rt, x, keep, pos, float64, log)
    call = rec.calls[0]
    table = m.relative_attention_bias.weight
    params = dict(spec.params)
    if keep is not None:
        params["mask"] = keep[:, None, None, :]
    actual = {"out": _bhsd(call["out"])}
    q, k, v = call["query"], call["key"], call["value"]
    dout, grad_map = None, {}
    if grad:
        dout = _dout(actual["out"].shape, seed, keep)
        gs = torch.autograd.grad(call["out"], [q, k, v, table], torch.tensor(dout.transpose(0, 2, 1, 3)))
        actual.update(dq=_np(gs[0]), dk=_np(gs[1]), dv=_np(gs[2]), dtable=_np(gs[3]))
        grad_map = {"dq": "q", "dk": "k", "dv": "v", "dtable": "table"}
    inputs = {"q": _np(q), "k": _np(k), "v": _np(v), "table": _np(table)}
    stages = _stage_scale(call, 1.0, "T5: 1") + _stage_mask(call, spec.params, keep)
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map, stages=stages), rec


def _mla_weights(m, spec):
    """The ``mla`` inputs and parameters held by a DeepSeek attention module, in refattn's layout."""
    c = m.config
    h, dn, dr, dv, dc = (int(c.num_attention_heads), int(c.qk_nope_head_dim), int(c.qk_rope_head_dim),
                         int(c.v_head_dim), int(c.kv_lora_rank))
    kv_a = _np(m.kv_a_proj_with_mqa.weight).T
    kv_b = _np(m.kv_b_proj.weight).reshape(h, dn + dv, dc)
    arrays = {"w_dkv": kv_a[:, :dc], "w_kr": kv_a[:, dc:], "w_uk": kv_b[:, :dn].transpose(0, 2, 1),
              "w_uv": kv_b[:, dn:].transpose(0, 2, 1)}
    params = {"kv_norm": _np(m.kv_a_layernorm.weight)}
    eps = {float(m.kv_a_layernorm.variance_epsilon)}
    dm = kv_a.shape[0]
    if m.q_lora_rank is None:
        params["w_q"] = _np(m.q_proj.weight).T.reshape(dm, h, dn + dr)
    else:
        params["w_dq"] = _np(m.q_a_proj.weight).T
        params["q_norm"] = _np(m.q_a_layernorm.weight)
        params["w_uq"] = _np(m.q_b_proj.weight).T.reshape(int(m.q_lora_rank), h, dn + dr)
        eps.add(float(m.q_a_layernorm.variance_epsilon))
    if len(eps) != 1:
        raise ParameterError(f"module: kv_a_layernorm and q_a_layernorm have different eps {sorted(eps)}; "
                             f"refattn's mla has one norm_eps")
    params["norm_eps"] = eps.pop()
    return arrays, params, (h, dn, dr, dv, dc, dm)


def _mla_run(m, spec, rt, x, keep, pos, grad, seed, float64, log, positions_given):
    torch = _torch()
    rec = _module_run(m, spec, rt, x, keep, pos, float64, log)
    out = rec.calls[0]["out"]
    arrays, mparams, (h, dn, dr, dv, dc, dm) = _mla_weights(m, spec)
    xs = _np(x)
    inputs = {"q": xs, "hidden": xs, **arrays}
    params = {**spec.params, **mparams}
    if keep is not None:
        params["mask"] = keep[:, None, None, :]
    if positions_given:
        params["q_positions"] = pos
        params["k_positions"] = pos
    actual = {"out": _bhsd(out)}
    dout = None
    grad_map = {}
    if grad:
        dout = _dout(actual["out"].shape, seed, keep)
        named = {"dhidden": x, "kv_a": m.kv_a_proj_with_mqa.weight, "kv_b": m.kv_b_proj.weight,
                 "dkv_norm": m.kv_a_layernorm.weight}
        if m.q_lora_rank is None:
            named["dw_q"] = m.q_proj.weight
        else:
            named.update(dw_dq=m.q_a_proj.weight, dq_norm=m.q_a_layernorm.weight, dw_uq=m.q_b_proj.weight)
        gs = dict(zip(named, torch.autograd.grad(out, list(named.values()),
                                                 torch.tensor(dout.transpose(0, 2, 1, 3)))))
        kv_a = _np(gs.pop("kv_a")).T
        kv_b = _np(gs.pop("kv_b")).reshape(h, dn + dv, dc)
        actual.update(dw_dkv=kv_a[:, :dc], dw_kr=kv_a[:, dc:], dw_uk=kv_b[:, :dn].transpose(0, 2, 1),
                      dw_uv=kv_b[:, dn:].transpose(0, 2, 1), dhidden=_np(gs.pop("dhidden")),
                      dkv_norm=_np(gs.pop("dkv_norm")))
        if "dw_q" in gs:
            actual["dw_q"] = _np(gs["dw_q"]).T.reshape(dm, h, dn + dr)
        else:
            actual.update(dw_dq=_np(gs["dw_dq"]).T, dq_norm=_np(gs["dq_norm"]),
                          dw_uq=_np(gs["dw_uq"]).T.reshape(int(m.q_lora_rank), h, dn + dr))
        grad_map = {"dhidden": lambda g: g["q"] + g["hidden"]}  # x feeds the query and the latent
        for n in ("w_dkv", "w_kr", "w_uk", "w_uv", "kv_norm", "w_q", "w_dq", "q_norm", "w_uq"):
            if "d" + n in actual:
                grad_map["d" + n] = n
    from ..variants.kvcache.serving import mla_softmax_scale
    want = mla_softmax_scale(dn + dr, spec.params.get("scaling"), spec.params.get("max_position_embeddings"))
    stages = _stage_scale(rec.calls[0], want, "(d_nope + d_rope) ** -0.5 with YaRN's mscale")
    stages += _stage_mask(rec.calls[0], spec.params, keep)
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map,
               stages=stages), rec


# -- stages: what the capture shows against the config -----------------------------------------------
def _stage_scale(call, want: float, how: str) -> list:
    got = call["kwargs"].get("scaling")
    if got is None or math.isclose(float(got), want, rel_tol=1e-12):
        return []
    return [f"scale: the module passes scaling={float(got)!r} to its attention function; the config "
            f"gives {want!r} ({how})"]


def _stage_softcap(call, want) -> list:
    got = call["kwargs"].get("softcap")
    if (got is None and want is None) or (got is not None and want is not None
                                         and math.isclose(float(got), want, rel_tol=1e-12)):
        return []
    return [f"softcap: the module passes softcap={got!r} to its attention function; the config gives "
            f"{want!r}"]


def _stage_mask(call, params, keep) -> list:
    """The visibility the module attends with (its additive mask) against the config's pattern."""
    from ..patterns import Pattern
    from ..report import relation
    m = call["mask"]
    q = call["query"]
    b, _, sq, _ = q.shape
    sk = call["key"].shape[2]
    seen = np.ones((b, 1, sq, sk), dtype=bool) if m is None else np.broadcast_to(
        _np(m) > np.finfo(np.float64).min / 2, (b, 1, sq, sk))
    pattern = Pattern(causal=bool(params.get("causal")), window=params.get("window"),
                      alignment="bottom_right", dense=None if keep is None else keep[:, None, None, :])
    want = np.broadcast_to(pattern.mask(sq, sk), (b, 1, sq, sk))
    rows = np.ones((b, 1, sq, 1), dtype=bool) if keep is None else keep[:, None, :, None]
    bad = (seen != want) & rows
    if not bad.any():
        return []
    bb, _, i, j = (int(x) for x in np.argwhere(bad)[0])
    band = pattern.band(sq, sk)
    what = ("causal" if params.get("causal") else "no causal mask") + (
        f", window {params['window']}" if params.get("window") else "") + (", padding" if keep is not None else "")
    verb = "shows" if seen[bb, 0, i, j] else "hides"
    return [f"mask: the module's attention mask {verb} key {j} to query {i} (batch {bb}), which the "
            f"config's pattern ({what}) {'hides' if verb == 'shows' else 'shows'}: key {j} lies "
            f"{relation(j, i, band, bool(want[bb, 0, i, j]))}; {int(bad.sum())} such (b, i, j) pairs"]


def _stage_rope(call, q_pre, params, pos) -> list:
    """The q the module attends with against RoPE(q before rotation) with the config's parameters."""
    from ..position import rope
    got = _np(call["query"])
    x = _np(q_pre)
    kw = dict(base=params.get("base"), rotary_dim=params.get("rotary_dim"), scaling=params.get("scaling"),
              max_position_embeddings=params.get("max_position_embeddings"),
              seq_len=int(pos.max()) + 1)
    style = params.get("style", "neox")
    want = rope(x, pos, style=style, **kw)
    diff = _normwise(got, want)
    if diff <= 1e-12:
        return []
    other = "gptj" if style == "neox" else "neox"
    alt = _normwise(got, rope(x, pos, style=other, **kw))
    if alt <= 1e-12:
        return [f"RoPE: the module rotates q with {other!r} pairs; the config's model uses {style!r} pairs "
                f"(normwise difference {diff:.1e})"]
    return [f"RoPE: the q the module attends with is not RoPE(q) with the config's parameters ({style!r} "
            f"pairs; normwise difference {diff:.1e}, {alt:.1e} with {other!r} pairs)"]


# -- quirks measured on the run ----------------------------------------------------------------------
def _normwise(a, b):
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / nb if nb else float(np.linalg.norm(a - b))


def _interface_quirks(m, spec, rt, x, keep, pos, runner, actual_out, log, tolerance):
    """Warnings: float32 casts (the unpatched run's distance from the patched one) and the sdpa path."""
    from .spec import quirk
    torch = _torch()
    found = []
    if log is not None and log.sites:
        rec = _module_run(m, spec, rt, x, keep, pos, float64=False)
        raw = _bhsd(rec.calls[0]["out"])
        rows = True if keep is None else keep[:, None, :, None]
        diff = _normwise(np.where(rows, raw, 0.0), np.where(rows, actual_out, 0.0))
        found.append(quirk("float32_cast", site="; ".join(sorted(log.sites)), diff=f"{diff:.1e}"))
    # the sdpa path on the captured inputs (float64 casts patched, as for eager)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from .float64 import float64_casts
    rec = _module_run(m, spec, rt, x, keep, pos, float64=True)
    call = rec.calls[0]
    kwargs = dict(call["kwargs"])
    try:
        with float64_casts(), torch.no_grad():
            out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](m, call["query"], call["key"], call["value"],
                                                     call["mask"], **kwargs)
    except (ValueError, RuntimeError, TypeError) as exc:
        found.append(quirk("sdpa_refuses", site=str(exc).splitlines()[0]))
        return found
    eager = _bhsd(call["out"])
    sd = _bhsd(out)
    rows = True if keep is None else keep[:, None, :, None]
    diff = _normwise(np.where(rows, sd, 0.0), np.where(rows, eager, 0.0))
    if diff > tolerance:
        hint = ""
        if kwargs.get("s_aux") is not None:
            hint = "; " + quirk("gpt_oss_sdpa_sinks")
        found.append(quirk("sdpa_differs", diff=f"{diff:.1e}", site=hint))
    return found


def _rope_table_quirk(m, spec, pos):
    from .families import hf_rope_tables, rope_tables, runtime
    from .spec import quirk
    rt = runtime(spec.model_type)
    try:
        theirs = hf_rope_tables(m, spec, pos, rt.rope)
    except Exception:  # noqa: BLE001 -- informational only; the comparison does not use them
        return []
    ours = rope_tables(spec, m.config, pos, rt.rope)
    if theirs is None:
        return []
    if not isinstance(theirs, tuple):
        theirs, ours = (theirs.real, theirs.imag), (ours.real, ours.imag)
    diff = max(float((_np(a) - _np(b)).__abs__().max()) for a, b in zip(theirs, ours))
    return [quirk("rotary_inv_freq_float32", diff=f"{diff:.1e}")] if diff > 0 else []


# -- the public function ----------------------------------------------------------------------------
def _model_type(module, config=None):
    from .spec import FAMILY_OF
    cfg = getattr(module, "config", None) if config is None else config
    mt = getattr(cfg, "model_type", None)
    if mt is None or not hasattr(module, "forward"):
        raise ParameterError(f"module: expected a transformers attention module with .config (or pass "
                             f"config=), got {type(module).__name__}")
    if mt not in FAMILY_OF:
        raise ParameterError(f"module: model type {mt!r} is not supported by refattn.hf; supported: "
                             f"{', '.join(sorted(FAMILY_OF))}")
    return mt


def check_module(module, hidden_states, *, attention_mask=None, position_ids=None, layer_idx=None,
                 config=None, global_mask=None, grad: bool = True, seed: int = 0, tolerance: float = 1e-10,
                 keep_float64: bool = True, quirks: bool = True) -> HFCheck:
    """Run an HF attention module in float64 eager mode and compare it with the oracle.

    ``module``: an attention module of a supported family (``LlamaAttention``, ``DeepseekV3Attention``,
    ... -- :data:`refattn.hf.FAMILIES`); a float64 copy runs, the module itself is not changed.
    ``hidden_states (B, S, hidden_size)`` (numpy or torch). ``attention_mask (B, S)``: 1 = token,
    0 = padding (module docstring). ``position_ids (B, S)`` or ``(S,)``: RoPE positions (default
    ``0 .. S-1``). ``layer_idx``: the layer of the config (default ``module.layer_idx``).
    ``config``: the model's config, for modules that do not keep one (BLOOM's, MPT's attention;
    default ``module.config``). ``global_mask (B, S)`` bool: Longformer's global tokens.
    ``grad``: also compare the input gradients for an upstream gradient drawn from ``seed``.
    ``tolerance``: the normwise relative error allowed per array (default 1e-10).
    ``keep_float64``: patch HF's float32 casts while the module runs (:mod:`refattn.hf.float64`);
    False compares HF's rounding too. ``quirks``: also measure the peer quirks (a second run without
    the patch, the sdpa path, HF's rotary tables) and warn (:class:`QuirkWarning`).

    Returns an :class:`HFCheck`; FAIL points at the worst ``(b, h, i, j)``.
    """
    torch = _torch()
    from . import hooks
    from .families import RUNTIME
    from .float64 import CastLog
    from .spec import FAMILIES, FAMILY_OF, attention_spec

    mt = _model_type(module, config)
    config = module.config if config is None else config
    V.check_bool(grad, "grad")
    V.check_bool(keep_float64, "keep_float64")
    V.check_bool(quirks, "quirks")
    seed = V.check_int(seed, "seed", 0)
    tol = numerics._check_number(tolerance, "tolerance")
    idx = layer_idx
    if idx is None:  # HF's attribute (Longformer calls it layer_id)
        idx = getattr(module, "layer_idx", None)
        idx = getattr(module, "layer_id", None) if idx is None else idx
    spec = attention_spec(config, 0 if idx is None else idx)
    if not isinstance(module, torch.nn.Module):
        raise ParameterError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    m = copy.deepcopy(module).double().eval()
    if getattr(m, "config", None) is not config:
        m.config = copy.deepcopy(config)
    for p in m.parameters():
        p.requires_grad_(True)
    x = _hidden(hidden_states, torch)
    b, s, d = x.shape
    hidden_size = getattr(m.config, "hidden_size", None)
    if hidden_size is not None and d != hidden_size:
        raise ShapeError(f"hidden_states: expected (B, S, {hidden_size}) = (B, S, hidden_size), got "
                         f"{fmt_shape(tuple(x.shape))}")
    keep = _padding(attention_mask, b, s)
    pos = _positions(position_ids, b, s)
    log = CastLog() if keep_float64 else None
    family = FAMILY_OF[mt]
    if global_mask is not None and family != "longformer":
        raise ParameterError(f"global_mask: only for longformer modules, got a {mt} module")
    if FAMILIES[family][2] == "attention_interface":
        rt = RUNTIME[mt]
        runner = {"mla": _mla_run, "t5": _t5_run}.get(spec.variant, _rope_run)
        run, _ = runner(m, spec, rt, x, keep, pos, grad, seed, keep_float64, log, position_ids is not None)
    else:
        rt = None
        extra = {} if global_mask is None else {"global_mask": global_mask}
        run = hooks.run(family, m, spec, x, keep, pos, grad=grad, seed=seed, float64=keep_float64, log=log,
                        positions_given=position_ids is not None, **extra)
    found = list(spec.warnings) + list(run.warnings)
    if quirks and rt is not None:
        found += _interface_quirks(m, spec, rt, x, keep, pos, None, run.actual["out"], log, tol)
        if rt.rope is not None:
            found += _rope_table_quirk(m, spec, pos)
    elif quirks and log is not None and log.sites:
        from .spec import quirk
        raw = hooks.run(family, m, spec, x, keep, pos, grad=False, seed=seed, float64=False, log=None,
                        positions_given=position_ids is not None, **extra).actual["out"]
        rows = True if keep is None else keep[:, None, :, None]
        diff = _normwise(np.where(rows, raw, 0.0), np.where(rows, run.actual["out"], 0.0))
        found.append(quirk("float32_cast", site="; ".join(sorted(log.sites)), diff=f"{diff:.1e}"))
    result = _judge(spec, run, keep, tol)
    result.stages = list(run.stages)
    result.warnings = found
    for w in found:
        warnings.warn(w, QuirkWarning, stacklevel=3)
    result.message = _message(result)
    return result


def _judge(spec, run: Run, keep, tol) -> HFCheck:
    res = pipeline.run(spec.variant, "numpy", run.inputs, run.params, dout=run.dout)
    expected = {"out": np.asarray(res.outputs["out"], dtype=np.float64)}
    for name, src in run.grad_map.items():
        expected[name] = np.asarray(src(res.grads) if callable(src) else res.grads[src], dtype=np.float64)
    actual = dict(run.actual)
    if keep is not None:  # rows of padding queries are not compared (module docstring)
        rows = keep[:, None, :, None]
        actual["out"] = np.where(rows, actual["out"], 0.0)
        expected["out"] = np.where(rows, expected["out"], 0.0)
    results = {}
    for name in actual:
        mt = numerics.metrics(actual[name], expected[name], name=name)
        mt["verdict"] = "PASS" if numerics.within_tolerance(mt, tol) else "FAIL"
        results[name] = mt
    verdict = "PASS" if all(r["verdict"] == "PASS" for r in results.values()) else "FAIL"
    out = HFCheck(verdict=verdict, spec=spec, results=results, tolerance=tol)
    o = results["out"]
    if o["worst_index"] is not None:
        from .. import report
        case = {**run.inputs, **{n: v for n, v in run.params.items()}}
        threshold = tol * max(float(np.max(np.abs(expected["out"]))), 1e-300)
        an = report.analyse(actual["out"], expected["out"], threshold, case=case if spec.variant != "mla" else {},
                            variant=spec.variant, heat=False)
        out.worst = an["worst"]
        out.lines = list(an["lines"])
    return out


def _message(r: HFCheck) -> str:
    from .. import report
    head = ("array", "max_abs", "normwise", "max_rel", "worst index", "verdict")
    rows = [head] + [(n, f"{m['max_abs']:.3e}", f"{m['normwise_rel']:.3e}", f"{m['max_rel']:.3e}",
                      str(m["worst_index"]), m["verdict"]) for n, m in r.results.items()]
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    s = r.spec
    lines = [f"{r.verdict}: {s.model_type} layer {s.layer_idx}"
             + (f" ({s.layer_type})" if s.layer_type else "")
             + f" against refattn's {s.variant!r} in float64 (normwise tolerance {r.tolerance:g})", table]
    if r.verdict == "FAIL":
        if r.worst is not None:
            lines.append(report.worst_line(r.worst))
        lines += r.lines
    lines += [f"stage {st}" for st in r.stages]
    lines += [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)

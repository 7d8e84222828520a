"""Falcon (``FalconAttention``, inline attention): RoPE, or ALiBi with ``alibi=True``.

Spec with ``alibi=False``: ``rope`` (neox pairs, ``rope_parameters``), ``scale = 1/sqrt(head_dim)``,
causal; K/V heads: ``num_kv_heads`` with ``new_decoder_architecture`` (HF broadcasts each K/V head
to its query heads), one with ``multi_query``, else all. With ``alibi=True``: ``alibi`` with the
paper's slopes divided by ``sqrt(head_dim)`` -- Falcon's eager path computes
``(q·k + slope_h * p_j) / sqrt(D)``, the ALiBi term scaled with the scores.

Hook: ``_split_heads`` (q, k, v before RoPE, ``(B, S, H, D)``), the input of ``dense``. The module
gets refattn's float64 ``alibi`` (HF builds it in bfloat16, a quirk) and the plain causal mask.
FalconModel also folds ``alibi / sqrt(D)`` into the 4-d mask it hands every layer; the eager path then
adds ALiBi a second time. check_module measures that (the module run with the model's mask) and
warns; the sdpa path counts it once.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import ParameterError
from ..spec import _rope_params, quirk, register_family
from . import _inline as I

MODULE = "transformers.models.falcon.modeling_falcon"


def _kv_heads(config):
    h = int(config.num_attention_heads)
    if config.new_decoder_architecture:
        return h  # K/V heads are broadcast to every query head before the attention
    return 1 if config.multi_query else int(config.num_kv_heads or h)


def spec(config, layer_idx, model_type):
    h = int(config.num_attention_heads)
    hd = int(config.hidden_size // h)
    params = {"causal": True, "scale": hd ** -0.5}
    notes = []
    hkv = _kv_heads(config)
    inputs = {"q": f"(B, {h}, S, {hd})", "k": f"(B, {hkv}, S, {hd})", "v": f"(B, {hkv}, S, {hd})"}
    if config.alibi:
        from ...position import alibi_slopes
        params["alibi_slopes"] = alibi_slopes(h) / math.sqrt(hd)
        notes.append(f"alibi_slopes = the paper's slopes / sqrt(head_dim {hd}): Falcon scales the ALiBi term "
                     f"with the scores ((q.k + alibi) * inv_norm_factor)")
        return dict(variant="alibi", params=params, inputs=inputs, notes=notes)
    params.update(_rope_params(config.rope_parameters, hd, config.max_position_embeddings, notes))
    if "rotary_dim" in params:
        raise ParameterError("config.rope_parameters['partial_rotary_factor']: not supported for falcon")
    params["style"] = "neox"
    return dict(variant="rope", params=params, inputs=inputs, notes=notes)


def build(config, layer_idx):
    import importlib
    return importlib.import_module(MODULE).FalconAttention(config, layer_idx)


def _alibi(spec_, keep, b, s, hd):
    import torch
    slopes = spec_.params["alibi_slopes"] * math.sqrt(hd)  # Falcon's alibi argument is unscaled
    p = I.alibi_positions(keep, b, s)
    return torch.tensor((slopes[None, :, None] * p[:, None, :]).reshape(b * len(slopes), 1, s))


def _once(m, spec_, x, keep, pos, mask, alibi, float64, log, record=True):
    import contextlib

    import torch
    from ..families import rope_tables
    from ..float64 import float64_casts
    split, outs = [], []
    kw = {}
    if alibi is None:
        kw["position_embeddings"] = rope_tables(spec_, m.config, pos, "concat")
    casts = float64_casts(log) if float64 else contextlib.nullcontext()
    with casts, torch.enable_grad(), I.wrapped(m, "_split_heads", split), I.input_of(m.dense, outs):
        m(x, alibi, mask, **kw)
    return split[0], outs[0]


def run(m, spec_, x, keep, pos, *, grad, seed, float64, log, positions_given):
    import torch
    from ..check import Run, _dout, hf_mask, _normwise
    b, s, _ = x.shape
    h, hd = m.num_heads, m.head_dim
    mask = hf_mask(m.config, x, keep, False)
    alibi = None
    if spec_.variant == "alibi":
        I.contiguous_tokens(keep, "Falcon")
        alibi = _alibi(spec_, keep, b, s, hd)
    (q, k, v), out = _once(m, spec_, x, keep, pos, mask, alibi, float64, log)  # (B, S, H, D)
    actual = {"out": I.heads_out(out, h)}
    params = dict(spec_.params)
    if keep is not None:
        params["mask"] = keep[:, None, None, :]
    if positions_given and spec_.variant == "rope":
        params["q_positions"] = params["k_positions"] = pos
    dout, grad_map = None, {}
    if grad:
        dout = _dout(actual["out"].shape, seed, keep)
        g = I.run_grads(out, {"dq": q, "dk": k, "dv": v}, dout, h)
        actual.update({n: a.transpose(0, 2, 1, 3) for n, a in g.items()})
        grad_map = {"dq": "q", "dk": "k", "dv": "v"}
    warnings = []
    if alibi is not None:
        import importlib
        mod = importlib.import_module(MODULE)
        am = torch.tensor(np.ones((b, s), dtype=np.int64) if keep is None else keep.astype(np.int64))
        theirs = I.np64(mod.build_alibi_tensor(am, h, torch.float64))
        diff = float(np.max(np.abs(theirs - I.np64(alibi))))
        if diff > 0:
            warnings.append(quirk("alibi_slopes_lowp", model="Falcon build_alibi_tensor", dtype="bfloat16",
                                  diff=f"{diff:.1e} in slope * position"))
        # what FalconModel hands its layers: alibi / sqrt(D) folded into the mask, and alibi again
        folded = torch.masked_fill(alibi.reshape(b, h, 1, s) / math.sqrt(hd), mask < -1,
                                   torch.finfo(torch.float64).min)
        with torch.no_grad():
            _, twice = _once(m, spec_, x, keep, pos, folded, alibi, True, None)
        rows = True if keep is None else keep[:, None, :, None]
        diff2 = _normwise(np.where(rows, I.heads_out(twice, h), 0.0), np.where(rows, actual["out"], 0.0))
        warnings.append(quirk("falcon_alibi_twice", site=(
            f"FalconModel folds alibi / sqrt(head_dim) into the 4-d mask it gives every layer and the eager "
            f"attention adds (q.k + alibi) / sqrt(head_dim) on top: ALiBi counted twice (the layer's output "
            f"moves by {diff2:.1e} normwise); the sdpa path counts it once; check_module gives the module "
            f"the plain causal mask and compares the single ALiBi")))
    inputs = {n: I.np64(t).transpose(0, 2, 1, 3) for n, t in (("q", q), ("k", k), ("v", v))}
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map, warnings=warnings)


register_family("falcon", ("falcon",), spec, "hook:falcon")

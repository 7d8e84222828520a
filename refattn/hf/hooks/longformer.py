"""Longformer (``LongformerSelfAttention``, inline sliding-chunk attention) with global tokens.

Spec: ``longformer`` with HF's ``attention_window`` of the layer (the total span, one-sided
``w = attention_window // 2``), ``scale = 1/sqrt(head_dim)`` (HF divides the queries), and the
global rows' own projections ``q_global``, ``k_global``, ``v_global`` (module weights). The global
tokens are an input of the check: ``check_module(..., global_mask=(B, S) bool)``. Padding and lengths
that are not a multiple of ``attention_window`` are refused (LongformerModel pads before its layers).

Hook: the outputs of ``query``, ``key``, ``value`` and ``query_global``, ``key_global``,
``value_global`` (first call each; the module divides the query in place, so the hook hands it a
copy), and the module's own output (it has no output projection). HF's softmax runs in float32 even
for float64 (VARIANTS H): patched like the others.
"""

from __future__ import annotations

import numpy as np

from ...errors import ParameterError, ShapeError, fmt_shape
from ..spec import register_family
from . import _inline as I

MODULE = "transformers.models.longformer.modeling_longformer"
NAMES = ("query", "key", "value", "query_global", "key_global", "value_global")


def spec(config, layer_idx, model_type):
    h = int(config.num_attention_heads)
    hd = int(config.hidden_size // h)
    w = config.attention_window
    w = int(w[layer_idx] if isinstance(w, (list, tuple)) else w)
    params = {"attention_window": w, "scale": hd ** -0.5}
    notes = [f"attention_window = config.attention_window[{layer_idx}] = {w}: one-sided window {w // 2}",
             "global rows use query_global/key_global/value_global (global_mask= of check_module)"]
    inputs = {n: f"(B, {h}, S, {hd})" for n in "qkv"}
    module_params = {"q_global": "query_global(hidden) per head", "k_global": "key_global(hidden) per head",
                     "v_global": "value_global(hidden) per head", "global_mask": "check_module(global_mask=)"}
    return dict(variant="longformer", params=params, inputs=inputs, module_params=module_params, notes=notes)


def build(config, layer_idx):
    import importlib
    return importlib.import_module(MODULE).LongformerSelfAttention(config, layer_id=layer_idx)


def run(m, spec_, x, keep, pos, *, grad, seed, float64, log, positions_given, global_mask=None):
    import contextlib

    import torch
    from ..check import Run, _dout
    from ..float64 import float64_casts
    b, s, _ = x.shape
    w = spec_.params["attention_window"]
    if keep is not None and not keep.all():
        raise ParameterError("attention_mask: padding is not supported for longformer (LongformerModel pads "
                             "to the window and masks inside its own forward); give whole sequences")
    if 2 * m.one_sided_attn_window_size != w:
        raise ParameterError(f"layer_idx: layer {spec_.layer_idx} of the config has attention_window {w}, the "
                             f"module {2 * m.one_sided_attn_window_size}; pass the module's layer_idx=")
    if s % w:
        raise ShapeError(f"hidden_states: longformer needs S a multiple of attention_window {w}, got S={s}")
    g = np.zeros((b, s), dtype=bool) if global_mask is None else np.asarray(global_mask)
    if g.shape != (b, s) or g.dtype != bool:
        raise ShapeError(f"global_mask: expected a bool array ({b}, {s}), got {fmt_shape(g.shape)} {g.dtype}")
    caught = {}

    def hook(name):
        def keep_first(mod, args, out):
            if name not in caught:
                caught[name] = out
                return out.clone()  # the module divides the query in place
            return None
        return keep_first

    mask = torch.tensor(g.astype(np.float64) * 10000.0)
    handles = [getattr(m, n).register_forward_hook(hook(n)) for n in NAMES]
    casts = float64_casts(log) if float64 else contextlib.nullcontext()
    try:
        with casts, torch.enable_grad():
            out = m(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                    is_global_attn=bool(g.any()))[0]
    finally:
        for hd_ in handles:
            hd_.remove()
    h = m.num_heads

    def heads(t):  # (S, B, d) -> (B, H, S, D)
        return t.transpose(0, 1).reshape(b, s, h, -1).transpose(1, 2)

    names = [n for n in NAMES if n in caught]
    tensors = {n: caught[n] for n in names}
    actual = {"out": I.heads_out(out, h)}
    oracle = {"query": "q", "key": "k", "value": "v", "query_global": "q_global", "key_global": "k_global",
              "value_global": "v_global"}
    globals_ = [np.nonzero(row)[0] for row in g]  # HF's compact global rows: j-th global token of b

    def full(name, compact):
        """A (max_global, B, d) array of HF's global rows as (B, H, S, D), zero elsewhere."""
        out_ = np.zeros((b, s, compact.shape[-1]))
        for bb, idx in enumerate(globals_):
            out_[bb, idx] = compact[:len(idx), bb]
        return out_.reshape(b, s, h, -1).transpose(0, 2, 1, 3)

    dout, grad_map = None, {}
    if grad:
        dout = _dout(actual["out"].shape, seed, None)
        gs = I.run_grads(out, tensors, dout, h)
        for n in names:
            if gs[n] is None:
                continue
            if n == "query_global":
                actual["dq_global"] = full(n, gs[n])
            else:
                actual["d" + oracle[n]] = gs[n].transpose(1, 0, 2).reshape(b, s, h, -1).transpose(0, 2, 1, 3)
            grad_map["d" + oracle[n]] = oracle[n]
    arrays = {oracle[n]: I.np64(heads(t)) for n, t in tensors.items() if n != "query_global"}
    if "query_global" in tensors:  # HF projects only the global rows; the oracle takes q's shape
        with torch.no_grad():
            arrays["q_global"] = I.np64(heads(m.query_global(x.detach().transpose(0, 1))))
    params = dict(spec_.params, global_mask=g)
    for n in ("q_global", "k_global", "v_global"):
        if n in arrays:
            params[n] = arrays.pop(n)
    return Run(actual=actual, inputs=arrays, params=params, dout=dout, grad_map=grad_map)


register_family("longformer", ("longformer",), spec, "hook:longformer")

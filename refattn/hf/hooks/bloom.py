"""BLOOM (``BloomAttention``, inline attention): ALiBi added to the unscaled scores.

Spec: ``alibi`` with the paper's slopes for ``n_head`` heads (BLOOM's ``_get_alibi_slopes`` is the
paper's formula, non-powers of two included), ``scale = 1/sqrt(head_dim)``, causal. BLOOM computes
``alibi + q·k/sqrt(D)`` with ``alibi = slope_h * p_j`` and ``p_j`` the key's position counted over the
tokens (``cumsum(mask) - 1``); under the causal mask that is refattn's ``-slope_h * |i - j|`` shifted
by a constant per row, so the softmax is the same -- for contiguous tokens (left or right padding).
Hook: ``_reshape`` (q, k, v) and ``_merge_heads`` (the attention output; ``dense`` may be sliced).
The module takes ``alibi`` as an input; the float64 copy gets refattn's slopes times BLOOM's
positions (HF's model builds the slopes in float32, a quirk measured here).
"""

from __future__ import annotations

import numpy as np

from ..spec import _qkv_inputs, quirk, register_family
from . import _inline as I

MODULE = "transformers.models.bloom.modeling_bloom"


def spec(config, layer_idx, model_type):
    from ...position import alibi_slopes
    h = int(config.n_head)
    hd = int(config.hidden_size // h)
    params = {"causal": True, "scale": hd ** -0.5, "alibi_slopes": alibi_slopes(h)}
    notes = [f"alibi_slopes: the paper's slopes for {h} heads (BLOOM's _get_alibi_slopes), added before "
             f"the softmax to the scaled scores (baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(D)))"]
    return dict(variant="alibi", params=params, inputs=_qkv_inputs(config, hd), notes=notes)


def build(config, layer_idx):
    import importlib
    return importlib.import_module(MODULE).BloomAttention(config, layer_idx)


def alibi_input(slopes, keep, b, s):
    """BLOOM's ``alibi`` argument ``(B * H, 1, S)``: ``slope_h * p_j`` in float64."""
    import torch
    p = I.alibi_positions(keep, b, s)
    return torch.tensor((slopes[None, :, None] * p[:, None, :]).reshape(b * len(slopes), 1, s))


def run(m, spec_, x, keep, pos, *, grad, seed, float64, log, positions_given):
    import contextlib
    import importlib

    import torch
    from ..check import Run, _dout, hf_mask
    from ..float64 import float64_casts

    I.contiguous_tokens(keep, "BLOOM")
    b, s, _ = x.shape
    slopes = spec_.params["alibi_slopes"]
    mask = hf_mask(m.config, x, keep, False)
    qkv, outs = [], []
    casts = float64_casts(log) if float64 else contextlib.nullcontext()
    with casts, torch.enable_grad(), I.wrapped(m, "_reshape", qkv), I.wrapped(m, "_merge_heads", outs):
        m(x, torch.zeros_like(x), alibi_input(slopes, keep, b, s), mask)
    q, k, v = qkv[0]  # (B, H, S, D) each
    h = m.num_heads
    actual = {"out": I.heads_out(outs[0], h)}
    params = dict(spec_.params)
    if keep is not None:
        params["mask"] = keep[:, None, None, :]
    dout, grad_map = None, {}
    if grad:
        dout = _dout(actual["out"].shape, seed, keep)
        g = I.run_grads(outs[0], {"dq": q, "dk": k, "dv": v}, dout, h)
        actual.update(g)
        grad_map = {"dq": "q", "dk": "k", "dv": "v"}
    warnings = []
    theirs = importlib.import_module(MODULE)._get_alibi_slopes(h, "cpu")
    diff = float(np.max(np.abs(I.np64(theirs) - slopes)))
    if diff > 0:
        warnings.append(quirk("alibi_slopes_lowp", model="BLOOM _get_alibi_slopes", dtype="float32",
                              diff=f"{diff:.1e}"))
    inputs = {"q": I.np64(q), "k": I.np64(k), "v": I.np64(v)}
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map, warnings=warnings)


register_family("bloom", ("bloom",), spec, "hook:bloom")

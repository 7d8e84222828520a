"""MPT (``MptAttention``, inline attention): ALiBi from MPT's own slope formula.

Spec: ``alibi`` with MPT's slopes ``1 / 2 ** (k * alibi_bias_max / n2)`` for ``k = 1 .. n2`` (``n2`` the
next power of two; for other head counts the odd then even entries, the first ``n_heads``), with
``alibi_bias_max = 8`` -- HF's MptModel calls ``build_mpt_alibi_tensor`` without the config's value --,
``scale = attn_config.softmax_scale`` or ``1/sqrt(head_dim)``, causal. MPT's position bias
``slope_h * (j - (S - 1))`` is refattn's ALiBi shifted by a constant per row under the causal mask.
Config options HF's MPT does not implement (``attn_config.alibi=False``, ``qk_ln``, ``prefix_lm``, an
``alibi_bias_max`` other than 8) are warned about: the spec follows the code.

Hook: the output of ``Wqkv`` (clamped to ``clip_qkv`` as the module does), the input of ``out_proj``.
The module gets refattn's float64 ``position_bias`` and the boolean mask MptModel builds.
"""

from __future__ import annotations

import math

import numpy as np

from ..spec import quirk, register_family
from . import _inline as I

MODULE = "transformers.models.mpt.modeling_mpt"


def mpt_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> np.ndarray:
    """MPT's ALiBi slopes in float64 (``build_mpt_alibi_tensor``'s formula)."""
    n2 = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / 2.0 ** (np.arange(1, n2 + 1) * (alibi_bias_max / n2))
    if n2 != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def spec(config, layer_idx, model_type):
    h = int(config.n_heads)
    hd = int(config.d_model // h)
    ac = config.attn_config
    scale = ac.softmax_scale if ac.softmax_scale is not None else 1 / math.sqrt(config.d_model / h)
    params = {"causal": True, "scale": float(scale), "alibi_slopes": mpt_slopes(h)}
    notes = ["alibi_slopes: MPT's formula with alibi_bias_max=8 (HF's MptModel does not pass the config's)"]
    warnings = []
    for name, bad, what in (("alibi", not ac.alibi, "False"), ("qk_ln", ac.qk_ln, "True"),
                            ("prefix_lm", ac.prefix_lm, "True"),
                            ("alibi_bias_max", ac.alibi_bias_max != 8, str(ac.alibi_bias_max))):
        if bad:
            warnings.append(quirk("mpt_ignored", option=name, value=what))
    inputs = {"q": f"(B, {h}, S, {hd})", "k": f"(B, {h}, S, {hd})", "v": f"(B, {h}, S, {hd})"}
    return dict(variant="alibi", params=params, inputs=inputs, notes=notes, warnings=warnings)


def build(config, layer_idx):
    import importlib
    return importlib.import_module(MODULE).MptAttention(config, layer_idx)


def run(m, spec_, x, keep, pos, *, grad, seed, float64, log, positions_given):
    import contextlib

    import torch
    from ..check import Run, _dout, hf_mask
    from ..float64 import float64_casts
    b, s, _ = x.shape
    h, hd = m.n_heads, m.head_dim
    slopes = spec_.params["alibi_slopes"]
    bias = torch.tensor(slopes[:, None, None] * (np.arange(s) - (s - 1))[None, None, :])  # (H, 1, S)
    mask = hf_mask(m.config, x, keep, False).to(torch.bool)  # True = hidden, as MptModel passes it
    mixed, outs = [], []

    def keep_qkv(mod, args, out):
        if m.clip_qkv:
            out = out.clamp(min=-m.clip_qkv, max=m.clip_qkv)
        mixed.append(out)
        return out

    casts = float64_casts(log) if float64 else contextlib.nullcontext()
    handle = m.Wqkv.register_forward_hook(keep_qkv)
    try:
        with casts, torch.enable_grad(), I.input_of(m.out_proj, outs):
            m(x, bias, attention_mask=mask)
    finally:
        handle.remove()
    qkv = mixed[0]
    q, k, v = (t.reshape(b, s, h, hd).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    actual = {"out": I.heads_out(outs[0], h)}
    params = dict(spec_.params)
    if keep is not None:
        params["mask"] = keep[:, None, None, :]
    dout, grad_map = None, {}
    if grad:
        dout = _dout(actual["out"].shape, seed, keep)
        g = I.run_grads(outs[0], {"dqkv": qkv}, dout, h)["dqkv"]
        dq, dk, dv = (a.reshape(b, s, h, hd).transpose(0, 2, 1, 3) for a in np.split(g, 3, axis=2))
        actual.update(dq=dq, dk=dk, dv=dv)
        grad_map = {"dq": "q", "dk": "k", "dv": "v"}
    inputs = {"q": I.np64(q), "k": I.np64(k), "v": I.np64(v)}
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map)


register_family("mpt", ("mpt",), spec, "hook:mpt")

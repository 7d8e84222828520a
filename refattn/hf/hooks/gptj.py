"""GPT-J (``GPTJAttention``, inline attention): interleaved RoPE on the first ``rotary_dim`` dims.

Spec: ``rope`` with ``style="gptj"`` (``rotate_every_two`` pairs ``(2i, 2i+1)``), ``rotary_dim`` from
the config, base 10000 (hard-coded in ``create_sinusoidal_positions``), ``scale = 1/sqrt(head_dim)``
(``attn_weights / scale_attn``), causal. Hook: ``_split_heads`` (q and k before RoPE, v), the input
of ``out_proj`` (the attention output). The module's ``embed_positions`` buffer (float32 sinusoids)
is replaced on the float64 copy by the float64 table ``[sin | cos]``.
"""

from __future__ import annotations

import numpy as np

from ...errors import ParameterError
from ..spec import _qkv_inputs, register_family
from . import _inline as I

MODULE = "transformers.models.gptj.modeling_gptj"


def spec(config, layer_idx, model_type):
    hd = int(config.n_embd // config.n_head)
    rd = config.rotary_dim
    if rd is None:
        raise ParameterError("config.rotary_dim: None is not supported for gptj (HF builds sin/cos tables of "
                             "width hidden_size then, which fits a single head only)")
    params = {"causal": True, "scale": hd ** -0.5, "base": 10000.0, "style": "gptj",
              "max_position_embeddings": int(config.n_positions)}
    notes = ["GPT-J rotates interleaved pairs (rotate_every_two): style='gptj'; base 10000 is fixed in HF"]
    if rd != hd:
        params["rotary_dim"] = int(rd)
        notes.append(f"rotary_dim = config.rotary_dim = {rd} of head_dim {hd}")
    return dict(variant="rope", params=params, inputs=_qkv_inputs(config, hd), notes=notes)


def build(config, layer_idx):
    import importlib
    return importlib.import_module(MODULE).GPTJAttention(config, layer_idx)


def _table(spec_, config, n):
    """``embed_positions`` in float64: ``[sin | cos]`` of ``p * inv_freq`` for ``p < n``."""
    import torch
    from ...position import rope_frequencies
    inv, _ = rope_frequencies(int(config.rotary_dim), base=10000.0)
    ang = np.arange(n)[:, None] * inv
    return torch.tensor(np.concatenate([np.sin(ang), np.cos(ang)], axis=1))


def run(m, spec_, x, keep, pos, *, grad, seed, float64, log, positions_given):
    import torch
    from ..check import Run, _dout, hf_mask
    from ..float64 import float64_casts
    import contextlib

    m.embed_positions = _table(spec_, m.config, max(int(m.config.n_positions), int(pos.max()) + 1))
    mask = hf_mask(m.config, x, keep, False)
    split, outs = [], []
    casts = float64_casts(log) if float64 else contextlib.nullcontext()
    with casts, torch.enable_grad(), I.wrapped(m, "_split_heads", split), I.input_of(m.out_proj, outs):
        m(x, attention_mask=mask, position_ids=torch.tensor(pos))
    q, k, v = split  # (B, S, H, D), (B, S, H, D), (B, H, S, D)
    h = m.num_attention_heads
    actual = {"out": I.heads_out(outs[0], h)}
    params = dict(spec_.params)
    if keep is not None:
        params["mask"] = keep[:, None, None, :]
    if positions_given:
        params["q_positions"] = params["k_positions"] = pos
    dout, grad_map = None, {}
    if grad:
        dout = _dout(actual["out"].shape, seed, keep)
        g = I.run_grads(outs[0], {"dq": q, "dk": k, "dv": v}, dout, h)
        actual.update(dq=g["dq"].transpose(0, 2, 1, 3), dk=g["dk"].transpose(0, 2, 1, 3), dv=g["dv"])
        grad_map = {"dq": "q", "dk": "k", "dv": "v"}
    inputs = {"q": I.np64(q).transpose(0, 2, 1, 3), "k": I.np64(k).transpose(0, 2, 1, 3), "v": I.np64(v)}
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map)


register_family("gptj", ("gptj",), spec, "hook:gptj")

"""BigBird (``BigBirdBlockSparseAttention``, inline block-sparse attention, ``attention_type=
"block_sparse"``).

Spec: ``bigbird`` with the config's ``block_size``, ``num_random_blocks`` and
``max_position_embeddings``, ``scale = 1/sqrt(head_dim)``, the random blocks ``rand_attn`` captured
from the module (HF draws them per call), ``duplicates="hf"`` (a block HF's older generator names
twice counts twice, as in HF). HF draws random blocks only in training mode -- in eval mode its table
is all zeros, a quirk warned about -- so the float64 copy runs in training mode with its dropout
off. Lengths must be a multiple of ``block_size`` and above ``(5 + 2r) * block_size`` (below it
BigBirdModel switches to full attention); padding is refused.

Hook: the outputs of ``query``, ``key``, ``value``, the indices given to ``torch_gather_b2`` (the
random blocks used), the module's output (it has no output projection).
"""

from __future__ import annotations

import numpy as np

from ...errors import ParameterError, ShapeError
from ..spec import quirk, register_family
from . import _inline as I

MODULE = "transformers.models.big_bird.modeling_big_bird"


def spec(config, layer_idx, model_type):
    if config.attention_type != "block_sparse":
        raise ParameterError(f"config.attention_type: {config.attention_type!r} is not supported for big_bird "
                             f"(block_sparse is)")
    h = int(config.num_attention_heads)
    hd = int(config.hidden_size // h)
    params = {"block_size": int(config.block_size), "num_random_blocks": int(config.num_random_blocks),
              "max_position_embeddings": int(config.max_position_embeddings), "scale": hd ** -0.5,
              "duplicates": "hf"}
    inputs = {n: f"(B, {h}, S, {hd})" for n in "qkv"}
    return dict(variant="bigbird", params=params, inputs=inputs,
                module_params={"rand_attn": "the random blocks HF draws (captured at torch_gather_b2)"},
                notes=["duplicates='hf': a block named twice by HF's older generator counts twice, as in HF"])


def build(config, layer_idx):
    import importlib
    return importlib.import_module(MODULE).BigBirdBlockSparseAttention(config, seed=layer_idx)


def run(m, spec_, x, keep, pos, *, grad, seed, float64, log, positions_given):
    import contextlib
    import importlib

    import torch
    from ..check import Run, _dout
    from ..float64 import float64_casts
    b, s, _ = x.shape
    bs, r = spec_.params["block_size"], spec_.params["num_random_blocks"]
    if keep is not None and not keep.all():
        raise ParameterError("attention_mask: padding is not supported for big_bird; give whole sequences")
    if s % bs or s <= (5 + 2 * r) * bs:
        raise ShapeError(f"hidden_states: BigBird's block-sparse attention needs S a multiple of block_size "
                         f"{bs} and S > (5 + 2r) * block_size = {(5 + 2 * r) * bs} (BigBirdModel uses full "
                         f"attention below), got S={s}")
    warnings = []
    if not m.training:
        warnings.append(quirk("bigbird_eval_table"))
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.eval()
    model = importlib.import_module(MODULE).BigBirdModel
    ones = torch.ones(b, s, dtype=torch.float64)
    blocked, band, from_mask, to_mask = model.create_masks_for_block_sparse_attn(ones, bs)
    caught, tables = {}, []
    orig = m.torch_gather_b2

    def spy(params, indices):
        tables.append(indices.clone())
        return orig(params, indices)

    def hook(name):
        def keep_first(mod, args, out):
            caught.setdefault(name, out)
        return keep_first

    handles = [getattr(m, n).register_forward_hook(hook(n)) for n in ("query", "key", "value")]
    m.torch_gather_b2 = spy
    casts = float64_casts(log) if float64 else contextlib.nullcontext()
    try:
        with casts, torch.enable_grad():
            out = m(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                    to_blocked_mask=blocked)[0]
    finally:
        for h_ in handles:
            h_.remove()
        del m.torch_gather_b2
    h = m.num_attention_heads
    table = I.np64(tables[0][0]).astype(np.int64)  # (H, nb - 2, r), the same for every batch entry
    if not all(bool((t == tables[0][:1]).all()) for t in tables):
        raise ParameterError("module: BigBird drew different random blocks per batch entry; refattn's "
                             "rand_attn is one table for the batch")
    actual = {"out": I.heads_out(out, h)}
    params = dict(spec_.params, rand_attn=table)
    dout, grad_map = None, {}
    q, k, v = (caught[n] for n in ("query", "key", "value"))
    if grad:
        dout = _dout(actual["out"].shape, seed, None)
        g = I.run_grads(out, {"dq": q, "dk": k, "dv": v}, dout, h)
        for n, a in g.items():
            actual[n] = a.reshape(b, s, h, -1).transpose(0, 2, 1, 3)
        grad_map = {"dq": "q", "dk": "k", "dv": "v"}
    inputs = {n: I.np64(t).reshape(b, s, h, -1).transpose(0, 2, 1, 3) for n, t in zip("qkv", (q, k, v))}
    return Run(actual=actual, inputs=inputs, params=params, dout=dout, grad_map=grad_map, warnings=warnings)


register_family("big_bird", ("big_bird",), spec, "hook:big_bird")

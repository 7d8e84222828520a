"""Golden cases of the moe and block families (VARIANTS F, G): the router ``moe_topk`` with each
preset and option, the layer ``moe_layer`` (gradients pinned, routing held fixed), and the pre-norm
``block`` (gradients pinned). ``attention_params`` are stored as JSON text (params hold JSON scalars
only). The makers below draw the families' optional arrays from the case's generator; their shapes
follow the variants' examples: ``E = refattn.moe.num_experts_for(shape, params)`` experts over
``d = D`` features for moe, ``d = Hq·D`` and an FFN of width ``2d`` for the block.
"""

from __future__ import annotations

import json
import math

from refattn.golden.cases import Case

#: (B, Hq, Sq, Sk, D, Hkv): 2 x 12 = 24 tokens of 8 features, E = 2·Hq = 8 experts
MOE_SHAPE = (2, 4, 12, 12, 8, 4)
#: 2 sequences of 5 tokens, d = 4·4 = 16, GQA 4 / 2
BLOCK_SHAPE = (2, 4, 5, 5, 4, 2)


def _c(name, variant, doc, shape=MOE_SHAPE, arrays=None, grads=False, **params):
    seed = sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % 2 ** 31
    return Case(name=name, variant=variant, shape=shape, seed=seed, params=params,
                arrays=dict(arrays or {}), grads=grads, doc=doc)


def _experts(shape, params):
    from refattn.moe import num_experts_for
    return num_experts_for(shape, params)


def _per_expert(scale):
    return lambda shape, rng, params: rng.standard_normal(_experts(shape, params)) * scale


def _shared(shape, rng, params):
    """One shared expert of width f_s = d: ``(d, f_s)`` for gate and up, ``(f_s, d)`` for down."""
    d = shape[4]
    return rng.standard_normal((d, d)) / math.sqrt(d)


def _block_width(shape):
    return shape[1] * shape[4]


MAKERS = {
    ("selection_bias", "random"): _per_expert(0.1),
    ("router_bias", "random"): _per_expert(0.1),
    ("shared_w_gate", "random"): _shared,
    ("shared_w_up", "random"): _shared,
    ("shared_w_down", "random"): _shared,
    ("w_gate", "random"): lambda shape, rng, params: rng.standard_normal(
        (_block_width(shape), 2 * _block_width(shape))) / math.sqrt(_block_width(shape)),
    ("attn_norm", "random"): lambda shape, rng, params: 1 + 0.1 * rng.standard_normal(_block_width(shape)),
    ("ffn_norm", "random"): lambda shape, rng, params: 1 + 0.1 * rng.standard_normal(_block_width(shape)),
    ("attn_norm_bias", "random"): lambda shape, rng, params: 0.1 * rng.standard_normal(_block_width(shape)),
    ("ffn_norm_bias", "random"): lambda shape, rng, params: 0.1 * rng.standard_normal(_block_width(shape)),
}


def _j(**params):
    return json.dumps(params, sort_keys=True)


CASES = (
    _c("moe_topk_default", "moe_topk", "top-2 of a softmax, no renormalisation, no capacity"),
    _c("moe_topk_switch_capacity", "moe_topk", "switch preset (top-1) with capacity factor 1.0: "
       "overflow dropped in token order", preset="switch", capacity_factor=1.0),
    _c("moe_topk_mixtral_choice_order", "moe_topk", "mixtral preset, capacity factor 1.25 filled "
       "GShard-style (every first choice before any second), HF's aux-loss form",
       preset="mixtral", capacity_factor=1.25, drop_policy="choice_order", aux_loss_form="hf_mixtral"),
    _c("moe_topk_deepseek_v3", "moe_topk", "deepseek_v3 preset at 8 experts: sigmoid, top-4 within "
       "the 2 best of 4 groups, selection bias, renormalised, times 2.5",
       arrays={"selection_bias": "random"}, preset="deepseek_v3", k=4, n_group=4, topk_group=2),
    _c("moe_topk_options", "moe_topk", "top-3, logits bias, select on logits then softmax over the "
       "3, scaling 0.5, expert capacity 7", arrays={"router_bias": "random"}, k=3,
       order="topk_then_softmax", routed_scaling_factor=0.5, expert_capacity=7),
    _c("moe_layer_mixtral", "moe_layer", "Mixtral layer: top-2 SwiGLU experts (gradients pinned)",
       preset="mixtral", grads=True),
    _c("moe_layer_capacity", "moe_layer", "top-2 with capacity factor 1.0 (some tokens dropped), "
       "renormalised (gradients pinned)", k=2, normalize="topk", capacity_factor=1.0, grads=True),
    _c("moe_layer_deepseek_v3_shared", "moe_layer", "DeepSeek-V3 layer: sigmoid group-limited "
       "routing with bias and a shared SwiGLU expert (gradients pinned)",
       arrays={"selection_bias": "random", "shared_w_gate": "random", "shared_w_up": "random",
               "shared_w_down": "random"},
       preset="deepseek_v3", k=4, n_group=4, topk_group=2, grads=True),
    _c("block_rope_swiglu", "block", "Llama-style block: RMSNorm, causal RoPE GQA 4/2, SwiGLU "
       "(gradients pinned, norm weights included)", shape=BLOCK_SHAPE,
       arrays={"w_gate": "random", "attn_norm": "random", "ffn_norm": "random"},
       attention="rope", attention_params=_j(causal=True, base=10000.0), eps=1e-5, grads=True),
    _c("block_layernorm_gelu", "block", "GPT-style block: LayerNorm with biases, causal sdpa, GELU "
       "FFN (gradients pinned)", shape=BLOCK_SHAPE,
       arrays={"attn_norm": "random", "ffn_norm": "random", "attn_norm_bias": "random",
               "ffn_norm_bias": "random"},
       attention="sdpa", attention_params=_j(causal=True), norm="layer", eps=1e-5, activation="gelu",
       grads=True),
)

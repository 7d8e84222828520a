"""Golden cases of the position family (VARIANTS B): rope (every scaling kind), alibi, t5,
transformer_xl, nope. Scaling dicts are stored as JSON text (params hold JSON scalars only)."""

from __future__ import annotations

import json

from refattn.golden.cases import Case


def _c(name, variant, doc, shape=(1, 4, 6, 9, 8, 2), grads=False, **params):
    seed = sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % 2 ** 31
    return Case(name=name, variant=variant, shape=shape, seed=seed, params=params, grads=grads, doc=doc)


def _j(**scaling):
    return json.dumps(scaling, sort_keys=True)


CASES = (
    _c("position_rope_neox_causal", "rope", "RoPE neox pairing, causal bottom-right, Sq < Sk", causal=True,
       grads=True),
    _c("position_rope_gptj_partial", "rope", "RoPE gptj pairing on the first 4 of 8 dims, base 500",
       rotary_dim=4, style="gptj", base=500.0, causal=True, grads=True),
    _c("position_rope_linear", "rope", "linear scaling factor 4 (v4 spelling)",
       scaling=_j(type="linear", factor=4.0)),
    _c("position_rope_dynamic", "rope", "dynamic NTK past max_position_embeddings=4 (Sk=9)",
       scaling=_j(rope_type="dynamic", factor=2.0), max_position_embeddings=4, causal=True),
    _c("position_rope_yarn", "rope", "yarn factor 4 from 4 to 16 positions, attention factor on cos/sin",
       scaling=_j(rope_type="yarn", factor=4.0, original_max_position_embeddings=4, rope_theta=10000.0),
       max_position_embeddings=16, causal=True, grads=True),
    _c("position_rope_llama3", "rope", "llama3 band scaling (theta 500000 in the v5 dict)",
       scaling=_j(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8, rope_theta=500000.0), causal=True),
    _c("position_rope_longrope", "rope", "longrope: long factors because Sk=9 > original 4",
       scaling=_j(rope_type="longrope", original_max_position_embeddings=4, factor=2.0,
                  short_factor=[1.0, 1.1, 1.3, 1.7], long_factor=[1.0, 2.0, 4.0, 8.0]),
       max_position_embeddings=8, causal=True),
    _c("position_rope_proportional", "rope", "proportional (Gemma-style): half the angles rotate",
       scaling=_j(rope_type="proportional", partial_rotary_factor=0.5, rope_theta=1e6)),
    _c("position_alibi_6_heads", "alibi", "paper slopes for 6 heads (not a power of two), causal",
       shape=(2, 6, 5, 7, 8, 3), causal=True, grads=True),
    _c("position_alibi_flash_form", "alibi", "flash-attn's +slope*j form (LSE shifted)",
       shape=(1, 4, 5, 7, 8, 4), causal=True, alibi_form="flash"),
    _c("position_t5_encoder", "t5", "T5 bidirectional buckets, 8 buckets up to distance 12, Sk=20",
       shape=(1, 2, 20, 20, 8, 2), num_buckets=8, max_distance=12, grads=True),
    _c("position_t5_decoder", "t5", "T5 decoder: unidirectional buckets, causal, after a cache",
       shape=(1, 2, 6, 20, 8, 2), num_buckets=8, max_distance=12, bidirectional=False, causal=True,
       grads=True),
    _c("position_txl_shift", "transformer_xl", "Transformer-XL, memory 3 + segment 6, rel-shift form",
       shape=(2, 2, 6, 9, 8, 2), grads=True),
    _c("position_txl_direct", "transformer_xl", "Transformer-XL, the same through the direct lookup",
       shape=(2, 2, 6, 9, 8, 2), form="direct"),
    _c("position_nope", "nope", "no position encoding (sdpa), causal", causal=True, grads=True),
)

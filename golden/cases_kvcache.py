"""Golden cases of the kvcache family (VARIANTS C): decode, paged, mla, cascade, ring,
expected_attention. ``cache_seqlens`` for decode is made from the seed by the maker below."""

from __future__ import annotations

import numpy as np

from refattn.golden.cases import Case


def _c(name, variant, doc, shape=(2, 4, 3, 11, 8, 2), arrays=None, grads=False, **params):
    seed = sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % 2 ** 31
    return Case(name=name, variant=variant, shape=shape, seed=seed, params=params,
                arrays=dict(arrays or {}), grads=grads, doc=doc)


def _seqlens(shape, rng, params):
    """Cached lengths in [Sq, Sk], the first one full."""
    b, hq, sq, sk, d, hkv = shape
    lens = rng.integers(sq, sk + 1, size=b)
    lens[0] = sk
    return lens


def _mla_weight(name):
    """A maker of an MLA query/norm weight with the example's widths (d_q = d_c + 2 for q-LoRA)."""
    def make(shape, rng, params):
        from refattn.variants.kvcache import mla_example_dims
        b, hq, sq, sk, d, hkv = shape
        d_nope, d_rope, d_c, d_model = mla_example_dims(d)
        d_q, d_qk = d_c + 2, d_nope + d_rope
        if name in ("kv_norm", "q_norm"):
            return 1.0 + 0.1 * rng.standard_normal(d_c if name == "kv_norm" else d_q)
        fan_in, size = {"w_q": (d_model, (d_model, hq, d_qk)), "w_dq": (d_model, (d_model, d_q)),
                        "w_uq": (d_q, (d_q, hq, d_qk))}[name]
        return rng.standard_normal(size) / fan_in ** 0.5
    return make


def _padding(shape, rng, params):
    """Key padding (B, 1, 1, Sk): the first 1..2 keys of every sequence but the first are padding."""
    b, hq, sq, sk, d, hkv = shape
    keep = np.ones((b, 1, 1, sk), dtype=bool)
    for i in range(1, b):
        keep[i, ..., :int(rng.integers(1, 3))] = False
    return keep


MAKERS = {("cache_seqlens", "random"): _seqlens, ("mask", "padding"): _padding,
          **{(n, "random"): _mla_weight(n) for n in ("kv_norm", "q_norm", "w_q", "w_dq", "w_uq")}}

#: DeepSeek-V3's rope: YaRN with mscale = mscale_all_dim (scaled down to a tiny original length)
_DSV3_YARN = ('{"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4, '
              '"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}')

CASES = (
    _c("kvcache_decode_one_token", "decode", "one new token per sequence against a full cache",
       shape=(3, 4, 1, 9, 8, 1)),
    _c("kvcache_decode_seqlens", "decode", "three new tokens, per-sequence cache lengths",
       arrays={"cache_seqlens": "random"}, grads=True),
    _c("kvcache_decode_window", "decode", "vLLM sliding window of 4 tokens, per-sequence lengths",
       arrays={"cache_seqlens": "random"}, sliding_window=4, grads=True),
    _c("kvcache_paged_bs4", "paged", "pages of 4, shuffled pool, -1 padding in the table", grads=True),
    _c("kvcache_paged_bs1", "paged", "pages of 1 token", block_size=1, shape=(2, 2, 2, 7, 8, 2)),
    _c("kvcache_paged_window", "paged", "pages of 3 with a sliding window of 5", block_size=3,
       sliding_window=5),
    _c("kvcache_mla_naive", "mla", "MLA, naive form, causal", shape=(2, 4, 4, 7, 16, 4), form="naive",
       causal=True),
    _c("kvcache_mla_absorbed", "mla", "MLA, absorbed form, causal", shape=(2, 4, 4, 7, 16, 4),
       form="absorbed", causal=True),
    _c("kvcache_mla_deepseek_v3", "mla", "MLA as DeepSeek-V3: latent RMSNorm, q-LoRA with its RMSNorm, "
       "YaRN (mscale in the softmax scale and on cos/sin), interleaved pairs, causal, absorbed form",
       shape=(2, 4, 4, 7, 16, 4), form="absorbed", causal=True, q_input="hidden", style="gptj",
       scaling=_DSV3_YARN, arrays={"kv_norm": "random", "q_norm": "random", "w_dq": "random",
                                   "w_uq": "random"}, grads=True),
    _c("kvcache_mla_v2_lite_padding", "mla", "MLA as DeepSeek-V2-Lite (no q-LoRA: w_q), latent "
       "RMSNorm, key padding, causal, naive form", shape=(3, 2, 3, 6, 16, 2), form="naive", causal=True,
       q_input="hidden", arrays={"kv_norm": "random", "w_q": "random", "mask": "padding"}, grads=True),
    _c("kvcache_cascade", "cascade", "shared prefix + per-request suffix, GQA 4/2", grads=True),
    _c("kvcache_ring_p3_zigzag_causal", "ring", "3 devices, zig-zag, causal, Sq = Sk = 13",
       shape=(1, 4, 13, 13, 8, 2), num_devices=3, causal=True, grads=True),
    _c("kvcache_ring_p4_contiguous", "ring", "4 devices, contiguous shards, not causal, Sq < Sk",
       shape=(2, 2, 5, 11, 8, 2), num_devices=4, sharding="contiguous"),
    _c("kvcache_expected_attention", "expected_attention", "drop 40% of keys by expected attention",
       shape=(2, 4, 3, 10, 8, 2), ratio=0.4),
    _c("kvcache_expected_attention_kvpress", "expected_attention", "kvpress settings: RoPE-averaged "
       "statistics over 16 future positions, 2 sinks, ||v|| weighting, causal", shape=(1, 4, 4, 12, 8, 2),
       ratio=0.5, future_positions=16, n_sink=2, use_vnorm=True, causal=True),
)

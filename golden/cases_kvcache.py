"""Golden cases of the kvcache family (VARIANTS C): decode, paged, mla, cascade, ring,
expected_attention. ``cache_seqlens`` for decode is made from the seed by the maker below."""

from __future__ import annotations

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


MAKERS = {("cache_seqlens", "random"): _seqlens}

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

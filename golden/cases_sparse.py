"""Golden cases of the sparse family (VARIANTS section D): one or more per sparse variant.

Shapes are small but every case is truly sparse (BigBird: ``L > (5 + 2r) b``). Array parameters are
made by the :data:`MAKERS` below from the case's generator.
"""

from __future__ import annotations

from .cases import Case

SHAPE = (2, 4, 24, 24, 8, 2)


def _global_mask(shape, rng, params):
    b, hq, sq, sk, d, hkv = shape
    g = rng.random((b, sk)) < 0.1
    g[:, 0] = True
    return g


def _proj(which):
    def make(shape, rng, params):
        b, hq, sq, sk, d, hkv = shape
        return rng.standard_normal((b, hq if which == "q" else hkv, sq if which == "q" else sk, d))
    return make


def _rand_attn_repeats(shape, rng, params):
    """A BigBird table that names window and global blocks (HF's older generator does this)."""
    b, hq, sq, sk, d, hkv = shape
    nb = sq // params["block_size"]
    r = params["num_random_blocks"]
    t = rng.integers(0, nb, (hq, nb - 2, r))
    t[:, 0, 0] = 0        # a global block again
    t[:, 2, 0] = 3        # block row 3's own block again
    return t


def _block_mask(shape, rng, params):
    b, hq, sq, sk, d, hkv = shape
    bs = params["block_size"]
    return rng.random((hq, -(-sq // bs), -(-sk // bs))) < 0.5


MAKERS = {
    ("global_mask", "random"): _global_mask,
    ("q_global", "random"): _proj("q"),
    ("k_global", "random"): _proj("k"),
    ("v_global", "random"): _proj("v"),
    ("rand_attn", "repeats"): _rand_attn_repeats,
    ("block_mask", "random"): _block_mask,
    ("gates", "random"): lambda shape, rng, params: rng.uniform(0.05, 0.95, shape[:3] + (3,)),
    ("w_q", "random"): lambda shape, rng, params: rng.standard_normal((shape[4], 4)),
    ("w_k", "random"): lambda shape, rng, params: rng.standard_normal((3 * shape[4], 4)),
}


def _c(name, variant, doc, *, seed, shape=SHAPE, grads=True, arrays=None, **params):
    return Case(name=f"sparse_{name}", variant=variant, shape=shape, seed=seed, params=params,
                arrays=arrays or {}, grads=grads, doc=doc)


CASES = (
    _c("sliding_window_causal", "sliding_window", "causal window of 5 incl. self", seed=1,
       window=(4, 0)),
    _c("sliding_window_sym_tl", "sliding_window", "symmetric window, top-left, Sq < Sk",
       shape=(1, 2, 10, 16, 8, 2), seed=2, window=3, alignment="top_left"),
    _c("dilated", "dilated", "dilation 3, steps (2, 1)", seed=3, steps=(2, 1), dilation=3),
    _c("dilated_per_head", "dilated", "one dilation per head", seed=4, steps=(3, 3),
       dilation=(1, 2, 3, 4)),
    _c("strided_union", "strided", "Sparse Transformer strided, A | B", seed=5, stride=4),
    _c("strided_heads", "strided", "Sparse Transformer strided, heads alternate", seed=6, stride=5,
       mode="heads"),
    _c("fixed", "fixed", "Sparse Transformer fixed, block 6, 2 summary columns", seed=7, block=6, c=2),
    _c("fixed_bidirectional", "fixed", "fixed pattern without causal", seed=8, block=4, c=1,
       causal=False),
    _c("global", "global", "global tokens alone", seed=9, tokens=(0, 7, 23)),
    _c("random_keys", "random", "3 random keys per row", seed=10, r=3),
    _c("random_blocks", "random", "2 random 4x4 blocks per block row", seed=11, r=2, block=4),
    _c("hybrid", "hybrid", "window 2 | global {0, 12} (inside windows)", seed=12, local=2,
       tokens=(0, 12)),
    _c("streaming", "streaming", "2 sinks + 6 recent", seed=13, n_sink=2, recent=6),
    _c("longformer", "longformer", "HF window 6 (w = 3), global mask per batch, projections",
       seed=14, attention_window=6,
       arrays={"global_mask": "random", "q_global": "random", "k_global": "random",
               "v_global": "random"}),
    _c("longformer_dilated", "longformer", "one-sided 2, dilation per head, shared projections",
       seed=15, attention_window=2, one_sided=True, dilation=(1, 2, 1, 3), global_tokens=(5,)),
    _c("bigbird", "bigbird", "b=4, r=1, L=32: our generator", shape=(2, 4, 32, 32, 8, 2),
       seed=16, block_size=4, num_random_blocks=1),
    _c("bigbird_hf_generator", "bigbird", "HF's per-head generator, seed 3",
       shape=(1, 2, 48, 48, 8, 2), seed=17, block_size=4, num_random_blocks=2, generator="hf",
       duplicates="hf"),
    _c("bigbird_duplicates_hf", "bigbird", "table with repeated blocks, counted twice as HF",
       shape=(1, 2, 32, 32, 8, 2), seed=18, block_size=4, num_random_blocks=1, duplicates="hf",
       arrays={"rand_attn": "repeats"}),
    _c("bigbird_pad", "bigbird", "L=30 not a multiple of b=4, pad=True (ragged last block)",
       shape=(1, 2, 30, 30, 8, 2), seed=19, block_size=4, num_random_blocks=1, pad=True),
    _c("block_sparse_mask", "block_sparse", "explicit per-head block mask", seed=20, block_size=4,
       arrays={"block_mask": "random"}),
    _c("block_sparse_topk", "block_sparse", "top-2 blocks of pooled scores, causal", seed=21,
       block_size=4, topk=2, causal=True),
    _c("block_sparse_threshold", "block_sparse", "pooled-probability threshold 0.2", seed=22,
       block_size=4, select="threshold", tau=0.2),
    _c("seer", "seer", "AttnGate with given maps, top-2, causal", seed=23, block_size=4, topk=2,
       causal=True, arrays={"w_q": "random", "w_k": "random"}),
    _c("nsa", "nsa", "l=4, d=2, l'=4, n=3, window 4, given gates", shape=(1, 4, 24, 24, 8, 2),
       seed=24, grads=False, cmp_block=4, cmp_stride=2, sel_block=4, n_select=3, recent=4,
       arrays={"gates": "random"}),
    # longer than one tile of the compiled backends (64 x 64): several tiles, partial last ones,
    # Sq != Sk where the variant allows it
    _c("sliding_window_long", "sliding_window", "window (40, 0) over 150 x 200: spans tiles",
       shape=(1, 2, 150, 200, 8, 1), seed=25, window=(40, 0)),
    _c("dilated_long", "dilated", "dilation 3, steps (10, 10), 170 tokens", shape=(1, 2, 170, 170, 8, 2),
       seed=26, steps=(10, 10), dilation=3),
    _c("streaming_long", "streaming", "4 sinks + 40 recent over 130 x 180", shape=(1, 2, 130, 180, 8, 1),
       seed=27, n_sink=4, recent=40),
    _c("longformer_long", "longformer", "HF window 32 (w = 16), global tokens 0 and 100, 192 tokens",
       shape=(1, 2, 192, 192, 8, 2), seed=28, attention_window=32, global_tokens=(0, 100)),
    _c("bigbird_long", "bigbird", "b=16, r=2, L=256: block-sparse over four 64-tiles",
       shape=(1, 2, 256, 256, 8, 2), seed=29, block_size=16, num_random_blocks=2),
    _c("block_sparse_long", "block_sparse", "top-3 of 32-blocks, causal, 160 x 200",
       shape=(1, 2, 160, 200, 8, 2), seed=30, block_size=32, topk=3, causal=True),
)

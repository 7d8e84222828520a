"""BigBird against HF transformers' ``BigBirdBlockSparseAttention`` in float64.

A tiny randomly initialised config (no weights are downloaded), training mode (HF draws random blocks
only in training; eval gives an all-zero table), dropout 0. HF's table is captured by wrapping its
``torch_gather_b2`` (it receives exactly the ``(B, H, nb-2, r)`` indices used) and passed to refattn as
``rand_attn`` with ``duplicates="hf"``; with ``generator="hf"`` refattn must reproduce the same table
from the seed alone. Lengths cover both HF generators: the per-head one (L not in {1024, 3072, 4096})
and the older one in a ``max_position_embeddings`` frame (L in {1024, 3072, 4096}), which can name a
window or global block -- counted twice by HF. Agreement: normwise relative error <= 1e-10.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers import BigBirdConfig, BigBirdModel  # noqa: E402
from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention  # noqa: E402

import refattn  # noqa: E402
from refattn.variants.sparse.bigbird import BigBirdFallbackWarning, multiplicity, window_and_global  # noqa: E402

pytestmark = pytest.mark.peers

HIDDEN, HEADS = 16, 2


def normwise(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def hf_run(seq_len, block_size, r, seed, training=True, batch=2, max_pos=4096):
    """HF's output ``(B, H, L, D)``, our q/k/v (bhsd) and the captured table ``(H, nb-2, r)``."""
    torch.manual_seed(seed)
    config = BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, block_size=block_size,
                           num_random_blocks=r, max_position_embeddings=max_pos,
                           attention_type="block_sparse", attention_probs_dropout_prob=0.0)
    attn = BigBirdBlockSparseAttention(config, seed=seed).double().train(training)
    captured = []
    original = attn.torch_gather_b2

    def spy(params, indices):
        captured.append(indices.clone())
        return original(params, indices)

    attn.torch_gather_b2 = spy
    hidden = torch.randn(batch, seq_len, HIDDEN, dtype=torch.float64)
    ones = torch.ones(batch, seq_len, dtype=torch.float64)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(ones, block_size)
    with torch.no_grad():
        out, _ = attn(hidden, band_mask=band, from_mask=from_mask, to_mask=to_mask,
                      from_blocked_mask=blocked, to_blocked_mask=blocked)
        q, k, v = (getattr(attn, n)(hidden).view(batch, seq_len, HEADS, -1).transpose(1, 2).numpy()
                   for n in ("query", "key", "value"))
    out = out.view(batch, seq_len, HEADS, -1).transpose(1, 2).numpy()
    table = captured[0][0].numpy()
    assert all((c == captured[0][:1]).all() for c in captured)  # same table for the whole batch
    return out, (q, k, v), table


# (L, block_size, r, seed): per-head generator, then the old one (L in {1024, 3072, 4096})
CASES = [(64, 4, 2, 3), (96, 8, 1, 0), (256, 16, 3, 7), (1024, 64, 3, 1), (1024, 16, 2, 5),
         (3072, 64, 2, 2)]


@pytest.mark.parametrize("seq_len, block_size, r, seed", CASES)
def test_matches_hf_with_captured_table(seq_len, block_size, r, seed):
    out_hf, (q, k, v), table = hf_run(seq_len, block_size, r, seed)
    ours = refattn.attention(q, k, v, variant="bigbird", block_size=block_size, num_random_blocks=r,
                             rand_attn=table, duplicates="hf")
    assert normwise(ours, out_hf) <= 1e-10


@pytest.mark.parametrize("seq_len, block_size, r, seed", CASES)
def test_hf_generator_reproduced_from_seed(seq_len, block_size, r, seed):
    out_hf, (q, k, v), table = hf_run(seq_len, block_size, r, seed, batch=1)
    from refattn.variants.sparse.bigbird import hf_rand_attn
    np.testing.assert_array_equal(hf_rand_attn(seq_len, block_size, r, HEADS, seed), table)
    ours = refattn.attention(q, k, v, variant="bigbird", block_size=block_size, num_random_blocks=r,
                             generator="hf", seed=seed, duplicates="hf")
    assert normwise(ours, out_hf) <= 1e-10


def test_old_generator_repeats_blocks_and_hf_counts_them_twice():
    """At L=1024 (b=64) HF's older generator names window/global blocks; HF counts them twice, so
    duplicates='once' must differ from HF and duplicates='hf' must not."""
    out_hf, (q, k, v), table = hf_run(1024, 64, 3, 1)
    nb = 1024 // 64
    assert (multiplicity(table, nb) > 1).any(), "this seed should draw a seen block"
    once = refattn.attention(q, k, v, variant="bigbird", block_size=64, num_random_blocks=3,
                             rand_attn=table, duplicates="once")
    assert normwise(once, out_hf) > 1e-6


def test_per_head_generator_never_draws_a_seen_block():
    _, _, table = hf_run(256, 16, 3, 7)
    seen = window_and_global(16)
    assert not seen[np.arange(1, 15)[None, :, None], table].any()


def test_eval_mode_zero_table():
    """HF eval: an all-zero table (every random block is block 0, counted again)."""
    out_hf, (q, k, v), table = hf_run(96, 8, 2, 0, training=False)
    assert (table == 0).all()
    ours = refattn.attention(q, k, v, variant="bigbird", block_size=8, num_random_blocks=2,
                             generator="hf_eval", duplicates="hf")
    assert normwise(ours, out_hf) <= 1e-10


@pytest.mark.parametrize("block_size, r", [(4, 1), (8, 2)])
def test_fallback_exactly_where_hf_switches(block_size, r):
    """HF BigBirdModel switches to full attention iff L <= (5 + 2r) b; so do we (with a warning)."""
    limit = (5 + 2 * r) * block_size
    for seq_len in (limit, limit + block_size):
        config = BigBirdConfig(vocab_size=50, hidden_size=HIDDEN, num_attention_heads=HEADS,
                               num_hidden_layers=1, intermediate_size=8, block_size=block_size,
                               num_random_blocks=r, attention_type="block_sparse",
                               max_position_embeddings=256)
        model = BigBirdModel(config).double().train()
        with torch.no_grad():
            model(torch.randint(0, 50, (1, seq_len)))
        hf_full = model.attention_type == "original_full"
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 2, seq_len, 4)) for _ in range(3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = refattn.attention(q, k, v, variant="bigbird", block_size=block_size,
                                     num_random_blocks=r)
        ours_full = any(issubclass(w.category, BigBirdFallbackWarning) for w in caught)
        assert ours_full == hf_full == (seq_len <= limit)
        if ours_full:
            np.testing.assert_allclose(ours, refattn.attention(q, k, v), rtol=0, atol=1e-14)


@pytest.mark.parametrize("seq_len", [45, 61])
def test_pad_true_matches_hf_model_padding(seq_len):
    """HF BigBirdModel pads L to a multiple of b with masked pad tokens and runs the per-head
    generator (seed = layer index 0) at the padded length; refattn's ``pad=True`` on the unpadded
    q, k, v (ragged last block) with ``generator="hf", seed=0`` must give HF's first L rows."""
    bs, r = 4, 1
    torch.manual_seed(0)
    config = BigBirdConfig(vocab_size=50, hidden_size=HIDDEN, num_attention_heads=HEADS,
                           num_hidden_layers=1, intermediate_size=8, block_size=bs, num_random_blocks=r,
                           attention_type="block_sparse", max_position_embeddings=128,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BigBirdModel(config).double().train()
    attn = model.encoder.layer[0].attention.self
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(hidden=args[0], out=out[0]))
    with torch.no_grad():
        model(torch.randint(1, 50, (1, seq_len)))
        h = seen["hidden"]
        q, k, v = (getattr(attn, n)(h).view(1, h.shape[1], HEADS, -1).transpose(1, 2)[:, :, :seq_len].numpy()
                   for n in ("query", "key", "value"))
    assert model.attention_type == "block_sparse" and h.shape[1] == -(-seq_len // bs) * bs
    out_hf = seen["out"].view(1, h.shape[1], HEADS, -1).transpose(1, 2)[:, :, :seq_len].numpy()
    ours = refattn.attention(q, k, v, variant="bigbird", block_size=bs, num_random_blocks=r, pad=True,
                             generator="hf", seed=0, duplicates="hf")
    assert normwise(ours, out_hf) <= 1e-10

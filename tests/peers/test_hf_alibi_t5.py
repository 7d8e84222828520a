"""ALiBi slopes against HF BLOOM and T5 buckets against HF T5.

BLOOM builds its slopes in float32 (VARIANTS H): compared at rtol 1e-6. T5's
``_relative_position_bucket`` returns integers: compared exactly, for both directions, several
``(num_buckets, max_distance)`` settings, every distance in a range and random far distances.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

from refattn.position import alibi_slopes, t5_bias, t5_relative_bucket  # noqa: E402

pytestmark = pytest.mark.peers


def bloom_slopes(num_heads):
    """HF BLOOM's slopes: its ALiBi tensor at position 1 is ``slope * 1``."""
    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)
    return alibi[:, 0, 1].double().numpy()


def test_bloom_slopes_all_head_counts():
    for n in range(1, 65):
        np.testing.assert_allclose(alibi_slopes(n), bloom_slopes(n), rtol=1e-6, atol=0,
                                   err_msg=f"num_heads={n}")


SETTINGS = [(32, 128), (16, 64), (8, 20), (64, 256), (32, 100), (128, 1024), (4, 10), (6, 9)]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", SETTINGS)
def test_t5_buckets_exact(bidirectional, num_buckets, max_distance):
    rng = np.random.default_rng(num_buckets * 1000 + max_distance)
    rel = np.concatenate([np.arange(-3000, 3001), rng.integers(-10 ** 7, 10 ** 7, size=2000)])
    hf = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=bidirectional,
                                               num_buckets=num_buckets, max_distance=max_distance)
    ours = t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                              max_distance=max_distance)
    np.testing.assert_array_equal(ours, hf.numpy())


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_matches_hf_compute_bias(bidirectional):
    """HF's ``compute_bias`` (embedding lookup of ``memory - context`` buckets) with a cache offset."""
    from transformers import T5Config

    sq, sk, heads = 5, 12, 3
    cfg = T5Config(d_model=16, d_kv=4, num_heads=heads, relative_attention_num_buckets=32,
                   relative_attention_max_distance=20, is_decoder=not bidirectional)
    attn = T5Attention(cfg, has_relative_attention_bias=True).double()
    table = attn.relative_attention_bias.weight.detach().numpy()  # (num_buckets, H)
    # bottom-right: the queries are the last sq of sk tokens (HF: past_seen_tokens)
    hf = attn.compute_bias(sq, sk, past_seen_tokens=sk - sq)[0].detach().numpy()
    ours = t5_bias(table, sq, sk, bidirectional=bidirectional, max_distance=20)
    np.testing.assert_array_equal(ours, hf)

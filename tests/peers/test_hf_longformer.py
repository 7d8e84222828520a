"""Longformer against HF transformers' ``LongformerSelfAttention`` in float64.

Tiny randomly initialised config (no download), eval mode (dropout off). HF computes its softmax in
float32 even for float64 inputs (VARIANTS H): the test patches ``torch.nn.functional.softmax`` (via
pytest's ``monkeypatch``, undone after the test) so that a float64 input keeps float64 when HF asks
for ``dtype=torch.float32``; then agreement is <= 1e-10 normwise. Without the patch the error is
float32-sized, which the last test shows (so the patch is what closes the gap, not a loose bound).

The layer's ``attention_mask`` is built as ``LongformerModel`` builds it: 0 = local, +10000 = global
(no padding here). Global tokens differ per batch item, include one inside other rows' windows and
the two sequence ends.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers import LongformerConfig  # noqa: E402
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

import refattn  # noqa: E402

pytestmark = pytest.mark.peers

HIDDEN, HEADS = 16, 2


def normwise(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture
def softmax64(monkeypatch):
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == torch.float64:
            dtype = torch.float64
        return original(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


def hf_run(seq_len, window, global_mask, seed=0):
    torch.manual_seed(seed)
    config = LongformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_window=[window],
                              attention_probs_dropout_prob=0.0)
    attn = LongformerSelfAttention(config, layer_id=0).double().eval()
    batch = global_mask.shape[0]
    hidden = torch.randn(batch, seq_len, HIDDEN, dtype=torch.float64)
    mask = torch.tensor(global_mask, dtype=torch.float64) * 10000.0
    with torch.no_grad():
        out = attn(hidden, attention_mask=mask, is_index_masked=mask < 0,
                   is_index_global_attn=mask > 0, is_global_attn=bool((mask > 0).any()))[0]
        proj = {n: getattr(attn, n)(hidden).view(batch, seq_len, HEADS, -1).transpose(1, 2).numpy()
                for n in ("query", "key", "value", "query_global", "key_global", "value_global")}
    return out.view(batch, seq_len, HEADS, -1).transpose(1, 2).numpy(), proj


def ours(proj, window, global_mask, **kw):
    return refattn.attention(proj["query"], proj["key"], proj["value"], variant="longformer",
                             attention_window=window, global_mask=global_mask,
                             q_global=proj["query_global"], k_global=proj["key_global"],
                             v_global=proj["value_global"], **kw)


def masks(batch, seq_len):
    g = np.zeros((batch, seq_len), dtype=bool)
    g[0, [0, 5, seq_len - 1]] = True
    if batch > 1:
        g[1, [3]] = True
    return g


@pytest.mark.parametrize("seq_len, window", [(32, 8), (48, 16), (64, 4)])
def test_matches_hf_with_global_tokens(softmax64, seq_len, window):
    g = masks(2, seq_len)
    out_hf, proj = hf_run(seq_len, window, g)
    assert normwise(ours(proj, window, g), out_hf) <= 1e-10


def test_matches_hf_without_global_tokens(softmax64):
    g = np.zeros((2, 32), dtype=bool)
    out_hf, proj = hf_run(32, 8, g, seed=1)
    assert normwise(ours(proj, 8, g), out_hf) <= 1e-10


def test_one_sided_form_is_the_same_window(softmax64):
    g = masks(2, 32)
    out_hf, proj = hf_run(32, 8, g, seed=2)
    assert normwise(ours(proj, 4, g, one_sided=True), out_hf) <= 1e-10


def test_hf_float32_softmax_is_what_the_patch_removes():
    g = masks(2, 32)
    out_hf, proj = hf_run(32, 8, g, seed=3)
    err = normwise(ours(proj, 8, g), out_hf)
    assert 1e-10 < err < 1e-5, err  # float32-sized, not a semantic difference
    assert math.isfinite(err)

"""Sinks against Hugging Face's gpt-oss eager attention in float64.

``transformers.models.gpt_oss.modeling_gpt_oss.eager_attention_forward`` appends the per-head sink
logit as one more column of the scores, takes the softmax and drops that column: the sink sits in
the denominator only, as in refattn's ``sinks=``. Outputs and autograd gradients (q, k, v and the
sinks) must agree to <= 1e-12 normwise relative error.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import refattn

torch = pytest.importorskip("torch", reason="torch not installed: pip install 'refattn[peers]'")
gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss",
                              reason="transformers not installed: pip install 'refattn[peers]'")

pytestmark = pytest.mark.peers


def normwise(a, b):
    return np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)


@pytest.mark.parametrize("causal", [False, True])
def test_sinks_match_gpt_oss_eager_attention(causal):
    b, hq, hkv, s, d = 2, 4, 2, 6, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, s, d)) for h in (hq, hkv, hkv))
    sinks = rng.standard_normal(hq)
    dout = rng.standard_normal((b, hq, s, d))
    tq, tk, tv, tsinks = (torch.tensor(a, requires_grad=True) for a in (q, k, v, sinks))
    module = SimpleNamespace(sinks=tsinks, num_key_value_groups=hq // hkv, training=False)
    mask = None
    if causal:
        mask = torch.triu(torch.full((s, s), -math.inf, dtype=torch.float64), diagonal=1)[None, None]
    out_t, _ = gpt_oss.eager_attention_forward(module, tq, tk, tv, mask, scaling=d ** -0.5)
    out_t = out_t.transpose(1, 2)  # HF returns (B, S, H, D)
    out_t.backward(torch.tensor(dout))

    out = refattn.attention(q, k, v, sinks=sinks, causal=causal)
    assert normwise(out, out_t.detach().numpy()) <= 1e-12
    dq, dk, dv, extras = refattn.attention_backward(q, k, v, dout, sinks=sinks, causal=causal)
    for name, ours, theirs in (("dq", dq, tq), ("dk", dk, tk), ("dv", dv, tv),
                               ("dsinks", extras["sinks"], tsinks)):
        assert normwise(ours, theirs.grad.numpy()) <= 1e-12, name

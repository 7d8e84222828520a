"""RWKV-4's WKV against HF transformers' ``rwkv_linear_attention_cpu`` (pure torch) in float64.

HF's convention: ``time_decay`` is ``log w`` (its kernel uses ``-exp(time_decay)`` as the log-decay)
and ``time_first`` is ``u``; its state is ``[num, den, max]``, ours ``(B, 3, C)`` = ``(a, b, p)``.
HF casts the key to float32 (``key[:, t].float()``) and starts an absent state in float32
(VARIANTS H): the test passes an explicit float64 empty state (``0, 0, -1e38``, HF's own values)
and patches ``torch.Tensor.float`` (pytest's ``monkeypatch``) to return float64 tensors unchanged.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu  # noqa: E402

import refattn  # noqa: E402
from refattn import backends  # noqa: E402

from .hf_float64 import keep_float64, normwise  # noqa: E402

pytestmark = pytest.mark.peers
BACKENDS = ["numpy"] + (["numba"] if "numba" in backends.available() else [])


@pytest.fixture
def float64(monkeypatch):
    """HF's float32 casts leave float64 tensors alone (tests/peers/hf_float64.py)."""
    keep_float64(monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wkv_matches_hf_with_its_state(float64, backend):
    rng = np.random.default_rng(0)
    b, n, c = 2, 21, 6
    k, v = rng.standard_normal((2, b, n, c)) * 3
    time_decay, time_first = rng.standard_normal(c), rng.standard_normal(c)
    empty = [torch.zeros(b, c, dtype=torch.float64), torch.zeros(b, c, dtype=torch.float64),
             torch.full((b, c), -1e38, dtype=torch.float64)]
    with torch.no_grad():
        out, state = rwkv_linear_attention_cpu(torch.from_numpy(time_decay), torch.from_numpy(time_first),
                                               torch.from_numpy(k), torch.from_numpy(v), state=empty,
                                               return_state=True)
    got, got_state = refattn.attention(k, v, np.exp(time_decay), time_first, variant="rwkv",
                                       backend=backend, return_final_state=True)
    assert out.dtype == torch.float64
    assert normwise(got, out.numpy()) <= 1e-12
    assert normwise(got_state, np.stack([s.numpy() for s in state], axis=1)) <= 1e-12
    # continuing from the state: HF's list of three and ours (B, 3, C) are the same numbers
    k2, v2 = rng.standard_normal((2, b, 5, c))
    with torch.no_grad():
        out2, _ = rwkv_linear_attention_cpu(torch.from_numpy(time_decay), torch.from_numpy(time_first),
                                            torch.from_numpy(k2), torch.from_numpy(v2), state=state)
    got2 = refattn.attention(k2, v2, np.exp(time_decay), time_first, variant="rwkv", backend=backend,
                             initial_state=got_state, form="parallel")
    assert normwise(got2, out2.numpy()) <= 1e-12

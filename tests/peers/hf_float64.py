"""HF transformers casts float64 tensors down to float32 in a few places (VARIANTS H): the Mixtral
router's ``router_logits.float()``, the RMSNorms' ``hidden_states.to(torch.float32)``, DeepSeek-V3's
router ``hidden_states.type(torch.float32)``, eager attention's ``softmax(..., dtype=torch.float32)``
and Switch's ``router_dtype`` (default float32). A float64 comparison with such a layer measures
float32 rounding (~1e-7), not semantics.

:func:`keep_float64` patches those *casts*, not HF's code: while it is active (pytest's
``monkeypatch``, undone after the test), ``Tensor.float()``, ``Tensor.to(torch.float32)``,
``Tensor.type(torch.float32)`` and ``softmax(..., dtype=torch.float32)`` leave a float64 tensor in
float64; every other tensor and dtype behaves as before. Switch's router reads ``self.dtype``, set
from ``config.router_dtype``: tests set that attribute to ``torch.float64`` on the router instance.

Also here: random float64 weights for a freshly built HF module (HF initialises some routers and
biases to zero, which would make every routing decision a tie) and float64 RoPE tables built from the
textbook angle ``p * base ** (-2i / d)`` (HF's rotary module computes them in float32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")


def keep_float64(monkeypatch):
    """Patch the four float32 casts for float64 tensors (module docstring)."""
    f32, f64 = torch.float32, torch.float64
    orig_to, orig_float, orig_type = torch.Tensor.to, torch.Tensor.float, torch.Tensor.type
    orig_softmax = torch.nn.functional.softmax

    def swap(a):
        return f64 if a is f32 else a

    def to(self, *args, **kwargs):
        if self.dtype == f64:
            args = tuple(swap(a) for a in args)
            kwargs = {k: swap(v) for k, v in kwargs.items()}
        return orig_to(self, *args, **kwargs)

    def float_(self, *args, **kwargs):
        return self if self.dtype == f64 else orig_float(self, *args, **kwargs)

    def type_(self, dtype=None, *args, **kwargs):
        if dtype is None:
            return orig_type(self)
        if self.dtype == f64 and (dtype is f32 or dtype == "torch.FloatTensor"):
            return self
        return orig_type(self, dtype, *args, **kwargs)

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == f64:
            dtype = f64
        return orig_softmax(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "float", float_)
    monkeypatch.setattr(torch.Tensor, "type", type_)
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


def randomise(module, seed: int, std: float = 0.3):
    """Every parameter and floating buffer of ``module`` redrawn in float64: norm weights (1-d
    parameters named ``*norm*.weight``) ``1 + 0.1·N(0, 1)``, biases and the router's correction bias
    ``0.1·N(0, 1)``, matrices ``std·N(0, 1)``. Returns ``module`` (float64, eval mode)."""
    g = torch.Generator().manual_seed(seed)
    module.double().eval()
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            z = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * z)
            elif p.ndim == 1:
                p.copy_(0.1 * z)
            else:
                p.copy_(std * z)
    return module


def rope_tables(seq: int, dim: int, base: float, batch: int = 1):
    """HF's ``position_embeddings`` ``(cos, sin)``, ``(B, S, dim)`` = ``cat(freqs, freqs)``, in float64."""
    inv = np.array([base ** (-2 * i / dim) for i in range(dim // 2)])
    freqs = np.arange(seq)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = torch.tensor(np.broadcast_to(np.cos(emb), (batch, seq, dim)).copy())
    sin = torch.tensor(np.broadcast_to(np.sin(emb), (batch, seq, dim)).copy())
    return cos, sin


def causal_mask(batch: int, seq: int):
    """HF's 4-d additive mask (0 visible, -inf hidden), float64."""
    m = torch.full((seq, seq), -math.inf, dtype=torch.float64).triu(1)
    return m[None, None].expand(batch, 1, seq, seq).clone()


def np64(t):
    return t.detach().cpu().numpy().astype(np.float64)


def normwise(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

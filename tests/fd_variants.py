"""Central finite differences in float64 for variant gradients (test helper, no refattn code)."""

from __future__ import annotations

import numpy as np


def fd_grad(loss, array, eps=1e-6, max_entries=40, seed=0):
    """``{index: d loss / d array[index]}`` by central differences on up to ``max_entries`` entries."""
    rng = np.random.default_rng(seed)
    flat = list(np.ndindex(array.shape))
    picks = flat if len(flat) <= max_entries else [flat[i] for i in rng.choice(len(flat), max_entries, False)]
    out = {}
    for idx in picks:
        old = array[idx]
        array[idx] = old + eps
        up = loss()
        array[idx] = old - eps
        down = loss()
        array[idx] = old
        out[idx] = (up - down) / (2 * eps)
    return out


def check_variant_grads(var, backend, arrays, params, grads, names, atol=1e-7):
    """Compare ``grads[name]`` with finite differences of ``sum(out * dout)`` for each input name."""
    rng = np.random.default_rng(1)
    out, _ = var.forward(backend, arrays, params)
    dout = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(var.forward(backend, arrays, params)[0] * dout))

    got = grads(dout)
    for name in names:
        numeric = fd_grad(loss, arrays[name])
        for idx, want in numeric.items():
            assert abs(got[name][idx] - want) <= atol * max(1.0, abs(want)), (name, idx, got[name][idx], want)

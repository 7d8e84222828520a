"""Small attention kernels for ``tests/test_cli_oracle.py``, loaded by ``refattn compare --impl
oracle_kernels:NAME`` (this directory is on ``sys.path`` under pytest).

Written from the definitions, independently of refattn: dense scores, a boolean keep-mask built
here, a max-subtracted softmax. Each wrong one has its bug marked ``BUG``; two of the three
deliberately wrong kernels are those of ``tests/test_demonstrations.py`` (imported, not copied).
"""

import math

import numpy as np

import test_demonstrations as demo


def keep_mask(sq, sk, causal=False, window=None):
    """Bottom-right aligned: key j visible from query i iff i + s - left <= j <= i + s + right
    (s = sk - sq); causal: j <= i + s."""
    rel = np.arange(sk)[None, :] - (np.arange(sq)[:, None] + sk - sq)
    keep = np.ones((sq, sk), dtype=bool)
    if causal:
        keep &= rel <= 0
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= rel >= -left
        if right >= 0:
            keep &= rel <= right
    return keep


def dense(q, k, v, causal=False, window=None, scale=None, dtype=np.float64):
    """Softmax attention computed in ``dtype`` (bhsd, Hq == Hkv); rows without keys give 0."""
    q, k, v = (np.asarray(a, dtype) for a in (q, k, v))
    scale = dtype(scale or 1 / math.sqrt(q.shape[-1]))
    s = scale * (q @ np.swapaxes(k, -1, -2))
    keep = keep_mask(q.shape[2], k.shape[2], causal, window)
    s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0))
    l = e.sum(-1, keepdims=True)
    return (np.where(l > 0, e / np.where(l > 0, l, 1), 0) @ v).astype(dtype)


def good_f32(q, k, v, causal=False, window=None, scale=None):
    """A correct kernel in float32 arithmetic."""
    return dense(q, k, v, causal, window, scale, np.float32)


def good_bf16_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """A correct kernel with flash-attn's (B, S, H, D) signature, float32 inside."""
    t = lambda a: np.swapaxes(np.asarray(a, np.float32), 1, 2)
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    return np.swapaxes(dense(t(q), t(k), t(v), causal, window, softmax_scale, np.float32), 1, 2)


def scaled_wrong_f16(q, k, v, causal=False, window=None, scale=None):
    """BUG: scale 1/D instead of 1/sqrt(D)."""
    return dense(q, k, v, causal, window, 1.0 / q.shape[-1], np.float16)


def nan_row(q, k, v, **params):
    """BUG: one NaN in the output (b=0, h=1, i=2, d=3)."""
    out = dense(q, k, v, **params)
    out[0, 1, 2, 3] = np.nan
    return out


# -- the three deliberately wrong implementations -------------------------------------------------
flash_tile_max_bug = demo.flash_tile_max_bug  # tile max instead of the running max
window_off_by_one = demo.window_off_by_one  # window one key too wide on the left


def hybrid_global_twice(q, k, v, local, tokens, **params):
    """``--variant hybrid --param local=4,4 --param tokens=5``: local window + global token,
    with the global key counted twice where it is also inside the window (demonstration 3)."""
    assert tuple(local) == (demo.RADIUS, demo.RADIUS) and np.ravel(tokens).tolist() == [demo.GLOBAL]
    return demo.hybrid_global_twice(q, k, v, demo.hybrid_mask(q.shape[2]))


# -- backward (numpy, float64): refattn's convention fn(q, k, v, dout, **params) ------------------------
def backward(q, k, v, dout, scale=None, wrong_dk=False):
    """Gradients of plain softmax attention from the textbook formulas."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    scale = scale or 1 / math.sqrt(q.shape[-1])
    s = scale * (q @ np.swapaxes(k, -1, -2))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dv = np.swapaxes(p, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dout * out).sum(-1, keepdims=True))
    dq = scale * (ds @ k)
    dk = (1.0 if wrong_dk else scale) * (np.swapaxes(ds, -1, -2) @ q)  # BUG when wrong_dk
    return dq, dk, dv


def backward_wrong_dk(q, k, v, dout, scale=None):
    """BUG: dk without the softmax scale."""
    return backward(q, k, v, dout, scale, wrong_dk=True)


def forward(q, k, v, scale=None):
    return dense(q, k, v, scale=scale)

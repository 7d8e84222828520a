"""Accuracy of the float64 oracle itself: refattn against mpmath at 50 significant digits.

The high-precision reference is the definition written out here, one (b, h, i) row at a time:
scores, softcap, ALiBi, mask, softmax, output and LSE. Bound: normwise relative error <= 1e-14
(the cases are small and well conditioned), and below the conditioning-aware first-order bound
documented in :mod:`refattn.numerics`.
"""

import math

import mpmath
import numpy as np
import pytest

import refattn

mpmath.mp.dps = 50
U = 2.0 ** -53


def mp_attention(q, k, v, *, causal=False, softcap=None, slopes=None, scale=None):
    """(out, lse) as mpmath matrices-of-floats, from the definition (bottom-right alignment)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = mpmath.mpf(1) / mpmath.sqrt(d) if scale is None else mpmath.mpf(scale)
    out = np.zeros((b, hq, sq, v.shape[-1]), dtype=object)
    lse = np.zeros((b, hq, sq), dtype=object)
    for bb in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(sq):
                pos = i + sk - sq
                scores = []
                for j in range(sk):
                    if causal and j > pos:
                        continue
                    s = scale * mpmath.fsum(mpmath.mpf(q[bb, h, i, t]) * mpmath.mpf(k[bb, kv, j, t])
                                            for t in range(d))
                    if softcap is not None:
                        c = mpmath.mpf(softcap)
                        s = c * mpmath.tanh(s / c)
                    if slopes is not None:
                        s -= mpmath.mpf(slopes[h]) * abs(pos - j)
                    scores.append((j, s))
                m = max(s for _, s in scores)
                z = mpmath.fsum(mpmath.exp(s - m) for _, s in scores)
                lse[bb, h, i] = m + mpmath.log(z)
                for t in range(v.shape[-1]):
                    out[bb, h, i, t] = mpmath.fsum(mpmath.exp(s - m) * mpmath.mpf(v[bb, kv, j, t])
                                                   for j, s in scores) / z
    return out, lse


def normwise(approx, exact):
    diff = mpmath.sqrt(mpmath.fsum((mpmath.mpf(a) - e) ** 2 for a, e in zip(approx.ravel(),
                                                                           exact.ravel())))
    return float(diff / mpmath.sqrt(mpmath.fsum(e ** 2 for e in exact.ravel())))


def conditioning_bound(q, k, v, scale, out_exact):
    """The first-order bound of refattn.numerics' docstring, normwise over the output."""
    d, sk = q.shape[-1], k.shape[2]
    gamma = lambda n: n * U / (1 - n * U)
    hq, hkv = q.shape[1], k.shape[1]
    kk = np.repeat(k, hq // hkv, axis=1)
    vv = np.repeat(v, hq // hkv, axis=1)
    score_err = 2 * gamma(d) * scale * np.max(np.abs(q) @ np.swapaxes(np.abs(kk), -1, -2))
    o = np.array(out_exact, dtype=float)
    # |δo_it| <= κ_i |o_it| (...) = Σ_j p_ij |v_jt| (...) <= max|v| (...), elementwise; normwise:
    return math.sqrt(o.size) * np.max(np.abs(vv)) * (score_err + gamma(sk + 2)) / np.linalg.norm(o)


def _inputs(seed, b=1, hq=2, hkv=1, sq=3, sk=5, d=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, d)))


CASES = {
    "sdpa": {},
    "causal": {"causal": True},
    "softcap": {"softcap": 2.5, "causal": True},
    "alibi": {"alibi_slopes": np.array([0.5, 0.125])},
    "all": {"softcap": 7.0, "alibi_slopes": np.array([0.25, 2 ** -0.5]), "causal": True},
}


@pytest.mark.parametrize("name", list(CASES))
def test_against_mpmath(name):
    params = CASES[name]
    q, k, v = _inputs(seed=len(name))
    out, lse = refattn.attention(q, k, v, return_lse=True, **params)
    mp_out, mp_lse = mp_attention(q, k, v, causal=params.get("causal", False),
                                  softcap=params.get("softcap"), slopes=params.get("alibi_slopes"))
    err = normwise(out, mp_out)
    assert err <= 1e-14, err
    assert err <= conditioning_bound(q, k, v, 1 / math.sqrt(q.shape[-1]), mp_out)
    lse_err = normwise(lse, mp_lse)
    assert lse_err <= 1e-14, lse_err


def test_against_mpmath_gqa_and_large_scores():
    """Scores of size ~40 (max-subtraction matters) and a GQA group of 2."""
    q, k, v = _inputs(seed=11, hq=4, hkv=2, sq=4, sk=6, d=8)
    q = 6 * q
    out, lse = refattn.attention(q, k, v, return_lse=True, causal=True)
    mp_out, mp_lse = mp_attention(q, k, v, causal=True)
    assert normwise(out, mp_out) <= 1e-14
    assert normwise(lse, mp_lse) <= 1e-14


def test_flash_tiles_against_mpmath():
    q, k, v = _inputs(seed=12, sq=5, sk=7)
    out, lse = refattn.attention(q, k, v, variant="flash", block_q=2, block_k=3, return_lse=True)
    mp_out, mp_lse = mp_attention(q, k, v)
    assert normwise(out, mp_out) <= 1e-14
    assert normwise(lse, mp_lse) <= 1e-14

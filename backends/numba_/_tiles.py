"""Per-tile building blocks of the numba kernels (small njit functions, composed in ``_kernels``).

A tile is ``r x c`` (``r <= block_q`` query rows from ``i0``, ``c <= block_k`` keys from ``j0``).
The tile products (``np.dot``) run in the storage dtype (float64 or float32). Without score
modifications (and with ``scale > 0``) the softmax reads the raw product ``S = q.k`` and folds
``scale`` into the exponent; otherwise ``W = scale * S`` is made in float64 and modified. Maxima,
exponentials and sums are float64 either way; P (and dP, dS in the backward) are stored in the
storage dtype for the next product. The records passed around are the named tuples of
:mod:`._records` (``Spec``: geometry, visibility, score mods, dropout, scale, head map;
``QueryTile``/``KeyTile``: one task's geometry, made once per task by :func:`query_tile` and
:func:`key_tile`).

The exponent's argument ``sc * w - shift`` is computed without FMA contraction: at the row maximum
it is then exactly 0 (``shift`` is the same rounded product), however large the scores; contracted,
it would be that product's rounding error, which exceeds the exponent's range from |score| ~ 1e19.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._fastexp import fexp
from ._philox import keep_row
from ._records import KeyTile, QueryTile

#: reassociation (vectorised sums and maxima) and FMA contraction; never 'nnan'/'ninf' (-inf is
#: how a hidden pair is spelled).
FASTMATH = {"reassoc", "contract", "nsz"}
#: the exponent's argument: reassociation for the vectorised sum, but no contraction (module docstring)
NO_CONTRACT = {"reassoc", "nsz"}
NEG_INF = -np.inf
EMPTY, PARTIAL, FULL = 0, 1, 2


@njit(cache=True)
def query_tile(spec, b, h, ti):
    """The :class:`QueryTile` of query tile ``ti`` of ``(b, h)``: computed once per task."""
    g = spec.geom
    layout = spec.vis.layout
    i0 = ti * g.block_q
    return QueryTile(b=b, h=h, ti=ti, i0=i0, rows=min(g.block_q, g.sq - i0),
                     row0=(b * g.hq + h) * g.sq + i0, kv0=(b * g.hkv + spec.head_map[h]) * g.sk,
                     lb=_bcast(layout.shape[0], b), lh=_bcast(layout.shape[1], h))


@njit(cache=True)
def key_tile(spec, b, hkv, tj):
    """The :class:`KeyTile` of key tile ``tj`` of ``(b, KV head hkv)``."""
    g = spec.geom
    j0 = tj * g.block_k
    return KeyTile(b=b, hkv=hkv, tj=tj, j0=j0, cols=min(g.block_k, g.sk - j0),
                   kv0=(b * g.hkv + hkv) * g.sk)


@njit(cache=True)
def tile2d(buf, r, c):
    """An ``r x c`` C-contiguous view of the front of a flat work buffer."""
    return buf[:r * c].reshape((r, c))


@njit(cache=True, fastmath=FASTMATH)
def scale_into(s, scale, w):
    """``w = scale * s`` in float64 (the start of the score-modification path)."""
    r, c = s.shape
    for ii in range(r):
        srow, wrow = s[ii], w[ii]
        for jj in range(c):
            wrow[jj] = scale * srow[jj]


@njit(cache=True)
def _bcast(n, i):
    return i if n > 1 else 0


@njit(cache=True)
def apply_mods(w, t, mods, b, h, i0, j0):
    """Softcap (``t`` keeps ``tanh(s / c)`` for the backward), then ALiBi, then the bias."""
    softcap, slopes, alibi, bias, has_bias, off = (mods.softcap, mods.slopes, mods.alibi, mods.bias,
                                                   mods.has_bias, mods.offset)
    r, c = w.shape
    if softcap > 0.0:
        for ii in range(r):
            for jj in range(c):
                th = math.tanh(w[ii, jj] / softcap)
                t[ii, jj] = th
                w[ii, jj] = softcap * th
    if alibi == 1:
        sl = slopes[h]
        for ii in range(r):
            for jj in range(c):
                w[ii, jj] -= sl * abs(i0 + ii + off - (j0 + jj))
    elif alibi == 2:
        sl = slopes[h]
        for ii in range(r):
            for jj in range(c):
                w[ii, jj] += sl * (j0 + jj)
    if has_bias:
        nb, nh, ni, nj = bias.shape
        bb, hb = _bcast(nb, b), _bcast(nh, h)
        for ii in range(r):
            brow = bias[bb, hb, _bcast(ni, i0 + ii)]
            if nj > 1:
                for jj in range(c):
                    w[ii, jj] += brow[j0 + jj]
            else:
                for jj in range(c):
                    w[ii, jj] += brow[0]


@njit(cache=True)
def hide_invisible(w, vis, qt, tj, j0):
    """Set hidden pairs of a PARTIAL tile (query tile ``qt``, key tile ``tj`` from ``j0``) to
    ``-inf``."""
    lo, hi, i0 = vis.lo, vis.hi, qt.i0
    r, c = w.shape
    if vis.band_only:
        for ii in range(r):
            base = j0 - (i0 + ii + vis.offset)
            wrow = w[ii]
            for jj in range(c):
                rel = base + jj
                wrow[jj] = wrow[jj] if (rel >= lo and rel <= hi) else NEG_INF
    else:
        m = vis.pmasks[vis.pindex[qt.lb, qt.lh, qt.ti, tj]]
        for ii in range(r):
            wrow, mrow = w[ii], m[ii]
            for jj in range(c):
                wrow[jj] = wrow[jj] if mrow[jj] else NEG_INF


@njit(cache=True, fastmath=FASTMATH | {"nnan"})
def _rowmax(wrow):
    """Row maximum; 'nnan' lets LLVM vectorise it (scores are never NaN: inputs are finite)."""
    mx = NEG_INF
    for jj in range(wrow.shape[0]):
        mx = max(mx, wrow[jj])
    return mx


@njit(cache=True, fastmath=NO_CONTRACT)
def _exp_row(wrow, sc, shift, prow):
    """``prow = exp(sc * wrow - shift)``; returns the float64 row sum."""
    total = 0.0
    for jj in range(wrow.shape[0]):
        e = fexp(sc * np.float64(wrow[jj]) - shift)
        prow[jj] = e
        total += e
    return total


@njit(cache=True)
def online_softmax(w, sc, p, m, l, alpha):
    """One step of the online softmax over the scores ``sc * w`` (``sc > 0``):
    ``m_new = max(m, rowmax)``, ``p = exp(sc * w - m_new)``, ``l = exp(m - m_new) l + rowsum(p)``;
    ``alpha = exp(m - m_new)`` rescales the accumulator. Rows whose running max is still ``-inf``
    (nothing visible yet) get ``p = 0``, ``alpha = 1``."""
    for ii in range(w.shape[0]):
        m_new = max(m[ii], sc * np.float64(_rowmax(w[ii])))
        if m_new == NEG_INF:
            p[ii, :] = 0.0
            alpha[ii] = 1.0
            continue
        alpha[ii] = fexp(m[ii] - m_new)
        l[ii] = alpha[ii] * l[ii] + _exp_row(w[ii], sc, m_new, p[ii])
        m[ii] = m_new


@njit(cache=True)
def probs_from_lse(w, sc, lse_rows, p):
    """``p = exp(sc * w - lse)`` row by row (backward: P recomputed from the saved LSE); an empty
    row (``lse = -inf``) gives 0."""
    for ii in range(w.shape[0]):
        if lse_rows[ii] == NEG_INF:
            p[ii, :] = 0.0
        else:
            _exp_row(w[ii], sc, lse_rows[ii], p[ii])


@njit(cache=True)
def keep_tile(keep, drop, b, h, hq, i0, j0, sk):
    """Dropout keep-mask of a tile (``keep`` is ``r x c`` bool). Philox counter of the tile's
    ``(ii, jj)``: ``(row0 + i0 + ii) * stride + col0 + j0 + jj``, ``stride`` 0 meaning ``sk``."""
    mode, p, seed, dmask = drop.mode, drop.p, drop.seed, drop.mask
    r, c = keep.shape
    if mode == 1:
        stream = np.uint64(b * hq + h)
        stride = drop.stride if drop.stride > 0 else sk
        for ii in range(r):
            keep_row(seed, stream, (drop.row0 + i0 + ii) * stride + drop.col0 + j0, p, keep[ii])
    else:
        nb, nh, ni, nj = dmask.shape
        for ii in range(r):
            mrow = dmask[_bcast(nb, b), _bcast(nh, h), _bcast(ni, i0 + ii)]
            for jj in range(c):
                keep[ii, jj] = mrow[_bcast(nj, j0 + jj)]


@njit(cache=True, fastmath=FASTMATH)
def apply_keep(p, keep, dscale):
    """``p = where(keep, p * dscale, 0)``."""
    r, c = p.shape
    for ii in range(r):
        prow, krow = p[ii], keep[ii]
        for jj in range(c):
            prow[jj] = prow[jj] * dscale if krow[jj] else 0.0


@njit(cache=True, fastmath=FASTMATH)
def rescale_add(acc, alpha, pv):
    """``acc = alpha[:, None] * acc + pv`` (float64 accumulator)."""
    r, dv = acc.shape
    for ii in range(r):
        a = alpha[ii]
        arow, prow = acc[ii], pv[ii]
        for d in range(dv):
            arow[d] = a * arow[d] + prow[d]


@njit(cache=True, fastmath=FASTMATH)
def add_into(acc, x):
    r, c = acc.shape
    for ii in range(r):
        arow, xrow = acc[ii], x[ii]
        for jj in range(c):
            arow[jj] += xrow[jj]


@njit(cache=True, fastmath=FASTMATH)
def score_grads(p, dp, delta_rows, ds):
    """``ds = P * (dP - delta)``: the gradient w.r.t. the modified score (no dropout)."""
    r, c = p.shape
    for ii in range(r):
        d = delta_rows[ii]
        prow, dprow, dsrow = p[ii], dp[ii], ds[ii]
        for jj in range(c):
            dsrow[jj] = prow[jj] * (dprow[jj] - d)


@njit(cache=True, fastmath=FASTMATH)
def dropped_score_grads(p, dp, keep, dscale, delta_rows, pu, ds):
    """With dropout: ``ds = P * (dP' - delta)``, ``dP' = where(keep, dP * dscale, 0)``, and ``pu``
    receives P as used in ``P @ V`` (``where(keep, P * dscale, 0)``)."""
    r, c = p.shape
    for ii in range(r):
        d = delta_rows[ii]
        prow, dprow, dsrow, krow, purow = p[ii], dp[ii], ds[ii], keep[ii], pu[ii]
        for jj in range(c):
            kp = dscale if krow[jj] else 0.0
            purow[jj] = prow[jj] * kp
            dsrow[jj] = prow[jj] * (dprow[jj] * kp - d)


@njit(cache=True, fastmath=FASTMATH)
def softcap_grads(ds, t):
    """``ds *= 1 - t**2`` (``t = tanh(s / c)``): from the capped score back to ``scale * q.k``."""
    r, c = ds.shape
    for ii in range(r):
        dsrow, trow = ds[ii], t[ii]
        for jj in range(c):
            dsrow[jj] = dsrow[jj] * (1.0 - trow[jj] * trow[jj])


@njit(cache=True)
def store_scaled(dst, acc, scale):
    """``dst[...] = scale * acc`` (float64 accumulator into the storage dtype)."""
    r, c = acc.shape
    for ii in range(r):
        for jj in range(c):
            dst[ii, jj] = scale * acc[ii, jj]


@njit(cache=True)
def accumulate_dbias(ds, part, per_key, b, h, i0, j0, tj):
    """Add a tile's ``ds`` into the bias-gradient buffer ``part``: shape ``(Bb, Hb, Sqb, Sk)`` when
    the bias has a key axis (``per_key``), else ``(Bb, Hb, Sqb, n_key_tiles)`` (column ``tj``), so
    tasks owning different key tiles never write the same element. Size-1 dims are summed over."""
    nb, nh, ni, _ = part.shape
    bb, hb = _bcast(nb, b), _bcast(nh, h)
    r, c = ds.shape
    for ii in range(r):
        prow = part[bb, hb, _bcast(ni, i0 + ii)]
        dsrow = ds[ii]
        if per_key:
            for jj in range(c):
                prow[j0 + jj] += dsrow[jj]
        else:
            total = 0.0
            for jj in range(c):
                total += dsrow[jj]
            prow[tj] += total

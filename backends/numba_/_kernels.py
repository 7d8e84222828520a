"""The three parallel kernels: forward, backward over key tiles (dK, dV), backward over query
tiles (dQ). FlashAttention-2 tiling; each ``prange`` iteration owns what it writes, so there are no
races and no atomics. Arrays arrive flattened to 2-d ``(B*H*S, D)`` (C order) so a tile of rows is
one contiguous block for ``np.dot``; ``geom = (B, Hq, Hkv, Sq, Sk, block_q, block_k)``.

Tile loops visit only the key tiles ``tlo[ti] <= tj < thi[ti]`` of a query tile (and the query tiles
``ilo[tj] <= ti < ihi[tj]`` of a key tile) that the Pattern's layout marks non-empty anywhere, and
skip EMPTY ones inside that range; FULL tiles get no per-element visibility test.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._tiles import (EMPTY, NEG_INF, PARTIAL, _bcast, accumulate_dbias, add_into, apply_keep,
                     apply_mods, hide_invisible, is_plain, keep_tile, online_softmax,
                     probs_from_lse, rescale_add, scale_into, score_grads, softcap_grads,
                     store_scaled, tile2d)


@njit(cache=True)
def _finish_rows(acc, m, l, out, lse):
    """``out = acc / l`` and ``lse = m + log l``; a row that saw nothing gets 0 and ``-inf``."""
    for ii in range(acc.shape[0]):
        if l[ii] > 0.0:
            for d in range(acc.shape[1]):
                out[ii, d] = acc[ii, d] / l[ii]
            lse[ii] = m[ii] + np.log(l[ii])
        else:
            out[ii, :] = 0.0
            lse[ii] = NEG_INF


@njit(cache=True)
def _forward_task(q2, k2, v2, out2, lse1, head_map, scale, geom, vis, tlo, thi, mods, drop,
                  b, h, ti):
    nb, hq, hkv, sq, sk, bq, bk = geom
    dv = v2.shape[1]
    layout = vis[0]
    lb, lh = _bcast(layout.shape[0], b), _bcast(layout.shape[1], h)
    i0 = ti * bq
    r = min(bq, sq - i0)
    row0 = (b * hq + h) * sq + i0
    kv0 = (b * hkv + head_map[h]) * sk
    qt = q2[row0:row0 + r]
    sbuf, pbuf = np.empty(bq * bk, q2.dtype), np.empty(bq * bk, q2.dtype)
    wbuf, tbuf = np.empty(bq * bk), np.empty(bq * bk)
    keepbuf = np.empty(bq * bk, np.bool_)
    pv = np.empty((r, dv), q2.dtype)
    m, l, alpha = np.full(r, NEG_INF), np.zeros(r), np.empty(r)
    acc = np.zeros((r, dv))
    plain = is_plain(mods, scale)
    for tj in range(tlo[ti], thi[ti]):
        code = layout[lb, lh, ti, tj]
        if code == EMPTY:
            continue
        j0 = tj * bk
        c = min(bk, sk - j0)
        s, p = tile2d(sbuf, r, c), tile2d(pbuf, r, c)
        np.dot(qt, k2[kv0 + j0:kv0 + j0 + c].T, s)
        if plain:
            if code == PARTIAL:
                hide_invisible(s, vis, lb, lh, ti, tj, i0, j0)
            online_softmax(s, scale, p, m, l, alpha)
        else:
            w = tile2d(wbuf, r, c)
            scale_into(s, scale, w)
            apply_mods(w, tile2d(tbuf, r, c), mods, b, h, i0, j0)
            if code == PARTIAL:
                hide_invisible(w, vis, lb, lh, ti, tj, i0, j0)
            online_softmax(w, 1.0, p, m, l, alpha)
        if drop[0] != 0:  # the normaliser l never sees dropout
            keep = tile2d(keepbuf, r, c)
            keep_tile(keep, drop, b, h, hq, i0, j0, sk)
            apply_keep(p, keep, drop[2])
        np.dot(p, v2[kv0 + j0:kv0 + j0 + c], pv)
        rescale_add(acc, alpha, pv)
    _finish_rows(acc, m, l, out2[row0:row0 + r], lse1[row0:row0 + r])


@njit(parallel=True, cache=True)
def forward(q2, k2, v2, out2, lse1, head_map, scale, geom, vis, tlo, thi, mods, drop):
    """Forward: one task per (batch, query head, query tile); writes its rows of ``out2``/``lse1``."""
    nb, hq, _, sq, _, bq, _ = geom
    nbq = (sq + bq - 1) // bq
    for t in prange(nb * hq * nbq):
        b, rem = divmod(np.int64(t), hq * nbq)
        h, ti = divmod(rem, nbq)
        _forward_task(q2, k2, v2, out2, lse1, head_map, scale, geom, vis, tlo, thi, mods, drop,
                      b, h, ti)


@njit(cache=True)
def _work_buffers(bq, bk, dtype):
    n = bq * bk
    return (np.empty(n, dtype), np.empty(n), np.empty(n), np.empty(n, dtype), np.empty(n, dtype),
            np.empty(n, dtype), np.empty(n, dtype), np.empty(n, np.bool_))


@njit(cache=True)
def _grad_tile(qt, kt, vt, dot, lse_rows, delta_rows, scale, mods, vis, drop, code, b, h, hq, sk,
               lb, lh, ti, tj, i0, j0, bufs, dbias, per_key, want_dbias):
    """Recompute one tile's P from the saved LSE and its score gradient.

    Returns ``pu`` (P with dropout: feeds dV) and ``ds`` (the gradient w.r.t. ``q.k / scale``,
    i.e. without the factor ``scale``, which the caller applies once to the accumulated dQ/dK),
    both in the storage dtype. With ``want_dbias`` (the key-tile pass, when there is a bias) it adds
    the tile's bias gradient into ``dbias``."""
    r, c = qt.shape[0], kt.shape[0]
    sbuf, wbuf, tbuf, pbuf, dpbuf, pubuf, dsbuf, keepbuf = bufs
    s, t, p = tile2d(sbuf, r, c), tile2d(tbuf, r, c), tile2d(pbuf, r, c)
    np.dot(qt, kt.T, s)
    if is_plain(mods, scale):
        if code == PARTIAL:
            hide_invisible(s, vis, lb, lh, ti, tj, i0, j0)
        probs_from_lse(s, scale, lse_rows, p)
    else:
        w = tile2d(wbuf, r, c)
        scale_into(s, scale, w)
        apply_mods(w, t, mods, b, h, i0, j0)
        if code == PARTIAL:
            hide_invisible(w, vis, lb, lh, ti, tj, i0, j0)
        probs_from_lse(w, 1.0, lse_rows, p)
    dp = tile2d(dpbuf, r, c)
    np.dot(dot, vt.T, dp)
    keep = tile2d(keepbuf, r, c)
    dropping = drop[0] != 0
    if dropping:
        keep_tile(keep, drop, b, h, hq, i0, j0, sk)
    pu, ds = tile2d(pubuf, r, c), tile2d(dsbuf, r, c)
    score_grads(p, dp, keep, dropping, drop[2], delta_rows, pu, ds)
    if want_dbias:
        accumulate_dbias(ds, dbias, per_key, b, h, i0, j0, tj)
    if mods[0] > 0.0:
        softcap_grads(ds, t)
    return (pu if dropping else p), ds


@njit(cache=True)
def _kv_task(q2, k2, v2, do2, lse1, delta1, gptr, gidx, scale, geom, vis, ilo, ihi, mods, drop,
             dk2, dv2, dbias, per_key, b, hkv, tj):
    nb, hq, nhkv, sq, sk, bq, bk = geom
    d, dv = q2.shape[1], v2.shape[1]
    layout = vis[0]
    j0 = tj * bk
    c = min(bk, sk - j0)
    kv0 = (b * nhkv + hkv) * sk
    kt, vt = k2[kv0 + j0:kv0 + j0 + c], v2[kv0 + j0:kv0 + j0 + c]
    dkacc, dvacc = np.zeros((c, d)), np.zeros((c, dv))
    tmpk, tmpv = np.empty((c, d), q2.dtype), np.empty((c, dv), q2.dtype)
    bufs = _work_buffers(bq, bk, q2.dtype)
    for g in range(gptr[hkv], gptr[hkv + 1]):
        h = gidx[g]
        lb, lh = _bcast(layout.shape[0], b), _bcast(layout.shape[1], h)
        for ti in range(ilo[tj], ihi[tj]):
            code = layout[lb, lh, ti, tj]
            if code == EMPTY:
                continue
            i0 = ti * bq
            r = min(bq, sq - i0)
            row0 = (b * hq + h) * sq + i0
            qt, dot = q2[row0:row0 + r], do2[row0:row0 + r]
            pu, ds = _grad_tile(qt, kt, vt, dot, lse1[row0:row0 + r], delta1[row0:row0 + r],
                                scale, mods, vis, drop, code, b, h, hq, sk, lb, lh, ti, tj, i0, j0,
                                bufs, dbias, per_key, mods[4])
            np.dot(pu.T, dot, tmpv)
            add_into(dvacc, tmpv)
            np.dot(ds.T, qt, tmpk)
            add_into(dkacc, tmpk)
    store_scaled(dk2[kv0 + j0:kv0 + j0 + c], dkacc, scale)
    store_scaled(dv2[kv0 + j0:kv0 + j0 + c], dvacc, 1.0)


@njit(parallel=True, cache=True)
def backward_kv(q2, k2, v2, do2, lse1, delta1, gptr, gidx, scale, geom, vis, ilo, ihi, mods, drop,
                dk2, dv2, dbias, per_key, serial_bh):
    """dK, dV: one task per (key tile, batch, KV head), looping over the query heads that read the
    KV head (GQA sums there) and the query tiles. With a bias gradient, tasks are whole key tiles
    (``serial_bh``) so a broadcast bias is never written by two tasks."""
    nb, _, hkv, _, sk, _, bk = geom
    nbk = (sk + bk - 1) // bk
    inner = nb * hkv if serial_bh else 1
    for t in prange((nbk * nb * hkv) // inner):
        for u in range(inner):
            tj, rem = divmod(np.int64(t) * inner + u, nb * hkv)
            b, kh = divmod(rem, hkv)
            _kv_task(q2, k2, v2, do2, lse1, delta1, gptr, gidx, scale, geom, vis, ilo, ihi, mods,
                     drop, dk2, dv2, dbias, per_key, b, kh, tj)


@njit(cache=True)
def _q_task(q2, k2, v2, do2, lse1, delta1, head_map, scale, geom, vis, tlo, thi, mods, drop, dq2,
            b, h, ti):
    nb, hq, hkv, sq, sk, bq, bk = geom
    d = q2.shape[1]
    layout = vis[0]
    lb, lh = _bcast(layout.shape[0], b), _bcast(layout.shape[1], h)
    i0 = ti * bq
    r = min(bq, sq - i0)
    row0 = (b * hq + h) * sq + i0
    kv0 = (b * hkv + head_map[h]) * sk
    qt, dot = q2[row0:row0 + r], do2[row0:row0 + r]
    lse_rows, delta_rows = lse1[row0:row0 + r], delta1[row0:row0 + r]
    dqacc, tmp = np.zeros((r, d)), np.empty((r, d), q2.dtype)
    bufs = _work_buffers(bq, bk, q2.dtype)
    no_dbias = np.zeros((1, 1, 1, 1))
    for tj in range(tlo[ti], thi[ti]):
        code = layout[lb, lh, ti, tj]
        if code == EMPTY:
            continue
        j0 = tj * bk
        c = min(bk, sk - j0)
        kt, vt = k2[kv0 + j0:kv0 + j0 + c], v2[kv0 + j0:kv0 + j0 + c]
        _, ds = _grad_tile(qt, kt, vt, dot, lse_rows, delta_rows, scale, mods, vis, drop, code,
                           b, h, hq, sk, lb, lh, ti, tj, i0, j0, bufs, no_dbias, False, False)
        np.dot(ds, kt, tmp)
        add_into(dqacc, tmp)
    store_scaled(dq2[row0:row0 + r], dqacc, scale)


@njit(parallel=True, cache=True)
def backward_q(q2, k2, v2, do2, lse1, delta1, head_map, scale, geom, vis, tlo, thi, mods, drop,
               dq2):
    """dQ: one task per (batch, query head, query tile), P recomputed from the saved LSE."""
    nb, hq, _, sq, _, bq, _ = geom
    nbq = (sq + bq - 1) // bq
    for t in prange(nb * hq * nbq):
        b, rem = divmod(np.int64(t), hq * nbq)
        h, ti = divmod(rem, nbq)
        _q_task(q2, k2, v2, do2, lse1, delta1, head_map, scale, geom, vis, tlo, thi, mods, drop,
                dq2, b, h, ti)

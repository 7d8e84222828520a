"""The three kernels: forward, backward over key tiles (dK, dV), backward over query tiles (dQ).
FlashAttention-2 tiling. Each kernel runs a range of tasks ``[t_start, t_stop)`` without the GIL
(``nogil=True``); the backend hands ranges to its threads, and each task owns what it writes, so
there are no races and no atomics. (Python threads over a nogil kernel, rather than numba's
``prange``: the parallel region doubled the compile time and gave no way to report progress.) Arrays arrive flattened to 2-d ``(B*H*S, D)`` (C order) so a tile of rows is
one contiguous block for ``np.dot``. The parallel kernels take the call's records flat
(``geom, vis, mods, drop, scale, head_map``: numba's parallel regions cannot take nested named
tuples); each task builds the :class:`~._records.Spec` from them and its
:class:`~._records.QueryTile` or :class:`~._records.KeyTile`, once.

Compile only what a call needs: ``mods`` is None without score modifications and ``drop`` None
without dropout. numba prunes ``if mods is None`` / ``if drop is not None`` branches on such
arguments before typing, so a plain call never compiles the softcap/ALiBi/bias code or Philox --
the bulk of the compile time.

Tile loops visit only the key tiles ``tlo[ti] <= tj < thi[ti]`` of a query tile (and the query tiles
``ilo[tj] <= ti < ihi[tj]`` of a key tile) that the Pattern's layout marks non-empty anywhere, and
skip EMPTY ones inside that range; FULL tiles get no per-element visibility test.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._records import Spec
from ._tiles import (EMPTY, NEG_INF, PARTIAL, accumulate_dbias, add_into, apply_keep, apply_mods,
                     dropped_score_grads, hide_invisible, keep_tile, key_tile, online_softmax,
                     probs_from_lse, query_tile, rescale_add, scale_into, score_grads,
                     softcap_grads, store_scaled, tile2d)


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
def _modified(spec, mods, qt, s, w, t, code, tj, j0):
    """The score-modification path (``mods`` a record: modifications, or a scale <= 0): ``w =
    scale * s`` in float64, softcap/ALiBi/bias (``t`` keeps ``tanh`` for the backward), then the
    visibility of a PARTIAL tile. (The plain path, ``mods`` None, hides the invisible pairs of
    ``s`` itself and folds ``scale > 0`` into the exponent.)"""
    scale_into(s, spec.scale, w)
    apply_mods(w, t, mods, qt.b, qt.h, qt.i0, j0)
    if code == PARTIAL:
        hide_invisible(w, spec.vis, qt, tj, j0)


@njit(cache=True)
def _forward_task(q2, k2, v2, out2, lse1, geom, vis, mods, drop, scale, head_map, tlo, thi, b, h, ti):
    spec = Spec(geom, vis, scale, head_map)
    g = geom
    qt = query_tile(spec, b, h, ti)
    r, bq, bk = qt.rows, g.block_q, g.block_k
    qrows = q2[qt.row0:qt.row0 + r]
    sbuf, pbuf = np.empty(bq * bk, q2.dtype), np.empty(bq * bk, q2.dtype)
    wbuf, tbuf = np.empty(bq * bk), np.empty(bq * bk)
    keepbuf = np.empty(bq * bk, np.bool_)
    pv = np.empty((r, v2.shape[1]), q2.dtype)
    m, l, alpha = np.full(r, NEG_INF), np.zeros(r), np.empty(r)
    acc = np.zeros((r, v2.shape[1]))
    for tj in range(tlo[ti], thi[ti]):
        code = spec.vis.layout[qt.lb, qt.lh, ti, tj]
        if code == EMPTY:
            continue
        j0 = tj * bk
        c = min(bk, g.sk - j0)
        s, p = tile2d(sbuf, r, c), tile2d(pbuf, r, c)
        np.dot(qrows, k2[qt.kv0 + j0:qt.kv0 + j0 + c].T, s)
        if mods is None:  # the plain path (pruned at compile time): scale folded into exp
            if code == PARTIAL:
                hide_invisible(s, spec.vis, qt, tj, j0)
            online_softmax(s, spec.scale, p, m, l, alpha)
        else:
            w = tile2d(wbuf, r, c)
            _modified(spec, mods, qt, s, w, tile2d(tbuf, r, c), code, tj, j0)
            online_softmax(w, 1.0, p, m, l, alpha)
        if drop is not None:  # the normaliser l never sees dropout
            keep = tile2d(keepbuf, r, c)
            keep_tile(keep, drop, b, h, g.hq, qt.i0, j0, g.sk)
            apply_keep(p, keep, drop.scale)
        np.dot(p, v2[qt.kv0 + j0:qt.kv0 + j0 + c], pv)
        rescale_add(acc, alpha, pv)
    _finish_rows(acc, m, l, out2[qt.row0:qt.row0 + r], lse1[qt.row0:qt.row0 + r])


@njit(nogil=True, cache=True)
def forward(q2, k2, v2, out2, lse1, geom, vis, mods, drop, scale, head_map, tlo, thi, t_start,
            t_stop):
    """Forward: one task per (batch, query head, query tile), tasks ``t_start .. t_stop - 1`` of
    the ``B * Hq * n_query_tiles`` (the caller may split a call to report progress); each writes
    its rows of ``out2``/``lse1``."""
    nbq = (geom.sq + geom.block_q - 1) // geom.block_q
    for t in range(t_start, t_stop):
        b, rem = divmod(np.int64(t), geom.hq * nbq)
        h, ti = divmod(rem, nbq)
        _forward_task(q2, k2, v2, out2, lse1, geom, vis, mods, drop, scale, head_map, tlo, thi,
                      b, h, ti)


@njit(cache=True)
def _work_buffers(bq, bk, dtype):
    n = bq * bk
    return (np.empty(n, dtype), np.empty(n), np.empty(n), np.empty(n, dtype), np.empty(n, dtype),
            np.empty(n, dtype), np.empty(n, dtype), np.empty(n, np.bool_))


@njit(cache=True)
def _grad_tile(spec, mods, drop, qt, tj, j0, code, qrows, kt, vt, dot, lse_rows, delta_rows, bufs,
               dbias, per_key):
    """Recompute one tile's P from the saved LSE and its score gradient.

    ``qt`` is the query tile and ``qrows``/``dot`` its rows of q and dO; ``kt``/``vt`` the key
    tile's rows from ``j0``. Returns ``pu`` (P with dropout: feeds dV) and ``ds`` (the gradient
    w.r.t. ``q.k / scale``, i.e. without the factor ``scale``, which the caller applies once to the
    accumulated dQ/dK), both in the storage dtype. With a ``dbias`` buffer (the key-tile pass, when
    there is a bias; None otherwise) it adds the tile's bias gradient into it."""
    r, c = dot.shape[0], kt.shape[0]
    sbuf, wbuf, tbuf, pbuf, dpbuf, pubuf, dsbuf, keepbuf = bufs
    s, t, p = tile2d(sbuf, r, c), tile2d(tbuf, r, c), tile2d(pbuf, r, c)
    np.dot(qrows, kt.T, s)
    if mods is None:
        if code == PARTIAL:
            hide_invisible(s, spec.vis, qt, tj, j0)
        probs_from_lse(s, spec.scale, lse_rows, p)
    else:
        w = tile2d(wbuf, r, c)
        _modified(spec, mods, qt, s, w, t, code, tj, j0)
        probs_from_lse(w, 1.0, lse_rows, p)
    dp = tile2d(dpbuf, r, c)
    np.dot(dot, vt.T, dp)
    pu, ds = tile2d(pubuf, r, c), tile2d(dsbuf, r, c)
    if drop is None:
        score_grads(p, dp, delta_rows, ds)
    else:
        keep = tile2d(keepbuf, r, c)
        keep_tile(keep, drop, qt.b, qt.h, spec.geom.hq, qt.i0, j0, spec.geom.sk)
        dropped_score_grads(p, dp, keep, drop.scale, delta_rows, pu, ds)
    if dbias is not None:  # the key-tile pass of a call with score mods (mods is then a record)
        if mods.has_bias:
            accumulate_dbias(ds, dbias, per_key, qt.b, qt.h, qt.i0, j0, tj)
    if mods is not None:
        if mods.softcap > 0.0:
            softcap_grads(ds, t)
    if drop is None:
        return p, ds
    return pu, ds


@njit(cache=True)
def _kv_task(q2, k2, v2, do2, lse1, delta1, geom, vis, mods, drop, scale, head_map, gptr, gidx,
             ilo, ihi, dk2, dv2, dbias, per_key, b, hkv, tj):
    spec = Spec(geom, vis, scale, head_map)
    g = geom
    kt_ = key_tile(spec, b, hkv, tj)
    j0, c = kt_.j0, kt_.cols
    d, dv = q2.shape[1], v2.shape[1]
    kt, vt = k2[kt_.kv0 + j0:kt_.kv0 + j0 + c], v2[kt_.kv0 + j0:kt_.kv0 + j0 + c]
    dkacc, dvacc = np.zeros((c, d)), np.zeros((c, dv))
    tmpk, tmpv = np.empty((c, d), q2.dtype), np.empty((c, dv), q2.dtype)
    bufs = _work_buffers(g.block_q, g.block_k, q2.dtype)
    for gi in range(gptr[hkv], gptr[hkv + 1]):
        h = gidx[gi]
        for ti in range(ilo[tj], ihi[tj]):
            qt = query_tile(spec, b, h, ti)
            code = spec.vis.layout[qt.lb, qt.lh, ti, tj]
            if code == EMPTY:
                continue
            rows = slice(qt.row0, qt.row0 + qt.rows)
            qrows, dot = q2[rows], do2[rows]
            pu, ds = _grad_tile(spec, mods, drop, qt, tj, j0, code, qrows, kt, vt, dot,
                                lse1[rows], delta1[rows], bufs, dbias, per_key)
            np.dot(pu.T, dot, tmpv)
            add_into(dvacc, tmpv)
            np.dot(ds.T, qrows, tmpk)
            add_into(dkacc, tmpk)
    store_scaled(dk2[kt_.kv0 + j0:kt_.kv0 + j0 + c], dkacc, spec.scale)
    store_scaled(dv2[kt_.kv0 + j0:kt_.kv0 + j0 + c], dvacc, 1.0)


@njit(nogil=True, cache=True)
def backward_kv(q2, k2, v2, do2, lse1, delta1, geom, vis, mods, drop, scale, head_map, gptr, gidx,
                ilo, ihi, dk2, dv2, dbias, per_key, serial_bh, t_start, t_stop):
    """dK, dV: one task per (key tile, batch, KV head), looping over the query heads that read the
    KV head (GQA sums there) and the query tiles; tasks ``t_start .. t_stop - 1``. With a bias
    gradient (``dbias`` not None), tasks are whole key tiles (``serial_bh``) so a broadcast bias is
    never written by two tasks."""
    inner = geom.batch * geom.hkv if serial_bh else 1
    for t in range(t_start, t_stop):
        for u in range(inner):
            tj, rem = divmod(np.int64(t) * inner + u, geom.batch * geom.hkv)
            b, kh = divmod(rem, geom.hkv)
            _kv_task(q2, k2, v2, do2, lse1, delta1, geom, vis, mods, drop, scale, head_map, gptr,
                     gidx, ilo, ihi, dk2, dv2, dbias, per_key, b, kh, tj)


@njit(cache=True)
def _q_task(q2, k2, v2, do2, lse1, delta1, geom, vis, mods, drop, scale, head_map, tlo, thi, dq2,
            b, h, ti):
    spec = Spec(geom, vis, scale, head_map)
    g = geom
    qt = query_tile(spec, b, h, ti)
    rows = slice(qt.row0, qt.row0 + qt.rows)
    qrows, dot = q2[rows], do2[rows]
    lse_rows, delta_rows = lse1[rows], delta1[rows]
    dqacc, tmp = np.zeros((qt.rows, q2.shape[1])), np.empty((qt.rows, q2.shape[1]), q2.dtype)
    bufs = _work_buffers(g.block_q, g.block_k, q2.dtype)
    for tj in range(tlo[ti], thi[ti]):
        code = spec.vis.layout[qt.lb, qt.lh, ti, tj]
        if code == EMPTY:
            continue
        j0 = tj * g.block_k
        c = min(g.block_k, g.sk - j0)
        kt, vt = k2[qt.kv0 + j0:qt.kv0 + j0 + c], v2[qt.kv0 + j0:qt.kv0 + j0 + c]
        _, ds = _grad_tile(spec, mods, drop, qt, tj, j0, code, qrows, kt, vt, dot, lse_rows,
                           delta_rows, bufs, None, False)
        np.dot(ds, kt, tmp)
        add_into(dqacc, tmp)
    store_scaled(dq2[rows], dqacc, spec.scale)


@njit(nogil=True, cache=True)
def backward_q(q2, k2, v2, do2, lse1, delta1, geom, vis, mods, drop, scale, head_map, tlo, thi, dq2,
               t_start, t_stop):
    """dQ: one task per (batch, query head, query tile), tasks ``t_start .. t_stop - 1``, P
    recomputed from the saved LSE."""
    nbq = (geom.sq + geom.block_q - 1) // geom.block_q
    for t in range(t_start, t_stop):
        b, rem = divmod(np.int64(t), geom.hq * nbq)
        h, ti = divmod(rem, nbq)
        _q_task(q2, k2, v2, do2, lse1, delta1, geom, vis, mods, drop, scale, head_map, tlo, thi,
                dq2, b, h, ti)

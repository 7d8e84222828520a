"""The linear scan and RWKV's WKV on the CPU (the numpy backend's definitions, made fast).

``linear_scan`` evaluates the recurrence of :meth:`refattn.backends.base.Backend.linear_scan`
(decay first, then write; optional delta rule) in O(L * Dk * Dv) time with an O(Dk * Dv) state per
(batch, head). Arrays arrive flattened to ``(B*H, L, D)`` (C order); the state is fla's ``(Dk, Dv)``.

* ``form="recurrent"``: one parallel task per (batch, head), the steps in order -- the loop of the
  definition, written out (:func:`_step`, :func:`_read`).
* ``form="chunked"`` / ``"parallel"`` (one chunk of ``L`` steps): three passes,

  1. parallel over (batch, head, chunk): what each chunk does on its own, from a zero state -- its
     outputs (the masked "attention" matrix ``A[t, i] = sum_c q_tc k_ic exp(G_tc - G_ic)`` times
     the values, ``G`` the cumulative log-gate from the chunk's start; with the delta rule the
     values are first solved for with the chunk's unit lower-triangular WY system), the state it
     adds and the linear map ``T`` it applies to the state it receives (a diagonal, or with the
     delta rule a ``Dk x Dk`` matrix);
  2. sequential over the chunks of each (batch, head), parallel over (batch, head): the state at
     every chunk's start, ``S_{c+1} = T_c S_c + dS_c`` -- ``L / chunk`` short steps;
  3. parallel over (batch, head, chunk): each chunk's outputs corrected by the state it received.

  So the work is parallel over chunks even at ``B = H = 1``. Tile products go through ``np.dot``
  (BLAS pinned to one thread by the caller) on C-contiguous operands only. Within a chunk the
  decayed products are ``(q e^{G}) . (k e^{-G})`` when every ``|G|`` in the chunk is at most
  :data:`SAFE_SPAN` (no overflow, and no precision lost: each factor's exponent is exact),
  otherwise the per-pair ``exp(G_tc - G_ic)`` of the definition.
* ``linear_scan_backward``: the adjoint recurrence, parallel over (batch, head); the forward states
  are kept every ``chunk`` steps and recomputed chunk by chunk on the way back.
* ``wkv``: RWKV-4's running-maximum recurrence, parallel over (batch, block of channels).

numba keys its on-disk cache on this file: the kernels here recompile when it changes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: largest |cumulative log-gate| inside a chunk for which the factorised products are used
#: (e^100 ~ 3e43 leaves q, k of magnitude up to ~1e265 representable after scaling)
SAFE_SPAN = 100.0
#: channels per WKV task
WKV_BLOCK = 64


# -- one step of the recurrence ----------------------------------------------------------------------
@njit(cache=True)
def _decay(s, gt, has_gate):
    """``S = diag(exp(g_t)) S`` (``gt`` has one entry, or one per key dim)."""
    if not has_gate:
        return
    dk, dv = s.shape
    per_dim = gt.shape[0] > 1
    for c in range(dk):
        a = np.exp(gt[c] if per_dim else gt[0])
        for j in range(dv):
            s[c, j] *= a


@njit(cache=True)
def _write(s, kt, vt, bt, has_beta, w):
    """``S += k w^T`` with ``w = v`` or, for the delta rule, ``w = beta (v - S^T k)`` (kept in ``w``)."""
    dk, dv = s.shape
    for j in range(dv):
        w[j] = vt[j]
    if has_beta:
        for c in range(dk):
            for j in range(dv):
                w[j] -= s[c, j] * kt[c]
        for j in range(dv):
            w[j] *= bt
    for c in range(dk):
        for j in range(dv):
            s[c, j] += kt[c] * w[j]


@njit(cache=True)
def _read(s, x, out):
    """``out = S^T x``."""
    dk, dv = s.shape
    for j in range(dv):
        out[j] = 0.0
    for c in range(dk):
        for j in range(dv):
            out[j] += s[c, j] * x[c]


@njit(cache=True, parallel=True)
def recurrent(q, k, v, g, beta, has_gate, has_beta, s, o):
    """The definition, one (batch, head) per task; ``s`` holds the initial states and receives the
    final ones."""
    nh, n, _ = q.shape
    for h in prange(nh):
        w = np.empty(v.shape[2])
        st = s[h]
        for t in range(n):
            _decay(st, g[h, t], has_gate)
            _write(st, k[h, t], v[h, t], beta[h, t], has_beta, w)
            _read(st, q[h, t], o[h, t])


# -- chunked: pass 1, a chunk on its own ------------------------------------------------------------
@njit(cache=True)
def _cumulative(g, t0, n, has_gate):
    """``G[t] = sum_{s <= t} g[t0 + s]``: the log-decay from the chunk's start to step t."""
    G = np.zeros((n, g.shape[1]))
    if has_gate:
        for t in range(n):
            for c in range(g.shape[1]):
                G[t, c] = g[t0 + t, c] + (G[t - 1, c] if t > 0 else 0.0)
    return G


@njit(cache=True)
def _transposed(a):
    """A C-contiguous copy of ``a.T`` (numba's ``np.dot`` is slow on a transposed view)."""
    out = np.empty((a.shape[1], a.shape[0]))
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j, i] = a[i, j]
    return out


@njit(cache=True)
def _per_key(G, d):
    """``G`` ``(n, 1 | d)`` as ``(n, d)`` (a per-head gate repeated over the key dims)."""
    if G.shape[1] == d:
        return G
    out = np.empty((G.shape[0], d))
    for t in range(G.shape[0]):
        for c in range(d):
            out[t, c] = G[t, 0]
    return out


@njit(cache=True)
def _scale_rows(x, e):
    """``x[t, c] * e[t, c]`` with ``e`` ``(n, 1 | d)``: a new array."""
    n, d = x.shape
    out = np.empty((n, d))
    per_dim = e.shape[1] > 1
    for t in range(n):
        if per_dim:
            for c in range(d):
                out[t, c] = x[t, c] * e[t, c]
        else:
            et = e[t, 0]
            for c in range(d):
                out[t, c] = x[t, c] * et
    return out


@njit(cache=True)
def _scaled_transposed(y, e):
    """``(y * e).T`` as a C-contiguous ``(d, n)`` array, ``e`` ``(n, 1 | d)``, in one pass."""
    n, d = y.shape
    out = np.empty((d, n))
    per_dim = e.shape[1] > 1
    for i in range(n):
        for c in range(d):
            out[c, i] = y[i, c] * (e[i, c] if per_dim else e[i, 0])
    return out


@njit(cache=True)
def _largest_magnitude(G):
    top = 0.0
    for t in range(G.shape[0]):
        for c in range(G.shape[1]):
            top = max(top, abs(G[t, c]))
    return top


@njit(cache=True)
def _decayed_products(x, y, G, has_gate, strict, out):
    """``out[t, i] = sum_c x_tc y_ic exp(G_tc - G_ic)`` for ``i <= t`` (``i < t`` if ``strict``),
    0 above (``G`` has one column, or one per key dim)."""
    n, d = x.shape
    safe = _largest_magnitude(G) <= SAFE_SPAN if has_gate else True
    if not has_gate or G.shape[1] == 1 or safe:
        if has_gate and safe:  # x e^{G} . y e^{-G}: no overflow possible, no per-pair exponential
            np.dot(_scale_rows(x, np.exp(G)), _scaled_transposed(y, np.exp(-G)), out)
        else:
            np.dot(x, _transposed(y), out)
        if has_gate and not safe:  # one gate per head: the pair's factor exp(G_t - G_i) alone
            for t in range(n):
                for i in range(t + (0 if strict else 1)):
                    out[t, i] *= np.exp(G[t, 0] - G[i, 0])
        for t in range(n):
            for i in range(t + (0 if strict else 1), n):
                out[t, i] = 0.0
        return
    for t in range(n):  # strong per-key-dim decay: the exponent per pair, as in the definition
        for i in range(n):
            acc = 0.0
            if i < t or (i == t and not strict):
                for c in range(d):
                    acc += x[t, c] * y[i, c] * np.exp(G[t, c] - G[i, c])
            out[t, i] = acc


@njit(cache=True)
def _received(qc, G, has_gate):
    """Rows ``q_t e^{G_t}``: how step t of a chunk reads the state the chunk received."""
    return _scale_rows(qc, np.exp(G)) if has_gate else qc.copy()


@njit(cache=True)
def _chunk_local(q, k, v, g, beta, has_gate, has_beta, t0, n, o, p, ds, tr):
    """Chunk ``[t0, t0 + n)`` of one (batch, head) from a zero state: its outputs into ``o``, the
    state ``ds`` it adds, its transition ``tr`` (row 0 the diagonal without the delta rule, else
    the Dk x Dk matrix) and, with the delta rule, the rows ``p`` that turn a received state into
    output corrections (without it they are :func:`_received`, recomputed in pass 3)."""
    dk, dv = q.shape[1], v.shape[1]
    qc, kc, vc = q[t0:t0 + n], k[t0:t0 + n], v[t0:t0 + n]
    G = _cumulative(g, t0, n, has_gate)
    gk = G.shape[1]
    up = np.exp(G)  # decay from the chunk's start to step t
    to_end = np.empty((n, gk))  # decay from step t to the chunk's end
    for t in range(n):
        for c in range(gk):
            to_end[t, c] = np.exp(G[n - 1, c] - G[t, c])
    scores = np.empty((n, n))
    _decayed_products(qc, kc, G, has_gate, False, scores)
    kd = _scaled_transposed(kc, to_end) if has_gate else _transposed(kc)  # decayed to the end, (Dk, n)
    oc = o[t0:t0 + n]
    if not has_beta:
        np.dot(scores, vc, oc)
        np.dot(kd, vc, ds)
        for c in range(dk):
            tr[0, c] = up[n - 1, c if gk > 1 else 0]
        return
    # delta rule: (I + diag(beta) A) [W | M] = diag(beta) [V | K e^G], A strictly lower
    a = np.empty((n, n))
    _decayed_products(kc, kc, G, has_gate, True, a)
    wm = np.empty((n, dv + dk))
    for t in range(n):
        bt = beta[t0 + t]
        for j in range(dv):
            wm[t, j] = bt * vc[t, j]
        for c in range(dk):
            wm[t, dv + c] = bt * kc[t, c] * up[t, c if gk > 1 else 0]
        for i in range(t):  # forward substitution
            f = bt * a[t, i]
            for j in range(dv + dk):
                wm[t, j] -= f * wm[i, j]
    w, m = np.ascontiguousarray(wm[:, :dv]), np.ascontiguousarray(wm[:, dv:])
    np.dot(scores, w, oc)
    pc = p[t0:t0 + n]
    pc[:, :] = _received(qc, G, has_gate) - np.dot(scores, m)
    np.dot(kd, w, ds)
    tr[:, :] = -np.dot(kd, m)
    for c in range(dk):
        tr[c, c] += up[n - 1, c if gk > 1 else 0]


@njit(cache=True, parallel=True)
def chunked(q, k, v, g, beta, has_gate, has_beta, chunk, s, o, p, ds, tr):
    """The three passes of the module docstring. ``s`` holds the initial states and receives the
    final ones; ``p`` (like ``q``, with the delta rule only), ``ds`` ``(B*H, nc, Dk, Dv)`` and ``tr``
    are work arrays."""
    nh, n, _ = q.shape
    nc = (n + chunk - 1) // chunk
    for task in prange(nh * nc):  # 1. every chunk on its own
        h, c = task // nc, task % nc
        t0 = c * chunk
        _chunk_local(q[h], k[h], v[h], g[h], beta[h], has_gate, has_beta, t0, min(chunk, n - t0),
                     o[h], p[h], ds[h, c], tr[h, c])
    for h in prange(nh):  # 2. the state at every chunk's start (kept in ds)
        st = s[h]
        for c in range(nc):
            add = ds[h, c]
            if has_beta:
                nxt = np.dot(tr[h, c], st) + add
                add[:, :] = st
                st[:, :] = nxt
            else:  # S <- diag(T) S + dS, and dS <- the old S, in one pass
                for r in range(st.shape[0]):
                    a = tr[h, c, 0, r]
                    for j in range(st.shape[1]):
                        old = st[r, j]
                        st[r, j] = a * old + add[r, j]
                        add[r, j] = old
    for task in prange(nh * nc):  # 3. outputs corrected by the state each chunk received
        h, c = task // nc, task % nc
        t0 = c * chunk
        t1 = min(n, t0 + chunk)
        if has_beta:
            o[h, t0:t1] += np.dot(p[h, t0:t1], ds[h, c])
        elif has_gate:
            G = _cumulative(g[h], t0, t1 - t0, has_gate)
            o[h, t0:t1] += np.dot(_received(q[h, t0:t1], G, has_gate), ds[h, c])
        else:
            o[h, t0:t1] += np.dot(q[h, t0:t1], ds[h, c])


# -- the adjoint ------------------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def backward(q, k, v, do, g, beta, has_gate, has_beta, chunk, s0, ds_end, starts,
             dq, dk, dv, dg, dbeta, dinit):
    """Reverse-mode derivative of :func:`recurrent` (formulas in the numpy backend's
    ``linear_scan_backward``); ``starts`` ``(B*H, nc, Dk, Dv)`` keeps the checkpoints."""
    nh, n, dkk = q.shape
    dvv = v.shape[2]
    for h in prange(nh):
        st = s0[h].copy()
        w = np.empty(dvv)
        for t in range(n):
            if t % chunk == 0:
                starts[h, t // chunk] = st
            _decay(st, g[h, t], has_gate)
            _write(st, k[h, t], v[h, t], beta[h, t], has_beta, w)
        ds = ds_end[h].copy()
        decayed = np.empty((chunk, dkk, dvv))
        after = np.empty((chunk, dkk, dvv))
        du = np.empty(dvv)
        for c in range((n + chunk - 1) // chunk - 1, -1, -1):
            t0 = c * chunk
            m = min(chunk, n - t0)
            st[:, :] = starts[h, c]
            for j in range(m):  # recompute the chunk's states
                _decay(st, g[h, t0 + j], has_gate)
                decayed[j] = st
                _write(st, k[h, t0 + j], v[h, t0 + j], beta[h, t0 + j], has_beta, w)
                after[j] = st
            for j in range(m - 1, -1, -1):
                t = t0 + j
                sd, sa = decayed[j], after[j]
                kt, vt, qt, dot = k[h, t], v[h, t], q[h, t], do[h, t]
                for c2 in range(dkk):  # o_t = S_t^T q_t
                    acc = 0.0
                    for i in range(dvv):
                        acc += sa[c2, i] * dot[i]
                        ds[c2, i] += qt[c2] * dot[i]
                    dq[h, t, c2] = acc
                if has_beta:  # S_t = S' + k (beta u)^T, u = v - S'^T k
                    bt = beta[h, t]
                    _read(sd, kt, w)
                    dbt = 0.0
                    for i in range(dvv):
                        u = vt[i] - w[i]
                        dw = 0.0
                        for c2 in range(dkk):
                            dw += ds[c2, i] * kt[c2]
                        du[i] = bt * dw
                        dbt += dw * u
                        w[i] = bt * u
                        dv[h, t, i] = du[i]
                    dbeta[h, t] = dbt
                    for c2 in range(dkk):
                        acc = 0.0
                        for i in range(dvv):
                            acc += ds[c2, i] * w[i] - sd[c2, i] * du[i]
                            ds[c2, i] -= kt[c2] * du[i]
                        dk[h, t, c2] = acc
                else:  # S_t = S' + k v^T
                    for c2 in range(dkk):
                        acc = 0.0
                        for i in range(dvv):
                            acc += ds[c2, i] * vt[i]
                        dk[h, t, c2] = acc
                    for i in range(dvv):
                        acc = 0.0
                        for c2 in range(dkk):
                            acc += ds[c2, i] * kt[c2]
                        dv[h, t, i] = acc
                if has_gate:  # S' = diag(exp(g)) S_{t-1}
                    per_dim = dg.shape[2] > 1
                    if not per_dim:
                        dg[h, t, 0] = 0.0
                    for c2 in range(dkk):
                        acc = 0.0
                        for i in range(dvv):
                            acc += ds[c2, i] * sd[c2, i]
                        a = np.exp(g[h, t, c2] if per_dim else g[h, t, 0])
                        for i in range(dvv):
                            ds[c2, i] *= a
                        if per_dim:
                            dg[h, t, c2] = acc
                        else:
                            dg[h, t, 0] += acc
        dinit[h] = ds


# -- RWKV-4 ----------------------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def wkv(k, v, w, u, state, y):
    """The running-maximum WKV recurrence; ``state (B, 3, C)`` = ``(a, b, p)`` in and out."""
    nb, n, nch = k.shape
    blocks = (nch + WKV_BLOCK - 1) // WKV_BLOCK
    for task in prange(nb * blocks):
        b = task // blocks
        c0 = (task % blocks) * WKV_BLOCK
        for t in range(n):
            for c in range(c0, min(nch, c0 + WKV_BLOCK)):
                a, den, p = state[b, 0, c], state[b, 1, c], state[b, 2, c]
                kt, vt = k[b, t, c], v[b, t, c]
                m = max(p, u[c] + kt)
                e1, e2 = np.exp(p - m), np.exp(u[c] + kt - m)
                y[b, t, c] = (e1 * a + e2 * vt) / (e1 * den + e2)
                m = max(p - w[c], kt)
                e1, e2 = np.exp(p - w[c] - m), np.exp(kt - m)
                state[b, 0, c] = e1 * a + e2 * vt
                state[b, 1, c] = e1 * den + e2
                state[b, 2, c] = m


# -- the Python side: flatten, allocate, call ------------------------------------------------------
def _flat(a, width=None):
    a = np.ascontiguousarray(a, dtype=np.float64)
    return a.reshape((-1,) + a.shape[2:]) if width is None else a.reshape(-1, a.shape[2], width)


def _operands(q, k, v, decay, beta):
    b, h, n, dk = q.shape
    g = np.zeros((b * h, n, 1)) if decay is None else _flat(
        decay if np.ndim(decay) == 4 else np.asarray(decay)[..., None])
    bt = np.zeros((b * h, n)) if beta is None else _flat(beta)
    return _flat(q), _flat(k), _flat(v), g, bt


def linear_scan(q, k, v, *, decay=None, beta=None, form="recurrent", chunk_size=64,
                initial_state=None):
    from refattn.backends.numpy_ import SCAN_FORMS
    from refattn.errors import ParameterError

    if form not in SCAN_FORMS:
        raise ParameterError(f"form: expected one of {', '.join(map(repr, SCAN_FORMS))}, got {form!r}")
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    s = (np.zeros((b * h, dk, dv)) if initial_state is None
         else np.array(initial_state, dtype=np.float64).reshape(b * h, dk, dv))
    o = np.zeros((b * h, n, dv))
    if b * h == 0 or n == 0:
        return o.reshape(b, h, n, dv), s.reshape(b, h, dk, dv)
    q2, k2, v2, g, bt = _operands(q, k, v, decay, beta)
    if form == "recurrent":
        recurrent(q2, k2, v2, g, bt, decay is not None, beta is not None, s, o)
    else:
        chunk = n if form == "parallel" else int(chunk_size)
        nc = -(-n // chunk)
        tr = np.zeros((b * h, nc, dk, dk) if beta is not None else (b * h, nc, 1, dk))
        p = np.empty((b * h, n, dk) if beta is not None else (b * h, 1, 1))
        chunked(q2, k2, v2, g, bt, decay is not None, beta is not None, chunk, s, o, p,
                np.empty((b * h, nc, dk, dv)), tr)
    return o.reshape(b, h, n, dv), s.reshape(b, h, dk, dv)


def linear_scan_backward(q, k, v, dout, *, decay=None, beta=None, chunk_size=64,
                         initial_state=None, dfinal_state=None):
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    q2, k2, v2, g, bt = _operands(q, k, v, decay, beta)
    s0 = (np.zeros((b * h, dk, dv)) if initial_state is None
          else np.array(initial_state, dtype=np.float64).reshape(b * h, dk, dv))
    ds_end = (np.zeros((b * h, dk, dv)) if dfinal_state is None
              else np.array(dfinal_state, dtype=np.float64).reshape(b * h, dk, dv))
    chunk = max(1, min(int(chunk_size), n))
    grads = {"q": np.zeros(q2.shape), "k": np.zeros(k2.shape), "v": np.zeros(v2.shape)}
    dg, dbeta, dinit = np.zeros(g.shape), np.zeros(bt.shape), ds_end.copy()
    if b * h and n:
        backward(q2, k2, v2, _flat(dout), g, bt, decay is not None, beta is not None, chunk, s0,
                 ds_end, np.empty((b * h, -(-n // chunk), dk, dv)), grads["q"], grads["k"],
                 grads["v"], dg, dbeta, dinit)
    out = {"q": grads["q"].reshape(q.shape), "k": grads["k"].reshape(k.shape),
           "v": grads["v"].reshape(v.shape)}
    if decay is not None:
        out["decay"] = dg.reshape(np.shape(decay))
    if beta is not None:
        out["beta"] = dbeta.reshape(np.shape(beta))
    if initial_state is not None:
        out["initial_state"] = dinit.reshape(b, h, dk, dv)
    return out


def run_wkv(k, v, *, w, u, initial_state=None):
    b, n, c = k.shape
    if initial_state is None:
        state = np.zeros((b, 3, c))
        state[:, 2] = -np.inf
    else:
        state = np.array(initial_state, dtype=np.float64)
    y = np.zeros((b, n, c))
    if y.size:
        wkv(np.ascontiguousarray(k, np.float64), np.ascontiguousarray(v, np.float64),
            np.ascontiguousarray(w, np.float64), np.ascontiguousarray(u, np.float64), state, y)
    return y, state

"""The numpy backend: the readable definition of every primitive, in float64.

It works in chunks of query rows so that the memory it needs is ``O(chunk * Sk)`` per head
rather than ``O(Sq * Sk)``: a 32K-token reference fits. Each chunk is plain textbook attention:
scores, score modifications, mask, a max-subtracted softmax, dropout, ``P @ V``.

A chunk computes scores only for the keys some of its queries can see: the Pattern's
``block_layout`` at (chunk x :data:`KEY_BLOCK`) tiles names the key blocks that hold a visible pair,
and the chunk works on those, as contiguous segments of ``k`` and ``v`` (views, never copies). So
the cost follows the visible pairs -- half for causal, O(N w) for a window -- while every visible
pair is still computed and masked exactly as the definition says. The forward spreads its chunks
over ``threads`` threads (numpy releases the GIL in matmul and exp; BLAS pinned to one thread
meanwhile); chunks own their rows, so the result does not depend on the thread count. The backward
accumulates dK and dV over chunks in order, on one thread.

Low precision (the ``rounding`` hook)
-------------------------------------
The same loop, given a ``rounding`` (:class:`refattn.numerics.Rounding`), computes what a kernel
storing its data in a low-precision dtype computes (DESIGN section 4): the inputs rounded to the
dtype, scores, softmax and accumulation in ``rounding.work`` (float32), the probabilities rounded
to the dtype before ``P @ V``, the output rounded; in the backward ``dO`` and ``dS`` rounded before
their products and the gradients rounded. Without it every ``store`` is the identity and the work
dtype is float64: the float64 definition.
"""

from __future__ import annotations

import numpy as np

import os
from concurrent.futures import ThreadPoolExecutor

from refattn import dropout as philox
from refattn.patterns import EMPTY
from .base import Backend

#: target number of score elements per chunk (B * Hq * rows * Sk); 2**22 doubles = 32 MiB
CHUNK_ELEMENTS = 1 << 22
#: keys per block when a chunk looks for the keys it can see
KEY_BLOCK = 64


def _row_chunks(b, h, sq, sk, chunk_elements):
    rows = max(1, chunk_elements // max(1, b * h * sk))
    for start in range(0, sq, rows):
        yield slice(start, min(sq, start + rows))


def visible_segments(pattern, b, h, sq, sk, chunk_elements):
    """``[(rows, segments)]``: each chunk of query rows with the contiguous runs of key blocks
    (slices of ``range(sk)``) that hold a pair one of its queries can see -- empty when none."""
    rows_per = max(1, chunk_elements // max(1, b * h * sk))
    if sq == 0 or sk == 0:
        return [(rows, []) for rows in _row_chunks(b, h, sq, sk, chunk_elements)]
    seen = (pattern.block_layout(rows_per, KEY_BLOCK, sq=sq, sk=sk) != EMPTY).any(axis=(0, 1))
    out = []
    for c, rows in enumerate(_row_chunks(b, h, sq, sk, chunk_elements)):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], seen[c].astype(np.int8), [0]])))
        out.append((rows, [slice(int(a) * KEY_BLOCK, min(sk, int(z) * KEY_BLOCK))
                           for a, z in zip(edges[::2], edges[1::2])]))
    return out


def _width(segments) -> int:
    return sum(s.stop - s.start for s in segments)


def _locals(segments):
    """``(segment, local slice)``: where each segment's columns sit in the chunk's gathered scores."""
    at = 0
    for seg in segments:
        n = seg.stop - seg.start
        yield seg, slice(at, at + n)
        at += n


def _take_rows(a, rows):
    """Rows ``rows`` of a 4-d array broadcastable over dim 2 (a size-1 dim is kept as is)."""
    return a if a.shape[2] == 1 else a[:, :, rows]


def _take_cols(a, cols):
    """Columns ``cols`` of a 4-d array broadcastable over dim 3 (a size-1 dim is kept as is)."""
    return a if a.shape[3] == 1 else a[..., cols]


class NumpyBackend(Backend):
    name = "numpy"
    compute_dtypes = ("float64",)
    supports_rounding = True

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS, threads=None):
        self.chunk_elements = chunk_elements
        if threads is None:
            try:
                threads = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                threads = os.cpu_count() or 1
        self.threads = max(1, int(threads))

    @property
    def xp(self):
        return np

    # -- precision: the identity without a rounding hook -----------------------------------------
    @property
    def work(self):
        """The dtype of the arithmetic: float64, or the rounding hook's (float32)."""
        return np.float64 if self.rounding is None else self.rounding.work

    def _input(self, x, name):
        """An input as the kernel stores it (rounded, range-checked), in the work dtype."""
        return x if self.rounding is None else self.rounding.inputs(x, name)

    def _store(self, x):
        """An intermediate (P, dS) or a result as the kernel stores it."""
        return x if self.rounding is None else self.rounding.store(x)

    def _result(self, x):
        """A returned array as the kernel stores it, as float64 values."""
        return x if self.rounding is None else self.rounding.result(x)

    def _used(self):
        if self.rounding is not None:
            self.rounding.calls += 1

    # -- the pieces shared by forward and backward -------------------------------------------
    def scores(self, q_rows, k, rows, sq, sk, *, pattern, scale, score_mod, cols=slice(None)):
        """Masked scores of query rows ``rows`` against keys ``cols``: ``(B, Hq, r, c)`` in the work
        dtype, hidden pairs ``-inf``. ``k`` holds the keys ``cols`` only (all of them by default).

        Also returns ``tanh(s / softcap)`` (needed by the backward) or None.
        """
        work = self.work
        s = q_rows @ np.swapaxes(k, -1, -2)
        s *= work(scale)  # in place, here and below: each chunk-sized temporary is a fresh mmap
        t = None
        if score_mod is not None:
            if score_mod.softcap is not None:
                t = np.tanh(s / score_mod.softcap)
                s = score_mod.softcap * t
            if score_mod.alibi_slopes is not None:
                off = pattern.band(sq, sk)[0]
                i = np.arange(sq)[rows]
                j = np.arange(sk)[cols]
                slopes = score_mod.alibi_slopes[None, :, None, None]
                if score_mod.alibi_form == "flash":
                    s = s + slopes * j[None, None, None, :]
                else:
                    s = s - slopes * np.abs(i[:, None] + off - j[None, :])[None, None]
            if score_mod.bias is not None:
                s = s + _take_cols(_take_rows(score_mod.bias, rows), cols)
        visible = pattern.mask(sq, sk, rows, cols)
        s = s.astype(work, copy=False)
        np.copyto(s, -np.inf, where=np.logical_not(visible))  # hidden pairs: -inf
        return s, (None if t is None else t.astype(work, copy=False))

    def dropout_keep(self, dropout, b, h, sq, sk, rows, segments=None):
        """Keep-mask for a chunk (broadcastable to ``(B, Hq, r, Sk)``, or to the chunk's gathered
        ``segments`` of keys), or None without dropout."""
        if dropout is None:
            return None
        if dropout.mask is not None:
            keep = _take_rows(dropout.mask, rows)
        else:
            keep = philox.keep_mask(dropout.seed, dropout.p, b, h, sq, sk, rows, row0=dropout.row0,
                                    col0=dropout.col0, stride=dropout.stride)
        if segments is None or keep.shape[3] == 1:
            return keep
        return np.concatenate([keep[..., seg] for seg in segments], axis=-1)

    def chunk_scores(self, q_rows, k, rows, segments, sq, sk, *, pattern, scale, score_mod):
        """:meth:`scores` of the chunk's rows against its visible key ``segments``, side by side:
        ``(s, t)`` with the segments' columns concatenated in order."""
        parts = [self.scores(q_rows, k[:, :, seg], rows, sq, sk, pattern=pattern, scale=scale,
                             score_mod=score_mod, cols=seg) for seg in segments]
        s = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts], axis=-1)
        if parts[0][1] is None:
            return s, None
        return s, (parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts], axis=-1))

    def _each(self, chunks, work, threaded: bool):
        """Run ``work(rows, segments)`` for every chunk, on the backend's threads when
        ``threaded`` and there is more than one chunk, and report each chunk's share of the
        visible pairs to the progress hook."""
        total = sum((r.stop - r.start) * _width(segs) for r, segs in chunks) or 1

        def one(chunk):
            rows, segs = chunk
            if segs:
                work(rows, segs)
            self.tick((rows.stop - rows.start) * _width(segs) / total)

        if not threaded or self.threads == 1 or len(chunks) < 2:
            for c in chunks:
                one(c)
            return
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=1, user_api="blas"), \
                ThreadPoolExecutor(max_workers=min(self.threads, len(chunks))) as pool:
            for f in [pool.submit(one, c) for c in chunks]:
                f.result()

    # -- primitives ----------------------------------------------------------------------------
    def attend(self, q, k, v, *, pattern, scale, head_map, score_mod=None, sinks=None, dropout=None):
        self._used()
        work = self.work
        b, hq, sq, _ = q.shape
        sk = k.shape[2]
        q = self._input(q, "q")
        # (B, Hq, Sk, .): query head h reads KV head head_map[h]
        k, v = self._input(k[:, head_map], "k"), self._input(v[:, head_map], "v")
        out = np.zeros((b, hq, sq, v.shape[-1]), dtype=work)
        lse = np.full((b, hq, sq), -np.inf, dtype=work)

        def chunk(rows, segs):  # a chunk whose queries see no key keeps out 0 and LSE -inf
            s, _ = self.chunk_scores(q[:, :, rows], k, rows, segs, sq, sk, pattern=pattern,
                                     scale=scale, score_mod=score_mod)
            m = s.max(axis=-1, keepdims=True)
            m = np.where(np.isfinite(m), m, work(0))  # empty rows: every score is -inf
            # e = exp(s - m), then p = e / l, in place in s (a row with l = 0 has e = 0: p = 0)
            e = np.exp(np.subtract(s, m, out=s), out=s)
            l = e.sum(axis=-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.divide(e, l, out=e, where=l > 0)
                lse[:, :, rows] = np.log(l[..., 0]) + m[..., 0]
            keep = self.dropout_keep(dropout, b, hq, sq, sk, rows, segs)
            if keep is not None:
                p = np.where(keep, p * work(dropout.scale), work(0))
            p = self._store(p)  # P as stored before P @ V
            acc = None
            for seg, part in _locals(segs):
                pv = p[..., part] @ v[:, :, seg]
                acc = pv if acc is None else acc + pv
            out[:, :, rows] = acc

        self._each(visible_segments(pattern, b, hq, sq, sk, self.chunk_elements), chunk, True)
        if sinks is not None:
            out = out * self.sink_factor(lse, sinks.astype(work, copy=False))[..., None]
        return self._result(out), lse.astype(np.float64, copy=False)

    @staticmethod
    def sink_factor(lse, sinks):
        """``1 / (1 + exp(sink_h - lse))``: the share of probability the visible keys keep."""
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(sinks[None, :, None] - lse))

    def attend_backward(self, q, k, v, out, lse, dout, *, pattern, scale, head_map, score_mod=None,
                        sinks=None, dropout=None):
        self._used()
        work = self.work
        b, hq, sq, _ = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        q, dout = self._input(q, "q"), self._input(dout, "dout")
        kh, vh = self._input(k[:, head_map], "k"), self._input(v[:, head_map], "v")
        out, lse = out.astype(work, copy=False), lse.astype(work, copy=False)
        dq = np.zeros(q.shape, dtype=work)
        dk_h = np.zeros(kh.shape, dtype=work)
        dv_h = np.zeros(vh.shape, dtype=work)
        bias = None if score_mod is None else score_mod.bias
        dbias = None if bias is None else np.zeros(bias.shape)
        dsinks = None if sinks is None else np.zeros(hq)
        sinks_w = None if sinks is None else sinks.astype(work, copy=False)
        # The softmax normaliser including the sink: P_ij = exp(S_ij - lse_all_i).
        lse_all = lse if sinks is None else np.logaddexp(lse, sinks_w[None, :, None])
        delta = np.sum(dout * out, axis=-1)  # rowsum(dO * O): O is the final output

        def chunk(rows, segs):
            s, t = self.chunk_scores(q[:, :, rows], kh, rows, segs, sq, sk, pattern=pattern,
                                     scale=scale, score_mod=score_mod)
            l_rows = lse_all[:, :, rows, None]
            p = np.exp(s - np.where(np.isfinite(l_rows), l_rows, work(np.inf)))  # empty rows: P = 0
            dp = np.concatenate([dout[:, :, rows] @ np.swapaxes(vh[:, :, seg], -1, -2)
                                 for seg in segs], axis=-1)
            keep = self.dropout_keep(dropout, b, hq, sq, sk, rows, segs)
            p_used = p
            if keep is not None:
                p_used = np.where(keep, p * work(dropout.scale), work(0))
                dp = np.where(keep, dp * work(dropout.scale), work(0))
            p_used = self._store(p_used)
            d_rows = delta[:, :, rows]
            ds = p * (dp - d_rows[..., None])  # gradient w.r.t. the (post-softcap, biased) score
            if dbias is not None:
                rsel = rows if bias.shape[2] > 1 else slice(None)
                if bias.shape[3] > 1:
                    for seg, part in _locals(segs):
                        dbias[..., rsel, seg] += _sum_to(ds[..., part], bias.shape)
                else:
                    dbias[..., rsel, :] += _sum_to(ds, bias.shape)
            if dsinks is not None:
                p_sink = np.exp(sinks_w[None, :, None] - lse_all[:, :, rows])
                dsinks[...] -= np.sum(p_sink * d_rows, axis=(0, 2))
            if t is not None:
                ds = ds * (1 - t * t)
            ds = self._store(ds)  # dS as stored before both products
            acc = None
            for seg, part in _locals(segs):
                dv_h[:, :, seg] += np.swapaxes(p_used[..., part], -1, -2) @ dout[:, :, rows]
                dk_h[:, :, seg] += work(scale) * (np.swapaxes(ds[..., part], -1, -2) @ q[:, :, rows])
                dqs = ds[..., part] @ kh[:, :, seg]
                acc = dqs if acc is None else acc + dqs
            dq[:, :, rows] = work(scale) * acc

        self._each(visible_segments(pattern, b, hq, sq, sk, self.chunk_elements), chunk, False)
        dk = np.zeros(k.shape, dtype=work)
        dv = np.zeros(v.shape, dtype=work)
        np.add.at(dk, (slice(None), head_map), dk_h)  # GQA: a KV head sums over its query heads
        np.add.at(dv, (slice(None), head_map), dv_h)
        extras = {}
        if dbias is not None:
            extras["bias"] = dbias
        if dsinks is not None:
            extras["sinks"] = dsinks
        if self.rounding is not None:  # a low-precision kernel's learnable extras are not emulated
            extras = {}
        return self._result(dq), self._result(dk), self._result(dv), extras

    # -- linear attention and state-space scans ------------------------------------------------
    def linear_scan(self, q, k, v, *, decay=None, beta=None, form="recurrent", chunk_size=64,
                    initial_state=None):
        """See :meth:`refattn.backends.base.Backend.linear_scan`: this is its definition."""
        if form not in SCAN_FORMS:
            from refattn.errors import ParameterError
            raise ParameterError(f"form: expected one of {', '.join(map(repr, SCAN_FORMS))}, "
                                 f"got {form!r}")
        b, h, n, dk = q.shape
        s = _initial(initial_state, b, h, dk, v.shape[-1])
        g = _gates(decay, q.shape)
        if form == "recurrent":
            return _scan_recurrent(q, k, v, g, beta, s)
        return _scan_chunked(q, k, v, g, beta, s, max(1, n) if form == "parallel" else chunk_size)

    def linear_scan_backward(self, q, k, v, dout, *, decay=None, beta=None, chunk_size=64,
                             initial_state=None, dfinal_state=None):
        """The adjoint recurrence (see the base class), checkpointing every ``chunk_size`` steps."""
        b, h, n, dk = q.shape
        dv = v.shape[-1]
        g = _gates(decay, q.shape)
        s = _initial(initial_state, b, h, dk, dv)
        starts = []  # the state before each chunk
        for c0 in range(0, n, chunk_size):
            starts.append(s)
            for t in range(c0, min(n, c0 + chunk_size)):
                s = _step(s, q, k, v, g, beta, t)[1]
        grads = {name: np.zeros(a.shape) for name, a in (("q", q), ("k", k), ("v", v))}
        dg = np.zeros(g.shape)
        dbeta = None if beta is None else np.zeros(beta.shape)
        ds = np.zeros((b, h, dk, dv)) if dfinal_state is None else np.array(dfinal_state, np.float64)
        for ci in reversed(range(len(starts))):
            c0 = ci * chunk_size
            steps = range(c0, min(n, c0 + chunk_size))
            s, decayed, after = starts[ci], {}, {}
            for t in steps:  # recompute the chunk's states from its checkpoint
                decayed[t], s = _step(s, q, k, v, g, beta, t)
                after[t] = s
            for t in reversed(steps):
                sd, st = decayed[t], after[t]
                qt, kt, vt, dot = q[:, :, t], k[:, :, t], v[:, :, t], dout[:, :, t]
                grads["q"][:, :, t] = np.einsum("bhkv,bhv->bhk", st, dot)  # o_t = S_t^T q_t
                ds = ds + qt[..., :, None] * dot[..., None, :]
                if beta is None:  # S_t = S' + k v^T
                    grads["k"][:, :, t] = np.einsum("bhkv,bhv->bhk", ds, vt)
                    grads["v"][:, :, t] = np.einsum("bhkv,bhk->bhv", ds, kt)
                    dsd = ds
                else:  # S_t = S' + k w^T, w = beta u, u = v - S'^T k
                    bt = beta[:, :, t, None]
                    u = vt - np.einsum("bhkv,bhk->bhv", sd, kt)
                    dw = np.einsum("bhkv,bhk->bhv", ds, kt)
                    du = bt * dw
                    dbeta[:, :, t] = np.sum(dw * u, axis=-1)
                    grads["k"][:, :, t] = (np.einsum("bhkv,bhv->bhk", ds, bt * u)
                                           - np.einsum("bhkv,bhv->bhk", sd, du))
                    grads["v"][:, :, t] = du
                    dsd = ds - kt[..., :, None] * du[..., None, :]
                # S' = diag(a) S_{t-1}, a = exp(g_t): dg = a * rowsum(dS' * S_{t-1}) = rowsum(dS' * S')
                dg[:, :, t] = _sum_gate(np.sum(dsd * sd, axis=-1), g.shape[-1])
                ds = np.exp(g[:, :, t])[..., :, None] * dsd
        if decay is not None:
            grads["decay"] = dg.reshape(np.shape(decay))
        if beta is not None:
            grads["beta"] = dbeta
        if initial_state is not None:
            grads["initial_state"] = ds
        return grads

    def wkv(self, k, v, *, w, u, initial_state=None):
        """RWKV-4's WKV, the running-maximum recurrence (see the base class). Per step, vectorised
        over batch and channels: the output mixes the state with the current token (bonus ``u``)
        under the larger of their two exponents; the state then decays by ``e^{-w}`` and takes the
        token in, again under the larger exponent."""
        b, n, c = k.shape
        if initial_state is None:
            a, den, p = np.zeros((b, c)), np.zeros((b, c)), np.full((b, c), -np.inf)
        else:
            a, den, p = (np.array(initial_state[:, i], np.float64) for i in range(3))
        y = np.empty((b, n, c))
        for t in range(n):
            kt, vt = k[:, t], v[:, t]
            m = np.maximum(p, u + kt)
            e1, e2 = np.exp(p - m), np.exp(u + kt - m)
            y[:, t] = (e1 * a + e2 * vt) / (e1 * den + e2)
            m = np.maximum(p - w, kt)
            e1, e2 = np.exp(p - w - m), np.exp(kt - m)
            a, den, p = e1 * a + e2 * vt, e1 * den + e2, m
        return y, np.stack([a, den, p], axis=1)


# -- the scan's pieces: readable, vectorised over (B, H) ---------------------------------------------
#: the evaluation orders of Backend.linear_scan
SCAN_FORMS = ("recurrent", "chunked", "parallel")
#: pairwise-decay elements per block of query rows in the chunked form (memory bound)
_PAIR_ELEMENTS = 1 << 22


def _initial(initial_state, b, h, dk, dv):
    if initial_state is None:
        return np.zeros((b, h, dk, dv))
    return np.array(initial_state, dtype=np.float64)


def _gates(decay, shape):
    """Log-gates as ``(B, H, L, 1)`` (per head) or ``(B, H, L, Dk)`` (per key dim); zeros for None."""
    b, h, n, dk = shape
    if decay is None:
        return np.zeros((b, h, n, 1))
    g = np.asarray(decay, dtype=np.float64)
    return g[..., None] if g.ndim == 3 else g


def _sum_gate(x, width):
    """A per-key-dim gradient summed to the gate's width (1 for a per-head gate)."""
    return x if width == x.shape[-1] else np.sum(x, axis=-1, keepdims=True)


def _step(s, q, k, v, g, beta, t):
    """One step of the recurrence: ``(S', S_t)`` from ``S_{t-1}``."""
    sd = np.exp(g[:, :, t])[..., :, None] * s
    kt, vt = k[:, :, t], v[:, :, t]
    if beta is not None:
        vt = beta[:, :, t, None] * (vt - np.einsum("bhkv,bhk->bhv", sd, kt))
    return sd, sd + kt[..., :, None] * vt[..., None, :]


def _scan_recurrent(q, k, v, g, beta, s):
    b, h, n, _ = q.shape
    o = np.empty((b, h, n, v.shape[-1]))
    for t in range(n):
        s = _step(s, q, k, v, g, beta, t)[1]
        o[:, :, t] = np.einsum("bhkv,bhk->bhv", s, q[:, :, t])
    return o, s


def _decayed_products(x, y, G, strict):
    """``A[t, i] = sum_c x_tc y_ic exp(G_tc - G_ic)`` for ``i <= t`` (``i < t`` if ``strict``), 0
    above; ``x, y`` are ``(B, H, n, Dk)``, ``G`` is ``(B, H, n, 1 | Dk)``. The exponent is formed
    per pair, never as ``exp(G_t) * exp(-G_i)`` (which overflows for strong decay)."""
    b, h, n, _ = x.shape
    out = np.zeros((b, h, n, n))
    rows = max(1, _PAIR_ELEMENTS // max(1, b * h * n * G.shape[-1]))
    for r0 in range(0, n, rows):
        r = np.arange(r0, min(n, r0 + rows))
        keep = (r[:, None] > np.arange(n)) if strict else (r[:, None] >= np.arange(n))
        diff = G[:, :, r, None, :] - G[:, :, None, :, :]  # (B, H, r, n, 1|Dk)
        dec = np.exp(np.where(keep[None, None, :, :, None], diff, -np.inf))
        if G.shape[-1] == 1:  # one gate per head: the decay factors out of the dot product
            out[:, :, r] = (x[:, :, r] @ np.swapaxes(y, -1, -2)) * dec[..., 0]
        else:
            out[:, :, r] = np.einsum("bhtc,bhic,bhtic->bhti", x[:, :, r], y, dec)
    return out


def _scan_chunked(q, k, v, g, beta, s, size):
    """Chunks of ``size`` steps: inside a chunk the masked (WY-solved) attention form, between
    chunks the state. ``G`` is the cumulative log-gate from the chunk's start."""
    b, h, n, _ = q.shape
    o = np.empty((b, h, n, v.shape[-1]))
    for c0 in range(0, n, size):
        sl = slice(c0, min(n, c0 + size))
        qc, kc, vc = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        G = np.cumsum(g[:, :, sl], axis=2)
        eG = np.exp(G)  # decay from the chunk's start to step t (inclusive)
        if beta is None:
            w = vc
        else:  # (I + diag(beta) A) W = diag(beta) (V - (K * e^G) S), A strictly lower
            bc = beta[:, :, sl, None]
            a = bc * _decayed_products(kc, kc, G, strict=True)
            w = bc * (vc - np.einsum("bhtc,bhcv->bhtv", kc * eG, s))
            for t in range(w.shape[2]):  # forward substitution (unit lower triangular)
                w[:, :, t] -= np.einsum("bhi,bhiv->bhv", a[:, :, t, :t], w[:, :, :t])
        scores = _decayed_products(qc, kc, G, strict=False)
        o[:, :, sl] = np.einsum("bhtc,bhcv->bhtv", qc * eG, s) + scores @ w
        to_end = np.exp(G[:, :, -1:] - G)  # decay from step i to the chunk's end
        s = np.exp(G[:, :, -1])[..., :, None] * s + np.einsum("bhic,bhiv->bhcv", kc * to_end, w)
    return o, s


def _sum_to(x, shape):
    """Sum ``x`` (4-d) over the axes where ``shape`` (4-d, row axis ignored) has size 1."""
    axes = tuple(a for a in (0, 1, 3) if shape[a] == 1 and x.shape[a] != 1)
    x = x.sum(axis=axes, keepdims=True) if axes else x
    if shape[2] == 1:
        x = x.sum(axis=2, keepdims=True)
    return x

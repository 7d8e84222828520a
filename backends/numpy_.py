"""The numpy backend: the readable definition of every primitive, in float64.

It works in chunks of query rows so that the memory it needs is ``O(chunk * Sk)`` per head
rather than ``O(Sq * Sk)``: a 32K-token reference fits. Each chunk is plain textbook attention:
scores, score modifications, mask, a max-subtracted softmax, dropout, ``P @ V``.

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

from refattn import dropout as philox
from .base import Backend

#: target number of score elements per chunk (B * Hq * rows * Sk); 2**22 doubles = 32 MiB
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(b, h, sq, sk, chunk_elements):
    rows = max(1, chunk_elements // max(1, b * h * sk))
    for start in range(0, sq, rows):
        yield slice(start, min(sq, start + rows))


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

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS):
        self.chunk_elements = chunk_elements

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
        s = work(scale) * (q_rows @ np.swapaxes(k, -1, -2))
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
        s = np.where(visible, s, -np.inf).astype(work, copy=False)
        return s, (None if t is None else t.astype(work, copy=False))

    def dropout_keep(self, dropout, b, h, sq, sk, rows):
        """Keep-mask for a chunk (broadcastable to ``(B, Hq, r, Sk)``), or None without dropout."""
        if dropout is None:
            return None
        if dropout.mask is not None:
            return _take_rows(dropout.mask, rows)
        return philox.keep_mask(dropout.seed, dropout.p, b, h, sq, sk, rows)

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
        for rows in _row_chunks(b, hq, sq, sk, self.chunk_elements):
            s, _ = self.scores(q[:, :, rows], k, rows, sq, sk, pattern=pattern, scale=scale,
                               score_mod=score_mod)
            m = s.max(axis=-1, keepdims=True)
            m = np.where(np.isfinite(m), m, work(0))  # empty rows: every score is -inf
            e = np.exp(s - m)
            l = e.sum(axis=-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(l > 0, e / l, work(0))
                lse[:, :, rows] = np.log(l[..., 0]) + m[..., 0]
            keep = self.dropout_keep(dropout, b, hq, sq, sk, rows)
            if keep is not None:
                p = np.where(keep, p * work(dropout.scale), work(0))
            out[:, :, rows] = self._store(p) @ v  # P as stored before P @ V
            self.tick(rows.stop - rows.start)
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
        for rows in _row_chunks(b, hq, sq, sk, self.chunk_elements):
            s, t = self.scores(q[:, :, rows], kh, rows, sq, sk, pattern=pattern, scale=scale,
                               score_mod=score_mod)
            l_rows = lse_all[:, :, rows, None]
            p = np.exp(s - np.where(np.isfinite(l_rows), l_rows, work(np.inf)))  # empty rows: P = 0
            dp = dout[:, :, rows] @ np.swapaxes(vh, -1, -2)
            keep = self.dropout_keep(dropout, b, hq, sq, sk, rows)
            p_used = p
            if keep is not None:
                p_used = np.where(keep, p * work(dropout.scale), work(0))
                dp = np.where(keep, dp * work(dropout.scale), work(0))
            dv_h += np.swapaxes(self._store(p_used), -1, -2) @ dout[:, :, rows]
            d_rows = delta[:, :, rows]
            ds = p * (dp - d_rows[..., None])  # gradient w.r.t. the (post-softcap, biased) score
            if dbias is not None:
                dbias[..., rows if bias.shape[2] > 1 else slice(None), :] += _sum_to(ds, bias.shape)
            if dsinks is not None:
                p_sink = np.exp(sinks_w[None, :, None] - lse_all[:, :, rows])
                dsinks -= np.sum(p_sink * d_rows, axis=(0, 2))
            if t is not None:
                ds = ds * (1 - t * t)
            ds = self._store(ds)  # dS as stored before both products
            dq[:, :, rows] = work(scale) * (ds @ kh)
            dk_h += work(scale) * (np.swapaxes(ds, -1, -2) @ q[:, :, rows])
            self.tick(rows.stop - rows.start)
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


def _sum_to(x, shape):
    """Sum ``x`` (4-d) over the axes where ``shape`` (4-d, row axis ignored) has size 1."""
    axes = tuple(a for a in (0, 1, 3) if shape[a] == 1 and x.shape[a] != 1)
    x = x.sum(axis=axes, keepdims=True) if axes else x
    if shape[2] == 1:
        x = x.sum(axis=2, keepdims=True)
    return x

"""The numba backend: FlashAttention-2 style tiled kernels on the CPU (DESIGN section 7).

Same primitives and semantics as :mod:`refattn.backends.numpy_` (the specification), computed tile
by tile so memory is O(N * D): no ``Sq x Sk`` array exists at any point, except what the caller
already materialised (a dense ``mask``/``bias``/``dropout_mask``: the Pattern's tile plan keeps one
``block_q x block_k`` mask per PARTIAL tile, and a broadcast bias's gradient buffer has the bias's
own shape, or ``(.., Sqb, n_key_tiles)`` when the bias has no key axis).

* Forward: online softmax (running max ``m`` and sum ``l`` in float64), one parallel task per
  (batch, query head, query tile).
* Backward, race-free and without atomics: one pass parallel over key tiles for dK, dV (a KV head
  sums over the query heads that read it: GQA), one pass parallel over query tiles for dQ; both
  recompute P per tile from the saved LSE (``P = exp(S - lse)``; with sinks the LSE including the
  sink).
* Tile skipping: the Pattern's :meth:`~refattn.patterns.Pattern.tile_plan` (or, for a causal/window
  band alone, :meth:`~refattn.patterns.Pattern.block_layout` plus an analytic per-pair test) says
  which tiles are EMPTY (skipped), FULL (no per-pair test) or PARTIAL; a sliding window costs
  O(N * w).
* ``compute_dtype="float32"``: q, k, v, the tile products (``sgemm``, so S, P, dP, dS as their
  operands) and out/dq/dk/dv in float32; maxima, exponentials, the softmax statistics (``m``,
  ``l``, LSE) and the output/gradient accumulators are float64. The LSE is returned in float64.
* Tile products go through ``np.dot`` (SciPy's OpenBLAS) on contiguous blocks; BLAS is pinned to one
  thread around each kernel call (threadpoolctl, after SciPy's BLAS is loaded), since numba's threads
  already use every core and a threaded BLAS inside them runs about 2x slower.
* Dropout: the same Philox4x64-10 keep-mask as the numpy backend (:mod:`._philox`), or the explicit
  mask. Empty rows: output 0, LSE ``-inf``.

The kernels compile with ``cache=True``; :meth:`NumbaBackend.warm` compiles (or loads) every one of
them for both dtypes. numba keys its on-disk cache on the source file of the compiled function only:
after editing ``_tiles.py``, ``_fastexp.py`` or ``_philox.py`` (which ``_kernels.py`` inlines),
delete ``backends/numba_/__pycache__/*.nbi`` or numba keeps loading the old kernels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

import numba
import scipy.linalg.cython_blas  # noqa: F401  numba's np.dot calls this BLAS: load it before threadpoolctl
from threadpoolctl import ThreadpoolController

from refattn.errors import ParameterError
from refattn.validate import check_int
from refattn.patterns import EMPTY
from ..base import Backend
from . import _kernels

#: threadpoolctl sees only libraries loaded when it looks: SciPy's OpenBLAS is loaded above.
_BLAS = ThreadpoolController()
#: stands for an unbounded side of the band (j - (i + s) never reaches it)
_UNBOUNDED = 1 << 62


@contextlib.contextmanager
def one_blas_thread():
    """BLAS pinned to one thread and numba's tasks handed out one at a time (causal tasks differ in
    cost, so static chunks would leave a core idle)."""
    with _BLAS.limit(limits=1, user_api="blas"), numba.parallel_chunksize(1):
        yield


@dataclass
class TilePlan:
    """What the kernels need from a Pattern for one ``(sq, sk)`` and tile size."""

    vis: tuple  # (layout, pindex, pmasks, band_only, s, lo, hi): see _tiles
    tlo: np.ndarray  # per query tile: first key tile that is non-empty anywhere
    thi: np.ndarray  # ... one past the last
    ilo: np.ndarray  # per key tile: first non-empty query tile
    ihi: np.ndarray

    @property
    def offset(self) -> int:
        return self.vis[4]


def tile_plan(pattern, sq: int, sk: int, bq: int, bk: int) -> TilePlan:
    """Classify tiles from ``pattern`` (analytic for a band-only pattern: O(number of tiles))."""
    s, lo, hi = pattern.band(sq, sk)
    if pattern.is_band_only:
        layout = pattern.block_layout(bq, bk, sq=sq, sk=sk)
        pindex = np.zeros((1, 1, 1, 1), np.int32)
        pmasks = np.zeros((1, 1, 1), np.bool_)
    else:
        layout, pindex, pmasks = pattern.tile_plan(bq, bk, sq=sq, sk=sk)
    layout = np.ascontiguousarray(layout, dtype=np.int8)
    nonempty = (layout != EMPTY).any(axis=(0, 1))  # (nbq, nbk)
    tlo, thi = _ranges(nonempty)
    ilo, ihi = _ranges(nonempty.T)
    vis = (layout, np.ascontiguousarray(pindex, dtype=np.int32),
           np.ascontiguousarray(pmasks, dtype=np.bool_), bool(pattern.is_band_only), int(s),
           -_UNBOUNDED if lo is None else int(lo), _UNBOUNDED if hi is None else int(hi))
    return TilePlan(vis, tlo, thi, ilo, ihi)


def _ranges(nonempty):
    """Per row of a boolean matrix: ``[first True, last True + 1)``, or ``[0, 0)``."""
    any_ = nonempty.any(axis=1)
    first = np.argmax(nonempty, axis=1)
    last = nonempty.shape[1] - np.argmax(nonempty[:, ::-1], axis=1)
    return (np.where(any_, first, 0).astype(np.int64), np.where(any_, last, 0).astype(np.int64))


def _mods(score_mod, offset):
    """The kernels' ``mods`` tuple (see ``_tiles``)."""
    if score_mod is None:
        return (0.0, np.zeros(1), 0, np.zeros((1, 1, 1, 1)), False, offset)
    slopes = np.zeros(1) if score_mod.alibi_slopes is None else np.ascontiguousarray(
        score_mod.alibi_slopes, dtype=np.float64)
    alibi = 0 if score_mod.alibi_slopes is None else (2 if score_mod.alibi_form == "flash" else 1)
    has_bias = score_mod.bias is not None
    bias = np.ascontiguousarray(score_mod.bias, dtype=np.float64) if has_bias else np.zeros((1, 1, 1, 1))
    softcap = 0.0 if score_mod.softcap is None else float(score_mod.softcap)
    return (softcap, slopes, alibi, bias, has_bias, offset)


def _drop(dropout):
    """The kernels' ``drop`` tuple (see ``_tiles``)."""
    none = np.zeros((1, 1, 1, 1), np.bool_)
    if dropout is None:
        return (0, 0.0, 1.0, np.uint64(0), none)
    if dropout.mask is not None:
        return (2, float(dropout.p), float(dropout.scale), np.uint64(0),
                np.ascontiguousarray(dropout.mask, dtype=np.bool_))
    return (1, float(dropout.p), float(dropout.scale), np.uint64(dropout.seed), none)


def _rows2d(a):
    """``(B, H, S, D)`` -> ``(B*H*S, D)`` C-contiguous (a view when already contiguous)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


class NumbaBackend(Backend):
    """Tiled CPU kernels (see the module docstring). ``block_q``/``block_k``: tile sizes."""

    name = "numba"
    compute_dtypes = ("float64", "float32")

    def __init__(self, block_q: int = 64, block_k: int = 64):
        self.block_q, self.block_k = check_int(block_q, "block_q", 1), check_int(block_k, "block_k", 1)

    @property
    def xp(self):
        return np

    def _geom(self, q, k):
        b, hq, sq, _ = q.shape
        return (b, hq, k.shape[1], sq, k.shape[2], self.block_q, self.block_k)

    def _plan(self, pattern, q, k):
        return tile_plan(pattern, q.shape[2], k.shape[2], self.block_q, self.block_k)

    @staticmethod
    def _dtype(q):
        dt = np.dtype(q.dtype)
        if dt not in (np.float64, np.float32):
            raise ParameterError(f"q: expected float64 or float32 arrays, got dtype {dt}")
        return dt

    # -- primitives ----------------------------------------------------------------------------
    def attend(self, q, k, v, *, pattern, scale, head_map, score_mod=None, sinks=None, dropout=None):
        dt = self._dtype(q)
        b, hq, sq, _ = q.shape
        out = np.zeros((b, hq, sq, v.shape[-1]), dt)
        lse = np.full((b, hq, sq), -np.inf)
        if out.size or lse.size:
            plan = self._plan(pattern, q, k)
            with one_blas_thread():
                _kernels.forward(_rows2d(q), _rows2d(k.astype(dt, copy=False)),
                                 _rows2d(v.astype(dt, copy=False)), out.reshape(-1, out.shape[-1]),
                                 lse.reshape(-1), np.asarray(head_map, dtype=np.int64),
                                 float(scale), self._geom(q, k), plan.vis, plan.tlo, plan.thi,
                                 _mods(score_mod, plan.offset), _drop(dropout))
        if sinks is not None:
            out = (out * self.sink_factor(lse, sinks)[..., None]).astype(dt, copy=False)
        return out, lse

    @staticmethod
    def sink_factor(lse, sinks):
        """``1 / (1 + exp(sink_h - lse))``: the share of probability the visible keys keep."""
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(np.asarray(sinks, dtype=np.float64)[None, :, None] - lse))

    def attend_backward(self, q, k, v, out, lse, dout, *, pattern, scale, head_map, score_mod=None,
                        sinks=None, dropout=None):
        dt = self._dtype(q)
        b, hq, sq, _ = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        dq, dk, dv = np.zeros(q.shape, dt), np.zeros(k.shape, dt), np.zeros(v.shape, dt)
        bias = None if score_mod is None else score_mod.bias
        lse = np.asarray(lse, dtype=np.float64)
        # the softmax normaliser including the sink: P_ij = exp(S_ij - lse_all_i)
        lse_all = lse if sinks is None else np.logaddexp(lse, np.asarray(sinks, np.float64)[None, :, None])
        if dt == np.float64:
            delta = np.sum(dout * out, axis=-1)  # rowsum(dO * O), O the final output
        else:
            delta = np.einsum("bhsd,bhsd->bhs", dout, out, dtype=np.float64)
        nbk = -(-sk // self.block_k)
        per_key = bias is not None and bias.shape[3] > 1
        dbias = np.zeros((1, 1, 1, 1) if bias is None else
                         bias.shape[:3] + ((sk,) if per_key else (nbk,)))
        if q.size and k.size:
            plan = self._plan(pattern, q, k)
            head_map = np.asarray(head_map, dtype=np.int64)
            gidx = np.argsort(head_map, kind="stable").astype(np.int64)  # query heads by KV head
            gptr = np.searchsorted(head_map[gidx], np.arange(hkv + 1)).astype(np.int64)
            arrays = (_rows2d(q), _rows2d(k.astype(dt, copy=False)), _rows2d(v.astype(dt, copy=False)),
                      _rows2d(np.asarray(dout, dtype=dt)), np.ascontiguousarray(lse_all).reshape(-1),
                      np.ascontiguousarray(delta, dtype=np.float64).reshape(-1))
            geom, mods, drop = self._geom(q, k), _mods(score_mod, plan.offset), _drop(dropout)
            with one_blas_thread():
                _kernels.backward_kv(*arrays, gptr, gidx, float(scale), geom, plan.vis, plan.ilo,
                                     plan.ihi, mods, drop, dk.reshape(-1, dk.shape[-1]),
                                     dv.reshape(-1, dv.shape[-1]), dbias, per_key, bias is not None)
                _kernels.backward_q(*arrays, head_map, float(scale), geom, plan.vis, plan.tlo,
                                    plan.thi, mods, drop, dq.reshape(-1, dq.shape[-1]))
        extras = {}
        if bias is not None:
            extras["bias"] = dbias if per_key else dbias.sum(axis=3, keepdims=True)
        if sinks is not None:
            p_sink = np.exp(np.asarray(sinks, np.float64)[None, :, None] - lse_all)
            extras["sinks"] = -np.sum(p_sink * delta, axis=(0, 2))
        return dq, dk, dv, extras

    # -- compilation -----------------------------------------------------------------------------
    def warm(self):
        """Compile (first run) or load from numba's on-disk cache every kernel, for both compute
        dtypes, so later calls and parallel test workers do not compile. Returns seconds taken."""
        import time

        from refattn.backends.base import Dropout, ScoreMod
        from refattn.patterns import Pattern

        from . import _philox

        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for dt in (np.float64, np.float32):
            q, k, v, dout = (rng.standard_normal((1, 2, 5, 3)).astype(dt) for _ in range(4))
            kw = dict(pattern=Pattern(causal=True), scale=0.5, head_map=np.array([0, 1]),
                      score_mod=ScoreMod(softcap=2.0, bias=np.zeros((1, 1, 5, 5), dt)),
                      dropout=Dropout(p=0.1, seed=1))
            out, lse = self.attend(q, k, v, **kw)
            self.attend_backward(q, k, v, out, lse, dout, **kw)
        _philox.uniforms(np.uint64(0), np.zeros(1, np.uint64), np.zeros(1, np.uint64))
        return time.perf_counter() - t0

    # -- linear attention and state-space scans (kernels in _scan.py) ----------------------------
    def linear_scan(self, q, k, v, *, decay=None, beta=None, form="recurrent", chunk_size=64,
                    initial_state=None):
        from . import _scan
        with one_blas_thread():
            return _scan.linear_scan(q, k, v, decay=decay, beta=beta, form=form,
                                     chunk_size=chunk_size, initial_state=initial_state)

    def linear_scan_backward(self, q, k, v, dout, *, decay=None, beta=None, chunk_size=64,
                             initial_state=None, dfinal_state=None):
        from . import _scan
        return _scan.linear_scan_backward(q, k, v, dout, decay=decay, beta=beta,
                                          chunk_size=chunk_size, initial_state=initial_state,
                                          dfinal_state=dfinal_state)

    def wkv(self, k, v, *, w, u, initial_state=None):
        from . import _scan
        return _scan.run_wkv(k, v, w=w, u=u, initial_state=initial_state)

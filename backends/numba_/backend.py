"""The numba backend: FlashAttention-2 style tiled kernels on the CPU (DESIGN section 7).

Same primitives and semantics as :mod:`refattn.backends.numpy_` (the specification), computed tile
by tile so memory is O(N * D): no ``Sq x Sk`` array exists at any point, except what the caller
already materialised (a dense ``mask``/``bias``/``dropout_mask``: the Pattern's tile plan keeps one
``block_q x block_k`` mask per PARTIAL tile, and a broadcast bias's gradient buffer has the bias's
own shape, or ``(.., Sqb, n_key_tiles)`` when the bias has no key axis).

* Forward: online softmax (running max ``m`` and sum ``l`` in float64), one task per (batch,
  query head, query tile).
* Backward, race-free and without atomics: one pass over key tiles for dK, dV (a KV head sums over
  the query heads that read it: GQA), one pass over query tiles for dQ; both recompute P per tile
  from the saved LSE (``P = exp(S - lse)``; with sinks the LSE including the sink).
* Parallelism: the kernels are ``nogil``; ``threads`` Python threads (default: every CPU this
  process may use) take small ranges of tasks from a shared counter until none are left, so the
  costlier late tasks of a causal pattern do not leave a core idle, and the progress hook hears of
  each range as it completes (in units of the call's non-empty tiles, so a time-left estimate
  holds).
* Tile skipping: the Pattern's :meth:`~refattn.patterns.Pattern.tile_plan` (or, for a causal/window
  band alone, :meth:`~refattn.patterns.Pattern.block_layout` plus an analytic per-pair test) says
  which tiles are EMPTY (skipped), FULL (no per-pair test) or PARTIAL; a sliding window costs
  O(N * w).
* ``compute_dtype="float32"``: q, k, v, the tile products (``sgemm``, so S, P, dP, dS as their
  operands) and out/dq/dk/dv in float32; maxima, exponentials, the softmax statistics (``m``,
  ``l``, LSE) and the output/gradient accumulators are float64. The LSE is returned in float64.
* Tile products go through ``np.dot`` (SciPy's OpenBLAS) on contiguous blocks; BLAS is pinned to one
  thread around each kernel call (threadpoolctl, after SciPy's BLAS is loaded), since the backend's
  threads already use every core and a threaded BLAS inside them runs about 2x slower.
* Dropout: the same Philox4x64-10 keep-mask as the numpy backend (:mod:`._philox`), or the explicit
  mask. Empty rows: output 0, LSE ``-inf``.

The kernels compile with ``cache=True``, keyed on every kernel source (:mod:`._cache`), and only
for what a call needs (no score-modification or Philox code for a plain call). A compile says so on
stderr, once, with about how long it takes; :meth:`NumbaBackend.warm` (``refattn precompile``)
compiles everything ahead of time, for CI images and containers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import scipy.linalg.cython_blas  # noqa: F401  numba's np.dot calls this BLAS: load it before threadpoolctl
from threadpoolctl import ThreadpoolController

from refattn.errors import ParameterError
from refattn.validate import check_int
from refattn.patterns import EMPTY
from ..base import Backend
from . import _cache  # noqa: F401  (before the kernels: their on-disk cache covers every kernel source)
from . import _kernels
from ._records import DropoutSpec, Geometry, ScoreMods, Visibility

#: threadpoolctl sees only libraries loaded when it looks: SciPy's OpenBLAS is loaded above.
_BLAS = ThreadpoolController()
#: stands for an unbounded side of the band (j - (i + s) never reaches it)
_UNBOUNDED = 1 << 62


@contextlib.contextmanager
def one_blas_thread():
    """BLAS pinned to one thread while the backend's threads run the kernels."""
    with _BLAS.limit(limits=1, user_api="blas"):
        yield


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass
class TilePlan:
    """What the kernels need from a Pattern for one ``(sq, sk)`` and tile size."""

    vis: Visibility
    tlo: np.ndarray  # per query tile: first key tile that is non-empty anywhere
    thi: np.ndarray  # ... one past the last
    ilo: np.ndarray  # per key tile: first non-empty query tile
    ihi: np.ndarray
    work_q: np.ndarray  # per query tile: its non-empty tiles (summed over the layout's heads)
    work_k: np.ndarray  # per key tile: the same
    block_q: int
    block_k: int

    @property
    def offset(self) -> int:
        return self.vis.offset


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
    nonempty = layout != EMPTY
    anywhere = nonempty.any(axis=(0, 1))  # (nbq, nbk)
    tlo, thi = _ranges(anywhere)
    ilo, ihi = _ranges(anywhere.T)
    vis = Visibility(layout=layout, pindex=np.ascontiguousarray(pindex, dtype=np.int32),
                     pmasks=np.ascontiguousarray(pmasks, dtype=np.bool_),
                     band_only=bool(pattern.is_band_only), offset=int(s),
                     lo=-_UNBOUNDED if lo is None else int(lo), hi=_UNBOUNDED if hi is None else int(hi))
    return TilePlan(vis, tlo, thi, ilo, ihi, work_q=nonempty.sum(axis=(0, 1, 3)),
                    work_k=nonempty.sum(axis=(0, 1, 2)), block_q=bq, block_k=bk)


def _ranges(nonempty):
    """Per row of a boolean matrix: ``[first True, last True + 1)``, or ``[0, 0)``."""
    any_ = nonempty.any(axis=1)
    first = np.argmax(nonempty, axis=1)
    last = nonempty.shape[1] - np.argmax(nonempty[:, ::-1], axis=1)
    return (np.where(any_, first, 0).astype(np.int64), np.where(any_, last, 0).astype(np.int64))


def score_mods(score_mod, offset, scale: float = 1.0):
    """The kernels' :class:`ScoreMods` record for a :class:`~refattn.backends.base.ScoreMod`, or
    None for the plain path (no modification and ``scale > 0``: the kernels then compile no
    score-modification code and fold ``scale`` into the exponent). A non-positive scale without
    modifications gets an identity record, so it takes the modification path."""
    if score_mod is None or score_mod.is_identity:
        if scale > 0:
            return None
        return ScoreMods(0.0, np.zeros(1), 0, np.zeros((1, 1, 1, 1)), False, offset)
    slopes = np.zeros(1) if score_mod.alibi_slopes is None else np.ascontiguousarray(
        score_mod.alibi_slopes, dtype=np.float64)
    alibi = 0 if score_mod.alibi_slopes is None else (2 if score_mod.alibi_form == "flash" else 1)
    has_bias = score_mod.bias is not None
    bias = np.ascontiguousarray(score_mod.bias, dtype=np.float64) if has_bias else np.zeros((1, 1, 1, 1))
    softcap = 0.0 if score_mod.softcap is None else float(score_mod.softcap)
    return ScoreMods(softcap=softcap, slopes=slopes, alibi=alibi, bias=bias, has_bias=has_bias,
                     offset=offset)


def dropout_spec(dropout):
    """The kernels' :class:`DropoutSpec` record for a :class:`~refattn.backends.base.Dropout`, or
    None without dropout (the kernels then compile no Philox code)."""
    none = np.zeros((1, 1, 1, 1), np.bool_)
    if dropout is None:
        return None
    if dropout.mask is not None:
        return DropoutSpec(2, float(dropout.p), float(dropout.scale), np.uint64(0),
                           np.ascontiguousarray(dropout.mask, dtype=np.bool_), 0, 0, 0)
    return DropoutSpec(1, float(dropout.p), float(dropout.scale), np.uint64(dropout.seed), none,
                       int(dropout.row0), int(dropout.col0),
                       0 if dropout.stride is None else int(dropout.stride))


def _row_dots(dout, out, rows_per_chunk: int = 1024):
    """``rowsum(dO * O)`` in float64 (O the final output), as the numpy backend computes it
    (``np.sum(dout * out, axis=-1)``: the same bits, which matter where the backward is
    ill-conditioned), a chunk of rows at a time so no ``(B, H, S, Dv)`` temporary exists."""
    d2 = dout.reshape(-1, dout.shape[-1])
    o2 = out.reshape(-1, out.shape[-1])
    delta = np.empty(d2.shape[0])
    for r0 in range(0, d2.shape[0], rows_per_chunk):
        r1 = r0 + rows_per_chunk
        delta[r0:r1] = np.sum(d2[r0:r1].astype(np.float64) * o2[r0:r1], axis=-1)
    return delta.reshape(dout.shape[:-1])


def _rows2d(a):
    """``(B, H, S, D)`` -> ``(B*H*S, D)`` C-contiguous (a view when already contiguous). A
    read-only view of the caller's array (:func:`refattn.validate.as_compute` with ``copy=False``)
    comes back writable when its memory is: numba types read-only arrays apart and would compile
    every kernel a second time; the kernels never write q, k, v or dout."""
    rows = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
    if not rows.flags.writeable:
        try:
            rows.flags.writeable = True
        except ValueError:  # memory that is itself read-only (a read-only memmap): a copy
            rows = rows.copy()
    return rows


#: about how many seconds a cold compile of a kernel takes on a 2-core machine (measured): the
#: plain forward, and what score modifications and dropout add
COMPILE_SECONDS = {"forward": 10, "backward_kv": 14, "backward_q": 12}
_EXTRA_SECONDS = {"mods": 5, "drop": 5}
_announced = set()


def will_compile(kernel, args) -> bool:
    """Whether calling ``kernel`` on ``args`` compiles: no overload for these types in this process,
    and none in numba's on-disk cache. (Reads numba's cache index, as numba itself does; when that
    cannot be read, it says True.)"""
    try:
        sig = tuple(kernel.typeof_pyval(a) for a in args)
    except Exception:  # pragma: no cover - numba cannot type the arguments: it will say so itself
        return False
    if sig in kernel.overloads:
        return False
    try:
        cache = kernel._cache
        return cache._index_key(sig, kernel.targetctx.codegen()) not in cache._cache_file._load_index()
    except Exception:  # pragma: no cover - numba moved its cache internals
        return True


def announce_compile(kernel, args, dtype, mods, drop, stream=None):
    """One line on stderr when (and only when) a kernel is about to be compiled: which, and about
    how long it takes. Once per kernel variant and process."""
    import sys
    key = (kernel.py_func.__name__, np.dtype(dtype).name, mods is None, drop is None)
    if key in _announced or not will_compile(kernel, args):
        return False
    _announced.add(key)
    name = key[0]
    seconds = COMPILE_SECONDS.get(name, 10) + (0 if mods is None else _EXTRA_SECONDS["mods"]) + (
        0 if drop is None else _EXTRA_SECONDS["drop"])
    what = ", ".join(["plain" if mods is None else "score mods"] + ([] if drop is None else ["dropout"]))
    print(f"refattn: compiling the numba {name} kernel ({key[1]}, {what}) for this machine, about "
          f"{seconds} s on 2 cores; once: later runs load it from numba's cache "
          f"(refattn precompile does every kernel ahead of time)", file=stream or sys.stderr,
          flush=True)
    return True


#: (block_q, block_k) for a full or causal band: fewer, longer tile products (OpenBLAS's DGEMM
#: runs faster on 128 x 64 x 256 blocks than on 64 x 64 x 64 ones: 1.1-1.25x on the whole forward
#: and backward, BENCHMARKS.md); 128 query rows keep enough tasks for the threads at N = 1024
DENSE_TILE = (128, 256)
#: (block_q, block_k) for everything else: windows and sparse patterns skip at this granularity
SPARSE_TILE = (64, 64)

#: tasks per range handed to a thread: about this many ranges per thread (small ranges balance
#: the uneven tasks of causal and sparse patterns; a range costs one Python-level call)
RANGES_PER_THREAD = 16


class NumbaBackend(Backend):
    """Tiled CPU kernels (see the module docstring). ``block_q``/``block_k``: tile sizes; None
    (the default) chooses per call: :data:`DENSE_TILE` for a full or causal band (no window
    bound on the left, nothing but the band), :data:`SPARSE_TILE` otherwise."""

    name = "numba"
    compute_dtypes = ("float64", "float32")

    def __init__(self, block_q=None, block_k=None, threads=None):
        self.block_q = None if block_q is None else check_int(block_q, "block_q", 1)
        self.block_k = None if block_k is None else check_int(block_k, "block_k", 1)
        self.threads = usable_cpus() if threads is None else check_int(threads, "threads", 1)

    def tile_sizes(self, pattern, sq: int, sk: int) -> tuple:
        """``(block_q, block_k)`` for one call (see the class docstring)."""
        auto = SPARSE_TILE
        if pattern.is_band_only and pattern.band(sq, sk)[1] is None:
            auto = DENSE_TILE
        return (auto[0] if self.block_q is None else self.block_q,
                auto[1] if self.block_k is None else self.block_k)

    @property
    def xp(self):
        return np

    def _records(self, q, k, plan, scale, head_map, score_mod, dropout) -> tuple:
        """``(geom, vis, mods, drop, scale, head_map)``: what every kernel takes, in that order."""
        b, hq, sq, _ = q.shape
        geom = Geometry(batch=b, hq=hq, hkv=k.shape[1], sq=sq, sk=k.shape[2], block_q=plan.block_q,
                        block_k=plan.block_k)
        return (geom, plan.vis, score_mods(score_mod, plan.offset, float(scale)),
                dropout_spec(dropout), float(scale), np.asarray(head_map, dtype=np.int64))

    def _plan(self, pattern, q, k):
        sq, sk = q.shape[2], k.shape[2]
        return tile_plan(pattern, sq, sk, *self.tile_sizes(pattern, sq, sk))

    def _run(self, kernel, args, n_tasks: int, work_per_task: np.ndarray):
        """Run ``kernel(*args, t_start, t_stop)`` over tasks ``0 .. n_tasks - 1`` on the backend's
        threads: each takes the next range of tasks from a shared counter until none are left, and
        reports the range's share of the work (``work_per_task``: non-empty tiles) to the progress
        hook. One thread runs in the calling thread itself."""
        if n_tasks == 0:
            return
        geom, vis, mods, drop = args[6:10] if kernel is not _kernels.forward else args[5:9]
        announce_compile(kernel, args + (0, 1), args[0].dtype, mods, drop)
        total = float(work_per_task.sum()) or 1.0
        cum = np.concatenate([[0.0], np.cumsum(work_per_task, dtype=np.float64)])
        threads = min(self.threads, n_tasks)
        step = max(1, n_tasks // (threads * RANGES_PER_THREAD))
        lock = threading.Lock()
        state = {"next": 0}

        def worker():
            while True:
                with lock:
                    start = state["next"]
                    state["next"] = start + step
                if start >= n_tasks:
                    return
                stop = min(n_tasks, start + step)
                kernel(*args, start, stop)
                if self.progress is not None:
                    with lock:
                        self.tick((cum[stop] - cum[start]) / total)

        if threads == 1:
            worker()
            return
        with ThreadPoolExecutor(max_workers=threads - 1) as pool:
            others = [pool.submit(worker) for _ in range(threads - 1)]
            worker()
            for f in others:
                f.result()

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
            records = self._records(q, k, plan, scale, head_map, score_mod, dropout)
            args = (_rows2d(q), _rows2d(k.astype(dt, copy=False)), _rows2d(v.astype(dt, copy=False)),
                    out.reshape(-1, out.shape[-1]), lse.reshape(-1), *records, plan.tlo, plan.thi)
            with one_blas_thread():
                self._run(_kernels.forward, args, b * hq * len(plan.tlo), np.tile(plan.work_q, b * hq))
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
        delta = _row_dots(dout, out)
        nbk = -(-sk // self.tile_sizes(pattern, sq, sk)[1])
        per_key = bias is not None and bias.shape[3] > 1
        # the bias-gradient buffer: None without score mods (no such code compiled), a dummy when
        # there are mods but no bias (one compiled variant for every modified call)
        plain = (score_mod is None or score_mod.is_identity) and scale > 0
        dbias = (None if plain else np.zeros((1, 1, 1, 1))
                 if bias is None else np.zeros(bias.shape[:3] + ((sk,) if per_key else (nbk,))))
        if q.size and k.size:
            plan = self._plan(pattern, q, k)
            records = self._records(q, k, plan, scale, head_map, score_mod, dropout)
            head_map = records[-1]
            gidx = np.argsort(head_map, kind="stable").astype(np.int64)  # query heads by KV head
            gptr = np.searchsorted(head_map[gidx], np.arange(hkv + 1)).astype(np.int64)
            arrays = (_rows2d(q), _rows2d(k.astype(dt, copy=False)), _rows2d(v.astype(dt, copy=False)),
                      _rows2d(np.asarray(dout, dtype=dt)), np.ascontiguousarray(lse_all).reshape(-1),
                      np.ascontiguousarray(delta, dtype=np.float64).reshape(-1))
            serial = bias is not None
            inner = b * hkv if serial else 1
            with one_blas_thread():
                # dK/dV tasks are (key tile, batch, KV head); a part is whole tasks of the outer loop
                kv_work = np.repeat(plan.work_k, b * hkv // inner) * inner
                self._run(_kernels.backward_kv,
                          arrays + (*records, gptr, gidx, plan.ilo, plan.ihi, dk.reshape(-1, dk.shape[-1]),
                                    dv.reshape(-1, dv.shape[-1]), dbias, per_key, serial),
                          nbk * b * hkv // inner, kv_work)
                self._run(_kernels.backward_q,
                          arrays + (*records, plan.tlo, plan.thi, dq.reshape(-1, dq.shape[-1])),
                          b * hq * len(plan.tlo), np.tile(plan.work_q, b * hq))
        extras = {}
        if bias is not None:
            extras["bias"] = dbias if per_key else dbias.sum(axis=3, keepdims=True)
        if sinks is not None:
            p_sink = np.exp(np.asarray(sinks, np.float64)[None, :, None] - lse_all)
            extras["sinks"] = -np.sum(p_sink * delta, axis=(0, 2))
        return dq, dk, dv, extras

    # -- compilation -----------------------------------------------------------------------------
    def warm(self, dtypes=("float64", "float32"), progress=None):
        """Compile (first run) or load from numba's on-disk cache every kernel variant -- with and
        without score modifications, with and without dropout -- for ``dtypes``, so later calls and
        parallel test workers do not compile (``refattn precompile``). ``progress(text)`` hears of
        each variant. Returns the seconds taken."""
        import itertools
        import time

        from refattn.backends.base import Dropout, ScoreMod
        from refattn.patterns import Pattern

        from . import _philox

        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for dt, mods, drop in itertools.product(dtypes, (False, True), (False, True)):
            if progress is not None:
                progress(f"{dt}, score mods {'on' if mods else 'off'}, dropout {'on' if drop else 'off'}")
            q, k, v, dout = (rng.standard_normal((1, 2, 5, 3)).astype(dt) for _ in range(4))
            kw = dict(pattern=Pattern(causal=True), scale=0.5, head_map=np.array([0, 1]),
                      score_mod=ScoreMod(softcap=2.0, bias=np.zeros((1, 1, 5, 5))) if mods else None,
                      dropout=Dropout(p=0.1, seed=1) if drop else None)
            out, lse = self.attend(q, k, v, **kw)
            self.attend_backward(q, k, v, out, lse, dout, **kw)
        _philox.uniforms(np.uint64(0), np.zeros(1, np.uint64), np.zeros(1, np.uint64))
        if progress is not None:
            progress("linear scan and WKV (float64)")
        self._warm_scans(rng)
        return time.perf_counter() - t0

    def _warm_scans(self, rng):
        """The scan kernels take float64 only and their gate / delta-rule switches are run-time
        flags, so one call of each compiles every case."""
        q, k, v, dout = (rng.standard_normal((1, 1, 4, 2)) for _ in range(4))
        decay, beta = -rng.random((1, 1, 4)), rng.random((1, 1, 4))
        for form in ("recurrent", "chunked"):
            self.linear_scan(q, k, v, decay=decay, beta=beta, form=form, chunk_size=2)
        self.linear_scan_backward(q, k, v, dout, decay=decay, beta=beta, chunk_size=2)
        self.wkv(k[0], v[0], w=np.ones(2), u=np.zeros(2))

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

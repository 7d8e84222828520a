"""The CuPy backend: the primitives of :mod:`refattn.backends.numpy_` as raw CUDA kernels.

Semantics are the numpy backend's (its docstrings are the specification); what differs is how:

* ``attend`` -- FlashAttention-2 forward (``kernels/attend_forward.cu``): one block per (query tile,
  head, batch), online softmax with the running max and sum in double, output accumulated in double
  registers, LSE; key tiles the Pattern's plan marks EMPTY are skipped, FULL ones need no per-pair
  test. Sinks are applied at the end, ``out *= 1 / (1 + exp(sink - lse))``; the LSE excludes them.
* ``attend_backward`` -- FlashAttention-2 backward without atomics (``kernels/attend_backward.cu``):
  one pass owning key tiles (dK, dV; a KV head sums over the query heads that read it), one owning
  query tiles (dQ); both recompute P from the saved LSE. Bias gradients go to per-(batch, head,
  key tile) partials each owned by one block and are summed on the device afterwards.
* ``merge_states`` -- ``kernels/merge_states.cu``.
* ``paged_attend`` -- decode over paged KV: the forward kernel reading K/V rows through the block
  table (no gathered copy of the cache).
* Score modifications (softcap, ALiBi both forms, a bias broadcast over size-1 dims), dropout (the
  same Philox4x64-10 stream as the CPU backends, bit for bit, or an explicit mask), GQA/``head_map``,
  empty rows (out 0, LSE ``-inf``) as the numpy backend.
* ``compute_dtype="float32"``: q, k, v, the tile products and out/dq/dk/dv in float32; softmax
  statistics, LSE (returned float64) and every accumulator in float64.

Arrays: numpy or cupy in; the results come back as the caller's kind (numpy in -- any of q, k, v a
numpy array and none a cupy array -- numpy out; otherwise cupy arrays on the current device).
Tile plans are computed on the host (:mod:`._plan`) and sent with the call.
"""

from __future__ import annotations

import numpy as np

from refattn.errors import BackendUnavailable, ParameterError, ShapeError, fmt_shape
from refattn.patterns import Pattern

from ..base import Backend
from . import _abi, _loader, _plan



def import_cupy():
    """CuPy, or ``ImportError`` saying how to install it (the registry reports that as
    :class:`BackendUnavailable`). Imported only here, when a backend on a real device is made."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(f"the cupy backend needs CuPy ({exc}) and an NVIDIA GPU; on a machine "
                          f"with one, pip install 'refattn[cuda12]' or 'refattn[cuda13]' (the "
                          f"CUDA major version of its driver)") from exc
    return cupy


def probe_device(cupy) -> str:
    """A one-line description of the usable CUDA device, or :class:`BackendUnavailable` saying
    truthfully what is missing (CuPy is installed when this runs)."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, a driver too old, no device node
        raise BackendUnavailable(
            f"backend: 'cupy' is not available here: CuPy {cupy.__version__} is installed but "
            f"finds no usable CUDA device ({type(exc).__name__}: {exc})") from None
    if count < 1:
        raise BackendUnavailable(f"backend: 'cupy' is not available here: CuPy {cupy.__version__} "
                                 f"is installed but this machine has no CUDA device")
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:
        raise BackendUnavailable(
            f"backend: 'cupy' is not available here: a CUDA device is present but CuPy cannot load "
            f"NVRTC, which compiles the kernels ({type(exc).__name__}: {exc}); install the CUDA "
            f"toolkit's NVRTC, e.g. pip install nvidia-cuda-nvrtc") from None
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"{name} (compute capability {props['major']}.{props['minor']})"


class CudaDevice:
    """Arrays and launches on the current CUDA device through CuPy."""

    def __init__(self, cupy):
        self.xp = cupy

    def is_device(self, x) -> bool:
        return isinstance(x, self.xp.ndarray)

    def put(self, x, dtype):
        return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def get(self, x):
        return self.xp.asnumpy(x)

    def address(self, a) -> int:
        return int(a.data.ptr)

    def launch(self, source, stem, dtype, grid, rec):
        """Run kernel ``<stem>_<dtype suffix>`` of ``source`` on ``grid`` with record ``rec``."""
        params = self.xp.asarray(np.frombuffer(rec.tobytes(), dtype=np.uint8))
        _loader.function(source, stem, dtype)(tuple(int(g) for g in grid), (_abi.THREADS,), (params,))
        return params  # the caller keeps it alive until the kernel has run


class CupyBackend(Backend):
    """Raw CUDA kernels through CuPy (see the module docstring)."""

    name = "cupy"
    compute_dtypes = ("float64", "float32")

    def __init__(self, _device=None):
        if _device is None:
            cupy = import_cupy()
            self.device_name = probe_device(cupy)
            _device = CudaDevice(cupy)
        else:  # tests: a stand-in device (tests/cuda_emulator.py) running the same kernels
            self.device_name = getattr(_device, "name", type(_device).__name__)
        self._dev = _device

    @property
    def xp(self):
        return self._dev.xp

    def asarray(self, x, dtype=np.float64):
        return self._dev.put(x, dtype)

    def to_numpy(self, x) -> np.ndarray:
        return self._dev.get(x) if self._dev.is_device(x) else np.asarray(x)

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _dtype(q) -> str:
        dt = np.dtype(q.dtype)
        if dt not in (np.float64, np.float32):
            raise ParameterError(f"q: expected float64 or float32 arrays, got dtype {dt}")
        return dt.name

    def _caller_kind(self, *arrays):
        """Return results as device arrays iff any input is one."""
        on_device = any(self._dev.is_device(a) for a in arrays if a is not None)
        return (lambda x: x) if on_device else self._dev.get

    def _launch(self, source, stem, dtype, grid, rec, keep):
        if min(grid) <= 0:
            return
        if grid[0] >= 2 ** 31 or grid[1] > 65535 or grid[2] > 65535:
            raise ParameterError(f"shape: {stem} needs a grid of {grid} blocks, beyond CUDA's limits "
                                 f"(x < 2**31, y and z <= 65535: heads <= 65535, batch * column "
                                 f"blocks <= 65535)")
        keep.append(self._dev.launch(source, stem, dtype, grid, rec))

    # -- primitives ----------------------------------------------------------------------------
    def attend(self, q, k, v, *, pattern, scale, head_map, score_mod=None, sinks=None, dropout=None):
        dt = self._dtype(q)
        give = self._caller_kind(q, k, v)
        b, hq, sq, _ = q.shape
        hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
        qd, kd, vd = (self._dev.put(a, dt) for a in (q, k, v))
        out, lse = self._forward(qd, kd, vd, pattern=pattern, scale=scale, head_map=head_map,
                                 score_mod=score_mod, sinks=sinks, dropout=dropout, hkv=hkv, sk=sk,
                                 dv=dv, dtype=dt)
        return give(out), give(lse)

    def _forward(self, qd, kd, vd, *, pattern, scale, head_map, score_mod, sinks, dropout, hkv, sk,
                 dv, dtype, extra=None):
        xp = self._dev.xp
        b, hq, sq, _ = qd.shape
        out = xp.zeros((b, hq, sq, dv), dtype)
        lse = xp.full((b, hq, sq), -np.inf, np.float64)
        if b * hq * sq == 0:
            return out, lse
        bq, bk = _abi.TILES["attend_forward.cu"][dtype]
        plan = _plan.plan_tiles(pattern, sq, sk, bq, bk)
        rec, keep = _plan.attend_record(
            self._dev, plan, q=qd, k=kd, v=vd, head_map=head_map, scale=scale, score_mod=score_mod,
            sinks=sinks, dropout=dropout, hkv=hkv, sk=sk, dv=dv,
            extra=dict(out=out, lse=lse, **(extra or {})))
        self._launch("attend_forward.cu", "attend_forward", dtype,
                     (plan.nbq, hq, b * _abi.column_blocks(dv)), rec, keep)
        return out, lse

    def attend_backward(self, q, k, v, out, lse, dout, *, pattern, scale, head_map, score_mod=None,
                        sinks=None, dropout=None):
        dt = self._dtype(q)
        give = self._caller_kind(q, k, v, out, lse, dout)
        xp = self._dev.xp
        b, hq, sq, d = q.shape
        hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
        qd, kd, vd, outd, dod = (self._dev.put(a, dt) for a in (q, k, v, out, dout))
        lse_d = self._dev.put(lse, np.float64)
        sinks_d = None if sinks is None else self._dev.put(sinks, np.float64)
        # the softmax normaliser including the sink: P_ij = exp(S_ij - lse_all_i)
        lse_all = lse_d if sinks_d is None else xp.logaddexp(lse_d, sinks_d[None, :, None])
        delta = xp.sum(dod.astype(np.float64) * outd.astype(np.float64), axis=-1)  # rowsum(dO * O)
        dq, dk, dv_ = xp.zeros(q.shape, dt), xp.zeros(k.shape, dt), xp.zeros(v.shape, dt)
        bias = None if score_mod is None else score_mod.bias
        bq, bk = _abi.TILES["attend_backward.cu"][dt]
        nbk = -(-sk // bk)
        dbias_part = None
        if bias is not None:
            ni, nj = int(np.shape(bias)[2]), int(np.shape(bias)[3])
            dbias_part = xp.zeros((b, hq, ni, sk if nj > 1 else nbk), np.float64)
        keep = []
        if b * hq * sq and sk:
            plan = _plan.plan_tiles(pattern, sq, sk, bq, bk)
            gptr, gidx = _plan.head_groups(head_map, hkv)
            extra = dict(lse=lse_all, dout=dod, delta=delta, dq=dq, dk=dk, dv=dv_,
                         group_ptr=self._dev.put(gptr, np.int64),
                         group_idx=self._dev.put(gidx, np.int64))
            if dbias_part is not None:
                extra.update(dbias_part=dbias_part, dbias_j=dbias_part.shape[3])
            rec, keep = _plan.attend_record(
                self._dev, plan, q=qd, k=kd, v=vd, head_map=head_map, scale=scale,
                score_mod=score_mod, sinks=None, dropout=dropout, hkv=hkv, sk=sk, dv=dv, extra=extra)
            keep += [extra["group_ptr"], extra["group_idx"]]
            self._launch("attend_backward.cu", "attend_backward_kv", dt,
                         (plan.nbk, hkv, b * _abi.column_blocks(max(d, dv))), rec, keep)
            self._launch("attend_backward.cu", "attend_backward_q", dt,
                         (plan.nbq, hq, b * _abi.column_blocks(d)), rec, keep)
        extras = {}
        if bias is not None:
            nb, nh, _, nj = (int(n) for n in np.shape(bias))
            axes = tuple(a for a, n in ((0, nb), (1, nh), (3, nj)) if n == 1)
            extras["bias"] = give(dbias_part.sum(axis=axes, keepdims=True) if axes else dbias_part)
        if sinks is not None:
            p_sink = xp.exp(sinks_d[None, :, None] - lse_all)
            extras["sinks"] = give(-xp.sum(p_sink * delta, axis=(0, 2)))
        return give(dq), give(dk), give(dv_), extras

    def merge_states(self, o_a, lse_a, o_b, lse_b):
        dt = "float32" if (np.dtype(o_a.dtype) == np.float32 and np.dtype(o_b.dtype) == np.float32) \
            else "float64"
        give = self._caller_kind(o_a, lse_a, o_b, lse_b)
        xp = self._dev.xp
        if np.shape(o_a) != np.shape(o_b) or np.shape(lse_a) != np.shape(lse_b) \
                or np.shape(o_a)[:-1] != np.shape(lse_a):
            raise ShapeError(f"merge_states: expected o (..., Dv) and lse (...) of equal shapes, got "
                             f"{fmt_shape(np.shape(o_a))}, {fmt_shape(np.shape(lse_a))}, "
                             f"{fmt_shape(np.shape(o_b))}, {fmt_shape(np.shape(lse_b))}")
        shape = np.shape(o_a)
        oa, ob = self._dev.put(o_a, dt), self._dev.put(o_b, dt)
        la, lb = self._dev.put(lse_a, np.float64), self._dev.put(lse_b, np.float64)
        out, lse = xp.empty(shape, dt), xp.empty(shape[:-1], np.float64)
        rows, width = int(np.prod(shape[:-1])), int(shape[-1])
        rec = _abi.record(_abi.MERGE_PARAMS, self._dev.address, o_a=oa, lse_a=la, o_b=ob, lse_b=lb,
                          out=out, lse=lse, rows=rows, Dv=width)
        keep = []
        blocks = -(-rows * max(width, 1) // _abi.THREADS)
        self._launch("merge_states.cu", "merge_states", dt, (blocks, 1, 1), rec, keep)
        return give(out), give(lse)

    def paged_attend(self, q, k_pages, v_pages, block_table, seq_lens, *, scale, head_map,
                     causal=True, window=None, score_mod=None, sinks=None, dropout=None):
        """Decode attention over paged KV, reading K/V through the block table on the device.

        ``q (B, Hq, Sq, D)`` are the last ``Sq`` tokens of each sequence; ``k_pages (num_pages,
        page_size, Hkv, D)``, ``v_pages (num_pages, page_size, Hkv, Dv)``; ``block_table (B,
        max_blocks)``: token ``t`` of sequence ``b`` is row ``t % page_size`` of page
        ``block_table[b, t // page_size]``; ``seq_lens (B,)`` in ``[Sq, max_blocks * page_size]``.
        Returns ``(out, lse)`` equal to the ``paged`` variant (and so to ``decode`` on the gathered
        cache, of length ``Sk = max(seq_lens)``): query ``i`` of sequence ``b`` sits at position
        ``p = L_b - Sq + i`` and sees key ``j < L_b`` iff ``j <= p`` (causal) and
        ``p - left <= j <= p + right`` (``window``); symmetric ALiBi measures ``|p - j|``; dropout
        indexes pairs with ``Sk = max(seq_lens)``.
        """
        from refattn import kvcache as KV

        dt = self._dtype(q)
        give = self._caller_kind(q, k_pages, v_pages)
        if np.ndim(k_pages) != 4 or np.ndim(v_pages) != 4 or \
                tuple(np.shape(k_pages)[:3]) != tuple(np.shape(v_pages)[:3]):
            raise ShapeError(f"k_pages, v_pages: expected (num_pages, page_size, Hkv, D) and "
                             f"(num_pages, page_size, Hkv, Dv), got {fmt_shape(np.shape(k_pages))} "
                             f"and {fmt_shape(np.shape(v_pages))}")
        npages, page_size, hkv, d = (int(n) for n in np.shape(k_pages))
        dv = int(np.shape(v_pages)[3])
        if np.shape(q)[3] != d:
            raise ShapeError(f"q: expected head dim {d} as in k_pages, got {np.shape(q)[3]}")
        table, lens = KV.validate_block_table(self.to_numpy(block_table), self.to_numpy(seq_lens),
                                              npages, page_size)
        b, hq, sq, _ = np.shape(q)
        if table.shape[0] != b:
            raise ShapeError(f"block_table: expected {b} rows (the batch), got {table.shape[0]}")
        sk = int(lens.max()) if lens.size else 0
        keep_mask = KV.decode_mask(lens, sq, sk, causal=bool(causal), window=window)
        pattern = Pattern(dense=keep_mask)
        qd, kd, vd = self._dev.put(q, dt), self._dev.put(k_pages, dt), self._dev.put(v_pages, dt)
        paging = dict(block_table=self._dev.put(table, np.int64),
                      seq_lens=self._dev.put(lens, np.int64), page_size=page_size,
                      table_cols=table.shape[1])
        out, lse = self._forward(qd, kd, vd, pattern=pattern, scale=scale, head_map=head_map,
                                 score_mod=score_mod, sinks=sinks, dropout=dropout, hkv=hkv, sk=sk,
                                 dv=dv, dtype=dt, extra=paging)
        return give(out), give(lse)

    def warm(self):
        """Compile (or load from CuPy's kernel cache) every kernel for both dtypes; seconds taken."""
        import time

        t0 = time.perf_counter()
        for source in _loader.SOURCES:
            for name in _loader.kernel_names(source):
                _loader.module(source).get_function(name)
        return time.perf_counter() - t0

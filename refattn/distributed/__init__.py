"""Exact attention for sequences one machine cannot hold, on Dask's scheduler (optional extra ``dask``).

``refattn.distributed.attention(q, k, v, variant="sdpa", causal=True, q_chunk=4096, kv_chunk=4096)``
splits the whole ``Sq x Sk`` problem into (query chunk x KV chunk) rectangles. Each visible
rectangle is one Dask task calling the single-machine pipeline (``refattn.attention`` with
``rect=(q0, k0, Sq, Sk)`` and ``return_lse=True``: :mod:`refattn.subrect`, every position-dependent
knob in global coordinates); a query chunk's states are reduced with ``merge_states`` in a tree;
the knobs that act on a whole row (sinks, ``empty_row``, ``lse_base``) are applied once after the
merge. A rectangle whose tile pair holds no visible pair (causal, window, block-sparse, BigBird:
the variant's whole-problem Pattern at ``q_chunk x kv_chunk`` tiles) gets no task at all.

Inputs may be numpy arrays, ``dask.array`` arrays, ``np.memmap`` arrays opened from a file, ``.npy``
paths or zarr arrays/paths: file-backed inputs are read chunk by chunk on the workers and never
loaded on the client. The result comes back as numpy, stays lazy (``compute=False``: dask arrays)
or is written to a zarr store (``store=PATH``: the group's ``out`` and ``lse`` arrays).

The scheduler is Dask's own: ``client`` is a ``dask.distributed.Client``, a scheduler address, or
None (the current client, else a temporary ``LocalCluster`` of one-threaded workers). A worker that
dies mid-run has its tasks recomputed elsewhere by Dask.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ParameterError, ShapeError, fmt_shape

#: what a task name starts with: the graph's attend tasks are counted by it (tests, ``plan``)
ATTEND = "refattn-attend"
BACKWARD = "refattn-backward"
#: parameters applied once after the merge, never per rectangle (:mod:`refattn.subrect`)
ROW_KNOBS = ("sinks", "empty_row", "lse_base")


def _dask():
    """``(dask, dask.array, distributed)``, or an error saying how to install them."""
    try:
        import dask
        import dask.array as da
        import distributed
    except ImportError as exc:  # pragma: no cover - exercised where dask is absent
        raise ImportError(f"refattn.distributed needs dask[distributed] and zarr ({exc}): "
                          f"pip install 'refattn[dask]'") from exc
    return dask, da, distributed


# -- inputs: never loaded on the client -----------------------------------------------------------
@dataclass(frozen=True)
class FileArray:
    """A C-ordered array in a file (a ``.npy`` or an ``np.memmap``), read slice by slice where a task
    runs: it pickles as its path, offset, dtype and shape, never as its data."""

    path: str
    dtype: np.dtype
    shape: tuple
    offset: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index):
        m = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return np.array(m[index])

    @classmethod
    def of_memmap(cls, a: np.memmap, name: str) -> "FileArray":
        import mmap
        if not isinstance(a.base, mmap.mmap) or not a.flags.c_contiguous or a.filename is None:
            raise ParameterError(f"{name}: expected an np.memmap as opened (C order, not a view) or "
                                 f"the .npy path, got a {type(a).__name__} view of "
                                 f"{fmt_shape(a.shape)}")
        return cls(str(a.filename), a.dtype, tuple(a.shape), int(a.offset))

    @classmethod
    def of_npy(cls, path: str, name: str) -> "FileArray":
        a = np.load(path, mmap_mode="r")
        if not isinstance(a, np.memmap):
            raise ParameterError(f"{name}: expected a .npy file holding one array, got {path!r}")
        return cls.of_memmap(a, name)


def as_dask(x, name: str, seq_axis: int, chunk: int):
    """``x`` as a 4-d dask array chunked only along ``seq_axis`` (``chunk`` rows a block)."""
    _, da, _ = _dask()
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        if path.endswith(".npy"):
            x = FileArray.of_npy(path, name)
        else:
            import zarr
            try:
                x = zarr.open_array(path, mode="r")
            except Exception as exc:
                raise ParameterError(f"{name}: expected a .npy path or a zarr array's path, got "
                                     f"{path!r} ({type(exc).__name__}: {exc})") from exc
    elif isinstance(x, np.memmap):
        x = FileArray.of_memmap(x, name)
    elif not (isinstance(x, da.Array) or hasattr(x, "__getitem__") and hasattr(x, "shape")):
        x = np.asarray(x)
    if len(getattr(x, "shape", ())) != 4:
        raise ShapeError(f"{name}: expected a 4-d array (B, H, S, D), got {fmt_shape(x.shape)}")
    chunks = tuple(chunk if ax == seq_axis else -1 for ax in range(4))
    if isinstance(x, da.Array):
        return x.rechunk(chunks)
    return da.from_array(x, chunks=chunks, asarray=True, name=False, inline_array=False)


# -- the plan: which rectangles are visible -------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The rectangles of a call: query chunk ``i`` is rows ``q_bounds[i] .. q_bounds[i+1]``, KV chunk
    ``j`` keys ``k_bounds[j] ..``; ``pairs`` lists the ``(i, j)`` that hold a visible pair."""

    sq: int
    sk: int
    q_chunk: int
    kv_chunk: int
    pairs: tuple

    @property
    def n_tasks(self) -> int:
        return len(self.pairs)

    @property
    def n_q(self) -> int:
        return -(-self.sq // self.q_chunk)

    @property
    def n_kv(self) -> int:
        return -(-self.sk // self.kv_chunk)

    def rows(self, i):
        return i * self.q_chunk, min(self.sq, (i + 1) * self.q_chunk)

    def keys(self, j):
        return j * self.kv_chunk, min(self.sk, (j + 1) * self.kv_chunk)


def _chunk(value, name, default, length):
    if value is None:
        return min(default, length)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name}: expected a positive number of tokens per chunk, got {value!r}")
    return min(int(value), length)


def _variant(variant):
    from .. import pipeline
    var = pipeline.variant_of(variant)
    if not var.subrect:
        from .. import variants
        ok = ", ".join(v.name for v in variants.list() if v.subrect)
        raise ParameterError(f"variant: expected one that computes a sub-rectangle in global "
                             f"coordinates ({ok}), got {var.name!r}")
    return var


def plan(q_shape, k_shape, *, variant="sdpa", q_chunk=None, kv_chunk=None, **params) -> Plan:
    """The visible (query chunk, KV chunk) rectangles of a call, from the variant's whole-problem
    Pattern classified at ``q_chunk x kv_chunk`` tiles (shapes in ``bhsd``)."""
    from ..patterns import EMPTY
    from ..variants.sparse import pattern_of
    var = _variant(variant)
    b, hq, sq, _ = q_shape
    _, hkv, sk, _ = k_shape
    qc, kc = _chunk(q_chunk, "q_chunk", 4096, sq), _chunk(kv_chunk, "kv_chunk", 4096, sk)
    kept = {n: v for n, v in params.items() if n not in ROW_KNOBS and not n.startswith("return_")}
    p = var.parse_params(kept)
    # the pattern depends on shapes only: probe with one feature, broadcast (no O(S * D) memory)
    probe = {n: np.broadcast_to(np.zeros((), np.float64), (b, h, s, 1))
             for n, h, s in (("q", hq, sq), ("k", hkv, sk), ("v", hkv, sk))}
    layout = pattern_of(var, probe, p).block_layout(qc, kc, sq=sq, sk=sk)
    visible = (np.asarray(layout) != EMPTY).reshape(-1, *np.shape(layout)[-2:]).any(axis=0)
    pairs = tuple((int(i), int(j)) for i, j in zip(*np.nonzero(visible)))
    return Plan(sq, sk, qc, kc, pairs)


# -- the tasks --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(backend: str, threads: int):
    """numba and BLAS at ``threads`` threads inside a task (workers are one-threaded)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=threads, user_api="blas"):
        if backend != "numba":
            yield
            return
        import numba
        before = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            yield
        finally:
            numba.set_num_threads(before)


def _attend(q, k, v, q0, k0, spec):
    """One rectangle's partial state ``(out, lse)`` (the single-machine pipeline, global coordinates)."""
    import refattn
    with _threads(spec["backend"], spec["threads"]):
        return refattn.attention(q, k, v, variant=spec["variant"], backend=spec["backend"],
                                 rect=(q0, k0, spec["sq"], spec["sk"]), return_lse=True,
                                 **spec["params"])


def _merge(a, b):
    from ..backends import get
    return get("numpy").merge_states(*a, *b)


def _tree(states, combine, name):
    """Reduce delayed ``states`` pairwise (a balanced tree: depth log2 of their number)."""
    import dask
    level = 0
    while len(states) > 1:
        nxt = [dask.delayed(combine, pure=True)(
                   *states[n:n + 2], dask_key_name=f"{name}-{level}-{n}-{_token(states[n:n + 2])}")
               if n + 1 < len(states) else states[n] for n in range(0, len(states), 2)]
        states, level = nxt, level + 1
    return states[0]


def _token(objs) -> str:
    import dask.base
    return dask.base.tokenize(*objs)


def _empty_state(b, hq, rows, dv):
    return np.zeros((b, hq, rows, dv)), np.full((b, hq, rows), -np.inf)


def _row_finish(state, sinks, empty_row, lse_base):
    """The row-wide knobs on a merged state: sinks' factor, empty rows as NaN, LSE base 2."""
    out, lse = state
    if sinks is not None:
        from ..backends.numpy_ import NumpyBackend
        out = out * NumpyBackend.sink_factor(lse, sinks)[..., None]
    if empty_row == "nan":
        out = np.where(np.isneginf(lse)[..., None], np.nan, out)
    if lse_base in (2, "2"):
        lse = lse / math.log(2.0)
    return out, lse


@dataclass
class _Call:
    """A validated distributed call: dask inputs in ``bhsd``, the plan, what a task needs."""

    q: object
    k: object
    v: object
    plan: Plan
    spec: dict
    row: dict
    bshd: bool

    def blocks(self, name):
        return getattr(self, name).to_delayed().reshape(-1)


def _setup(q, k, v, variant, q_chunk, kv_chunk, backend, threads, params) -> _Call:
    var = _variant(variant)
    params = dict(params)
    for flag in [n for n in params if n.startswith("return_")]:
        params.pop(flag)
    layout = params.pop("layout", "bhsd")
    if layout not in ("bhsd", "bshd"):
        raise ParameterError(f"layout: expected 'bhsd' or 'bshd', got {layout!r}")
    if not isinstance(backend, str):
        raise ParameterError(f"backend: expected a backend name a worker can load, got {backend!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ParameterError(f"threads: expected a positive thread count per task, got {threads!r}")
    for name, chunk in (("q_chunk", q_chunk), ("kv_chunk", kv_chunk)):
        _chunk(chunk, name, 1, 1)  # checked before any array is built
    qd, kd, vd = (_bhsd(a, name, layout, chunk)
                  for name, a, chunk in (("q", q, q_chunk), ("k", k, kv_chunk), ("v", v, kv_chunk)))
    row = {n: params.pop(n, None) for n in ROW_KNOBS}
    if row["sinks"] is not None:
        from .. import validate as V
        row["sinks"] = np.asarray(V.check_per_head(row["sinks"], "sinks", qd.shape[1]), np.float64)
    if row["empty_row"] not in (None, "zero", "nan"):
        raise ParameterError(f"empty_row: expected 'zero' or 'nan', got {row['empty_row']!r}")
    if row["lse_base"] not in (None, 2, "2", math.e, "e"):
        raise ParameterError(f"lse_base: expected e or 2, got {row['lse_base']!r}")
    if kd.shape[2] != vd.shape[2]:
        raise ShapeError(f"v: expected Sk = {kd.shape[2]} keys like k, got {fmt_shape(vd.shape)}")
    pl = plan(qd.shape, kd.shape, variant=var, q_chunk=q_chunk, kv_chunk=kv_chunk, **params)
    qd = qd.rechunk((-1, -1, pl.q_chunk, -1))
    kd, vd = (a.rechunk((-1, -1, pl.kv_chunk, -1)) for a in (kd, vd))
    spec = dict(variant=var.name, backend=backend, threads=threads, params=params, sq=pl.sq, sk=pl.sk)
    return _Call(qd, kd, vd, pl, spec, row, layout == "bshd")


def _bhsd(a, name, layout, chunk):
    """Input ``a`` as a dask array in ``bhsd`` (a lazy transpose of ``bshd``), ``chunk`` rows a block
    (rechunked to the plan's chunks, a no-op when they agree)."""
    d = as_dask(a, name, 1 if layout == "bshd" else 2, 4096 if chunk is None else chunk)
    return d.transpose(0, 2, 1, 3) if layout == "bshd" else d


def _part(state, n):
    return state[n]


def _forward_graph(c: _Call):
    """Per query chunk the delayed merged state (before the row-wide knobs)."""
    import dask
    qb, kb, vb = c.blocks("q"), c.blocks("k"), c.blocks("v")
    by_row = {}
    for i, j in c.plan.pairs:
        (q0, _), (k0, _) = c.plan.rows(i), c.plan.keys(j)
        key = f"{ATTEND}-{i}-{j}-{_token((qb[i], kb[j], vb[j], c.spec))}"
        by_row.setdefault(i, []).append(
            dask.delayed(_attend, pure=True)(qb[i], kb[j], vb[j], q0, k0, c.spec, dask_key_name=key))
    b, hq, _, _ = c.q.shape
    dv = c.v.shape[3]
    states = []
    for i in range(c.plan.n_q):
        r0, r1 = c.plan.rows(i)
        states.append(_tree(by_row[i], _merge, "refattn-merge") if i in by_row
                      else dask.delayed(_empty_state, pure=True)(b, hq, r1 - r0, dv))
    return states


def _assemble(c: _Call, states):
    """``(out, lse)`` dask arrays of the whole problem (``bhsd``) from per-chunk delayed states."""
    import dask
    _, da, _ = _dask()
    b, hq, _, _ = c.q.shape
    dv = c.v.shape[3]
    outs, lses = [], []
    for i, st in enumerate(states):
        r0, r1 = c.plan.rows(i)
        outs.append(da.from_delayed(dask.delayed(_part, pure=True)(st, 0), (b, hq, r1 - r0, dv),
                                    dtype=np.float64))
        lses.append(da.from_delayed(dask.delayed(_part, pure=True)(st, 1), (b, hq, r1 - r0),
                                    dtype=np.float64))
    return da.concatenate(outs, axis=2), da.concatenate(lses, axis=2)


@contextlib.contextmanager
def _client(client):
    """The client to run on: the given one, one connected to an address, the current one, or a
    temporary LocalCluster of one-threaded workers (closed afterwards)."""
    _, _, distributed = _dask()
    if isinstance(client, distributed.Client):
        yield client
        return
    if isinstance(client, str):
        with distributed.Client(client) as c:
            yield c
        return
    if client is not None:
        raise ParameterError(f"client: expected a dask.distributed.Client, a scheduler address or "
                             f"None, got {type(client).__name__}")
    try:
        yield distributed.get_client()
        return
    except ValueError:
        pass
    with distributed.LocalCluster(threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _store(client, arrays: dict, store):
    """Write ``arrays`` (dask) to the zarr group ``store`` and return them opened read-only."""
    _, da, _ = _dask()
    import zarr
    targets = []
    for name, a in arrays.items():
        targets.append(da.to_zarr(a, store, component=name, overwrite=True, compute=False))
    client.compute(targets, sync=True)
    group = zarr.open_group(store, mode="r")
    return tuple(group[n] for n in arrays)


def attention(q, k, v, *, variant="sdpa", client=None, q_chunk=None, kv_chunk=None,
              backend="numba", threads: int = 1, return_lse: bool = False, compute: bool = True,
              store=None, **params):
    """The variant's output (and LSE with ``return_lse``) computed as Dask tasks (module docstring).

    ``q_chunk``/``kv_chunk``: tokens per query / KV chunk (default 4096, at most the length);
    ``backend``: the single-machine backend each task runs; ``threads``: numba and BLAS threads per
    task (1: one-threaded workers own the cores). ``compute=False`` returns dask arrays;
    ``store=PATH`` writes zarr arrays ``out`` and ``lse`` there and returns them. ``params`` are the
    variant's own (``causal``, ``window``, ``sinks``, ``dropout_p``...); the variant must declare
    ``subrect`` (:mod:`refattn.subrect`), and a knob a rectangle cannot honour is an error.
    """
    c = _setup(q, k, v, variant, q_chunk, kv_chunk, backend, threads, params)
    states = [dask_delayed(_row_finish)(st, c.row["sinks"], c.row["empty_row"], c.row["lse_base"])
              for st in _forward_graph(c)]
    out, lse = _assemble(c, states)
    if c.bshd:
        out = out.transpose(0, 2, 1, 3)
    if not compute and store is None:
        return (out, lse) if return_lse else out
    with _client(client) as cl:
        if store is not None:
            res = _store(cl, {"out": out, "lse": lse}, store)
        else:
            res = tuple(cl.compute([out, lse], sync=True))
    return res if return_lse else res[0]


def dask_delayed(fn):
    import dask
    return dask.delayed(fn, pure=True)


def _backward_task(q, k, v, dout, o, lse, q0, k0, spec):
    """One rectangle's share ``(dq, dk, dv)`` of the gradients (:mod:`refattn.subrect`)."""
    import refattn
    from ..subrect import Rect
    with _threads(spec["backend"], spec["threads"]):
        dq, dk, dv, extras = refattn.attention_backward(
            q, k, v, dout, variant=spec["variant"], backend=spec["backend"],
            rect=Rect(q0, k0, spec["sq"], spec["sk"], out=o, lse=lse), **spec["params"])
    if extras:
        raise ParameterError(f"rect: gradients of {', '.join(extras)} are not summed over "
                             f"rectangles by refattn.distributed")
    return dq, dk, dv


def _add(a, b):
    return a + b


def attention_backward(q, k, v, dout, *, variant="sdpa", client=None, q_chunk=None, kv_chunk=None,
                       backend="numba", threads: int = 1, **params):
    """``(dq, dk, dv, extras)`` as :func:`refattn.attention_backward` gives them, computed as Dask
    tasks: the forward's merged output and normaliser first, then one task per visible rectangle
    whose dq shares are summed over the row's KV chunks and dk, dv over the key's query chunks (each
    a tree). ``extras["sinks"]`` (with sinks) is ``-sum exp(sink - L) * rowsum(dout * O)``.
    """
    import dask
    _, da, _ = _dask()
    c = _setup(q, k, v, variant, q_chunk, kv_chunk, backend, threads, params)
    if c.row["empty_row"] == "nan" or c.row["lse_base"] in (2, "2"):
        raise ParameterError("empty_row, lse_base: only their defaults have a backward here")
    sinks = c.row["sinks"]
    with _client(client) as cl:
        out, lse = _assemble(c, _forward_graph(c))
        if sinks is not None:  # the whole problem's output and normaliser, sink included
            from ..backends.numpy_ import NumpyBackend
            out = out * NumpyBackend.sink_factor(lse, sinks)[..., None]
            lse = da.logaddexp(lse, sinks[None, :, None])
        out_b, lse = cl.persist([out.rechunk((-1, -1, c.plan.q_chunk, -1)),
                                 lse.rechunk((-1, -1, c.plan.q_chunk))])
        dd = _bhsd(dout, "dout", "bshd" if c.bshd else "bhsd", c.plan.q_chunk)
        dd = dd.rechunk((-1, -1, c.plan.q_chunk, -1))
        if dd.shape != out_b.shape:
            raise ShapeError(f"dout: expected the output's shape {fmt_shape(out_b.shape)} (bhsd), got "
                             f"{fmt_shape(dd.shape)}")
        qb, kb, vb = c.blocks("q"), c.blocks("k"), c.blocks("v")
        db, ob, lb = (x.to_delayed().reshape(-1) for x in (dd, out_b, lse))
        spec = dict(c.spec, params={**c.spec["params"], "layout": "bhsd"})
        dqs, dks, dvs = {}, {}, {}
        for i, j in c.plan.pairs:
            (q0, _), (k0, _) = c.plan.rows(i), c.plan.keys(j)
            name = f"{BACKWARD}-{i}-{j}-{_token((qb[i], kb[j], vb[j], db[i], ob[i], spec))}"
            g = dask.delayed(_backward_task, pure=True, nout=3)(
                qb[i], kb[j], vb[j], db[i], ob[i], lb[i], q0, k0, spec, dask_key_name=name)
            dqs.setdefault(i, []).append(g[0])
            dks.setdefault(j, []).append(g[1])
            dvs.setdefault(j, []).append(g[2])
        b, hq, _, dq_d = c.q.shape
        _, hkv, _, dk_d = c.k.shape
        dv_d = c.v.shape[3]

        def gather(parts, n, bounds, shape_of):
            blocks = []
            for i in range(n):
                lo, hi = bounds(i)
                shape = shape_of(hi - lo)
                blocks.append(da.from_delayed(_tree(parts[i], _add, "refattn-sum"), shape, dtype=np.float64)
                              if i in parts else da.zeros(shape))
            return da.concatenate(blocks, axis=2)
        dq = gather(dqs, c.plan.n_q, c.plan.rows, lambda r: (b, hq, r, dq_d))
        dk = gather(dks, c.plan.n_kv, c.plan.keys, lambda r: (b, hkv, r, dk_d))
        dv = gather(dvs, c.plan.n_kv, c.plan.keys, lambda r: (b, hkv, r, dv_d))
        if c.bshd:
            dq, dk, dv = (g.transpose(0, 2, 1, 3) for g in (dq, dk, dv))
        todo = [dq, dk, dv]
        if sinks is not None:
            delta = (dd * out_b).sum(axis=3)
            todo.append(-(da.exp(sinks[None, :, None] - lse) * delta).sum(axis=(0, 2)))
        res = cl.compute(todo, sync=True)
    extras = {} if sinks is None else {"sinks": res[3]}
    return res[0], res[1], res[2], extras


def outputs(variant, inputs: dict, params: dict, *, backend="numba", client=None, chunk=None,
            dout=None) -> dict:
    """``{"out", "lse"}`` and with ``dout`` the gradients keyed by input (``q``, ``k``, ``v``, then
    extras such as ``sinks``), as :func:`refattn.pipeline.run` names them: what ``refattn compare
    --distributed`` compares. ``chunk``: tokens per query and KV chunk."""
    kw = dict(variant=variant, client=client, q_chunk=chunk, kv_chunk=chunk, backend=backend, **params)
    missing = [n for n in ("q", "k", "v") if n not in inputs]
    if missing or len(inputs) != 3:
        raise ParameterError(f"inputs: expected q, k, v for refattn.distributed, got "
                             f"{', '.join(sorted(inputs))}")
    out, lse = attention(inputs["q"], inputs["k"], inputs["v"], return_lse=True, **kw)
    result = {"out": out, "lse": lse}
    if dout is not None:
        dq, dk, dv, extras = attention_backward(inputs["q"], inputs["k"], inputs["v"], dout, **kw)
        result.update(q=dq, k=dk, v=dv, **extras)
    return result

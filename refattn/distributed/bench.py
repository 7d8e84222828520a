"""Timing the distributed oracle against the numba backend alone, in the same run (``refattn bench
--distributed``, ``benchmarks/distributed.py``).

For each sequence length: q, k, v (B, H, N, D) float64 are written to ``.npy`` files (the workers
read their chunks from them, as they would at a length the client cannot hold); the numba backend
alone runs the whole call on every core of this process; then a ``LocalCluster`` of ``workers``
one-threaded workers (numba and BLAS at one thread per task) runs ``refattn.distributed.attention``
with ``q_chunk = kv_chunk = chunk``. Each is the best of ``repeats`` rounds after a warm-up (numba's
compiled code loaded in every worker). Reported per row: seconds, tasks, visible pairs, and the
cost per task ``workers * seconds / tasks`` (the scaling law's coefficient).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(shape, *, lengths=None, causal=True, window=None, workers=(2,), chunks=(4096,), repeats=1,
        scheduler=None, numba_alone=True, progress=lambda msg: None) -> dict:
    """The JSON-able timings (module docstring); ``lengths`` default: the shape's N."""
    import refattn
    from refattn import distributed as rd
    from refattn.backends.numba_.backend import usable_cpus

    b, h, n0, d = shape
    params = dict(causal=causal) if window is None else dict(causal=causal, window=window)
    rows = []
    with tempfile.TemporaryDirectory(prefix="refattn-dist-") as tmp:
        for n in lengths or (n0,):
            rng = np.random.default_rng(0)
            paths = []
            for name in "qkv":
                path = os.path.join(tmp, f"{name}.npy")
                np.save(path, rng.standard_normal((b, h, n, d)))
                paths.append(path)
            if numba_alone:
                arrays = [np.load(p) for p in paths]
                progress(f"N={n}: numba alone ({usable_cpus()} threads)")
                refattn.attention(*(a[:, :, :256] for a in arrays), backend="numba", **params)
                t = _best(lambda: refattn.attention(*arrays, backend="numba", **params), repeats)
                rows.append(dict(N=n, impl="numba", workers=None, chunk=None, tasks=None, seconds=t,
                                 threads=usable_cpus()))
                del arrays
            for w in workers:
                with _cluster(scheduler, w) as client:
                    for c in chunks:
                        pl = rd.plan((b, h, n, d), (b, h, n, d), q_chunk=c, kv_chunk=c, **params)
                        progress(f"N={n}: distributed, {w} workers, chunk {c}, {pl.n_tasks} tasks")
                        kw = dict(client=client, q_chunk=c, kv_chunk=c, **params)
                        rd.attention(*paths, **kw)  # warm-up: compiled code loaded in every worker
                        t = _best(lambda: rd.attention(*paths, **kw), repeats)
                        rows.append(dict(N=n, impl="distributed", workers=w, chunk=c, tasks=pl.n_tasks,
                                         seconds=t, per_task=(w * t / pl.n_tasks)))
    return {"shape": {"B": b, "H": h, "D": d}, "params": {k: str(v) for k, v in params.items()},
            "cpus": usable_cpus(), "scheduler": scheduler or "LocalCluster", "rows": rows}


class _cluster:
    """A client on ``scheduler`` (its workers as they are) or on a LocalCluster of ``workers``."""

    def __init__(self, scheduler, workers):
        self.scheduler, self.workers, self.cluster = scheduler, workers, None

    def __enter__(self):
        import distributed
        if self.scheduler:
            self.client = distributed.Client(self.scheduler)
        else:
            self.cluster = distributed.LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                                    processes=True, dashboard_address=None)
            self.client = distributed.Client(self.cluster)
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        return False


def render(result) -> str:
    """A text table of :func:`run`'s rows, with the ratio to the numba backend alone."""
    alone = {r["N"]: r["seconds"] for r in result["rows"] if r["impl"] == "numba"}
    lines = [f"shape B={result['shape']['B']} H={result['shape']['H']} D={result['shape']['D']}, "
             f"{', '.join(f'{k}={v}' for k, v in result['params'].items())}, {result['cpus']} CPUs, "
             f"{result['scheduler']}",
             f"{'N':>8} {'impl':<12} {'workers':>7} {'chunk':>6} {'tasks':>7} {'seconds':>9} "
             f"{'s/task':>8} {'numba/this':>10}"]
    for r in result["rows"]:
        ratio = alone.get(r["N"])
        per_task = f"{r['per_task']:.4f}" if r.get("per_task") else "-"
        vs = f"{ratio / r['seconds']:.2f}" if ratio else "-"
        lines.append(f"{r['N']:>8} {r['impl']:<12} {r['workers'] or '-':>7} {r['chunk'] or '-':>6} "
                     f"{r['tasks'] or '-':>7} {r['seconds']:>9.3f} {per_task:>8} {vs:>10}")
    return "\n".join(lines)

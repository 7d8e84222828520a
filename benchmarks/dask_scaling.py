"""Scaling of the distributed oracle (refattn.distributed) against the numba backend alone.

    python benchmarks/dask_scaling.py [--lengths 8192,16384,32768] [--workers 1,2] [--chunks 2048,4096]
                                     [--scheduler ADDRESS] [--json]

Causal sdpa, B = H = 1, D = 64, float64. For every length: the numba backend alone (every CPU of
this process) and a LocalCluster of each worker count (one thread per worker, numba and BLAS at one
thread per task) at each chunk size, inputs read by the workers from .npy files; best of --repeats
after a warm-up. The table's s/task is ``workers * seconds / tasks``: the scaling law
``T = tasks * s_task(chunk) / workers + overhead`` (BENCHMARKS.md, "Distributed") fits it. The
timing itself is refattn.distributed.bench, the same code as ``refattn bench --distributed``. (Not
named distributed.py: run as a script, that name would shadow the dask package.)
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--chunks", default="2048,4096")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from refattn.distributed import bench

    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    result = bench.run((1, 1, 0, 64), lengths=ints(a.lengths), workers=ints(a.workers),
                       chunks=ints(a.chunks), repeats=a.repeats, scheduler=a.scheduler,
                       progress=lambda msg: print("...", msg, flush=True))
    print(json.dumps(result, indent=1) if a.json else bench.render(result))


if __name__ == "__main__":
    main()

"""Compile time of the numba kernels: cold (empty cache) and the first call with a warm cache.

    python benchmarks/compile_time.py [--json]

Each measurement runs in a fresh interpreter whose numba cache directory is a new temporary one
(cold: nothing cached, every kernel compiles; warm: a second process over the same directory loads
what the first one wrote). Per compute dtype it reports the import of the backend and the first
forward + backward call (all three kernels at one tiny shape: with the types fixed, that is every
specialisation the dtype needs). Target: the warm first call under 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(dtype):
    t0 = time.perf_counter()
    import numpy as np

    from refattn import backends
    from refattn.backends.base import Dropout, ScoreMod
    from refattn.patterns import Pattern

    be = backends.get("numba")
    t_import = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, 70, 16)).astype(dtype) for _ in range(4))
    kw = dict(pattern=Pattern(causal=True), scale=0.25, head_map=np.arange(2),
              score_mod=ScoreMod(softcap=5.0), dropout=Dropout(p=0.1, seed=3))
    t1 = time.perf_counter()
    out, lse = be.attend(q, k, v, **kw)
    be.attend_backward(q, k, v, out, lse, dout, **kw)
    return {"dtype": dtype, "import_s": t_import, "first_call_s": time.perf_counter() - t1}


def _run(dtype, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    res = subprocess.run([sys.executable, __file__, "--child", dtype], capture_output=True, text=True,
                         env=env, timeout=1800)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure() -> list:
    rows = []
    for dtype in ("float64", "float32"):
        with tempfile.TemporaryDirectory(prefix="refattn-numba-cache-") as cache:
            cold = _run(dtype, cache)
            warm = _run(dtype, cache)
        rows.append({"dtype": dtype, "cold_import_s": cold["import_s"],
                     "cold_first_call_s": cold["first_call_s"], "warm_import_s": warm["import_s"],
                     "warm_first_call_s": warm["first_call_s"]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", metavar="DTYPE", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child)))
        return
    rows = measure()
    if a.json:
        print(json.dumps({"load": os.getloadavg(), "rows": rows}))
        return
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'dtype':8} {'cold import':>12} {'cold 1st call':>14} {'warm import':>12} {'warm 1st call':>14}")
    for r in rows:
        print(f"{r['dtype']:8} {r['cold_import_s']:11.2f}s {r['cold_first_call_s']:13.2f}s "
              f"{r['warm_import_s']:11.2f}s {r['warm_first_call_s']:13.2f}s")


if __name__ == "__main__":
    main()

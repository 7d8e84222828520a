"""Every target of the numba-backend issue in one command, with a verdict per target.

    python benchmarks/targets.py [--repeats 5] [--json out.json]

Runs, in this order (each is also one command of its own; see BENCHMARKS.md):

1. ``refattn bench --shape 1,8,4096,64 --dtype both`` (forward and backward, causal and not,
   numba vs numpy vs torch in the same run);
2. ``refattn bench --shape 1,8,16384,64 --causal yes --window 255,0 --no-backward --numpy no``
   (sliding window vs our dense causal and torch with the equivalent boolean mask);
3. ``python benchmarks/memory.py`` (B=1 H=8 D=64 N=32768 causal, float64, in a subprocess);
4. ``python benchmarks/compile_time.py`` (cold compile and first call with a warm cache).

Only ratios measured within one run are results (DESIGN section 7); the machine's load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compile_time  # noqa: E402
import memory  # noqa: E402

from refattn.cli import bench  # noqa: E402


def _row(result, dtype, mask, pass_, impl):
    for r in result["rows"]:
        if (r["dtype"], r["mask"], r["pass"], r["impl"]) == (dtype, mask, pass_, impl):
            return r
    return None


def _ratio(result, dtype, pass_, name):
    for r in result["ratios"]:
        if (r["dtype"], r["pass"], r["name"]) == (dtype, pass_, name):
            return r["value"]
    return None


def verdicts(dense, window, mem, compiled) -> list:
    """(target, measured, ok) for every target of the issue."""
    out = []

    def vs_torch(mask, pass_):
        r = _row(dense, "float64", mask, pass_, "numba")
        return None if r is None else r["vs_torch"]

    checks = [
        ("forward f64 N=4096 full: numba/torch throughput >= 1.0", vs_torch("full", "forward"), 1.0, ">="),
        ("forward f64 N=4096 causal: numba/torch throughput >= 1.0", vs_torch("causal", "forward"), 1.0, ">="),
        ("forward f64 N=4096: our causal time / our full time <= 0.6",
         _ratio(dense, "float64", "forward", "causal/full"), 0.6, "<="),
        ("backward f64 N=4096 full: numba/torch throughput >= 0.7", vs_torch("full", "backward"), 0.7, ">="),
        ("backward f64 N=4096 causal: numba/torch throughput >= 0.7", vs_torch("causal", "backward"), 0.7, ">="),
        ("window (255,0) N=16384 forward: our dense causal / our window >= 10",
         _ratio(window, "float64", "forward", "dense causal/window"), 10.0, ">="),
        ("window (255,0) N=16384 forward: torch bool mask / our window >= 10",
         (_row(window, "float64", "window", "forward", "numba") or {}).get("vs_torch"), 10.0, ">="),
        ("memory f64 B=1 H=8 D=64 N=32768 causal fwd+bwd: RSS growth < 1 GiB (GiB)",
         mem["growth"] / (1 << 30), 1.0, "<"),
    ]
    for row in compiled:
        checks.append((f"first call with a warm cache, {row['dtype']}: < 2 s (s)",
                       row["warm_first_call_s"], 2.0, "<"))
    for name, value, bound, op in checks:
        ok = None if value is None else {">=": value >= bound, "<=": value <= bound,
                                         "<": value < bound}[op]
        out.append({"target": name, "measured": value, "ok": ok})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="FILE", help="also write everything measured to FILE")
    a = ap.parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say(f"load before: {os.getloadavg()}")
    dense = bench.run((1, 8, 4096, 64), dtypes=("float64", "float32"), repeats=a.repeats, progress=say)
    print(bench.render(dense), "\n", flush=True)
    window = bench.run((1, 8, 16384, 64), dtypes=("float64",), causal="yes", window=(255, 0),
                       repeats=max(1, a.repeats // 2), backward=False, numpy="no", progress=say)
    print(bench.render(window), "\n", flush=True)
    say("memory at N=32768 ...")
    mem = memory.measure()
    print(f"memory: RSS growth {mem['growth'] / (1 << 20):.1f} MiB (outputs {mem['outputs'] / (1 << 20):.1f} MiB, "
          f"workspace {mem['workspace'] / (1 << 20):.1f} MiB), {mem['seconds']:.1f} s\n")
    say("compile times ...")
    compiled = compile_time.measure()
    for r in compiled:
        print(f"compile {r['dtype']}: cold first call {r['cold_first_call_s']:.1f} s, "
              f"warm first call {r['warm_first_call_s']:.2f} s (import {r['warm_import_s']:.2f} s)")
    print()
    results = verdicts(dense, window, mem, compiled)
    for r in results:
        mark = {True: "MET ", False: "MISS", None: "n/a "}[r["ok"]]
        val = "-" if r["measured"] is None else f"{r['measured']:.3f}"
        print(f"{mark} {val:>8}  {r['target']}")
    print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dense": dense, "window": window, "memory": mem, "compile": compiled,
                       "targets": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()

"""Peak memory of forward + backward on the numba backend, measured in a fresh subprocess.

    python benchmarks/memory.py                      # the issue's target: B=1 H=8 D=64 N=32768 causal
    python benchmarks/memory.py --n 8192 --heads 2 --json
    python benchmarks/memory.py --api               # the same through refattn.attention(_backward)

The child process loads the compiled kernels (``warm()``, a tiny call per dtype), creates q, k, v and
dout, reads its peak resident set (which sees numba's allocations; tracemalloc does not), runs
``attend`` then ``attend_backward`` and reads the peak again.

The peak is the kernel's high-water mark of this process's own memory, ``VmHWM`` in
``/proc/self/status`` (Linux), which is what ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` reports
for a process started fresh. They differ in one trap, measured here: ``ru_maxrss`` survives
``fork``/``exec``, so a child of a big parent (a benchmark that has just held torch's 16K x 16K
mask, a pytest worker) starts with the parent's peak and shows no growth at all. Both are
reported; the growth uses ``VmHWM`` where it exists and ``ru_maxrss`` elsewhere. The growth includes the
outputs (out, dq, dk, dv, and the float64 LSE). Target at N=32768: growth < 1 GiB, i.e. a workspace
under 512 MiB beside the 512 MiB of outputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1 << 30


def peak_rss() -> tuple:
    """``(peak, ru_maxrss)`` in bytes: ``peak`` is VmHWM (Linux), else ru_maxrss."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, ru
    except OSError:
        pass
    return ru, ru


def child(n, heads, dim, batch, dtype, causal, api=False):
    """Primitives (``attend``/``attend_backward``, the backward given ``out`` and ``lse``), or with
    ``api`` the public calls a user makes: ``refattn.attention`` then ``refattn.attention_backward``
    (which validates its inputs and recomputes the forward for the LSE)."""
    import numpy as np

    import refattn
    from refattn import backends
    from refattn.patterns import Pattern

    be = backends.get("numba")
    be.warm(dtypes=(dtype,))
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((batch, heads, n, dim), dtype=dtype) for _ in range(4))
    before, ru_before = peak_rss()
    t0 = time.perf_counter()
    if api:
        kw = dict(causal=causal, backend="numba", compute_dtype=dtype)
        out = refattn.attention(q, k, v, **kw)
        dq, dk, dv, _ = refattn.attention_backward(q, k, v, dout, **kw)
        lse = np.empty(0)
    else:
        kw = dict(pattern=Pattern(causal=causal), scale=dim ** -0.5, head_map=np.arange(heads))
        out, lse = be.attend(q, k, v, **kw)
        dq, dk, dv, _ = be.attend_backward(q, k, v, out, lse, dout, **kw)
    seconds = time.perf_counter() - t0
    after, ru_after = peak_rss()
    outputs = sum(a.nbytes for a in (out, lse, dq, dk, dv))
    return {"n": n, "heads": heads, "dim": dim, "batch": batch, "dtype": dtype, "causal": causal,
            "api": api,
            "rss_after_inputs": before, "rss_peak": after, "growth": after - before,
            "ru_maxrss_after_inputs": ru_before, "ru_maxrss_peak": ru_after,
            "outputs": outputs, "workspace": after - before - outputs,
            "dense_scores_one_head": 8 * n * n, "seconds": seconds}


def measure(n=32768, heads=8, dim=64, batch=1, dtype="float64", causal=True, api=False,
            timeout=None) -> dict:
    """Run :func:`child` in a fresh interpreter and return its measurements."""
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--heads", str(heads), "--dim",
           str(dim), "--batch", str(batch), "--dtype", dtype, "--json"]
    if not causal:
        cmd.append("--no-causal")
    if api:
        cmd.append("--api")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"memory child failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--no-causal", dest="causal", action="store_false")
    ap.add_argument("--api", action="store_true",
                    help="through refattn.attention and refattn.attention_backward")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    args = (a.n, a.heads, a.dim, a.batch, a.dtype, a.causal, a.api)
    r = child(*args) if a.child else measure(*args)
    if a.json:
        print(json.dumps(r))
        return
    mib = 1 << 20
    print(f"numba forward+backward{' (public API)' if a.api else ''} {a.dtype} B={a.batch} H={a.heads} D={a.dim} N={a.n} "
          f"{'causal' if a.causal else 'full'}: {r['seconds']:.1f} s")
    print(f"  peak RSS growth after inputs: {r['growth'] / mib:8.1f} MiB  (target < 1024 MiB)")
    print(f"  of which outputs:             {r['outputs'] / mib:8.1f} MiB")
    print(f"  workspace:                    {r['workspace'] / mib:8.1f} MiB")
    print(f"  (one dense N x N float64 score matrix would be {r['dense_scores_one_head'] / mib:.0f} MiB per head)")


if __name__ == "__main__":
    main()

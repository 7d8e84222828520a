"""Throughput of the linear scan: numba chunked against the numpy recurrent form and PyTorch.

    python benchmarks/linear_scan.py [--length 65536] [--dim 64] [--chunk 64] [--repeats 3]
                                     [--inner 3] [--gated yes|no] [--cumsum yes|no] [--json out.json]

One head (B = H = 1), float64, the ungated linear-attention recurrence ``S_t = S_{t-1} + k_t v_t^T``,
``o_t = S_t^T q_t`` (and, with ``--gated yes``, the same with one scalar log-gate per step,
simple_gla's ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``). In the same run, interleaved round after round,
fastest call reported:

* ``numba chunked`` -- ``refattn.backends.get("numba").linear_scan(form="chunked")``, the subject;
* ``numba recurrent`` and ``numpy chunked`` -- for context;
* ``numpy recurrent`` -- the readable definition, the baseline of the 20x target;
* ``torch recurrent`` -- a Python loop over the steps, one outer-product update and one
  matrix-vector product per step (float64 tensors);
* ``torch chunked`` -- fla's ``naive_chunk_linear_attn`` algorithm in float64: per chunk
  ``K^T V``, an exclusive prefix sum of those over the chunks, then ``Q S_prev`` plus the masked
  intra-chunk ``tril(Q K^T) V``, all batched (gated: a loop over chunks carrying the state);
* ``torch cumsum`` -- every state materialised: ``cumsum_t(k_t v_t^T)`` in place, then
  ``o_t = S_t^T q_t``: ``L * D * D * 8`` bytes (2 GiB at L = 65536, D = 64; skipped with a note when
  that is more than half the available memory).

Every implementation runs in a fresh process of its own (``--impl NAME``, started by the main
process round after round; ``--inner`` timed calls each, the fastest of all counts): torch bundles its own OpenMP runtime and numba uses the system's, and in
one process the two slow each other down -- measured here, torch's gated chunked loop went from 0.24 s
to 4.2 s after a single numba call, even with torch imported first. Inside a worker, the first call
(compilation, cache load, first-touch page faults) is not timed. Every output is checked against the numpy
recurrent one (normwise relative error printed). The run prints the load average and how many cores
it really got ("cores free": a 2-task numba loop on 2 threads against 1) before and after: on a
shared machine the parallel numba kernels get one core, not two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

IMPLS = ("numba chunked", "numba recurrent", "numpy recurrent", "numpy chunked", "torch recurrent",
         "torch chunked", "torch cumsum")


def torch_recurrent(q, k, v, g=None):
    import torch
    L, d = q.shape
    S = torch.zeros(d, v.shape[1], dtype=torch.float64)
    o = torch.empty(L, v.shape[1], dtype=torch.float64)
    a = None if g is None else torch.exp(g)
    for t in range(L):
        if a is not None:
            S.mul_(a[t])
        S.add_(torch.outer(k[t], v[t]))
        o[t] = q[t] @ S
    return o


def torch_chunked(q, k, v, chunk, g=None):
    import torch
    L, d = q.shape
    n = L // chunk
    qc, kc, vc = (x.reshape(n, chunk, x.shape[1]) for x in (q, k, v))
    mask = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool))
    if g is None:
        kv = kc.transpose(1, 2) @ vc  # (n, d, dv)
        prev = torch.cumsum(kv, 0) - kv  # the state each chunk receives
        intra = (qc @ kc.transpose(1, 2)).masked_fill_(~mask, 0.0) @ vc
        return (qc @ prev + intra).reshape(L, -1)
    G = torch.cumsum(g.reshape(n, chunk), 1)  # log-decay from each chunk's start
    decay = torch.exp((G[:, :, None] - G[:, None, :]).masked_fill(~mask, -torch.inf))
    intra = ((qc @ kc.transpose(1, 2)) * decay) @ vc
    kd = kc * torch.exp(G[:, -1:] - G)[..., None]
    qd = qc * torch.exp(G)[..., None]
    out = torch.empty(n, chunk, v.shape[1], dtype=torch.float64)
    S = torch.zeros(d, v.shape[1], dtype=torch.float64)
    for c in range(n):
        out[c] = qd[c] @ S + intra[c]
        S = torch.exp(G[c, -1]) * S + kd[c].T @ vc[c]
    return out.reshape(L, -1)


def torch_cumsum(q, k, v):
    import torch
    states = k[:, :, None] * v[:, None, :]  # (L, d, dv): every k_t v_t^T ...
    states.cumsum_(0)  # ... then every state S_t, in place
    return torch.einsum("tk,tkv->tv", q, states)


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def inputs(length, dim):
    """The benchmark's inputs, the same in every worker: ``q, k, v`` ``(1, 1, L, D)`` scaled by
    ``D^-1/2``, log-gates ``(1, 1, L)`` in ``[-0.1, 0]``."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, length, dim)) / dim ** 0.5 for _ in range(3))
    return q, k, v, -rng.uniform(0.0, 0.1, (1, 1, length))


def worker(name, length, dim, chunk, gated, out_path, inner):
    """Time ``inner`` calls of ``name`` after an untimed first one, in this process (the fastest
    counts); save the output."""
    q, k, v, g = inputs(length, dim)
    dec = g if gated else None
    if name.startswith("torch"):
        import torch
        tq, tk, tv, tg = (torch.from_numpy(np.ascontiguousarray(x[0, 0])) for x in (q, k, v, g))
        tdec = tg if gated else None
        fn = {"torch recurrent": lambda: torch_recurrent(tq, tk, tv, tdec),
              "torch chunked": lambda: torch_chunked(tq, tk, tv, chunk, tdec),
              "torch cumsum": lambda: torch_cumsum(tq, tk, tv)}[name]
        run = lambda: fn().numpy()[None, None]  # noqa: E731
        ctx = torch.no_grad()
    else:
        from refattn import backends
        import contextlib
        be = backends.get(name.split()[0])
        form = name.split()[1]
        run = lambda: be.linear_scan(q, k, v, decay=dec, form=form, chunk_size=chunk)[0]  # noqa: E731
        ctx = contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        out = run()
        first = time.perf_counter() - t0
        sec = float("inf")
        for _ in range(inner):
            t0 = time.perf_counter()
            out = run()
            sec = min(sec, time.perf_counter() - t0)
    if out_path:
        np.save(out_path, out)
    print(json.dumps({"impl": name, "seconds": sec, "first_call": first}))


def cores_free() -> float:
    """How many cores this process gets right now: two equal numba tasks on two threads versus one
    after the other (2.0 on an idle 2-core machine, about 1.0 when another process holds a core)."""
    import numba
    from numba import njit, prange

    @njit(parallel=True)
    def spin(n, reps):
        out = np.zeros(n)
        for i in prange(n):
            acc = 0.0
            for j in range(reps):
                acc += np.sqrt(j + i)
            out[i] = acc
        return out

    spin(2, 10)
    times = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        t0 = time.perf_counter()
        spin(2, 20_000_000)
        times.append(time.perf_counter() - t0)
    return times[0] / times[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (a fresh process each)")
    ap.add_argument("--inner", type=int, default=3, help="timed calls per process")
    ap.add_argument("--gated", choices=("yes", "no"), default="yes")
    ap.add_argument("--cumsum", choices=("yes", "no"), default="yes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--impl", choices=IMPLS, default=None, help="worker mode: time this one")
    ap.add_argument("--out", default=None, help="worker mode: save the output here (.npy)")
    args = ap.parse_args(argv)
    L, d, chunk = args.length, args.dim, args.chunk
    if L % chunk:
        ap.error("--length must be a multiple of --chunk (the torch chunked form does not pad)")

    if args.impl:
        worker(args.impl, L, d, chunk, args.gated == "yes", args.out, args.inner)
        return
    from importlib.metadata import version
    print(f"numpy {version('numpy')}, numba {version('numba')}, torch {version('torch')}, "
          f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()}; cores free (numba "
          f"2-thread speedup of a 2-task loop): {cores_free():.2f}")
    state_bytes = L * d * d * 8
    avail = _available_bytes()
    cumsum = args.cumsum == "yes" and (avail is None or state_bytes <= avail // 2)
    if args.cumsum == "yes" and not cumsum:
        print(f"torch cumsum skipped: {state_bytes / 2 ** 30:.2f} GiB of states > half the "
              f"available {avail / 2 ** 30:.2f} GiB")

    def launch(name, gated, out_path):
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", name, "--length", str(L),
               "--dim", str(d), "--chunk", str(chunk), "--gated", "yes" if gated else "no",
               "--inner", str(args.inner)]
        if out_path:
            cmd += ["--out", out_path]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for gated in ([False, True] if args.gated == "yes" else [False]):
            names = [n for n in IMPLS if n != "torch cumsum" or (cumsum and not gated)]
            best = {n: float("inf") for n in names}
            first = {}
            for r in range(args.repeats):
                for name in names:
                    path = os.path.join(tmp, name.replace(" ", "_") + ".npy") if r == 0 else None
                    res = launch(name, gated, path)
                    best[name] = min(best[name], res["seconds"])
                    first.setdefault(name, res["first_call"])
            outs = {n: np.load(os.path.join(tmp, n.replace(" ", "_") + ".npy")) for n in names}
            ref = outs["numpy recurrent"]
            label = "gated (simple_gla)" if gated else "ungated (linear)"
            print(f"\nB=H=1 L={L} D={d} chunk={chunk} float64, {label}, best of {args.repeats} "
                  f""
                  f"rounds x {args.inner} calls (a fresh process per round, after an untimed first "
                  f"call)")
            print(f"{'impl':<16} {'seconds':>9} {'Mtok/s':>8} {'GFLOP/s':>8} {'vs numpy rec':>13} "
                  f"{'err vs numpy rec':>17} {'first call':>11}")
            rows = []
            for name in names:
                sec = best[name]
                err = float(np.linalg.norm(outs[name] - ref) / np.linalg.norm(ref))
                ratio = best["numpy recurrent"] / sec
                gflops = 4.0 * L * d * d / sec / 1e9  # update and read of a D x D state per step
                print(f"{name:<16} {sec:9.4f} {L / sec / 1e6:8.3f} {gflops:8.2f} {ratio:12.1f}x "
                      f"{err:17.2e} {first[name]:10.2f}s")
                rows.append({"impl": name, "seconds": sec, "ratio_vs_numpy_recurrent": ratio,
                             "normwise_err": err, "gflops": gflops, "first_call": first[name]})
            runs[label] = rows
            target = best["numpy recurrent"] / best["numba chunked"]
            print(f"numba chunked vs numpy recurrent: {target:.1f}x (target >= 20x: "
                  f"{'met' if target >= 20 else 'NOT met'})")
    print(f"\nload average after: {os.getloadavg()}; cores free: {cores_free():.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"length": L, "dim": d, "chunk": chunk, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()

"""``refattn bench``: our attention kernels next to PyTorch's CPU SDPA, timed in the same run.

For each compute dtype and each mask kind (``full``, ``causal``, and ``window`` with ``--window``)
it times the forward and the backward of

* ``numba``: the numba backend's ``attend`` / ``attend_backward`` primitives (the backward is given
  ``out`` and ``lse``, as an autograd engine would be);
* ``numpy``: the numpy backend (float64 only; by default only up to 4096 x 4096 scores per head,
  where it takes seconds rather than minutes; it always fits in memory: it works in row chunks);
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on CPU tensors (when torch is
  installed), ``is_causal=True`` for ``causal`` and an equivalent boolean ``attn_mask`` for a window;
  its backward is ``torch.autograd.grad`` through SDPA (the forward is not timed), with
  ``torch.set_num_threads`` equal to the numba backend's thread count. Without torch (or with
  ``--no-torch``) the ``vs torch`` column is empty and a line says why.

Timing: one untimed warm-up call each, then ``--repeats`` (default 5) rounds that call every
implementation in turn, torch's backward included (interleaved, so a burst of load from elsewhere
hits all of them), reporting each one's fastest round. The run first measures SciPy's DGEMM (and
SGEMM for float32) at 1024^3 on the same threads, the practical peak the kernels' tile products
run on, and prints it beside the table (JSON ``machine.gemm_gflops``). GFLOP/s count only visible (query, key) pairs: forward ``4 * D * pairs`` per (batch, head)
(``2 D`` for ``Q K^T``, ``2 Dv`` for ``P V``), backward 2.5x that (the customary five products; our
backward actually performs seven, recomputing ``S`` and ``dP`` in its dQ pass). ``vs torch`` is torch's
time divided by ours (above 1: we are faster). Derived ratios: ``causal/full`` (our causal time over our
non-causal time) and ``dense causal/window`` (our causal time over our window time).

JSON (``--json``; keys may be added, never removed or renamed)::

    {"refattn": "0.1.0", "machine": {"cpu": "...", "threads": 2, "load_before": [1m, 5m, 15m],
     "load_after": [...], "numba": "...", "torch": "..." | null,
     "gemm_gflops": {"float64": 38.2, ...}},
     "shape": {"B": 1, "H": 8, "N": 4096, "D": 64}, "repeats": 3,
     "rows": [{"dtype": "float64", "mask": "causal", "pass": "forward", "impl": "numba",
               "seconds": 0.31, "gflops": 55.6, "vs_torch": 1.02 | null}, ...],
     "ratios": [{"dtype": "float64", "pass": "forward", "name": "causal/full", "value": 0.52}, ...],
     "torch": null | "not timed: ..."}                       # why there is no vs-torch column

Exit status 0, or 2 for a usage error (one line on stderr).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Optional

import click
import numpy as np

from refattn import __version__, backends, memory
from refattn.errors import ParameterError
from refattn.patterns import Pattern
from .options import EXIT_OK, dumps, json_option, one_line_errors, parse_shape

#: the numpy backend is timed by default up to this many scores per (batch, head)
NUMPY_AUTO_LIMIT = 4096 * 4096


# -- what is timed ------------------------------------------------------------------------------
def visible_pairs(pattern: Pattern, sq: int, sk: int) -> int:
    """Number of visible (query, key) pairs of a band-only pattern, counted row by row (O(sq))."""
    s, lo, hi = pattern.band(sq, sk)
    i = np.arange(sq, dtype=np.int64)
    first = np.zeros(sq, np.int64) if lo is None else np.maximum(0, i + s + lo)
    last = np.full(sq, sk - 1, np.int64) if hi is None else np.minimum(sk - 1, i + s + hi)
    return int(np.maximum(0, last - first + 1).sum())


def forward_flops(b, h, d, dv, pairs) -> float:
    return float(b * h * pairs * (2 * d + 2 * dv))


class Timed(float):
    """What a callable returns when it times itself (the part worth timing of a longer call)."""


def best_of(funcs: dict, repeats: int) -> dict:
    """Fastest time of each callable over ``repeats`` interleaved rounds (after one warm-up): its
    wall time, or the :class:`Timed` seconds it returns (torch's backward times ``grad`` alone)."""
    for f in funcs.values():
        f()
    best = {name: float("inf") for name in funcs}
    for _ in range(repeats):
        for name, f in funcs.items():
            t0 = time.perf_counter()
            got = f()
            sec = got if isinstance(got, Timed) else time.perf_counter() - t0
            best[name] = min(best[name], sec)
    return best


def gemm_gflops(dtype: str, threads: int, n: int = 1024, repeats: int = 5) -> float:
    """This run's GEMM speed: SciPy's BLAS (the one the numba kernels call) on ``n x n x n`` in
    ``dtype`` with ``threads`` BLAS threads, fastest of ``repeats`` -- the machine's practical peak,
    printed beside the attention figures so runs on different days compare."""
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = (np.asfortranarray(rng.standard_normal((n, n)), dtype=dtype) for _ in range(2))
    gemm = blas.dgemm if dtype == "float64" else blas.sgemm
    best = float("inf")
    with threadpool_limits(limits=threads, user_api="blas"):
        gemm(1.0, a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            gemm(1.0, a, b)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def _backend_calls(be, q, k, v, dout, pattern, scale):
    """(forward, backward) closures over a backend's primitives."""
    kw = dict(pattern=pattern, scale=scale, head_map=np.arange(q.shape[1]))
    out, lse = be.attend(q, k, v, **kw)
    return (lambda: be.attend(q, k, v, **kw),
            lambda: be.attend_backward(q, k, v, out, lse, dout, **kw))


def _torch_mask_kwargs(pattern, mask_kind, sq, sk):
    """SDPA keywords for a mask kind: ``is_causal`` (top-left: equal to ours for Sq == Sk) or the
    equivalent boolean ``attn_mask`` (True = attend, as ours)."""
    import torch

    if mask_kind == "causal":
        return {"is_causal": True}
    if mask_kind == "window":
        return {"attn_mask": torch.from_numpy(pattern.mask(sq, sk)[0, 0])}
    return {}


def _torch_forward(q, k, v, pattern, mask_kind, threads):
    """A closure over torch's SDPA forward, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    kw = _torch_mask_kwargs(pattern, mask_kind, q.shape[2], k.shape[2])

    def forward():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw)

    return forward


def _torch_backward(q, k, v, dout, pattern, mask_kind, threads):
    """A closure timing torch's backward alone: it builds the graph untimed, then times ``grad``
    and returns those seconds (:class:`Timed`), so it runs in the same interleaved rounds."""
    import torch

    torch.set_num_threads(threads)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    tdo = torch.from_numpy(dout)
    kw = _torch_mask_kwargs(pattern, mask_kind, q.shape[2], k.shape[2])

    def backward():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw)
        t0 = time.perf_counter()
        torch.autograd.grad(out, (tq, tk, tv), tdo)
        return Timed(time.perf_counter() - t0)

    return backward


# -- the run -----------------------------------------------------------------------------------
def mask_patterns(causal: str, window: Optional[tuple]) -> dict:
    """Mask kind -> Pattern. A window run also times our dense causal (its baseline)."""
    kinds = {}
    if causal in ("both", "no"):
        kinds["full"] = Pattern()
    if causal in ("both", "yes") or window is not None:
        kinds["causal"] = Pattern(causal=True)
    if window is not None:
        kinds["window"] = Pattern(window=window)
    return kinds


def run(shape, *, dtypes, causal="both", window=None, repeats=5, backward=True, numpy="auto",
        torch_peer=True, threads=None, progress: Callable = lambda msg: None) -> dict:
    """Time everything; returns the JSON-able result (see the module docstring). ``threads``:
    numba's (and so torch's) thread count, default numba's own (all cores)."""
    if torch_peer:
        # Import torch before numba starts its OpenMP threading layer: in the other order the two
        # OpenMP runtimes fight and torch's SDPA runs ~3x slower in this process (measured here:
        # 59 -> 21 GFLOP/s), which would flatter every ratio below.
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
    from refattn.backends.numba_ import NumbaBackend
    from refattn.backends.numba_.backend import usable_cpus

    b, h, n, d = shape
    if threads is not None and not 1 <= threads <= usable_cpus():
        raise ParameterError(f"--threads: expected 1 to {usable_cpus()} (the CPUs this process may "
                             f"use), got {threads}")
    backends.get("numba")  # not installed: the registry's one-line error
    numba_be = NumbaBackend(threads=threads)
    threads = numba_be.threads
    # q, k, v, dout, their copies in the timed dtype, and every implementation's out, dq, dk, dv
    # (a --window also gives torch an N x N boolean mask)
    memory.check(memory.attention_bytes((b, h, n, n, d, h), copies=4) + (n * n if window else 0),
                 "--shape", f"the benchmark's arrays of shape {b},{h},{n},{d}")
    rng = np.random.default_rng(0)
    base = {name: rng.standard_normal((b, h, n, d)) for name in ("q", "k", "v", "dout")}
    scale = 1.0 / np.sqrt(d)
    rows, load_before = [], os.getloadavg()
    gemm = {}
    for dtype in dtypes:
        progress(f"{dtype} GEMM speed of this run ({threads} BLAS thread(s))")
        gemm[dtype] = gemm_gflops(dtype, threads)
        q, k, v, dout = (base[x].astype(dtype) for x in ("q", "k", "v", "dout"))
        for kind, pattern in mask_patterns(causal, window).items():
            pairs = visible_pairs(pattern, n, n)
            flops = {"forward": forward_flops(b, h, d, d, pairs)}
            flops["backward"] = 2.5 * flops["forward"]
            fwd, bwd = {}, {}
            fwd["numba"], bwd["numba"] = _backend_calls(numba_be, q, k, v, dout, pattern, scale)
            with_numpy = numpy == "yes" or (numpy == "auto" and n * n <= NUMPY_AUTO_LIMIT)
            if with_numpy and dtype == "float64":
                fwd["numpy"], bwd["numpy"] = _backend_calls(backends.get("numpy"), q, k, v, dout,
                                                            pattern, scale)
            tfwd = _torch_forward(q, k, v, pattern, kind, threads) if torch_peer else None
            if tfwd is not None:
                fwd["torch"] = tfwd
            progress(f"{dtype} {kind} forward: {', '.join(fwd)}")
            times = {"forward": best_of(fwd, repeats)}
            if backward:
                if tfwd is not None:
                    bwd["torch"] = _torch_backward(q, k, v, dout, pattern, kind, threads)
                progress(f"{dtype} {kind} backward: {', '.join(bwd)}")
                times["backward"] = best_of(bwd, repeats)
            for pass_, by_impl in times.items():
                t_torch = by_impl.get("torch")
                for impl, sec in by_impl.items():
                    rows.append({"dtype": dtype, "mask": kind, "pass": pass_, "impl": impl,
                                 "seconds": sec, "gflops": flops[pass_] / sec / 1e9,
                                 "vs_torch": None if t_torch is None else t_torch / sec})
    torch_note = None
    if not torch_peer:
        torch_note = "not timed (--no-torch)"
    elif not any(r["impl"] == "torch" for r in rows):
        torch_note = "not timed: PyTorch is not installed (pip install 'refattn[peers]')"
    machine = machine_info(threads, load_before)
    machine["gemm_gflops"] = gemm
    return {"refattn": __version__, "machine": machine,
            "shape": {"B": b, "H": h, "N": n, "D": d}, "window": window, "repeats": repeats,
            "rows": rows, "ratios": derived_ratios(rows), "torch": torch_note}


def derived_ratios(rows) -> list:
    """Our causal time over our full time, and our dense causal time over our window time."""
    t = {(r["dtype"], r["mask"], r["pass"]): r["seconds"] for r in rows if r["impl"] == "numba"}
    out = []
    for (dtype, mask, pass_), sec in t.items():
        if mask == "causal" and (dtype, "full", pass_) in t:
            out.append({"dtype": dtype, "pass": pass_, "name": "causal/full",
                        "value": sec / t[(dtype, "full", pass_)]})
        if mask == "window" and (dtype, "causal", pass_) in t:
            out.append({"dtype": dtype, "pass": pass_, "name": "dense causal/window",
                        "value": t[(dtype, "causal", pass_)] / sec})
    return out


def machine_info(threads, load_before) -> dict:
    info = {"cpu": cpu_model(), "threads": threads, "load_before": list(load_before),
            "load_after": list(os.getloadavg())}
    import numba
    info["numba"] = numba.__version__
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(result) -> str:
    shp = result["shape"]
    m = result["machine"]
    lines = [f"refattn bench  B={shp['B']} H={shp['H']} N={shp['N']} D={shp['D']}"
             f"{'  window=' + str(tuple(result['window'])) if result['window'] else ''}  "
             f"best of {result['repeats']}",
             f"cpu: {m['cpu']}  threads: {m['threads']}  load: "
             f"{' '.join(f'{x:.2f}' for x in m['load_before'])} -> "
             f"{' '.join(f'{x:.2f}' for x in m['load_after'])}",
             "GEMM 1024^3 this run (SciPy's BLAS, the kernels' own): " + ", ".join(
                 f"{dt} {gf:.1f} GFLOP/s" for dt, gf in m.get("gemm_gflops", {}).items()), "",
             f"{'dtype':8} {'mask':7} {'pass':9} {'impl':6} {'seconds':>9} {'GFLOP/s':>8} {'vs torch':>9}"]
    for r in result["rows"]:
        vs = "" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}x"
        lines.append(f"{r['dtype']:8} {r['mask']:7} {r['pass']:9} {r['impl']:6} "
                     f"{r['seconds']:9.4f} {r['gflops']:8.1f} {vs:>9}")
    if result.get("torch"):
        lines.append(f"vs torch: {result['torch']}")
    if result["ratios"]:
        lines.append("")
        for r in result["ratios"]:
            lines.append(f"numba {r['dtype']} {r['pass']}: {r['name']} = {r['value']:.3f}")
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------
def parse_window(text):
    if text is None:
        return None
    try:
        left, right = (int(p) for p in text.split(","))
    except ValueError:
        raise ParameterError(f"--window: expected two integers LEFT,RIGHT (-1 = unbounded), got {text!r}") from None
    if left < -1 or right < -1:
        raise ParameterError(f"--window: expected integers >= -1, got {text!r}")
    return (left, right)


def _ints(text, name) -> tuple:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ParameterError(f"{name}: expected positive integers separated by commas, got {text!r}")
    return values


def parse_bench_shape(text):
    b, h, sq, sk, d, hkv = parse_shape(text)
    if sq != sk or hkv != h:
        raise ParameterError(f"--shape: bench takes B,H,N,D (self-attention), got {text!r}")
    return (b, h, sq, d)


@click.command("bench")
@click.option("--shape", default="1,8,4096,64", show_default=True, metavar="B,H,N,D",
              help="Batch, heads, sequence length, head dim (q, k, v all (B, H, N, D)).")
@click.option("--causal", type=click.Choice(["both", "yes", "no"]), default="both", show_default=True,
              help="Time the non-causal ('full') and/or causal masks.")
@click.option("--window", default=None, metavar="LEFT,RIGHT",
              help="Also time a sliding window, e.g. 255,0 (our dense causal is timed as its baseline; "
                   "torch gets the equivalent boolean attn_mask).")
@click.option("--dtype", type=click.Choice(["float64", "float32", "both"]), default="float64",
              show_default=True, help="Compute dtype(s).")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True,
              help="Timed rounds, interleaved (each round calls every implementation in turn); "
                   "each implementation's fastest round is reported.")
@click.option("--backward/--no-backward", default=True, show_default=True, help="Also time the backward.")
@click.option("--numpy", "numpy_", type=click.Choice(["auto", "yes", "no"]), default="auto",
              show_default=True, help="Time the numpy backend (auto: when N*N <= 4096*4096).")
@click.option("--torch/--no-torch", "torch_peer", default=True, show_default=True,
              help="Time PyTorch's CPU SDPA when installed.")
@click.option("--threads", type=int, default=None, metavar="N",
              help="Threads for the numba backend and torch alike. Default: every CPU this process may use.")
@click.option("--backend", "backend", type=click.Choice(["numba", "cupy"]), default="numba",
              show_default=True,
              help="numba: CPU kernels vs torch CPU SDPA. cupy: CUDA kernels vs torch CUDA SDPA "
                   "(MATH backend for float64, memory-efficient for float32), TFLOP/s and the GPU "
                   "name; fails in one line without a usable GPU.")
@click.option("--distributed", is_flag=True, default=False,
              help="Time refattn.distributed (Dask tasks, inputs read from .npy files) against the "
                   "numba backend alone in the same run (refattn.distributed.bench); forward only.")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="With --distributed: a running Dask scheduler. Default: a LocalCluster.")
@click.option("--workers", metavar="N[,N...]", default="2", show_default=True,
              help="With --distributed: LocalCluster sizes to time (one thread each).")
@click.option("--chunk", metavar="C[,C...]", default="4096", show_default=True,
              help="With --distributed: query/KV chunk sizes to time.")
@json_option
@one_line_errors
def command(shape, causal, window, dtype, repeats, backward, numpy_, torch_peer, threads, backend,
            distributed, scheduler, workers, chunk, as_json):
    """Time numba, numpy and PyTorch CPU attention in the same run; table with GFLOP/s and ratios.
    With --backend cupy: the CUDA kernels and PyTorch's CUDA SDPA, TFLOP/s."""
    shp = parse_bench_shape(shape)
    win = parse_window(window)
    dtypes = ("float64", "float32") if dtype == "both" else (dtype,)
    progress = (lambda msg: None) if as_json else (lambda msg: click.echo(f"... {msg}", err=True))
    if distributed:  # a separate path: refattn.distributed.bench
        from refattn.distributed import bench as dbench

        result = dbench.run(shp, causal=causal != "no", window=win, repeats=repeats,
                            workers=_ints(workers, "--workers"), chunks=_ints(chunk, "--chunk"),
                            scheduler=scheduler, progress=progress)
        click.echo(dumps(result) if as_json else dbench.render(result))
        raise click.exceptions.Exit(EXIT_OK)
    if backend == "cupy":  # a separate path: cli/bench_gpu.py
        from . import bench_gpu

        result = bench_gpu.run(shp, dtypes=dtypes, causal=causal, window=win, repeats=repeats,
                               backward=backward, torch_peer=torch_peer, progress=progress)
        click.echo(dumps(result) if as_json else bench_gpu.render(result))
        raise click.exceptions.Exit(EXIT_OK)
    result = run(shp, dtypes=dtypes, causal=causal, window=win, repeats=repeats, backward=backward,
                 numpy=numpy_, torch_peer=torch_peer, threads=threads, progress=progress)
    click.echo(dumps(result) if as_json else render(result))
    raise click.exceptions.Exit(EXIT_OK)

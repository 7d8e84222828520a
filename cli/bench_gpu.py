"""``refattn bench --backend cupy``: our CUDA kernels next to PyTorch's CUDA SDPA, in the same run.

For each compute dtype and mask kind (``full``, ``causal``, and ``window`` with ``--window``) it times

* ``cupy``: the cupy backend's ``attend`` (and ``attend_backward``, given ``out`` and ``lse``) on
  CuPy arrays already on the device (no host transfers are timed);
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on the same device memory (DLPack,
  no copy), pinned to the backend a float64 or float32 user would get there: the MATH backend for
  float64 (the only one that takes float64) and the memory-efficient backend for float32;
  ``is_causal=True`` for causal, a boolean ``attn_mask`` for a window. Its backward is
  ``torch.autograd.grad`` through SDPA (the forward is not timed). Out of memory or no kernel for a
  case is recorded as that row's ``error``, not a crash.

Timing: the kernels are compiled first (``compile_seconds``, CuPy's cache makes later runs fast) and
torch is warmed up on a small case; then ``--repeats`` rounds call each implementation in turn,
timed with CUDA events, and each one's fastest round is reported. TFLOP/s count visible pairs only:
forward ``4 * D * pairs`` per (batch, head), backward 2.5x that (as the CPU bench). ``vs_torch`` is
torch's time over ours (above 1: we are faster). ``memory`` records CuPy's pool and torch's peak
allocation. With no usable GPU the command fails with one line (exit 2).

JSON (``--json``; keys may be added, never removed or renamed)::

    {"refattn": "0.1.0", "backend": "cupy", "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0",
     "memory_gib": 139.8}, "torch": "2.x" | null, "compile_seconds": 12.3,
     "shape": {"B": 1, "H": 16, "N": 16384, "D": 128}, "window": null, "repeats": 3,
     "rows": [{"dtype": "float64", "mask": "causal", "pass": "forward", "impl": "cupy",
               "peer_backend": null | "MATH" | "EFFICIENT_ATTENTION", "seconds": 0.31,
               "tflops": 9.1, "vs_torch": 2.4 | null, "error": null | "out of memory"}, ...],
     "memory": {"cupy_pool_bytes": ..., "torch_peak_bytes": ... | null}}
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from refattn import __version__, backends
from .bench import forward_flops, mask_patterns, visible_pairs

#: the torch SDPA backend each dtype is compared against
PEER_BACKEND = {"float64": "MATH", "float32": "EFFICIENT_ATTENTION"}


def gpu_info(cupy) -> dict:
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"name": name, "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_gib": round(props["totalGlobalMem"] / 2 ** 30, 1)}


def event_time(cupy, f) -> float:
    """Seconds ``f()`` takes on the device (CUDA events around it)."""
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    f()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _is_oom(exc) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _torch_calls(torch, q, k, v, dout, pattern, kind, dtype):
    """(forward, backward) closures over torch's SDPA on the same memory, pinned to the peer backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, PEER_BACKEND[dtype])
    tq, tk, tv, tdo = (torch.from_dlpack(x) for x in (q, k, v, dout))
    n = q.shape[2]
    kw = {}
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "window":
        i = torch.arange(n, device=tq.device)
        s, lo, hi = pattern.band(n, n)
        rel = i[None, :] - (i[:, None] + s)
        keep = torch.ones((n, n), dtype=torch.bool, device=tq.device)
        if lo is not None:
            keep &= rel >= lo
        if hi is not None:
            keep &= rel <= hi
        kw["attn_mask"] = keep

    def forward():
        with sdpa_kernel(backend), torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw)

    def backward_timed(cupy):
        lq, lk, lv = (t.detach().requires_grad_(True) for t in (tq, tk, tv))
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(lq, lk, lv, **kw)
        return event_time(cupy, lambda: torch.autograd.grad(out, (lq, lk, lv), tdo))

    return forward, backward_timed


def run(shape, *, dtypes, causal="both", window=None, repeats=3, backward=True, torch_peer=True,
        progress: Callable = lambda msg: None) -> dict:
    """Time everything on the GPU; returns the JSON-able result (see the module docstring)."""
    be = backends.get("cupy")  # BackendUnavailable (one line, exit 2) without a usable GPU
    import cupy

    torch = _torch() if torch_peer else None
    b, h, n, d = shape
    progress(f"compiling the kernels on {be.device_name}")
    compile_seconds = be.warm()
    if torch is not None:  # cuBLAS and SDPA set-up outside the timed rounds
        for dt in dtypes:
            x = torch.zeros((1, 1, 16, 16), dtype=getattr(torch, dt), device="cuda")
            torch.nn.functional.scaled_dot_product_attention(x, x, x)
    head_map = np.arange(h)
    scale = 1.0 / np.sqrt(d)
    rows = []
    for dtype in dtypes:
        gen = cupy.random.default_rng(0)
        q, k, v, dout = (gen.standard_normal((b, h, n, d), dtype=np.float64).astype(dtype)
                         for _ in range(4))
        for kind, pattern in mask_patterns(causal, window).items():
            pairs = visible_pairs(pattern, n, n)
            flops = {"forward": forward_flops(b, h, d, d, pairs)}
            flops["backward"] = 2.5 * flops["forward"]
            kw = dict(pattern=pattern, scale=scale, head_map=head_map)
            times = {"forward": {}, "backward": {}}
            errors = {}
            out, lse = be.attend(q, k, v, **kw)
            calls = {"cupy": (lambda: be.attend(q, k, v, **kw),
                              lambda: event_time(cupy, lambda: be.attend_backward(
                                  q, k, v, out, lse, dout, **kw)))}
            if torch is not None:
                calls["torch"] = _torch_calls(torch, q, k, v, dout, pattern, kind, dtype)
            progress(f"{dtype} {kind}: {', '.join(calls)} x {repeats}")
            for _ in range(repeats):
                for impl, (fwd, bwd) in calls.items():
                    for pass_ in ("forward", "backward") if backward else ("forward",):
                        if (impl, pass_) in errors:
                            continue
                        try:
                            sec = event_time(cupy, fwd) if pass_ == "forward" else bwd(cupy) \
                                if impl == "torch" else bwd()
                        except Exception as exc:  # noqa: BLE001 - torch OOM / no kernel: a result
                            if impl != "torch":
                                raise
                            errors[(impl, pass_)] = "out of memory" if _is_oom(exc) else \
                                f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                            torch.cuda.empty_cache()
                            continue
                        best = times[pass_].get(impl, float("inf"))
                        times[pass_][impl] = min(best, sec)
            del out, lse
            if torch is not None:  # torch's cache would otherwise hold the MATH path's N x N scores
                torch.cuda.empty_cache()
            for pass_ in ("forward", "backward") if backward else ("forward",):
                t_torch = times[pass_].get("torch")
                for impl in calls:
                    sec = times[pass_].get(impl)
                    rows.append({"dtype": dtype, "mask": kind, "pass": pass_, "impl": impl,
                                 "peer_backend": PEER_BACKEND[dtype] if impl == "torch" else None,
                                 "seconds": sec,
                                 "tflops": None if sec is None else flops[pass_] / sec / 1e12,
                                 "vs_torch": None if (sec is None or t_torch is None or impl == "torch")
                                 else t_torch / sec,
                                 "error": errors.get((impl, pass_))})
        del q, k, v, dout
    memory = {"cupy_pool_bytes": int(cupy.get_default_memory_pool().total_bytes()),
              "torch_peak_bytes": None if torch is None else int(torch.cuda.max_memory_allocated())}
    return {"refattn": __version__, "backend": "cupy", "gpu": gpu_info(cupy),
            "torch": None if torch is None else torch.__version__,
            "compile_seconds": compile_seconds, "shape": {"B": b, "H": h, "N": n, "D": d},
            "window": window, "repeats": repeats, "rows": rows, "memory": memory}


def render(result) -> str:
    shp, gpu = result["shape"], result["gpu"]
    lines = [f"refattn bench --backend cupy  B={shp['B']} H={shp['H']} N={shp['N']} D={shp['D']}"
             f"{'  window=' + str(tuple(result['window'])) if result['window'] else ''}  "
             f"best of {result['repeats']}",
             f"gpu: {gpu['name']} (cc {gpu['compute_capability']}, {gpu['memory_gib']} GiB)  "
             f"torch: {result['torch'] or 'not available'}  "
             f"kernel compile: {result['compile_seconds']:.1f} s", "",
             f"{'dtype':8} {'mask':7} {'pass':9} {'impl':22} {'seconds':>9} {'TFLOP/s':>8} "
             f"{'vs torch':>9}"]
    for r in result["rows"]:
        impl = r["impl"] + (f" ({r['peer_backend']})" if r["peer_backend"] else "")
        if r["error"]:
            lines.append(f"{r['dtype']:8} {r['mask']:7} {r['pass']:9} {impl:22} {r['error']}")
            continue
        vs = "" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}x"
        lines.append(f"{r['dtype']:8} {r['mask']:7} {r['pass']:9} {impl:22} {r['seconds']:9.4f} "
                     f"{r['tflops']:8.2f} {vs:>9}")
    m = result["memory"]
    lines += ["", f"memory: cupy pool {m['cupy_pool_bytes'] / 2 ** 30:.2f} GiB"
              + ("" if m["torch_peak_bytes"] is None else
                 f", torch peak {m['torch_peak_bytes'] / 2 ** 30:.2f} GiB")]
    return "\n".join(lines)


def peer_available() -> Optional[str]:
    torch = _torch()
    return None if torch is None else torch.__version__

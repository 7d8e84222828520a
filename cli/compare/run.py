"""Running what ``refattn compare`` compares: the run under test (a backend, ``--impl`` or
``--outputs``), the reference (numpy in float64, another backend, or a golden file) and, with a
low-precision dtype, the same-precision baseline. Every evaluation goes through the one pipeline
(:func:`refattn.pipeline.run`), directly or through :mod:`refattn.numerics`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import click
import numpy as np

from refattn import backends, pipeline
from refattn.errors import ParameterError, RefattnError
from refattn.impl import ImplCallError
from .problem import GRADS, Oracle, Problem

#: show a progress bar when a computation has at least this many scores (B * Hq * Sq * Sk)
PROGRESS_SCORES = 1 << 24


class progress_bar:
    """A click progress bar on stderr for computations with many scores: the backend reports each
    part's share of a primitive call's work, so the bar and its time-left estimate follow the work
    done (a variant that calls the primitive more than once fills it on the first call)."""

    UNITS = 1000

    def __init__(self, problem: Problem, label: str):
        self.length = self.UNITS
        self.show = problem.scores >= PROGRESS_SCORES
        self.label = label
        self.bar = None
        self.done = 0.0
        self.shown = 0

    def __enter__(self):
        if not self.show:
            return None
        self.bar = click.progressbar(length=self.length, label=self.label, file=sys.stderr)
        self.bar.__enter__()
        return self.tick

    def tick(self, fraction: float):
        self.done = min(float(self.length), self.done + fraction * self.length)
        step = int(self.done) - self.shown
        if step > 0:
            self.shown += step
            self.bar.update(step)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def grad_names(var) -> dict:
    """Output name -> input name of the gradients ``--grad`` compares: ``dq, dk, dv`` for attention
    variants, ``d<input>`` for every float input of the others."""
    names = var.inputs[:3] if var.on_qkv else var.inputs
    return {f"d{n}": n for n in names}


def run_backend(problem: Problem, name: str, label: str, dout=None, reference: bool = False) -> dict:
    """``{"out", "lse"?, ..., "dq", ...}`` of the problem's variant on backend ``name``."""
    var = problem.variant
    params = problem.params_for(reference)
    with progress_bar(problem, label) as tick:
        res = pipeline.run(var, name, dict(problem.inputs), params, progress=tick)
    if dout is not None:  # the backward in a bar of its own
        with progress_bar(problem, f"{label}, backward") as tick:
            res.grads = pipeline.run(var, name, dict(problem.inputs), params, dout=dout,
                                     progress=tick, forward=False).grads
    result = {n: np.asarray(a) for n, a in res.outputs.items()}
    if res.grads is not None:
        result.update({g: np.asarray(res.grads[n]) for g, n in grad_names(var).items()
                       if n in res.grads})
    return result


def impl_outputs(variant: str, inputs: dict, params: dict, o: Oracle, dout) -> dict:
    """The outputs (and with ``dout`` the gradients) of the user's function on a case: what
    :func:`run_impl` runs, here or in a subprocess (``--timeout``). Plain data in, plain data out."""
    from refattn import impl, variants

    var = variants.get(variant)
    problem = Problem(variant=var, params=params, inputs=inputs, shape=None, seed=None, tolerance=0.0)
    if not problem.on_qkv:  # any other variant: fn(**inputs, **params) (refattn.impl.call_named)
        from .named import run_impl_named
        return run_impl_named(problem, o, dout)[1]
    fn = impl.load(o.impl)
    case = problem.case_dict
    dtype = o.dtype if o.low else None
    got = impl.call(fn, case, adapter=o.adapter, framework=o.framework, dtype=dtype,
                    device=o.device, want_lse=o.lse)
    if got.get("out") is None:
        raise ParameterError(f"impl: {o.impl} returned None; expected the output array or "
                             f"(out, lse)")
    if dout is not None:
        if o.framework == "numpy":
            got.update(impl.grads(impl.load(o.backward), case, dout, adapter="refattn",
                                  framework="numpy", dtype=dtype, device=o.device))
        else:
            got.update(impl.grads(fn, case, dout, adapter=o.adapter, framework=o.framework,
                                  dtype=dtype, device=o.device))
    return got


def _changed(before: dict, inputs: dict, params: dict) -> list:
    """Names of the arrays in ``before`` (private copies) that differ now."""
    now = {**inputs, **params}
    return sorted(n for n, a in before.items()
                  if not np.array_equal(now[n], a, equal_nan=a.dtype.kind == "f"))


def _copies(inputs: dict, params: dict) -> dict:
    return {n: np.array(a, copy=True) for n, a in {**inputs, **params}.items()
            if isinstance(a, np.ndarray)}


def _isolated(conn, args):
    """The child of :func:`_with_timeout`: run :func:`impl_outputs` and send the result back (with
    the names of the inputs the function wrote into)."""
    try:
        before = _copies(args[1], args[2])
        got = impl_outputs(*args)
        conn.send(("ok", got, _changed(before, args[1], args[2])))
    except BaseException as exc:  # report everything, even SystemExit, as one line
        conn.send(("error", type(exc).__name__, str(exc), isinstance(exc, RefattnError)))
    finally:
        conn.close()


def _with_timeout(args, timeout: float) -> dict:
    """:func:`impl_outputs` in a fresh process that is stopped after ``timeout`` seconds (a thread
    cannot be killed; a hung kernel must not hang the check)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated, args=(child, args), daemon=True)
    proc.start()
    child.close()
    try:
        ready = parent.poll(timeout)
        if not ready:
            raise ParameterError(f"--timeout: the function under test did not return within "
                                 f"{timeout:g} s; it was stopped")
        try:
            msg = parent.recv()
        except EOFError:
            raise ParameterError(f"--timeout: the process running the function under test ended "
                                 f"without a result (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(5)
    if msg[0] == "ok":
        return msg[1], msg[2]
    _, kind, text, ours = msg
    if ours:
        raise ImplCallError(text)
    raise ImplCallError(f"impl: the function under test raised {kind}: {text}")


def run_impl(problem: Problem, o: Oracle, dout) -> tuple:
    """``(description, outputs)`` of the user's function (refattn.impl) on the problem.

    The function gets the case's arrays; refattn keeps private copies, so a function that writes
    into its inputs cannot change the reference, and such a function is reported (``mutated`` in
    the description: the names of the arrays it changed; the verdict is then FAIL)."""
    keep = _copies(problem.inputs, problem.params)
    args = (problem.variant.name, problem.inputs, problem.params, o, dout)
    if o.timeout is not None:
        got, mutated = _with_timeout(args, o.timeout)
    else:
        got = impl_outputs(*args)
        mutated = _changed(keep, problem.inputs, problem.params)
    problem.inputs = {n: keep.get(n, a) for n, a in problem.inputs.items()}
    problem.params = {n: keep.get(n, a) for n, a in problem.params.items()}
    subject = {"kind": "impl", "name": o.impl, "adapter": o.adapter, "framework": o.framework,
               "device": o.device, "lse": o.lse, "backward": o.backward, "mutated": mutated}
    return subject, got


def run_under_test(problem: Problem, backend: Optional[str], oracle: Optional[Oracle] = None,
                   dout=None) -> tuple:
    """``(description, outputs)`` of what is under test: --impl, --outputs or the backend
    (default: the fastest)."""
    kind = "backend" if oracle is None else oracle.kind
    if kind == "impl":
        return run_impl(problem, oracle, dout)
    if kind == "outputs":
        keep = ("out", "lse") + (GRADS if dout is not None else ())
        got = {n: a for n, a in problem.saved.items() if n in keep}
        return ({"kind": "outputs", "name": os.path.basename(problem.source), "file": problem.source,
                 "keys": sorted(set(problem.saved) | set(problem.inputs) | set(problem.params)
                                & {"cu_seqlens_q", "cu_seqlens_k", "mask", "bias", "alibi_slopes",
                                   "sinks", "head_map", "dropout_mask"})}, got)
    name = backend or backends.fastest(problem.variant.backends)
    if oracle is not None and oracle.distributed is not None:
        scheduler, chunk = oracle.distributed
        from refattn.distributed import outputs
        got = outputs(problem.variant, dict(problem.inputs), problem.params_for(False), backend=name,
                      client=scheduler, chunk=chunk, dout=dout)
        got = {g: got[n] for g, n in {"out": "out", "lse": "lse", **grad_names(problem.variant)}.items()
               if n in got}
        return {"kind": "backend", "name": f"{name} on dask ({scheduler or 'LocalCluster'}, chunk "
                                          f"{chunk})"}, got
    return {"kind": "backend", "name": name}, run_backend(problem, name, f"{name} (under test)", dout)


def run_reference(problem: Problem, against: str, dout=None, oracle: Optional[Oracle] = None) -> tuple:
    """``(description, outputs)`` of the reference: ``numpy``, ``golden`` or another backend
    (for --impl/--outputs: ``refattn.numerics.reference``, which also handles packed batches)."""
    if oracle is not None and oracle.kind != "backend":
        from refattn import numerics
        return ({"kind": "numpy", "name": "numpy"},
                numerics.reference(problem.case_dict, variant=problem.variant.name, dout=dout))
    if against == "golden":
        if problem.golden is None:
            raise ParameterError("--against: 'golden' needs --case NAME (refattn golden verify "
                                 "lists the cases)")
        g = problem.golden
        stored = {k.split(".", 1)[1]: a for k, a in g.arrays.items() if k.startswith("output.")}
        if dout is not None:
            names = grad_names(problem.variant)
            if not all(f"grad.{n}" in g.arrays for n in names):
                raise ParameterError(f"--grad: golden case {g.name!r} stores no gradients")
            stored.update({n: g.arrays[f"grad.{n}"] for n in names})
        return {"kind": "golden", "name": g.name, "file": g.path}, stored
    kind = "numpy" if against == "numpy" else "backend"
    result = run_backend(problem, against, f"{against} (reference)", dout, reference=True)
    return {"kind": kind, "name": against}, result


def run_baseline(problem: Problem, o: Oracle, dout) -> dict:
    """The same-precision (or inputs-only) baseline of refattn.numerics."""
    from refattn import numerics
    return numerics.baseline(problem.case_dict, variant=problem.variant.name, dtype=o.dtype,
                             mode=o.baseline, dout=dout)

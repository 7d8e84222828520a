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
from refattn.errors import ParameterError
from .problem import GRADS, Oracle, Problem

#: show a progress bar when a computation has at least this many scores (B * Hq * Sq * Sk)
PROGRESS_SCORES = 1 << 24


class progress_bar:
    """A click progress bar on stderr over the query rows, for computations with many scores."""

    def __init__(self, problem: Problem, label: str):
        self.length = problem.shape[2] if problem.shape else 0
        self.show = problem.scores >= PROGRESS_SCORES
        self.label = label
        self.bar = None
        self.done = 0

    def __enter__(self):
        if not self.show:
            return None
        self.bar = click.progressbar(length=self.length, label=self.label, file=sys.stderr)
        self.bar.__enter__()
        return self.tick

    def tick(self, rows: int):
        step = max(0, min(rows, self.length - self.done))  # variants may visit rows more than once
        self.done += step
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
    with progress_bar(problem, label) as tick:
        res = pipeline.run(var, name, dict(problem.inputs), problem.params_for(reference),
                           dout=dout, progress=tick)
    result = {n: np.asarray(a) for n, a in res.outputs.items()}
    if res.grads is not None:
        result.update({g: np.asarray(res.grads[n]) for g, n in grad_names(var).items()
                       if n in res.grads})
    return result


def run_impl(problem: Problem, o: Oracle, dout) -> tuple:
    """``(description, outputs)`` of the user's function (refattn.impl) on the problem."""
    from refattn import impl

    if not problem.on_qkv:  # any other variant: fn(**inputs, **params) (refattn.impl.call_named)
        from .named import run_impl_named
        return run_impl_named(problem, o, dout)
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
    subject = {"kind": "impl", "name": o.impl, "adapter": o.adapter, "framework": o.framework,
               "device": o.device, "lse": o.lse, "backward": o.backward}
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

"""``refattn compare``: how far is an implementation from the float64 reference?

The command is a pipeline of small functions, each replaceable on its own (the oracle issue adds
``--impl``, ``--outputs``, ``--dtype``, ``--grad``, ``--report``, ``--factor/--atol`` by adding
steps, not by rewriting these):

    build_problem  -> the case: variant, parameters, input arrays (a golden case or made from a seed)
    run_under_test -> the outputs under test (today: a backend; later: --impl, --outputs)
    run_reference  -> the reference outputs (float64 numpy in query chunks, a backend, or golden)
    metrics        -> per-array error metrics (the JSON schema below)
    verdict        -> PASS/FAIL per array and overall
    render         -> the table (or JSON)

Exit status: 0 PASS, 1 FAIL, 2 usage or input error (one line on stderr).

Verdict rule (two float64 evaluations of the same definition): an array passes when its non-finite
entries are identical (same positions, same NaN/+inf/-inf) and its normwise relative error
``||a - r||_2 / ||r||_2`` over the finite entries is at most the tolerance (the golden case's, else the
variant's default from the registry, ``refattn list``).

JSON (``--json``; stable: keys may be added, never removed or renamed)::

    {"refattn": "0.1.0", "variant": "sdpa", "case": null, "golden_file": null,
     "shape": [B, Hq, Sq, Sk, D, Hkv], "seed": 0,
     "params": {"causal": true, "sinks": "array (4,) float64", ...},
     "under_test": {"kind": "backend", "name": "numba"},
     "reference": {"kind": "numpy" | "backend" | "golden", "name": "numpy",
                   "file": "..."},                            # file: golden only
     "tolerance": 1e-12, "rule": "...",
     "arrays": {"out": METRICS, "lse": METRICS},
     "verdict": "PASS" | "FAIL",
     "seconds": {"under_test": 0.1, "reference": 0.2}}

    METRICS = {"shape": [...], "axes": "b,h,i,d" | null,     # axes of worst_index, when known
               "max_abs": float, "max_rel": float, "normwise_rel": float,
               "worst_index": [..] | null, "worst_actual": float | null, "worst_expected": float | null,
               "nan": [under_test, reference], "inf": [under_test, reference],
               "nonfinite_mismatch": int, "pass": bool}

``max_rel`` is ``max |a - r| / |r|`` over finite entries (``inf`` where ``r = 0 != a``); the worst index
is the first entry whose non-finite status differs, else the largest ``|a - r|``. Non-finite numbers
in the JSON are the strings ``"inf"``/``"nan"``. With a shape mismatch, ``METRICS`` is
``{"shape": [...], "expected_shape": [...], "error": "...", "pass": false}``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import click
import numpy as np

from refattn import __version__, backends, variants
from refattn.errors import BackendUnavailable, ParameterError, ShapeError
from .options import (EXIT_FAIL, EXIT_OK, Made, backend_option, dumps, json_option,
                      one_line_errors, param_option, parse_params, parse_shape)

#: shape (B, Hq, Sq, Sk, D, Hkv) when --shape is not given, and the variants that need another
DEFAULT_SHAPE = (1, 8, 256, 256, 64, 8)
VARIANT_SHAPES = {"mqa": (1, 8, 256, 256, 64, 1), "gqa": (1, 8, 256, 256, 64, 2),
                  # long enough for BigBird's block-sparse path (HF falls back to full attention
                  # below (5 + 2 * num_random_blocks) * block_size = 704 tokens by default)
                  "bigbird": (1, 8, 1024, 1024, 64, 8)}
#: show a progress bar when a computation has at least this many scores (B * Hq * Sq * Sk)
PROGRESS_SCORES = 1 << 24
RULE = "non-finite entries identical and normwise_rel <= tolerance"


@dataclass
class Problem:
    """What is compared: a variant, its keyword parameters (arrays made), its inputs."""

    variant: object
    params: dict
    inputs: dict
    shape: Optional[tuple]
    seed: Optional[int]
    tolerance: float
    case: Optional[str] = None
    golden: object = None  # refattn.golden.Stored for --case

    @property
    def scores(self) -> int:
        if self.shape is None:
            return 0
        b, hq, sq, sk, _, _ = self.shape
        return b * hq * sq * sk


# -- build the case -------------------------------------------------------------------------------
def build_problem(variant: Optional[str], case: Optional[str], shape: Optional[str], seed: Optional[int],
                  param_items) -> Problem:
    """From a golden case (``case``) or from ``Variant.example`` with ``shape`` and ``seed``."""
    if case is not None:
        return problem_from_golden(variant, case, shape, seed, param_items)
    if variant is None:
        raise ParameterError("--variant: expected a variant name (refattn list shows them) or --case")
    from refattn.golden.cases import Case, build, makers

    var = variants.get(variant)
    parsed = parse_params(var, param_items, {n for n, _ in makers()})
    scalars = {n: v for n, v in parsed.items() if not isinstance(v, Made)}
    arrays = {n: v.how for n, v in parsed.items() if isinstance(v, Made)}
    default = VARIANT_SHAPES.get(var.name, DEFAULT_SHAPE)
    dims = default if shape is None else parse_shape(shape)
    if shape is not None and len(shape.split(",")) == 4 and default[5] == 1:
        dims = dims[:5] + (1,)  # B,H,S,D for a one-KV-head variant (mqa): Hkv = 1
    if dims[1] % dims[5] and "head_map" not in parsed:
        raise ShapeError(f"--shape: expected Hkv dividing Hq (query heads share KV heads in equal "
                         f"groups), got Hq={dims[1]}, Hkv={dims[5]}; --param head_map=random gives "
                         f"an uneven grouping")
    seed = 0 if seed is None else seed
    built = build(Case(name="cli", variant=var.name, shape=dims, seed=seed, params=scalars,
                       arrays=arrays))
    return Problem(variant=var, params=built.params, inputs=built.inputs, shape=dims, seed=seed,
                   tolerance=var.tolerance)


def problem_from_golden(variant, case, shape, seed, param_items) -> Problem:
    """The stored inputs of golden case ``case`` (scalars from its definition, arrays from its file)."""
    from refattn import golden
    from refattn.golden.cases import all_cases

    for flag, value in (("--shape", shape), ("--seed", seed), ("--param", param_items or None)):
        if value is not None:
            raise ParameterError(f"{flag}: expected nothing with --case (the case fixes it), got {value!r}")
    cases = all_cases()
    if case not in cases:
        raise ParameterError(f"--case: expected a golden case ({', '.join(sorted(cases))}), got {case!r}")
    c = cases[case]
    if variant is not None and variants.get(variant) is not variants.get(c.variant):
        raise ParameterError(f"--variant: case {case!r} is of variant {c.variant!r}, got {variant!r}")
    stored = golden.load(case)
    inputs, params, _ = golden.stored_inputs(c, stored)
    return Problem(variant=variants.get(c.variant), params=params, inputs=inputs,
                   shape=tuple(c.shape), seed=c.seed, tolerance=stored.entry["tolerance"], case=case,
                   golden=stored)


# -- run: under test and reference ----------------------------------------------------------------
def backend_instance(name: str, progress):
    """The backend called ``name``; the numpy one reports its query chunks to ``progress``."""
    if name == "numpy" and progress is not None:
        from refattn.backends.numpy_ import NumpyBackend

        class ProgressNumpy(NumpyBackend):
            def scores(self, q_rows, k, rows, *args, **kwargs):
                progress(rows.stop - rows.start)
                return super().scores(q_rows, k, rows, *args, **kwargs)

        return ProgressNumpy()
    return backends.get(name)


def run_backend(problem: Problem, name: str, label: str) -> dict:
    """``{"out": ..., "lse": ...}`` of the problem's variant on backend ``name``."""
    var = problem.variant
    if name not in var.backends:
        raise BackendUnavailable(f"backend: variant {var.name!r} runs on {', '.join(var.backends)}, "
                                 f"got {name!r}")
    backends.get(name)  # unknown or not installed: BackendUnavailable before any work
    with progress_bar(problem, label) as tick:
        out, lse = var.forward(backend_instance(name, tick), dict(problem.inputs),
                               var.parse_params(problem.params))
    result = {"out": np.asarray(out)}
    if lse is not None:
        result["lse"] = np.asarray(lse)
    return result


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
        self.bar = click.progressbar(length=self.length, label=self.label,
                                     file=sys.stderr)
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


def run_under_test(problem: Problem, backend: Optional[str]) -> tuple:
    """``(description, outputs)`` of what is under test: the backend (default: the fastest)."""
    name = backend or backends.fastest(problem.variant.backends)
    return {"kind": "backend", "name": name}, run_backend(problem, name, f"{name} (under test)")


def run_reference(problem: Problem, against: str) -> tuple:
    """``(description, outputs)`` of the reference: ``numpy``, ``golden`` or another backend."""
    if against == "golden":
        if problem.golden is None:
            raise ParameterError("--against: 'golden' needs --case NAME (refattn golden verify "
                                 "lists the cases)")
        g = problem.golden
        stored = {k: g.arrays[f"output.{k}"] for k in ("out", "lse") if f"output.{k}" in g.arrays}
        return {"kind": "golden", "name": g.name, "file": g.path}, stored
    kind = "numpy" if against == "numpy" else "backend"
    return {"kind": kind, "name": against}, run_backend(problem, against, f"{against} (reference)")


# -- metrics and verdict --------------------------------------------------------------------------
def _num(x):
    """A float for JSON: finite as is, else the string 'inf', '-inf' or 'nan'."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def metrics(actual: dict, expected: dict, axes: Optional[dict] = None) -> dict:
    """Error metrics of every array in ``expected`` (the ``METRICS`` schema of the module docstring).

    ``actual`` and ``expected`` map names to arrays; ``axes`` maps a name to the axis letters of its
    index (``"b,h,i,d"``). An array missing from ``actual`` is a shape mismatch.
    """
    axes = axes or {}
    report = {}
    for name, r in expected.items():
        r = np.asarray(r, dtype=np.float64)
        if name not in actual or np.shape(actual[name]) != r.shape:
            got = list(np.shape(actual[name])) if name in actual else None
            report[name] = {"shape": got, "expected_shape": list(r.shape), "axes": axes.get(name),
                            "error": f"{name}: expected shape {tuple(r.shape)}, got "
                                     f"{'nothing' if got is None else tuple(got)}"}
            continue
        a = np.asarray(actual[name], dtype=np.float64)
        finite = np.isfinite(a) & np.isfinite(r)
        same_nonfinite = (a == r) | (np.isnan(a) & np.isnan(r))
        bad = ~finite & ~same_nonfinite
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            err = np.where(finite, np.abs(a - r), 0.0)
            rel = np.where(finite & (err > 0), err / np.abs(r), 0.0)
        norm_r = float(np.linalg.norm(np.where(finite, r, 0.0)))
        norm_e = float(np.linalg.norm(err))
        worst = None
        if bad.any():
            worst = np.unravel_index(int(np.argmax(bad)), r.shape)
        elif finite.any() and err.max() > 0:
            worst = np.unravel_index(int(np.argmax(err)), r.shape)
        report[name] = {
            "shape": list(r.shape), "axes": axes.get(name),
            "max_abs": _num(err.max(initial=0.0)), "max_rel": _num(rel.max(initial=0.0)),
            "normwise_rel": _num(norm_e / norm_r if norm_r else (0.0 if norm_e == 0 else math.inf)),
            "worst_index": None if worst is None else [int(i) for i in worst],
            "worst_actual": None if worst is None else _num(a[worst]),
            "worst_expected": None if worst is None else _num(r[worst]),
            "nan": [int(np.isnan(a).sum()), int(np.isnan(r).sum())],
            "inf": [int(np.isinf(a).sum()), int(np.isinf(r).sum())],
            "nonfinite_mismatch": int(bad.sum()),
        }
    return report


def verdict(report: dict, tolerance: float) -> str:
    """Mark each array's ``pass`` (the rule in the module docstring); overall ``PASS``/``FAIL``."""
    for m in report.values():
        rel = m.get("normwise_rel")
        m["pass"] = ("error" not in m and m["nonfinite_mismatch"] == 0
                     and isinstance(rel, float) and rel <= tolerance)
    return "PASS" if report and all(m["pass"] for m in report.values()) else "FAIL"


def index_axes(problem: Problem) -> dict:
    """Axis letters of ``out``/``lse`` for variants on ``q, k, v`` in the problem's layout."""
    if tuple(problem.variant.inputs[:3]) != ("q", "k", "v"):
        return {}
    out = "b,i,h,d" if problem.params.get("layout") == "bshd" else "b,h,i,d"
    return {"out": out, "lse": "b,h,i"}


# -- render ---------------------------------------------------------------------------------------
def describe_params(params: dict) -> dict:
    """Parameters for display and JSON: arrays as 'array (shape) dtype'."""
    return {n: (f"array {tuple(v.shape)} {v.dtype}" if hasattr(v, "shape") else v)
            for n, v in params.items()}


def _fmt(x) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"


def render(result: dict) -> str:
    """The human-readable table of a compare result (the JSON dict)."""
    lines = []
    head = f"variant {result['variant']}"
    if result["case"]:
        head += f", golden case {result['case']}"
    if result["shape"]:
        b, hq, sq, sk, d, hkv = result["shape"]
        head += f", shape B={b} Hq={hq} Sq={sq} Sk={sk} D={d} Hkv={hkv}"
    if result["seed"] is not None:
        head += f", seed {result['seed']}"
    lines.append(head)
    if result["params"]:
        lines.append("params: " + ", ".join(f"{k}={v}" for k, v in result["params"].items()))
    ref = result["reference"]
    ref_text = {"numpy": "numpy float64 (query chunks)", "golden": f"golden file {ref.get('file')}"
                }.get(ref["kind"], f"backend {ref['name']}")
    lines.append(f"under test: backend {result['under_test']['name']}; reference: {ref_text}")
    from .list_ import table

    rows = []
    for name, m in result["arrays"].items():
        if "error" in m:
            rows.append((name, m["error"], "", "", "", "", "", "FAIL"))
            continue
        idx = "-" if m["worst_index"] is None else "(" + ", ".join(map(str, m["worst_index"])) + ")"
        if m["worst_index"] is not None and m["axes"]:
            idx = f"({m['axes']}) = {idx}"
        rows.append((name, _fmt(m["max_abs"]), _fmt(m["max_rel"]), _fmt(m["normwise_rel"]), idx,
                     "%d/%d" % tuple(m["nan"]), "%d/%d" % tuple(m["inf"]),
                     "PASS" if m["pass"] else "FAIL"))
    lines.append("")
    lines.append(table(rows, ("array", "max abs", "max rel", "normwise rel", "worst index",
                              "NaN test/ref", "Inf test/ref", "verdict")))
    lines.append("")
    lines.append(f"{result['verdict']}: {RULE}, tolerance {result['tolerance']:g}")
    return "\n".join(lines)


def compare(problem: Problem, backend: Optional[str], against: str) -> dict:
    """Run the pipeline and return the JSON-able result (the schema in the module docstring)."""
    t0 = time.perf_counter()
    subject, actual = run_under_test(problem, backend)
    t1 = time.perf_counter()
    reference, expected = run_reference(problem, against)
    t2 = time.perf_counter()
    report = metrics(actual, expected, index_axes(problem))
    overall = verdict(report, problem.tolerance)
    return {"refattn": __version__, "variant": problem.variant.name, "case": problem.case,
            "golden_file": problem.golden.path if problem.golden is not None else None,
            "shape": list(problem.shape) if problem.shape else None, "seed": problem.seed,
            "params": describe_params(problem.params), "under_test": subject, "reference": reference,
            "tolerance": problem.tolerance, "rule": RULE, "arrays": report, "verdict": overall,
            "seconds": {"under_test": round(t1 - t0, 4), "reference": round(t2 - t1, 4)}}


@click.command("compare", short_help="Errors of a backend against the float64 reference; PASS/FAIL.")
@click.option("--variant", "-v", metavar="NAME", default=None,
              help="Variant to check (refattn list shows them). Default: the --case's variant.")
@backend_option
@click.option("--against", metavar="REF", default="numpy", show_default=True,
              help="Reference: 'numpy' (float64, in query chunks), 'golden' (the stored outputs of "
                   "--case) or another backend's name.")
@click.option("--case", metavar="NAME", default=None,
              help="Use the inputs of this golden case (refattn golden verify lists them). Default: "
                   "inputs made from --shape and --seed.")
@click.option("--shape", metavar="B,H,S,D", default=None,
              help="B,H,S,D (Hkv = H; mqa: 1) or B,Hq,Sq,Sk,D,Hkv. Default: 1,8,256,64 (gqa: "
                   "Hkv=2, mqa: Hkv=1, bigbird: S=1024).")
@click.option("--seed", type=int, default=None, help="Seed of the made inputs. Default: 0.")
@param_option
@json_option
@one_line_errors
def command(variant, backend, against, case, shape, seed, params, as_json):
    """Compare a backend with the float64 reference and print the errors and a verdict.

    Exit status: 0 PASS, 1 FAIL, 2 usage or input error.
    """
    if against not in ("numpy", "golden"):
        backends.get(against)  # an unknown reference backend is a usage error before any work
    if backend is not None:
        backends.get(backend)
    problem = build_problem(variant, case, shape, seed, params)
    result = compare(problem, backend, against)
    click.echo(dumps(result) if as_json else render(result))
    raise click.exceptions.Exit(EXIT_OK if result["verdict"] == "PASS" else EXIT_FAIL)

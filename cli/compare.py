"""``refattn compare``: how far is an implementation from the float64 reference?

The command is a pipeline of small functions, each replaceable on its own:

    build_problem  -> the case: variant, parameters, input arrays (a golden case, made from a seed,
                      or read from an --outputs file: problem_from_outputs)
    run_under_test -> the outputs under test: a backend, a user function (--impl) or saved outputs
                      (--outputs); with --grad also dq, dk, dv
    run_reference  -> the reference outputs (float64 numpy in query chunks, a backend, or golden)
    run_baseline   -> with a low-precision --dtype: the same-precision baseline (refattn.numerics)
    metrics        -> per-array error metrics (the JSON schema below)
    verdict        -> PASS/FAIL per array and overall
    explain        -> on FAIL: where the errors cluster and the worst (b, h, i, j) (refattn.report)
    render         -> the table (or JSON); --report writes it as .md/.html with a heat map

Exit status: 0 PASS, 1 FAIL, 2 usage or input error (one line on stderr). An exception raised inside
the --impl function is an input error: one line naming the function and the exception.

What is under test: ``--impl module:function`` (refattn.impl.load: also ``path/file.py:function``
and ``module:Class.method``; the current directory is searched), ``--outputs file.npz`` (keys of
refattn.npzio: q, k, v, out, optional lse, dout/dq/dk/dv, cu_seqlens_q/k and array parameters;
loaded with allow_pickle=False) or else ``--backend`` (default: the fastest available). The function
is called through ``--adapter`` (refattn.adapters: ``refattn`` = ``fn(q, k, v, **params)``,
``sdpa``, ``flex``, ``flash`` (B, S, H, D), ``varlen`` (packed, cu_seqlens)) with numpy arrays or,
with ``--framework torch``, torch tensors on ``--device`` made with DLPack. ``--dtype`` is the
precision it computes in: the made inputs (and dout) are rounded to it first, so the function and the
reference see the same numbers, and the function receives arrays of that dtype (ml_dtypes for bf16
and fp8 with numpy). Default: ``fp64`` for --impl and backends; for --outputs the narrowest dtype
that holds the saved ``out`` exactly (``numerics.infer_dtype``: a bf16 kernel's output saved as
float32 is recognised as bf16).

Verdict rules.

* ``--dtype fp64`` (two float64 evaluations of the same definition): an array passes when its
  non-finite entries are identical (same positions, same NaN/+inf/-inf) and its normwise relative
  error ``||a - r||_2 / ||r||_2`` over the finite entries is at most the tolerance (the golden case's,
  else the variant's default from the registry, ``refattn list``).
* a low-precision ``--dtype`` (bf16, fp16, fp8_e4m3, fp8_e5m2, fp32): an array passes when ::

      max|a - r| <= factor * max|baseline - r| + atol(dtype)

  and its non-finite entries are those of the reference; ``baseline`` is the same-precision
  emulation of refattn.numerics (``--baseline same_precision``: inputs rounded, scores and softmax
  in float32, P rounded before P.V, output rounded; ``inputs_only``: only the inputs and outputs
  rounded). Defaults ``factor = 2``, ``atol = eps(dtype) / 2`` (the variant's ``verdict``
  declaration may change them; ``--factor``/``--atol`` override both). Origin: flash-attn's test
  suite, ``(out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max() + atol``.

``--grad`` also compares dq, dk, dv for an upstream gradient ``dout``: drawn from the case's
generator after its inputs (the golden convention; a golden case's stored ``dout``), or the file's
``dout`` with --outputs. A backend runs its backward; a torch --impl is differentiated by autograd;
a numpy --impl needs ``--backward module:function`` with refattn's convention
``fn(q, k, v, dout, **params) -> (dq, dk, dv, ...)``.

JSON (``--json``; stable: keys may be added, never removed or renamed)::

    {"refattn": "0.1.0", "variant": "sdpa", "case": null, "golden_file": null,
     "shape": [B, Hq, Sq, Sk, D, Hkv] | null,                  # null: packed (varlen) --outputs
     "seed": 0 | null,
     "params": {"causal": true, "sinks": "array (4,) float64", ...},
     "under_test": {"kind": "backend", "name": "numba"}
                 | {"kind": "impl", "name": "my_pkg.kernels:my_attn", "adapter": "refattn",
                    "framework": "numpy", "device": null | "cuda", "lse": false,
                    "backward": null | "module:function"}
                 | {"kind": "outputs", "name": "run.npz", "file": "/abs/run.npz",
                    "keys": ["k", "lse", "out", "q", "v"]},
     "reference": {"kind": "numpy" | "backend" | "golden", "name": "numpy",
                   "file": "..."},                            # file: golden only
     "dtype": "fp64" | "bf16" | "fp16" | "fp8_e4m3" | "fp8_e5m2" | "fp32",
     "dtype_inferred": false,                                  # true: guessed from --outputs
     "baseline": null | "same_precision" | "inputs_only",     # null with fp64
     "factor": null | 2.0, "atol": null | 0.00390625,         # null with fp64
     "tolerance": 1e-12 | null,                                # null with a low-precision dtype
     "rule": "...", "grad": false,
     "arrays": {"out": METRICS, "lse": METRICS, "dq": ..., "dk": ..., "dv": ...},
     "verdict": "PASS" | "FAIL",
     "analysis": null | {"worst": {"index": [b, h, i, j | null], "element": [b, h, i, d],
                                   "relation": "...", "explained": 0.99,
                                   "block_keys": [j0, j1], "block_explained": 0.5},
                         "lines": ["12 of 2048 rows (b, h, i) exceed ...", ...]},
     "report": null | ["out.md", "out_heatmap.png"],
     "seconds": {"under_test": 0.1, "reference": 0.2, "baseline": 0.3}}   # baseline: low dtype

    METRICS = {"shape": [...], "axes": "b,h,i,d" | null,     # axes of worst_index, when known
               "max_abs": float, "max_rel": float, "normwise_rel": float,
               "worst_index": [..] | null, "worst_actual": float | null, "worst_expected": float | null,
               "nan": [under_test, reference], "inf": [under_test, reference],
               "nonfinite_mismatch": int, "pass": bool,
               # with a low-precision dtype only:
               "dtype": "bf16", "baseline_max_abs": float, "factor": float, "atol": float,
               "allowed": float,                          # factor * baseline_max_abs + atol
               "max_ulp": float,                          # max |a - r| / ulp_dtype(r)
               "mismatches": int}                         # entries with |a - r| > allowed

``max_rel`` is ``max |a - r| / |r|`` over finite entries (``inf`` where ``r = 0 != a``); the worst index
is the first entry whose non-finite status differs, else the largest ``|a - r|``. Non-finite numbers
in the JSON are the strings ``"inf"``/``"nan"``. With a shape mismatch, ``METRICS`` is
``{"shape": [...], "expected_shape": [...], "error": "...", "pass": false}``. ``analysis`` is filled
on FAIL (and with --report) from the ``out`` array: rows over the allowed error (fp64: over
``tolerance * max|reference|``), whether they concentrate in the first/last rows, heads or batch
entries, and -- for variants that call the attend primitive once -- the key ``j`` (and key block)
whose re-weighting explains the worst row's error, with its place relative to the causal/window
band (refattn.report).
"""

from __future__ import annotations

import math
import os
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

#: show a progress bar when a computation has at least this many scores (B * Hq * Sq * Sk)
PROGRESS_SCORES = 1 << 24
RULE = "non-finite entries identical and normwise_rel <= tolerance"
RULE_LOW = ("non-finite entries as the reference's and max_abs <= factor * baseline_max_abs + atol "
            "(baseline: the computation emulated in the dtype)")
#: --dtype choices; fp64 selects the float64 rule
DTYPES = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp32", "fp64")
ADAPTERS = ("refattn", "sdpa", "flex", "flash", "varlen")
FRAMEWORKS = ("numpy", "torch")
BASELINES = ("same_precision", "inputs_only")
REPORT_SUFFIXES = (".md", ".html", ".htm")
GRADS = ("dq", "dk", "dv")


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
    saved: Optional[dict] = None  # --outputs: the saved out, lse, dout, dq, dk, dv
    source: Optional[str] = None  # --outputs: the file
    rng: object = None  # the case's generator after its inputs (for dout)
    dout: Optional[np.ndarray] = None  # a golden case's stored dout

    def params_for(self, reference: bool) -> dict:
        """The keyword parameters for the run under test, or for the reference, which is always
        float64 whatever ``compute_dtype`` the run under test asked for."""
        if reference:
            return {n: v for n, v in self.params.items() if n != "compute_dtype"}
        return self.params

    @property
    def scores(self) -> int:
        if self.shape is None:
            return 0
        b, hq, sq, sk, _, _ = self.shape
        return b * hq * sq * sk

    @property
    def case_dict(self) -> dict:
        """Inputs and parameters as one dict: the keywords of ``refattn.attention``."""
        return {**self.inputs, **self.params}

    @property
    def on_qkv(self) -> bool:
        return tuple(self.variant.inputs) == ("q", "k", "v")


@dataclass(frozen=True)
class Oracle:
    """The oracle options of a run: what is under test besides a backend, and the verdict rule
    (``dtype`` is a short name of :data:`DTYPES`; ``fp64`` is the float64 rule)."""

    impl: Optional[str] = None
    adapter: str = "refattn"
    framework: str = "numpy"
    device: Optional[str] = None
    lse: bool = False
    backward: Optional[str] = None
    outputs: Optional[str] = None
    dtype: str = "fp64"
    dtype_inferred: bool = False
    baseline: str = "same_precision"
    factor: Optional[float] = None
    atol: Optional[float] = None
    grad: bool = False
    report: Optional[str] = None

    @property
    def kind(self) -> str:
        return "impl" if self.impl is not None else "outputs" if self.outputs is not None else "backend"

    @property
    def low(self) -> bool:
        return self.dtype != "fp64"


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
    default = var.default_shape
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
                   tolerance=tolerance_for(var, built.params), rng=built.rng)


#: normwise relative tolerance of a run with ``compute_dtype="float32"`` (float32 storage, float64
#: softmax statistics) against float64: 64 units of float32 rounding (2**-23). Measured errors are
#: a few 1e-7; a bug (a wrong mask entry, a lost rescale) is orders of magnitude larger.
FLOAT32_TOLERANCE = 64 * 2.0 ** -23


def tolerance_for(var, params: dict) -> float:
    """The variant's float64 tolerance, or :data:`FLOAT32_TOLERANCE` for a float32 compute dtype."""
    if params.get("compute_dtype", "float64") == "float32":
        return max(var.tolerance, FLOAT32_TOLERANCE)
    return var.tolerance


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
    inputs, params, dout = golden.stored_inputs(c, stored)
    return Problem(variant=variants.get(c.variant), params=params, inputs=inputs,
                   shape=tuple(c.shape), seed=c.seed, tolerance=stored.entry["tolerance"], case=case,
                   golden=stored, dout=dout, rng=np.random.default_rng(c.seed))


def require_qkv(var, flag: str):
    """``flag`` works on variants whose inputs are exactly q, k, v."""
    if tuple(var.inputs) != ("q", "k", "v"):
        raise ParameterError(f"{flag}: expected a variant on q, k, v; variant {var.name!r} takes "
                             f"{', '.join(var.inputs)}")


def problem_from_outputs(variant: Optional[str], path: str, param_items) -> Problem:
    """The inputs and saved outputs of an ``--outputs`` file (refattn.npzio keys); scalar
    parameters from ``--param``, array parameters and ``cu_seqlens_q/k`` from the file."""
    from refattn import npzio
    from refattn.golden.cases import makers

    if variant is None:
        raise ParameterError("--variant: expected the variant the saved outputs were computed with "
                             "(refattn list shows them)")
    var = variants.get(variant)
    require_qkv(var, "--outputs")
    parsed = parse_params(var, param_items, {n for n, _ in makers()})
    made = sorted(n for n, v in parsed.items() if isinstance(v, Made))
    if made:
        raise ParameterError(f"--param {made[0]}: with --outputs array parameters come from the file "
                             f"(key {made[0]!r}), got {parsed[made[0]].how!r}")
    inputs, outputs = npzio.load_outputs(path, var.name, layout=parsed.get("layout", "bhsd"))
    arrays = {n: inputs.pop(n) for n in ("q", "k", "v")}
    dims = None
    if "cu_seqlens_q" not in inputs:
        q, k = arrays["q"].shape, arrays["k"].shape
        (hq, sq), (hkv, sk) = ((q[1], q[2]), (k[1], k[2])) if parsed.get("layout", "bhsd") == "bhsd" \
            else ((q[2], q[1]), (k[2], k[1]))
        dims = (q[0], hq, sq, sk, q[3], hkv)
    return Problem(variant=var, params={**parsed, **inputs}, inputs=arrays, shape=dims, seed=None,
                   tolerance=var.tolerance, saved=outputs, source=os.path.abspath(path))


# -- options --------------------------------------------------------------------------------------
def _number(text: Optional[str], flag: str) -> Optional[float]:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ParameterError(f"{flag}: expected a finite number >= 0, got {text!r}")
    return value


def _choice(value: Optional[str], flag: str, choices, default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise ParameterError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def oracle_options(*, impl, adapter, framework, device, lse, backward, outputs, dtype, baseline,
                   factor, atol, grad, report, backend, against, case, shape, seed) -> Oracle:
    """The validated :class:`Oracle`; every incompatible combination is a ``ParameterError``.
    The low-precision-only options are checked by :func:`check_low_options` once the dtype is
    known (an --outputs file may decide it)."""
    if impl is not None and outputs is not None:
        raise ParameterError(f"--impl: expected either --impl or --outputs, got both ({impl!r} and "
                             f"{outputs!r})")
    flag = "--impl" if impl is not None else "--outputs" if outputs is not None else None
    if flag and backend is not None:
        raise ParameterError(f"--backend: expected nothing with {flag} (it is what is under test), "
                             f"got {backend!r}")
    if flag and against != "numpy":
        raise ParameterError(f"--against: with {flag} the reference is 'numpy' (float64), got "
                             f"{against!r}")
    if impl is None:
        for name, value in (("--adapter", adapter), ("--framework", framework),
                            ("--device", device), ("--backward", backward),
                            ("--lse", True if lse else None)):
            if value is not None:
                raise ParameterError(f"{name}: applies to --impl, got {name} {value!r} without it")
    if outputs is not None:
        for name, value in (("--case", case), ("--shape", shape), ("--seed", seed)):
            if value is not None:
                raise ParameterError(f"{name}: expected nothing with --outputs (the file holds the "
                                     f"inputs), got {value!r}")
    dt = None if dtype is None else _choice(dtype.lower(), "--dtype", DTYPES, "fp64")
    if dt not in (None, "fp64") and flag is None:
        raise ParameterError(f"--dtype: the backends compute in float64; a low-precision dtype "
                             f"applies to --impl or --outputs, got {dtype!r}")
    fw = _choice(framework, "--framework", FRAMEWORKS, "numpy")
    if device is not None and fw != "torch":
        raise ParameterError(f"--device: applies to --framework torch, got --device {device!r} "
                             f"with --framework {fw}")
    if backward is not None and fw != "numpy":
        raise ParameterError("--backward: applies to --framework numpy (torch gradients come from "
                             "autograd through --impl)")
    if grad and impl is not None and fw == "numpy" and backward is None:
        raise ParameterError("--grad: a numpy --impl needs --backward module:function, a backward "
                             "fn(q, k, v, dout, **params) -> (dq, dk, dv) (or use --framework torch)")
    if backward is not None and not grad:
        raise ParameterError("--backward: applies with --grad")
    if report is not None and os.path.splitext(report)[1].lower() not in REPORT_SUFFIXES:
        raise ParameterError(f"--report: expected a path ending in .md or .html, got {report!r}")
    return Oracle(impl=impl, adapter=_choice(adapter, "--adapter", ADAPTERS, "refattn"),
                  framework=fw, device=device, lse=bool(lse), backward=backward, outputs=outputs,
                  dtype=dt or "fp64", baseline=_choice(baseline, "--baseline", BASELINES,
                                                       "same_precision"),
                  factor=_number(factor, "--factor"), atol=_number(atol, "--atol"), grad=grad,
                  report=report)


def check_low_options(o: Oracle, *, baseline, factor, atol, report):
    """--baseline, --factor, --atol and --report belong to the low-precision rule."""
    if o.low:
        return
    why = (f"the dtype inferred from {os.path.basename(o.outputs)} is fp64; give --dtype"
           if o.dtype_inferred else "with fp64 the rule is normwise_rel <= tolerance")
    for flag, value in (("--baseline", baseline), ("--factor", factor), ("--atol", atol),
                        ("--report", report)):
        if value is not None:
            raise ParameterError(f"{flag}: applies to a low-precision --dtype (bf16, fp16, fp8_e4m3, "
                                 f"fp8_e5m2, fp32; {why}), got {value!r}")


def resolve_dtype(o: Oracle, problem: Problem, given: bool) -> Oracle:
    """``o`` with the dtype of an --outputs file when --dtype was not given."""
    if o.kind != "outputs" or given:
        return o
    from dataclasses import replace
    from refattn import numerics
    name = numerics.infer_dtype(problem.saved["out"])
    return replace(o, dtype=numerics.SHORT.get(name, "fp64"), dtype_inferred=True)


def round_inputs(problem: Problem, o: Oracle):
    """With a low-precision dtype, the made q, k, v are rounded to it: the function under test and
    the reference then see the same numbers."""
    if o.low and o.kind == "impl":
        from refattn import numerics
        problem.inputs = {n: numerics.round_to(a, o.dtype) if n in ("q", "k", "v") else a
                          for n, a in problem.inputs.items()}


def make_dout(problem: Problem, o: Oracle) -> Optional[np.ndarray]:
    """The upstream gradient of --grad (module docstring), or None without --grad."""
    if not o.grad:
        return None
    if problem.saved is not None:
        if not all(n in problem.saved for n in GRADS):
            raise ParameterError(f"--grad: {os.path.basename(problem.source)} holds no dq, dk, dv "
                                 f"(save dout, dq, dk and dv to compare gradients)")
        return problem.saved["dout"]
    if problem.variant.backward is None:
        raise ParameterError(f"--grad: variant {problem.variant.name!r} has no backward")
    require_qkv(problem.variant, "--grad")
    if problem.dout is not None:
        dout = problem.dout
    else:
        q, v = problem.inputs["q"], problem.inputs["v"]
        dout = problem.rng.standard_normal(np.shape(q)[:-1] + (np.shape(v)[-1],))
    if o.low:
        from refattn import numerics
        dout = numerics.round_to(dout, o.dtype)
    return dout


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


def run_backend(problem: Problem, name: str, label: str, reference: bool = False) -> dict:
    """``{"out": ..., "lse": ...}`` of the problem's variant on backend ``name``."""
    var = problem.variant
    if name not in var.backends:
        raise BackendUnavailable(f"backend: variant {var.name!r} runs on {', '.join(var.backends)}, "
                                 f"got {name!r}")
    backends.get(name)  # unknown or not installed: BackendUnavailable before any work
    with progress_bar(problem, label) as tick:
        out, lse = var.forward(backend_instance(name, tick), dict(problem.inputs),
                               var.parse_params(problem.params_for(reference)))
    result = {"out": np.asarray(out)}
    if lse is not None:
        result["lse"] = np.asarray(lse)
    return result


def backend_grads(problem: Problem, name: str, dout, reference: bool = False) -> dict:
    """``{"dq", "dk", "dv"}`` of the variant's backward on backend ``name``."""
    var = problem.variant
    dq, dk, dv, _ = var.backward(backends.get(name), dict(problem.inputs), dout,
                                 var.parse_params(problem.params_for(reference)))
    return {"dq": np.asarray(dq), "dk": np.asarray(dk), "dv": np.asarray(dv)}


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


def run_impl(problem: Problem, o: Oracle, dout) -> tuple:
    """``(description, outputs)`` of the user's function (refattn.impl) on the problem."""
    from refattn import impl

    require_qkv(problem.variant, "--impl")
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
            got.update(impl.grads(fn, case, dout, adapter=o.adapter, framework="torch",
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
    result = run_backend(problem, name, f"{name} (under test)")
    if dout is not None:
        result.update(backend_grads(problem, name, dout))
    return {"kind": "backend", "name": name}, result


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
        stored = {k: g.arrays[f"output.{k}"] for k in ("out", "lse") if f"output.{k}" in g.arrays}
        if dout is not None:
            if not all(f"grad.{n}" in g.arrays for n in GRADS):
                raise ParameterError(f"--grad: golden case {g.name!r} stores no gradients")
            stored.update({n: g.arrays[f"grad.{n}"] for n in GRADS})
        return {"kind": "golden", "name": g.name, "file": g.path}, stored
    kind = "numpy" if against == "numpy" else "backend"
    result = run_backend(problem, against, f"{against} (reference)", reference=True)
    if dout is not None:
        result.update(backend_grads(problem, against, dout, reference=True))
    return {"kind": kind, "name": against}, result


def run_baseline(problem: Problem, o: Oracle, dout) -> dict:
    """The same-precision (or inputs-only) baseline of refattn.numerics."""
    from refattn import numerics
    return numerics.baseline(problem.case_dict, variant=problem.variant.name, dtype=o.dtype,
                             mode=o.baseline, dout=dout)


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


def verdict_low(report: dict, actual: dict, expected: dict, base: dict, o: Oracle,
                variant: str) -> tuple:
    """The low-precision rule (refattn.numerics.compare) for every array: adds its keys to each
    ``METRICS`` and marks ``pass``; returns ``(overall, {name: numerics result})``."""
    from refattn import numerics
    results = {}
    for name, m in report.items():
        if "error" in m:
            m["pass"] = False
            continue
        res = numerics.compare(actual[name], expected[name], base[name], dtype=o.dtype,
                               factor=o.factor, atol=o.atol, variant=variant, name=name)
        results[name] = res
        m.update({k: res[k] for k in ("dtype", "baseline_max_abs", "factor", "atol", "allowed",
                                      "max_ulp", "mismatches")})
        m["pass"] = res["verdict"] == "PASS"
    overall = "PASS" if report and all(m["pass"] for m in report.values()) else "FAIL"
    return overall, results


def index_axes(problem: Problem) -> dict:
    """Axis letters of the arrays' indices for variants on ``q, k, v`` in the problem's layout
    (packed batches: ``t`` is the packed token)."""
    if not problem.on_qkv:
        return {}
    if "cu_seqlens_q" in problem.params:
        return {"out": "t,h,d", "lse": "h,t", "dq": "t,h,d", "dk": "t,h,d", "dv": "t,h,d"}
    bshd = problem.params.get("layout") == "bshd"
    out = "b,i,h,d" if bshd else "b,h,i,d"
    kv = "b,j,h,d" if bshd else "b,h,j,d"
    return {"out": out, "lse": "b,h,i", "dq": out, "dk": kv, "dv": kv}


def explain(problem: Problem, actual: dict, expected: dict, report: dict, heat: bool):
    """``refattn.report.analyse`` of ``out`` on FAIL (or with ``heat`` for --report); else None."""
    m = report.get("out")
    if m is None or "error" in m or (m["pass"] and not heat):
        return None
    from refattn import report as report_mod
    ref = np.asarray(expected["out"], dtype=np.float64)
    finite = ref[np.isfinite(ref)]
    threshold = m.get("allowed")
    if threshold is None:  # the float64 rule: rows beyond tolerance * max|reference|
        threshold = problem.tolerance * (float(np.abs(finite).max()) if finite.size else 1.0)
    return report_mod.analyse(actual["out"], ref, threshold,
                              case=problem.case_dict if problem.on_qkv else None,
                              variant=problem.variant.name, heat=heat)


# -- render ---------------------------------------------------------------------------------------
def describe_params(params: dict) -> dict:
    """Parameters for display and JSON: arrays as 'array (shape) dtype'."""
    return {n: (f"array {tuple(v.shape)} {v.dtype}" if hasattr(v, "shape") else v)
            for n, v in params.items()}


def _fmt(x) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"


def _subject_text(subject: dict, dtype: str) -> str:
    if subject["kind"] == "impl":
        where = subject["framework"] + (f" on {subject['device']}" if subject.get("device") else "")
        arrays = "float64" if dtype == "fp64" else dtype
        return f"{subject['name']} (adapter {subject['adapter']}, {where}, {arrays} inputs)"
    if subject["kind"] == "outputs":
        return f"saved outputs {subject['name']}"
    return f"backend {subject['name']}"


def _index_text(m) -> str:
    idx = "-" if m["worst_index"] is None else "(" + ", ".join(map(str, m["worst_index"])) + ")"
    if m["worst_index"] is not None and m["axes"]:
        idx = f"({m['axes']}) = {idx}"
    return idx


def _rows(result: dict) -> tuple:
    """The metrics table: header and rows (the low-precision rule adds allowed/baseline/ULP)."""
    low = result.get("dtype", "fp64") != "fp64"
    head = ("array", "max abs") + (("allowed", f"{result.get('dtype')} baseline") if low else ()) + (
        "max rel", "normwise rel") + (("max ULP", "mismatches") if low else ()) + (
        "worst index", "NaN test/ref", "Inf test/ref", "verdict")
    rows = []
    for name, m in result["arrays"].items():
        if "error" in m:
            rows.append((name, m["error"]) + ("",) * (len(head) - 3) + ("FAIL",))
            continue
        extra = (_fmt(m["allowed"]), _fmt(m["baseline_max_abs"])) if low else ()
        ulp = (_fmt(m["max_ulp"]), str(m["mismatches"])) if low else ()
        rows.append((name, _fmt(m["max_abs"])) + extra + (_fmt(m["max_rel"]), _fmt(m["normwise_rel"]))
                    + ulp + (_index_text(m), "%d/%d" % tuple(m["nan"]), "%d/%d" % tuple(m["inf"]),
                             "PASS" if m["pass"] else "FAIL"))
    return head, rows


def _verdict_line(result: dict) -> str:
    if result.get("dtype", "fp64") == "fp64":
        return f"{result['verdict']}: {RULE}, tolerance {result['tolerance']:g}"
    return (f"{result['verdict']}: max|test - float64| <= {result['factor']:g} * "
            f"max|{result['dtype']} baseline - float64| + {result['atol']:g} "
            f"({result['baseline']} baseline), non-finite entries as the reference's")


#: below this share of a row's error explained by one key, the worst key is not named
KEY_EXPLAINS = 0.5


def worst_text(worst: Optional[dict]) -> str:
    """The worst (b, h, i, j) when one key explains most of its row's error, else the worst
    element (b, h, i, d) (refattn.report.worst_line)."""
    from refattn.report import worst_line
    if worst and worst.get("explained") is not None and worst["explained"] < KEY_EXPLAINS:
        b, h, i, j = worst["index"]
        return (f"worst element (b, h, i, d) = {tuple(worst['element'])}: no single key explains "
                f"row {i}'s error (the best, key {j}, {worst['explained']:.0%})")
    return worst_line(worst)


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
    dtype = result.get("dtype", "fp64")
    lines.append(f"under test: {_subject_text(result['under_test'], dtype)}; reference: {ref_text}")
    if dtype != "fp64":
        how = ("inputs rounded, scores and softmax in float32, P rounded before P.V, output rounded"
               if result["baseline"] == "same_precision" else "inputs and outputs rounded")
        guessed = (" (inferred from the saved out: every value is a " + dtype + " number; give "
                   "--dtype to choose)") if result.get("dtype_inferred") else ""
        lines.append(f"dtype {dtype}{guessed}; baseline {result['baseline']}: {how}")
    from .list_ import table

    lines.append("")
    head_row, rows = _rows(result)
    lines.append(table(rows, head_row))
    lines.append("")
    analysis = result.get("analysis")
    if result["verdict"] == "FAIL" and analysis:
        lines.append(worst_text(analysis.get("worst")))
        lines += analysis.get("lines", [])
    if result.get("report"):
        lines.append("report: " + ", ".join(result["report"]))
    lines.append(_verdict_line(result))
    return "\n".join(lines)


def write_report(path: str, result: dict, low_results: dict, analysis) -> list:
    """``refattn.report.write`` of the comparison; one clear error when the file cannot be written."""
    from refattn import report as report_mod
    context = {"variant": result["variant"], "under test": _subject_text(result["under_test"],
                                                                         result["dtype"]),
               "dtype": result["dtype"], "baseline": result["baseline"],
               "shape (B, Hq, Sq, Sk, D, Hkv)": result["shape"],
               "params": ", ".join(f"{k}={v}" for k, v in result["params"].items()) or "defaults"}
    try:
        return report_mod.write(path, {"results": low_results, "verdict": result["verdict"]},
                                analysis, context=context)
    except OSError as exc:
        raise ParameterError(f"--report: cannot write {path!r} ({exc.strerror or exc})") from None


def compare(problem: Problem, backend: Optional[str], against: str,
            oracle: Optional[Oracle] = None) -> dict:
    """Run the pipeline and return the JSON-able result (the schema in the module docstring)."""
    o = oracle or Oracle()
    dout = make_dout(problem, o)
    t0 = time.perf_counter()
    subject, actual = run_under_test(problem, backend, o, dout)
    t1 = time.perf_counter()
    reference, expected = run_reference(problem, against, dout, o)
    t2 = time.perf_counter()
    if o.kind != "backend":  # compare what was given (an --impl may return no LSE)
        extra = [n for n in actual if n not in expected]
        if extra:
            raise ParameterError(f"{extra[0]}: variant {problem.variant.name!r} gives no {extra[0]} "
                                 f"to compare with")
        expected = {n: expected[n] for n in expected if n in actual}
    report = metrics(actual, expected, index_axes(problem))
    seconds = {"under_test": round(t1 - t0, 4), "reference": round(t2 - t1, 4)}
    low_results = {}
    if o.low:
        base = run_baseline(problem, o, dout)
        seconds["baseline"] = round(time.perf_counter() - t2, 4)
        overall, low_results = verdict_low(report, actual, expected, base, o, problem.variant.name)
        from refattn import numerics
        factor, atol = numerics.defaults(o.dtype, problem.variant.name)
        factor = factor if o.factor is None else o.factor
        atol = atol if o.atol is None else o.atol
    else:
        overall = verdict(report, problem.tolerance)
        factor = atol = None
    analysis = explain(problem, actual, expected, report, heat=o.report is not None)
    result = {"refattn": __version__, "variant": problem.variant.name, "case": problem.case,
              "golden_file": problem.golden.path if problem.golden is not None else None,
              "shape": [int(x) for x in problem.shape] if problem.shape else None,
              "seed": problem.seed, "params": describe_params(problem.params),
              "under_test": subject, "reference": reference, "dtype": o.dtype,
              "dtype_inferred": o.dtype_inferred, "baseline": o.baseline if o.low else None,
              "factor": factor, "atol": atol,
              "tolerance": None if o.low else problem.tolerance,
              "rule": RULE_LOW if o.low else RULE, "grad": dout is not None, "arrays": report,
              "verdict": overall,
              "analysis": None if analysis is None else {"worst": analysis["worst"],
                                                         "lines": analysis["lines"]},
              "report": None, "seconds": seconds}
    if o.report is not None:
        result["report"] = write_report(o.report, result, low_results, analysis)
    return result


@click.command("compare", short_help="Errors of a backend, a function or saved outputs against "
                                     "the float64 reference; PASS/FAIL.")
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
              help="B,H,S,D (Hkv = H; mqa: 1) or B,Hq,Sq,Sk,D,Hkv. Default: the variant's "
                   "default_shape (refattn list --json shows it).")
@click.option("--seed", type=int, default=None, help="Seed of the made inputs. Default: 0.")
@param_option
@click.option("--impl", "impl_spec", metavar="MODULE:FUNCTION", default=None,
              help="Test this function instead of a backend: my_pkg.kernels:my_attn, file.py:fn or "
                   "module:Class.fn (the current directory is searched). Default: none.")
@click.option("--adapter", metavar="NAME", default=None,
              help="How --impl is called: refattn (fn(q, k, v, **params)), sdpa (PyTorch SDPA), "
                   "flex (flex_attention), flash (flash-attn, B,S,H,D), varlen (packed). "
                   "Default: refattn.")
@click.option("--framework", metavar="NAME", default=None,
              help="What --impl receives: numpy arrays or torch tensors (via DLPack). "
                   "Default: numpy.")
@click.option("--device", metavar="DEVICE", default=None,
              help="Torch device of the tensors given to --impl (cpu, cuda, cuda:1). Default: cpu.")
@click.option("--lse", is_flag=True, default=False,
              help="Also ask --impl for the LSE (return_lse=True; flash: return_attn_probs=True) "
                   "and compare it. Default: off (an LSE returned anyway is compared).")
@click.option("--backward", metavar="MODULE:FUNCTION", default=None,
              help="With --grad and --framework numpy: the backward fn(q, k, v, dout, **params) -> "
                   "(dq, dk, dv). Default: none (torch: autograd through --impl).")
@click.option("--outputs", metavar="FILE.npz", default=None,
              help="Check saved outputs: an .npz with q, k, v, out (and lse, dout/dq/dk/dv, "
                   "cu_seqlens_q/k, mask, bias, ...; see refattn.npzio). Default: none.")
@click.option("--dtype", metavar="DTYPE", default=None,
              help="Precision of what is under test: bf16, fp16, fp8_e4m3, fp8_e5m2, fp32 "
                   "(same-precision rule) or fp64 (normwise rule). Default: fp64; --outputs: "
                   "inferred from the saved out.")
@click.option("--baseline", metavar="MODE", default=None,
              help="Low-precision baseline: same_precision (float32 softmax, P rounded) or "
                   "inputs_only (inputs and outputs rounded). Default: same_precision.")
@click.option("--grad", is_flag=True, default=False,
              help="Also compare dq, dk, dv (dout drawn from the seed, or the file's). "
                   "Default: off.")
@click.option("--factor", metavar="F", default=None,
              help="Override the rule's factor: max|test - ref| <= F * max|baseline - ref| + atol. "
                   "Default: 2 (or the variant's).")
@click.option("--atol", metavar="A", default=None,
              help="Override the rule's atol. Default: eps(dtype)/2, e.g. 2**-8 for bf16 (or the "
                   "variant's).")
@click.option("--report", "report_path", metavar="OUT.md|OUT.html", default=None,
              help="Also write a report with the table, the error account and a heat map of the "
                   "error per (query, key block) (matplotlib). Default: none.")
@json_option
@one_line_errors
def command(variant, backend, against, case, shape, seed, params, impl_spec, adapter, framework,
            device, lse, backward, outputs, dtype, baseline, grad, factor, atol, report_path,
            as_json):
    """Compare a backend, a function (--impl) or saved outputs (--outputs) with the float64
    reference and print the errors and a verdict; on FAIL, the worst (b, h, i, j) and where the
    errors cluster.

    Exit status: 0 PASS, 1 FAIL, 2 usage or input error.
    """
    oracle = oracle_options(impl=impl_spec, adapter=adapter, framework=framework, device=device,
                            lse=lse, backward=backward, outputs=outputs, dtype=dtype,
                            baseline=baseline, factor=factor, atol=atol, grad=grad,
                            report=report_path, backend=backend, against=against, case=case,
                            shape=shape, seed=seed)
    if against not in ("numpy", "golden"):
        backends.get(against)  # an unknown reference backend is a usage error before any work
    if backend is not None:
        backends.get(backend)
    if outputs is not None:
        problem = problem_from_outputs(variant, outputs, params)
    else:
        problem = build_problem(variant, case, shape, seed, params)
    oracle = resolve_dtype(oracle, problem, dtype is not None)
    check_low_options(oracle, baseline=baseline, factor=factor, atol=atol, report=report_path)
    if oracle.kind == "impl":
        from refattn import impl
        impl.load(oracle.impl)  # a bad --impl string is reported before any work
        round_inputs(problem, oracle)
    result = compare(problem, backend, against, oracle)
    click.echo(dumps(result) if as_json else render(result))
    raise click.exceptions.Exit(EXIT_OK if result["verdict"] == "PASS" else EXIT_FAIL)

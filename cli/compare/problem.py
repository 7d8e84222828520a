"""The problem ``refattn compare`` checks: the case (variant, parameters, inputs) and the oracle
options (what is under test besides a backend, the dtype and the verdict rule's knobs).

A problem comes from a golden case (``--case``), from the variant's ``example`` with ``--shape`` and
``--seed``, or from an ``--outputs`` file (:func:`problem_from_outputs`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from refattn import memory, variants
from refattn.errors import ParameterError, ShapeError
from refattn.validate import check_int
from ..options import Made, parse_params, parse_shape

#: --dtype choices; fp64 selects the float64 rule
DTYPES = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp32", "fp64")
ADAPTERS = ("refattn", "sdpa", "flex", "flash", "varlen")
FRAMEWORKS = ("numpy", "torch", "jax")
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
        """True for variants whose inputs are exactly q, k, v (the --impl/--outputs adapters)."""
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
    timeout: Optional[float] = None
    #: the backend under test runs as refattn.distributed tasks: (scheduler address or None, chunk)
    distributed: Optional[tuple] = None

    @property
    def kind(self) -> str:
        return "impl" if self.impl is not None else "outputs" if self.outputs is not None else "backend"

    @property
    def low(self) -> bool:
        return self.dtype != "fp64"


# -- build the case -------------------------------------------------------------------------------
def build_problem(variant: Optional[str], case: Optional[str], shape: Optional[str], seed: Optional[int],
                  param_items, inputs: str = "normal", dtype: Optional[str] = None) -> Problem:
    """From a golden case (``case``) or from ``Variant.example`` with ``shape`` and ``seed``;
    ``inputs`` other than ``normal`` replaces q, k, v with that distribution of
    :mod:`refattn.testing.inputs` (drawn from ``seed``; ``dtype`` sets the ``large`` logits)."""
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
    seed = 0 if seed is None else check_int(seed, "--seed", 0, 2 ** 63 - 1)
    memory.check(estimate_bytes(dims, arrays), "--shape",
                 f"the inputs, outputs and reference of shape {','.join(map(str, dims))}")
    built = build(Case(name="cli", variant=var.name, shape=dims, seed=seed, params=scalars,
                       arrays=arrays))
    made = dict(built.inputs)
    if inputs != "normal":
        from refattn.testing import inputs as dist
        drawn = dist.make(inputs, dims, np.random.default_rng(seed),
                          dtype=None if dtype in (None, "fp64") else dtype, scale=built.params.get("scale"))
        if built.params.get("layout") == "bshd":
            drawn = {n: np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for n, a in drawn.items()}
        made.update(drawn)
    return Problem(variant=var, params=built.params, inputs=made, shape=dims, seed=seed,
                   tolerance=tolerance_for(var, built.params), rng=built.rng)


def estimate_bytes(dims, made=()) -> float:
    """What a compare of shape ``dims`` holds: inputs and outputs for the run under test, the
    reference and a baseline (4 copies), made (B, H, Sq, Sk) array parameters twice, and the numpy
    reference's chunk of scores and probabilities."""
    from refattn.backends.numpy_ import CHUNK_ELEMENTS
    b, hq, sq, sk, _, _ = dims
    pairs = sum(2.0 * b * hq * sq * sk * 8 for n in made if n in ("mask", "bias", "dropout_mask"))
    return memory.attention_bytes(dims, copies=4) + pairs + 6 * CHUNK_ELEMENTS * 8


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
                   factor, atol, grad, report, backend, against, case, shape, seed,
                   timeout=None) -> Oracle:
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
                            ("--lse", True if lse else None), ("--timeout", timeout)):
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
        raise ParameterError("--backward: applies to --framework numpy (torch and jax gradients "
                             "come from autograd through --impl)")
    if grad and impl is not None and fw == "numpy" and backward is None:
        raise ParameterError("--grad: a numpy --impl needs --backward module:function, a backward "
                             "fn(q, k, v, dout, **params) -> (dq, dk, dv) (or use --framework torch "
                             "or jax)")
    if backward is not None and not grad:
        raise ParameterError("--backward: applies with --grad")
    if report is not None and os.path.splitext(report)[1].lower() not in REPORT_SUFFIXES:
        raise ParameterError(f"--report: expected a path ending in .md or .html, got {report!r}")
    return Oracle(impl=impl, adapter=_choice(adapter, "--adapter", ADAPTERS, "refattn"),
                  framework=fw, device=device, lse=bool(lse), backward=backward, outputs=outputs,
                  dtype=dt or "fp64", baseline=_choice(baseline, "--baseline", BASELINES,
                                                       "same_precision"),
                  factor=_number(factor, "--factor"), atol=_number(atol, "--atol"), grad=grad,
                  report=report, timeout=_timeout(timeout))


def _timeout(text) -> Optional[float]:
    value = _number(text, "--timeout")
    if value is not None and value <= 0:
        raise ParameterError(f"--timeout: expected a number of seconds > 0, got {text!r}")
    return value


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


#: the dtypes a stored float dtype may hide (values of a narrower dtype saved in a wider one)
_NARROWER = {"float16": ("fp8_e5m2", "fp8_e4m3"),
             "float32": ("fp8_e5m2", "fp8_e4m3", "bf16", "fp16"),
             "float64": ("fp8_e5m2", "fp8_e4m3", "bf16", "fp16", "fp32")}


def resolve_dtype(o: Oracle, problem: Problem, given: bool) -> Oracle:
    """``o`` with the dtype of an --outputs file when --dtype was not given: the dtype ``out`` had
    before it was saved (refattn.npzio.save records it), else its stored dtype -- unless every
    stored value is also a number of a narrower dtype (a bf16 output saved as float32, an all-zero
    output), where the file cannot say which the kernel computed in and --dtype must."""
    if o.kind != "outputs" or given:
        return o
    from dataclasses import replace
    from refattn import npzio, numerics
    recorded = npzio.saved_dtypes(problem.source).get("out")
    if recorded is not None:
        return replace(o, dtype=numerics.SHORT.get(recorded, "fp64"), dtype_inferred=True)
    out = problem.saved["out"]
    stored = out.dtype.name
    short = numerics.SHORT.get(stored, "fp64")
    fits = [d for d in _NARROWER.get(stored, ()) if numerics.representable(out, d)]
    if fits:
        name = os.path.basename(problem.source)
        raise ParameterError(
            f"--dtype: expected it for {name}, whose out is stored as {stored} but holds only values "
            f"that are also {', '.join(fits)} numbers, so the file cannot say which precision the "
            f"kernel computed in (save with refattn.npzio.save to record it); give --dtype {short} "
            f"or --dtype {fits[-1]}")
    return replace(o, dtype=short, dtype_inferred=True)


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
    if problem.dout is not None:
        dout = problem.dout
    elif problem.on_qkv:
        q, v = problem.inputs["q"], problem.inputs["v"]
        dout = problem.rng.standard_normal(np.shape(q)[:-1] + (np.shape(v)[-1],))
    else:  # the output's shape is the variant's business: one numpy forward tells it
        from refattn import pipeline
        shape = pipeline.run(problem.variant, "numpy", problem.inputs,
                             problem.params_for(reference=True)).outputs["out"].shape
        dout = problem.rng.standard_normal(shape)
    if o.low:
        from refattn import numerics
        dout = numerics.round_to(dout, o.dtype)
    return dout



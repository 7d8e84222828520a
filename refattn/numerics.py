"""Low-precision numerics: rounding, the same-precision baseline, metrics and the verdict.

This module answers "is my kernel's output right, *given the precision it computes in*?"
(DESIGN section 4). Four pieces:

Rounding
--------
:func:`round_to` rounds float64 values to ``bf16``, ``fp16``, ``fp8_e4m3`` (``float8_e4m3fn``),
``fp8_e5m2`` (``float8_e5m2``) or ``fp32`` with round-to-nearest-even (numpy / ml_dtypes casts) and
returns them as float64 again, so every later computation sees exactly the stored values.
``float8_e4m3fn`` has no infinity: values beyond +-448 become NaN, as a cast on the device does.
Names accepted by :func:`canonical`: ``bf16 bfloat16 fp16 float16 half fp32 float32
fp8_e4m3 e4m3 float8_e4m3fn fp8_e5m2 e5m2 float8_e5m2``, the numpy/ml_dtypes dtypes themselves and
torch dtypes.

The same-precision baseline
---------------------------
:func:`baseline` emulates a kernel that stores its data in ``dtype``:

* ``mode="same_precision"`` (default): q, k, v (and ``dout``) rounded to the dtype; scores
  ``scale * q @ kᵀ`` accumulated in float32, the score modifications (softcap, ALiBi, bias)
  applied and the result rounded to float32; softmax in float32 (max-subtracted); the
  probabilities P rounded to the dtype before ``P @ V``, which accumulates in float32; the output
  rounded to the dtype. The LSE stays float32 (kernels store it so). With ``dout`` the backward is
  emulated the same way: ``dO`` rounded, P and ``dS`` rounded to the dtype before their products,
  float32 accumulation, gradients rounded to the dtype. Because P is rounded, the baseline error is
  non-zero even when the inputs are already exactly representable in the dtype.
* ``mode="inputs_only"`` (the weaker baseline): rounding only at the storage boundaries -- q, k, v
  (and dout) rounded to the dtype, the variant evaluated exactly (float64 reference), outputs and
  gradients rounded to the dtype. Works for every variant.

The emulation is not a second implementation: it runs the *variant's own forward/backward* (its
``prepare``, its :class:`~refattn.patterns.Pattern`, its ``ScoreMod``) through the one pipeline
(:func:`refattn.pipeline.run`) on the numpy backend with a :class:`Rounding` hook, whose
``attend``/``attend_backward`` then compute in float32 with the roundings above -- the same loop as
the float64 definition. A variant that is another by definition declares it (``flash`` has
``emulate_as="sdpa"``) and is emulated through that one; any other variant that never calls
``attend`` needs ``mode="inputs_only"``.

Metrics and the verdict
-----------------------
:func:`metrics` is the one definition of the error metrics (its docstring says what each is, and
what NaN/Inf, zeros in the reference and empty arrays give): ``max_abs``, ``max_rel``,
``normwise_rel``, ``max_ulp`` (the number of representable values between, :func:`ulp_distance`),
``worst_index``, NaN/Inf counts, non-finite mismatches and, given a threshold, ``mismatches``.

:func:`compare` applies the **verdict rule**::

    PASS  iff  max|impl - ref64| <= factor * max|baseline - ref64| + atol(dtype) * max|ref64|

and the allowance stays below the reference's largest magnitude -- otherwise (an output of zeros
would pass) the verdict is INCONCLUSIVE, never PASS.

Origin: flash-attn's test suite (``tests/test_flash_attn.py`` and its hopper/cute successors)
asserts ``(out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max() + fwd_atol`` with
``out_ref`` the reference computed in float32 (then stored in the input dtype), ``out_pt`` the same
reference evaluated in the input dtype (``upcast=False``) and
``fwd_atol = 2 * (out_ref + 0.3 - 0.3 - out_ref).abs().max()`` -- one or two rounding steps of the
dtype near 0.3..1, a floor for cases where the low-precision reference happens to be exact; with
softcap the factor is 3. PyTorch's SDPA tests use the same "error relative to a low-precision
reference" idea with fudge factors. Here the reference is float64 and unrounded, the baseline is
the emulation above, and the defaults (:data:`DEFAULT_FACTOR`, :data:`DEFAULT_ATOL`) are
``factor = 2`` and ``atol = eps(dtype) / 2`` (half a unit in the last place at 1: 2**-8 for bf16,
2**-11 for fp16, 2**-4 for e4m3, 2**-3 for e5m2, 2**-24 for fp32), taken in units of the
reference's largest magnitude ``max|ref64|`` -- half a unit in the last place at the size of the
values, as flash-attn's ``fwd_atol`` is a rounding step at the size of its outputs; an absolute
floor would let an all-zero output pass for values below it. A registered variant may
override them by declaring an attribute ``verdict = {"factor": f, "atol": {dtype: a}}``; explicit
``factor=``/``atol=`` override both.

Conditioning-aware error bounds (how accurate is the float64 oracle itself?)
------------------------------------------------------------------------------
With unit roundoff ``u = 2**-53`` and ``gamma_n = n u / (1 - n u)``, each computed score has an
absolute error ``|δs_ij| <= gamma_D * scale * Σ_d |q_id k_jd| + O(u |s_ij|)`` (softcap and ALiBi add a
few ``u |s_ij|``). The softmax maps an absolute score perturbation ``δs`` to a relative change of each
probability ``|δp_ij| / p_ij <= 2 max_j |δs_ij|`` plus ``O(Sk u)`` from the exponentials and the sum
(max-subtraction keeps every exponential <= 1). The output ``o_i = Σ_j p_ij v_j`` is a weighted
average; its relative sensitivity is the cancellation number
``κ_i = Σ_j p_ij |v_j| / |Σ_j p_ij v_j|`` (1 when the v_j agree in sign, large when they cancel).
Together, to first order::

    |δo_i| / |o_i|  <~  κ_i * ( 2 * gamma_D * scale * max_j Σ_d |q_id k_jd|  +  gamma_{Sk + 2} )

and the LSE has ``|δlse_i| <~ max_j |δs_ij| + gamma_{Sk}``. For unit-variance data with
``D, Sk <= 10**4`` the bracket is below ``1e-11``; an error of the reference beyond this bound is a
bug, not rounding. ``tests/test_mpmath.py`` checks the reference against mpmath at 50 digits
(normwise relative error <= 1e-14 on small, well-conditioned cases) and against this bound.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import ml_dtypes
import numpy as np

from .errors import ParameterError, ShapeError, fmt_shape

#: canonical dtype name -> numpy dtype
_NP_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float32": np.dtype(np.float32),
}
#: spellings accepted by :func:`canonical`
ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp8_e4m3": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2",
    "fp32": "float32", "float32": "float32", "float": "float32",
}
#: the short name of each canonical dtype (used in messages and reports)
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8_e4m3",
         "float8_e5m2": "fp8_e5m2", "float32": "fp32"}

DEFAULT_FACTOR = 2.0
#: eps(dtype) / 2: half a unit in the last place at 1
DEFAULT_ATOL = {name: float(ml_dtypes.finfo(dt).eps) / 2 for name, dt in _NP_DTYPES.items()}
BASELINES = ("same_precision", "inputs_only")
OUTPUT_NAMES = ("out", "lse", "dq", "dk", "dv")


# -- dtypes and rounding ----------------------------------------------------------------------------
def canonical(dtype) -> str:
    """The canonical name (``"bfloat16"``, ``"float16"``, ``"float8_e4m3fn"``, ``"float8_e5m2"``,
    ``"float32"``) of a dtype given by name, numpy/ml_dtypes dtype or torch dtype."""
    key = dtype
    if not isinstance(dtype, str):
        key = str(dtype)
        if key.startswith("torch."):
            key = key[len("torch."):]
        else:
            try:
                key = np.dtype(dtype).name
            except TypeError:
                pass
    name = ALIASES.get(str(key).lower())
    if name is None:
        raise ParameterError(f"dtype: expected one of {', '.join(sorted(SHORT.values()))} "
                             f"(or {', '.join(sorted(_NP_DTYPES))}), got {dtype!r}")
    return name


def np_dtype(dtype) -> np.dtype:
    """The numpy (ml_dtypes) dtype of ``dtype``."""
    return _NP_DTYPES[canonical(dtype)]


def finfo(dtype):
    """``ml_dtypes.finfo`` of the dtype (eps, nmant, max, smallest_subnormal, ...)."""
    return ml_dtypes.finfo(np_dtype(dtype))


def round_to(x, dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` (round to nearest even), returned as float64."""
    a = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(np_dtype(dtype)).astype(np.float64)


def spacing(x, dtype) -> np.ndarray:
    """The ULP of ``dtype`` at ``|x|``: ``2**(floor(log2|x|) - nmant)``, at least the smallest
    subnormal (also for ``x = 0``); equals ``np.spacing`` of the value in that dtype for normal and
    subnormal numbers in range."""
    fi = finfo(dtype)
    a = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    ulp = np.ldexp(1.0, (e - fi.nmant).astype(np.int64))
    return np.where(a > 0, np.maximum(ulp, float(fi.smallest_subnormal)), float(fi.smallest_subnormal))


def representable(x, dtype) -> bool:
    """True when every finite value of ``x`` is exactly representable in ``dtype``."""
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    return bool(np.all(round_to(a, dtype) == a))


def infer_dtype(*arrays) -> str:
    """The narrowest dtype in which every value of ``arrays`` is exactly representable, trying
    ``fp8_e5m2``, ``fp8_e4m3``, ``bf16``, ``fp16``, ``fp32`` (fewest mantissa bits first); ``"float64"``
    when none fits. A heuristic for outputs saved as float32 from a bf16 kernel -- pass the dtype
    explicitly when you know it."""
    for name in ("float8_e5m2", "float8_e4m3fn", "bfloat16", "float16", "float32"):
        if all(representable(a, name) for a in arrays):
            return name
    return "float64"


# -- the rounding hook: a low-precision kernel on the numpy backend --------------------------------
class Rounding:
    """The numpy backend's low-precision hook (:mod:`refattn.backends.numpy_`): what a kernel
    storing its data in ``dtype`` stores, with float32 arithmetic (``work``).

    ``inputs(x, name)`` rounds an input and rejects a finite value the dtype cannot hold (a kernel
    in that dtype could not have been given it, so no baseline exists); ``store(x)`` rounds an
    intermediate (P, dS) and keeps it in float32 for the next product; ``result(x)`` rounds a
    returned array and gives float64 values. ``calls`` counts the primitive calls that used the
    hook, so a variant that never reaches ``attend`` is noticed.
    """

    work = np.float32

    def __init__(self, dtype):
        self.dtype = canonical(dtype)
        self.calls = 0

    def store(self, x) -> np.ndarray:
        return round_to(x, self.dtype).astype(np.float32)

    def result(self, x) -> np.ndarray:
        return round_to(x, self.dtype)

    def inputs(self, x, name: str) -> np.ndarray:
        r = self.store(x)
        if not np.all(np.isfinite(r) | ~np.isfinite(x)):
            raise ParameterError(
                f"{name}: expected values a {SHORT[self.dtype]} kernel can hold (|x| <= "
                f"{float(finfo(self.dtype).max):g}), got max |{name}| = {float(np.nanmax(np.abs(x))):g}")
        return r


# -- reference and baseline --------------------------------------------------------------------------
def split_case(var, case: dict) -> tuple:
    """``(arrays, params, varlen)`` from a case dict: the variant's declared inputs, its parameters
    (``return_*`` flags dropped: every output is computed) and ``cu_seqlens_q/k``."""
    missing = [n for n in var.inputs if n not in case]
    if missing:
        raise ParameterError(f"{missing[0]}: expected the case to hold the inputs of variant "
                             f"{var.name!r} ({', '.join(var.inputs)}), got keys "
                             f"{', '.join(sorted(case)) or 'none'}")
    params = {n: val for n, val in case.items() if n not in var.inputs and not n.startswith("return_")}
    varlen = {n: params.pop(n) for n in ("cu_seqlens_q", "cu_seqlens_k") if n in params}
    return {n: case[n] for n in var.inputs}, params, varlen


def _evaluate(case: dict, variant: str, backend="numpy", dout=None, rounding=None,
              round_inputs=None) -> dict:
    """``{"out", "lse"?, ..., "dq", "dk", "dv"?}`` of a case (dense or packed) through the one
    pipeline; float inputs optionally rounded to ``round_inputs`` first."""
    from . import pipeline
    from .adapters import varlen_apply

    var = pipeline.variant_of(variant)
    arrays, params, varlen = split_case(var, case)
    if round_inputs is not None:
        arrays = {n: _rounded(a, n, round_inputs) for n, a in arrays.items()}
        dout = None if dout is None else round_to(_host(dout, "dout"), round_inputs)

    def one(arrs, do, extra):
        res = pipeline.run(var, backend, arrs, {**params, **extra}, dout=do, rounding=rounding)
        named = dict(res.outputs)
        if res.grads is not None:
            named.update({f"d{n}": g for n, g in res.grads.items() if n in var.inputs})
        return {n: np.asarray(a, dtype=np.float64) for n, a in named.items()}

    if not varlen:
        return one(arrays, dout, {})
    if not var.on_qkv:
        raise ParameterError(f"cu_seqlens_q: packed batches need a variant on q, k, v; "
                             f"{var.name!r} takes {', '.join(var.inputs)}")
    return varlen_apply(lambda q, k, v, do, extra: one({**arrays, "q": q, "k": k, "v": v}, do, extra),
                        arrays["q"], arrays["k"], arrays["v"], varlen.get("cu_seqlens_q"),
                        varlen.get("cu_seqlens_k"), dout=dout, params=params)


def _rounded(a, name, dtype):
    """A float input rounded to ``dtype``; integer inputs (tables, lengths) are left alone."""
    from .validate import to_numpy
    arr = to_numpy(a, name)
    return round_to(_host(arr, name), dtype) if arr.dtype.kind not in "iub" else arr


def _host(x, name):
    from .validate import as_compute
    return as_compute(x, name)


def reference(case: dict, *, variant: str = "sdpa", backend: str = "numpy", dout=None) -> dict:
    """The float64 reference of a case: ``{"out", "lse"}`` (and ``dq, dk, dv`` given ``dout``).

    ``case`` holds the variant's inputs and parameters (and ``cu_seqlens_q/k`` for packed
    batches). ``lse`` is included when the variant computes one.
    """
    return _evaluate(case, variant, backend, dout)


def baseline(case: dict, *, variant: str = "sdpa", dtype="bf16", mode: str = "same_precision",
             dout=None) -> dict:
    """The same-precision baseline of a case (module docstring): ``{"out", "lse"?, "dq"...}``.

    Values are float64 arrays holding what a ``dtype`` kernel would store (LSE: float32 values).
    """
    from . import pipeline
    from .validate import check_choice

    check_choice(mode, "baseline", BASELINES)
    name = canonical(dtype)
    if mode == "inputs_only":
        res = _evaluate(case, variant, "numpy", dout, round_inputs=name)
        return {n: (a if n == "lse" else round_to(a, name)) for n, a in res.items()}
    var = pipeline.variant_of(variant)
    if var.emulate_as is not None:  # a variant equal to another by definition (flash = sdpa)
        var = pipeline.variant_of(var.emulate_as)
        case = {n: val for n, val in case.items() if n in var.inputs or n in var.fields()
                or n in ("cu_seqlens_q", "cu_seqlens_k")}
    rounding = Rounding(name)
    res = _evaluate(case, var, "numpy", dout, rounding=rounding)
    if rounding.calls == 0:
        raise ParameterError(
            f"baseline: variant {variant!r} does not run through the attend primitive, so "
            f"'same_precision' cannot be emulated; use baseline='inputs_only'")
    return res


# -- metrics and verdict -----------------------------------------------------------------------------
def _pair(actual, reference, name):
    """Both arrays as float64 (booleans -- a routing table -- as 0/1); anything else that is not a
    real array is an error naming ``name``."""
    from .validate import as_compute, to_numpy

    def real(x, what):
        a = to_numpy(x, what)
        return as_compute(a.astype(np.float64) if np.asarray(a).dtype.kind == "b" else a, what)
    a = real(actual, name)
    r = real(reference, f"{name} (reference)")
    if a.shape != r.shape:
        raise ShapeError(f"{name}: expected shape {fmt_shape(r.shape)} as the reference, "
                         f"got {fmt_shape(a.shape)}")
    return a, r


def abs_error(actual, reference, name: str = "out") -> np.ndarray:
    """``|actual - reference|`` elementwise; equal non-finite entries (both NaN, the same infinity)
    give 0, any other non-finite disagreement gives ``inf``."""
    a, r = _pair(actual, reference, name)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - r)
    same = (np.isnan(a) & np.isnan(r)) | (np.isinf(a) & (a == r))
    return np.where(same, 0.0, np.where(np.isfinite(err), err, np.inf))


def _ordered(x, dtype) -> tuple:
    """``(magnitude, negative)`` of ``x`` rounded to ``dtype`` (float64 when None): the position of
    ``|x|`` among the dtype's non-negative representable values (0 for +-0) and the sign bit."""
    if dtype is None:
        bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
        width = 64
    else:
        dt = np_dtype(dtype)
        width = dt.itemsize * 8
        bits = round_to(x, dtype).astype(dt).view(f"u{dt.itemsize}")
    bits = bits.astype(np.uint64)
    neg = (bits >> np.uint64(width - 1)) != 0
    mag = bits & np.uint64((1 << (width - 1)) - 1)
    return mag, neg


def ulp_distance(actual, reference, dtype=None) -> np.ndarray:
    """How many representable values of ``dtype`` (float64 when None) lie between ``actual`` and
    ``reference``, both rounded to it: 0 when equal, 1 for neighbours, across zero too (so an error
    at a reference of 0 counts the values between, not error / smallest subnormal). Float64 values;
    ``inf`` where the rounded values are not both finite or disagree as NaN/inf."""
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        ra, rr = (a, r) if dtype is None else (round_to(a, dtype), round_to(r, dtype))
    fin = np.isfinite(ra) & np.isfinite(rr)
    ma, na = _ordered(np.where(fin, a, 0.0), dtype)
    mr, nr = _ordered(np.where(fin, r, 0.0), dtype)
    same_side = (na == nr) | (ma == 0) | (mr == 0)
    big, small = np.maximum(ma, mr), np.minimum(ma, mr)
    dist = np.where(same_side & (na == nr), (big - small).astype(np.float64),
                    ma.astype(np.float64) + mr.astype(np.float64))
    equal_nonfinite = (np.isnan(a) & np.isnan(r)) | (np.isinf(a) & (a == r))
    return np.where(fin, dist, np.where(equal_nonfinite, 0.0, np.inf))


def metrics(actual, reference, *, dtype=None, threshold: Optional[float] = None,
            name: str = "out") -> dict:
    """Error metrics of ``actual`` against ``reference``: the one definition every report uses
    (``refattn compare``, ``refattn golden``, :mod:`refattn.report`, :mod:`refattn.testing`).

    * ``max_abs``: max ``|a - r|``;
    * ``max_rel``: max ``|a - r| / |r|``; where ``r == 0`` the relative error is 0 if ``a == 0``
      and ``inf`` otherwise (a relative error is unbounded there; read ``max_abs``);
    * ``normwise_rel``: ``||a - r||_2 / ||r||_2`` (``0`` when both norms are 0, ``inf`` when only
      the reference's is);
    * ``max_ulp``: max :func:`ulp_distance` in ``dtype`` (float64 when None);
    * ``worst_index``: the first non-finite disagreement, else the largest ``|a - r|``; None when
      nothing differs (and for empty arrays); ``worst_actual``/``worst_expected`` its values;
    * ``nan``, ``inf``: ``[count in actual, count in reference]``;
    * ``nonfinite_mismatch``: entries whose non-finite status differs (equal NaN/NaN or equal
      infinities are agreement: ``empty_row="nan"``);
    * ``mismatches``: entries with ``|a - r| > threshold`` (None without a threshold).

    **Non-finite values**: a non-finite disagreement makes the error at that entry infinite, so
    ``max_abs``, ``max_rel``, ``normwise_rel`` and ``max_ulp`` are all ``inf``. **Empty arrays**:
    every error is 0, ``worst_index`` None, ``mismatches`` 0.
    """
    a, r = _pair(actual, reference, name)
    err = abs_error(a, r, name)
    res = {"shape": tuple(int(s) for s in a.shape), "nan": [int(np.isnan(a).sum()), int(np.isnan(r).sum())],
           "inf": [int(np.isinf(a).sum()), int(np.isinf(r).sum())]}
    if err.size == 0:
        return {**res, "max_abs": 0.0, "max_rel": 0.0, "normwise_rel": 0.0, "max_ulp": 0.0,
                "worst_index": None, "worst_actual": None, "worst_expected": None,
                "nonfinite_mismatch": 0, "mismatches": 0 if threshold is not None else None}
    bad = np.isinf(err) & ~(np.isfinite(a) & np.isfinite(r))
    finite_r = np.where(np.isfinite(r), r, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.where(err == 0, 0.0, err / np.abs(finite_r))
        norm_r = float(np.linalg.norm(finite_r))
        norm_e = float(np.linalg.norm(err)) if not np.isinf(err).any() else math.inf
    if bad.any():
        worst = np.unravel_index(int(np.argmax(bad)), err.shape)
    elif err.max() > 0:
        worst = np.unravel_index(int(np.argmax(err)), err.shape)
    else:
        worst = None
    res.update(
        max_abs=float(err.max()),
        max_rel=float(rel.max()),
        normwise_rel=norm_e / norm_r if norm_r > 0 else (0.0 if norm_e == 0 else math.inf),
        max_ulp=float(ulp_distance(a, r, None if dtype is None else canonical(dtype)).max()),
        worst_index=None if worst is None else tuple(int(i) for i in worst),
        worst_actual=None if worst is None else float(a[worst]),
        worst_expected=None if worst is None else float(r[worst]),
        nonfinite_mismatch=int(bad.sum()),
        mismatches=None if threshold is None else int((err > threshold).sum()))
    return res


def within_tolerance(m: dict, tolerance: float) -> bool:
    """The float64 rule: non-finite entries identical and ``normwise_rel <= tolerance``."""
    return m["nonfinite_mismatch"] == 0 and m["normwise_rel"] <= tolerance


def defaults(dtype, variant: Optional[str] = None) -> tuple:
    """``(factor, atol)`` for ``dtype``: the variant's ``verdict`` declaration if any, else the
    module defaults (flash-attn's factor 2, half an ulp at 1)."""
    name = canonical(dtype)
    factor, atol = DEFAULT_FACTOR, DEFAULT_ATOL[name]
    if variant is not None:
        from . import variants
        decl = getattr(variants.get(variant), "verdict", None) or {}
        factor = float(decl.get("factor", factor))
        a = decl.get("atol", {})
        atol = float(a.get(name, a.get(SHORT[name], atol))) if isinstance(a, dict) else float(a)
    return factor, atol


def _check_number(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value >= 0):
        raise ParameterError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def compare(actual, reference, baseline, *, dtype, factor: Optional[float] = None,
            atol: Optional[float] = None, variant: Optional[str] = None,
            name: str = "out") -> dict:
    """Metrics of ``actual`` and the verdict of the rule (module docstring) for one array.

    Returns the :func:`metrics` of ``actual`` plus ``baseline_max_abs``, ``factor``, ``atol`` (in
    units of the reference's largest magnitude), ``reference_max`` (that magnitude, max |ref| over
    finite entries), ``allowed`` (``factor * baseline_max_abs + atol * reference_max``), ``dtype``
    and ``verdict``:

    * ``"FAIL"``: ``max_abs > allowed``, or NaN/Inf where the reference is finite;
    * ``"INCONCLUSIVE"`` (with ``reason``): within the allowance, but the allowance reaches the
      reference's own magnitude (``allowed >= reference_max > 0``), so even an output of zeros
      would pass -- the dtype is too coarse for these values to tell right from wrong;
    * ``"PASS"`` otherwise.
    """
    name_dt = canonical(dtype)
    f0, a0 = defaults(name_dt, variant)
    factor = f0 if factor is None else _check_number(factor, "factor")
    atol = a0 if atol is None else _check_number(atol, "atol")
    base_err = abs_error(baseline, reference, f"{name} (baseline)")
    base_max = float(base_err.max()) if base_err.size else 0.0
    if not math.isfinite(base_max):  # an allowance of inf would pass anything, NaN outputs included
        raise ParameterError(
            f"baseline: expected a finite {SHORT[name_dt]} baseline for {name!r}, got "
            f"{int(np.sum(~np.isfinite(base_err)))} NaN/Inf entries where the float64 reference "
            f"is finite (the inputs or scores overflow {SHORT[name_dt]}); use in-range inputs or "
            f"baseline='inputs_only'")
    ref = np.asarray(reference, dtype=np.float64)
    ref_max = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0))
    allowed = factor * base_max + atol * ref_max
    res = metrics(actual, reference, dtype=name_dt, threshold=allowed, name=name)
    verdict, reason = "PASS", None
    if res["max_abs"] > allowed or res["nonfinite_mismatch"]:
        verdict = "FAIL"
    elif allowed >= ref_max > 0:
        verdict = "INCONCLUSIVE"
        reason = (f"{name}: the allowed error {allowed:.3g} reaches the reference's largest "
                  f"magnitude {ref_max:.3g}, so an output of zeros would pass; {SHORT[name_dt]} is too "
                  f"coarse to judge these values")
    res.update(name=name, dtype=SHORT[name_dt], baseline_max_abs=base_max, factor=factor,
               atol=atol, reference_max=ref_max, allowed=allowed, verdict=verdict, reason=reason)
    return res


def overall(verdicts) -> str:
    """FAIL if any is FAIL, else INCONCLUSIVE if any is, else PASS (and FAIL for none)."""
    verdicts = list(verdicts)
    if not verdicts or "FAIL" in verdicts:
        return "FAIL"
    return "INCONCLUSIVE" if "INCONCLUSIVE" in verdicts else "PASS"


def compare_all(actual: dict, reference: dict, baseline: dict, **kw) -> dict:
    """:func:`compare` for each name in ``actual`` (``out``, ``lse``, ``dq``, ...) that the reference
    has: ``{"results": {name: ...}, "verdict": "PASS" iff all pass}``."""
    unknown = [n for n in actual if n not in reference]
    if unknown:
        raise ParameterError(f"{unknown[0]}: no reference for this output; the reference has "
                             f"{', '.join(reference)}")
    results = {n: compare(actual[n], reference[n], baseline[n], name=n, **kw) for n in actual}
    return {"results": results, "verdict": overall(r["verdict"] for r in results.values())}


def format_table(results: dict) -> str:
    """A plain-text metrics table of :func:`compare_all`'s ``results`` (one line per output)."""
    head = ("output", "max_abs", "allowed", "baseline", "max_rel", "normwise", "max_ulp",
            "mismatch", "nan/inf", "worst index", "verdict")
    rows = [head]
    for n, r in results.items():
        rows.append((n, f"{r['max_abs']:.3e}", f"{r['allowed']:.3e}", f"{r['baseline_max_abs']:.3e}",
                     f"{r['max_rel']:.3e}", f"{r['normwise_rel']:.3e}", f"{r['max_ulp']:.1f}",
                     str(r["mismatches"]), f"{r['nan'][0]}/{r['inf'][0]}", str(r["worst_index"]),
                     r["verdict"]))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

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
``prepare``, its :class:`~refattn.patterns.Pattern`, its ``ScoreMod``) on
:class:`EmulatedBackend`, a numpy backend whose ``attend``/``attend_backward`` compute in float32
with the roundings above and whose scores come from the numpy backend's ``scores``. A variant that
never calls ``attend`` (the tiled ``flash`` reference) is emulated through ``sdpa`` when its
parameters are core parameters (flash equals sdpa by definition); any other such variant needs
``mode="inputs_only"``.

Metrics and the verdict
-----------------------
:func:`metrics` reports, for ``actual`` against a float64 ``reference``: ``max_abs`` (max |a - r|),
``max_rel`` (max |a - r| / |r| over the elements with r != 0; zeros of r are covered by max_abs),
``normwise_rel`` (``||a - r||_2 / ||r||_2``), ``max_ulp`` (max |a - r| / ulp_dtype(r), the ULP being
the spacing of the dtype at |r|, its smallest subnormal at 0), ``worst_index`` (index of max |a - r|),
``nan``/``inf`` (counts in ``actual``), and, once a threshold is known, ``mismatches`` (elements with
|a - r| above it). Positions where both are NaN (``empty_row="nan"``) count as equal; a NaN in
``actual`` where ``reference`` is a number makes the error infinite.

:func:`compare` applies the **verdict rule**::

    PASS  iff  max|impl - ref64| <= factor * max|baseline - ref64| + atol(dtype)

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
2**-11 for fp16, 2**-4 for e4m3, 2**-3 for e5m2, 2**-24 for fp32). A registered variant may
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

from refattn.backends.numpy_ import NumpyBackend, _row_chunks
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


# -- the emulated low-precision kernel ---------------------------------------------------------------
class EmulatedBackend(NumpyBackend):
    """``attend``/``attend_backward`` of a kernel storing data in ``dtype`` (module docstring).

    Subclasses the numpy backend so that the scores, the mask (``Pattern.mask``), the score
    modifications and dropout are the specification's own code; only the precision differs.
    ``calls`` counts the primitive calls, to tell whether a variant ran through them.
    """

    name = "emulated"

    def __init__(self, dtype, chunk_elements: Optional[int] = None):
        super().__init__(**({} if chunk_elements is None else {"chunk_elements": chunk_elements}))
        self.dtype = canonical(dtype)
        self.calls = 0

    def low(self, x, name: str = "") -> np.ndarray:
        """``x`` rounded to the storage dtype, as float32 (exact: every dtype here fits).

        With ``name`` (an input), a finite value the dtype cannot hold is an error: a kernel in
        that dtype could not have been given these inputs, so no baseline exists."""
        r = round_to(x, self.dtype).astype(np.float32)
        if name and not np.all(np.isfinite(r) | ~np.isfinite(x)):
            raise ParameterError(
                f"{name}: expected values a {SHORT[self.dtype]} kernel can hold (|x| <= "
                f"{float(finfo(self.dtype).max):g}), got max |{name}| = {float(np.nanmax(np.abs(x))):g}")
        return r

    def scores32(self, q_rows, k, rows, sq, sk, *, pattern, scale, score_mod):
        """Masked scores in float32 (and ``tanh(s/c)`` for softcap): the numpy backend's own."""
        s, t = self.scores(q_rows, k, rows, sq, sk, pattern=pattern, scale=np.float32(scale),
                           score_mod=score_mod)
        return s.astype(np.float32), None if t is None else t.astype(np.float32)

    def attend(self, q, k, v, *, pattern, scale, head_map, score_mod=None, sinks=None, dropout=None):
        self.calls += 1
        b, hq, sq, _ = q.shape
        sk = k.shape[2]
        q, k, v = self.low(q, "q"), self.low(k[:, head_map], "k"), self.low(v[:, head_map], "v")
        out = np.zeros((b, hq, sq, v.shape[-1]), dtype=np.float32)
        lse = np.full((b, hq, sq), -np.inf, dtype=np.float32)
        for rows in _row_chunks(b, hq, sq, sk, self.chunk_elements):
            s, _ = self.scores32(q[:, :, rows], k, rows, sq, sk, pattern=pattern, scale=scale,
                                 score_mod=score_mod)
            m = s.max(axis=-1, keepdims=True)
            m = np.where(np.isfinite(m), m, np.float32(0))
            e = np.exp(s - m)
            l = e.sum(axis=-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(l > 0, e / l, np.float32(0))
                lse[:, :, rows] = np.log(l[..., 0]) + m[..., 0]
            keep = self.dropout_keep(dropout, b, hq, sq, sk, rows)
            if keep is not None:
                p = np.where(keep, p * np.float32(dropout.scale), np.float32(0))
            out[:, :, rows] = self.low(p) @ v  # P rounded to the dtype; float32 accumulation
        if sinks is not None:
            out = out * self.sink_factor(lse, sinks.astype(np.float32))[..., None]
        return round_to(out, self.dtype), lse.astype(np.float64)

    def attend_backward(self, q, k, v, out, lse, dout, *, pattern, scale, head_map, score_mod=None,
                        sinks=None, dropout=None):
        self.calls += 1
        b, hq, sq, _ = q.shape
        sk = k.shape[2]
        q, dout = self.low(q, "q"), self.low(dout, "dout")
        kh, vh = self.low(k[:, head_map], "k"), self.low(v[:, head_map], "v")
        out, lse = out.astype(np.float32), lse.astype(np.float32)
        lse_all = lse if sinks is None else np.logaddexp(lse, sinks.astype(np.float32)[None, :, None])
        delta = np.sum(dout * out, axis=-1)
        dq = np.zeros(q.shape, dtype=np.float32)
        dk_h = np.zeros(kh.shape, dtype=np.float32)
        dv_h = np.zeros(vh.shape, dtype=np.float32)
        for rows in _row_chunks(b, hq, sq, sk, self.chunk_elements):
            s, t = self.scores32(q[:, :, rows], kh, rows, sq, sk, pattern=pattern, scale=scale,
                                 score_mod=score_mod)
            l_rows = lse_all[:, :, rows, None]
            p = np.exp(s - np.where(np.isfinite(l_rows), l_rows, np.float32(np.inf)))
            dp = dout[:, :, rows] @ np.swapaxes(vh, -1, -2)
            p_used = p
            keep = self.dropout_keep(dropout, b, hq, sq, sk, rows)
            if keep is not None:
                p_used = np.where(keep, p * np.float32(dropout.scale), np.float32(0))
                dp = np.where(keep, dp * np.float32(dropout.scale), np.float32(0))
            dv_h += np.swapaxes(self.low(p_used), -1, -2) @ dout[:, :, rows]
            ds = p * (dp - delta[:, :, rows, None])
            if t is not None:
                ds = ds * (1 - t * t)
            ds = self.low(ds)  # dS rounded to the dtype before both products
            dq[:, :, rows] = np.float32(scale) * (ds @ kh)
            dk_h += np.float32(scale) * (np.swapaxes(ds, -1, -2) @ q[:, :, rows])
        dk = np.zeros(k.shape, dtype=np.float32)
        dv = np.zeros(v.shape, dtype=np.float32)
        np.add.at(dk, (slice(None), head_map), dk_h)
        np.add.at(dv, (slice(None), head_map), dv_h)
        return round_to(dq, self.dtype), round_to(dk, self.dtype), round_to(dv, self.dtype), {}


# -- reference and baseline --------------------------------------------------------------------------
def _split(case: dict):
    """``(arrays, params, varlen)`` from a case dict holding q, k, v and parameters."""
    missing = [n for n in ("q", "k", "v") if n not in case]
    if missing:
        raise ParameterError(f"{missing[0]}: expected the case to hold q, k and v, got keys "
                             f"{', '.join(sorted(case)) or 'none'}")
    params = {n: val for n, val in case.items() if n not in ("q", "k", "v")}
    varlen = {n: params.pop(n) for n in ("cu_seqlens_q", "cu_seqlens_k") if n in params}
    params.pop("return_lse", None)
    return {n: case[n] for n in ("q", "k", "v")}, params, varlen


def _has_lse(var) -> bool:
    import dataclasses
    return any(f.name == "return_lse" for f in dataclasses.fields(var.params))


def _run(var, backend, arrays, params, dout):
    """``{"out", "lse"?, "dq", "dk", "dv"}`` of one variant evaluation on a backend object."""
    with_lse = _has_lse(var)
    p = var.parse_params({**params, **({"return_lse": True} if with_lse else {})})
    out, lse = var.forward(backend, arrays, p)
    res = {"out": np.asarray(out, dtype=np.float64)}
    if with_lse and lse is not None:
        res["lse"] = np.asarray(lse, dtype=np.float64)
    if dout is not None:
        if var.backward is None:
            raise ParameterError(f"dout: variant {var.name!r} has no backward")
        dq, dk, dv, _ = var.backward(backend, arrays, dout, p)
        res.update(dq=np.asarray(dq, np.float64), dk=np.asarray(dk, np.float64),
                   dv=np.asarray(dv, np.float64))
    return res


def _evaluate(case: dict, variant: str, backend, dout=None, round_inputs=None):
    """Evaluate a case (dense or varlen) on a backend object; inputs optionally rounded first."""
    from . import variants
    from .adapters import varlen_apply

    var = variants.get(variant)
    arrays, params, varlen = _split(case)
    if round_inputs is not None:
        arrays = {n: round_to(_host(a, n), round_inputs) for n, a in arrays.items()}
        dout = None if dout is None else round_to(_host(dout, "dout"), round_inputs)
    if not varlen:
        return _run(var, backend, arrays, params, dout)

    def one(q, k, v, do, extra):
        return _run(var, backend, {"q": q, "k": k, "v": v}, {**params, **extra}, do)
    return varlen_apply(one, arrays["q"], arrays["k"], arrays["v"], varlen.get("cu_seqlens_q"),
                        varlen.get("cu_seqlens_k"), dout=dout, params=params)


def _host(x, name):
    from .validate import as_compute
    return as_compute(x, name)


def reference(case: dict, *, variant: str = "sdpa", backend: str = "numpy", dout=None) -> dict:
    """The float64 reference of a case: ``{"out", "lse"}`` (and ``dq, dk, dv`` given ``dout``).

    ``case`` holds ``q, k, v`` and the variant's parameters (and ``cu_seqlens_q/k`` for packed
    batches). ``lse`` is included when the variant has ``return_lse``.
    """
    from . import backends
    return _evaluate(case, variant, backends.get(backend), dout)


def baseline(case: dict, *, variant: str = "sdpa", dtype="bf16", mode: str = "same_precision",
             dout=None) -> dict:
    """The same-precision baseline of a case (module docstring): ``{"out", "lse"?, "dq"...}``.

    Values are float64 arrays holding what a ``dtype`` kernel would store (LSE: float32 values).
    """
    from . import backends, variants
    from .validate import check_choice

    check_choice(mode, "baseline", BASELINES)
    name = canonical(dtype)
    if mode == "inputs_only":
        res = _evaluate(case, variant, backends.get("numpy"), dout, round_inputs=name)
        return {n: (a if n == "lse" else round_to(a, name)) for n, a in res.items()}
    # Whether the variant's *forward* runs through attend decides how it is emulated (a backward
    # may call attend even when the forward does not: flash's tiles do not, its backward does).
    emu = EmulatedBackend(name)
    res = _evaluate(case, variant, emu)
    if emu.calls and dout is not None:
        res = _evaluate(case, variant, EmulatedBackend(name), dout)
    if emu.calls == 0:
        from .variants.core import CoreParams
        if not issubclass(variants.get(variant).params, CoreParams):
            raise ParameterError(
                f"baseline: variant {variant!r} does not run through the attend primitive, so "
                f"'same_precision' cannot be emulated; use baseline='inputs_only'")
        core = {f for f in CoreParams.__dataclass_fields__}
        sdpa_case = {n: val for n, val in case.items()
                     if n in core or n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")}
        res = _evaluate(sdpa_case, "sdpa", emu, dout)
    return res


# -- metrics and verdict -----------------------------------------------------------------------------
def _pair(actual, reference, name):
    from .validate import to_numpy
    a = np.asarray(to_numpy(actual, name), dtype=np.float64)
    r = np.asarray(to_numpy(reference, f"{name} (reference)"), dtype=np.float64)
    if a.shape != r.shape:
        raise ShapeError(f"{name}: expected shape {fmt_shape(r.shape)} as the reference, "
                         f"got {fmt_shape(a.shape)}")
    return a, r


def abs_error(actual, reference, name: str = "out") -> np.ndarray:
    """``|actual - reference|`` elementwise; both NaN (or equal infinities) -> 0, one NaN -> inf."""
    a, r = _pair(actual, reference, name)
    with np.errstate(invalid="ignore"):
        err = np.abs(a - r)
    same = (np.isnan(a) & np.isnan(r)) | (np.isinf(a) & (a == r))
    return np.where(same, 0.0, np.where(np.isnan(err), np.inf, err))


def metrics(actual, reference, *, dtype=None, threshold: Optional[float] = None,
            name: str = "out") -> dict:
    """Error metrics of ``actual`` against the float64 ``reference`` (module docstring).

    ``max_ulp`` needs ``dtype``; ``mismatches`` needs ``threshold`` (both None otherwise).
    ``worst_index`` is a tuple into the arrays' shape (None for empty arrays).
    """
    a, r = _pair(actual, reference, name)
    err = abs_error(a, r, name)
    finite_r = np.where(np.isfinite(r), r, 0.0)
    res = {"shape": tuple(a.shape), "nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum())}
    if err.size == 0:
        return {**res, "max_abs": 0.0, "max_rel": 0.0, "normwise_rel": 0.0, "max_ulp": 0.0,
                "worst_index": None, "mismatches": 0 if threshold is not None else None}
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    nz = finite_r != 0
    norm_r = float(np.linalg.norm(finite_r))
    with np.errstate(over="ignore", invalid="ignore"):
        norm_e = float(np.linalg.norm(err)) if np.all(np.isfinite(err)) else math.inf
    res.update(
        max_abs=float(err.max()),
        max_rel=float((err[nz] / np.abs(finite_r[nz])).max()) if nz.any() else 0.0,
        normwise_rel=norm_e / norm_r if norm_r > 0 else (0.0 if norm_e == 0 else math.inf),
        max_ulp=None if dtype is None else float((err / spacing(finite_r, dtype)).max()),
        worst_index=tuple(int(i) for i in worst),
        mismatches=None if threshold is None else int((err > threshold).sum()))
    return res


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

    Returns the :func:`metrics` of ``actual`` plus ``baseline_max_abs``, ``factor``, ``atol``,
    ``allowed`` (``factor * baseline_max_abs + atol``), ``dtype`` and ``verdict`` (``"PASS"`` or
    ``"FAIL"``; any NaN/Inf where the reference is finite fails).
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
    allowed = factor * base_max + atol
    res = metrics(actual, reference, dtype=name_dt, threshold=allowed, name=name)
    res.update(name=name, dtype=SHORT[name_dt], baseline_max_abs=base_max, factor=factor,
               atol=atol, allowed=allowed,
               verdict="PASS" if res["max_abs"] <= allowed else "FAIL")
    return res


def compare_all(actual: dict, reference: dict, baseline: dict, **kw) -> dict:
    """:func:`compare` for each name in ``actual`` (``out``, ``lse``, ``dq``, ...) that the reference
    has: ``{"results": {name: ...}, "verdict": "PASS" iff all pass}``."""
    unknown = [n for n in actual if n not in reference]
    if unknown:
        raise ParameterError(f"{unknown[0]}: no reference for this output; the reference has "
                             f"{', '.join(reference)}")
    results = {n: compare(actual[n], reference[n], baseline[n], name=n, **kw) for n in actual}
    ok = all(r["verdict"] == "PASS" for r in results.values())
    return {"results": results, "verdict": "PASS" if ok else "FAIL"}


def format_table(results: dict) -> str:
    """A plain-text metrics table of :func:`compare_all`'s ``results`` (one line per output)."""
    head = ("output", "max_abs", "allowed", "baseline", "max_rel", "normwise", "max_ulp",
            "mismatch", "nan/inf", "worst index", "verdict")
    rows = [head]
    for n, r in results.items():
        rows.append((n, f"{r['max_abs']:.3e}", f"{r['allowed']:.3e}", f"{r['baseline_max_abs']:.3e}",
                     f"{r['max_rel']:.3e}", f"{r['normwise_rel']:.3e}", f"{r['max_ulp']:.1f}",
                     str(r["mismatches"]), f"{r['nan']}/{r['inf']}", str(r["worst_index"]),
                     r["verdict"]))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

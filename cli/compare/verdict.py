"""The verdict of ``refattn compare``: per-array metrics (the one definition,
:func:`refattn.numerics.metrics`), the float64 rule or the low-precision rule, and on FAIL the
account of where the errors cluster (:mod:`refattn.report`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from refattn import numerics
from .problem import Oracle, Problem

RULE = "non-finite entries identical and normwise_rel <= tolerance"
RULE_LOW = ("non-finite entries as the reference's and max_abs <= factor * baseline_max_abs + atol "
            "(baseline: the computation emulated in the dtype)")


def metrics(actual: dict, expected: dict, axes: Optional[dict] = None,
            dtype: Optional[str] = None) -> dict:
    """``{name: METRICS}`` for every array in ``expected`` (the schema in :mod:`.render`).

    ``METRICS`` is :func:`refattn.numerics.metrics` of the array plus ``axes`` (the axis letters of
    ``worst_index``); an array missing from ``actual`` or of another shape gets
    ``{"shape", "expected_shape", "axes", "error"}`` instead. ``dtype`` (a short name) is the dtype
    of the ULP count (float64 for the fp64 rule).
    """
    axes = axes or {}
    dt = None if dtype in (None, "fp64") else dtype
    report = {}
    for name, r in expected.items():
        r = np.asarray(r, dtype=np.float64)
        if name not in actual or np.shape(actual[name]) != r.shape:
            got = list(np.shape(actual[name])) if name in actual else None
            report[name] = {"shape": got, "expected_shape": list(r.shape), "axes": axes.get(name),
                            "error": f"{name}: expected shape {tuple(r.shape)}, got "
                                     f"{'nothing' if got is None else tuple(got)}"}
            continue
        m = numerics.metrics(actual[name], r, dtype=dt, name=name)
        m["shape"] = list(m["shape"])
        m["axes"] = axes.get(name)
        report[name] = m
    return report


def verdict(report: dict, tolerance: float) -> str:
    """The float64 rule: mark each array's ``pass``; overall ``PASS``/``FAIL``."""
    for m in report.values():
        m["pass"] = "error" not in m and numerics.within_tolerance(m, tolerance)
    return "PASS" if report and all(m["pass"] for m in report.values()) else "FAIL"


def verdict_low(report: dict, actual: dict, expected: dict, base: dict, o: Oracle,
                variant: str) -> tuple:
    """The low-precision rule (refattn.numerics.compare) for every array: adds its keys to each
    ``METRICS`` and marks ``pass``; returns ``(overall, {name: numerics result})``."""
    results = {}
    for name, m in report.items():
        if "error" in m:
            m["pass"] = False
            continue
        res = numerics.compare(actual[name], expected[name], base[name], dtype=o.dtype,
                               factor=o.factor, atol=o.atol, variant=variant, name=name)
        results[name] = res
        m.update({k: res[k] for k in ("dtype", "baseline_max_abs", "factor", "atol", "reference_max",
                                      "allowed", "max_ulp", "mismatches", "reason")})
        m["pass"] = res["verdict"] == "PASS"
        m["status"] = res["verdict"]
    return numerics.overall(m.get("status", "FAIL") for m in report.values()), results


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
    """The account of a failure: ``refattn.report.analyse`` of ``out`` when it fails (or with
    ``heat`` for --report), and an LSE in the other base when ``lse`` fails; else None."""
    from refattn import report as report_mod
    res = None
    m = report.get("out")
    if (m is not None and "error" not in m and (not m["pass"] or heat)
            and problem.variant.family not in ("moe", "block")  # out is (B, S, d) or (T, E)
            and np.ndim(expected["out"]) >= 3):
        ref = np.asarray(expected["out"], dtype=np.float64)
        res = report_mod.analyse(actual["out"], ref, _allowed(m, ref, problem.tolerance),
                                 case=problem.case_dict if problem.on_qkv else None,
                                 variant=problem.variant.name, heat=heat)
    m_lse = report.get("lse")
    if m_lse is not None and "error" not in m_lse and not m_lse["pass"] and "lse" in actual:
        lse = np.asarray(expected["lse"], dtype=np.float64)
        lines = report_mod.lse_explanations(actual["lse"], lse, _allowed(m_lse, lse, problem.tolerance))
        if lines:
            res = res or {"lines": [], "worst": None}
            res["lines"] = lines + res["lines"]
    return res


def _allowed(m: dict, ref, tolerance: float) -> float:
    """The error a failing entry exceeds: the low-precision allowance, or (float64 rule)
    ``tolerance * max|reference|``."""
    if m.get("allowed") is not None:
        return m["allowed"]
    finite = ref[np.isfinite(ref)]
    return tolerance * (float(np.abs(finite).max()) if finite.size else 1.0)

"""Rendering a ``refattn compare`` result: the table, the JSON record and the ``--report`` file.

JSON (``--json``; schema 2, see CHANGELOG.md: keys may be added, none removed or renamed within a
schema version)::

    {"schema": 2, "refattn": "0.2.0", "variant": "sdpa", "case": null, "golden_file": null,
     "inputs": "normal" | "large" | ... | null,              # the distribution of the run shown
     "battery": [{"inputs": "normal", "verdict": "PASS", "max_abs": ..., "allowed": ...}, ...],
                                                              # only when several ran (--impl)
     "shape": [B, Hq, Sq, Sk, D, Hkv] | null,                  # null: packed (varlen) --outputs
     "seed": 0 | null,
     "params": {"causal": true, "sinks": "array (4,) float64", ...},
     "under_test": {"kind": "backend", "name": "numba"}
                 | {"kind": "impl", "name": "my_pkg.kernels:my_attn", "adapter": "refattn",
                    "framework": "numpy" | "torch" | "jax", "device": null | "cuda",
                    "lse": false, "backward": null | "module:function",
                    "mutated": ["q", ...]}                # inputs it wrote into (then FAIL)
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
     "verdict": "PASS" | "FAIL" | "INCONCLUSIVE",   # INCONCLUSIVE: exit 1, arrays[*].reason says why
     "analysis": null | {"worst": {"index": [b, h, i, j | null], "element": [b, h, i, d],
                                   "relation": "...", "explained": 0.99,
                                   "block_keys": [j0, j1], "block_explained": 0.5},
                         "lines": ["12 of 2048 rows (b, h, i) exceed ...", ...]},
     "report": null | ["out.md", "out_heatmap.png"],
     "seconds": {"under_test": 0.1, "reference": 0.2, "baseline": 0.3},   # baseline: low dtype
     "routing": null | {...}}              # moe variants: refattn.cli.compare.routing (which tokens
                                           # went to other experts)

    METRICS = refattn.numerics.metrics of the array (its docstring defines every key and what
              NaN/Inf, zeros of the reference and empty arrays give):
              {"shape": [...], "max_abs": float, "max_rel": float, "normwise_rel": float,
               "max_ulp": float,                          # in the tested dtype (fp64: float64)
               "worst_index": [..] | null, "worst_actual": float | null,
               "worst_expected": float | null,
               "nan": [under_test, reference], "inf": [under_test, reference],
               "nonfinite_mismatch": int, "mismatches": int | null,
               "axes": "b,h,i,d" | null,                  # axes of worst_index, when known
               "pass": bool,
               # with a low-precision dtype also:
               "dtype": "bf16", "baseline_max_abs": float, "factor": float, "atol": float,
               "reference_max": float,                    # max |reference| (finite entries)
               "allowed": float,                          # factor * baseline_max_abs + atol * reference_max
               "status": "PASS" | "FAIL" | "INCONCLUSIVE",
               "reason": str | null}                      # why INCONCLUSIVE

Non-finite numbers in the JSON are the strings ``"inf"``/``"nan"``. With a shape mismatch,
``METRICS`` is ``{"shape": [...], "expected_shape": [...], "axes": ..., "error": "...", "pass":
false}``. ``analysis`` is filled on FAIL (and with --report) from the ``out`` array
(:mod:`refattn.report`).
"""

from __future__ import annotations

from typing import Optional

from refattn.errors import ParameterError
from .verdict import RULE

#: version of the --json record (CHANGELOG.md lists the changes)
SCHEMA = 2


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


def _nan_inf(m, key) -> str:
    return "%d/%d" % tuple(m[key])


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
        status = m.get("status") or ("PASS" if m["pass"] else "FAIL")
        ulp = (_fmt(m["max_ulp"]), str(m["mismatches"])) if low else ()
        rows.append((name, _fmt(m["max_abs"])) + extra + (_fmt(m["max_rel"]), _fmt(m["normwise_rel"]))
                    + ulp + (_index_text(m), _nan_inf(m, "nan"), _nan_inf(m, "inf"),
                             status))
    return head, rows


def _verdict_line(result: dict) -> str:
    if result.get("dtype", "fp64") == "fp64":
        return f"{result['verdict']}: {RULE}, tolerance {result['tolerance']:g}"
    line = (f"{result['verdict']}: max|test - float64| <= {result['factor']:g} * "
            f"max|{result['dtype']} baseline - float64| + {result['atol']:g} * max|float64| "
            f"({result['baseline']} baseline), non-finite entries as the reference's")
    reasons = [m["reason"] for m in result["arrays"].values() if m.get("reason")]
    if result["verdict"] == "INCONCLUSIVE" and reasons:
        line = "INCONCLUSIVE: " + "; ".join(reasons) + "\n" + line
    return line


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
        guessed = (" (the dtype of the saved out: recorded in the file, or its stored dtype; give "
                   "--dtype to choose)") if result.get("dtype_inferred") else ""
        lines.append(f"dtype {dtype}{guessed}; baseline {result['baseline']}: {how}")
    from ..list_ import table

    lines.append("")
    head_row, rows = _rows(result)
    lines.append(table(rows, head_row))
    lines.append("")
    analysis = result.get("analysis")
    mutated = result["under_test"].get("mutated")
    if mutated:
        lines.append(f"the function under test modified its inputs in place: {', '.join(mutated)} "
                     f"(the reference used refattn's own copies); a kernel must not write into "
                     f"its inputs")
    if result["verdict"] != "PASS" and analysis:
        if analysis.get("worst"):
            lines.append(worst_text(analysis["worst"]))
        lines += analysis.get("lines", [])
    if result.get("battery"):
        runs = ", ".join(f"{b['inputs']} {b['verdict']}" for b in result["battery"])
        lines.append(f"inputs battery: {runs}; shown above: {result['inputs']}")
    elif result.get("inputs") not in (None, "normal"):
        lines.append(f"inputs: {result['inputs']}")
    if result.get("report"):
        lines.append("report: " + ", ".join(result["report"]))
    from .routing import routing_lines
    lines += routing_lines(result.get("routing"))
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



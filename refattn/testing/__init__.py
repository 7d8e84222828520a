"""Testing helpers for *your* attention implementation, for use in your own test suite.

>>> from refattn.testing import assert_attention_close, strategies as st   # doctest: +SKIP
>>> @given(st.attention_inputs(variant="gqa", max_seq=256))                 # doctest: +SKIP
... def test_my_kernel(case):
...     assert_attention_close(my_attn(**case.kwargs), variant="gqa", dtype="bf16", **case.kwargs)

:func:`assert_attention_close` computes the float64 reference and the same-precision baseline of
the case (:mod:`refattn.numerics`) and applies the verdict rule
``max|impl - ref64| <= factor * max|baseline - ref64| + atol(dtype)`` to every output given; on
failure it raises ``AssertionError`` with the metrics table and where the errors cluster
(:mod:`refattn.report`). :mod:`refattn.testing.strategies` holds the public Hypothesis strategies
(importing this package does not import Hypothesis).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import numerics
from ..errors import ParameterError

__all__ = ["assert_attention_close", "check_attention"]

#: below this many score elements (B * H * Sq * Sk) the reference runs with one BLAS thread:
#: a multi-threaded BLAS on small matrices is slower, and on a loaded machine (a CI runner) by
#: 30-50x, enough to trip Hypothesis' default 200 ms deadline in a user's test.
SMALL_PROBLEM = 1 << 22
_controller = None


def _blas_threads(case):
    """A context that pins BLAS to one thread for small problems (threadpoolctl), else a no-op."""
    import contextlib

    import numpy as np

    global _controller
    q, k = case.get("q"), case.get("k")
    if q is None or k is None or np.size(q) // max(1, np.shape(q)[-1]) * np.shape(k)[-2] > SMALL_PROBLEM:
        return contextlib.nullcontext()
    if _controller is None:
        from threadpoolctl import ThreadpoolController
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def _as_outputs(actual) -> dict:
    """The outputs given, by name; an entry that is None (an LSE the kernel does not compute) is
    left out, and ``out`` itself is required."""
    if isinstance(actual, dict):
        unknown = sorted(set(actual) - set(numerics.OUTPUT_NAMES) - {"dout"})
        if unknown:
            raise ParameterError(f"actual: unknown output {unknown[0]!r}; expected keys among "
                                 f"{', '.join(numerics.OUTPUT_NAMES)}")
        got = dict(actual)
    elif isinstance(actual, (tuple, list)):
        if len(actual) not in (1, 2):
            raise ParameterError(f"actual: expected out or (out, lse), got a sequence of "
                                 f"{len(actual)} items")
        got = dict(zip(("out", "lse"), actual))
    else:
        got = {"out": actual}
    if got.get("out") is None and "dq" not in got:
        raise ParameterError("actual: expected the output array (or (out, lse)), got None")
    return {n: a for n, a in got.items() if a is not None}


def check_attention(actual, *, variant: str = "sdpa", dtype="bf16", factor: Optional[float] = None,
                    atol: Optional[float] = None, baseline: str = "same_precision",
                    backend: str = "numpy", dout=None, analyse: Optional[bool] = None,
                    round_inputs: bool = True, **case) -> dict:
    """What :func:`assert_attention_close` decides, without raising.

    With a low-precision ``dtype`` the case's float inputs are rounded to it first
    (``round_inputs=True``, as ``refattn compare --impl`` does): a kernel in that dtype reads those
    numbers, so the reference is computed on them and the baseline measures only the precision of
    the computation. Pass ``round_inputs=False`` for a kernel that reads its inputs in higher
    precision than it computes in.

    Returns :func:`refattn.numerics.compare_all`'s result plus ``"message"`` (the table and the
    account of where errors cluster) and ``"analysis"`` (:func:`refattn.report.analyse` of the
    output, or None). The analysis runs when the output fails, or always with ``analyse=True``
    (then with the heat map, for :func:`refattn.report.write`); ``analyse=False`` skips it. This
    is the whole of ``refattn compare --impl/--outputs`` short of loading and printing.
    """
    outputs = _as_outputs(actual)
    saved_dout = outputs.pop("dout", None)  # as refattn.npzio.load_outputs returns it
    dout = saved_dout if dout is None else dout
    needs_grad = any(n in outputs for n in ("dq", "dk", "dv"))
    if needs_grad and dout is None:
        raise ParameterError("dout: gradients dq/dk/dv were given; pass the dout they belong to")
    if str(dtype).lower() in FLOAT64_NAMES:
        return _check_float64(outputs, variant, backend, dout if needs_grad else None, case)
    if round_inputs:
        from .. import variants
        inputs = variants.get(variant).inputs
        case = {n: (numerics.round_to(a, dtype) if n in inputs and np.asarray(a).dtype.kind == "f"
                    else a) for n, a in case.items()}
        if dout is not None:
            dout = numerics.round_to(dout, dtype)
    with _blas_threads(case):
        ref = numerics.reference(case, variant=variant, backend=backend,
                                 dout=dout if needs_grad else None)
        base = numerics.baseline(case, variant=variant, dtype=dtype, mode=baseline,
                                 dout=dout if needs_grad else None)
        missing = [n for n in outputs if n not in ref]
        if missing:
            raise ParameterError(f"actual: variant {variant!r} gives no {missing[0]!r} to compare with")
        res = numerics.compare_all(outputs, ref, base, dtype=dtype, factor=factor, atol=atol,
                                   variant=variant)
    lines = [f"{res['verdict']}: {variant} against float64, {numerics.SHORT[numerics.canonical(dtype)]}"
             f" baseline ({baseline})", numerics.format_table(res["results"])]
    lines += [r["reason"] for r in res["results"].values() if r.get("reason")]
    out_res = res["results"].get("out")
    res["analysis"] = None
    failed = out_res is not None and out_res["verdict"] == "FAIL"
    if out_res is not None and (analyse or (analyse is None and failed)):
        from .. import report
        an = report.analyse(outputs["out"], ref["out"], out_res["allowed"], case=case,
                            variant=variant, heat=bool(analyse))
        res["analysis"] = an
        if failed:
            lines += [report.worst_line(an["worst"])] + an["lines"]
    res["message"] = "\n".join(lines)
    return res


#: ``dtype`` spellings of the float64 rule (an implementation computing in float64)
FLOAT64_NAMES = ("fp64", "float64", "double")


def _check_float64(outputs, variant, backend, dout, case) -> dict:
    """The float64 rule of ``refattn compare``: non-finite entries identical and normwise relative
    error at most the variant's tolerance (``refattn list`` shows it)."""
    from .. import variants
    tol = variants.get(variant).tolerance
    with _blas_threads(case):
        ref = numerics.reference(case, variant=variant, backend=backend, dout=dout)
    missing = [n for n in outputs if n not in ref]
    if missing:
        raise ParameterError(f"actual: variant {variant!r} gives no {missing[0]!r} to compare with")
    results = {}
    for n, a in outputs.items():
        m = numerics.metrics(a, ref[n], name=n)
        m.update(name=n, tolerance=tol,
                 verdict="PASS" if numerics.within_tolerance(m, tol) else "FAIL")
        results[n] = m
    verdict = "PASS" if all(r["verdict"] == "PASS" for r in results.values()) else "FAIL"
    lines = [f"{verdict}: {variant} against float64, normwise relative error <= {tol:g} and "
             f"non-finite entries identical"]
    lines += [f"{n}: max_abs {r['max_abs']:.3e}, normwise_rel {r['normwise_rel']:.3e}, worst index "
              f"{r['worst_index']}, NaN {r['nan'][0]}/{r['nan'][1]}, {r['verdict']}"
              for n, r in results.items()]
    return {"results": results, "verdict": verdict, "analysis": None, "message": "\n".join(lines)}


def assert_attention_close(actual, *, variant: str = "sdpa", dtype="bf16",
                           factor: Optional[float] = None, atol: Optional[float] = None,
                           baseline: str = "same_precision", backend: str = "numpy", dout=None,
                           round_inputs: bool = True, **case):
    """Assert that ``actual`` is as close to the reference as its precision explains.

    ``actual``: the output, ``(out, lse)``, or a dict with any of ``out, lse, dq, dk, dv``
    (gradients need ``dout=``, or a ``"dout"`` entry in the dict, as
    :func:`refattn.npzio.load_outputs` returns it). ``case``: ``q, k, v`` and the variant's parameters -- exactly the
    keyword arguments given to the implementation (a strategy case's ``.kwargs``). ``dtype`` is the
    precision the implementation computes in (``"fp64"`` selects the float64 rule of ``refattn
    compare``: normwise relative error within the variant's tolerance); ``factor``/``atol``
    override the low-precision rule's defaults; ``baseline="inputs_only"`` selects the weaker
    baseline. Raises ``AssertionError`` with the metrics table on failure.
    """
    __tracebackhide__ = True  # pytest: show the failure, not this helper's source
    res = check_attention(actual, variant=variant, dtype=dtype, factor=factor, atol=atol,
                          baseline=baseline, backend=backend, dout=dout, analyse=None,
                          round_inputs=round_inputs, **case)
    if res["verdict"] != "PASS":
        raise AssertionError("\n" + res["message"])

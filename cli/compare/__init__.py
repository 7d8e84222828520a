"""``refattn compare``: how far is an implementation from the float64 reference?

The command is a chain of small functions, each replaceable on its own:

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
``sdpa``, ``flex``, ``flash`` (B, S, H, D), ``varlen`` (packed, cu_seqlens); for a variant whose
inputs are not q, k, v -- ``moe_topk``, ``moe_layer``, ``block`` -- ``fn(**inputs, **params)`` with
the inputs by their documented names, see :mod:`.named`) with numpy arrays or,
with ``--framework torch``, torch tensors on ``--device`` made with DLPack. ``--dtype`` is the
precision it computes in: the made inputs (and dout) are rounded to it first, so the function and the
reference see the same numbers, and the function receives arrays of that dtype (ml_dtypes for bf16
and fp8 with numpy). Default: ``fp64`` for --impl and backends; for --outputs the dtype ``out`` had
before it was saved (``refattn.npzio.save`` records it), else its stored dtype -- and where every
stored value also fits a narrower dtype (a bf16 output saved as float32, an all-zero output) the
file cannot tell, so ``--dtype`` is required (exit 2).

Verdict rules.

* ``--dtype fp64`` (two float64 evaluations of the same definition): an array passes when its
  non-finite entries are identical (same positions, same NaN/+inf/-inf) and its normwise relative
  error ``||a - r||_2 / ||r||_2`` over the finite entries is at most the tolerance (the golden case's,
  else the variant's default from the registry, ``refattn list``).
* a low-precision ``--dtype`` (bf16, fp16, fp8_e4m3, fp8_e5m2, fp32): an array passes when ::

      max|a - r| <= factor * max|baseline - r| + atol(dtype) * max|r|

  and its non-finite entries are those of the reference -- and when that allowance reaches the
  reference's own magnitude (an all-zero output would pass) the verdict is INCONCLUSIVE (exit 1,
  with the reason), never PASS; ``baseline`` is the same-precision
  emulation of refattn.numerics (``--baseline same_precision``: inputs rounded, scores and softmax
  in float32, P rounded before P.V, output rounded; ``inputs_only``: only the inputs and outputs
  rounded). Defaults ``factor = 2``, ``atol = eps(dtype) / 2`` in units of max|r| (the variant's ``verdict``
  declaration may change them; ``--factor``/``--atol`` override both). Origin: flash-attn's test
  suite, ``(out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max() + atol``.

``--grad`` also compares dq, dk, dv for an upstream gradient ``dout``: drawn from the case's
generator after its inputs (the golden convention; a golden case's stored ``dout``), or the file's
``dout`` with --outputs. A backend runs its backward; a torch --impl is differentiated by autograd;
a numpy --impl needs ``--backward module:function`` with refattn's convention
``fn(q, k, v, dout, **params) -> (dq, dk, dv, ...)``.

The JSON record (``--json``) is documented in :mod:`refattn.cli.compare.render`.

The command is split by concern: :mod:`.problem` builds the case and the oracle options, :mod:`.run`
evaluates (through the one pipeline), :mod:`.verdict` measures and judges, :mod:`.render` prints.
"""

from __future__ import annotations

import dataclasses

import time
from typing import Optional

import click

from refattn import __version__, backends
from refattn.errors import ParameterError
from ..options import (EXIT_FAIL, EXIT_OK, backend_option, dumps, json_option, one_line_errors,
                       param_option)
from .problem import (Oracle, Problem, build_problem, check_low_options, make_dout, oracle_options,
                      problem_from_outputs, resolve_dtype, round_inputs)
from .render import SCHEMA, describe_params, render, write_report
from .routing import routing_report
from .run import run_baseline, run_reference, run_under_test
from .verdict import RULE, RULE_LOW, explain, index_axes, metrics, verdict, verdict_low
from .flex import flex_option
from .hf import hf_options


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
    report = metrics(actual, expected, index_axes(problem), o.dtype)
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
    if subject.get("mutated"):  # the function wrote into its inputs: whatever it returned, FAIL
        overall = "FAIL"
    analysis = explain(problem, actual, expected, report, heat=o.report is not None)
    routing = routing_report(problem, actual, expected)  # moe variants: tokens routed elsewhere
    result = {"schema": SCHEMA, "refattn": __version__, "variant": problem.variant.name,
              "case": problem.case,
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
              "report": None, "seconds": seconds, "routing": routing}
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
@click.option("--inputs", metavar="NAME", default=None,
              help="Input distribution of the made q, k, v (refattn.testing.inputs): normal, large "
                   "(logits past the dtype's exp range), outliers (LLM-style outlier channels), "
                   "peaked (near one-hot rows), ties (exact ties), extreme (float64 scores to "
                   "1e300), or battery (normal, large, outliers, peaked, ties: each must pass). "
                   "Default: battery with --impl, else normal.")
@click.option("--impl", "impl_spec", metavar="MODULE:FUNCTION", default=None,
              help="Test this function instead of a backend: my_pkg.kernels:my_attn, file.py:fn or "
                   "module:Class.fn (the current directory is searched). Default: none.")
@click.option("--adapter", metavar="NAME", default=None,
              help="How --impl is called: refattn (fn(q, k, v, **params)), sdpa (PyTorch SDPA), "
                   "flex (flex_attention), flash (flash-attn, B,S,H,D), varlen (packed). "
                   "Default: refattn.")
@click.option("--framework", metavar="NAME", default=None,
              help="What --impl receives: numpy arrays, torch tensors (via DLPack) or jax arrays "
                   "(CPU, 64-bit mode on). Default: numpy.")
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
                   "the dtype recorded in the file (refattn.npzio.save), else the stored one; "
                   "required when the stored values also fit a narrower dtype.")
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
              help="Override the rule's atol (in units of max|reference|). Default: eps(dtype)/2, "
                   "e.g. 2**-8 for bf16 (or the variant's).")
@click.option("--timeout", metavar="SECONDS", default=None,
              help="Run --impl in a subprocess and stop it after SECONDS (exit 2). Default: none "
                   "(in this process, no limit).")
@click.option("--report", "report_path", metavar="OUT.md|OUT.html", default=None,
              help="Also write a report with the table, the error account and a heat map of the "
                   "error per (query, key block) (matplotlib). Default: none.")
@click.option("--distributed", is_flag=True, default=False,
              help="Run the backend under test as refattn.distributed Dask tasks (one per visible "
                   "query chunk x KV chunk), merged; the reference runs as usual.")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="With --distributed: a running Dask scheduler. Default: a LocalCluster.")
@click.option("--chunk", type=click.IntRange(1), default=128, show_default=True,
              help="With --distributed: tokens per query and KV chunk.")
@hf_options
@flex_option
@json_option
@one_line_errors
def command(variant, backend, against, case, shape, seed, params, inputs, impl_spec, adapter,
            framework, device, lse, backward, outputs, dtype, baseline, grad, factor, atol, timeout,
            report_path, as_json, hf_config=None, hf_layer=None, hf_seq=None, hf_tolerance=None,
            flex_spec=None, distributed=False, scheduler=None, chunk=128):
    """Compare a backend, a function (--impl) or saved outputs (--outputs) with the float64
    reference and print the errors and a verdict; on FAIL, the worst (b, h, i, j) and where the
    errors cluster. With --hf-config: one layer of a transformers model (refattn.cli.compare.hf).

    Exit status: 0 PASS, 1 FAIL, 2 usage or input error.
    """
    if hf_config is not None or hf_layer is not None or hf_seq is not None or hf_tolerance is not None:
        from .hf import hf_given, render_hf, run_hf
        if hf_config is None:
            raise ParameterError(f"{hf_given(hf_layer, hf_seq, hf_tolerance)[0]}: only with --hf-config")
        result = run_hf(hf_config, hf_layer, hf_seq, seed, hf_tolerance, grad,
                        dict(variant=variant, case=case, shape=shape, params=params, impl_spec=impl_spec,
                             outputs=outputs, dtype=dtype, backend=backend, adapter=adapter))
        click.echo(dumps(result) if as_json else render_hf(result))
        raise click.exceptions.Exit(EXIT_OK if result["verdict"] == "PASS" else EXIT_FAIL)
    if flex_spec is not None:
        from .flex import apply_flex
        variant, params = apply_flex(flex_spec, variant, params)
    oracle = oracle_options(impl=impl_spec, adapter=adapter, framework=framework, device=device,
                            lse=lse, backward=backward, outputs=outputs, dtype=dtype,
                            baseline=baseline, factor=factor, atol=atol, grad=grad,
                            report=report_path, backend=backend, against=against, case=case,
                            shape=shape, seed=seed, timeout=timeout)
    if scheduler is not None and not distributed:
        raise ParameterError(f"--scheduler: only with --distributed, got {scheduler!r}")
    if distributed:
        if oracle.kind != "backend":
            raise ParameterError("--distributed: expected a backend under test, not --impl/--outputs")
        oracle = dataclasses.replace(oracle, distributed=(scheduler, chunk))
    if against not in ("numpy", "golden"):
        backends.get(against)  # an unknown reference backend is a usage error before any work
    if backend is not None:
        backends.get(backend)
    if outputs is not None:
        if inputs is not None:
            raise ParameterError(f"--inputs: expected nothing with --outputs (the file holds the "
                                 f"inputs), got {inputs!r}")
        runs = [(None, problem_from_outputs(variant, outputs, params))]
    else:
        names = input_names(inputs, oracle, case, variant)
        runs = [(name, build_problem(variant, case, shape, seed, params, inputs=name,
                                     dtype=oracle.dtype)) for name in names]
    oracle = resolve_dtype(oracle, runs[0][1], dtype is not None)
    check_low_options(oracle, baseline=baseline, factor=factor, atol=atol, report=report_path)
    results = []
    for name, problem in runs:
        if oracle.kind == "impl":
            from refattn import impl
            impl.load(oracle.impl)  # a bad --impl string is reported before any work
            round_inputs(problem, oracle)
        results.append((name, compare(problem, backend, against, oracle)))
    result = battery_result(results)
    click.echo(dumps(result) if as_json else render(result))
    raise click.exceptions.Exit(EXIT_OK if result["verdict"] == "PASS" else EXIT_FAIL)


def input_names(inputs, o: Oracle, case, variant) -> list:
    """The input distributions to run (refattn.testing.inputs): ``--inputs NAME`` (or
    ``battery``); by default the battery for ``--impl`` on q, k, v variants, else ``normal``."""
    from refattn import variants
    from refattn.testing.inputs import BATTERY, DISTRIBUTIONS
    if inputs is not None:
        if case is not None:
            raise ParameterError(f"--inputs: expected nothing with --case (the golden case holds "
                                 f"the inputs), got {inputs!r}")
        if inputs not in DISTRIBUTIONS + ("battery",):
            raise ParameterError(f"--inputs: expected one of {', '.join(DISTRIBUTIONS)} or battery, "
                                 f"got {inputs!r}")
        if inputs != "normal" and variant is not None and not variants.get(variant).on_qkv:
            raise ParameterError(f"--inputs: the distributions make q, k, v; variant {variant!r} "
                                 f"takes {', '.join(variants.get(variant).inputs)}, got {inputs!r}")
        return list(BATTERY) if inputs == "battery" else [inputs]
    on_qkv = case is None and variant is not None and variants.get(variant).on_qkv
    return list(BATTERY) if o.kind == "impl" and on_qkv else ["normal"]


def battery_result(results) -> dict:
    """One result for the runs of several input distributions: the first failing run (else the
    first inconclusive, else the first) in full, with ``inputs`` naming its distribution and
    ``battery`` summarising every run; the verdict is FAIL if any failed."""
    from refattn import numerics
    verdicts = [r["verdict"] for _, r in results]
    overall = numerics.overall(verdicts)
    shown = next(((n, r) for n, r in results if r["verdict"] == overall), results[0])
    result = dict(shown[1], inputs=shown[0], verdict=overall)
    if len(results) > 1:
        result["battery"] = [{"inputs": n, "verdict": r["verdict"],
                              "max_abs": r["arrays"].get("out", {}).get("max_abs"),
                              "allowed": r["arrays"].get("out", {}).get("allowed")}
                             for n, r in results]
    return result

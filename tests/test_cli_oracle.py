"""``refattn compare --impl / --outputs / --dtype / --grad / --report`` through click's CliRunner.

Expected values come from the definitions, not from refattn: inputs are re-drawn here from numpy's
``default_rng(seed)`` (the documented order q, k, v) and rounded with ml_dtypes; the float64
reference is a dense softmax written in ``tests/oracle_kernels.py``; where a bug is, is known by
construction. Journeys 2 and 3 of JOURNEYS.md run with their command lines as written.
"""

from __future__ import annotations

import html
import json
import math
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from refattn.cli.main import cli

import oracle_kernels as ok
import test_demonstrations as demo

BF16_ATOL = 2.0 ** -8  # eps(bf16) / 2, the documented default atol


def run(*args):
    return CliRunner().invoke(cli, ["compare", *args], catch_exceptions=False)


def run_json(*args):
    result = run("--json", *args)
    assert result.exit_code in (0, 1), (result.output, result.stderr)
    text = result.output
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    return result.exit_code, data


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err, (needle, err)


def made_inputs(seed, b, h, s, d, dtype=None):
    """q, k, v as ``refattn compare`` makes them (default_rng(seed), q then k then v), rounded to
    ``dtype`` with ml_dtypes."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, h, s, d)) for _ in range(3))
    if dtype is not None:
        q, k, v = (a.astype(dtype).astype(np.float64) for a in (q, k, v))
    return q, k, v


# -- a correct implementation passes; the numbers are the definition's ---------------------------------
def test_correct_bf16_impl_passes_with_the_documented_rule():
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,24,16", "--seed", "3",
                          "--impl", "oracle_kernels:good_f32", "--dtype", "bf16",
                          "--param", "causal=true")
    assert code == 0 and data["verdict"] == "PASS"
    m = data["arrays"]["out"]
    q, k, v = made_inputs(3, 1, 2, 24, 16, ml_dtypes.bfloat16)
    got = ok.good_f32(q, k, v, causal=True)
    want = ok.dense(q, k, v, causal=True)
    assert m["max_abs"] == pytest.approx(float(np.abs(got - want).max()), rel=1e-6)
    assert data["factor"] == 2.0 and data["atol"] == BF16_ATOL and data["dtype"] == "bf16"
    assert m["baseline_max_abs"] > 0  # rounding P and the output to bf16 costs something
    assert m["reference_max"] == pytest.approx(float(np.abs(want).max()), rel=1e-12)
    # atol is in units of the reference's largest magnitude
    assert m["allowed"] == pytest.approx(2 * m["baseline_max_abs"] + BF16_ATOL * m["reference_max"],
                                         rel=1e-12)
    assert m["max_abs"] <= m["allowed"] and m["mismatches"] == 0 and m["pass"]
    assert data["under_test"] == {"kind": "impl", "name": "oracle_kernels:good_f32",
                                  "adapter": "refattn", "framework": "numpy", "device": None,
                                  "lse": False, "backward": None, "mutated": []}
    assert data["analysis"] is None and data["baseline"] == "same_precision"


def test_factor_and_atol_overrides_decide_the_verdict():
    args = ["--variant", "sdpa", "--shape", "1,2,24,16", "--impl", "oracle_kernels:good_f32",
            "--dtype", "bf16"]
    code, data = run_json(*args, "--factor", "0", "--atol", "0")
    m = data["arrays"]["out"]
    assert data["factor"] == 0.0 and data["atol"] == 0.0 and m["allowed"] == 0.0
    assert code == 1 and m["max_abs"] > 0 and m["mismatches"] > 0
    code, data = run_json(*args, "--factor", "0", "--atol", "0.5")
    m = data["arrays"]["out"]
    assert code == 0 and m["allowed"] == 0.5 * m["reference_max"]
    # an allowance as large as the values themselves would pass zeros: INCONCLUSIVE, exit 1
    code, data = run_json(*args, "--factor", "0", "--atol", "1")
    m = data["arrays"]["out"]
    assert code == 1 and data["verdict"] == "INCONCLUSIVE" and m["status"] == "INCONCLUSIVE"
    assert "an output of zeros would pass" in m["reason"]


def test_a_variants_verdict_declaration_sets_the_defaults(monkeypatch):
    import dataclasses
    from refattn import variants
    declared = dataclasses.replace(variants.get("sdpa"), name="declaring_cli_variant", aliases=(),
                                   verdict={"factor": 3, "atol": {"bf16": 0.125}})
    monkeypatch.setitem(variants._REGISTRY, "declaring_cli_variant", declared)
    args = ["--variant", "declaring_cli_variant", "--shape", "1,1,8,8", "--impl",
            "oracle_kernels:good_f32", "--dtype", "bf16"]
    code, data = run_json(*args)
    assert (data["factor"], data["atol"]) == (3.0, 0.125)
    m = data["arrays"]["out"]
    assert m["allowed"] == pytest.approx(3 * m["baseline_max_abs"] + 0.125 * m["reference_max"],
                                         rel=1e-12)
    code, data = run_json(*args, "--atol", "0.5")  # the option overrides the declaration
    assert (data["factor"], data["atol"]) == (3.0, 0.5)


def test_fp16_kernel_with_a_wrong_scale_fails():
    result = run("--variant", "sdpa", "--shape", "1,2,32,16", "--impl",
                 "oracle_kernels:scaled_wrong_f16", "--dtype", "fp16")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith("FAIL: max|test - float64| <= 2 * "
                                                     "max|fp16 baseline - float64|")


def test_flash_adapter_passes_bshd_arrays():
    code, data = run_json("--variant", "sdpa", "--shape", "2,2,20,16", "--impl",
                          "oracle_kernels:good_bf16_flash", "--adapter", "flash", "--dtype", "bf16",
                          "--param", "causal=true", "--param", "window=5,0")
    assert code == 0 and data["arrays"]["out"]["shape"] == [2, 2, 20, 16]


# -- the three deliberately wrong implementations ----------------------------------------------------------
def test_tile_max_bug_fails_and_points_at_a_tile_below_the_running_max():
    """The bug over-weights every key tile whose max is below the running max. The worst row must
    be one where that happens, and the key block named must be such a tile -- or, when several
    tiles are over-weighted, the one block whose *relative* weight is then wrong: the complement
    of the over-weighted tiles (re-weighting it alone explains the same error)."""
    code, data = run_json("--variant", "sdpa", "--shape", "2,2,48,16", "--seed", "1",
                          "--impl", "oracle_kernels:flash_tile_max_bug", "--dtype", "bf16")
    assert code == 1 and data["verdict"] == "FAIL"
    worst = data["analysis"]["worst"]
    b, h, i, j = worst["index"]
    q, k, _ = made_inputs(1, 2, 2, 48, 16, ml_dtypes.bfloat16)
    tiles, running = demo.tile_maxima(q, k)  # (B, H, Sq, tiles)
    below = tiles < running  # where the bug mis-weights a tile
    assert below[b, h, i].any()
    j0, j1 = worst["block_keys"]
    assert j1 == j0 + demo.BLOCK - 1 and j0 % demo.BLOCK == 0 and j0 <= j <= j1
    named = np.arange(below.shape[-1]) == j0 // demo.BLOCK
    assert np.array_equal(named, below[b, h, i]) or np.array_equal(~named, below[b, h, i])
    failing = int(data["analysis"]["lines"][0].split()[0])  # "N of M rows (b, h, i) exceed ..."
    assert 0 < failing <= int(below.any(-1).sum())  # rows the bug cannot touch pass


def test_window_off_by_one_fails_and_points_at_the_left_edge():
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,80,16", "--impl",
                          "oracle_kernels:window_off_by_one", "--dtype", "bf16",
                          "--param", "window=8,0")
    assert code == 1
    b, h, i, j = data["analysis"]["worst"]["index"]
    assert j == i - 8 - 1
    assert data["analysis"]["worst"]["relation"] == "one key left of the window's left edge"
    table = run("--variant", "sdpa", "--shape", "1,2,80,16", "--impl",
                "oracle_kernels:window_off_by_one", "--dtype", "bf16", "--param", "window=8,0")
    assert f"worst (b, h, i, j) = ({b}, {h}, {i}, {j})" in table.output
    assert "lies one key left of the window's left edge" in table.output
    assert table.output.splitlines()[-1].startswith("FAIL")


def test_global_key_counted_twice_fails_and_points_at_the_column():
    code, data = run_json("--variant", "hybrid", "--shape", "2,2,64,16", "--seed", "3",
                          "--param", "local=4,4", "--param", "tokens=5", "--impl",
                          "oracle_kernels:hybrid_global_twice", "--dtype", "bf16")
    assert code == 1
    b, h, i, j = data["analysis"]["worst"]["index"]
    assert j == demo.GLOBAL and 0 < abs(i - demo.GLOBAL) <= demo.RADIUS
    assert f"key column j = {demo.GLOBAL} explains the error" in " ".join(
        data["analysis"]["lines"])


# -- PyTorch SDPA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_torch_sdpa_passes(dtype):
    pytest.importorskip("torch", reason="--framework torch needs PyTorch (the peers extra)")
    code, data = run_json("--variant", "sdpa", "--shape", "1,4,40,48,32,2", "--impl",
                          "torch.nn.functional:scaled_dot_product_attention", "--adapter", "sdpa",
                          "--framework", "torch", "--dtype", dtype, "--param", "causal=true")
    assert code == 0, data["arrays"]
    assert data["arrays"]["out"]["max_abs"] > 0  # it really ran in low precision


def test_torch_sdpa_gradients():
    pytest.importorskip("torch", reason="--framework torch needs PyTorch (the peers extra)")
    # standard normal inputs: on the battery's outlier inputs torch's fp16 CPU backward (scores and
    # probabilities kept in fp16 between its steps) exceeds the rule for dq by about 5% (0.0203
    # against 0.0193 here) -- a real precision difference from a flash-style kernel, not this test's
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,24,16", "--impl",
                          "torch.nn.functional:scaled_dot_product_attention", "--adapter", "sdpa",
                          "--framework", "torch", "--dtype", "fp16", "--grad", "--inputs", "normal")
    assert code == 0 and data["grad"]
    assert set(data["arrays"]) == {"out", "dq", "dk", "dv"}
    assert data["arrays"]["dk"]["axes"] == "b,h,j,d"
    assert all(m["max_abs"] > 0 for m in data["arrays"].values())


# -- JAX ---------------------------------------------------------------------------------------------------
JAX_KERNELS = """
import jax.numpy as jnp


def attn(q, k, v, causal=False, scale=None, wrong_scale=False, **_):
    d = q.shape[-1]
    scale = (1 / d if wrong_scale else d ** -0.5) if scale is None else scale
    s = scale * (q @ jnp.swapaxes(k, -1, -2))
    if causal:
        sq, sk = s.shape[-2:]
        s = jnp.where(jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq), s, -jnp.inf)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def wrong(q, k, v, **kw):
    return attn(q, k, v, wrong_scale=True, **kw)
"""


def test_jax_impl_forward_gradients_and_a_wrong_scale(tmp_path, monkeypatch):
    pytest.importorskip("jax", reason="--framework jax needs JAX (the peers extra)")
    (tmp_path / "jax_kernels.py").write_text(JAX_KERNELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "jax_kernels", raising=False)
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,24,40,16,2", "--impl",
                          "jax_kernels:attn", "--framework", "jax", "--param", "causal=true", "--grad")
    assert code == 0 and data["under_test"]["framework"] == "jax"
    assert set(data["arrays"]) == {"out", "dq", "dk", "dv"}
    assert all(m["normwise_rel"] < 1e-14 for m in data["arrays"].values())  # float64 all the way
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,24,40,16,2", "--impl",
                          "jax_kernels:wrong", "--framework", "jax", "--dtype", "bf16")
    assert code == 1 and data["verdict"] == "FAIL"


# -- --grad with a numpy backward ------------------------------------------------------------------------
def test_grad_numpy_backward_pass_and_a_wrong_dk():
    args = ["--variant", "sdpa", "--shape", "1,2,12,8", "--impl", "oracle_kernels:forward",
            "--grad"]
    code, data = run_json(*args, "--backward", "oracle_kernels:backward")
    assert code == 0 and set(data["arrays"]) == {"out", "dq", "dk", "dv"}
    assert all(m["normwise_rel"] < 1e-13 for m in data["arrays"].values())
    code, data = run_json(*args, "--backward", "oracle_kernels:backward_wrong_dk")
    assert code == 1
    verdicts = {n: m["pass"] for n, m in data["arrays"].items()}
    assert verdicts == {"out": True, "dq": True, "dk": False, "dv": True}
    # the unscaled dk is sqrt(D) = sqrt(8) times the right one
    m = data["arrays"]["dk"]
    assert m["worst_actual"] == pytest.approx(math.sqrt(8) * m["worst_expected"], rel=1e-10)


def test_grad_of_a_backend():
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,10,8", "--backend", "numpy",
                          "--grad")
    assert code == 0 and set(data["arrays"]) == {"out", "lse", "dq", "dk", "dv"}


# -- --outputs ----------------------------------------------------------------------------------------------
def _saved(path, dtype=np.float16, perturb=None, **extra):
    """q, k, v in ``dtype`` and the output of a correct kernel run in it (causal)."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 2, 32, 16)).astype(dtype) for _ in range(3))
    out = ok.dense(q, k, v, causal=True, dtype=np.float32).astype(dtype)
    if perturb is not None:
        out[perturb] += 0.25
    np.savez(path, q=q, k=k, v=v, out=out, **extra)
    return q, k, v, out


def test_journey_3_saved_outputs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _saved(tmp_path / "run.npz")
    result = run("--outputs", "run.npz", "--variant", "sdpa", "--param", "causal=true")
    assert result.exit_code == 0, result.output
    assert "dtype fp16 (the dtype of the saved out" in result.output
    assert result.output.splitlines()[-1].startswith("PASS")
    code, data = run_json("--outputs", "run.npz", "--variant", "sdpa", "--param", "causal=true")
    assert data["dtype"] == "fp16" and data["dtype_inferred"]
    assert data["under_test"]["kind"] == "outputs" and data["under_test"]["name"] == "run.npz"
    assert data["shape"] == [2, 2, 32, 32, 16, 2] and data["seed"] is None


def test_saved_outputs_fail_at_the_perturbed_entry(tmp_path):
    path = tmp_path / "run.npz"
    q, k, v, out = _saved(path, perturb=(1, 0, 17, 3))
    code, data = run_json("--outputs", str(path), "--variant", "sdpa", "--param", "causal=true",
                          "--dtype", "fp16")
    assert code == 1
    m = data["arrays"]["out"]
    assert m["worst_index"] == [1, 0, 17, 3] and m["mismatches"] == 1
    want = ok.dense(q, k, v, causal=True)[1, 0, 17, 3]
    assert m["worst_expected"] == pytest.approx(want, rel=1e-12)
    assert m["worst_actual"] == float(out[1, 0, 17, 3])
    assert data["analysis"]["lines"][0] == "1 of 128 rows (b, h, i) exceed the allowed error " \
        f"{m['allowed']:.3g}"


def test_saved_float64_outputs_use_the_float64_rule(tmp_path):
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 9, 8)) for _ in range(3))
    np.savez(tmp_path / "r.npz", q=q, k=k, v=v, out=ok.dense(q, k, v, window=(2, 1)))
    code, data = run_json("--outputs", str(tmp_path / "r.npz"), "--variant", "sdpa",
                          "--param", "window=2,1")
    assert code == 0 and data["dtype"] == "fp64" and data["tolerance"] == 1e-12
    assert data["arrays"]["out"]["normwise_rel"] < 1e-14


def test_saved_packed_batch(tmp_path):
    rng = np.random.default_rng(9)
    lens_q, lens_k = [3, 5], [4, 6]
    q = rng.standard_normal((8, 2, 8)).astype(np.float16)
    k, v = (rng.standard_normal((10, 2, 8)).astype(np.float16) for _ in range(2))
    outs, cq, ck = [], np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    for n in range(2):  # each sequence on its own, causal bottom-right within the sequence
        t = lambda a, c: np.swapaxes(a[c[n]:c[n + 1]], 0, 1)[None]
        o = ok.dense(t(q, cq), t(k, ck), t(v, ck), causal=True, dtype=np.float32)
        outs.append(np.swapaxes(o[0], 0, 1))
    np.savez(tmp_path / "p.npz", q=q, k=k, v=v, out=np.concatenate(outs).astype(np.float16),
             cu_seqlens_q=cq.astype(np.int32), cu_seqlens_k=ck.astype(np.int32))
    code, data = run_json("--outputs", str(tmp_path / "p.npz"), "--variant", "sdpa",
                          "--param", "causal=true")
    assert code == 0 and data["shape"] is None and data["arrays"]["out"]["axes"] == "t,h,d"


@pytest.mark.parametrize("arrays, needles", [
    (lambda a: {n: a[n] for n in ("q", "k", "out")}, ["bad.npz", "missing key 'v'"]),
    (lambda a: {**a, "out": a["out"][:, :, :5]}, ["bad.npz", "key 'out'", "(2, 2, 5, 16)"]),
    (lambda a: {**a, "q": np.array([object()] * 3, dtype=object)},
     ["bad.npz", "key 'q'", "pickled"]),
    (lambda a: {**a, "outt": a["out"]}, ["bad.npz", "unknown key 'outt'"]),
])
def test_bad_npz_files_are_one_line(tmp_path, arrays, needles):
    rng = np.random.default_rng(0)
    good = {n: rng.standard_normal((2, 2, 8, 16)) for n in ("q", "k", "v", "out")}
    np.savez(tmp_path / "bad.npz", **arrays(good))
    assert_one_line_error(run("--outputs", str(tmp_path / "bad.npz"), "--variant", "sdpa"),
                          *needles)


def test_not_an_npz_and_no_file(tmp_path):
    (tmp_path / "bad.npz").write_text("not a zip")
    assert_one_line_error(run("--outputs", str(tmp_path / "bad.npz"), "--variant", "sdpa"),
                          "bad.npz", "not a readable .npz")
    assert_one_line_error(run("--outputs", str(tmp_path / "none.npz"), "--variant", "sdpa"),
                          "none.npz: no such file")


def test_saved_gradients(tmp_path):
    rng = np.random.default_rng(10)
    q, k, v, dout = (rng.standard_normal((1, 2, 6, 8)) for _ in range(4))
    dq, dk, dv = ok.backward(q, k, v, dout)
    np.savez(tmp_path / "g.npz", q=q, k=k, v=v, out=ok.dense(q, k, v), dout=dout, dq=dq, dk=dk,
             dv=dv)
    code, data = run_json("--outputs", str(tmp_path / "g.npz"), "--variant", "sdpa", "--grad")
    assert code == 0 and set(data["arrays"]) == {"out", "dq", "dk", "dv"}
    code, data = run_json("--outputs", str(tmp_path / "g.npz"), "--variant", "sdpa")
    assert set(data["arrays"]) == {"out"}  # gradients only with --grad


# -- journey 2, as written ----------------------------------------------------------------------------------
MY_KERNELS = '''
import numpy as np

def my_attn(q, k, v, causal=True, window=(128, 0)):
    """float32, bottom-right aligned sliding window{note}"""
    q, k, v = (np.asarray(a, np.float32) for a in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    rel = np.arange(sk)[None] - (np.arange(sq)[:, None] + sk - sq)
    keep = (rel >= -window[0]{bug}) & (rel <= window[1])
    if causal:
        keep &= rel <= 0
    s = np.where(keep, (q @ np.swapaxes(k, -1, -2)) / np.float32(np.sqrt(q.shape[-1])), -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v
'''


@pytest.mark.parametrize("bug", [False, True])
def test_journey_2_my_kernel_as_written(tmp_path, monkeypatch, bug):
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "kernels.py").write_text(
        MY_KERNELS.format(bug=" - 1" if bug else "", note=": BUG one key too many" if bug else ""))
    monkeypatch.chdir(tmp_path)
    for name in ("my_pkg", "my_pkg.kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    args = "--variant sliding_window --impl my_pkg.kernels:my_attn --dtype bf16 --param window=128,0"
    result = run(*args.split())
    lines = result.output.splitlines()
    assert "dtype bf16; baseline same_precision" in result.output
    out_row = next(line.split() for line in lines if line.startswith("out "))
    assert out_row[0] == "out" and out_row[-1] == ("FAIL" if bug else "PASS")
    if not bug:
        assert result.exit_code == 0 and lines[-1].startswith("PASS")
        return
    assert result.exit_code == 1 and lines[-1].startswith("FAIL")
    worst = next(line for line in lines if line.startswith("worst (b, h, i, j) = "))
    i, j = (int(x) for x in worst.split("(")[2].split(")")[0].split(", ")[2:])
    assert j == i - 128 - 1 and "one key left of the window's left edge" in worst
    assert any("rows (b, h, i) exceed the allowed error" in line for line in lines)


# -- --report ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".md", ".html"])
def test_report_files(tmp_path, ext):
    pytest.importorskip("matplotlib", reason="the heat map needs matplotlib (the plot extra)")
    path = tmp_path / ("r" + ext)
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,40,8", "--impl",
                          "oracle_kernels:window_off_by_one", "--dtype", "bf16", "--param",
                          "window=4,0", "--report", str(path))
    assert code == 1
    text = html.unescape(path.read_text())
    assert "Verdict: FAIL" in text and "worst (b, h, i, j)" in text
    assert "one key left of the window's left edge" in text and "dtype" in text
    if ext == ".md":
        png = tmp_path / "r_heatmap.png"
        assert data["report"] == [str(path), str(png)] and png.read_bytes()[:4] == b"\x89PNG"
        assert "| out | FAIL |" in text
    else:
        assert data["report"] == [str(path)] and "data:image/png;base64," in text


def test_report_on_pass_and_its_mention_in_the_table(tmp_path):
    path = tmp_path / "ok.md"
    result = run("--variant", "sdpa", "--shape", "1,1,8,8", "--impl", "oracle_kernels:good_f32",
                 "--dtype", "fp16", "--report", str(path))
    assert result.exit_code == 0 and f"report: {path}" in result.output
    assert "Verdict: PASS" in path.read_text()


# -- --json: strict, and the documented keys ------------------------------------------------------------------
def test_json_schema_keys_and_strict_numbers():
    code, data = run_json("--variant", "sdpa", "--shape", "1,2,6,8", "--impl",
                          "oracle_kernels:nan_row", "--dtype", "fp32")
    assert code == 1
    assert set(data) >= {"refattn", "variant", "case", "golden_file", "shape", "seed", "params",
                         "under_test", "reference", "dtype", "dtype_inferred", "baseline",
                         "factor", "atol", "tolerance", "rule", "grad", "arrays", "verdict",
                         "analysis", "report", "seconds"}
    assert set(data["seconds"]) == {"under_test", "reference", "baseline"}
    m = data["arrays"]["out"]
    assert set(m) >= {"shape", "axes", "max_abs", "max_rel", "normwise_rel", "worst_index",
                      "worst_actual", "worst_expected", "nan", "inf", "nonfinite_mismatch", "pass",
                      "dtype", "baseline_max_abs", "factor", "atol", "allowed", "max_ulp",
                      "mismatches"}
    assert m["worst_index"] == [0, 1, 2, 3] and m["worst_actual"] == "nan"
    assert m["nan"] == [1, 0] and m["nonfinite_mismatch"] == 1 and m["max_ulp"] == "inf"
    assert "rows contain NaN" in " ".join(data["analysis"]["lines"])
    code, data = run_json("--variant", "sdpa", "--shape", "1,1,4,4", "--backend", "numpy")
    assert data["dtype"] == "fp64" and data["baseline"] is None and data["factor"] is None
    assert data["analysis"] is None and data["grad"] is False


# -- every user mistake: exit 2, one line ------------------------------------------------------------------
BROKEN = '''
def boom(q, k, v, **params):
    raise RuntimeError("kernel launch failed\\nat line 2")
def nothing(q, k, v, **params):
    return None
NOT_CALLABLE = 3
'''


@pytest.mark.parametrize("args, needles", [
    (["--impl", "no_colon"], ["impl: expected 'module:function'", "'no_colon'"]),
    (["--impl", "no_such_module_xyz:f"], ["impl: cannot import module 'no_such_module_xyz'"]),
    (["--impl", "cli_broken_kernels:missing"], ["has no attribute 'missing'"]),
    (["--impl", "cli_broken_kernels:NOT_CALLABLE"], ["expected a callable"]),
    (["--impl", "cli_broken_kernels:boom"], ["impl: boom raised RuntimeError: kernel launch failed "
                                             "at line 2"]),
    (["--impl", "cli_broken_kernels:nothing"], ["returned None"]),
    (["--impl", "x:f", "--outputs", "r.npz"], ["--impl", "either --impl or --outputs"]),
    (["--impl", "x:f", "--backend", "numpy"], ["--backend", "nothing with --impl"]),
    (["--impl", "x:f", "--against", "golden"], ["--against", "'numpy'"]),
    (["--dtype", "bf16"], ["--dtype", "--impl or --outputs", "'bf16'"]),
    (["--impl", "x:f", "--dtype", "bf17"], ["--dtype", "fp8_e4m3", "'bf17'"]),
    (["--impl", "x:f", "--adapter", "jax"], ["--adapter", "flash", "'jax'"]),
    (["--impl", "x:f", "--framework", "mxnet"], ["--framework", "torch", "jax", "'mxnet'"]),
    (["--impl", "x:f", "--device", "cuda"], ["--device", "--framework torch", "'cuda'"]),
    (["--adapter", "sdpa"], ["--adapter: applies to --impl"]),
    (["--impl", "x:f", "--dtype", "bf16", "--factor", "x"], ["--factor", "'x'"]),
    (["--impl", "x:f", "--dtype", "bf16", "--atol", "-1"], ["--atol", "'-1'"]),
    (["--impl", "x:f", "--factor", "3"], ["--factor", "low-precision --dtype", "'3'"]),
    (["--impl", "x:f", "--dtype", "bf16", "--baseline", "exact"], ["--baseline", "'exact'"]),
    (["--impl", "x:f", "--dtype", "bf16", "--report", "r.txt"], ["--report", ".md or .html"]),
    (["--impl", "x:f", "--grad"], ["--grad", "--backward"]),
    (["--impl", "x:f", "--backward", "y:g"], ["--backward: applies with --grad"]),
    (["--impl", "x:f", "--framework", "torch", "--grad", "--backward", "y:g"],
     ["--backward", "--framework numpy"]),
    # a variant not on q, k, v takes --impl as fn(**inputs, **params) (cli/compare/named.py); an
    # attention adapter for it is a usage error naming its inputs
    (["--variant", "t5", "--impl", "cli_broken_kernels:boom", "--adapter", "sdpa"],
     ["--adapter sdpa", "'t5'", "table"]),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, args, needles):
    (tmp_path / "cli_broken_kernels.py").write_text(BROKEN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cli_broken_kernels", raising=False)
    full = (["--variant", "sdpa"] if "--variant" not in args else []) + ["--shape", "1,1,4,4"]
    assert_one_line_error(run(*full, *args), *needles)


@pytest.mark.parametrize("args, needles", [
    (["--shape", "1,2,3,4"], ["--shape", "nothing with --outputs"]),
    (["--param", "sinks=random"], ["--param sinks", "from the file"]),
    (["--grad"], ["--grad", "holds no dq, dk, dv"]),
    (["--report", "r.md"], ["--report", "inferred from r.npz is fp64"]),
])
def test_outputs_mistakes_exit_2_with_one_line(tmp_path, args, needles):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 4, 8)) for _ in range(3))
    np.savez(tmp_path / "r.npz", q=q, k=k, v=v, out=ok.dense(q, k, v))
    assert_one_line_error(run("--variant", "sdpa", "--outputs", str(tmp_path / "r.npz"), *args),
                          *needles)

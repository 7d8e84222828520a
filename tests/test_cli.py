"""The CLI (``refattn list`` and ``refattn compare``) through click's CliRunner.

Expected values come from the definitions (the registry's dataclasses, shapes, numpy's generator,
the empty-row count of a bottom-right causal mask), never from the command's own output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from refattn import golden
from refattn.cli.compare import problem as problem_mod, run as run_mod
from refattn.cli.main import cli
from refattn.cli.options import Made, parse_params
from refattn.variants.core import CoreParams

import refattn.variants as variants


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err, (needle, err)


# -- list -------------------------------------------------------------------------------------------
def test_list_table_shows_every_core_variant():
    result = run("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["variant", "family", "backends", "tolerance", "description"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    for name in ("sdpa", "mha", "mqa", "gqa", "flash"):
        assert rows[name][1] == "core"
        assert "numpy" in rows[name][2].split(",")
        assert float(rows[name][3]) == variants.get(name).tolerance


def test_list_json_is_the_registry():
    result = run("list", "--json", "--family", "core")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    by_name = {v["name"]: v for v in data["variants"]}
    assert set(by_name) == {"sdpa", "mha", "mqa", "gqa", "flash", "flex"}
    sdpa = by_name["sdpa"]
    assert sdpa["family"] == "core" and sdpa["inputs"] == ["q", "k", "v"] and sdpa["has_backward"]
    fields = dataclasses.fields(CoreParams)
    assert [p["name"] for p in sdpa["parameters"]] == [f.name for f in fields]
    params = {p["name"]: p for p in sdpa["parameters"]}
    assert params["window"]["default"] is None and params["dropout_p"]["default"] == 0.0
    assert params["layout"]["default"] == "bhsd" and params["causal"]["default"] is False
    assert all(p["help"] for p in sdpa["parameters"])
    assert [p["name"] for p in by_name["flash"]["parameters"]][-2:] == ["block_q", "block_k"]


def test_list_family_shows_parameters_and_rejects_unknown_family():
    result = run("list", "--family", "core")
    assert result.exit_code == 0 and "sdpa inputs: q (B, Hq, Sq, D)" in result.output
    assert "dropout_seed" in result.output
    sparse = run("list", "--family", "sparse").output
    # own parameters with help, the shared core knobs on one line, and no knob a variant drops
    assert "bigbird inputs:" in sparse and "block_size               64" in sparse
    bigbird = sparse[sparse.index("bigbird inputs:"):sparse.index("block_sparse inputs:")]
    assert "core knobs (as sdpa): scale, causal, window" in bigbird and "alignment" not in bigbird
    assert len(sparse.splitlines()) < 200
    assert_one_line_error(run("list", "--family", "nosuch"), "--family", "core", "nosuch")


# -- --param parsing --------------------------------------------------------------------------------
def test_param_values_are_parsed_by_the_field_type():
    var = variants.get("sdpa")
    got = parse_params(var, ["causal=true", "window=128,0", "scale=0.5", "dropout_seed=3",
                             "lse_base=2", "return_lse=false", "alignment=top_left", "softcap=none",
                             "sinks=random", "alibi_slopes=alibi"], {"sinks", "alibi_slopes"})
    assert got["causal"] is True and got["window"] == (128, 0) and got["scale"] == 0.5
    assert got["dropout_seed"] == 3 and isinstance(got["dropout_seed"], int)
    assert got["lse_base"] == 2 and got["return_lse"] is False and got["alignment"] == "top_left"
    assert got["softcap"] is None
    assert got["sinks"] == Made("random") and got["alibi_slopes"] == Made("alibi")
    assert parse_params(var, ["causal=top_left"], set())["causal"] == "top_left"
    assert parse_params(var, ["window=-1,0"], set())["window"] == (-1, 0)


# -- compare ------------------------------------------------------------------------------------------
def compare_json(*args):
    result = run("compare", "--json", *args)
    assert result.exit_code in (0, 1), (result.output, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def test_compare_sdpa_prints_a_pass_table():
    result = run("compare", "--variant", "sdpa", "--backend", "numpy", "--shape", "1,2,16,8")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1].startswith("PASS")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["out"], ["lse"])}
    assert rows["out"][-1] == "PASS" and rows["lse"][-1] == "PASS"


@pytest.mark.parametrize("params", [
    ["causal=true"], ["causal=top_left", "window=2,1"], ["softcap=5", "alibi_slopes=alibi"],
    ["sinks=random", "bias=random"], ["dropout_p=0.2", "dropout_seed=9"], ["mask=random"],
    ["head_map=random"], ["layout=bshd", "lse_base=2"],
])
def test_compare_sdpa_passes_with_params(params):
    code, data = compare_json("--variant", "sdpa", "--shape", "2,4,12,9,8,2", "--seed", "5",
                              *sum((["--param", p] for p in params), []))
    assert code == 0 and data["verdict"] == "PASS"
    layout_bshd = "layout=bshd" in params
    assert data["arrays"]["out"]["shape"] == ([2, 12, 4, 8] if layout_bshd else [2, 4, 12, 8])
    assert data["arrays"]["lse"]["shape"] == [2, 4, 12]
    for name in params:
        assert name.split("=")[0] in data["params"]


def test_compare_four_number_shape():
    code, data = compare_json("--variant", "sdpa", "--shape", "2,3,5,4")
    assert data["shape"] == [2, 3, 5, 5, 4, 3] and data["arrays"]["out"]["shape"] == [2, 3, 5, 4]
    code, data = compare_json("--variant", "mqa", "--shape", "2,3,5,4")
    assert code == 0 and data["shape"] == [2, 3, 5, 5, 4, 1]


def test_compare_params_reach_the_computation():
    # bottom-right causal with Sq = 9 > Sk = 5: the first 4 rows of every (b, h) see no key
    code, data = compare_json("--variant", "sdpa", "--shape", "2,3,9,5,4,3", "--param", "causal=true")
    assert code == 0
    assert data["arrays"]["lse"]["inf"] == [2 * 3 * 4, 2 * 3 * 4]
    code, data = compare_json("--variant", "sdpa", "--shape", "2,3,9,5,4,3", "--param", "causal=true",
                              "--param", "empty_row=nan")
    assert data["arrays"]["out"]["nan"] == [2 * 3 * 4 * 4] * 2


def test_compare_made_inputs_follow_the_seed():
    """Inputs are numpy's default_rng(seed) draws: q, k, v, then the made arrays in name order."""
    seen = {}
    real = run_mod.run_backend

    def spy(problem, name, label, *args, **kw):
        seen.update(problem.inputs, **{k: v for k, v in problem.params.items()})
        return real(problem, name, label, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "run_backend", spy)
        code, _ = compare_json("--variant", "sdpa", "--shape", "1,2,3,4,5,2", "--seed", "11",
                               "--param", "sinks=random", "--param", "bias=random")
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 3, 5), (1, 2, 4, 5), (1, 2, 4, 5)))
    bias, sinks = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal(2)
    for name, want in dict(q=q, k=k, v=v, bias=bias, sinks=sinks).items():
        np.testing.assert_array_equal(seen[name], want)


def test_compare_against_golden_case():
    code, data = compare_json("--case", "core_sinks", "--against", "golden")
    assert code == 0 and data["verdict"] == "PASS" and data["case"] == "core_sinks"
    assert data["reference"]["kind"] == "golden"
    assert set(data) >= {"refattn", "variant", "case", "golden_file", "shape", "seed", "params",
                         "under_test", "reference", "tolerance", "rule", "arrays", "verdict",
                         "seconds"}
    assert set(data["arrays"]["out"]) >= {"shape", "axes", "max_abs", "max_rel", "normwise_rel",
                                          "worst_index", "worst_actual", "worst_expected", "nan",
                                          "inf", "nonfinite_mismatch", "pass"}
    assert data["golden_file"].endswith("core_sinks.npz")
    result = run("compare", "--variant", "sdpa", "--case", "core_causal_br_sq_gt_sk",
                 "--against", "golden")
    assert result.exit_code == 0 and result.output.splitlines()[-1].startswith("PASS")


def test_compare_fails_with_exit_1_and_points_at_the_worst_index(tmp_path, monkeypatch):
    """A golden output nudged at one entry: FAIL, exit 1, the worst index is that entry."""
    shutil.copytree(str(golden.directory()), tmp_path / "g")
    monkeypatch.setattr(golden, "_DIRECTORY", tmp_path / "g")
    path = tmp_path / "g" / "core_plain.npz"
    arrays = golden.read_npz(path.read_bytes(), "core_plain.npz")
    arrays["output.out"][1, 2, 3, 4] += 1e-6
    data = golden.npz_bytes(arrays)
    path.write_bytes(data)
    manifest = golden.read_manifest()
    manifest["core_plain"]["sha256"] = golden.sha256(data)
    golden.write_manifest(manifest, tmp_path / "g")
    code, out = compare_json("--case", "core_plain", "--against", "golden", "--backend", "numpy")
    assert code == 1 and out["verdict"] == "FAIL"
    m = out["arrays"]["out"]
    assert m["worst_index"] == [1, 2, 3, 4] and m["axes"] == "b,h,i,d" and not m["pass"]
    assert m["max_abs"] == pytest.approx(1e-6, rel=1e-6)
    assert out["arrays"]["lse"]["pass"]
    table = run("compare", "--case", "core_plain", "--against", "golden")
    assert table.exit_code == 1 and table.output.splitlines()[-1].startswith("FAIL")
    assert "(b,h,i,d) = (1, 2, 3, 4)" in table.output


def test_compare_shows_a_progress_bar_on_long_runs(monkeypatch):
    monkeypatch.setattr(run_mod, "PROGRESS_SCORES", 0)
    result = run("compare", "--variant", "sdpa", "--shape", "1,1,8,4", "--backend", "numpy")
    assert result.exit_code == 0
    assert "numpy (reference)" in result.stderr and "numpy (reference)" not in result.stdout


def test_compare_bigbird_the_readmes_first_command_passes():
    """`refattn compare --variant bigbird` (the README's first command): block-sparse, not the
    short-sequence fallback, and PASS against the float64 numpy reference."""
    result = run("compare", "--variant", "bigbird", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "PASS" and data["reference"]["kind"] == "numpy"
    assert "Warning" not in result.stderr  # no fallback to full attention at the default shape
    assert data["arrays"]["out"]["normwise_rel"] <= 1e-12


# -- exit 2 and one line for every user mistake ----------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--variant", "nosuch"], ["variant:", "'nosuch'", "sdpa"]),
    (["--variant", "sdpa", "--backend", "nosuch"], ["backend:", "'nosuch'", "numpy"]),
    (["--variant", "sdpa", "--against", "nosuch"], ["backend:", "'nosuch'"]),
    (["--variant", "sdpa", "--param", "nosuch=1"], ["--param nosuch", "not a parameter", "causal"]),
    (["--variant", "sdpa", "--param", "causal=maybe"], ["causal", "top_left", "'maybe'"]),
    (["--variant", "sdpa", "--param", "dropout_seed=abc"], ["--param dropout_seed", "integer", "'abc'"]),
    (["--variant", "flash", "--param", "block_q=0"], ["block_q", ">= 1", "0"]),
    (["--variant", "sdpa", "--param", "window=a,b"], ["--param window", "'a,b'"]),
    (["--variant", "sdpa", "--param", "causal"], ["--param", "name=value"]),
    (["--variant", "sdpa", "--param", "sinks=nonsense"], ["sinks", "'random'", "'nonsense'"]),
    (["--variant", "sdpa", "--param", "dropout_p=1.5", "--param", "dropout_seed=1"],
     ["dropout_p", "1.5"]),
    (["--variant", "sdpa", "--shape", "1,2,3"], ["--shape", "'1,2,3'"]),
    (["--variant", "sdpa", "--shape", "1,2,x,4"], ["--shape", "'1,2,x,4'"]),
    (["--variant", "sdpa", "--shape", "1,6,8,8,4,4"], ["--shape", "Hq=6", "Hkv=4"]),
    (["--variant", "mqa", "--shape", "1,4,8,8,4,2"], ["1 KV head", "2"]),
    (["--variant", "mha", "--shape", "1,4,8,8,4,2"], ["mha", "4", "2"]),
    (["--variant", "sdpa", "--against", "golden"], ["--against", "--case"]),
    (["--case", "nosuch"], ["--case", "'nosuch'", "core_plain"]),
    (["--case", "core_plain", "--seed", "3"], ["--seed", "--case"]),
    (["--variant", "gqa", "--case", "core_plain"], ["--variant", "'sdpa'", "'gqa'"]),
    ([], ["--variant"]),
])
def test_compare_user_mistakes_exit_2_with_one_line(args, needles):
    assert_one_line_error(run("compare", *args), *needles)


def test_compare_float32_compute_dtype_is_checked_against_float64():
    """A float32 run under test is compared with the float64 reference, at the float32 tolerance;
    the reference itself never inherits compute_dtype (it used to fail: numpy computes in float64)."""
    res = CliRunner().invoke(cli, ["compare", "--variant", "sdpa", "--backend", "numba",
                                   "--shape", "1,2,48,16", "--param", "causal=true",
                                   "--param", "compute_dtype=float32", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["tolerance"] == problem_mod.FLOAT32_TOLERANCE
    err = data["arrays"]["out"]["normwise_rel"]
    assert 1e-9 < err < problem_mod.FLOAT32_TOLERANCE  # float32 rounding is visible, and bounded


@pytest.mark.parametrize("name, hkv", [("mqa", 1), ("gqa", 2), ("sdpa", 8)])
def test_compare_uses_the_variants_default_shape(name, hkv):
    from refattn import variants
    res = CliRunner().invoke(cli, ["compare", "--variant", name, "--backend", "numpy", "--json"])
    assert res.exit_code == 0, res.output
    shape = json.loads(res.stdout)["shape"]
    assert shape == list(variants.get(name).default_shape) and shape[5] == hkv

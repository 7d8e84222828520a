"""Golden files: their content against an independent reference, ``verify``, damage detection, regen.

The pinned outputs are checked against ``tests/reference.py`` (loops over the definitions, importing
nothing from refattn), so a golden file cannot silently pin a wrong answer.
"""

from __future__ import annotations

import json
import math
import io
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

from refattn import golden, variants
from refattn.cli.main import cli
from refattn.golden.cases import CORE_CASES, alibi_paper_slopes, select
from reference import philox_keep_mask, reference_attention, reference_probabilities


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def golden_copy(tmp_path, monkeypatch):
    """A copy of the shipped golden directory that the loader reads instead."""
    target = tmp_path / "golden"
    target.mkdir()
    src = golden.directory()
    for name in list(golden.read_manifest()) + [golden.MANIFEST, golden.NOTES]:
        fname = name if name in (golden.MANIFEST, golden.NOTES) else f"{name}.npz"
        (target / fname).write_bytes((src / fname).read_bytes())
    monkeypatch.setattr(golden, "_DIRECTORY", target)
    return target


def verify_json(*args):
    result = run("golden", "verify", "--json", *args)
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def statuses(data):
    return {(r["case"], r["backend"]): r["status"] for r in data["results"]}


# -- the pinned answers are right -----------------------------------------------------------------
CORE_NAMES = [c.name for c in CORE_CASES]


def _reference_kwargs(case, stored):
    """``(q, k, v, kwargs, bshd)`` for ``reference_attention`` from a stored case (bhsd arrays)."""
    inputs, params, _ = golden.stored_inputs(case, stored)
    p = dict(params)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    bshd = p.pop("layout", "bhsd") == "bshd"
    if bshd:
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    for knob in ("block_q", "block_k", "return_lse"):
        p.pop(knob, None)
    if "dropout_seed" in p:
        b, hq, sq, _ = q.shape
        p["keep"] = philox_keep_mask(p.pop("dropout_seed"), p["dropout_p"], b, hq, sq, k.shape[2])
    if "dropout_mask" in p:
        p["keep"] = p.pop("dropout_mask")
    return q, k, v, p, bshd


@pytest.mark.parametrize("name", CORE_NAMES)
def test_golden_outputs_match_the_loop_reference(name):
    case = select()[name]
    stored = golden.load(name)
    q, k, v, p, bshd = _reference_kwargs(case, stored)
    out, lse = reference_attention(q, k, v, **p)
    if bshd:
        out = out.transpose(0, 2, 1, 3)
    got_out, got_lse = stored.arrays["output.out"], stored.arrays["output.lse"]
    for got, want in ((got_out, out), (got_lse, lse)):
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_array_equal(got[~np.isfinite(got)], want[~np.isfinite(want)])
        fin = np.isfinite(want)
        assert np.linalg.norm(got[fin] - want[fin]) <= 1e-13 * np.linalg.norm(want[fin])


@pytest.mark.parametrize("name", [c.name for c in CORE_CASES if c.grads])
def test_golden_dv_is_p_transpose_dout(name):
    """``dV = Pᵀ dO`` summed over the query heads reading each KV head, with P from the loops
    (dropout included: P is then the kept, rescaled probabilities)."""
    case = select()[name]
    stored = golden.load(name)
    q, k, v, p, bshd = _reference_kwargs(case, stored)
    dout = stored.arrays["grad.dout"]
    dout = dout.transpose(0, 2, 1, 3) if bshd else dout
    probs = reference_probabilities(q, k, **p)  # (B, Hq, Sq, Sk)
    hq, hkv = q.shape[1], k.shape[1]
    head_map = p.get("head_map", np.arange(hq) // (hq // hkv))
    want = np.zeros(v.shape)
    for h in range(hq):
        want[:, head_map[h]] += np.swapaxes(probs[:, h], -1, -2) @ dout[:, h]
    got = stored.arrays["grad.dv"]
    got = got.transpose(0, 2, 1, 3) if bshd else got
    assert np.linalg.norm(got - want) <= 1e-13 * np.linalg.norm(want)


def test_core_cases_cover_every_knob():
    cases = {c.name: c for c in CORE_CASES}
    knobs = set()
    for c in CORE_CASES:
        knobs |= set(c.params) | set(c.arrays)
    assert knobs >= {"scale", "causal", "alignment", "window", "mask", "bias", "softcap",
                     "alibi_slopes", "alibi_form", "sinks", "head_map", "dropout_p", "dropout_seed",
                     "dropout_mask", "layout", "empty_row", "lse_base", "block_q", "block_k"}
    assert {c.variant for c in CORE_CASES} >= {"sdpa", "gqa", "mqa", "flash"}
    assert cases["core_gqa_8_2"].shape[1] == 8 and cases["core_gqa_8_2"].shape[5] == 2
    sq_gt_sk = [c for c in CORE_CASES if c.shape[2] > c.shape[3] and c.params.get("causal")]
    assert {c.params.get("alignment", c.params["causal"]) for c in sq_gt_sk} >= {True, "top_left"}
    assert any(c.grads for c in CORE_CASES if "sinks" in c.arrays)
    assert any(c.grads for c in CORE_CASES if "bias" in c.arrays)


def test_alibi_paper_slopes():
    # Press et al.: 8 heads -> 2^-1 ... 2^-8; 6 heads -> the 4-head slopes then every other 8-head one
    np.testing.assert_array_equal(alibi_paper_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_array_equal(alibi_paper_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                         2 ** -1, 2 ** -3])


# -- verify -----------------------------------------------------------------------------------------
def test_verify_passes_on_numpy():
    code, data = verify_json("--backend", "numpy", "--case", "core_*")
    assert code == 0 and data["verdict"] == "PASS"
    got = statuses(data)
    for name in CORE_NAMES:
        assert got[(name, "numpy")] == "PASS"
    row = next(r for r in data["results"] if r["case"] == "core_bias")
    assert set(row["arrays"]) == {"out", "lse", "dq", "dk", "dv", "extras.bias"}
    assert row["tolerance"] == 1e-12


def test_verify_table_and_skipped_backends():
    result = run("golden", "verify", "--backend", "numpy", "--backend", "cupy", "--case", "core_m*")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["case", "backend"]
    assert any(line.startswith("core_mqa") and line.rstrip().endswith("PASS") for line in lines)
    code, data = verify_json("--backend", "cupy", "--case", "core_plain")
    if not data["backends"]["cupy"]["available"]:
        assert statuses(data)[("core_plain", "cupy")] == "SKIPPED" and code == 0
        assert data["results"][0]["reason"]
    code, data = verify_json("--backend", "numba", "--case", "core_flash_odd_tiles")
    assert statuses(data)[("core_flash_odd_tiles", "numba")] == "SKIPPED"  # flash: numpy only
    bad = run("golden", "verify", "--backend", "nosuch")
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: backend:")
    none = run("golden", "verify", "--case", "nomatch*")
    assert none.exit_code == 2 and "--case" in none.stderr


def test_tampered_file_is_reported(golden_copy):
    path = golden_copy / "core_plain.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the file
    path.write_bytes(bytes(data))
    code, out = verify_json("--backend", "numpy")
    assert code == 1 and out["verdict"] == "FAIL"
    got = statuses(out)
    assert got[("core_plain", "-")] == "TAMPERED"
    assert got[("core_bias", "numpy")] == "PASS"  # the others are still checked
    table = run("golden", "verify", "--backend", "numpy", "--case", "core_plain")
    assert table.exit_code == 1 and "TAMPERED" in table.stdout and "Traceback" not in table.output


def _replace_consistently(directory, name, data: bytes):
    """Write ``data`` as the case's file and record its sha256, as a careless regen would."""
    (directory / f"{name}.npz").write_bytes(data)
    manifest = golden.read_manifest(directory)
    manifest[name]["sha256"] = golden.sha256(data)
    golden.write_manifest(manifest, directory)


def test_pickled_or_truncated_npz_is_corrupt(golden_copy, tmp_path):
    obj = tmp_path / "pickled.npz"
    np.savez(obj, **{"input.q": np.array([{"x": 1}], dtype=object), "output.out": np.zeros(2)})
    _replace_consistently(golden_copy, "core_plain", obj.read_bytes())
    good = (golden_copy / "core_bias.npz").read_bytes()
    _replace_consistently(golden_copy, "core_bias", good[: len(good) // 2])
    _replace_consistently(golden_copy, "core_sinks", pickle.dumps({"output.out": np.zeros(3)}))
    code, out = verify_json("--backend", "numpy")
    got = statuses(out)
    assert code == 1
    for name in ("core_plain", "core_bias", "core_sinks"):
        assert got[(name, "-")] == "CORRUPT", (name, got)
    assert got[("core_mqa", "numpy")] == "PASS"


def test_missing_stale_and_orphan_entries(golden_copy):
    (golden_copy / "core_plain.npz").unlink()
    manifest = golden.read_manifest(golden_copy)
    del manifest["core_mqa"]
    manifest["core_sinks"]["params"]["causal"] = False
    manifest["core_gone"] = dict(manifest["core_bias"], file="core_gone.npz")
    golden.write_manifest(manifest, golden_copy)
    code, out = verify_json("--backend", "numpy")
    got = statuses(out)
    assert code == 1
    assert got[("core_plain", "-")] == "MISSING" and got[("core_mqa", "-")] == "MISSING"
    assert got[("core_sinks", "-")] == "STALE" and got[("core_gone", "-")] == "ORPHAN"


def test_corrupt_manifest(golden_copy):
    (golden_copy / golden.MANIFEST).write_text("{not json")
    code, out = verify_json("--backend", "numpy", "--case", "core_p*")
    assert code == 1 and statuses(out)[("core_plain", "-")] == "CORRUPT"


def test_verify_fails_when_a_stored_output_is_wrong(golden_copy):
    arrays = golden.read_npz((golden_copy / "core_sinks.npz").read_bytes(), "x")
    arrays["grad.extras.sinks"][1] *= 1 + 1e-9
    _replace_consistently(golden_copy, "core_sinks", golden.npz_bytes(arrays))
    code, out = verify_json("--backend", "numpy", "--case", "core_sinks")
    row = out["results"][0]
    assert code == 1 and row["status"] == "FAIL"
    assert not row["arrays"]["extras.sinks"]["pass"] and row["arrays"]["out"]["pass"]
    assert row["arrays"]["extras.sinks"]["worst_index"] == [1]


# -- regen ------------------------------------------------------------------------------------------
def test_regen_reproduces_the_committed_files(tmp_path):
    result = run("golden", "regen", "--case", "core_*", "--dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    committed = golden.read_manifest()
    fresh = golden.read_manifest(tmp_path)
    same_platform = None
    for name in CORE_NAMES:
        old = golden.load(name, committed)
        new = golden.load(name, fresh, tmp_path)
        assert sorted(old.arrays) == sorted(new.arrays), name
        same_platform = committed[name]["platform"] == golden.platform_fingerprint()
        for key, a in old.arrays.items():
            b = new.arrays[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (name, key)
            if same_platform or not key.startswith(("output.", "grad.")) or key == "grad.dout":
                # seeded inputs always, and float64 results on the same platform: bit for bit
                assert a.tobytes() == b.tobytes(), (name, key)
            else:  # numpy's SIMD math differs across platforms in the last bit
                fin = np.isfinite(a)
                np.testing.assert_array_equal(fin, np.isfinite(b))
                assert np.linalg.norm(a[fin] - b[fin]) <= 1e-12 * np.linalg.norm(a[fin])
        if same_platform:
            assert committed[name]["sha256"] == fresh[name]["sha256"], name
        for field in ("variant", "params", "arrays", "shape", "seed", "grads", "tolerance"):
            assert committed[name][field] == fresh[name][field]


def test_regen_keeps_other_cases_and_reports_what_moved(tmp_path):
    run("golden", "regen", "--case", "core_plain", "--dir", str(tmp_path))
    run("golden", "regen", "--case", "core_mqa", "--dir", str(tmp_path))
    assert set(golden.read_manifest(tmp_path)) == {"core_plain", "core_mqa"}
    again = run("golden", "regen", "--case", "core_mqa", "--dir", str(tmp_path))
    assert again.stdout.splitlines()[0] == "core_mqa: unchanged"
    arrays = golden.read_npz((tmp_path / "core_mqa.npz").read_bytes(), "x")
    arrays["output.out"][0, 0, 0, 0] += 0.5
    (tmp_path / "core_mqa.npz").write_bytes(golden.npz_bytes(arrays))
    before = (tmp_path / "core_mqa.npz").read_bytes()
    # a regen that would change a file needs a note; without one nothing is written
    refused = CliRunner().invoke(cli, ["golden", "regen", "--case", "core_mqa", "--dir", str(tmp_path)])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert refused.stderr.startswith("Error: --note: expected a note saying why 1 golden file(s) "
                                     "change") and "core_mqa: output.out max abs 0.5" in refused.stderr
    assert (tmp_path / "core_mqa.npz").read_bytes() == before
    moved = run("golden", "regen", "--case", "core_mqa", "--dir", str(tmp_path), "--note",
                "restore the tampered output").stdout.splitlines()
    assert moved[0] == "core_mqa: changed"
    assert moved[1].startswith("  output.out: max abs 0.5,")
    assert len(moved) == 3  # that one array, then the summary line
    notes = golden.read_notes(tmp_path)
    assert notes[-1]["note"] == "restore the tampered output"
    assert notes[-1]["cases"]["core_mqa"][0].startswith("output.out: max abs 0.5")
    assert set(notes[0]["cases"]) == {"core_plain"} and notes[0]["note"] == "added"


def test_verify_prints_the_latest_note_of_each_case(golden_copy):
    assert golden.read_notes(golden_copy), "the shipped files carry their notes"
    golden._add_note(golden_copy, "a reviewed change of core_plain", {"core_plain": ["x"]}, "9.9")
    out = run("golden", "verify", "--backend", "numpy", "--case", "core_p*").stdout
    assert "of 1 case (core_plain): a reviewed change of core_plain" in out
    code, data = verify_json("--backend", "numpy", "--case", "core_plain")
    assert data["results"][0]["note"]["note"] == "a reviewed change of core_plain"


def test_npz_files_hold_no_objects_and_load_without_pickle():
    src = golden.directory()
    for name, entry in golden.read_manifest().items():
        data = (src / entry["file"]).read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for key in z.files:
                assert not z[key].dtype.hasobject
        assert entry["refattn"] and entry["numpy"] and len(entry["sha256"]) == 64
        assert math.isfinite(entry["tolerance"])



def test_a_backend_error_is_reported_not_raised(monkeypatch):
    from refattn.errors import ParameterError

    def refuse(*args, **kwargs):
        raise ParameterError("compute_dtype: expected float64, got something else")

    monkeypatch.setattr(golden, "evaluate", refuse)
    code, out = verify_json("--backend", "numpy", "--case", "core_plain")
    row = out["results"][0]
    assert code == 1 and row["status"] == "ERROR" and "compute_dtype" in row["reason"]


def test_every_golden_case_passes_on_numpy_and_numba():
    """`refattn golden verify` over every stored case: PASS on each backend the case's variant
    lists (SKIPPED exactly where it does not), nothing else."""
    from refattn.golden.cases import all_cases
    code, out = verify_json("--backend", "numpy", "--backend", "numba")
    assert code == 0 and out["verdict"] == "PASS"
    got = statuses(out)
    cases = all_cases()
    assert {c for c, _ in got} == set(cases)
    for (case, backend), status in got.items():
        listed = backend in variants.get(cases[case].variant).backends
        assert status == ("PASS" if listed else "SKIPPED"), (case, backend, status)
    long = [c for c in cases if c.startswith("sparse_") and max(cases[c].shape[2:4]) > 128]
    assert len(long) >= 6  # sparse cases spanning several 64-tiles of the compiled backends

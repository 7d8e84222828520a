"""``refattn compare --hf-config``: a config.json of each family written here, one layer built with
random weights and checked (exit 0), and the usage errors (exit 2, one line)."""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from click.testing import CliRunner  # noqa: E402

from refattn.cli.main import cli  # noqa: E402

from .bridge_configs import ALL, ALL_CASES, CONFIGS  # noqa: E402

pytestmark = [pytest.mark.peers, pytest.mark.filterwarnings("ignore::UserWarning")]


def write(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("name, layer", ALL_CASES)
def test_each_family_passes(tmp_path, name, layer):
    path = write(tmp_path, ALL[name][0])
    r = CliRunner().invoke(cli, ["compare", "--hf-config", path, "--layer", str(layer), "--seq", "16", "--grad",
                                 "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["schema"] == "refattn.compare.hf/1" and rec["verdict"] == "PASS" and rec["layer"] == layer
    assert all(a["normwise_rel"] <= 1e-10 for a in rec["arrays"].values())
    assert len(rec["arrays"]) > 3  # the gradients too


def test_table_output_and_warnings(tmp_path):
    path = write(tmp_path, CONFIGS["gemma2"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as a shell shows them (pytest's filter would hide them)
        r = CliRunner().invoke(cli, ["compare", "--hf-config", path, "--layer", "0"])
    assert r.exit_code == 0
    assert "PASS: gemma2 layer 0 (sliding_attention) against refattn's 'rope'" in r.stdout
    assert "note: sliding_window=4 -> window=(3, 0)" in r.stdout
    assert "Warning: sdpa path: transformers' sdpa attention function refuses" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--layer", "9"], "Error: --layer: expected a layer index in [0, 3] (llama config with 4 layers), got 9"),
    (["--variant", "sdpa"], "Error: --variant: not used with --hf-config"),
    (["--seq", "0"], "Error: --seq: expected a sequence length >= 1, got 0"),
])
def test_usage_errors(tmp_path, args, message):
    path = write(tmp_path, CONFIGS["llama"][0])
    r = CliRunner().invoke(cli, ["compare", "--hf-config", path] + args)
    assert r.exit_code == 2 and r.stderr.startswith(message) and len(r.stderr.splitlines()) == 1


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, start in ((str(bad), "Error: --hf-config: expected a JSON object"),
                        (str(tmp_path / "missing.json"), "Error: --hf-config: expected a config.json file"),
                        (write(tmp_path, {"model_type": "bert"}), "Error: config['model_type']: 'bert' is not "
                                                                  "supported")):
        r = CliRunner().invoke(cli, ["compare", "--hf-config", path])
        assert r.exit_code == 2 and r.stderr.startswith(start), r.stderr
    r = CliRunner().invoke(cli, ["compare", "--layer", "1"])
    assert r.exit_code == 2 and r.stderr.strip() == "Error: --layer: only with --hf-config"

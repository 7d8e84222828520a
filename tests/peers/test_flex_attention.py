"""torch's own ``flex_attention`` (float64, CPU, eager) against the ``flex`` variant: the same
mask_mod and score_mod, outputs to 1e-12; and ``refattn compare --flex``. torch 2.13 has no flex
backward on the CPU, so the variant's gradients are checked in ``tests/test_flex.py`` (finite
differences, and the declarative knobs' gradients)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")

from click.testing import CliRunner  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

import refattn  # noqa: E402
from refattn.cli.main import cli  # noqa: E402

import flex_mods as M  # noqa: E402

pytestmark = [pytest.mark.peers, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize("mask_mod, score_mod", [(M.document, M.softcap), (M.sliding, M.alibi),
                                                 (M.per_head_window, M.square), (M.causal, None)])
def test_torch_flex_attention_equals_the_flex_variant(mask_mod, score_mod):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 4, 20, 8)) for _ in range(3))
    bm = create_block_mask(mask_mod, 2, 4, 20, 20, device="cpu", BLOCK_SIZE=8)
    out = flex_attention(*(torch.tensor(a) for a in (q, k, v)), score_mod=score_mod, block_mask=bm)
    ours = refattn.attention(q, k, v, variant="flex", mask_mod=mask_mod, score_mod=score_mod)
    np.testing.assert_allclose(ours, out.numpy(), atol=1e-12, rtol=0)


def test_cli(tmp_path, monkeypatch):
    (tmp_path / "kernels.py").write_text(
        "from torch.nn.attention.flex_attention import flex_attention\n"
        "def ok(q, k, v, **kw):\n    return flex_attention(q, k, v, **kw)\n"
        "def no_score_mod(q, k, v, block_mask=None, score_mod=None, **kw):\n"
        "    return flex_attention(q, k, v, block_mask=block_mask, **kw)\n")
    monkeypatch.chdir(tmp_path)
    base = ["compare", "--adapter", "flex", "--framework", "torch", "--shape", "2,2,16,8"]
    r = CliRunner().invoke(cli, base + ["--flex", "flex_mods:document,flex_mods:softcap", "--impl", "kernels:ok"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.stdout
    r = CliRunner().invoke(cli, base + ["--flex", "flex_mods:document,flex_mods:softcap", "--impl",
                                        "kernels:no_score_mod"])
    assert r.exit_code == 1 and "FAIL" in r.stdout
    r = CliRunner().invoke(cli, base + ["--flex", "flex_mods:nope", "--impl", "kernels:ok"])
    assert r.exit_code == 2 and "Error: mask_mod: module 'flex_mods' has no attribute 'nope'" in r.stderr
    r = CliRunner().invoke(cli, base + ["--flex", "flex_mods:causal", "--variant", "sdpa", "--impl", "kernels:ok"])
    assert r.exit_code == 2 and "Error: --flex: selects variant 'flex', got --variant sdpa" in r.stderr

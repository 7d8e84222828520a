"""Inputs that find bugs and explanations that do not mislead (``refattn compare --impl``).

The kernels below are written here, each with one known bug; the dense reference they build on is
a plain softmax loop (tests/oracle_kernels.py style), not refattn.
"""

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import refattn
from refattn.cli.main import cli
from refattn.testing import inputs as dist

KERNELS = '''
import numpy as np


def _attend(q, k, v, scale=None, causal=False, window=None, alignment="bottom_right",
            normalise=True, max_subtraction=True, dtype=np.float32, **_):
    q, k, v = (np.asarray(x, dtype) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    s = (q @ np.swapaxes(k, -1, -2)) * dtype(scale)
    sq, sk = s.shape[-2:]
    i = np.arange(sq)[:, None] + (sk - sq if alignment == "bottom_right" else 0)
    j = np.arange(sk)[None, :]
    keep = np.ones((sq, sk), bool)
    if causal:
        keep &= j <= i
    if window is not None:
        if window[0] >= 0:
            keep &= j >= i - window[0]
        if window[1] >= 0:
            keep &= j <= i + window[1]
    s = np.where(keep, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True)) if max_subtraction else np.exp(s)
    p = e / e.sum(-1, keepdims=True) if normalise else e
    return (p.astype(dtype) @ v).astype(dtype)


def good_f16(q, k, v, **p):
    return _attend(q, k, v, **p).astype(np.float16)


def no_max_f16(q, k, v, **p):
    return _attend(q, k, v, max_subtraction=False, dtype=np.float16, **p)


def scale_1_over_d(q, k, v, scale=None, **p):
    return _attend(q, k, v, scale=1.0 / q.shape[-1], **p)


def unnormalised(q, k, v, **p):
    return _attend(q, k, v, normalise=False, **p)


def flipped(q, k, v, alignment="bottom_right", **p):
    return _attend(q, k, v, alignment="top_left", **p)


def zeros(q, k, v, **p):
    return np.zeros(np.shape(q)[:-1] + (np.shape(v)[-1],), np.float32)
'''


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    (tmp_path / "bug_kernels.py").write_text(KERNELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "bug_kernels", raising=False)

    def run(*args):
        res = CliRunner().invoke(cli, ["compare", *args, "--json"], catch_exceptions=False)
        return res.exit_code, json.loads(res.stdout)
    return run


def lines(data):
    return data["analysis"]["lines"] if data["analysis"] else []


def test_the_default_battery_catches_fp16_without_max_subtraction(kernels):
    code, data = kernels("--variant", "sdpa", "--impl", "bug_kernels:no_max_f16", "--dtype", "fp16",
                         "--param", "causal=true")
    assert code == 1 and data["verdict"] == "FAIL"
    runs = {b["inputs"]: b["verdict"] for b in data["battery"]}
    assert runs["normal"] == "PASS" and "FAIL" in (runs["large"], runs["outliers"], runs["peaked"])
    assert data["inputs"] in ("large", "outliers", "peaked")
    code, data = kernels("--variant", "sdpa", "--impl", "bug_kernels:good_f16", "--dtype", "fp16",
                         "--param", "causal=true")
    assert code == 0 and [b["verdict"] for b in data["battery"]] == ["PASS"] * 5


def test_a_one_over_d_scale_is_named_as_a_scale_bug(kernels):
    code, data = kernels("--variant", "sdpa", "--shape", "1,4,256,64", "--impl",
                         "bug_kernels:scale_1_over_d", "--dtype", "bf16", "--param", "causal=true")
    assert code == 1
    first = lines(data)[0]
    assert first.startswith("the scale looks off by a factor of 0.125") and "1/D instead of 1/sqrt(D)" in first
    assert data["analysis"]["worst"]["index"][3] is None  # no key named for a global error


@pytest.mark.parametrize("kernel, needle, extra", [
    ("zeros", "the output under test is all zero", ["--variant", "sliding_window", "--param", "window=127,0"]),
    ("unnormalised", "the softmax is not normalised", ["--variant", "sdpa", "--param", "causal=true"]),
    ("flipped", "matches the top_left alignment", ["--variant", "sdpa", "--shape", "1,2,48,64,16,2",
                                                   "--param", "causal=true"]),
])
def test_global_errors_are_named_before_any_key(kernels, kernel, needle, extra):
    code, data = kernels(*extra, "--impl", f"bug_kernels:{kernel}", "--inputs", "normal")
    assert code == 1 and needle in lines(data)[0]  # the first line of the account
    assert not any("key" in line and "explains" in line for line in lines(data))


def test_a_file_in_the_other_layout_and_an_lse_in_base_2(tmp_path):
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((1, 4, 48, 16)) for _ in range(3))
    qb, kb, vb = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    np.savez(tmp_path / "bshd.npz", q=qb, k=kb, v=vb,
             out=refattn.attention(qb, kb, vb, layout="bshd", causal=True))
    run = CliRunner().invoke(cli, ["compare", "--outputs", str(tmp_path / "bshd.npz"), "--variant",
                                   "sdpa", "--param", "causal=true"], catch_exceptions=False)
    assert run.exit_code == 1 and "the arrays look like (B, S, H, D); pass --param layout=bshd" in run.stdout
    out, lse = refattn.attention(q, k, v, causal=True, return_lse=True)
    np.savez(tmp_path / "lse2.npz", q=q, k=k, v=v, out=out, lse=lse / np.log(2))
    run = CliRunner().invoke(cli, ["compare", "--outputs", str(tmp_path / "lse2.npz"), "--variant",
                                   "sdpa", "--param", "causal=true"], catch_exceptions=False)
    assert run.exit_code == 1 and "the LSE under test is in base 2" in run.stdout


def test_a_key_the_row_cannot_see_is_never_its_explanation():
    from refattn.report import candidate_keys
    seen = np.zeros(300, bool)
    seen[0] = True                       # row 0 under window (127, 0) sees key 0 only
    allowed = candidate_keys(seen)
    assert np.flatnonzero(allowed).tolist() == [0, 1]  # itself, and the off-by-one neighbour
    assert not candidate_keys(np.zeros(5, bool)).any()


def test_distributions_are_what_they_say():
    rng = np.random.default_rng(3)
    shape = (1, 2, 64, 80, 32, 2)
    large = dist.make("large", shape, rng, dtype="fp16")
    s = large["q"] @ np.swapaxes(large["k"], -1, -2) / np.sqrt(32)
    assert np.log(np.finfo(np.float16).max) < s.max() < 4 * np.log(np.finfo(np.float16).max)
    out = dist.make("outliers", shape, np.random.default_rng(3))
    big = np.abs(out["q"]).max(axis=(0, 1, 2))
    assert (big > 10).sum() == 1 and big.max() > 20  # 2 of 64 -> one channel of 32, 20x
    peaked = dist.make("peaked", shape, np.random.default_rng(3))
    p = refattn.attention(peaked["q"], peaked["k"], np.eye(80)[None, None].repeat(2, 1))
    assert p.max(axis=-1).mean() > 0.999 and p.max(axis=-1).min() > 0.99  # near one-hot rows
    ties = dist.make("ties", shape, np.random.default_rng(3))
    assert np.array_equal(ties["k"][:, :, 1], ties["k"][:, :, 0])
    with pytest.raises(refattn.ParameterError, match="^inputs: expected one of"):
        dist.make("huge", shape, rng)


# -- smaller things a new user hit ---------------------------------------------------------------------
def test_a_repeated_param_is_an_error():
    res = CliRunner().invoke(cli, ["compare", "--variant", "sdpa", "--param", "causal=true",
                                   "--param", "causal=false"])
    assert res.exit_code == 2 and "--param causal: given twice" in res.stderr


def test_impl_file_imports_its_siblings(tmp_path, monkeypatch):
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "sibling_helper.py").write_text("def twice(x):\n    return x\n")
    (tmp_path / "kit" / "kern.py").write_text(
        "from sibling_helper import twice\nimport refattn\n"
        "def f(q, k, v, **p):\n    return refattn.attention(twice(q), k, v, **p)\n")
    monkeypatch.delitem(sys.modules, "sibling_helper", raising=False)
    res = CliRunner().invoke(cli, ["compare", "--variant", "sdpa", "--shape", "1,2,16,8", "--impl",
                                   str(tmp_path / "kit" / "kern.py") + ":f"])
    assert res.exit_code == 0, res.output


def test_a_warning_is_printed_once(tmp_path):
    import warnings
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((1, 2, 24, 8)) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = refattn.attention(q, k, v, variant="bigbird", block_size=4, num_random_blocks=1)
    np.savez(tmp_path / "bb.npz", q=q, k=k, v=v, out=out)
    res = CliRunner().invoke(cli, ["compare", "--outputs", str(tmp_path / "bb.npz"), "--variant",
                                   "bigbird", "--param", "block_size=4", "--param",
                                   "num_random_blocks=1", "--dtype", "fp64"])
    assert res.exit_code == 0 and res.stderr.count("Warning:") == 1

"""Demonstrations (they double as documentation): refattn catches real attention bugs.

Each buggy kernel below is what someone might actually write. The oracle's Python API --
``impl.call`` (call the kernel on a case in its dtype), ``numerics.reference``/``baseline``/
``compare`` (the verdict), ``report.analyse`` (where the error is) -- must say FAIL and point the
worst (b, h, i, j) at the bug. Correct kernels (PyTorch's CPU SDPA in bf16 and fp16) must PASS.
Where the bug is, is known here by construction, independently of refattn.
"""

import math
import sys

import numpy as np
import pytest

from refattn import impl, numerics, report
from refattn.errors import ParameterError


def verdict(fn, case, dtype="bf16", variant="sdpa", block_k=None, **call_kw):
    """What ``refattn compare --impl`` decides: (comparison of out, analysis, got)."""
    got = impl.call(fn, case, dtype=dtype, **call_kw)["out"]
    ref = numerics.reference(case, variant=variant)["out"]
    base = numerics.baseline(case, variant=variant, dtype=dtype)["out"]
    res = numerics.compare(got, ref, base, dtype=dtype, variant=variant)
    an = report.analyse(got, ref, res["allowed"], case=case, variant=variant, block_k=block_k)
    return res, an


def softmax_rows_f32(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- 1. FlashAttention with the tile max where the running max belongs ---------------------------------
BLOCK = 16


def flash_tile_max_bug(q, k, v, scale=None):
    """Online softmax over key tiles, float32 -- with the classic bug: the tile's exponentials use
    the tile's own max, while the accumulators are rescaled to the running max."""
    q, k, v = (np.asarray(a, np.float32) for a in (q, k, v))
    scale = np.float32(scale or 1 / math.sqrt(q.shape[-1]))
    m = np.full(q.shape[:3] + (1,), -np.inf, np.float32)
    l = np.zeros_like(m)
    acc = np.zeros(q.shape[:3] + (v.shape[-1],), np.float32)
    for j0 in range(0, k.shape[2], BLOCK):
        s = scale * (q @ np.swapaxes(k[:, :, j0:j0 + BLOCK], -1, -2))
        m_tile = s.max(-1, keepdims=True)
        m_new = np.maximum(m, m_tile)
        alpha = np.exp(m - m_new)
        e = np.exp(s - m_tile)  # BUG: should be exp(s - m_new)
        l = alpha * l + e.sum(-1, keepdims=True)
        acc = alpha * acc + e @ v[:, :, j0:j0 + BLOCK]
        m = m_new
    return acc / l


def tile_maxima(q, k):
    """(B, H, Sq, tiles) tile maxima of the scores, and the running max before each tile."""
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    tiles = np.stack([s[..., j:j + BLOCK].max(-1) for j in range(0, s.shape[-1], BLOCK)], -1)
    return tiles, np.maximum.accumulate(tiles, axis=-1)


def test_tile_max_bug_points_at_the_tile():
    """Scores rise along the keys except in tile 2, whose keys are zero: only tile 2 has a max
    below the running max, so only its weight is wrong -- and the worst row points there."""
    rng = np.random.default_rng(0)
    b, h, s, d = 1, 2, 64, 16
    q = 0.3 * rng.standard_normal((b, h, s, d))
    k = 0.3 * rng.standard_normal((b, h, s, d))
    q[..., 0] = 3.0
    k[..., 0] = 6.0 * np.arange(s) / s  # a ramp: later tiles score higher
    k[:, :, 2 * BLOCK:3 * BLOCK] = 0.0  # tile 2 scores exactly 0
    v = rng.standard_normal((b, h, s, d))
    case = dict(q=q, k=k, v=v)
    tiles, running = tile_maxima(numerics.round_to(q, "bf16"), numerics.round_to(k, "bf16"))
    assert np.all((tiles < running) == (np.arange(4) == 2))  # the construction holds
    res, an = verdict(flash_tile_max_bug, case, block_k=BLOCK)
    assert res["verdict"] == "FAIL" and res["max_abs"] > 10 * res["allowed"]
    assert an["worst"]["block_keys"] == (2 * BLOCK, 3 * BLOCK - 1)
    assert an["worst"]["block_explained"] > 0.99
    assert "keys 32..47" in " ".join(an["lines"])


def test_tile_max_bug_only_where_a_tile_max_is_below_the_running_max():
    rng = np.random.default_rng(1)
    case = {n: rng.standard_normal((2, 2, 48, 16)) for n in "qkv"}
    got = impl.call(flash_tile_max_bug, case, dtype="bf16")["out"]
    ref = numerics.reference(case)["out"]
    res = numerics.compare(got, ref, numerics.baseline(case, dtype="bf16")["out"], dtype="bf16")
    assert res["verdict"] == "FAIL"
    tiles, running = tile_maxima(numerics.round_to(case["q"], "bf16"),
                                 numerics.round_to(case["k"], "bf16"))
    buggy_rows = (tiles < running).any(-1)
    row_err = np.abs(got - ref).max(-1)
    assert 0 < buggy_rows.sum() < buggy_rows.size
    assert np.all(row_err[~buggy_rows] <= res["allowed"])  # rows where the bug cannot act pass
    worst = res["worst_index"]
    assert buggy_rows[worst[:3]]


# -- 2. a sliding window one key too wide ---------------------------------------------------------------
def window_off_by_one(q, k, v, window, scale=None):
    """Dense float32 attention with a window ``j >= i - left - 1`` (should be ``i - left``)."""
    q, k, v = (np.asarray(a, np.float32) for a in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    rel = np.arange(sk)[None] - (np.arange(sq)[:, None] + sk - sq)
    keep = (rel >= -window[0] - 1) & (rel <= window[1])  # BUG: - 1
    s = np.float32(scale or 1 / math.sqrt(q.shape[-1])) * (q @ np.swapaxes(k, -1, -2))
    return softmax_rows_f32(np.where(keep, s, -np.inf)) @ v


def test_window_off_by_one_points_at_the_edge():
    rng = np.random.default_rng(2)
    case = {**{n: rng.standard_normal((1, 2, 80, 16)) for n in "qkv"}, "window": (8, 0)}
    res, an = verdict(window_off_by_one, case)
    assert res["verdict"] == "FAIL"
    b, h, i, j = an["worst"]["index"]
    assert j == i - 8 - 1  # the one key outside the window's left edge
    assert an["worst"]["relation"] == "one key left of the window's left edge"
    assert an["worst"]["explained"] > 0.99
    assert "first" not in " ".join(an["lines"])  # every row with a key left of its window fails
    assert report.worst_line(an["worst"]).startswith(f"worst (b, h, i, j) = ({b}, {h}, {i}, {j})")
    # the same case in layout bshd points at the same (b, h, i, j)
    bshd = {**{n: case[n].transpose(0, 2, 1, 3) for n in "qkv"}, "window": (8, 0), "layout": "bshd"}
    got = impl.call(window_off_by_one, case, dtype="bf16")["out"].transpose(0, 2, 1, 3)
    ref = numerics.reference(bshd)["out"]
    assert report.analyse(got, ref, res["allowed"], case=bshd)["worst"]["index"] == (b, h, i, j)


# -- 3. local window + global token, the global key counted twice ---------------------------------------
GLOBAL, RADIUS = 5, 4


def hybrid_mask(s):
    """Local window of radius 4 plus global token 5 (its row sees all, every row sees it)."""
    i, j = np.arange(s)[:, None], np.arange(s)[None]
    m = np.abs(i - j) <= RADIUS
    m[:, GLOBAL] = True
    m[GLOBAL, :] = True
    return m


def hybrid_global_twice(q, k, v, mask, scale=None):
    """The union of "window" and "global column" computed as a sum: where the global key is also
    inside the window, its exponential is added twice."""
    q, k, v = (np.asarray(a, np.float32) for a in (q, k, v))
    s = np.float32(scale or 1 / math.sqrt(q.shape[-1])) * (q @ np.swapaxes(k, -1, -2))
    s = np.where(mask, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    i = np.arange(q.shape[2])
    twice = np.abs(i - GLOBAL) <= RADIUS
    e[..., twice, GLOBAL] *= 2  # BUG: the window part and the global part both count it
    return (e / e.sum(-1, keepdims=True)) @ v


def test_global_key_counted_twice_points_at_the_column():
    rng = np.random.default_rng(3)
    case = {**{n: rng.standard_normal((2, 2, 64, 16)) for n in "qkv"}, "mask": hybrid_mask(64)}
    res, an = verdict(hybrid_global_twice, case)
    assert res["verdict"] == "FAIL"
    b, h, i, j = an["worst"]["index"]
    assert j == GLOBAL and abs(i - GLOBAL) <= RADIUS and i != GLOBAL
    assert f"key column j = {GLOBAL} explains the error" in " ".join(an["lines"])
    assert an["worst"]["relation"] == "among the visible keys"


# -- 4. PyTorch's CPU SDPA passes in bf16 and fp16; a wrong scale fails ---------------------------------
SDPA_CASES = {
    "plain": {},
    "causal top-left": {"causal": "top_left"},
    "causal bottom-right": {"causal": True},
    "gqa + mask": {"mask": True},
}


def _sdpa_case(name, seed=4):
    rng = np.random.default_rng(seed)
    case = dict(q=rng.standard_normal((2, 4, 48, 32)), k=rng.standard_normal((2, 2, 64, 32)),
                v=rng.standard_normal((2, 2, 64, 32)), **SDPA_CASES[name])
    if name == "gqa + mask":
        case["mask"] = rng.random((2, 1, 48, 64)) < 0.6
        case["mask"][..., 0] = True  # no empty rows: torch's SDPA returns NaN there
    return case


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_torch_sdpa_passes(name, dtype):
    torch = pytest.importorskip("torch", reason="the demonstration calls PyTorch's CPU SDPA")
    res, _ = verdict(torch.nn.functional.scaled_dot_product_attention, _sdpa_case(name), dtype,
                     adapter="sdpa", framework="torch")
    assert res["verdict"] == "PASS", res
    assert res["max_abs"] > 0  # it really ran in low precision


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_torch_flex_attention_passes(dtype):
    pytest.importorskip("torch", reason="the demonstration calls PyTorch's flex_attention")
    import warnings
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flex's eager-mode notice
        res, _ = verdict(flex_attention, _sdpa_case("gqa + mask"), dtype, adapter="flex",
                         framework="torch")
    assert res["verdict"] == "PASS" and res["max_abs"] > 0, res


@pytest.mark.parametrize("wrong", [lambda d: 1 / d, lambda d: 1.02 / math.sqrt(d)])
def test_fp16_kernel_with_wrong_scale_fails(wrong):
    torch = pytest.importorskip("torch", reason="the demonstration calls PyTorch's CPU SDPA")

    def wrong_scale(query, key, value, scale=None, **kw):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, scale=wrong(query.shape[-1]), **kw)

    res, _ = verdict(wrong_scale, _sdpa_case("causal bottom-right"), "fp16", adapter="sdpa",
                     framework="torch")
    assert res["verdict"] == "FAIL"


# -- loading implementations by name -------------------------------------------------------------------
GOOD_MODULE = """
import numpy as np
def attn(q, k, v, **params):
    import refattn
    return refattn.attention(q, k, v, **params)
class Kernels:
    @staticmethod
    def attn(q, k, v, **params):
        return attn(q, k, v, **params)
NOT_CALLABLE = 3
def broken(q, k, v, **params):
    raise RuntimeError("kernel launch failed")
"""


def test_impl_load_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "user_kernels_demo.py").write_text(GOOD_MODULE)
    (tmp_path / "raises_on_import_demo.py").write_text("raise ImportError('no CUDA here')\n")
    monkeypatch.chdir(tmp_path)  # found through the current directory, as the CLI would
    monkeypatch.delitem(sys.modules, "user_kernels_demo", raising=False)
    fn = impl.load("user_kernels_demo:attn")
    case = {n: np.random.default_rng(5).standard_normal((1, 1, 4, 8)) for n in "qkv"}
    res, _ = verdict(fn, {**case, "causal": True}, "fp32")
    assert res["verdict"] == "PASS"
    assert impl.load("user_kernels_demo:Kernels.attn")(**case).shape == (1, 1, 4, 8)
    assert impl.load(str(tmp_path / "user_kernels_demo.py") + ":attn")(**case).shape == (1, 1, 4, 8)
    with pytest.raises(impl.ImplCallError, match="impl: broken raised RuntimeError: kernel launch"):
        impl.call(impl.load("user_kernels_demo:broken"), case)


@pytest.mark.parametrize("spec, message", [
    ("user_kernels_demo", r"impl: expected 'module:function' \(e.g. my_pkg.kernels:my_attn\), "
                          r"got 'user_kernels_demo'"),
    (":attn", "impl: expected 'module:function'"),
    ("user_kernels_demo:", "impl: expected 'module:function'"),
    ("no_such_module_xyz:attn", "impl: cannot import module 'no_such_module_xyz'"),
    ("user_kernels_demo:missing", "impl: module 'user_kernels_demo' has no attribute 'missing'"),
    ("user_kernels_demo:NOT_CALLABLE", "impl: 'user_kernels_demo:NOT_CALLABLE' is a int, expected "
                                       "a callable"),
    ("raises_on_import_demo:f", "impl: cannot import module 'raises_on_import_demo' "
                                r"\(no CUDA here\)"),
    ("my kernels:attn", "impl: 'my kernels' is not a module name"),
    ("missing_file.py:attn", "impl: file 'missing_file.py' does not exist"),
])
def test_impl_load_errors(tmp_path, monkeypatch, spec, message):
    (tmp_path / "user_kernels_demo.py").write_text(GOOD_MODULE)
    (tmp_path / "raises_on_import_demo.py").write_text("raise ImportError('no CUDA here')\n")
    monkeypatch.chdir(tmp_path)
    for name in ("user_kernels_demo", "raises_on_import_demo"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ParameterError, match=message):
        impl.load(spec)


def test_impl_load_rejects_non_strings():
    with pytest.raises(ParameterError, match="impl: expected a string 'module:function', got int"):
        impl.load(3)


# -- the report ------------------------------------------------------------------------------------------
def _failing_window():
    rng = np.random.default_rng(6)
    case = {**{n: rng.standard_normal((1, 2, 40, 8)) for n in "qkv"}, "window": (4, 0)}
    got = impl.call(window_off_by_one, case, dtype="bf16")["out"]
    ref = numerics.reference(case)
    base = numerics.baseline(case, dtype="bf16")
    comparison = numerics.compare_all({"out": got}, ref, base, dtype="bf16")
    an = report.analyse(got, ref["out"], comparison["results"]["out"]["allowed"], case=case)
    return comparison, an


@pytest.mark.parametrize("ext", [".md", ".html"])
def test_report_files(tmp_path, ext):
    pytest.importorskip("matplotlib", reason="the heat map needs matplotlib (the plot extra)")
    comparison, an = _failing_window()
    assert an["heat"]["values"].shape == (40, 3)  # every row; keys in blocks of 16
    path = tmp_path / ("report" + ext)
    written = report.write(path, comparison, an, context={"variant": "sdpa", "dtype": "bf16"})
    text = path.read_text()
    assert "Verdict: FAIL" in text and "one key left of the window" in text
    assert "worst (b, h, i, j)" in text
    if ext == ".md":
        assert written == [str(path), str(tmp_path / "report_heatmap.png")]
        assert (tmp_path / "report_heatmap.png").read_bytes()[:4] == b"\x89PNG"
        assert "| out | FAIL |" in text
    else:
        assert "data:image/png;base64," in text and written == [str(path)]


def test_report_without_matplotlib(tmp_path, monkeypatch):
    comparison, an = _failing_window()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report.write(tmp_path / "r.md", comparison, an)
    assert "no heat map (install matplotlib" in (tmp_path / "r.md").read_text()
    with pytest.raises(ParameterError, match="report: expected a path ending in .md or .html"):
        report.write(tmp_path / "r.txt", comparison, an)


def test_row_clusters_first_rows_and_heads():
    err = np.zeros((2, 4, 64))
    err[:, 1, :3] = 1.0  # only head 1, only the first 3 rows
    _, lines = report.row_clusters(err, 0.5)
    assert lines[0] == "6 of 512 rows (b, h, i) exceed the allowed error 0.5"
    assert "100% of them are in the first 4 query rows (i < 4)" in lines
    assert "only heads 1 fail (1 of 4)" in lines
    err = np.zeros((1, 1, 64))
    err[0, 0, -2:] = 1.0
    assert "100% of them are in the last 4 query rows (i >= 60)" in report.row_clusters(err, 0.5)[1]


def test_key_attribution_is_skipped_for_huge_cases():
    comparison, _ = _failing_window()
    rng = np.random.default_rng(6)
    case = {**{n: rng.standard_normal((1, 2, 40, 8)) for n in "qkv"}, "window": (4, 0)}
    got = impl.call(window_off_by_one, case, dtype="bf16")["out"]
    an = report.analyse(got, numerics.reference(case)["out"], 0.01, case=case, max_pairs=100)
    assert "(key attribution skipped: 3200 query-key pairs > max_pairs 100)" in an["lines"]
    assert an["worst"]["index"][3] is None and an["heat"] is None

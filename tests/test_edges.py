"""Trust at the edges: every reproducer of the "silent wrong answer" and "crash" reports, each with
the behaviour it has now (a right answer, or one named error / one line and exit 2). Each of these
failed before its fix.
"""

import io
import os
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import refattn
from refattn import errors
from refattn.cli.main import cli
from refattn.testing import inputs as dist

R = np.random.default_rng(2)


def qkv(shape=(1, 2, 16, 8), seed=2):
    r = np.random.default_rng(seed)
    return [r.standard_normal(shape) for _ in range(3)]


def run(*args, **kw):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, **kw)


def one_line_error(result, code=2, *needles):
    assert result.exit_code == code, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and "Traceback" not in result.output, err
    for n in needles:
        assert n in err[0], (n, err[0])


# -- silent wrong answers -------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e20, 1e100, 1e300])
def test_numba_at_huge_scores_equals_numpy(scale):
    """scale=1e20 gave 40 NaN and 16 zero rows on numba: the exponent's argument at the row maximum
    was an FMA's rounding error."""
    q, k, v = qkv()
    want = refattn.attention(q, k, v, scale=scale, return_lse=True)
    got = refattn.attention(q, k, v, scale=scale, backend="numba", return_lse=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-15)
    dwant = refattn.attention_backward(q, k, v, np.ones_like(want[0]), scale=scale)
    dgot = refattn.attention_backward(q, k, v, np.ones_like(want[0]), scale=scale, backend="numba")
    for a, b in zip(dgot[:3], dwant[:3]):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_scores_that_overflow_float64_are_a_named_error(backend):
    """q = 1e308 gave NaN with LSE +inf (numpy) and 0 with LSE -inf (numba): a valid-looking empty row."""
    q, k, v = qkv()
    q[0, 0, 0, 0] = 1e308
    with pytest.raises(errors.ParameterError, match=r"^q, k: expected scores .* float64 can hold"):
        refattn.attention(q, k, v, backend=backend)
    with pytest.raises(errors.ParameterError, match=r"^q, k: expected scores"):
        refattn.attention_backward(q, k, v, np.ones_like(q), backend=backend)
    q[0, 0, 0, 0] = 1e150  # large but representable scores: computed, equal on both backends
    a = refattn.attention(q, k, v, backend=backend, return_lse=True)
    assert np.isfinite(a[0]).all() and np.isfinite(a[1]).all()


def _mla():
    var = refattn.variants.get("mla")
    return var.example((1, 2, 4, 6, 8, 2), np.random.default_rng(0), var.parse_params({}))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name, value", [("q", np.nan), ("q", np.inf), ("w_dkv", np.nan),
                                         ("hidden", -np.inf)])
def test_nan_in_any_input_of_any_variant_is_an_error(backend, name, value):
    """mla gave a zero row for NaN in q, NaN (numpy) or 0 (numba) for NaN in w_dkv."""
    a = _mla()
    a[name] = a[name].copy()
    a[name].flat[0] = value
    with pytest.raises(errors.ParameterError, match=rf"^{name}: expected finite values, got 1 "):
        refattn.attention(variant="mla", backend=backend, **a)


@pytest.mark.parametrize("param, value", [("gates", np.nan), ("cmp_weight", np.nan)])
def test_nsa_nan_parameters_are_errors(param, value):
    """nsa gates=NaN passed the (0, 1) check; cmp_weight=NaN gave NaN on numpy, finite on numba."""
    q, k, v = qkv((1, 4, 64, 8))
    shape = {"gates": (1, 4, 64, 3), "cmp_weight": (16,)}[param]
    with pytest.raises(errors.ParameterError, match=rf"^{param}: expected finite values"):
        refattn.attention(q, k[:, :2], v[:, :2], variant="nsa", **{param: np.full(shape, value)})


def test_bias_may_hide_pairs_with_minus_inf_but_never_nan():
    q, k, v = qkv()
    bias = np.zeros((16, 16))
    bias[:, 3] = -np.inf
    got = refattn.attention(q, k, v, bias=bias)
    want = refattn.attention(q, k, v, mask=np.isfinite(bias))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    bias[0, 0] = np.nan
    with pytest.raises(errors.ParameterError, match=r"^bias: expected no NaN or \+inf"):
        refattn.attention(q, k, v, bias=bias)


def test_kvcache_append_refuses_nan_keys():
    from refattn.kvcache import KVCache
    cache = KVCache(1, 2, 8, capacity=4)
    with pytest.raises(errors.ParameterError, match=r"^k: expected finite values"):
        cache.append(np.full((1, 2, 1, 8), np.nan), np.zeros((1, 2, 1, 8)))
    assert cache.length == 0


def test_an_all_zero_output_file_does_not_pass(tmp_path, monkeypatch):
    """An all-zero `out` (1, 2, 4096, 64) passed: its dtype was guessed as fp8_e5m2 from the zeros
    and the allowance (0.175) exceeded max|ref| (0.141)."""
    monkeypatch.chdir(tmp_path)
    q, k, v = qkv((1, 2, 512, 64))
    np.savez("z.npz", q=q, k=k, v=v, out=np.zeros((1, 2, 512, 64)))
    one_line_error(run("compare", "--outputs", "z.npz", "--variant", "sdpa"), 2, "--dtype",
                   "also fp8_e5m2", "give --dtype fp64")
    for dtype in ("fp8_e5m2", "bf16", "fp64"):
        res = run("compare", "--outputs", "z.npz", "--variant", "sdpa", "--dtype", dtype)
        assert res.exit_code == 1 and "PASS" not in res.stdout.splitlines()[-1], dtype


def test_save_records_the_source_dtype(tmp_path):
    import ml_dtypes
    from refattn import npzio
    q, k, v = qkv((1, 2, 8, 4))
    out = refattn.attention(q, k, v).astype(ml_dtypes.bfloat16)
    npzio.save(tmp_path / "r.npz", q=q, k=k, v=v, out=out)
    assert npzio.saved_dtypes(tmp_path / "r.npz") == {"q": "float64", "k": "float64", "v": "float64",
                                                     "out": "bfloat16"}
    res = run("compare", "--outputs", str(tmp_path / "r.npz"), "--variant", "sdpa", "--json")
    import json
    assert json.loads(res.stdout)["dtype"] == "bf16"


def test_an_allowance_as_large_as_the_values_is_inconclusive():
    from refattn import numerics
    ref = np.full(8, 0.125)
    res = numerics.compare(np.zeros(8), ref, ref + 0.2, dtype="fp8_e5m2")
    assert res["verdict"] == "INCONCLUSIVE" and "zeros would pass" in res["reason"]


KERNELS = '''
import sys, time, numpy as np, refattn
def mutate(q, k, v, **p):
    q[...] = 0
    return refattn.attention(q, k, v, **p)
def exits(q, k, v, **p):
    sys.exit(0)
def interrupts(q, k, v, **p):
    raise KeyboardInterrupt
def hangs(q, k, v, **p):
    time.sleep(120)
def misuses(q, k, v, **p):
    return refattn.attention(q, k, v, causall=True)
'''


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    (tmp_path / "edge_kernels.py").write_text(KERNELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "edge_kernels", raising=False)
    return ["compare", "--variant", "sdpa", "--shape", "1,2,16,8"]


@pytest.mark.parametrize("timeout", [[], ["--timeout", "60"]])
def test_an_impl_that_writes_into_its_inputs_fails(kernels, timeout):
    """It passed: the reference was computed from the arrays the function had zeroed."""
    res = run(*kernels, "--impl", "edge_kernels:mutate", *timeout)
    assert res.exit_code == 1
    assert "modified its inputs in place: q" in res.stdout


def test_an_impl_that_exits_or_is_interrupted(kernels):
    """sys.exit(0) inside it made compare exit 0 with no output (read as PASS by CI)."""
    one_line_error(run(*kernels, "--impl", "edge_kernels:exits"), 2, "exits called sys.exit(0)")
    res = run(*kernels, "--impl", "edge_kernels:interrupts")
    assert res.exit_code == 130 and res.stderr.strip() == "Interrupted"


def test_a_refattn_error_inside_the_impl_names_the_function(kernels):
    one_line_error(run(*kernels, "--impl", "edge_kernels:misuses"), 2,
                   "impl: misuses raised ParameterError: causall")


def test_timeout_stops_a_hanging_impl(kernels):
    one_line_error(run(*kernels, "--impl", "edge_kernels:hangs", "--timeout", "2"), 2,
                   "--timeout: the function under test did not return within 2 s")
    one_line_error(run(*kernels, "--impl", "edge_kernels:hangs", "--timeout", "0"), 2, "--timeout")
    one_line_error(run(*kernels, "--timeout", "3"), 2, "--timeout: applies to --impl")


# -- crashes that are now one line and exit 2 ------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["compare", "--variant", "sdpa", "--seed", "-1"], "--seed: expected an integer in [0,"),
    (["compare", "--variant", "sdpa", "--shape", "1,1,99999999999,8"], "--shape: the inputs"),
    (["mask", "--variant", "paged"], "variant: 'paged' has no query x key pattern"),
    (["mask", "--variant", "sdpa", "--seed", "-1"], "--seed"),
    (["mask", "--variant", "sdpa", "--png", "/nonexistent/x.png"], "--png: cannot write"),
    (["mask", "--variant", "sliding_window", "--seq", "10000000"], "--seq: the example inputs"),
    (["golden", "regen", "--dir", "/proc/nope", "--case", "core_plain"], "--dir: cannot write"),
])
def test_cli_crashes_are_one_line(args, needle):
    one_line_error(run(*args), 2, needle)


def test_mask_of_nsa_shorter_than_a_block_draws():
    assert run("mask", "--variant", "nsa", "--seq", "8").exit_code == 0


def _npz(tmp_path, name, members: dict) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for key, data in members.items():
            z.writestr(key + ".npy", data)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return str(path)


def _npy(a, header_shape=None):
    b = io.BytesIO()
    if header_shape is None:
        np.save(b, a)
    else:
        np.lib.format.write_array_header_1_0(b, {"descr": "<f8", "fortran_order": False,
                                                 "shape": header_shape})
        b.write(a.tobytes())
    return b.getvalue()


def test_outputs_files_with_a_huge_or_broken_header(tmp_path):
    q, k, v = qkv((1, 2, 8, 4))
    good = {n: _npy(a) for n, a in (("k", k), ("v", v), ("out", q))}
    huge = _npz(tmp_path, "huge.npz", {**good, "q": _npy(q, (10 ** 6, 10 ** 6, 8, 4))})
    one_line_error(run("compare", "--outputs", huge, "--variant", "sdpa"), 2, "huge.npz: its arrays")
    cut = _npz(tmp_path, "cut.npz", {**good, "q": _npy(q)[:30]})
    one_line_error(run("compare", "--outputs", cut, "--variant", "sdpa"), 2,
                   "key 'q' has a truncated or unreadable .npy header")


def test_a_manifest_entry_that_is_not_a_record(tmp_path, monkeypatch):
    import json
    from refattn import golden
    target = tmp_path / "golden"
    target.mkdir()
    src = golden.directory()
    for f in ("core_plain.npz", "manifest.json"):
        (target / f).write_bytes((src / f).read_bytes())
    data = json.loads((target / "manifest.json").read_text())
    data["cases"] = {"core_plain": "oops"}
    (target / "manifest.json").write_text(json.dumps(data))
    monkeypatch.setattr(golden, "_DIRECTORY", target)
    res = run("golden", "verify", "--case", "core_plain", "--backend", "numpy")
    assert res.exit_code == 1 and "CORRUPT: core_plain: expected a record" in res.stdout


@pytest.mark.parametrize("kw, needle", [
    (dict(variant="nsa", cmp_weight="abc"), "cmp_weight: expected a real"),
    (dict(window=(10 ** 20, 0), backend="numba"), None),  # a side that long is unbounded
    (dict(backend=["numpy"]), "backend: expected a backend name"),
    (dict(variant="rope", q_positions=[0, 1, float("nan")] + list(range(3, 16))), "q_positions: expected finite"),
])
def test_api_crashes_are_named_errors(kw, needle):
    q, k, v = qkv((1, 4, 16, 8))
    if needle is None:
        np.testing.assert_array_equal(refattn.attention(q, k, v, **kw),
                                      refattn.attention(q, k, v, window=(-1, 0), backend="numba"))
        return
    with pytest.raises(errors.RefattnError, match="^" + needle.replace("(", r"\(")):
        refattn.attention(q, k[:, :2] if kw.get("variant") == "nsa" else k,
                          v[:, :2] if kw.get("variant") == "nsa" else v, **kw)


@pytest.mark.parametrize("seq, n_select", [(8, 4), (64, 4), (64, 1000)])
def test_nsa_short_sequences_and_more_selections_than_blocks(seq, n_select):
    """S < cmp_block and n_select > the number of blocks crashed (zero-size max, broadcast)."""
    q, k, v = qkv((1, 4, seq, 8))
    got = refattn.attention(q, k[:, :2], v[:, :2], variant="nsa", n_select=n_select)
    other = refattn.attention(q, k[:, :2], v[:, :2], variant="nsa", n_select=n_select, backend="numba")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(other, got, rtol=0, atol=1e-13)


def test_testing_helpers_name_their_arguments():
    from refattn.testing import assert_attention_close
    q, k, v = qkv((1, 2, 4, 8))
    with pytest.raises(errors.DTypeError, match=r"^out: expected a real"):
        assert_attention_close("abc", q=q, k=k, v=v)
    assert_attention_close(refattn.attention(q, k, v), q=q, k=k, v=v, dtype="fp64")
    with pytest.raises(AssertionError, match="normwise relative error <= 1e-12"):
        assert_attention_close(refattn.attention(q, k, v) * 1.001, q=q, k=k, v=v, dtype="fp64")
    assert_attention_close((refattn.attention(q, k, v), None), q=q, k=k, v=v)  # no LSE given
    with pytest.raises(errors.ParameterError, match=r"^actual: expected the output array"):
        assert_attention_close(None, q=q, k=k, v=v)


def test_empty_batches_and_queries_are_empty_results_zero_heads_are_errors():
    r = np.random.default_rng(0)
    for be in ("numpy", "numba"):
        out, lse = refattn.attention(*(r.standard_normal((0, 2, 4, 8)) for _ in range(3)),
                                     backend=be, return_lse=True)
        assert out.shape == (0, 2, 4, 8) and lse.shape == (0, 2, 4)
        out = refattn.attention(r.standard_normal((1, 2, 0, 8)), r.standard_normal((1, 2, 4, 8)),
                                r.standard_normal((1, 2, 4, 8)), backend=be)
        assert out.shape == (1, 2, 0, 8)
    with pytest.raises(errors.ShapeError, match=r"^q: expected query heads Hq >= 1"):
        refattn.attention(r.standard_normal((1, 0, 4, 8)), *(r.standard_normal((1, 2, 4, 8))
                                                              for _ in range(2)))
    with pytest.raises(errors.ShapeError, match=r"^q, k, v: expected the same batch size B, got 0, 1"):
        refattn.attention(r.standard_normal((0, 2, 4, 8)), *(r.standard_normal((1, 2, 4, 8))
                                                              for _ in range(2)))


def test_memory_estimate_names_the_limit():
    from refattn import memory
    with pytest.raises(errors.ParameterError, match=r"^--x: it would hold about 2.0 GiB, more than the 1.0 GiB"):
        memory.check(2 * 2 ** 30, "--x", "it", limit=2 ** 30)
    assert memory.available() is None or memory.available() > 0


# -- property: extreme magnitudes, numba against numpy -----------------------------------------------------
def grad_scales(a, dout):
    """The size of the terms that make dq, dk, dv: ``scale |dO| |v| D |k| S`` (dq, dk), ``|dO| S`` (dv)."""
    q, k, v = (float(np.abs(a[n]).max()) for n in ("q", "k", "v"))
    d, sq, sk = a["q"].shape[-1], a["q"].shape[2], a["k"].shape[2]
    do = float(np.abs(dout).max())
    ds = do * v * d / np.sqrt(d)
    return (max(ds * k * sk, 1e-300), max(ds * q * sq, 1e-300), max(do * sq, 1e-300))


def close(g, w, tol=1e-12):
    """``||g - w|| <= tol ||w||``, the norms taken of values divided by max|w| (no overflow at 1e300)."""
    s = max(float(np.max(np.abs(w), initial=0.0)), 1e-300)
    return np.linalg.norm((g - w) / s) <= tol * max(np.linalg.norm(w / s), 1e-300)



@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), sq=st.integers(1, 70), sk=st.integers(1, 70),
       causal=st.booleans(), softcap=st.sampled_from([None, 30.0]),
       window=st.sampled_from([None, (7, 3), (-1, 0)]))
def test_extreme_magnitudes_numba_equals_numpy(seed, sq, sk, causal, softcap, window):
    """Scores up to 1e300 (:mod:`refattn.testing.inputs` 'extreme'), forward and backward, on
    default and 16x16 tiles: numba equals numpy, and everything is finite."""
    from refattn.backends.numba_ import NumbaBackend
    rng = np.random.default_rng(seed)
    a = dist.make("extreme", (1, 2, sq, sk, 8, 1), rng)
    kw = dict(causal=causal, softcap=softcap, window=window)
    want = refattn.attention(**a, **kw, return_lse=True)
    dout = rng.standard_normal(want[0].shape)
    gwant = refattn.attention_backward(**a, dout=dout, **kw)
    for be in ("numba", NumbaBackend(block_q=16, block_k=16)):
        got = refattn.attention(**a, **kw, backend=be, return_lse=True)
        for g, w in zip(got, want):
            fin = np.isfinite(w)
            np.testing.assert_array_equal(np.isfinite(g), fin)
            assert close(g[fin], w[fin])
        ggot = refattn.attention_backward(**a, dout=dout, **kw, backend=be)
        for g, w, f in zip(ggot[:3], gwant[:3], grad_scales(a, dout)):
            assert np.isfinite(g).all() and np.isfinite(w).all()
            # a gradient that cancels to ~0 (one visible key: dP == delta) is rounding noise of the
            # size of its terms on both backends: the bound counts that size (f), not just |w|
            assert np.linalg.norm((g - w) / f) <= 1e-12 * (np.linalg.norm(w / f) + np.sqrt(w.size))

"""The numba backend against the numpy backend (the specification), knob by knob and at random.

Float64 contract: forward output, LSE and every gradient agree with the numpy backend to
``<= 1e-12`` normwise relative (``||a - b|| / max(||b||, 1)``: the floor keeps a gradient that is
zero in exact arithmetic, e.g. a per-row bias, from dividing rounding noise by rounding noise), and
the non-finite entries (``-inf`` LSE of empty rows) sit at the same places.

Float32 contract (``compute_dtype="float32"``): compared with the float64 numpy backend on the same
float32-representable inputs. q, k, v, S = q.k, P, dP and the outputs are stored in float32 (unit
roundoff ``u = 2**-24``); softmax statistics and accumulators are float64. Each score is a D-term
float32 dot product, each output or gradient entry a sum over up to Sk float32 products; with
rounding errors that behave like independent random variables (the usual, Higham ch. 3) these
grow like ``sqrt(D) u`` and ``sqrt(Sk) u``, and rounding the result to float32 adds ``u``. The bound
is ``4 (sqrt(D) + sqrt(Sk)) u`` normwise -- the factor 4 covering the backward's two chained
float32 products (dS from dP, then dS K). Measured errors (about ``2.5 u``) sit 15-20x below it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import numba  # noqa: E402  (a hard dependency: its absence is a failure, never a skip)

from hypothesis import given, strategies as st  # noqa: E402

import refattn  # noqa: E402
from refattn import backends, variants  # noqa: E402
from refattn import dropout as np_philox  # noqa: E402
from refattn.backends.numba_ import NumbaBackend  # noqa: E402
from refattn.backends.numba_ import _fastexp, _philox  # noqa: E402
from refattn.backends.numba_.backend import one_blas_thread, tile_plan  # noqa: E402
from refattn.backends.numpy_ import NumpyBackend  # noqa: E402
from refattn.errors import ParameterError  # noqa: E402
from refattn.patterns import EMPTY, Pattern  # noqa: E402
from refattn.variants.core import prepare  # noqa: E402

TOL64 = 1e-12
U32 = 2.0 ** -24


def normwise(a, b):
    """``||a - b|| / max(||b||, 1)`` over finite entries; non-finite entries must coincide."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    fa, fb = np.isfinite(a), np.isfinite(b)
    assert np.array_equal(fa, fb), "non-finite entries differ"
    assert np.array_equal(a[~fa], b[~fb]), "non-finite values differ"
    return float(np.linalg.norm(a[fa] - b[fb]) / max(np.linalg.norm(b[fb]), 1.0))


def run(backend, arrays, dout, params, dtype="float64"):
    """Forward and backward primitives of ``backend`` on inputs prepared by the core variant
    (so both backends see exactly the same validated records)."""
    p = variants.get("sdpa").parse_params(dict(params, compute_dtype=dtype))
    pre = prepare(backend, arrays, p)
    kw = pre.primitive_kwargs()
    out, lse = backend.attend(pre.q, pre.k, pre.v, **kw)
    grads = backend.attend_backward(pre.q, pre.k, pre.v, out, lse, dout.astype(dtype), **kw)
    return out, lse, grads


def compare(arrays, dout, params, *, block=(64, 64), tol=TOL64):
    """numba (tiles ``block``) vs numpy on every output; returns the worst error."""
    o1, l1, (dq1, dk1, dv1, ex1) = run(NumpyBackend(), arrays, dout, params)
    o2, l2, (dq2, dk2, dv2, ex2) = run(NumbaBackend(*block), arrays, dout, params)
    assert set(ex1) == set(ex2)
    errs = {"out": normwise(o2, o1), "lse": normwise(l2, l1), "dq": normwise(dq2, dq1),
            "dk": normwise(dk2, dk1), "dv": normwise(dv2, dv1)}
    errs.update({f"d{n}": normwise(ex2[n], ex1[n]) for n in ex1})
    for name, err in errs.items():
        assert err <= tol, f"{name}: normwise error {err:.3e} > {tol:.1e} ({params})"
    return max(errs.values())


def inputs(rng, b=2, hq=4, hkv=2, sq=37, sk=53, d=16, dv=11):
    arrays = {"q": rng.standard_normal((b, hq, sq, d)), "k": rng.standard_normal((b, hkv, sk, d)),
              "v": rng.standard_normal((b, hkv, sk, dv))}
    return arrays, rng.standard_normal((b, hq, sq, dv))


def knob_cases():
    rng = np.random.default_rng(11)
    b, hq, sq, sk = 2, 4, 37, 53
    return {
        "plain": {},
        "causal_bottom_right": {"causal": True},
        "causal_top_left": {"causal": "top_left"},
        "window": {"window": (5, 3)},
        "window_left_only": {"window": (7, -1), "alignment": "top_left"},
        "causal_window": {"causal": True, "window": (9, 0)},
        "mask": {"mask": rng.random((sq, sk)) < 0.5},
        "mask_per_head": {"mask": rng.random((b, hq, sq, sk)) < 0.3},
        "bias_full": {"bias": rng.standard_normal((b, hq, sq, sk))},
        "bias_heads_keys": {"bias": rng.standard_normal((1, hq, 1, sk))},
        "bias_rows": {"bias": rng.standard_normal((b, 1, sq, 1))},
        "bias_keys_2d": {"bias": rng.standard_normal((sq, sk))},
        "bias_neg_inf": {"bias": np.where(rng.random((sq, sk)) < 0.2, -np.inf, 0.0)},
        "softcap": {"softcap": 3.0},
        "alibi": {"alibi_slopes": rng.random(hq)},
        "alibi_flash_causal": {"alibi_slopes": rng.random(hq), "alibi_form": "flash", "causal": True},
        "sinks": {"sinks": rng.standard_normal(hq)},
        "dropout_philox": {"dropout_p": 0.3, "dropout_seed": 7},
        "dropout_mask": {"dropout_mask": rng.random((b, 1, sq, sk)) < 0.7, "dropout_p": 0.3},
        "head_map_uneven": {"head_map": np.array([0, 0, 0, 1])},
        "scale_negative": {"scale": -0.3},
        "everything": {"causal": True, "window": (4, 0), "softcap": 2.0,
                       "bias": rng.standard_normal((b, hq, sq, sk)), "alibi_slopes": rng.random(hq),
                       "sinks": rng.standard_normal(hq), "dropout_p": 0.2, "dropout_seed": 3},
    }


@pytest.mark.parametrize("name", list(knob_cases()))
def test_knob_matches_numpy(name):
    arrays, dout = inputs(np.random.default_rng(0))
    compare(arrays, dout, knob_cases()[name], block=(16, 8))


@pytest.mark.parametrize("block", [(1, 1), (7, 5), (64, 64), (13, 128)])
def test_tile_sizes_that_do_not_divide(block):
    arrays, dout = inputs(np.random.default_rng(1), sq=45, sk=29)
    compare(arrays, dout, {"causal": True, "sinks": np.ones(4)}, block=block)


@pytest.mark.parametrize("params, tiles", [({}, (128, 256)), ({"causal": True}, (128, 256)),
                                           ({"causal": "top_left"}, (128, 256)),
                                           ({"window": (40, 0)}, (64, 64)),
                                           ({"causal": True, "window": (40, 0)}, (64, 64)),
                                           ({"window": (-1, 3)}, (128, 256)),
                                           ({"mask": "random"}, (64, 64))])
def test_default_tiles_follow_the_pattern(params, tiles):
    """The default tile sizes: larger for a dense band (full or causal), 64 x 64 where tiles are
    skipped (a left window bound, a mask); several tiles of each in both directions (Sq = 300 is
    three 128-row tiles, Sk = 530 three 256-key tiles), against numpy."""
    rng = np.random.default_rng(5)
    arrays, dout = inputs(rng, b=1, hq=2, hkv=1, sq=300, sk=530, d=8, dv=5)
    if params.get("mask") == "random":
        params = {"mask": rng.random((300, 530)) < 0.5}
    pre = prepare(NumbaBackend(), arrays, variants.get("sdpa").parse_params(params))
    assert NumbaBackend().tile_sizes(pre.primitive_kwargs()["pattern"], 300, 530) == tiles
    assert NumbaBackend(block_q=32).tile_sizes(pre.primitive_kwargs()["pattern"], 300, 530) == (32, tiles[1])
    compare(arrays, dout, params, block=(None, None))


@pytest.mark.parametrize("params", [{"causal": True}, {"window": (3, 2), "alignment": "top_left"},
                                    {"mask": "row3_hidden"}])
def test_empty_rows(params):
    """Sq > Sk bottom-right causal hides the first Sq - Sk rows entirely; a mask can too."""
    arrays, dout = inputs(np.random.default_rng(2), sq=20, sk=6)
    if params.get("mask") == "row3_hidden":
        mask = np.ones((20, 6), bool)
        mask[3] = False
        params = {"mask": mask}
    compare(arrays, dout, params, block=(4, 4))
    out, lse = refattn.attention(arrays["q"], arrays["k"], arrays["v"], backend="numba",
                                 return_lse=True, **params)
    empty = np.isneginf(lse)
    assert empty.any()
    assert np.all(out[empty] == 0.0)


def test_public_api_routes_to_numba():
    rng = np.random.default_rng(3)
    arrays, dout = inputs(rng)
    kw = dict(causal=True, sinks=rng.standard_normal(4), return_lse=True)
    o1, l1 = refattn.attention(*arrays.values(), backend="numpy", **kw)
    o2, l2 = refattn.attention(*arrays.values(), backend="numba", **kw)
    assert normwise(o2, o1) <= TOL64 and normwise(l2, l1) <= TOL64
    g1 = refattn.attention_backward(*arrays.values(), dout, backend="numpy", **kw)
    g2 = refattn.attention_backward(*arrays.values(), dout, backend="numba", **kw)
    for a, b in zip(g2[:3], g1[:3]):
        assert normwise(a, b) <= TOL64
    assert normwise(g2[3]["sinks"], g1[3]["sinks"]) <= TOL64


@st.composite
def random_case(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 2))
    sq, sk = draw(st.integers(1, 33)), draw(st.integers(1, 33))
    d, dv = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    params = {}
    causal = draw(st.sampled_from([False, True, "top_left", "bottom_right"]))
    if causal:
        params["causal"] = causal
    if draw(st.booleans()):
        params["window"] = (draw(st.integers(-1, 12)), draw(st.integers(-1, 12)))
    params["alignment"] = draw(st.sampled_from(["bottom_right", "top_left"]))
    if draw(st.booleans()):
        params["mask"] = rng.random(draw(st.sampled_from([(sq, sk), (b, 1, sq, sk), (1, hq, 1, sk)]))) < 0.6
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(b, hq, sq, sk), (1, 1, sq, sk), (b, 1, 1, sk), (1, hq, sq, 1), (sk,)]))
        params["bias"] = rng.standard_normal(shape)
    if draw(st.booleans()):
        params["softcap"] = draw(st.floats(0.5, 20.0))
    if draw(st.booleans()):
        params["alibi_slopes"] = rng.random(hq)
        # 'flash' (+slope*j) exists only for flash-attn's causal kernel without a left window
        flash_ok = bool(causal) and params.get("window", (-1, -1))[0] == -1
        params["alibi_form"] = draw(st.sampled_from(["symmetric", "flash"] if flash_ok else ["symmetric"]))
    if draw(st.booleans()):
        params["sinks"] = rng.standard_normal(hq)
    drop = draw(st.sampled_from(["none", "seed", "mask"]))
    if drop == "seed":
        params.update(dropout_p=draw(st.floats(0.05, 0.9)), dropout_seed=draw(st.integers(0, 2 ** 64 - 1)))
    elif drop == "mask":
        params.update(dropout_p=0.25, dropout_mask=rng.random((b, hq, sq, sk)) < 0.75)
    if draw(st.booleans()):
        params["head_map"] = rng.integers(0, hkv, hq)
    block = (draw(st.integers(1, 17)), draw(st.integers(1, 17)))
    arrays, dout = inputs(rng, b, hq, hkv, sq, sk, d, dv)
    if draw(st.booleans()):
        params["scale"] = draw(st.floats(-2.0, 2.0))
    return arrays, dout, params, block


@given(random_case())
def test_random_cases_match_numpy(case):
    arrays, dout, params, block = case
    compare(arrays, dout, params, block=block)


@pytest.mark.parametrize("params", [{}, {"causal": True}, {"window": (6, 0), "softcap": 4.0,
                                                         "sinks": np.zeros(4)},
                                    {"bias": np.linspace(-1, 1, 53), "dropout_p": 0.2,
                                     "dropout_seed": 5}])
def test_float32_within_bound(params):
    rng = np.random.default_rng(4)
    arrays, dout = inputs(rng, d=16)
    arrays = {n: a.astype(np.float32).astype(np.float64) for n, a in arrays.items()}
    dout = dout.astype(np.float32).astype(np.float64)
    o1, l1, g1 = run(NumpyBackend(), arrays, dout, params)
    o2, l2, g2 = run(NumbaBackend(16, 16), arrays, dout, params, dtype="float32")
    assert o2.dtype == np.float32 and l2.dtype == np.float64
    assert all(g.dtype == np.float32 for g in g2[:3])
    d, sk = arrays["q"].shape[-1], arrays["k"].shape[2]
    bound = 4 * (math.sqrt(d) + math.sqrt(sk)) * U32
    for got, want in [(o2, o1), (l2, l1), *zip(g2[:3], g1[:3]),
                      *((g2[3][n], g1[3][n]) for n in g1[3])]:
        assert normwise(got, want) <= bound


# -- the pieces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2 ** 63 + 12345, 2 ** 64 - 1])
def test_philox_bit_identical_to_numpy_generator(seed):
    rng = np.random.default_rng(seed % 2 ** 32)
    stream = rng.integers(0, 2 ** 20, 3000).astype(np.uint64)
    flat = np.concatenate([np.arange(17), rng.integers(0, 2 ** 62, 2983)]).astype(np.uint64)
    want = np_philox.uniforms(seed, stream, flat)
    got = _philox.uniforms(np.uint64(seed), stream, flat)
    assert np.array_equal(got, want)


def test_fast_exp_accuracy():
    x = np.concatenate([np.linspace(-760.0, 2.0, 400_001), [-np.inf, 0.0, -745.2, -708.5]])
    got = np.array([_fastexp.fexp(v) for v in x[::97]] + [_fastexp.fexp(v) for v in x[-4:]])
    xs = np.concatenate([x[::97], x[-4:]])
    want = np.exp(xs)
    assert got[xs == -np.inf][0] == 0.0
    ulp = np.abs(got - want) / np.spacing(np.maximum(want, np.finfo(float).tiny))
    assert np.all((ulp <= 2) | (np.abs(got - want) <= 2 * 5e-324))


def test_tile_plan_band_costs_o_n_w():
    """A (255, 0) window at N=16384 visits about N/64 * (256/64 + 1) tiles, not (N/64)**2 / 2."""
    plan = tile_plan(Pattern(window=(255, 0)), 16384, 16384, 64, 64)
    layout = plan.vis[0]
    visited = int(np.sum(plan.thi - plan.tlo))
    assert visited <= 256 * 5
    assert int(np.sum(layout != EMPTY)) <= 256 * 5
    causal = tile_plan(Pattern(causal=True), 16384, 16384, 64, 64)
    assert int(np.sum(causal.thi - causal.tlo)) == 256 * 257 // 2


def test_blas_pinned_to_one_thread_inside_kernels():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with one_blas_thread():
        blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    scipy_blas = [i for i in blas if "scipy" in i["filepath"] and "64_" not in i["filepath"]]
    assert scipy_blas, "SciPy's OpenBLAS (numba's np.dot) must be loaded before the limit"
    assert all(i["num_threads"] == 1 for i in blas)


def test_registry():
    be = backends.get("numba")
    assert isinstance(be, NumbaBackend) and be.name == "numba"
    assert be.compute_dtypes == ("float64", "float32")


# -- the on-disk cache and bit-identical results ------------------------------------------------------
def test_the_cache_stamp_covers_every_kernel_source(tmp_path):
    """numba keys a cached function on its own file only; ours add the digest of every source of
    the package, so an edit of _tiles.py alone (an upgrade, a developer's change) recompiles."""
    import shutil

    from refattn.backends.numba_ import _cache, _kernels
    assert _cache.INSTALLED, "numba's cache-locator classes moved: the stale-cache guard is off"
    for kernel in (_kernels.forward, _kernels.backward_kv, _kernels.backward_q):
        locator = kernel._cache._impl.locator
        assert type(locator).__name__.startswith("PackageStamped")
        assert locator.get_source_stamp()[1] == _cache.PACKAGE_DIGEST
    for path in _cache.HERE.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    assert _cache.package_digest(tmp_path) == _cache.PACKAGE_DIGEST
    with open(tmp_path / "_tiles.py", "a") as f:
        f.write("\n# an edit of a callee only\n")
    assert _cache.package_digest(tmp_path) != _cache.PACKAGE_DIGEST
    # and functions of other packages keep numba's own locators
    from numba.core import caching
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
    ours = [c for c in impl._locator_classes if c.__name__.startswith("PackageStamped")]
    assert ours and all(c.from_function(test_registry, __file__) is None for c in ours)


BIT_SCRIPT = """
import sys, numpy as np, refattn
r = np.random.default_rng(0)
q, k, v = (r.standard_normal((1, 2, 100, 64)) for _ in range(3))
out, lse = refattn.attention(q, k, v, causal=True, backend="numba", return_lse=True)
dq, dk, dv, _ = refattn.attention_backward(q, k, v, np.ones_like(out), causal=True, backend="numba")
np.savez(sys.argv[1], out=out, lse=lse, dq=dq, dk=dk, dv=dv)
"""


@pytest.mark.slow
def test_a_fresh_compile_and_the_warm_cache_give_identical_bits(tmp_path):
    """One process compiles into an empty NUMBA_CACHE_DIR, a second loads what it cached, a third
    uses the package's own cache: forward and backward agree bit for bit."""
    import os
    import subprocess
    import sys
    script = tmp_path / "bits.py"
    script.write_text(BIT_SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    for name in ("fresh", "warm"):
        subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.npz")], env=env,
                       check=True, timeout=900)
    plain = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "package.npz")], env=plain,
                   check=True, timeout=900)
    fresh, warm, package = (np.load(tmp_path / f"{n}.npz") for n in ("fresh", "warm", "package"))
    for key in fresh.files:
        assert fresh[key].tobytes() == warm[key].tobytes() == package[key].tobytes(), key


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_tile_size(bad):
    with pytest.raises(ParameterError, match="block_q"):
        NumbaBackend(block_q=bad)


def test_float32_not_on_numpy_backend():
    arrays, _ = inputs(np.random.default_rng(5))
    with pytest.raises(ParameterError, match="compute_dtype"):
        refattn.attention(*arrays.values(), backend="numpy", compute_dtype="float32")
    out = refattn.attention(*arrays.values(), backend="numba", compute_dtype="float32")
    assert out.dtype == np.float32


# -- refattn bench ------------------------------------------------------------------------------
def test_bench_cli_json():
    import json

    from click.testing import CliRunner

    from refattn.cli.main import cli

    res = CliRunner().invoke(cli, ["bench", "--shape", "1,2,40,8", "--window", "5,0", "--repeats", "1",
                                   "--no-torch", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = {(r["mask"], r["pass"], r["impl"]): r for r in out["rows"]}
    assert set(rows) == {(m, p, i) for m in ("full", "causal", "window")
                         for p in ("forward", "backward") for i in ("numba", "numpy")}
    # honest FLOPs: 4 * D * visible pairs per head; causal 40*41/2 pairs, window (5, 0) 6 per row
    # once past the first five rows
    pairs = {"full": 40 * 40, "causal": 40 * 41 // 2, "window": sum(min(i + 1, 6) for i in range(40))}
    for (mask, pass_, impl), r in rows.items():
        flops = 2 * 4 * 8 * pairs[mask] * (2.5 if pass_ == "backward" else 1.0)
        assert math.isclose(r["gflops"] * 1e9 * r["seconds"], flops, rel_tol=1e-9)
        assert r["vs_torch"] is None
    assert out["torch"] == "not timed (--no-torch)"  # the empty column says why
    names = {(r["pass"], r["name"]) for r in out["ratios"]}
    assert ("forward", "causal/full") in names and ("forward", "dense causal/window") in names
    assert set(out["machine"]["gemm_gflops"]) == {"float64"} and out["machine"]["gemm_gflops"]["float64"] > 0


def test_bench_times_torch_backward_in_the_same_rounds():
    """torch's backward is a callable of the interleaved rounds that times ``grad`` alone: best_of
    takes the seconds it returns, not its wall time (which includes building the graph)."""
    import time

    from refattn.cli.bench import Timed, best_of

    calls = []

    def slow_but_timed():
        calls.append("t")
        time.sleep(0.02)
        return Timed(1e-6)

    def plain():
        calls.append("p")

    best = best_of({"t": slow_but_timed, "p": plain}, 3)
    assert best["t"] == 1e-6 and 0 < best["p"] < 0.02
    assert calls == ["t", "p"] * 4  # one warm-up, then rounds alternate


@pytest.mark.parametrize("args", [["--shape", "1,2,3"], ["--window", "5"], ["--shape", "1,2,8,9,4,2"],
                                  ["--shape", "1,64,4000000,128"]])
def test_bench_cli_usage_errors(args):
    from click.testing import CliRunner

    from refattn.cli.main import cli

    res = CliRunner().invoke(cli, ["bench", "--no-torch", *args])
    assert res.exit_code == 2
    assert "Traceback" not in res.output


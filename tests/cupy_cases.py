"""The CuPy backend checked against the numpy backend (the specification), knob by knob.

Plain functions that raise ``AssertionError`` -- no pytest or Hypothesis needed -- so the same checks
run three ways:

* ``tests/test_cupy_emulated.py``: on the CPU through ``tests/cuda_emulator.py`` (CI, every machine);
* ``tests/test_cupy_gpu.py``: on a CUDA device (skipped with a reason without one);
* ``python tests/cupy_cases.py``: on a CUDA device without pytest (``benchmarks/gpu_check.sh`` uses it
  when pytest is missing); prints one line per check and a summary, exit 1 on any failure.

Float64 contract: forward output, LSE and every gradient within ``1e-12`` normwise
(``||a - b|| / max(||b||, 1)``), non-finite entries (``-inf`` LSE of empty rows) at the same places.
Float32 (``compute_dtype="float32"``): within ``4 (sqrt(D) + sqrt(Sk)) u``, ``u = 2**-24``, of float64
numpy on float32-representable inputs -- the bound ``tests/test_numba.py`` derives.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from refattn import variants
from refattn.backends.base import Dropout, ScoreMod
from refattn.backends.numpy_ import NumpyBackend
from refattn.patterns import (PARTIAL, BlockSparse, Dilated, Global, Heads, LocalBlocks, Pattern,
                              RandomKeys, random_keys)
from refattn.variants.core import prepare

TOL64 = 1e-12
U32 = 2.0 ** -24
NUMPY = NumpyBackend()


def normwise(a, b):
    """``||a - b|| / max(||b||, 1)`` over finite entries; non-finite entries must coincide."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    fa, fb = np.isfinite(a), np.isfinite(b)
    assert np.array_equal(fa, fb), "non-finite entries differ"
    assert np.array_equal(a[~fa], b[~fb]), "non-finite values differ"
    return float(np.linalg.norm(a[fa] - b[fb]) / max(np.linalg.norm(b[fb]), 1.0))


def host(be, x):
    return be.to_numpy(x)


def inputs(rng, b=2, hq=4, hkv=2, sq=37, sk=53, d=16, dv=11):
    arrays = {"q": rng.standard_normal((b, hq, sq, d)), "k": rng.standard_normal((b, hkv, sk, d)),
              "v": rng.standard_normal((b, hkv, sk, dv))}
    return arrays, rng.standard_normal((b, hq, sq, dv))


def run_sdpa(be, arrays, dout, params, dtype="float64"):
    """attend + attend_backward of ``be`` on inputs prepared by the sdpa variant (both backends see
    the same validated records)."""
    p = variants.get("sdpa").parse_params(dict(params, compute_dtype=dtype))
    pre = prepare(be, arrays, p)
    kw = pre.primitive_kwargs()
    out, lse = be.attend(pre.q, pre.k, pre.v, **kw)
    dq, dk, dv, ex = be.attend_backward(pre.q, pre.k, pre.v, out, lse, dout.astype(dtype), **kw)
    return ([host(be, x) for x in (out, lse, dq, dk, dv)], {n: host(be, g) for n, g in ex.items()})


def compare_sdpa(be, arrays, dout, params, tol=TOL64):
    """Every output of ``be`` against numpy; returns the errors."""
    want, wex = run_sdpa(NUMPY, arrays, dout, params)
    got, gex = run_sdpa(be, arrays, dout, params)
    assert set(wex) == set(gex), f"extras differ: {set(gex)} vs {set(wex)}"
    errs = {n: normwise(g, w) for n, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
    errs.update({f"d{n}": normwise(gex[n], wex[n]) for n in wex})
    for name, err in errs.items():
        assert err <= tol, f"{name}: normwise error {err:.3e} > {tol:.1e}"
    return errs


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
        "bias_scalar": {"bias": rng.standard_normal((1, 1, 1, 1))},
        "bias_keys_2d": {"bias": rng.standard_normal((sq, sk))},
        "bias_neg_inf": {"bias": np.where(rng.random((sq, sk)) < 0.2, -np.inf, 0.0)},
        "softcap": {"softcap": 3.0},
        "alibi": {"alibi_slopes": rng.random(hq)},
        "alibi_causal_top_left": {"alibi_slopes": rng.random(hq), "causal": "top_left"},
        "alibi_flash_causal": {"alibi_slopes": rng.random(hq), "alibi_form": "flash", "causal": True},
        "sinks": {"sinks": rng.standard_normal(hq)},
        "dropout_philox": {"dropout_p": 0.3, "dropout_seed": 7},
        "dropout_philox_big_seed": {"dropout_p": 0.5, "dropout_seed": 2 ** 64 - 1},
        "dropout_mask": {"dropout_mask": rng.random((b, 1, sq, sk)) < 0.7, "dropout_p": 0.3},
        "head_map_uneven": {"head_map": np.array([0, 0, 0, 1])},
        "scale_negative": {"scale": -0.3},
        "everything": {"causal": True, "window": (4, 0), "softcap": 2.0,
                       "bias": rng.standard_normal((b, hq, sq, sk)), "alibi_slopes": rng.random(hq),
                       "sinks": rng.standard_normal(hq), "dropout_p": 0.2, "dropout_seed": 3},
    }


def check_knob(be, name):
    arrays, dout = inputs(np.random.default_rng(0))
    return compare_sdpa(be, arrays, dout, knob_cases()[name])


#: (sq, sk): one tile, ragged tiles, several tiles both ways, Sq > Sk (empty rows)
SHAPES = [(1, 1), (5, 3), (45, 29), (70, 130), (20, 6)]


def check_shape(be, sq, sk, causal=True):
    arrays, dout = inputs(np.random.default_rng(1), b=1, hq=2, hkv=1, sq=sq, sk=sk, d=8, dv=5)
    return compare_sdpa(be, arrays, dout, {"causal": causal, "sinks": np.ones(2)})


def check_empty_rows(be):
    """Sq > Sk bottom-right causal hides the first Sq - Sk rows; a mask can hide a row too."""
    arrays, dout = inputs(np.random.default_rng(2), sq=20, sk=6)
    mask = np.ones((20, 6), bool)
    mask[3] = False
    errs = {}
    for params in ({"causal": True}, {"window": (3, 2), "alignment": "top_left"}, {"mask": mask}):
        errs.update(compare_sdpa(be, arrays, dout, params))
        (out, lse, *_), _ = run_sdpa(be, arrays, dout, params)
        empty = np.isneginf(lse)
        assert empty.any() and np.all(out[empty] == 0.0)
    return errs


def check_wide_heads(be):
    """D and Dv beyond one block's 128 columns: the column blocks recompute the scores."""
    arrays, dout = inputs(np.random.default_rng(3), b=1, hq=2, hkv=1, sq=19, sk=40, d=136, dv=130)
    return compare_sdpa(be, arrays, dout, {"causal": True, "bias": np.ones((1, 1, 1, 40))})


FLOAT32_PARAMS = [{}, {"causal": True},
                  {"window": (6, 0), "softcap": 4.0, "sinks": np.zeros(4)},
                  {"bias": np.linspace(-1, 1, 53), "dropout_p": 0.2, "dropout_seed": 5}]


def check_float32(be, params):
    rng = np.random.default_rng(4)
    arrays, dout = inputs(rng, d=16)
    arrays = {n: a.astype(np.float32).astype(np.float64) for n, a in arrays.items()}
    dout = dout.astype(np.float32).astype(np.float64)
    want, wex = run_sdpa(NUMPY, arrays, dout, params)
    got, gex = run_sdpa(be, arrays, dout, params, dtype="float32")
    assert got[0].dtype == np.float32 and got[1].dtype == np.float64
    assert all(g.dtype == np.float32 for g in got[2:])
    bound = 4 * (math.sqrt(16) + math.sqrt(53)) * U32
    errs = {n: normwise(g, w) for n, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
    errs.update({f"d{n}": normwise(gex[n], wex[n]) for n in wex})
    for name, err in errs.items():
        assert err <= bound, f"{name}: normwise error {err:.3e} > float32 bound {bound:.1e}"
    return errs


def sparse_patterns(sq=96, sk=96, hq=4):
    """Patterns with PARTIAL tiles read from the host's tile plan (not the analytic band)."""
    rng = np.random.default_rng(5)
    nbq, nbk = -(-sq // 16), -(-sk // 16)
    return {
        "dilated": Dilated(steps=(20, 3), dilation=3),
        "global_or_window": Global(tokens=[0, 17, 50]) | Pattern(window=(8, 8)),
        "block_sparse_heads": BlockSparse(layout=rng.random((hq, nbq, nbk)) < 0.3, block_q=16,
                                          block_k=16),
        "random_keys_causal": Pattern(causal=True) & RandomKeys(table=random_keys(1, sq, sk, 9)),
        "local_blocks": LocalBlocks(block=24, causal=True),
        "per_head": Heads(parts=tuple(Pattern(window=(w, 0)) for w in (3, 40, 7, 90))),
        "dense_mask_batch": Pattern(dense=rng.random((2, 1, sq, sk)) < 0.4),
    }


def check_sparse(be, name):
    """attend / attend_backward with a sparse Pattern (GQA, a bias, sinks) against numpy."""
    rng = np.random.default_rng(6)
    sq = sk = 96
    arrays, dout = inputs(rng, b=2, hq=4, hkv=2, sq=sq, sk=sk, d=12, dv=7)
    pattern = sparse_patterns(sq, sk)[name]
    layout, _, _ = pattern.tile_plan(32, 32, sq=sq, sk=sk)
    assert (layout == PARTIAL).any(), "the case must exercise PARTIAL tiles"
    kw = dict(pattern=pattern, scale=0.3, head_map=np.array([0, 0, 1, 1]),
              score_mod=ScoreMod(softcap=5.0, bias=rng.standard_normal((1, 4, 1, sk))),
              sinks=rng.standard_normal(4), dropout=Dropout(p=0.1, seed=9))
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    o1, l1 = NUMPY.attend(q, k, v, **kw)
    g1 = NUMPY.attend_backward(q, k, v, o1, l1, dout, **kw)
    o2, l2 = be.attend(q, k, v, **kw)
    g2 = be.attend_backward(q, k, v, host(be, o2), host(be, l2), dout, **kw)
    errs = {"out": normwise(host(be, o2), o1), "lse": normwise(host(be, l2), l1)}
    errs.update({n: normwise(host(be, a), b) for n, a, b in zip(("dq", "dk", "dv"), g2[:3], g1[:3])})
    errs.update({f"d{n}": normwise(host(be, g2[3][n]), g1[3][n]) for n in g1[3]})
    for n, err in errs.items():
        assert err <= TOL64, f"{n}: normwise error {err:.3e}"
    return errs


PAGED_PARAMS = [{}, {"sliding_window": 5}, {"softcap": 3.0, "sinks": "ones"},
                {"alibi_slopes": "random"}, {"causal": False}]


def check_paged(be, params):
    """``paged_attend`` (K/V read through the block table on the device) against the ``paged``
    variant on numpy (gather, then attend)."""
    var = variants.get("paged")
    rng = np.random.default_rng(7)
    shape = (3, 4, 4, 23, 8, 2)
    p = var.parse_params({"block_size": 4})
    arrays = var.example(shape, rng, p)
    params = dict(params)
    if params.get("sinks") == "ones":
        params["sinks"] = np.ones(4)
    if params.get("alibi_slopes") == "random":
        params["alibi_slopes"] = rng.random(4)
    p = var.parse_params({"block_size": 4, "return_lse": True, **params})
    want_out, want_lse = var.forward(NUMPY, arrays, p)
    window = None if p.sliding_window is None else (p.sliding_window - 1, 0)
    sm = ScoreMod(softcap=p.softcap, alibi_slopes=p.alibi_slopes)
    out, lse = be.paged_attend(arrays["q"], arrays["k_pages"], arrays["v_pages"],
                               arrays["block_table"], arrays["seq_lens"], scale=1 / math.sqrt(8),
                               head_map=np.arange(4) // 2, causal=p.causal, window=window,
                               score_mod=None if sm.is_identity else sm, sinks=p.sinks)
    errs = {"out": normwise(host(be, out), want_out), "lse": normwise(host(be, lse), want_lse)}
    for n, err in errs.items():
        assert err <= TOL64, f"{n}: normwise error {err:.3e}"
    return errs


def check_merge_states(be):
    rng = np.random.default_rng(8)
    o_a, o_b = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((2, 3, 5, 6))
    l_a, l_b = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    l_a[0, 0, :2] = -np.inf           # one part empty
    l_a[1, 2, 3] = l_b[1, 2, 3] = -np.inf  # both empty
    o_a[1, 2, 3] = o_b[1, 2, 3] = 0.0
    l_b[0, 1, 1] = l_a[0, 1, 1]       # equal: logaddexp's x + log 2 branch
    want = NUMPY.merge_states(o_a, l_a, o_b, l_b)
    got = be.merge_states(o_a, l_a, o_b, l_b)
    errs = {"out": normwise(host(be, got[0]), want[0]), "lse": normwise(host(be, got[1]), want[1])}
    for n, err in errs.items():
        assert err <= TOL64, f"{n}: normwise error {err:.3e}"
    return errs


#: small blocks so BigBird is sparse (not its full-attention fallback) at a short length
VARIANT_PARAMS = {"bigbird": {"block_size": 16, "num_random_blocks": 1}}
#: small shapes (B, Hq, Sq, Sk, D, Hkv) per variant; the default is (2, 4, 40, 40, 16, 2)
VARIANT_SHAPES = {"mha": (2, 4, 40, 40, 16, 4), "mqa": (2, 4, 40, 40, 16, 1),
                  "bigbird": (1, 2, 160, 160, 16, 2), "longformer": (1, 2, 128, 128, 16, 2),
                  "nsa": None}  # None: the variant's own default shape


def variant_names():
    """Every registered variant that lists the cupy backend (all but the numpy-only ``flash``)."""
    return [v.name for v in variants.list() if "cupy" in v.backends]


def _named_grads(g) -> dict:
    """A variant backward's result as ``{name: array}``: ``(dq, dk, dv, extras)`` or a dict keyed
    by input name (both forms exist)."""
    if isinstance(g, dict):
        return {n: np.asarray(a) for n, a in g.items()}
    *grads, extras = g
    return {**{n: np.asarray(a) for n, a in zip(("q", "k", "v"), grads)},
            **{f"extra.{n}": np.asarray(a) for n, a in extras.items()}}


def check_variant(be, name):
    """A registered variant's forward and backward on ``be`` against numpy, with its example."""
    var = variants.get(name)
    rng = np.random.default_rng(9)
    fields = var.params.__dataclass_fields__
    p = var.parse_params({**({"return_lse": True} if "return_lse" in fields else {}),
                          **VARIANT_PARAMS.get(name, {})})
    shape = VARIANT_SHAPES.get(name, (2, 4, 40, 40, 16, 2)) or var.default_shape
    arrays = var.example(shape, rng, p)
    want = var.forward(NUMPY, arrays, p)
    got = var.forward(be, arrays, p)
    want, got = (w if isinstance(w, tuple) else (w,) for w in (want, got))
    errs = {f"out{n}": normwise(g, w) for n, (g, w) in enumerate(zip(got, want))}
    if var.backward is not None:
        dout = rng.standard_normal(np.shape(want[0]))
        gw, gg = (_named_grads(var.backward(b, arrays, dout, p)) for b in (NUMPY, be))
        assert set(gg) == set(gw), f"{name}: gradients {sorted(gg)} vs {sorted(gw)}"
        errs.update({f"d{n}": normwise(gg[n], gw[n]) for n in gw})
    for n, err in errs.items():
        assert err <= var.tolerance, f"{name} {n}: normwise error {err:.3e} > {var.tolerance:.0e}"
    return errs


def random_params(seed):
    """A random case over every knob (the numba test's generator, seeded, without Hypothesis)."""
    r = np.random.default_rng(seed)
    b, hkv = int(r.integers(1, 3)), int(r.integers(1, 4))
    hq = hkv * int(r.integers(1, 3))
    sq, sk = (int(x) for x in r.integers(1, 80, 2))
    d, dv = (int(x) for x in r.integers(1, 20, 2))
    params = {}
    causal = [False, True, "top_left", "bottom_right"][int(r.integers(4))]
    if causal:
        params["causal"] = causal
    if r.random() < 0.5:
        params["window"] = (int(r.integers(-1, 30)), int(r.integers(-1, 30)))
    params["alignment"] = ["bottom_right", "top_left"][int(r.integers(2))]
    if r.random() < 0.4:
        shape = [(sq, sk), (b, 1, sq, sk), (1, hq, 1, sk)][int(r.integers(3))]
        params["mask"] = r.random(shape) < 0.6
    if r.random() < 0.5:
        shape = [(b, hq, sq, sk), (1, 1, sq, sk), (b, 1, 1, sk), (1, hq, sq, 1), (sk,)][int(r.integers(5))]
        params["bias"] = r.standard_normal(shape)
    if r.random() < 0.5:
        params["softcap"] = float(r.uniform(0.5, 20.0))
    if r.random() < 0.5:
        params["alibi_slopes"] = r.random(hq)
        flash_ok = bool(causal) and params.get("window", (-1, -1))[0] == -1
        if flash_ok and r.random() < 0.5:
            params["alibi_form"] = "flash"
    if r.random() < 0.5:
        params["sinks"] = r.standard_normal(hq)
    drop = int(r.integers(3))
    if drop == 1:
        params.update(dropout_p=float(r.uniform(0.05, 0.9)), dropout_seed=int(r.integers(0, 2 ** 63)))
    elif drop == 2:
        params.update(dropout_p=0.25, dropout_mask=r.random((b, hq, sq, sk)) < 0.75)
    if r.random() < 0.5:
        params["head_map"] = r.integers(0, hkv, hq)
    if r.random() < 0.3:
        params["scale"] = float(r.uniform(-2.0, 2.0))
    arrays, dout = inputs(r, b, hq, hkv, sq, sk, d, dv)
    return arrays, dout, params


def check_random(be, seed):
    arrays, dout, params = random_params(seed)
    return compare_sdpa(be, arrays, dout, params)


def all_checks(random_cases=20):
    """``[(name, function(be))]`` of every check above (the GPU's full list)."""
    checks = [(f"knob[{n}]", lambda be, n=n: check_knob(be, n)) for n in knob_cases()]
    checks += [(f"shape[{sq}x{sk}]", lambda be, s=(sq, sk): check_shape(be, *s)) for sq, sk in SHAPES]
    checks += [("empty_rows", check_empty_rows), ("wide_heads", check_wide_heads),
               ("merge_states", check_merge_states)]
    checks += [(f"float32[{i}]", lambda be, p=p: check_float32(be, p)) for i, p in enumerate(FLOAT32_PARAMS)]
    checks += [(f"sparse[{n}]", lambda be, n=n: check_sparse(be, n)) for n in sparse_patterns()]
    checks += [(f"paged[{i}]", lambda be, p=p: check_paged(be, p)) for i, p in enumerate(PAGED_PARAMS)]
    checks += [(f"variant[{n}]", lambda be, n=n: check_variant(be, n)) for n in variant_names()]
    checks += [(f"random[{s}]", lambda be, s=s: check_random(be, s)) for s in range(random_cases)]
    return checks


def main(argv=None) -> int:
    """Run every check on the CUDA device (``refattn.backends.get("cupy")``); exit 1 on a failure."""
    import traceback

    from refattn import backends

    be = backends.get("cupy")
    print(f"cupy backend on {be.device_name}")
    failed = 0
    checks = all_checks()
    t0 = time.perf_counter()
    for name, check in checks:
        t = time.perf_counter()
        try:
            errs = check(be)
            worst = max(errs.values()) if errs else 0.0
            print(f"PASS {name:32s} worst {worst:.2e}  {time.perf_counter() - t:6.2f}s", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on
            failed += 1
            print(f"FAIL {name:32s} {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
    print(f"{len(checks) - failed} passed, {failed} failed in {time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

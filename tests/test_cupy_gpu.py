"""The CuPy backend on a CUDA device against the numpy backend (skipped with a reason without one).

Every check of tests/cupy_cases.py (every knob forward and backward, float64 to 1e-12, float32 to its
bound, GQA, sparse patterns with PARTIAL tiles, paged decode, merge_states, variants, seeded random
cases), plus what only a device shows: numpy in gives numpy out, cupy in gives cupy out, the public
API routes to the backend, and sizes with many tiles. No Hypothesis here: the GPU machine may not
have it (``benchmarks/gpu_check.sh`` runs this file with ``--noconftest``).
"""

from __future__ import annotations

import numpy as np
import pytest

import cupy_cases as C

cupy = pytest.importorskip("cupy", reason="the cupy backend needs CuPy and a CUDA GPU")

import refattn  # noqa: E402
from refattn import backends  # noqa: E402
from refattn.errors import BackendUnavailable  # noqa: E402
from refattn.patterns import Pattern  # noqa: E402

try:
    BACKEND = backends.get("cupy")
except BackendUnavailable as exc:
    pytest.skip(f"no usable CUDA device: {exc}", allow_module_level=True)

CHECKS = dict(C.all_checks(random_cases=40))


@pytest.mark.parametrize("name", list(CHECKS))
def test_matches_numpy(name):
    CHECKS[name](BACKEND)


def test_numpy_in_numpy_out_cupy_in_cupy_out():
    rng = np.random.default_rng(0)
    (arrays, dout) = C.inputs(rng)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    kw = dict(pattern=Pattern(causal=True), scale=0.25, head_map=np.array([0, 0, 1, 1]))
    out, lse = BACKEND.attend(q, k, v, **kw)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    g = BACKEND.attend_backward(q, k, v, out, lse, dout, **kw)
    assert all(isinstance(x, np.ndarray) for x in g[:3])
    qd, kd, vd, dod = (cupy.asarray(a) for a in (q, k, v, dout))
    out_d, lse_d = BACKEND.attend(qd, kd, vd, **kw)
    assert isinstance(out_d, cupy.ndarray) and isinstance(lse_d, cupy.ndarray)
    assert C.normwise(out_d.get(), out) == 0.0 and C.normwise(lse_d.get(), lse) == 0.0
    gd = BACKEND.attend_backward(qd, kd, vd, out_d, lse_d, dod, **kw)
    assert all(isinstance(x, cupy.ndarray) for x in gd[:3])
    for a, b in zip(gd[:3], g[:3]):
        assert C.normwise(a.get(), b) == 0.0
    m = BACKEND.merge_states(out_d, lse_d, out_d, lse_d)
    assert isinstance(m[0], cupy.ndarray)
    assert isinstance(BACKEND.merge_states(out, lse, out, lse)[0], np.ndarray)


def test_public_api_routes_to_cupy():
    rng = np.random.default_rng(3)
    arrays, dout = C.inputs(rng)
    kw = dict(causal=True, sinks=rng.standard_normal(4), return_lse=True)
    o1, l1 = refattn.attention(*arrays.values(), backend="numpy", **kw)
    o2, l2 = refattn.attention(*arrays.values(), backend="cupy", **kw)
    assert C.normwise(o2, o1) <= C.TOL64 and C.normwise(l2, l1) <= C.TOL64
    g1 = refattn.attention_backward(*arrays.values(), dout, backend="numpy", **kw)
    g2 = refattn.attention_backward(*arrays.values(), dout, backend="cupy", **kw)
    for a, b in zip(g2[:3], g1[:3]):
        assert C.normwise(a, b) <= C.TOL64
    out32 = refattn.attention(*arrays.values(), backend="cupy", compute_dtype="float32")
    assert out32.dtype == np.float32


@pytest.mark.parametrize("params", [{"causal": True}, {"window": (100, 0)}, {}])
def test_many_tiles(params):
    """Sizes with many query and key tiles (both passes of the backward loop over many)."""
    rng = np.random.default_rng(4)
    arrays, dout = C.inputs(rng, b=1, hq=8, hkv=2, sq=700, sk=900, d=64, dv=64)
    C.compare_sdpa(BACKEND, arrays, dout, params)


def test_kernels_cached_per_device():
    from refattn.backends.cupy_ import _loader

    BACKEND.warm()
    dev = cupy.cuda.Device().id
    assert {(dev, s) for s in _loader.SOURCES} <= set(_loader._modules)
    assert _loader.module("attend_forward.cu") is _loader.module("attend_forward.cu")

"""The CuPy backend's host side, without a GPU: the parameter records against the C structs, the
loader's translation units, the tile plans against :class:`~refattn.patterns.Pattern`, the packed
records, the CUDA Philox source against numpy, and how a missing CuPy or device is reported."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from refattn import backends, dropout as np_philox
from refattn.backends.base import Dropout, ScoreMod
from refattn.backends.cupy_ import _abi, _loader, _plan
from refattn.errors import BackendUnavailable
from refattn.patterns import EMPTY, FULL, PARTIAL, BlockSparse, Dilated, Global, Pattern

C_KINDS = {"double": _abi.F64, "i64": _abi.I64, "u64": _abi.U64}


def c_struct_fields(name):
    """``[(field, kind)]`` of ``struct <name>`` in common.cuh, read from the C text."""
    text = _loader.read("common.cuh")
    body = re.search(r"struct %s \{(.*?)\n\};" % name, text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    fields = []
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        ctype, names = re.match(r"((?:const )?[a-z0-9_ ]+?\**) ([A-Za-z_][\w, ]*)$", decl).groups()
        kind = _abi.PTR if "*" in ctype else C_KINDS[ctype.strip()]
        fields += [(n.strip(), kind) for n in names.split(",")]
    return fields


@pytest.mark.parametrize("struct, fields", [("AttendParams", _abi.ATTEND_FIELDS),
                                            ("MergeParams", _abi.MERGE_FIELDS)])
def test_records_match_the_c_structs(struct, fields):
    assert c_struct_fields(struct) == list(fields)
    dtype = _abi.ATTEND_PARAMS if struct == "AttendParams" else _abi.MERGE_PARAMS
    assert dtype.itemsize == 8 * len(fields)  # every field 8 bytes: no padding to disagree about
    assert [dtype.fields[n][1] for n, _ in fields] == [8 * i for i in range(len(fields))]


def test_record_rejects_unknown_fields_and_wraps_seeds():
    rec = _abi.record(_abi.ATTEND_PARAMS, lambda a: 1234, q=np.zeros(1), seed=2 ** 64 - 1, Sq=7)
    assert int(rec["q"]) == 1234 and int(rec["seed"]) == 2 ** 64 - 1 and int(rec["Sq"]) == 7
    assert int(rec["k"]) == 0  # absent arrays are null pointers
    with pytest.raises(KeyError, match="not a field"):
        _abi.record(_abi.ATTEND_PARAMS, id, sq=1)


# -- the loader ---------------------------------------------------------------------------------
@pytest.mark.parametrize("source", _loader.SOURCES)
def test_translation_unit(source):
    text = _loader.translation_unit(source)
    assert "#include" not in text  # NVRTC has no host headers
    lines = text.splitlines()
    for key, value in _abi.defines().items():
        assert f"#define {key} {value}" in lines
    marks = [ln for ln in lines if ln.startswith("#line")]
    assert marks == [f'#line 1 "{n}"' for n in _loader.HEADERS + (source,)] + \
        ['#line 1 "<refattn instantiations>"']
    # each #line is followed by the file's own text, so compiler messages point into it
    for name in _loader.HEADERS + (source,):
        start = lines.index(f'#line 1 "{name}"') + 1
        own = _loader.read(name).rstrip("\n").splitlines()
        assert lines[start:start + len(own)] == own
    inst = lines[lines.index('#line 1 "<refattn instantiations>"') + 1:]
    want = []
    for dtype, (ctype, suffix) in _abi.STORAGE.items():
        tiles = "".join(f", {n}" for n in _abi.TILES.get(source, {}).get(dtype, ()))
        want.append(f"REFATTN_INSTANTIATE({ctype}, {suffix}{tiles})")
    assert inst == want
    for kernel in _loader.kernel_names(source):
        stem = kernel.rsplit("_", 1)[0]
        assert f"{stem}_##SUFFIX" in text


def test_kernel_names():
    assert _loader.kernel_names("attend_backward.cu") == [
        "attend_backward_kv_f64", "attend_backward_kv_f32", "attend_backward_q_f64",
        "attend_backward_q_f32"]
    with pytest.raises(KeyError):
        _loader.translation_unit("nope.cu")


def test_kernel_sources_ship_as_package_data():
    import configparser
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    assert "refattn.backends.cupy_" in cfg["options"]["packages"].split()
    data = cfg["options.package_data"]["refattn.backends.cupy_"]
    assert "kernels/*.cu" in data and "kernels/*.cuh" in data


# -- tile plans ---------------------------------------------------------------------------------
BAND_PATTERNS = [Pattern(), Pattern(causal=True), Pattern(causal=True, alignment="top_left"), Pattern(window=(5, 3)),
                 Pattern(window=(7, -1), alignment="top_left"), Pattern(causal=True, window=(40, 0)),
                 Pattern(window=(-1, 0)), Pattern(window=(0, 0))]


def _ranges(nonempty):
    out = []
    for row in nonempty:
        idx = np.nonzero(row)[0]
        out.append((idx[0], idx[-1] + 1) if idx.size else (0, 0))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("pattern", BAND_PATTERNS, ids=repr)
@pytest.mark.parametrize("sq, sk", [(1, 1), (37, 53), (53, 37), (100, 100), (20, 6), (6, 200)])
@pytest.mark.parametrize("bq, bk", [(64, 32), (32, 32), (7, 5)])
def test_band_plan_matches_block_layout(pattern, sq, sk, bq, bk):
    """A band-only plan sends no layout; its tile ranges equal the non-empty tiles of
    Pattern.block_layout, and the device's analytic classification (mirrored here) equals it."""
    plan = _plan.plan_tiles(pattern, sq, sk, bq, bk)
    assert plan.layout is None and plan.pindex is None and plan.pmasks is None
    layout = pattern.block_layout(bq, bk, sq=sq, sk=sk)[0, 0]
    nonempty = layout != EMPTY
    np.testing.assert_array_equal(np.stack([plan.q_tile_lo, plan.q_tile_hi], 1), _ranges(nonempty))
    np.testing.assert_array_equal(np.stack([plan.k_tile_lo, plan.k_tile_hi], 1), _ranges(nonempty.T))
    s, lo, hi = plan.band
    s0, lo0, hi0 = pattern.band(sq, sk)
    assert (s, lo, hi) == (s0, -_abi.UNBOUNDED if lo0 is None else lo0,
                           _abi.UNBOUNDED if hi0 is None else hi0)
    # common.cuh's tile_code, line for line
    for ti in range(plan.nbq):
        for tj in range(plan.nbk):
            i0, j0 = ti * bq, tj * bk
            i1, j1 = min(i0 + bq, sq) - 1, min(j0 + bk, sk) - 1
            rel_min, rel_max = j0 - (i1 + s), j1 - (i0 + s)
            code = (EMPTY if rel_max < lo or rel_min > hi else
                    FULL if rel_min >= lo and rel_max <= hi else PARTIAL)
            assert code == layout[ti, tj], (ti, tj)


def test_band_plan_is_small_at_a_million_tokens():
    n = 1 << 20
    plan = _plan.plan_tiles(Pattern(causal=True), n, n, *_abi.TILES["attend_forward.cu"]["float64"])
    assert plan.layout is None and plan.q_tile_hi.size == n // 64
    assert np.array_equal(plan.q_tile_hi, (np.arange(n // 64) * 64 + 63) // 32 + 1)


SPARSE = {
    "dilated": Dilated(steps=(20, 3), dilation=3),
    "global_window": Global(tokens=[0, 17, 50]) | Pattern(window=(8, 8)),
    "block_sparse": BlockSparse(layout=np.random.default_rng(0).random((2, 6, 6)) < 0.4,
                                block_q=16, block_k=16),
    "dense": Pattern(causal=True, dense=np.random.default_rng(1).random((2, 1, 96, 96)) < 0.5),
}


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_plan_is_pattern_tile_plan(name):
    pattern = SPARSE[name]
    plan = _plan.plan_tiles(pattern, 96, 96, 32, 32)
    layout, pindex, pmasks = pattern.tile_plan(32, 32, sq=96, sk=96)
    np.testing.assert_array_equal(plan.layout, layout)
    np.testing.assert_array_equal(plan.pindex, pindex)
    np.testing.assert_array_equal(plan.pmasks, pmasks.astype(np.uint8))
    assert plan.layout.dtype == np.int8 and plan.pindex.dtype == np.int32
    assert plan.pmasks.dtype == np.uint8 and (layout == PARTIAL).any()
    nonempty = (layout != EMPTY).any(axis=(0, 1))
    np.testing.assert_array_equal(np.stack([plan.q_tile_lo, plan.q_tile_hi], 1), _ranges(nonempty))
    np.testing.assert_array_equal(np.stack([plan.k_tile_lo, plan.k_tile_hi], 1), _ranges(nonempty.T))


class RecordingDevice:
    """A device whose 'addresses' are keys into a dict of the arrays it was given."""

    def __init__(self):
        self.arrays = {}

    def put(self, x, dtype):
        return np.ascontiguousarray(np.asarray(x, dtype=dtype))

    def address(self, a):
        self.arrays[id(a)] = a
        return id(a)

    def at(self, rec, field):
        return self.arrays[int(rec[field])]


def test_attend_record_packs_the_plan_and_every_knob():
    dev = RecordingDevice()
    rng = np.random.default_rng(2)
    pattern = SPARSE["global_window"]
    plan = _plan.plan_tiles(pattern, 96, 80, 64, 32)
    q, k, v = np.zeros((2, 4, 96, 8)), np.zeros((2, 2, 80, 8)), np.zeros((2, 2, 80, 5))
    bias = rng.standard_normal((1, 4, 1, 80))
    mask = rng.random((2, 1, 96, 80)) < 0.5
    sm = ScoreMod(softcap=2.5, alibi_slopes=rng.random(4), alibi_form="symmetric", bias=bias)
    rec, keep = _plan.attend_record(dev, plan, q=q, k=k, v=v, head_map=[0, 0, 1, 1], scale=0.3,
                                    score_mod=sm, sinks=np.ones(4), dropout=Dropout(p=0.25, mask=mask),
                                    hkv=2, sk=80, dv=5)
    assert {n: int(rec[n]) for n in ("B", "Hq", "Hkv", "Sq", "Sk", "D", "Dv", "block_q", "block_k",
                                    "nbq", "nbk")} == dict(B=2, Hq=4, Hkv=2, Sq=96, Sk=80, D=8, Dv=5,
                                                           block_q=64, block_k=32, nbq=2, nbk=3)
    assert dev.at(rec, "q") is q and dev.at(rec, "v") is v
    np.testing.assert_array_equal(dev.at(rec, "layout"), plan.layout)
    np.testing.assert_array_equal(dev.at(rec, "pmasks"), plan.pmasks)
    np.testing.assert_array_equal(dev.at(rec, "q_tile_hi"), plan.q_tile_hi)
    np.testing.assert_array_equal(dev.at(rec, "head_map"), [0, 0, 1, 1])
    assert (int(rec["lay_b"]), int(rec["lay_h"])) == plan.layout.shape[:2]
    assert (int(rec["band_s"]), int(rec["alibi_offset"])) == (-16, -16)
    assert float(rec["scale"]) == 0.3 and float(rec["softcap"]) == 2.5 and int(rec["alibi"]) == 1
    np.testing.assert_array_equal(dev.at(rec, "bias"), bias)
    assert [int(rec[f"bias_{x}"]) for x in "bhij"] == [1, 4, 1, 80]
    assert int(rec["dropout"]) == _abi.DROP_MASK and float(rec["drop_scale"]) == 1 / 0.75
    np.testing.assert_array_equal(dev.at(rec, "drop_mask"), mask.astype(np.uint8))
    assert [int(rec[f"dm_{x}"]) for x in "bhij"] == [2, 1, 96, 80]
    np.testing.assert_array_equal(dev.at(rec, "sinks"), np.ones(4))
    assert all(int(rec[n]) == 0 for n in ("dout", "dq", "dbias_part", "block_table", "seq_lens"))
    rec2, _ = _plan.attend_record(dev, _plan.plan_tiles(Pattern(causal=True), 96, 80, 64, 32), q=q,
                                  k=k, v=v, head_map=[0, 0, 1, 1], scale=1.0,
                                  dropout=Dropout(p=0.5, seed=2 ** 64 - 1), hkv=2, sk=80, dv=5)
    assert int(rec2["layout"]) == 0 and int(rec2["pindex"]) == 0  # band: classified on the device
    assert int(rec2["dropout"]) == _abi.DROP_PHILOX and int(rec2["seed"]) == 2 ** 64 - 1
    assert (int(rec2["band_lo"]), int(rec2["band_hi"])) == (-_abi.UNBOUNDED, 0)


def test_head_groups():
    ptr, idx = _plan.head_groups(np.array([1, 0, 1, 1, 0]), 3)
    assert ptr.tolist() == [0, 2, 5, 5] and idx.tolist() == [1, 4, 0, 2, 3]


# -- Philox: the CUDA source, compiled for the host, against numpy ----------------------------------
def test_philox_constants_are_the_cpu_ones():
    text = _loader.read("philox.cuh")
    consts = dict(re.findall(r"#define REFATTN_PHILOX_(\w+) (0x[0-9A-F]+|\d+)", text))
    assert int(consts["M0"], 16) == int(np_philox.PHILOX_M0)
    assert int(consts["M1"], 16) == int(np_philox.PHILOX_M1)
    assert int(consts["W0"], 16) == int(np_philox.PHILOX_W0)
    assert int(consts["W1"], 16) == int(np_philox.PHILOX_W1)
    assert int(consts["ROUNDS"]) == np_philox.PHILOX_ROUNDS


HOST_SHIM = """
#define __device__
#define __forceinline__ inline
static unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
"""
HOST_MAIN = """
extern "C" void uniforms(unsigned long long seed, const unsigned long long* stream,
                         const unsigned long long* n, double* out, long count) {
    for (long t = 0; t < count; ++t) out[t] = philox_uniform(seed, stream[t], n[t]);
}
extern "C" void block(unsigned long long c, unsigned long long k0, unsigned long long k1,
                      unsigned long long* out) { philox4x64_10(c, k0, k1, out); }
"""


@pytest.fixture(scope="module")
def host_philox(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("compiling philox.cuh for the host needs g++")
    d = tmp_path_factory.mktemp("philox")
    src = d / "philox.cpp"
    src.write_text(HOST_SHIM + '#line 1 "philox.cuh"\n' + _loader.read("philox.cuh") + HOST_MAIN)
    subprocess.run([gxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(d / "philox.so"),
                    str(src)], check=True)
    lib = ctypes.CDLL(str(d / "philox.so"))
    u64p = ctypes.POINTER(ctypes.c_uint64)
    lib.uniforms.argtypes = [ctypes.c_uint64, u64p, u64p, ctypes.POINTER(ctypes.c_double), ctypes.c_long]
    lib.block.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, u64p]
    return lib


@pytest.mark.parametrize("seed", [0, 1, 2 ** 63 + 12345, 2 ** 64 - 1])
def test_cuda_philox_bit_identical_to_numpy(host_philox, seed):
    rng = np.random.default_rng(seed % 2 ** 32)
    stream = rng.integers(0, 2 ** 20, 3000).astype(np.uint64)
    flat = np.concatenate([np.arange(17), rng.integers(0, 2 ** 62, 2983)]).astype(np.uint64)
    got = np.empty(flat.size)
    u64p = ctypes.POINTER(ctypes.c_uint64)
    host_philox.uniforms(seed, stream.ctypes.data_as(u64p), flat.ctypes.data_as(u64p),
                         got.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), flat.size)
    assert np.array_equal(got, np_philox.uniforms(seed, stream, flat))
    # the block itself equals numpy.random.Philox (DESIGN section 3), counter 0 included
    for c in (0, 1, 12345):
        words = np.zeros(4, np.uint64)
        host_philox.block(c, seed, 7, words.ctypes.data_as(u64p))
        ref = np.random.Philox(key=np.array([seed, 7], dtype=np.uint64), counter=(c - 1) % 2 ** 256)
        assert np.array_equal(words, ref.random_raw(4).astype(np.uint64))


# -- a missing CuPy or device -----------------------------------------------------------------------
@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(backends, "_instances", {k: v for k, v in backends._instances.items()
                                                 if k != "cupy"})
    monkeypatch.setattr(backends, "_failures", {})


def test_without_cupy_the_registry_says_how_to_install(fresh_registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(BackendUnavailable) as info:
        backends.get("cupy")
    msg = str(info.value)
    assert msg.startswith("backend: 'cupy' is not available here") and "\n" not in msg
    assert "CuPy" in msg and "pip install 'refattn[cuda12]'" in msg
    assert "cupy" not in backends.available()


def _fake_cupy(count=None, error=None):
    def get_count():
        if error is not None:
            raise error
        return count
    runtime = types.SimpleNamespace(getDeviceCount=get_count)
    return types.SimpleNamespace(__version__="14.0.0", cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("fake, words", [
    (_fake_cupy(error=RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is "
                                   "insufficient for CUDA runtime version")),
     "finds no usable CUDA device (RuntimeError: cudaErrorInsufficientDriver"),
    (_fake_cupy(count=0), "this machine has no CUDA device")])
def test_with_cupy_but_no_device_says_so(fresh_registry, monkeypatch, fake, words):
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailable) as info:
        backends.get("cupy")
    msg = str(info.value)
    assert msg.startswith("backend: 'cupy' is not available here: CuPy 14.0.0 is installed")
    assert words in msg and "pip install" not in msg  # installing CuPy again would not help


def test_compare_cli_reports_unavailable_cupy_in_one_line():
    from click.testing import CliRunner

    from refattn.cli.main import cli

    if "cupy" in backends.available():
        pytest.skip("a usable CUDA device is present here")
    res = CliRunner().invoke(cli, ["compare", "--variant", "sdpa", "--backend", "cupy"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: backend: 'cupy' is not available here")
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert "pip install" in lines[0]  # CuPy is what is missing
    else:
        assert "CUDA device" in lines[0] and "pip install 'refattn" not in lines[0]


# -- refattn bench --backend cupy ---------------------------------------------------------------------
def test_bench_cupy_without_gpu_is_one_line_exit_2():
    from click.testing import CliRunner

    from refattn.cli.main import cli

    if "cupy" in backends.available():
        pytest.skip("a usable CUDA device is present here")
    res = CliRunner().invoke(cli, ["bench", "--backend", "cupy", "--shape", "1,2,64,16"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: backend: 'cupy' is not available here")


def test_bench_gpu_render():
    from refattn.cli import bench_gpu

    rows = [{"dtype": "float64", "mask": "causal", "pass": "forward", "impl": "cupy",
             "peer_backend": None, "seconds": 0.5, "tflops": 8.8, "vs_torch": 2.5, "error": None},
            {"dtype": "float64", "mask": "causal", "pass": "forward", "impl": "torch",
             "peer_backend": "MATH", "seconds": 1.25, "tflops": 3.5, "vs_torch": None, "error": None},
            {"dtype": "float64", "mask": "causal", "pass": "backward", "impl": "torch",
             "peer_backend": "MATH", "seconds": None, "tflops": None, "vs_torch": None,
             "error": "out of memory"}]
    text = bench_gpu.render({"shape": {"B": 1, "H": 16, "N": 16384, "D": 128}, "window": None,
                             "repeats": 2, "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0",
                                                   "memory_gib": 139.8},
                             "torch": "2.9.0", "compile_seconds": 12.0, "rows": rows,
                             "memory": {"cupy_pool_bytes": 2 ** 30, "torch_peak_bytes": None}})
    assert "gpu: NVIDIA H200" in text and "TFLOP/s" in text
    assert "8.80" in text and "2.50x" in text and "torch (MATH)" in text and "out of memory" in text


# -- the kernels ship in the wheel ---------------------------------------------------------------------
from test_install import installed  # noqa: E402,F401  (the built-and-installed wheel fixture)


def test_wheel_ships_the_kernel_sources(installed, tmp_path):  # noqa: F811
    import os

    kernels = installed / "refattn" / "backends" / "cupy_" / "kernels"
    for name in _loader.HEADERS + _loader.SOURCES:
        assert (kernels / name).is_file(), name
    code = ("import sys; from refattn.backends.cupy_ import _loader; "
            "sys.stdout.write(_loader.__file__ + '\\n' + _loader.translation_unit('attend_forward.cu'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(installed)))
    assert proc.returncode == 0, proc.stderr
    first, text = proc.stdout.split("\n", 1)
    assert first.startswith(str(installed))
    assert text == _loader.translation_unit("attend_forward.cu")

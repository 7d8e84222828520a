"""The CuPy backend's CUDA kernels run on the CPU (tests/cuda_emulator.py) against numpy.

The translation units are exactly what NVRTC compiles on a GPU machine, and the backend code around
them (tile plans, parameter records, launches, reductions) is the code that runs there: only the
array transport differs. So these checks -- every knob forward and backward in float64 to 1e-12,
float32 to its bound, GQA, sparse patterns with PARTIAL tiles, paged decode, merge_states, variants,
seeded random cases (tests/cupy_cases.py) -- run on every machine, CI included. What they cannot
show (speed, CUDA's math library to the last bit) tests/test_cupy_gpu.py checks on a device.
"""

from __future__ import annotations

import pytest

import cuda_emulator
import cupy_cases as C

if cuda_emulator.compiler() is None:  # pragma: no cover - g++ is on every machine we use
    pytest.skip("the CUDA emulator needs g++", allow_module_level=True)

from refattn.backends.cupy_ import CupyBackend  # noqa: E402

CHECKS = dict(C.all_checks(random_cases=6))


@pytest.fixture(scope="module")
def backend():
    return CupyBackend(_device=cuda_emulator.device())


@pytest.mark.parametrize("name", list(CHECKS))
def test_matches_numpy(backend, name):
    CHECKS[name](backend)


def test_every_kernel_ran(backend):
    """The checks above went through every entry point, both storage types."""
    C.check_knob(backend, "bias_rows")
    C.check_merge_states(backend)
    C.check_float32(backend, {"causal": True})
    names = {name for name, _ in backend._dev.launches}
    assert {"attend_forward_f64", "attend_backward_kv_f64", "attend_backward_q_f64",
            "merge_states_f64", "attend_forward_f32", "attend_backward_kv_f32",
            "attend_backward_q_f32"} <= names


def test_grids(backend):
    """Grid shapes: query tiles x heads x (batch * column blocks); key tiles for the dK/dV pass."""
    backend._dev.launches.clear()
    C.check_wide_heads(backend)  # B=1, Hq=2, Hkv=1, Sq=19, Sk=40, D=136, Dv=130: two column blocks
    grids = dict(backend._dev.launches)
    assert grids["attend_forward_f64"] == (1, 2, 2)
    assert grids["attend_backward_kv_f64"] == (2, 1, 2)
    assert grids["attend_backward_q_f64"] == (1, 2, 2)


def test_golden_verify_on_the_emulated_kernels(backend, monkeypatch):
    """``refattn golden verify --backend cupy`` with the kernels run by the emulator: every stored
    case that lists cupy passes at its tolerance (the GPU's bar, checked here in advance)."""
    import json

    from click.testing import CliRunner

    from refattn import backends
    from refattn.cli.main import cli

    monkeypatch.setitem(backends._instances, "cupy", backend)
    res = CliRunner().invoke(cli, ["golden", "verify", "--backend", "cupy", "--json"])
    assert res.exit_code == 0, res.output[-3000:]
    rows = json.loads(res.stdout)["results"]
    statuses = {r["case"]: r["status"] for r in rows if r["backend"] == "cupy"}
    assert statuses and set(statuses.values()) <= {"PASS", "SKIPPED"}
    skipped = {c for c, s in statuses.items() if s == "SKIPPED"}
    from refattn import variants
    from refattn.golden.cases import all_cases
    not_listed = {n for n, c in all_cases().items() if "cupy" not in variants.get(c.variant).backends}
    assert skipped == not_listed  # exactly the variants that do not list cupy (flash, moe, ...)
    assert sum(s == "PASS" for s in statuses.values()) >= 70

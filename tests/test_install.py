"""A built wheel carries its golden files and the CLI finds them there, not in the checkout.

Builds a wheel of the checkout, installs it into a temporary directory, and runs
``refattn compare --against golden`` from a directory outside the checkout with only that install
on the path ahead of the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def can_build_without_isolation() -> bool:
    """setuptools >= 70.1 builds wheels by itself; older ones (Python 3.11's venv) need ``wheel``."""
    try:
        import setuptools
    except ImportError:
        return False
    try:
        import wheel  # noqa: F401
        return True
    except ImportError:
        return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    wheels = tmp_path_factory.mktemp("wheels")
    # without isolation where the environment can build (fast, offline); else pip fetches setuptools
    isolation = ["--no-build-isolation"] if can_build_without_isolation() else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                            "-q", "-w", str(wheels), str(ROOT)], capture_output=True, text=True,
                           timeout=300, cwd=str(wheels))
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("refattn-*.whl")
    target = tmp_path_factory.mktemp("site")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    return target


def test_wheel_ships_golden_files_and_compare_finds_them(installed, tmp_path):
    golden_dir = installed / "refattn" / "golden"
    assert (golden_dir / "manifest.json").is_file()
    assert (golden_dir / "core_plain.npz").is_file() and (golden_dir / "cases.py").is_file()
    env = dict(os.environ, PYTHONPATH=str(installed))
    code = ("import refattn, sys; from refattn.cli.main import cli; "
            "sys.stderr.write(refattn.__file__ + '\\n'); cli()")
    proc = subprocess.run([sys.executable, "-c", code, "compare", "--variant", "sdpa", "--against",
                           "golden", "--case", "core_causal_br_sq_gt_sk", "--backend", "numpy",
                           "--json"], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stderr.splitlines()[0]).resolve().is_relative_to(installed.resolve())
    data = json.loads(proc.stdout)
    assert data["verdict"] == "PASS"
    golden_file = Path(data["golden_file"]).resolve()
    assert golden_file.is_relative_to(installed.resolve()), golden_file
    assert not golden_file.is_relative_to(ROOT)

"""Every CUDA source compiles as NVRTC will see it at run time, on machines without a GPU.

The text compiled is the loader's translation unit (:func:`refattn.backends.cupy_._loader.
translation_unit`): the generated #defines, the headers and the .cu file after #line directives, and
the extern "C" instantiations for double and float -- no #include. Two compilers:

* ``nvcc -std=c++17 -ftz=true --ptx -arch=sm_80`` and ``sm_90`` (CuPy adds ``-ftz=true``) (skipped, with the reason, where nvcc is absent);
* NVRTC itself (the run-time compiler CuPy uses) for ``compute_80`` and ``compute_90``, when its
  library loads here (``pip install nvidia-cuda-nvrtc``; skipped otherwise) -- NVRTC has no host
  headers at all, so this one also proves the sources need none.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from refattn.backends.cupy_ import _loader

ARCHS = ("80", "90")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", _loader.SOURCES)
def test_nvcc_compiles(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here (the CUDA toolkit's compiler)")
    src = tmp_path / source
    src.write_text(_loader.translation_unit(source))
    res = subprocess.run([nvcc, "-std=c++17", "-ftz=true", "--ptx", f"-arch=sm_{arch}", "-o",
                          str(tmp_path / "out.ptx"), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = (tmp_path / "out.ptx").read_text()
    for kernel in _loader.kernel_names(source):
        assert f".entry {kernel}(" in ptx
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # noqa: BLE001 - CuPy absent, or its NVRTC library not found
        pytest.skip(f"NVRTC is not loadable here ({type(exc).__name__}: {str(exc)[:120]})")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", _loader.SOURCES)
def test_nvrtc_compiles(source, arch):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(_loader.translation_unit(source), source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(_loader.OPTIONS + _loader.CUPY_ADDS)
                                 + [f"-arch=compute_{arch}"])
        except Exception:  # noqa: BLE001 - show the compiler's log
            pytest.fail(nvrtc.getProgramLog(prog)[-4000:])
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        for kernel in _loader.kernel_names(source):
            assert f".entry {kernel}(" in ptx
    finally:
        nvrtc.destroyProgram(prog)

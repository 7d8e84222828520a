"""Run the CuPy backend's CUDA kernels on the CPU: a test harness for machines without a GPU.

:func:`device` compiles each kernel file's translation unit -- exactly the text the loader hands
NVRTC (:func:`refattn.backends.cupy_._loader.translation_unit`) -- with ``g++`` after
``tests/cuda_emulator.h``, which supplies threads, barriers, shuffles and shared memory, and returns
an :class:`EmulatedDevice` for ``CupyBackend(_device=...)``. The backend's Python code (tile plans,
parameter records, launches, reductions) is then the code that runs on a GPU; only the transport
differs: arrays are numpy arrays and a kernel's pointers are host addresses.

It checks the kernels' logic (indexing, masks, the softmax, dropout, ownership of every output
element, barriers); it cannot check what only hardware shows (speed, CUDA's own math library to
the last bit, memory-model subtleties). Skips when ``g++`` is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from refattn.backends.cupy_ import _abi, _loader

PRELUDE = Path(__file__).with_name("cuda_emulator.h")
CACHE = Path(tempfile.gettempdir()) / "refattn-cuda-emulator"


def compiler():
    """The g++ used, or None."""
    return shutil.which("g++")


def build(source: str) -> Path:
    """Compile ``kernels/<source>`` for the emulator (cached by the text's hash)."""
    text = PRELUDE.read_text() + "\n" + _loader.translation_unit(source)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    lib = CACHE / f"{Path(source).stem}-{digest}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        src = CACHE / f"{Path(source).stem}-{digest}.cpp"
        src.write_text(text)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([compiler(), "-std=c++17", "-O1", "-shared", "-fPIC",
                              "-Wno-unknown-pragmas", "-o", str(tmp), str(src)],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"g++ failed on {source}:\n{res.stderr[-6000:]}")
        os.replace(tmp, lib)
    return lib


class EmulatedDevice:
    """The device interface of ``refattn.backends.cupy_.backend.CudaDevice``, on the CPU."""

    xp = np
    name = "CPU emulation of the CUDA kernels (tests/cuda_emulator.py)"

    def __init__(self):
        self.libs = {}
        self.launches = []  # (kernel name, grid) of every launch, for tests

    def is_device(self, x) -> bool:
        return False

    def put(self, x, dtype):
        return np.ascontiguousarray(np.asarray(x, dtype=dtype))

    def get(self, x):
        return np.asarray(x)

    def address(self, a) -> int:
        return int(a.ctypes.data)

    def launch(self, source, stem, dtype, grid, rec):
        if source not in self.libs:
            lib = ctypes.CDLL(str(build(source)))
            lib.emu_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 4 + [ctypes.c_void_p]
            lib.emu_launch.restype = ctypes.c_int
            self.libs[source] = lib
        lib = self.libs[source]
        name = f"{stem}_{_abi.STORAGE[dtype][1]}"
        kernel = ctypes.cast(getattr(lib, name), ctypes.c_void_p)
        params = np.frombuffer(rec.tobytes(), dtype=np.uint8).copy()
        self.launches.append((name, tuple(int(g) for g in grid)))
        rc = lib.emu_launch(kernel, *(int(g) for g in grid), _abi.THREADS, params.ctypes.data)
        if rc:
            raise RuntimeError(f"emu_launch({name}) failed with {rc}")
        return params


def device() -> EmulatedDevice:
    return EmulatedDevice()

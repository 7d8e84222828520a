"""The one loader of the CUDA sources in ``kernels/``.

For each ``.cu`` file it builds one translation unit -- the text NVRTC compiles at run time and
``tests/test_cupy_compile.py`` compiles with ``nvcc`` on CI:

1. ``#define``s generated from :mod:`._abi` (threads per block, record sizes, ...);
2. the headers ``philox.cuh``, ``common.cuh`` and ``tiles.cuh`` and then the ``.cu`` file, each
   after a ``#line 1 "<name>"`` directive, so compiler messages name the real file and line;
3. one ``REFATTN_INSTANTIATE(<C type>, <suffix>[, block_q, block_k])`` line per storage type: the
   macro each ``.cu`` file defines to write its ``extern "C"`` entry points (``attend_forward_f64``,
   ``attend_forward_f32``, ...), which instantiate the templated kernels for double and float.

Sources are read with :mod:`importlib.resources`, so an installed wheel works as a checkout does.
Compiled modules (``cupy.RawModule``, NVRTC with ``-std=c++17`` and no host headers; CuPy adds the
device's ``-arch`` and keeps its own on-disk cache) are cached per device id and file. Only
:func:`module` and :func:`function` import CuPy.
"""

from __future__ import annotations

import importlib.resources
import threading

from . import _abi

#: headers every translation unit starts with, in this order
HEADERS = ("philox.cuh", "common.cuh", "tiles.cuh")
#: the kernel sources (one translation unit and one compiled module each)
SOURCES = ("attend_forward.cu", "attend_backward.cu", "merge_states.cu")
#: NVRTC options we pass; CuPy's RawModule adds ``-ftz=true`` (single-precision denormals flush to
#: zero: only the float32 storage products are affected, every statistic is double) and the
#: device's ``-arch``
OPTIONS = ("-std=c++17",)
#: what CuPy adds to OPTIONS (the compile tests use both, to compile what CuPy compiles)
CUPY_ADDS = ("-ftz=true",)

_modules: dict = {}
_lock = threading.Lock()


def read(name: str) -> str:
    """The text of ``kernels/<name>`` from the installed package."""
    return importlib.resources.files(__package__).joinpath("kernels").joinpath(name).read_text(encoding="utf-8")


def instantiations(name: str) -> list:
    """The ``REFATTN_INSTANTIATE(...)`` lines appended to ``name``: one per compute dtype."""
    lines = []
    for dtype, (ctype, suffix) in _abi.STORAGE.items():
        args = [ctype, suffix]
        if name in _abi.TILES:
            args += [str(n) for n in _abi.TILES[name][dtype]]
        lines.append(f"REFATTN_INSTANTIATE({', '.join(args)})")
    return lines


def translation_unit(name: str) -> str:
    """The full text compiled for ``kernels/<name>`` (see the module docstring)."""
    if name not in SOURCES:
        raise KeyError(f"{name}: not one of the kernel sources {SOURCES}")
    parts = [f"#define {key} {value}" for key, value in _abi.defines().items()]
    for part in HEADERS + (name,):
        parts.append(f'#line 1 "{part}"')
        parts.append(read(part).rstrip("\n"))
    parts.append('#line 1 "<refattn instantiations>"')
    parts.extend(instantiations(name))
    return "\n".join(parts) + "\n"


def kernel_names(name: str) -> list:
    """The ``extern "C"`` entry points of ``kernels/<name>``, for both storage types."""
    stems = {"attend_forward.cu": ["attend_forward"],
             "attend_backward.cu": ["attend_backward_kv", "attend_backward_q"],
             "merge_states.cu": ["merge_states"]}[name]
    return [f"{stem}_{suffix}" for stem in stems for _, suffix in _abi.STORAGE.values()]


def module(name: str):
    """The compiled ``cupy.RawModule`` of ``kernels/<name>`` for the current device (cached)."""
    import cupy

    key = (cupy.cuda.Device().id, name)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = cupy.RawModule(code=translation_unit(name), options=OPTIONS)
            _modules[key] = mod
    return mod


def function(name: str, stem: str, dtype: str):
    """Kernel ``<stem>_<suffix>`` of ``kernels/<name>`` for compute dtype ``dtype``."""
    return module(name).get_function(f"{stem}_{_abi.STORAGE[dtype][1]}")

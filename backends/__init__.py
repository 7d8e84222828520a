"""Backend registry: ``refattn.backends.get("numpy" | "numba" | "cupy")``.

Backends are discovered lazily: importing refattn imports none of them, and a backend whose
library is missing raises :class:`refattn.errors.BackendUnavailable` only when asked for, naming
what is installed and how to install what is missing. There is no fallback to another backend.
"""

from __future__ import annotations

import importlib

from refattn.errors import BackendUnavailable

#: name -> (module, class name, the requirement it needs, how to install it)
_KNOWN = {
    "numpy": ("refattn.backends.numpy_", "NumpyBackend", "numpy", "pip install refattn"),
    "numba": ("refattn.backends.numba_", "NumbaBackend", "numba", "pip install numba"),
    "cupy": ("refattn.backends.cupy_", "CupyBackend", "cupy and a CUDA GPU",
             "pip install 'refattn[cuda12]' or 'refattn[cuda13]' on a machine with an NVIDIA GPU"),
}
#: backends ordered fastest first, for "the fastest available" defaults
PREFERENCE = ("cupy", "numba", "numpy")

_instances: dict = {}
_failures: dict = {}


def names() -> tuple:
    """Every backend refattn knows, installed or not."""
    return tuple(_KNOWN)


def get(name: str):
    """The backend instance called ``name`` (created once, then cached)."""
    if name in _instances:
        return _instances[name]
    if name not in _KNOWN:
        raise BackendUnavailable(
            f"backend: expected one of {', '.join(map(repr, _KNOWN))}, got {name!r} "
            f"(installed: {', '.join(available()) or 'none'})")
    module, cls, needs, how = _KNOWN[name]
    try:
        backend = getattr(importlib.import_module(module), cls)()
    except BackendUnavailable as exc:  # the backend itself says what is missing (e.g. no GPU)
        _failures[name] = exc
        raise BackendUnavailable(f"{exc}. Installed: {', '.join(available()) or 'none'}") from exc
    except (ImportError, RuntimeError, AttributeError) as exc:
        _failures[name] = exc
        advice = "" if "pip install" in str(exc) else f"; it needs {needs}: {how}"
        raise BackendUnavailable(
            f"backend: {name!r} is not available here ({type(exc).__name__}: {exc}){advice}. "
            f"Installed: {', '.join(available()) or 'none'}") from exc
    _instances[name] = backend
    return backend


def available() -> tuple:
    """Names of the backends that load on this machine, fastest first."""
    found = []
    for name in PREFERENCE:
        if name in _instances:
            found.append(name)
            continue
        if name in _failures:
            continue
        try:
            get(name)
            found.append(name)
        except BackendUnavailable:
            pass
    return tuple(found)


def fastest(supported=None) -> str:
    """The fastest available backend, among ``supported`` names if given."""
    for name in available():
        if supported is None or name in supported:
            return name
    raise BackendUnavailable(f"backend: none of {supported} is available here")

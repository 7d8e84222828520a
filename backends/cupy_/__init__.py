"""The CuPy backend: raw CUDA kernels for NVIDIA GPUs, float64 and float32 (DESIGN sections 2, 7).

``refattn.backends.get("cupy")`` returns a :class:`CupyBackend`. The kernels are ``.cu`` files in
``kernels/`` compiled at run time by one loader (:mod:`._loader`); tile plans, masks and every other
decision about *which* pairs to compute are made on the host by the same code the CPU backends use
(:mod:`._plan`), so the device code is the arithmetic only. See :mod:`.backend` for the semantics.

Importing this package does not import CuPy: the host side (:mod:`._abi`, :mod:`._plan`, the
loader's text functions) works and is tested without it, and ``tests/cuda_emulator.py`` runs the
kernels themselves on the CPU through the same backend code. Making a :class:`CupyBackend` imports
CuPy: without it that raises ``ImportError`` saying how to install it (the registry reports it as
:class:`refattn.errors.BackendUnavailable`); with CuPy but no usable CUDA device (or no NVRTC) it
raises ``BackendUnavailable`` saying which is missing. There is never a fallback to the CPU.
"""

from __future__ import annotations

from .backend import CupyBackend

__all__ = ["CupyBackend"]

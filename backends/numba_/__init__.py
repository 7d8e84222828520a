"""The numba backend (``refattn.backends.get("numba")``): tiled, tile-skipping CPU kernels.

See :mod:`refattn.backends.numba_.backend` for the design and conventions.
"""

from .backend import NumbaBackend

__all__ = ["NumbaBackend"]

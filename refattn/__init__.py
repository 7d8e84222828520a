"""refattn: the reference implementation and numerical oracle for attention mechanisms.

>>> import numpy as np, refattn
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 2, 4, 8)) for _ in range(3))
>>> out, lse = refattn.attention(q, k, v, causal=True, return_lse=True)
>>> out.shape, lse.shape
((1, 2, 4, 8), (1, 2, 4))

Everything is computed in float64 by default: inputs of any real dtype (numpy, ml_dtypes bf16/fp8,
torch CPU tensors) are *copied* to the compute dtype -- the one cast refattn makes -- and results
come back as numpy arrays of that dtype. See :mod:`refattn.variants.core` for the conventions.
"""

from __future__ import annotations

from ._version import __version__
from .errors import BackendUnavailable, ParameterError, RefattnError, ShapeError, UnknownVariant

__all__ = ["attention", "attention_backward", "__version__", "RefattnError", "ShapeError",
           "ParameterError", "UnknownVariant", "BackendUnavailable"]


def _resolve(variant: str, backend: str, params: dict):
    from . import backends, variants

    var = variants.get(variant)
    p = var.parse_params(params)
    # unknown or not installed: the registry's error names what is installed and how to install
    be = backends.get(backend)
    if backend not in var.backends:
        raise BackendUnavailable(
            f"backend: expected one of {', '.join(var.backends)} for variant {var.name!r}, "
            f"got {backend!r} (installed: {', '.join(backends.available())})")
    return var, be, p


def attention(q, k, v, *, variant: str = "sdpa", backend: str = "numpy", cu_seqlens_q=None,
              cu_seqlens_k=None, **params):
    """Attention output of ``variant`` on ``backend``: ``out``, or ``(out, lse)`` with ``return_lse``.

    ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, Dv)`` in the default ``bhsd``
    layout. ``params`` are the variant's knobs (``refattn list`` shows them); unknown names,
    wrong shapes and out-of-range values raise :class:`refattn.errors.RefattnError` subclasses
    naming the argument. An unsupported backend is an error, never a silent fallback.

    Packed variable-length batches (flash-attn's varlen API): pass ``cu_seqlens_q`` and
    ``cu_seqlens_k`` (offsets ``(B + 1,)``) with ``q (total_q, Hq, D)``, ``k``/``v``
    ``(total_k, Hkv, D|Dv)``; each sequence is attended on its own, the output is
    ``(total_q, Hq, Dv)`` and the LSE ``(Hq, total_q)`` (see :mod:`refattn.adapters`).
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        from .adapters import varlen_attention
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, variant=variant,
                                backend=backend, **params)
    var, be, p = _resolve(variant, backend, params)
    out, lse = var.forward(be, {"q": q, "k": k, "v": v}, p)
    return (out, lse) if getattr(p, "return_lse", False) else out


def attention_backward(q, k, v, dout, *, variant: str = "sdpa", backend: str = "numpy",
                       cu_seqlens_q=None, cu_seqlens_k=None, **params):
    """Gradients of :func:`attention` for upstream gradient ``dout``: ``(dq, dk, dv, extras)``.

    ``extras`` is a dict of gradients of learnable extras: ``"bias"`` (in the bias's own shape) and
    ``"sinks"``; empty when there are none. ``return_lse`` is ignored here. Packed batches take
    ``cu_seqlens_q``/``cu_seqlens_k`` as :func:`attention` does (``extras`` is then empty).
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        from .adapters import varlen_attention
        params.pop("return_lse", None)
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, variant=variant,
                                backend=backend, dout=dout, **params)
    var, be, p = _resolve(variant, backend, params)
    if var.backward is None:
        raise BackendUnavailable(f"variant: {var.name!r} has no backward")
    return var.backward(be, {"q": q, "k": k, "v": v}, dout, p)

"""refattn: the reference implementation and numerical oracle for attention mechanisms.

>>> import numpy as np, refattn
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 2, 4, 8)) for _ in range(3))
>>> out, lse = refattn.attention(q, k, v, causal=True, return_lse=True)
>>> out.shape, lse.shape
((1, 2, 4, 8), (1, 2, 4))

Everything is computed in float64 by default: inputs of any real dtype (numpy, ml_dtypes bf16/fp8,
torch CPU tensors) are *copied* to the compute dtype -- the one cast refattn makes -- and results
come back as numpy arrays of that dtype. The q, k, v and dout of the core attention variants are
not copied when they already are C-contiguous arrays of the compute dtype: refattn reads them
through a read-only view, and never writes a caller's array. See :mod:`refattn.variants.core` for
the conventions.
"""

from __future__ import annotations

from ._version import __version__
from . import variants
from .errors import BackendUnavailable, ParameterError, RefattnError, ShapeError, UnknownVariant

__all__ = ["attention", "attention_backward", "variants", "__version__", "RefattnError", "ShapeError",
           "ParameterError", "UnknownVariant", "BackendUnavailable"]


def attention(*inputs, variant: str = "sdpa", backend="numpy", cu_seqlens_q=None,
              cu_seqlens_k=None, **inputs_and_params):
    """The output of ``variant`` on ``backend``: ``out``, or ``(out, lse)`` with ``return_lse``.

    One call for every registered variant: its declared inputs (``Variant.inputs``; ``refattn
    list --json`` shows them with their shapes) positionally in that order or by name, then its
    parameters by name. For the attention variants the inputs are ``q (B, Hq, Sq, D)``,
    ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, Dv)`` in the default ``bhsd`` layout; others declare
    their own, e.g. ``attention(q, variant="paged", k_pages=..., v_pages=..., block_table=...,
    seq_lens=...)`` or ``attention(q, k, v, variant="t5", table=...)``. Optional arrays that only
    modify the computation (``mask``, ``bias``, ``sinks``, ``alibi_slopes``, ``head_map``, ...) are
    parameters. A missing input, an unknown name, wrong shapes and out-of-range values raise
    :class:`refattn.errors.RefattnError` subclasses naming the argument. An unsupported backend is
    an error, never a silent fallback. Extra outputs (``lse``, a final state) are returned after
    ``out`` when their ``return_<name>`` parameter is True.

    Arrays may come from any framework that implements ``__dlpack__`` or ``__array__`` (numpy,
    torch CPU tensors, JAX CPU arrays, ml_dtypes bf16/fp8); they are converted to the compute
    dtype (float64 by default) -- the one cast refattn makes -- and results are numpy arrays.

    Packed variable-length batches (flash-attn's varlen API): pass ``cu_seqlens_q`` and
    ``cu_seqlens_k`` (offsets ``(B + 1,)``) with ``q (total_q, Hq, D)``, ``k``/``v``
    ``(total_k, Hkv, D|Dv)``; each sequence is attended on its own, the output is
    ``(total_q, Hq, Dv)`` and the LSE ``(Hq, total_q)`` (see :mod:`refattn.adapters`).
    """
    from . import pipeline

    var = pipeline.variant_of(variant)
    arrays, params = pipeline.bind(var, inputs, inputs_and_params)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        from .adapters import varlen_attention
        return varlen_attention(arrays, cu_seqlens_q, cu_seqlens_k, variant=var, backend=backend,
                                **params)
    return pipeline.run(var, backend, arrays, params).returned()


def attention_backward(*inputs, dout=None, variant: str = "sdpa", backend="numpy",
                       cu_seqlens_q=None, cu_seqlens_k=None, **inputs_and_params):
    """Gradients of :func:`attention` for the upstream gradient ``dout`` of ``out``.

    Called like :func:`attention`, with ``dout`` after the inputs (``attention_backward(q, k, v,
    dout, ...)``) or by name. Variants on ``q, k, v`` return ``(dq, dk, dv, extras)``: ``extras``
    is a dict with the gradients of the variant's other inputs (t5's ``table``, Transformer-XL's
    ``pos_k``...) and of learnable parameters (``bias`` in the bias's own shape, ``sinks``); empty
    when there are none. Other variants return a dict of gradients keyed by input name
    (``{"q": ..., "k_pages": ..., "v_pages": ...}`` for paged). ``return_*`` flags are ignored
    here. Packed batches take ``cu_seqlens_q``/``cu_seqlens_k`` as :func:`attention` does.
    """
    from . import pipeline

    var = pipeline.variant_of(variant)
    if dout is None:
        if len(inputs) != len(var.inputs) + 1:
            raise ParameterError(f"dout: expected the upstream gradient after the {len(var.inputs)} "
                                 f"inputs of variant {var.name!r} ({', '.join(var.inputs)}) or as "
                                 f"dout=, got {len(inputs)} positional arrays and no dout=")
        inputs, dout = inputs[:-1], inputs[-1]
    arrays, params = pipeline.bind(var, inputs, inputs_and_params)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        from .adapters import varlen_attention
        return varlen_attention(arrays, cu_seqlens_q, cu_seqlens_k, variant=var, backend=backend,
                                dout=dout, **params)
    params = {n: val for n, val in params.items() if not n.startswith("return_")}
    return pipeline.run(var, backend, arrays, params, dout=dout, forward=False).returned_grads()

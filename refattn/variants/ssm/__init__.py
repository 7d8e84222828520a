"""State space models (family ``ssm``, VARIANTS section E): ``mamba`` (selective scan, S6),
``mamba2`` (SSD) and ``s4`` -- and the functions users know them by, re-exported as
:mod:`refattn.ssm`.

``mamba`` and ``mamba2`` run on the backend primitive
:meth:`~refattn.backends.base.Backend.linear_scan` (numpy and numba); ``s4`` (a dense state matrix,
not a diagonal gate) is numpy glue. Each is a registered variant called through
:func:`refattn.attention` with its declared inputs; the functions below are thin spellings of those
calls with the peers' argument names:

* :func:`selective_scan` -- mamba's ``selective_scan_ref(u, delta, A, B, C, D=None, z=None,
  delta_bias=None, delta_softplus=False, return_last_state=False)``;
* :func:`ssd` -- Mamba-2's ``(x, dt, A, B, C, D=None, chunk_size=64)``, chunked, with the
  masked-attention dual as ``form="parallel"``;
* :func:`s4` with :func:`discretize` (ZOH, bilinear) and :func:`kernel` (``K_l = C A_bar^l B_bar``).

Layouts are the peers': mamba's state is ``(B, D, N)``, Mamba-2's ``(b, h, p, n)`` -- not fla's
keys-by-values layout of the ``linear`` family (there the state of one head is ``(Dk, Dv)``; here
Mamba-2's is ``(p, n)``, values by keys, as ``mamba_chunk_scan_combined`` returns it).
"""

from __future__ import annotations

from . import mamba, mamba2, s4 as _s4  # noqa: F401  (registration)
from .s4 import discretize, kernel

__all__ = ["selective_scan", "ssd", "s4", "discretize", "kernel"]


def _call(variant, inputs, params, backend):
    from refattn import pipeline

    given = {n: v for n, v in params.items() if v is not None}
    return pipeline.run(variant, backend, inputs, given)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, form="recurrent", chunk_size=64,
                   backend="numpy"):
    """Mamba's selective scan, ``selective_scan_ref``'s shapes and semantics (real ``A``).

    ``u``, ``delta`` ``(B, D, L)``; ``A`` ``(D, N)``; ``B``, ``C`` ``(D, N)``, ``(B, N, L)`` or
    ``(B, G, N, L)``; ``D``, ``delta_bias`` ``(D,)``; ``z`` ``(B, D, L)``. Returns ``out``
    ``(B, D, L)``, or ``(out, last_state)`` with ``last_state`` ``(B, D, N)``. Computed in float64
    (the variant ``mamba``; see :mod:`refattn.variants.ssm.mamba`).
    """
    res = _call("mamba", {"u": u, "delta": delta, "A": A, "B": B, "C": C},
                dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                     return_final_state=return_last_state, initial_state=initial_state, form=form,
                     chunk_size=chunk_size), backend)
    return res.returned()


def ssd(x, dt, A, B, C, D=None, chunk_size=64, *, z=None, dt_bias=None, dt_softplus=False,
        initial_states=None, return_final_states=False, form="chunked", backend="numpy"):
    """Mamba-2's SSD: ``x`` ``(b, l, h, p)``, ``dt`` ``(b, l, h)``, ``A`` ``(h,)``, ``B``, ``C``
    ``(b, l, g, n)``; returns ``y`` ``(b, l, h, p)``, or ``(y, final_states)`` ``(b, h, p, n)``.
    ``form="parallel"`` evaluates the masked-attention dual ``(L o C B^T)(dt x)``; ``"recurrent"``
    the recurrence (see :mod:`refattn.variants.ssm.mamba2`)."""
    res = _call("mamba2", {"x": x, "dt": dt, "A": A, "B": B, "C": C},
                dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_states,
                     return_final_state=return_final_states, form=form, chunk_size=chunk_size),
                backend)
    return res.returned()


def s4(u, A, B, C, dt, D=None, *, method="zoh", form="recurrent", initial_state=None,
       return_final_state=False):
    """The S4 layer (see :mod:`refattn.variants.ssm.s4`): ``u`` ``(B, H, L)``, ``A`` ``(H, N, N)``,
    ``B``, ``C`` ``(H, N)``, ``dt`` ``(H,)``; ``form`` ``"recurrent"``, ``"convolution"`` or
    ``"fft"``; ``method`` ``"zoh"`` or ``"bilinear"``."""
    res = _call("s4", {"u": u, "A": A, "B": B, "C": C, "dt": dt},
                dict(D=D, discretization=method, form=form, initial_state=initial_state,
                     return_final_state=return_final_state), "numpy")
    return res.returned()

"""Linear attention and recurrent variants (family ``linear``, VARIANTS section E).

Every variant here but ``rwkv`` is one call of the backend primitive
:meth:`~refattn.backends.base.Backend.linear_scan` (its docstring is the definition; the numpy
backend's code is the readable one), with readable glue around it:

* ``linear`` (feature maps elu+1, relu, identity; normalised with ``eps = 1e-6``) and ``performer``
  (FAVOR+) -- :mod:`.kernelized`;
* ``gla``, ``simple_gla``, ``retention``, ``delta_rule``, ``gated_delta_rule`` -- :mod:`.gated`;
* ``rwkv`` (RWKV-4's WKV on its own primitive, :meth:`~refattn.backends.base.Backend.wkv`, which
  carries the running maximum) -- :mod:`.rwkv`.

Conventions (tested)
--------------------
* Layout ``bhsd``: ``q, k`` ``(B, H, L, Dk)``, ``v`` ``(B, H, L, Dv)``, per-step gates ``(B, H, L)``
  or ``(B, H, L, Dk)``, ``beta`` ``(B, H, L)``; ``layout="bshd"`` takes all of them as fla does,
  ``(B, L, H, ...)``, and returns the output so. All heads are independent (no GQA).
* State: fla's ``(B, H, Dk, Dv)`` -- keys by values -- and ``o_t = scale * S_t^T q_t``;
  ``initial_state`` is the state before the first step (default zeros), ``final_state`` the state
  after the last (``return_final_state=True`` returns it after ``out``). Feeding one call's final
  state as the next call's initial state equals one call over the concatenation.
* ``scale`` defaults to ``1/sqrt(Dk)`` (``linear``: 1, the paper's).
* Gates are log-gates ``g = log(alpha)``: finite and ``<= 0``. Within a chunk the chunked form uses
  the cumulative log-gate ``G_t = sum_{s <= t} g_s`` from the chunk's start and forms
  ``exp(G_t - G_i)`` per pair, never ``exp(G_t) / exp(G_i)`` (which overflows for strong decay).
* ``form``: ``"recurrent"`` (the definition, step by step; the default), ``"chunked"`` (chunks of
  ``chunk_size`` steps; the last chunk may be shorter: nothing is padded) or ``"parallel"`` (the
  masked-attention form: one chunk of ``L`` steps). All three agree to float64 rounding; the
  backward is the adjoint recurrence whatever the form.
* Backward: gradients keyed by input name (``q, k, v``, ``g``, ``beta``, ``w``, ``u``) and
  ``initial_state`` when one is given, in the caller's layout; checked against central finite
  differences (``performer`` has none).
"""

from . import gated, kernelized, rwkv  # noqa: F401  (registration)
from .gated import retention_gammas
from .kernelized import draw_omega, favor_features, feature_map

__all__ = ["retention_gammas", "draw_omega", "favor_features", "feature_map"]

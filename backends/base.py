"""The backend interface: a few fused primitives every backend implements (DESIGN section 2).

Variants are written once against this interface. The numpy backend's methods *are* the
specification; numba and cupy re-implement the same primitives fast and are tested against it.

Array conventions for every primitive
-------------------------------------
* ``q`` is ``(B, Hq, Sq, D)``, ``k`` is ``(B, Hkv, Sk, D)``, ``v`` is ``(B, Hkv, Sk, Dv)``, in the
  compute dtype (float64 unless a backend offers and the caller asks for float32);
* ``head_map`` is an int array of length ``Hq``: query head ``h`` reads KV head ``head_map[h]``;
* ``lse`` is ``(B, Hq, Sq)`` in natural log over the *visible* keys (a sink is excluded), ``-inf``
  for a row that sees no key; such a row's output is 0;
* nothing is modified in place.

The recurrences (:meth:`Backend.linear_scan`, its adjoint, :meth:`Backend.wkv`) take their own
shapes, given in their docstrings; a backend that lacks one raises
:class:`refattn.errors.BackendUnavailable` (never a fallback to another backend).

The records :class:`ScoreMod` and :class:`Dropout` are declarative (no Python callables) so
compiled backends can implement them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True, eq=False)
class ScoreMod:
    """What is done to the scaled scores before masking, in this order (DESIGN section 3).

    1. ``softcap``: ``s = c * tanh(s / c)``;
    2. ALiBi: ``alibi_form="symmetric"`` adds ``-slope_h * |i + off - j|`` (the paper; flash-attn's
       reference); ``alibi_form="flash"`` adds ``+slope_h * j`` (flash-attn's causal kernel: the same
       output under a causal mask, the LSE larger by ``slope_h * (i + off)``); ``off`` is the
       pattern's diagonal offset;
    3. ``bias``: an additive array broadcastable to ``(B, Hq, Sq, Sk)`` (4-d, leading 1s padded).
    """

    softcap: Optional[float] = None
    alibi_slopes: Optional[np.ndarray] = field(default=None, repr=False)
    alibi_form: str = "symmetric"
    bias: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def is_identity(self) -> bool:
        return self.softcap is None and self.alibi_slopes is None and self.bias is None


@dataclass(frozen=True, eq=False)
class Dropout:
    """Dropout on the probabilities, kept ones scaled by ``1 / (1 - p)``; the LSE is unaffected.

    Either ``seed`` (the Philox4x64-10 scheme of :mod:`refattn.dropout`) or an explicit boolean
    ``mask`` broadcastable to ``(B, Hq, Sq, Sk)`` (True = keep, 4-d) decides which are kept.

    With ``seed``, the call's pair ``(i, j)`` takes the Philox counter
    ``(row0 + i) * stride + col0 + j`` (``stride`` None: the call's ``Sk``). A sub-rectangle of a
    larger problem (:mod:`refattn.subrect`) passes its global origin and the whole problem's ``Sk``,
    so every pair keeps the counter ``i * Sk + j`` it has in the whole problem.
    """

    p: float
    seed: Optional[int] = None
    mask: Optional[np.ndarray] = field(default=None, repr=False)
    row0: int = 0
    col0: int = 0
    stride: Optional[int] = None

    @property
    def shifted(self) -> bool:
        """True when the counter is not the call's own ``i * Sk + j`` (a sub-rectangle)."""
        return self.row0 != 0 or self.col0 != 0 or self.stride is not None

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)


class Backend(abc.ABC):
    """A set of attention primitives over one array library.

    Hooks (set on a copy by :meth:`configured`, never on the registry's shared instance):

    * ``progress(fraction)``: called as parts of an ``attend``/``attend_backward`` call complete,
      with each part's share of the call's work (visible pairs or tiles: the shares of one call sum
      to 1, so a time-left estimate holds); backends that cannot report progress never call it;
    * ``rounding``: an object emulating a low-precision kernel (``work`` dtype of the arithmetic,
      ``inputs(x, name)`` and ``store(x)`` rounding to the storage dtype, ``calls`` counting the
      primitive calls that used it: :class:`refattn.numerics.Rounding`). Only backends with
      ``supports_rounding`` accept it.
    """

    #: registry name ("numpy", "numba", "cupy")
    name: str = ""
    #: compute dtypes the backend accepts
    compute_dtypes: tuple = ("float64",)
    supports_rounding: bool = False
    progress = None
    rounding = None

    def configured(self, *, progress=None, rounding=None) -> "Backend":
        """A copy of this backend with the hooks set (see the class docstring)."""
        import copy

        if rounding is not None and not self.supports_rounding:
            from refattn.errors import ParameterError
            raise ParameterError(f"rounding: backend {self.name!r} cannot emulate low precision; "
                             f"the numpy backend does")
        twin = copy.copy(self)
        twin.progress, twin.rounding = progress, rounding
        return twin

    def tick(self, fraction: float):
        """Report a completed ``fraction`` of the current call's work to the progress hook."""
        if self.progress is not None:
            self.progress(fraction)

    @property
    @abc.abstractmethod
    def xp(self):
        """The array namespace (``numpy`` or ``cupy``) for glue code in variants."""

    def asarray(self, x, dtype=np.float64):
        """Convert a host array to this backend's arrays (a copy where the kind changes)."""
        return self.xp.asarray(x, dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    @abc.abstractmethod
    def attend(self, q, k, v, *, pattern, scale: float, head_map, score_mod: Optional[ScoreMod] = None,
               sinks=None, dropout: Optional[Dropout] = None):
        """Softmax attention. Returns ``(out, lse)``; see the module docstring for shapes.

        ``sinks`` (``(Hq,)``, gpt-oss style) enter the softmax denominator only:
        ``out = out_visible / (1 + exp(sink_h - lse))``; ``lse`` excludes them.
        """

    @abc.abstractmethod
    def attend_backward(self, q, k, v, out, lse, dout, *, pattern, scale: float, head_map,
                        score_mod: Optional[ScoreMod] = None, sinks=None,
                        dropout: Optional[Dropout] = None):
        """Gradients of :meth:`attend`. Returns ``(dq, dk, dv, extras)``.

        ``out`` and ``lse`` are what :meth:`attend` returned. ``extras`` holds ``"bias"`` (summed
        to the bias's own shape) and ``"sinks"`` when those are present.
        """

    # -- linear attention and state-space scans (VARIANTS section E) -------------------------------
    def linear_scan(self, q, k, v, *, decay=None, beta=None, form: str = "recurrent",
                    chunk_size: int = 64, initial_state=None):
        """The gated, optionally delta-rule, linear recurrence. Returns ``(o, final_state)``.

        Shapes (``bhsd``): ``q``, ``k`` are ``(B, H, L, Dk)``, ``v`` is ``(B, H, L, Dv)``; ``decay``
        is None (no decay), ``(B, H, L)`` (one log-gate per head and step) or ``(B, H, L, Dk)`` (one
        per key dimension); ``beta`` is None or ``(B, H, L)``; ``initial_state`` is None (zeros) or
        ``(B, H, Dk, Dv)``. ``o`` is ``(B, H, L, Dv)``, ``final_state`` ``(B, H, Dk, Dv)`` -- fla's
        layout: the state maps keys to values, ``o_t = S_t^T q_t``.

        Per ``(b, h)``, with ``S_{-1} = initial_state`` and ``t = 0 .. L-1``::

            S' = diag(exp(g_t)) S_{t-1}                    (decay first; g in log space)
            S_t = S' + k_t v_t^T                           (beta None)
            S_t = S' + beta_t k_t (v_t - S'^T k_t)^T       (delta rule: (I - b k k^T) S' + b k v^T)
            o_t = S_t^T q_t

        and ``final_state = S_{L-1}`` (``initial_state`` when ``L = 0``). There is no scale:
        callers scale ``q``. ``form`` chooses how it is evaluated, never what: ``"recurrent"`` (the
        loop above), ``"chunked"`` (chunks of ``chunk_size`` steps: within a chunk the masked
        "attention" matrix ``sum_c q_tc k_ic exp(G_tc - G_ic)``, ``G`` the cumulative log-gate from
        the chunk start, with the delta rule's unit-lower-triangular (WY/UT) solve; between chunks the
        state), ``"parallel"`` (the same with one chunk of ``L`` steps: the masked-attention dual,
        O(L^2)). Gates must be finite (``exp(g) = 0`` would make ``G_t - G_i`` undefined).
        """
        from refattn.errors import BackendUnavailable
        raise BackendUnavailable(f"backend: {self.name!r} does not implement linear_scan")

    def linear_scan_backward(self, q, k, v, dout, *, decay=None, beta=None, chunk_size: int = 64,
                             initial_state=None, dfinal_state=None) -> dict:
        """Gradients of :meth:`linear_scan` for the upstream gradients ``dout`` of ``o`` (and
        ``dfinal_state`` of the final state, default 0): a dict with ``"q"``, ``"k"``, ``"v"`` and,
        where given, ``"decay"``, ``"beta"``, ``"initial_state"`` (each in its argument's shape).
        It is the adjoint of the recurrence whatever ``form`` the forward used (every form computes
        the same function); states are recomputed from checkpoints every ``chunk_size`` steps.
        """
        from refattn.errors import BackendUnavailable
        raise BackendUnavailable(f"backend: {self.name!r} does not implement linear_scan_backward")

    def wkv(self, k, v, *, w, u, initial_state=None):
        """RWKV-4's WKV with its running maximum (numerically stable). Returns ``(y, state)``.

        ``k``, ``v`` are ``(B, T, C)``; ``w`` (decay rate) and ``u`` (bonus of the current token)
        are ``(C,)``. ``y_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) /
        (sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t})`` per channel. The state ``(B, 3, C)`` holds
        ``(a, b, p)``: numerator ``a e^p`` and denominator ``b e^p`` of the sum over the tokens
        seen so far (``a = b = 0``, ``p = -inf`` before any). This is its own primitive, not a
        mode of :meth:`linear_scan`: its state is diagonal (C numbers, not C x C) and carries a
        running maximum ``p`` so that no exponential overflows.
        """
        from refattn.errors import BackendUnavailable
        raise BackendUnavailable(f"backend: {self.name!r} does not implement wkv")

    def merge_states(self, o_a, lse_a, o_b, lse_b):
        """Merge two partial attention results over disjoint key sets.

        ``lse = logaddexp(lse_a, lse_b)``, ``o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)``;
        a part with ``lse = -inf`` contributes nothing; both empty gives ``(0, -inf)``. Sinks are not
        part of a state: apply them once, after the last merge.
        """
        xp = self.xp
        lse = xp.logaddexp(lse_a, lse_b)
        finite = xp.isfinite(lse)
        safe = xp.where(finite, lse, 0.0)
        w_a = xp.where(finite, xp.exp(lse_a - safe), 0.0)
        w_b = xp.where(finite, xp.exp(lse_b - safe), 0.0)
        return o_a * w_a[..., None] + o_b * w_b[..., None], lse

    def __repr__(self):
        return f"<refattn backend {self.name!r}>"

"""Public Hypothesis strategies for attention inputs (a product, versioned with refattn).

:func:`attention_inputs` draws an :class:`AttentionCase` whose ``.kwargs`` feed both the
implementation under test and :func:`refattn.testing.assert_attention_close`::

    @given(st.attention_inputs(variant="gqa", max_seq=256))
    def test_my_kernel(case):
        assert_attention_close(my_attn(**case.kwargs), variant="gqa", dtype="bf16", **case.kwargs)

For the core variants (``sdpa``, ``mha``, ``mqa``, ``gqa``, ``flash``) ``.kwargs`` holds

* ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Sk, D)``, ``v (B, Hkv, Sk, Dv)`` -- float64 numpy arrays from a
  drawn seed and a drawn input distribution of ``inputs`` (:mod:`refattn.testing.inputs`: by
  default the battery ``normal``, ``large`` logits past the dtype's exp range, ``outliers``
  channels, ``peaked`` rows and exact ``ties`` -- standard normal inputs alone let a kernel without
  the max subtraction pass), rounded to ``dtype`` when given (so a cast to it is exact), in layout
  ``bhsd``. ``Sq`` and ``Sk`` are drawn independently in ``[1, max_seq]``; head counts
  follow the variant (mha: ``Hkv = Hq``; mqa: ``Hkv = 1``; gqa/sdpa: ``Hkv`` divides ``Hq``, so
  GQA groups of every size appear);
* one key per enabled knob, always present when enabled: ``causal`` (bool), ``alignment``
  (``"bottom_right"`` or ``"top_left"``), ``window`` (None or ``(left, right)`` with -1 =
  unbounded), ``mask`` (None or a bool array broadcastable to ``(B, Hq, Sq, Sk)``, sometimes with
  rows that see no key at all -- empty rows, whose reference output is 0), and, when asked for,
  ``scale``, ``softcap``, ``alibi_slopes``.

Switch knobs off for an implementation that lacks them (``mask=False``, ...); ``inputs="normal"``
keeps standard normal inputs only.

A check of a 256-token case takes tens of milliseconds; on a loaded machine Hypothesis' default
200 ms deadline can still trip. One line turns it off for the test::

    @settings(deadline=None) For any other
registered variant ``.kwargs`` holds the arrays of the variant's ``example()`` for a drawn shape,
with default parameters. The case's ``repr`` shows shapes, knobs and the seed, never whole arrays,
so a shrunk example reads well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from .. import numerics, variants
from .. import validate as V
from ..position import alibi_slopes
from ..errors import ParameterError

__all__ = ["AttentionCase", "attention_inputs"]

from .inputs import BATTERY, DISTRIBUTIONS


@dataclass(frozen=True, eq=False)
class AttentionCase:
    """A drawn case: ``variant``, ``kwargs`` (arrays and knobs) and the ``seed`` of the arrays."""

    variant: str
    kwargs: dict
    seed: int

    def __repr__(self):
        parts = []
        for name, val in self.kwargs.items():
            if isinstance(val, np.ndarray):
                extra = ""
                if val.dtype == np.bool_ and val.ndim == 4:
                    empty = int((~val.any(axis=-1)).sum())
                    extra = f", {empty} empty rows" if empty else ""
                parts.append(f"{name}=<{val.dtype} {tuple(val.shape)}{extra}>")
            else:
                parts.append(f"{name}={val!r}")
        return f"AttentionCase(variant={self.variant!r}, {', '.join(parts)}, seed={self.seed})"

    def _repr_pretty_(self, printer, cycle):  # Hypothesis' and IPython's pretty printer
        printer.text(repr(self))


def _heads(var_name, draw, max_heads):
    if var_name == "mqa":
        return draw(st.integers(1, max_heads)), 1
    hkv = draw(st.integers(1, max_heads))
    if var_name == "mha":
        return hkv, hkv
    group = draw(st.integers(1, max(1, max_heads // hkv)))
    return hkv * group, hkv


def _mask(draw, rng, b, h, sq, sk):
    shape = (draw(st.sampled_from((1, b))), draw(st.sampled_from((1, h))), sq, sk)
    density = draw(st.sampled_from((0.3, 0.7, 1.0)))
    m = rng.random(shape) < density
    if draw(st.booleans()):  # some rows see no key at all
        m[..., rng.random(sq) < 0.25, :] = False
    return m


def attention_inputs(variant: str = "sdpa", max_seq: int = 64, *, min_seq: int = 1,
                     max_batch: int = 2, max_heads: int = 4, head_dims=(8, 16, 32, 64),
                     dtype=None, causal: bool = True, alignment: bool = True, window: bool = True,
                     mask: bool = True, scale: bool = False, softcap: bool = False,
                     alibi: bool = False, inputs=BATTERY):
    """A strategy of :class:`AttentionCase` for ``variant`` (module docstring). The arguments are
    checked here, when the strategy is built: an unknown variant, ``max_seq < min_seq`` or an
    unknown dtype raise at once."""
    var = variants.get(variant)
    for name, val in (("min_seq", min_seq), ("max_batch", max_batch), ("max_heads", max_heads)):
        V.check_int(val, name, 1)
    V.check_int(max_seq, "max_seq", min_seq, what=f"an integer >= min_seq ({min_seq})")
    if not head_dims:
        raise ParameterError(f"head_dims: expected positive integers, got {head_dims!r}")
    head_dims = [V.check_int(d, "head_dims", 1) for d in head_dims]
    name = numerics.canonical(dtype) if dtype is not None else None
    dists = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    bad = [d for d in dists if d not in DISTRIBUTIONS or (d == "extreme" and name is not None)]
    if not dists or bad:
        raise ParameterError(f"inputs: expected names among {', '.join(DISTRIBUTIONS)} ('extreme' "
                             f"only without a dtype), got {inputs!r}")
    return _cases(var, variant, max_seq, min_seq, max_batch, max_heads, tuple(head_dims), name,
                  dict(causal=causal, alignment=alignment, window=window, mask=mask, scale=scale,
                       softcap=softcap, alibi=alibi), dists)


@st.composite
def _cases(draw, var, variant, max_seq, min_seq, max_batch, max_heads, head_dims, name, knobs, dists):
    from ..variants.core import CoreParams
    causal, alignment, window, mask = (knobs[n] for n in ("causal", "alignment", "window", "mask"))
    scale, softcap, alibi = knobs["scale"], knobs["softcap"], knobs["alibi"]
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    b = draw(st.integers(1, max_batch))
    hq, hkv = _heads(var.name, draw, max_heads)
    sq = draw(st.integers(min_seq, max_seq))
    sk = draw(st.integers(min_seq, max_seq))
    d = draw(st.sampled_from(tuple(head_dims)))
    if not issubclass(var.params, CoreParams):
        if var.example is None:
            raise ParameterError(f"variant: {variant!r} has no example() to draw inputs from")
        kwargs = dict(var.example((b, hq, sq, sk, d, hkv), rng, None))
    else:
        from .inputs import make
        dist = draw(st.sampled_from(dists))
        kwargs = make(dist, (b, hq, sq, sk, d, hkv), rng, dtype=name)
        if causal:
            kwargs["causal"] = draw(st.booleans())
        if alignment:
            kwargs["alignment"] = draw(st.sampled_from(("bottom_right", "top_left")))
        if window:
            side = st.one_of(st.just(-1), st.integers(0, max_seq))
            kwargs["window"] = draw(st.one_of(st.none(), st.tuples(side, side)))
        if mask:
            kwargs["mask"] = _mask(draw, rng, b, hq, sq, sk) if draw(st.booleans()) else None
        if scale:
            kwargs["scale"] = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
        if softcap:
            kwargs["softcap"] = draw(st.one_of(st.none(), st.floats(1.0, 50.0)))
        if alibi:
            slopes = alibi_slopes(hq)  # the paper's, also for head counts not a power of two
            kwargs["alibi_slopes"] = draw(st.one_of(st.none(), st.just(slopes)))
    if name is not None:
        kwargs = {n: numerics.round_to(a, name) if n in ("q", "k", "v") else a
                  for n, a in kwargs.items()}
    return AttentionCase(variant=var.name if variant == var.name else variant, kwargs=kwargs,
                         seed=seed)

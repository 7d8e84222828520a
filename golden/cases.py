"""The golden cases: small, seeded, named attention problems whose float64 answers are pinned in files.

A :class:`Case` is pure description -- variant, scalar parameters, which array parameters to *make*,
shape, seed, whether gradients are pinned too. :func:`build` turns it into arrays, reproducibly:

1. ``rng = numpy.random.default_rng(case.seed)``;
2. ``inputs = variant.example(case.shape, rng, parsed_params)`` -- a dict of named arrays for the
   names in ``Variant.inputs`` (``q, k, v`` for the core; other families have other inputs);
3. for each entry of ``case.arrays`` in sorted name order, ``MAKERS[(name, how)](shape, rng, params)``
   makes the array parameter (mask, bias, sinks, alibi_slopes, dropout_mask, head_map, ...);
4. cases with ``grads=True`` draw the upstream gradient ``dout`` (the output's shape) last.

``refattn golden regen`` evaluates the built case with the numpy backend in float64 and writes
``<name>.npz`` with the keys ``input.<name>``, ``param.<name>`` (made arrays), ``output.out``,
``output.lse`` and, with gradients, ``grad.dout``, ``grad.dq``, ``grad.dk``, ``grad.dv`` and
``grad.extras.<name>`` (see :mod:`refattn.golden`).

Contract for family modules
---------------------------
Each module named in :data:`FAMILY_CASE_MODULES` (written by the family's engineer; a module that
does not exist yet is skipped) exposes

* ``CASES``: a sequence of :class:`Case` objects (import :class:`Case` from here). Names are globally
  unique (prefix them with the family, e.g. ``sparse_bigbird_itc``); ``params`` hold JSON scalars and
  tuples only; shapes are small (the whole golden set stays well under a megabyte and a second);
* optionally ``MAKERS``: a dict ``{(param_name, how): maker}`` adding makers for the family's own
  array parameters; a maker is ``maker(shape, rng, params) -> numpy array`` with ``shape`` the case's
  ``(B, Hq, Sq, Sk, D, Hkv)``, ``rng`` the case's generator and ``params`` its scalar parameters. A
  maker draws from ``rng`` only (no other randomness) so the case is reproducible. The same makers
  serve ``refattn compare --param name=how``.

The variant's ``example(shape, rng, params)`` receives the *parsed* parameter dataclass, so it can
honour parameters such as ``layout``.
"""

from __future__ import annotations

import fnmatch
import importlib
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from refattn.errors import ParameterError

#: modules that contribute more cases (and makers); missing ones are skipped
FAMILY_CASE_MODULES = ("refattn.golden.cases_sparse", "refattn.golden.cases_position",
                       "refattn.golden.cases_kvcache", "refattn.golden.cases_moe",
                       "refattn.golden.cases_linear", "refattn.golden.cases_ssm")


@dataclass(frozen=True)
class Case:
    """One golden case.

    ``shape`` is ``(B, Hq, Sq, Sk, D, Hkv)``; ``params`` are JSON-able scalars (and tuples of them);
    ``arrays`` maps an array parameter to the name of its maker (``{"mask": "empty_row"}``);
    ``tolerance`` overrides the variant's default normwise relative tolerance.
    """

    name: str
    variant: str
    shape: tuple
    seed: int
    params: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    grads: bool = False
    tolerance: Optional[float] = None
    doc: str = ""


# -- makers: array parameters drawn from the case's generator ---------------------------------------
def alibi_paper_slopes(n: int) -> np.ndarray:
    """ALiBi slopes of Press et al. for ``n`` heads, including non-powers of two.

    For ``n = 2**k``: the geometric sequence starting at ``2**(-8/n)`` with that ratio; otherwise the
    slopes of the closest smaller power of two followed by every other slope of twice that.
    """
    def power_of_two(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]

    if math.log2(n).is_integer():
        return np.array(power_of_two(n))
    closest = 2 ** math.floor(math.log2(n))
    return np.array(power_of_two(closest) + list(alibi_paper_slopes(2 * closest)[0::2][: n - closest]))


def _mask_random(shape, rng, params):
    b, hq, sq, sk, d, hkv = shape
    return rng.random((b, 1, sq, sk)) < 0.7  # shared across heads: exercises broadcasting


def _mask_empty_row(shape, rng, params):
    b, hq, sq, sk, d, hkv = shape
    keep = rng.random((b, hq, sq, sk)) < 0.7
    keep[..., 0] = True  # every other row sees at least one key ...
    keep[0, :, min(1, sq - 1), :] = False  # ... but row 1 of batch 0 sees none, on every head
    keep[-1, -1, sq - 1, :] = False  # and the last row of the last (batch, head)
    return keep


MAKERS = {
    ("mask", "random"): _mask_random,
    ("mask", "empty_row"): _mask_empty_row,
    ("bias", "random"): lambda shape, rng, params: rng.standard_normal(
        (shape[0], shape[1], shape[2], shape[3])),
    ("sinks", "random"): lambda shape, rng, params: rng.standard_normal(shape[1]),
    ("alibi_slopes", "random"): lambda shape, rng, params: rng.uniform(0.05, 1.0, shape[1]),
    ("alibi_slopes", "alibi"): lambda shape, rng, params: alibi_paper_slopes(shape[1]),
    ("dropout_mask", "random"): lambda shape, rng, params: rng.random(
        (shape[0], shape[1], shape[2], shape[3])) >= 0.25,
    ("head_map", "random"): lambda shape, rng, params: rng.integers(0, shape[5], shape[1]),
}


def makers() -> dict:
    """Every maker: the core ones above plus those of the family case modules."""
    out = dict(MAKERS)
    for module in _family_modules():
        out.update(getattr(module, "MAKERS", {}))
    return out


def make(name: str, how: str, shape, rng, params: dict) -> np.ndarray:
    """The array parameter ``name`` made by maker ``how`` (``ParameterError`` names the choices)."""
    table = makers()
    if (name, how) not in table:
        choices = sorted(h for n, h in table if n == name)
        if not choices:
            raise ParameterError(f"{name}: not an array parameter that refattn can make; array "
                                 f"parameters are {', '.join(sorted({n for n, _ in table}))}")
        raise ParameterError(f"{name}: expected one of {', '.join(map(repr, choices))} (made from the "
                             f"seed), got {how!r}")
    return np.asarray(table[(name, how)](tuple(shape), rng, params))


# -- building a case ------------------------------------------------------------------------------
@dataclass
class Built:
    """A case's arrays: ``inputs`` for the variant, ``params`` (scalars and made arrays), ``rng``
    (positioned after the made arrays, for ``dout``)."""

    inputs: dict
    params: dict
    rng: np.random.Generator


def build(case: Case) -> Built:
    """Inputs and parameters of ``case``, made from its seed (steps 1-3 of the module docstring)."""
    from refattn import variants

    var = variants.get(case.variant)
    rng = np.random.default_rng(case.seed)
    scalars = dict(case.params)
    inputs = var.example(tuple(case.shape), rng, var.parse_params(scalars))
    params = dict(scalars)
    for name in sorted(case.arrays):
        params[name] = make(name, case.arrays[name], case.shape, rng, scalars)
    return Built(inputs=inputs, params=params, rng=rng)


# -- the core cases --------------------------------------------------------------------------------
def _c(name, doc, shape=(2, 4, 6, 6, 8, 4), variant="sdpa", seed=None, grads=True, arrays=None, **params):
    # the seed defaults to a stable hash of the name, so cases do not share their inputs
    seed = seed if seed is not None else sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % 2 ** 31
    return Case(name=name, variant=variant, shape=shape, seed=seed, params=params,
                arrays=dict(arrays or {}), grads=grads, doc=doc)


CORE_CASES = (
    _c("core_plain", "no knob: plain softmax attention, return_lse"),
    _c("core_scale", "custom scale", scale=0.3),
    _c("core_causal_br_sq_lt_sk", "causal bottom-right, Sq < Sk (a prefill after a cache)",
       shape=(1, 2, 5, 9, 8, 2), causal=True),
    _c("core_causal_tl_sq_lt_sk", "causal top-left (PyTorch is_causal), Sq < Sk",
       shape=(1, 2, 5, 9, 8, 2), causal="top_left"),
    _c("core_causal_br_sq_gt_sk", "causal bottom-right, Sq > Sk: the first Sq-Sk rows are empty",
       shape=(1, 2, 9, 5, 8, 2), causal=True),
    _c("core_causal_tl_sq_gt_sk", "causal top-left, Sq > Sk", shape=(1, 2, 9, 5, 8, 2),
       causal=True, alignment="top_left"),
    _c("core_window", "window (2, 1), bottom-right, Sq < Sk", shape=(1, 2, 7, 10, 8, 2), window=(2, 1)),
    _c("core_window_causal_tl", "causal sliding window of 3 tokens, top-left", shape=(1, 2, 8, 8, 8, 2),
       causal=True, alignment="top_left", window=(2, 0)),
    _c("core_mask_empty_row", "dense mask with empty rows (output 0, LSE -inf)",
       arrays={"mask": "empty_row"}),
    _c("core_mask_broadcast", "mask (B, 1, Sq, Sk) broadcast over heads, with causal",
       arrays={"mask": "random"}, causal=True),
    _c("core_bias", "additive bias (gradient pinned)", arrays={"bias": "random"}),
    _c("core_softcap_alibi", "softcap then ALiBi (paper slopes, 6 heads: not a power of two), causal",
       shape=(1, 6, 7, 7, 8, 6), arrays={"alibi_slopes": "alibi"}, softcap=1.5, causal=True),
    _c("core_alibi_flash_form", "ALiBi in flash-attn's causal-kernel form (+slope*j)",
       shape=(1, 4, 5, 8, 8, 4), arrays={"alibi_slopes": "random"}, alibi_form="flash", causal=True),
    _c("core_sinks", "per-head sink logits (LSE excludes them; gradient pinned)",
       arrays={"sinks": "random"}, causal=True),
    _c("core_gqa_8_2", "GQA, 8 query heads over 2 KV heads", variant="gqa", shape=(1, 8, 6, 6, 8, 2),
       causal=True),
    _c("core_mqa", "MQA, one KV head", variant="mqa", shape=(2, 4, 5, 6, 8, 1)),
    _c("core_head_map", "uneven head_map (QCQA)", variant="gqa", shape=(1, 6, 5, 5, 8, 3),
       arrays={"head_map": "random"}),
    _c("core_dropout_seed", "dropout from Philox4x64-10 with dropout_seed", dropout_p=0.3,
       dropout_seed=1234),
    _c("core_dropout_mask", "dropout from an explicit keep-mask", arrays={"dropout_mask": "random"},
       dropout_p=0.25),
    _c("core_lse_base2", "LSE in base 2 (FlashInfer)", lse_base=2, causal=True),
    _c("core_empty_row_nan", "empty rows as NaN (xformers style)", shape=(1, 2, 9, 5, 8, 2),
       causal=True, empty_row="nan", grads=False),
    _c("core_layout_bshd", "layout bshd for q, k, v and the output", shape=(2, 3, 5, 7, 8, 3),
       layout="bshd", causal=True),
    _c("core_flash_odd_tiles", "tiled reference with odd tiles 3 x 5 on 11 x 13, causal",
       variant="flash", shape=(1, 2, 11, 13, 8, 2), block_q=3, block_k=5, causal=True),
)


# -- collection ------------------------------------------------------------------------------------
def _family_modules():
    found = []
    for name in FAMILY_CASE_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it imports is missing: a bug
                raise
    return found


def all_cases() -> dict:
    """Every case by name: the core ones, then those of the family modules (a duplicate is an error)."""
    out = {}
    groups = [CORE_CASES] + [tuple(getattr(m, "CASES", ())) for m in _family_modules()]
    for group in groups:
        for case in group:
            if case.name in out:
                raise ParameterError(f"case: the golden case name {case.name!r} is defined twice")
            out[case.name] = case
    return out


def select(pattern: Optional[str] = None) -> dict:
    """Cases whose name matches the shell glob ``pattern`` (all when None)."""
    cases = all_cases()
    return {n: c for n, c in cases.items() if pattern is None or fnmatch.fnmatchcase(n, pattern)}

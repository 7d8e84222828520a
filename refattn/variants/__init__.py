"""The variant registry: ``register``, ``get``, ``list``.

A :class:`Variant` is a description (name, family, doc, citation, declared inputs, parameter
dataclass, supported backends, default tolerance) plus readable forward/backward functions written
against the backend interface. Docs, ``refattn list``, the CLI, the one pipeline
(:mod:`refattn.pipeline`) and test parametrisation all read this one declaration.

Inputs and parameters: the rule for arrays
------------------------------------------
Every variant is called the same way, ``refattn.attention(*inputs, variant=V, **inputs, **params)``.
What a variant names in ``Variant.inputs`` is an *input*; everything else it accepts is a
*parameter* (its dataclass ``params``):

* an array the variant cannot run without is an input (``q, k, v``; ``table`` for t5; ``k_pages``,
  ``v_pages``, ``block_table``, ``seq_lens`` for paged; ``hidden`` and the weights for mla; ``u``,
  ``delta``, ``A``, ``B``, ``C`` for a state-space scan);
* an optional array that modifies the computation stays a parameter (``mask``, ``bias``, ``sinks``,
  ``alibi_slopes``, ``dropout_mask``, ``head_map``, ``gates``, ...), as do scalars and choices.

Inputs bind positionally in the declared order or by name; a missing input, an input given twice,
an extra positional array and an unknown keyword are errors naming the argument and listing the
variant's inputs and parameters. ``Variant.input_shapes`` gives each input's shape in symbols
(``refattn list --json`` shows them).

One home per family
-------------------
A family is one module or sub-package of ``refattn.variants`` (``core``, ``position/``,
``kvcache/``, ``sparse/``, ...), and everything that defines its variants lives there: the
registrations, the parameter dataclasses and the math helpers the definitions use (RoPE
frequencies beside ``rope``, the KV cache and ring schedule beside ``paged`` and ``ring``). A
sub-package keeps its registrations in ``__init__.py`` and its helpers in named modules
(``position/encodings.py``, ``kvcache/serving.py``, ``sparse/bigbird.py``). Public modules such as
``refattn.position`` and ``refattn.kvcache`` are aliases that re-export a family's helpers and hold
no code of their own. Backends, Patterns and numerics never import a family.

Families register on first use of the registry (no import-time side effects in ``refattn``; the
registry module itself is imported with ``refattn``, so ``refattn.variants.list()`` works at once).
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import ParameterError, UnknownVariant

#: modules that register variants when the registry is first used
FAMILY_MODULES = ("refattn.variants.core", "refattn.variants.position", "refattn.variants.kvcache",
                  "refattn.variants.sparse", "refattn.variants.block", "refattn.variants.moe",
                  "refattn.variants.linear", "refattn.variants.ssm")

_REGISTRY: dict = {}
_loaded = False
#: symbolic shapes of the attention inputs (bhsd; ``layout="bshd"`` swaps H and S)
_QKV_SHAPES = {"q": "(B, Hq, Sq, D)", "k": "(B, Hkv, Sk, D)", "v": "(B, Hkv, Sk, Dv)"}


@dataclass(frozen=True)
class Variant:
    """One registered attention variant.

    ``forward(backend, arrays, params)`` returns ``(out, lse)`` (attention variants; ``lse`` may be
    None) or a dict of named outputs whose first key is ``"out"`` (``outputs`` lists the names);
    ``backward(backend, arrays, dout, params)`` returns ``(dq, dk, dv, extras)`` for variants whose
    first inputs are ``q, k, v`` (``extras``: gradients of their other inputs and learnable
    parameters) or a dict of gradients keyed by input (and parameter) name. Both take the
    validated parameter dataclass; ``arrays`` maps the names in ``inputs`` to the caller's arrays.
    ``drop`` names fields of ``params`` (inherited core knobs) that this variant does not honour:
    they are not part of its schema (an error when given, absent from ``refattn list``), and the
    definition sees their defaults.
    ``tolerance`` is the default normwise relative error allowed between two float64
    evaluations (backend versus numpy, golden versus now).
    ``example(shape, rng, params) -> dict`` builds inputs for the CLI and golden cases.
    ``verdict`` (optional) changes the defaults of the low-precision verdict rule of
    :mod:`refattn.numerics` for this variant: ``{"factor": 3.0, "atol": {"bf16": 2**-7}}``
    (``atol`` per dtype, or one number for all); None keeps factor 2 and atol eps(dtype)/2.
    ``subrect`` declares that the variant computes a sub-rectangle of a larger problem in global
    coordinates (the ``rect=`` parameter, :mod:`refattn.subrect`; what ``refattn.distributed``
    runs); without it ``rect`` is not one of its parameters.
    """

    name: str
    family: str
    doc: str
    citation: str
    params: type
    forward: Callable
    backward: Optional[Callable] = None
    backends: tuple = ("numpy",)
    tolerance: float = 1e-12
    inputs: tuple = ("q", "k", "v")
    #: input name -> its shape in symbols; q, k, v default to the bhsd shapes
    input_shapes: dict = field(default_factory=dict, compare=False)
    #: names of the forward's outputs, ``"out"`` first; ``return_<name>`` parameters select extras
    outputs: tuple = ("out", "lse")
    drop: tuple = ()
    #: a variant equal to this one by definition, used for the same-precision emulation when this
    #: one does not compute through ``attend`` (``flash`` -> ``"sdpa"``)
    emulate_as: Optional[str] = None
    example: Optional[Callable] = None
    aliases: tuple = ()
    #: (B, Hq, Sq, Sk, D, Hkv) of the inputs ``refattn compare`` / ``refattn mask`` make when no
    #: shape is given: small enough to be quick, large enough to exercise the variant (sparse
    #: variants need lengths at which their pattern is really sparse)
    default_shape: tuple = (1, 8, 256, 256, 64, 8)
    verdict: Optional[dict] = field(default=None, compare=False)  # a dict: kept out of hash()
    subrect: bool = False

    def __post_init__(self):
        known = {f.name for f in dataclasses.fields(self.params)}
        bad = sorted(set(self.drop) - known)
        if bad:
            raise ParameterError(f"drop: {bad[0]!r} is not a field of {self.params.__name__}")
        if not self.subrect and "rect" in known and "rect" not in self.drop:
            object.__setattr__(self, "drop", tuple(self.drop) + ("rect",))  # declared, or absent
        shapes = {n: _QKV_SHAPES[n] for n in self.inputs if n in _QKV_SHAPES}
        shapes.update(self.input_shapes)
        missing = [n for n in self.inputs if n not in shapes]
        if missing:
            raise ParameterError(f"input_shapes: variant {self.name!r} declares no shape for "
                                 f"input {missing[0]!r}")
        object.__setattr__(self, "input_shapes", {n: shapes[n] for n in self.inputs})

    @property
    def on_qkv(self) -> bool:
        """True when the first inputs are ``q, k, v`` (backward returns ``(dq, dk, dv, extras)``)."""
        return tuple(self.inputs[:3]) == ("q", "k", "v")

    def fields(self) -> builtins.list:
        """The names of the parameters this variant honours (its schema, in declaration order)."""
        return [f.name for f in dataclasses.fields(self.params) if f.name not in self.drop]

    def parse_params(self, values: dict):
        """The parameter dataclass from keyword values; unknown (or dropped) names are an error."""
        known = self.fields()
        unknown = sorted(set(values) - set(known))
        if unknown:
            what = "an input or parameter" if unknown[0] not in self.inputs else "a parameter"
            raise ParameterError(
                f"{unknown[0]}: not {what} of variant {self.name!r}; expected inputs "
                f"{', '.join(self.inputs)} and parameters {', '.join(sorted(known))}, got "
                f"{', '.join(unknown)}")
        return self.params(**values)

    def parameters(self) -> builtins.list:
        """``[(name, default, help)]`` of the parameters this variant honours."""
        out = []
        for f in dataclasses.fields(self.params):
            if f.name in self.drop:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, default, f.metadata.get("help", "")))
        return out


def register(variant: Variant) -> Variant:
    """Add a variant (and its aliases) to the registry; a duplicate name is an error."""
    for name in (variant.name,) + tuple(variant.aliases):
        if name in _REGISTRY and _REGISTRY[name] is not variant:
            raise ParameterError(f"name: variant {name!r} is already registered")
        _REGISTRY[name] = variant
    return variant


def _load():
    """Import every family module once. A module that fails to import is a broken install: the
    error propagates and the next call tries again (the registry is never left half-filled)."""
    global _loaded
    if not _loaded:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _loaded = True


def get(name: str) -> Variant:
    """The variant called ``name``; :class:`refattn.errors.UnknownVariant` lists the known ones."""
    _load()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownVariant(f"variant: expected one of {', '.join(sorted(_REGISTRY))}, got {name!r}")
    return _REGISTRY[name]


def list(family: Optional[str] = None) -> builtins.list:  # noqa: A001 - the documented name
    """Registered variants (each once, aliases excluded), sorted by family then name."""
    _load()
    seen = {id(v): v for v in _REGISTRY.values()}.values()
    return sorted((v for v in seen if family is None or v.family == family),
                  key=lambda v: (v.family, v.name))


def param_field(default, help: str, **metadata):
    """A dataclass field carrying its one-line help (shown by ``refattn list``)."""
    return field(default=default, metadata={"help": help, **metadata})

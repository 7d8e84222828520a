"""The variant registry: ``register``, ``get``, ``list``.

A :class:`Variant` is a description (name, family, doc, citation, parameter dataclass, supported
backends, default tolerance) plus readable forward/backward functions written against the backend
interface. Docs, ``refattn list``, the CLI and test parametrisation all read this one declaration.

Families register on first use of the registry (no import-time side effects in ``refattn``).
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
                  "refattn.variants.sparse", "refattn.variants.bigbird", "refattn.variants.longformer")

_REGISTRY: dict = {}
_loaded = False


@dataclass(frozen=True)
class Variant:
    """One registered attention variant.

    ``forward(backend, arrays, params) -> (out, lse)`` and
    ``backward(backend, arrays, dout, params) -> (dq, dk, dv, extras)`` take the validated
    parameter dataclass; ``arrays`` maps the names in ``inputs`` to the caller's arrays.
    ``tolerance`` is the default normwise relative error allowed between two float64
    evaluations (backend versus numpy, golden versus now).
    ``example(shape, rng, params) -> dict`` builds inputs for the CLI and golden cases.
    ``verdict`` (optional) changes the defaults of the low-precision verdict rule of
    :mod:`refattn.numerics` for this variant: ``{"factor": 3.0, "atol": {"bf16": 2**-7}}``
    (``atol`` per dtype, or one number for all); None keeps factor 2 and atol eps(dtype)/2.
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
    example: Optional[Callable] = None
    aliases: tuple = ()
    #: (B, Hq, Sq, Sk, D, Hkv) of the inputs ``refattn compare`` / ``refattn mask`` make when no
    #: shape is given: small enough to be quick, large enough to exercise the variant (sparse
    #: variants need lengths at which their pattern is really sparse)
    default_shape: tuple = (1, 8, 256, 256, 64, 8)
    verdict: Optional[dict] = field(default=None, compare=False)  # a dict: kept out of hash()

    def parse_params(self, values: dict):
        """The parameter dataclass from keyword values; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParameterError(
                f"{unknown[0]}: not a parameter of variant {self.name!r}; expected one of "
                f"{', '.join(sorted(known))}, got {', '.join(unknown)}")
        return self.params(**values)

    def parameters(self) -> builtins.list:
        """``[(name, default, help)]`` for docs and ``refattn list``."""
        out = []
        for f in dataclasses.fields(self.params):
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

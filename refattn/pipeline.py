"""The one pipeline: exactly one function runs "variant V on backend B" (DESIGN section 2).

:func:`run` looks the variant up, checks that the backend supports it, hands the backend the
optional hooks (a ``progress`` callback and a low-precision ``rounding``), calls the variant's
forward and, given ``dout``, its backward, and returns a :class:`Result` with the outputs and the
gradients keyed by name. Every caller goes through it: :func:`refattn.attention` and
:func:`refattn.attention_backward` (and their packed/varlen form), ``refattn compare`` (the run
under test, the reference, and the reference for ``--impl``/``--outputs``), ``refattn golden``
regen/verify, the same-precision baseline of :mod:`refattn.numerics` (the numpy backend with the
rounding hook), the error account of :mod:`refattn.report` and the Dask tasks. Nothing else calls
a variant's forward or backward.

:func:`bind` turns a call's positional and keyword arguments into the variant's declared inputs and
its parameters (the rule for arrays is in :mod:`refattn.variants`).

Outputs and gradients
---------------------
``Result.outputs`` maps names to arrays: ``"out"`` always, ``"lse"`` for attention variants (natural
log, ``(B, Hq, Sq)``; absent where the variant has none), and the variant's other declared outputs
(``Variant.outputs``, e.g. ``final_state``). ``Result.grads`` (with ``dout``) maps every input name
(``q``, ``k``, ``v``, ``table``, ``k_pages`` ...) and every learnable parameter (``bias``,
``sinks``) to its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import validate
from .errors import BackendUnavailable, ParameterError


@dataclass
class Result:
    """What :func:`run` computed: ``outputs`` (``"out"`` first), ``grads`` (None without dout),
    the parsed ``params`` and the ``variant`` record."""

    variant: object
    params: object
    outputs: dict
    grads: Optional[dict] = None

    def returned(self):
        """What :func:`refattn.attention` returns: ``out``, or ``(out, extra, ...)`` for each extra
        output whose ``return_<name>`` parameter is True, in the variant's declared order."""
        extra = [n for n in self.variant.outputs[1:] if getattr(self.params, f"return_{n}", False) is True]
        if not extra:
            return self.outputs["out"]
        return (self.outputs["out"], *(self.outputs.get(n) for n in extra))

    def returned_grads(self):
        """What :func:`refattn.attention_backward` returns: ``(dq, dk, dv, extras)`` for variants on
        ``q, k, v`` (``extras``: the gradients of every other input and learnable parameter, a dict,
        empty when none), else the dict of gradients keyed by input name."""
        g = dict(self.grads)
        if self.variant.on_qkv:
            return g.pop("q"), g.pop("k"), g.pop("v"), g
        return g


def variant_of(variant):
    """The :class:`~refattn.variants.Variant` for a name (or the record itself)."""
    from . import variants
    if isinstance(variant, variants.Variant):
        return variant
    return variants.get(variant)


def backend_for(var, backend):
    """The backend instance for ``backend`` (a registry name or an instance), checked to support
    ``var``; :class:`~refattn.errors.BackendUnavailable` names what is supported and installed."""
    from . import backends
    from .backends.base import Backend

    if isinstance(backend, Backend):
        be, name = backend, backend.name
    elif isinstance(backend, str):
        be, name = None, backend
    else:
        raise BackendUnavailable(f"backend: expected a backend name ({', '.join(backends.names())}) "
                                 f"or a Backend instance, got {backend!r}")
    if be is None:
        be = backends.get(name)  # unknown or not installed: says what is installed and how to install
    if name not in var.backends:
        installed = ", ".join(backends.available()) or "none"
        raise BackendUnavailable(f"backend: expected one of {', '.join(var.backends)} for variant "
                                 f"{var.name!r}, got {name!r} (installed: {installed})")
    return be


def bind(var, args: tuple, kwargs: dict) -> tuple:
    """``(arrays, params)`` of a call: positional arguments bind to ``var.inputs`` in order, keyword
    arguments named like an input are inputs, the rest are parameters (checked later by
    ``Variant.parse_params``). Missing inputs, an input given twice and surplus positional
    arguments are errors naming them and listing the variant's inputs."""
    inputs = tuple(var.inputs)
    listing = f"variant {var.name!r} takes inputs {', '.join(inputs)}"
    if len(args) > len(inputs):
        raise ParameterError(f"inputs: {listing} (positional in this order, or by name), got "
                             f"{len(args)} positional arrays")
    arrays = dict(zip(inputs, args))
    params = {}
    for name, value in kwargs.items():
        if name in inputs:
            if name in arrays:
                raise ParameterError(f"{name}: given twice (positionally and by name); {listing}")
            arrays[name] = value
        else:
            params[name] = value
    missing = [n for n in inputs if n not in arrays or arrays[n] is None]
    if missing:
        what = "a missing input" if len(missing) == 1 else "missing inputs"
        got = ", ".join(n for n in inputs if n not in missing) or "none"
        raise ParameterError(f"{', '.join(missing)}: {what}; {listing} (positional in this order, "
                             f"or by name), got {got}")
    return arrays, params


def normalise_outputs(var, raw) -> dict:
    """A forward's return value as ``{"out": ..., "lse": ..., ...}`` (None values left out)."""
    if isinstance(raw, dict):
        outputs = dict(raw)
    else:
        out, lse = raw
        outputs = {"out": out, "lse": lse}
    return {n: a for n, a in outputs.items() if a is not None}


def normalise_grads(var, raw) -> dict:
    """A backward's return value as a dict keyed by input (and learnable parameter) name."""
    if isinstance(raw, dict):
        return dict(raw)
    dq, dk, dv, extras = raw
    return {"q": dq, "k": dk, "v": dv, **extras}


def run(variant, backend="numpy", inputs: Optional[dict] = None, params=None, *, dout=None,
        progress: Optional[Callable] = None, rounding=None, forward: bool = True) -> Result:
    """Run ``variant`` on ``backend``: the outputs, and the gradients for ``dout``.

    ``inputs`` maps the variant's input names to arrays; ``params`` is a dict of keyword values
    (parsed here) or an already parsed parameter dataclass. ``progress(fraction)`` is called as
    parts of each primitive call complete, with their share of its work (backends that report
    progress; see :class:`refattn.backends.base.Backend`); ``rounding`` (a
    :class:`refattn.numerics.Rounding`) makes the numpy backend compute as a low-precision kernel
    does (the same-precision baseline). With ``forward=False`` and ``dout`` only the gradients are
    computed (the outputs dict is then empty).
    """
    var = variant_of(variant)
    be = backend_for(var, backend)
    p = params if isinstance(params, var.params) else var.parse_params(dict(params or {}))
    if progress is not None or rounding is not None:
        be = be.configured(progress=progress, rounding=rounding)
    arrays = dict(inputs or {})
    missing = [n for n in var.inputs if arrays.get(n) is None]
    if missing:
        raise ParameterError(f"{', '.join(missing)}: missing input of variant {var.name!r} "
                             f"(inputs {', '.join(var.inputs)})")
    validate.check_all_finite(var, arrays, p)  # NaN/+inf anywhere is an error, never an output
    if dout is not None:
        validate.check_finite(dout, "dout")
    outputs = normalise_outputs(var, var.forward(be, arrays, p)) if forward else {}
    grads = None
    if dout is not None:
        if var.backward is None:
            raise BackendUnavailable(f"variant: {var.name!r} has no backward")
        grads = normalise_grads(var, var.backward(be, arrays, dout, p))
    return Result(variant=var, params=p, outputs=outputs, grads=grads)

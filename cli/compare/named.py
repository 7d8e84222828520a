"""``--impl`` for variants whose inputs are not exactly ``q, k, v`` (``moe_topk``, ``moe_layer``,
``block``, ``paged``, ``mla``...): the function under test is called with the case's inputs by their
documented names and its parameters, ``fn(**inputs, **params)`` (:func:`refattn.impl.call_named`;
``refattn list --json`` shows each variant's inputs and outputs). It returns a dict of named outputs,
a tuple in the variant's output order, or ``out`` alone; only what it returns is compared.

Only the ``refattn`` adapter applies (the others are attention signatures), in fp64 (the
same-precision baseline emulates the attention primitive), without ``--grad`` and ``--lse``.
"""

from __future__ import annotations

from refattn.errors import ParameterError
from .problem import Oracle, Problem, require_qkv


def run_impl_named(problem: Problem, o: Oracle, dout) -> tuple:
    """``(description, outputs)`` of the user's function on a variant not on q, k, v."""
    from refattn import impl

    var = problem.variant
    if o.adapter != "refattn":
        require_qkv(var, f"--adapter {o.adapter}")
    for flag, given in (("--dtype", o.low), ("--grad", dout is not None), ("--lse", o.lse)):
        if given:
            raise ParameterError(f"{flag}: --impl on variant {var.name!r} (inputs "
                                 f"{', '.join(var.inputs)}) compares float64 outputs only; got {flag}")
    got = impl.call_named(impl.load(o.impl), var, problem.inputs, problem.params,
                          framework=o.framework, device=o.device)
    if got.get("out") is None:
        raise ParameterError(f"impl: {o.impl} returned no out; expected a dict of the outputs of "
                             f"{var.name!r} ({', '.join(var.outputs)}), a tuple in that order, or out")
    subject = {"kind": "impl", "name": o.impl, "adapter": o.adapter, "framework": o.framework,
               "device": o.device, "lse": o.lse, "backward": o.backward}
    return subject, got

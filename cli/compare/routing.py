"""Routing disagreements for ``refattn compare`` on the mixture-of-experts variants: which tokens
were sent to other experts under test than in the reference, not only how far the outputs are.

The experts of token ``t`` are read from the first table both sides hold:

* ``dispatch (T, E)`` -- the kept assignments (after capacity);
* ``indices (T, k)`` -- the selected experts (before capacity), with ``dropped (T, k)`` removed when
  both sides give it;
* the combine table -- ``out`` of ``moe_topk``, ``combine`` of ``moe_layer`` -- whose non-zero
  entries are the kept assignments.

JSON (the ``"routing"`` key of ``refattn compare --json``; null for variants of other families)::

    {"source": "dispatch" | "indices" | "out" | "combine" | null,  # null: no table on both sides
     "tokens": T, "disagreeing": n,
     "token_shape": [B, S],                                # the leading axes of x; t is row-major
     "first": [{"token": t, "position": [b, s], "under_test": [e, ...], "reference": [e, ...],
                "only_under_test": [...], "only_reference": [...]}, ...]}    # at most SHOW tokens
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: tokens listed in the report (the count covers all)
SHOW = 10


def _combine_name(variant) -> str:
    return "combine" if "combine" in variant.outputs else "out"


def _experts(outputs: dict, source: str) -> list:
    """Each token's experts as a sorted tuple, read from ``outputs[source]``."""
    table = np.asarray(outputs[source])
    if source == "indices":
        idx = np.rint(table).astype(np.int64)
        keep = np.ones(idx.shape, dtype=bool)
        if "dropped" in outputs and np.shape(outputs["dropped"]) == idx.shape:
            keep = np.asarray(outputs["dropped"]) == 0
        return [tuple(sorted(int(e) for e, k in zip(row, kr) if k)) for row, kr in zip(idx, keep)]
    return [tuple(int(e) for e in np.nonzero(row != 0)[0]) for row in table.reshape(table.shape[0], -1)]


def routing_report(problem, actual: dict, expected: dict) -> Optional[dict]:
    """The routing account of one comparison (module docstring), or None outside the moe family.
    ``problem`` is the compared :class:`~refattn.cli.compare.problem.Problem` (its variant, and its
    input ``x`` for the token positions)."""
    variant = problem.variant
    if getattr(variant, "family", None) != "moe":
        return None
    x = problem.inputs.get("x")
    token_shape = None if x is None else tuple(np.shape(x)[:-1])
    both = [s for s in ("dispatch", "indices", _combine_name(variant))
            if s in actual and s in expected and np.shape(actual[s]) == np.shape(expected[s])
            and np.ndim(expected[s]) == 2]
    shape = [int(n) for n in token_shape] if token_shape is not None else None
    if not both:
        return {"source": None, "tokens": None, "disagreeing": None, "token_shape": shape, "first": []}
    source = both[0]
    got, want = _experts(actual, source), _experts(expected, source)
    bad = [t for t, (a, b) in enumerate(zip(got, want)) if a != b]
    first = []
    for t in bad[:SHOW]:
        pos = [int(i) for i in np.unravel_index(t, token_shape)] if token_shape else None
        first.append({"token": t, "position": pos, "under_test": list(got[t]), "reference": list(want[t]),
                      "only_under_test": sorted(set(got[t]) - set(want[t])),
                      "only_reference": sorted(set(want[t]) - set(got[t]))})
    return {"source": source, "tokens": len(want), "disagreeing": len(bad), "token_shape": shape,
            "first": first}


def routing_lines(report: Optional[dict]) -> list:
    """The lines ``refattn compare`` prints for a routing account (none outside the moe family)."""
    if report is None:
        return []
    if report["source"] is None:
        return ["routing: not compared (no dispatch, indices or combine table on both sides; an "
                "--impl function can return them in a dict)"]
    head = f"routing (from {report['source']}): "
    if not report["disagreeing"]:
        return [head + f"all {report['tokens']} tokens went to the same experts"]
    lines = [head + f"{report['disagreeing']} of {report['tokens']} tokens went to other experts"]
    for item in report["first"]:
        where = "" if item["position"] is None else " (" + ", ".join(map(str, item["position"])) + ")"
        moved = ""
        if item["only_under_test"] or item["only_reference"]:
            moved = (f": to {item['only_under_test'] or 'none'} instead of "
                     f"{item['only_reference'] or 'none'}")
        lines.append(f"  token {item['token']}{where}: experts {item['under_test']} under test, "
                     f"{item['reference']} in the reference{moved}")
    if report["disagreeing"] > len(report["first"]):
        lines.append(f"  ... and {report['disagreeing'] - len(report['first'])} more tokens")
    return lines

"""``refattn compare --flex module:mask_mod[,module:score_mod] --impl ...``: a FlexAttention
description as the reference.

``--flex`` selects the ``flex`` variant (:mod:`refattn.flex`): the reference evaluates the user's
``mask_mod`` block by block into a Pattern and the ``score_mod`` in float64 through torch on the CPU.
The implementation under test is ``--impl`` (for torch's ``flex_attention`` or a kernel with its
signature: ``--adapter flex --framework torch``, which passes the same ``mask_mod`` as a
``create_block_mask`` block mask and the same ``score_mod``), or a backend. Either part may be
empty: ``--flex :my_mods:softcap`` is a score_mod alone (write the mask part as ``-``: ``--flex
-,my_mods:softcap``).
"""

from __future__ import annotations

import click

from refattn.errors import ParameterError


def flex_option(f):
    return click.option("--flex", "flex_spec", metavar="MOD:MASK_MOD[,MOD:SCORE_MOD]", default=None,
                        help="Reference: a FlexAttention mask_mod (and score_mod) evaluated by refattn "
                             "(variant flex; '-' for no mask_mod). Default: none.")(f)


def apply_flex(spec: str, variant, params: tuple) -> tuple:
    """``(variant, params)`` for ``--flex spec``: the variant ``flex`` with ``mask_mod=``/``score_mod=``."""
    if variant not in (None, "flex"):
        raise ParameterError(f"--flex: selects variant 'flex', got --variant {variant}")
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > 2 or not parts[0]:
        raise ParameterError(f"--flex: expected module:mask_mod[,module:score_mod], got {spec!r}")
    given = {n.split("=", 1)[0] for n in params}
    clash = sorted(given & {"mask_mod", "score_mod"})
    if clash:
        raise ParameterError(f"--param {clash[0]}: given with --flex; give it once")
    extra = []
    if parts[0] != "-":
        extra.append(f"mask_mod={parts[0]}")
    if len(parts) == 2 and parts[1]:
        extra.append(f"score_mod={parts[1]}")
    if not extra:
        raise ParameterError(f"--flex: expected a mask_mod or a score_mod, got {spec!r}")
    for item in extra:  # a bad module:function is a usage error before any work
        from refattn.flex import resolve
        name, value = item.split("=", 1)
        resolve(value, name)
    return "flex", tuple(params) + tuple(extra)

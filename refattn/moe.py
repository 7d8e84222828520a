"""Mixture-of-experts routing and layers: ``route``, ``moe_forward``, ``moe_backward``, the presets.

A public alias: the code lives in the family's one home, :mod:`refattn.variants.moe` (beside the
registered ``moe_topk`` and ``moe_layer`` variants), whose docstring states every convention.
"""

from .variants.moe import *  # noqa: F401,F403
from .variants.moe import __all__  # noqa: F401

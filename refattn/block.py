"""Transformer block pieces: RMSNorm, LayerNorm, FFN, and a pre-norm block composing any registered
attention variant with a dense FFN or a mixture of experts.

A public alias: the code lives in the family's one home, :mod:`refattn.variants.block` (beside the
registered ``block`` variant), whose docstring states every convention.
"""

from .variants.block import *  # noqa: F401,F403
from .variants.block import __all__  # noqa: F401

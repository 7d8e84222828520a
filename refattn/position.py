"""Position encodings (sinusoidal, RoPE and its scalings, ALiBi, T5 buckets, Transformer-XL).

A public alias: the code lives in the family's one home, :mod:`refattn.variants.position.encodings`
(beside the registered ``rope``, ``alibi``, ``t5``, ``transformer_xl`` and ``nope`` variants).
"""

from .variants.position.encodings import *  # noqa: F401,F403
from .variants.position.encodings import __all__  # noqa: F401

"""State space models: mamba's selective scan, Mamba-2's SSD (chunked and its masked-attention
dual), S4 (discretisation, kernel, recurrence and convolution).

A public alias: the code lives in the family's one home, :mod:`refattn.variants.ssm` (beside the
registered ``mamba``, ``mamba2`` and ``s4`` variants).
"""

from .variants.ssm import *  # noqa: F401,F403
from .variants.ssm import __all__  # noqa: F401

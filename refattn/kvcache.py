"""KV cache, serving and distribution: the cache, decode masks, paged KV, MLA, state merging,
cascade, ring attention and expected-attention pruning.

A public alias: the code lives in the family's one home, :mod:`refattn.variants.kvcache.serving`
(beside the registered ``decode``, ``paged``, ``mla``, ``cascade``, ``ring`` and
``expected_attention`` variants). The ``*_attention`` entry points are deprecated thin wrappers of
:func:`refattn.attention` (one release; see CHANGELOG.md).
"""

from .variants.kvcache.serving import *  # noqa: F401,F403
from .variants.kvcache.serving import __all__  # noqa: F401

"""Per-model hooks for families that compute attention inline (not through transformers'
``ALL_ATTENTION_FUNCTIONS``): one small module per family. Each module registers its family with
:func:`refattn.hf.spec.register_family` and defines

* ``spec(config, layer_idx, model_type) -> dict`` (the parts of an :class:`~refattn.hf.AttentionSpec`),
* ``build(config, layer_idx) -> module`` (the attention module of that layer),
* ``run(module, spec, x, keep, pos, *, grad, seed, float64, log, positions_given) -> check.Run``:
  the module run once with its attention captured by a hook of its own, and the oracle's inputs.
"""

from __future__ import annotations

import importlib

from ...errors import ParameterError

#: family name -> hook module (imported on first use of refattn.hf)
HOOKS = {"gptj": "gptj", "bloom": "bloom", "falcon": "falcon", "mpt": "mpt", "longformer": "longformer",
         "big_bird": "bigbird"}
_loaded = False


def _load():
    global _loaded
    if not _loaded:
        for name in HOOKS:
            importlib.import_module(f"{__name__}.{HOOKS[name]}")
        _loaded = True


def _module(family):
    _load()
    if family not in HOOKS:
        raise ParameterError(f"module: no hook for family {family!r}")
    return importlib.import_module(f"{__name__}.{HOOKS[family]}")


def run(family, *args, **kwargs):
    return _module(family).run(*args, **kwargs)


def build(family, config, layer_idx):
    return _module(family).build(config, layer_idx)


_load()

"""The transformers bridge: check a real model's attention against the float64 oracle.

Needs the ``peers`` extra (``pip install 'refattn[peers]'``: torch and transformers); importing
``refattn.hf`` does not import them, calling it does, and never downloads anything (configs are
objects or ``config.json`` dicts, modules are built with random weights).

* :func:`attention_spec` ``(config, layer_idx=0)`` -> :class:`AttentionSpec`: the variant, its
  parameters and its inputs for one layer (the mapping rules are in :mod:`refattn.hf.spec`).
* :func:`check_module` ``(module, hidden_states, ...)`` -> :class:`HFCheck`: the module run in
  float64 eager mode, captured where it attends, compared with the oracle forward and backward
  (:mod:`refattn.hf.check`).
* :func:`build_layer` ``(config, layer_idx=0, seed=0)``: that layer's attention module with random
  float64 weights (what ``refattn compare --hf-config`` checks).
* :data:`FAMILIES`: the supported model types; :data:`QUIRKS`: the peer quirks found by comparing,
  with the transformers version they were seen in (:mod:`refattn.hf.quirks`).

    >>> from transformers import LlamaConfig                                   # doctest: +SKIP
    >>> from refattn import hf                                                 # doctest: +SKIP
    >>> cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    >>> layer = hf.build_layer(cfg, 0, seed=0)                                 # doctest: +SKIP
    >>> hf.check_module(layer, np.random.default_rng(0).standard_normal((2, 16, 64))).verdict
    'PASS'
"""

from __future__ import annotations

from ..errors import BackendUnavailable, ParameterError

__all__ = ["attention_spec", "check_module", "build_layer", "AttentionSpec", "HFCheck", "QuirkWarning",
           "FAMILIES", "QUIRKS", "supported_model_types"]


def _require():
    """``(torch, transformers)``, or :class:`~refattn.errors.BackendUnavailable` naming the extra."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable(f"refattn.hf: needs torch and transformers, the 'peers' extra: pip install "
                                 f"'refattn[peers]' ({exc})") from None
    return torch, transformers


def attention_spec(config, layer_idx=0):
    """See :func:`refattn.hf.spec.attention_spec`."""
    from .spec import attention_spec as f
    return f(config, layer_idx)


def check_module(module, hidden_states, **kwargs):
    """See :func:`refattn.hf.check.check_module`."""
    _require()
    from .check import check_module as f
    return f(module, hidden_states, **kwargs)


def build_layer(config, layer_idx=0, *, seed: int = 0):
    """Layer ``layer_idx``'s attention module for ``config`` (object or config.json dict), float64,
    eval mode, eager attention, every weight drawn from ``seed`` (:func:`refattn.hf.families.randomise`)."""
    import copy

    from ..validate import check_int
    from . import hooks
    from .families import randomise, runtime
    from .spec import FAMILIES, FAMILY_OF, attention_spec as spec_of, load_config

    _require()
    spec = spec_of(config, layer_idx)
    cfg = copy.deepcopy(load_config(config))
    cfg._attn_implementation = "eager"
    family = FAMILY_OF[spec.model_type]
    if spec.model_type == "t5":  # every layer with a table of its own (HF: layer 0's, shared)
        module = runtime("t5").attention_class()(cfg, has_relative_attention_bias=True,
                                                 layer_idx=spec.layer_idx)
    elif FAMILIES[family][2] == "attention_interface":
        module = runtime(spec.model_type).attention_class()(cfg, spec.layer_idx)
    else:
        module = hooks.build(family, cfg, spec.layer_idx)
    if getattr(module, "config", None) is None:
        module.config = cfg  # BLOOM's and MPT's attention keep no config; check_module reads it here
    return randomise(module, check_int(seed, "seed", 0))


def supported_model_types() -> list:
    from . import hooks  # noqa: F401
    from .spec import FAMILY_OF
    return sorted(FAMILY_OF)


def __getattr__(name):
    if name in ("AttentionSpec", "FAMILIES", "FAMILY_OF"):
        from . import hooks  # noqa: F401
        from . import spec
        return getattr(spec, name)
    if name in ("HFCheck", "QuirkWarning"):
        from . import check
        return getattr(check, name)
    if name == "QUIRKS":
        from .quirks import QUIRKS
        return QUIRKS
    raise AttributeError(f"module 'refattn.hf' has no attribute {name!r}")

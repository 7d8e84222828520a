"""Capturing an HF attention module where it attends.

Models on transformers' attention interface look their attention function up in
``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``. :func:`interface_capture` registers
one function there, ``"refattn_capture"`` (transformers' documented extension point,
``AttentionInterface.register``), points the module's config at it for the duration, and records
every call -- ``query, key, value, attention_mask`` and the keywords (``scaling``, ``sliding_window``,
``softcap``, ``s_aux``, ...) -- before running the modeling file's own ``eager_attention_forward``
on them and recording its output. It also wraps the modeling file's RoPE function
(``apply_rotary_pos_emb`` and kin, :data:`refattn.hf.families.RUNTIME`) to record q and k *before*
the rotation, so the oracle applies RoPE itself (from the config) and a wrong pairing or frequency
shows up. Tensors are kept in the autograd graph, so input gradients can be taken from the
recorded output with ``torch.autograd.grad``.

Models that compute attention inline (BLOOM, Falcon, MPT, GPT-J, BigBird, Longformer, ...) are
captured by one small hook module per family in :mod:`refattn.hf.hooks`.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

NAME = "refattn_capture"
_CURRENT = contextvars.ContextVar("refattn_hf_capture", default=None)
_registered = False


@dataclass
class Record:
    """What one module run showed: ``calls`` (one dict per attention-function call: ``query``,
    ``key``, ``value``, ``mask``, ``kwargs``, ``out``) and ``rotary`` (``(q, k)`` given to the RoPE
    function, in call order)."""

    eager: object = None
    calls: list = field(default_factory=list)
    rotary: list = field(default_factory=list)


def _interface(module, query, key, value, attention_mask, **kwargs):
    rec = _CURRENT.get()
    if rec is None:  # called outside check_module: behave like eager
        raise RuntimeError("refattn_capture: called outside refattn.hf.check_module")
    out, weights = rec.eager(module, query, key, value, attention_mask, **kwargs)
    rec.calls.append({"query": query, "key": key, "value": value, "mask": attention_mask,
                      "kwargs": dict(kwargs), "out": out})
    return out, weights


def _register():
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(NAME, _interface)
        _registered = True


@contextlib.contextmanager
def interface_capture(module, modeling, rotary_names=()):
    """Run ``module`` (an attention module on the interface) with its calls recorded; yields a
    :class:`Record`. ``modeling`` is its modeling module (for ``eager_attention_forward`` and the
    RoPE functions named in ``rotary_names``)."""
    _register()
    rec = Record(eager=getattr(modeling, "eager_attention_forward"))
    config = module.config
    saved_impl = config._attn_implementation
    saved = {n: getattr(modeling, n) for n in rotary_names if hasattr(modeling, n)}

    def wrap(fn):
        def rotary(q, k, *args, **kwargs):
            rec.rotary.append((q, k))
            return fn(q, k, *args, **kwargs)
        return rotary

    token = _CURRENT.set(rec)
    try:
        config._attn_implementation = NAME
        for n, fn in saved.items():
            setattr(modeling, n, wrap(fn))
        yield rec
    finally:
        config._attn_implementation = saved_impl
        for n, fn in saved.items():
            setattr(modeling, n, fn)
        _CURRENT.reset(token)

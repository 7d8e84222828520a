"""Shared pieces of the per-model hooks: wrap an instance method or a submodule's input for one run,
and turn captured tensors into a :class:`refattn.hf.check.Run`."""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def wrapped(module, name, record: list, *, returns=True):
    """Replace ``module.<name>`` (a bound method) by one that appends its result (or, with
    ``returns=False``, its positional arguments) to ``record``; restored afterwards."""
    orig = getattr(module, name)

    def method(*args, **kwargs):
        out = orig(*args, **kwargs)
        record.append(out if returns else args)
        return out

    setattr(module, name, method)
    try:
        yield record
    finally:
        delattr(module, name)  # the class's method again


@contextlib.contextmanager
def input_of(linear, record: list):
    """Record the input of ``linear`` (the attention output before the output projection)."""
    handle = linear.register_forward_pre_hook(lambda mod, args: record.append(args[0]))
    try:
        yield record
    finally:
        handle.remove()


def np64(t):
    return t.detach().cpu().numpy().astype(np.float64)


def heads_out(t, h):
    """``(B, S, H * Dv)`` -> ``(B, H, S, Dv)`` numpy."""
    b, s, hd = t.shape
    return np64(t).reshape(b, s, h, hd // h).transpose(0, 2, 1, 3)


def run_grads(out_t, targets: dict, dout_bhsd, h):
    """Gradients of ``sum(out * dout)`` for the captured ``targets`` (name -> tensor); ``out_t`` is
    ``(B, S, H * Dv)``."""
    import torch
    b, hh, s, dv = dout_bhsd.shape
    d = torch.tensor(dout_bhsd.transpose(0, 2, 1, 3).reshape(b, s, hh * dv))
    gs = torch.autograd.grad(out_t, list(targets.values()), d, allow_unused=True)
    return {n: (None if g is None else np64(g)) for n, g in zip(targets, gs)}


def contiguous_tokens(keep, model: str):
    """ALiBi built from ``cumsum(mask) - 1`` (BLOOM, Falcon) equals refattn's ALiBi (a per-row shift)
    only when each sequence's tokens are contiguous (left or right padding)."""
    from ...errors import ParameterError
    if keep is None:
        return
    for b, row in enumerate(keep):
        idx = np.nonzero(row)[0]
        if idx.size and idx[-1] - idx[0] + 1 != idx.size:
            raise ParameterError(f"attention_mask: {model} counts ALiBi positions over the tokens "
                                 f"(cumsum of the mask); refattn's alibi needs each sequence's tokens "
                                 f"contiguous (left or right padding), got a gap in sequence {b}")


def alibi_positions(keep, b, s):
    """Key positions as BLOOM/Falcon count them: ``(cumsum(mask) - 1) * mask``, ``(B, S)``."""
    m = np.ones((b, s), dtype=np.int64) if keep is None else keep.astype(np.int64)
    return (np.cumsum(m, axis=-1) - 1) * m

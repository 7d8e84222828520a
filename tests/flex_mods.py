"""mask_mod / score_mod examples for the flex tests (importable as ``flex_mods:name`` by the CLI)."""

import torch


def causal(b, h, q, kv):
    return q >= kv


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv < 5)


def document(b, h, q, kv):
    """Two documents per sequence, split at 7 (batch 0) or 11 (batch 1), causal inside each."""
    split = torch.tensor([7, 11])[b]
    return ((q < split) == (kv < split)) & (q >= kv)


def per_head_window(b, h, q, kv):
    return (q - kv).abs() <= 2 * h + 1


def scalar_reshape(b, h, q, kv):
    """Does not broadcast (reshape to a scalar); evaluated through torch.vmap like create_block_mask."""
    return (q >= kv).reshape(())


def not_bool(b, h, q, kv):
    return q - kv


def softcap(score, b, h, q, kv):
    return 3.0 * torch.tanh(score / 3.0)


def alibi(score, b, h, q, kv):
    return score - (h + 1) * 0.25 * (q - kv).abs()


def square(score, b, h, q, kv):
    """Not expressible with refattn's declarative score modifications."""
    return score * score / 4.0 + 0.1 * q


def nan_mod(score, b, h, q, kv):
    return score * float("nan")

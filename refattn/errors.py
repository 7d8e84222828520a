"""Exceptions raised by refattn.

Every error a user can cause is a subclass of :class:`RefattnError` and of the builtin that
fits it (``ValueError`` or ``TypeError``), so ``except ValueError`` keeps working. Messages name
the argument, what was expected and what came, in one line::

    refattn.errors.ShapeError: k: expected rank 4 (B, H, S, D) in layout 'bhsd', got shape (2, 3, 4)
"""

from __future__ import annotations


class RefattnError(Exception):
    """Base class of every refattn error."""


class ShapeError(RefattnError, ValueError):
    """An array has the wrong rank or shape, or arrays do not agree with each other."""


class DTypeError(RefattnError, TypeError):
    """An array has a dtype that cannot be converted to the compute dtype."""


class ParameterError(RefattnError, ValueError):
    """A parameter value is out of range, of the wrong kind, or unknown to the variant."""


class UnknownVariant(RefattnError, ValueError):
    """No variant of that name is registered."""


class BackendUnavailable(RefattnError, ValueError):
    """The backend is unknown, not installed, or does not implement the requested variant."""


class GoldenError(RefattnError, ValueError):
    """A golden file is missing, corrupt, tampered with, or does not match its manifest."""


class InputFileError(RefattnError, ValueError):
    """A user-supplied ``.npz`` file cannot be read safely or lacks the documented keys."""


def fmt_shape(shape) -> str:
    """``(2, 3)`` for a shape, as used in every message."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"

"""Keep a float64 transformers module in float64: patch its float32 *casts*, record where they are.

HF code casts float64 tensors down to float32 in a few places (VARIANTS H): the eager attention
functions' ``softmax(..., dtype=torch.float32)``, the RMSNorms' ``hidden_states.to(torch.float32)``,
DeepSeek-V2's rotary ``xq.float()``, routers' ``.float()``/``.type(torch.float32)``. A float64
module run as is therefore carries float32 rounding (~1e-7): a comparison with the float64 oracle
would measure that rounding, not the attention's semantics.

:func:`float64_casts` is a context manager that, while active, makes ``Tensor.float()``,
``Tensor.to(torch.float32)``, ``Tensor.type(torch.float32)`` and ``softmax(..., dtype=torch.float32)``
leave a *float64* tensor in float64 (every other tensor and dtype behaves as before), and records
each call site that would have rounded (``file:line (function)``) in the returned :class:`CastLog`.
It patches ``torch.Tensor`` and ``torch.nn.functional.softmax`` process-wide for its duration, so it
is not for concurrent use from several threads. The tests' ``tests/peers/hf_float64.py`` applies the
same patch with pytest's ``monkeypatch``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field


@dataclass
class CastLog:
    """Call sites where a float64 tensor would have been cast to float32: ``{site: count}``."""

    sites: dict = field(default_factory=dict)

    def hit(self, what: str, depth: int = 2):
        frame = sys._getframe(depth)
        # skip torch's own wrappers so the site is the model's line
        while frame is not None and os.sep + "torch" + os.sep in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is None:
            return
        site = (f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} "
                f"({frame.f_code.co_name}: {what})")
        self.sites[site] = self.sites.get(site, 0) + 1


@contextlib.contextmanager
def float64_casts(log: CastLog | None = None):
    """Patch the float32 casts of float64 tensors while active (module docstring); yields the log."""
    import torch

    log = CastLog() if log is None else log
    f32, f64 = torch.float32, torch.float64
    orig_to, orig_float, orig_type = torch.Tensor.to, torch.Tensor.float, torch.Tensor.type
    orig_softmax = torch.nn.functional.softmax

    def to(self, *args, **kwargs):
        if self.dtype == f64 and (f32 in args or kwargs.get("dtype") is f32):
            log.hit(".to(torch.float32)")
            args = tuple(f64 if a is f32 else a for a in args)
            kwargs = {k: (f64 if v is f32 else v) for k, v in kwargs.items()}
        return orig_to(self, *args, **kwargs)

    def float_(self, *args, **kwargs):
        if self.dtype == f64:
            log.hit(".float()")
            return self
        return orig_float(self, *args, **kwargs)

    def type_(self, dtype=None, *args, **kwargs):
        if dtype is None:
            return orig_type(self)
        if self.dtype == f64 and (dtype is f32 or dtype == "torch.FloatTensor"):
            log.hit(".type(torch.float32)")
            return self
        return orig_type(self, dtype, *args, **kwargs)

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == f64 and dtype is f32:
            log.hit("softmax(dtype=torch.float32)")
            dtype = f64
        return orig_softmax(x, dim=dim, dtype=dtype)

    torch.Tensor.to, torch.Tensor.float, torch.Tensor.type = to, float_, type_
    torch.nn.functional.softmax = softmax
    try:
        yield log
    finally:
        torch.Tensor.to, torch.Tensor.float, torch.Tensor.type = orig_to, orig_float, orig_type
        torch.nn.functional.softmax = orig_softmax

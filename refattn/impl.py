"""Calling an implementation under test: ``"module:function"`` strings and framework conversion.

:func:`load` turns ``"my_pkg.kernels:my_attn"`` (or ``"path/to/file.py:my_attn"``, or a dotted
attribute such as ``"my_pkg:Kernels.attn"``) into the callable. The current directory is searched
after ``sys.path``, as ``python -m`` would, so a module beside the user's shell is found by the
console script too. Every failure -- no colon, empty parts, a module that cannot be imported or
raises on import, a missing attribute, something not callable -- is a
:class:`refattn.errors.ParameterError` naming ``impl``.

:func:`call` runs the function on a case (``q, k, v`` plus refattn parameters) through an adapter
(:mod:`refattn.adapters`: ``"refattn"``, ``"sdpa"``, ``"flex"``, ``"flash"``, ``"varlen"``):

* ``framework="numpy"``: the function gets numpy arrays; with ``dtype`` the data arrays (q, k, v,
  a float attn_mask) are numpy arrays *of that dtype* (ml_dtypes for bf16/fp8); without it, float64.
* ``framework="torch"``: the function gets torch tensors on ``device`` (default ``"cpu"``), made
  from the numpy arrays with DLPack (``torch.from_dlpack``) and cast to the dtype's torch dtype
  (bf16/fp8 via float32, exactly: the values are rounded to the dtype first). Results come back
  with DLPack too (bf16/fp8 through float32, exactly).
* ``framework="jax"``: the function gets JAX arrays on the CPU (``jax.numpy.asarray``; bf16/fp8
  as ml_dtypes, exactly). JAX computes in float32 unless 64-bit mode is on: refattn turns on
  ``jax_enable_x64`` when it converts, so float64 inputs stay float64 (a process-wide JAX setting;
  the CLI owns its process).

Whatever it returns (an array, or a tuple whose first item is the output and second the LSE) is
converted to float64 numpy in the case's layout. :func:`grads` obtains ``dq, dk, dv``: with torch
by autograd (``out.backward(dout)``); with JAX by ``jax.vjp``; with numpy the function must be a *backward* with
refattn's convention ``fn(q, k, v, dout, **params) -> (dq, dk, dv, ...)`` (adapter ``"refattn"``).
An exception raised inside the user's function is re-raised as :class:`ImplCallError` naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable, Optional

import numpy as np

from . import numerics
from .adapters import Data, FlexMods, signature_call
from .errors import ParameterError, RefattnError

FRAMEWORKS = ("numpy", "torch", "jax")


class ImplCallError(RefattnError, RuntimeError):
    """The implementation under test raised while being called."""


# -- loading ------------------------------------------------------------------------------------------
def load(spec: str) -> Callable:
    """The callable named by ``"module:function"`` (module docstring)."""
    if not isinstance(spec, str):
        raise ParameterError(f"impl: expected a string 'module:function', got {type(spec).__name__}")
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ParameterError(f"impl: expected 'module:function' (e.g. my_pkg.kernels:my_attn), "
                             f"got {spec!r}")
    module = _import(module_name)
    obj = module
    for part in attr.split("."):
        if not part.isidentifier() or not hasattr(obj, part):
            raise ParameterError(f"impl: module {module_name!r} has no attribute {attr!r} "
                                 f"(spec {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ParameterError(f"impl: {spec!r} is a {type(obj).__name__}, expected a callable")
    return obj


def _import(name: str):
    try:
        if name.endswith(".py"):
            if not os.path.isfile(name):
                raise ParameterError(f"impl: file {name!r} does not exist")
            spec = importlib.util.spec_from_file_location(
                "refattn_impl_" + os.path.splitext(os.path.basename(name))[0], name)
            module = importlib.util.module_from_spec(spec)
            # the file's own folder first on the path, as `python file.py` has it: its sibling
            # modules import (it stays there: the function may import lazily when called)
            folder = os.path.dirname(os.path.abspath(name))
            if folder not in sys.path:
                sys.path.insert(0, folder)
            spec.loader.exec_module(module)
            return module
        if not all(part.isidentifier() for part in name.split(".")):
            raise ParameterError(f"impl: {name!r} is not a module name (expected dotted "
                                 f"identifiers or a path ending in .py)")
        added = os.getcwd() not in sys.path
        if added:
            sys.path.append(os.getcwd())
        try:
            return importlib.import_module(name)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    except ParameterError:
        raise
    except ImportError as exc:
        raise ParameterError(f"impl: cannot import module {name!r} ({exc})") from exc
    except Exception as exc:  # the user's module raised while importing
        raise ParameterError(f"impl: importing {name!r} raised {type(exc).__name__}: {exc}") from exc


# -- framework conversion ---------------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ParameterError("framework: 'torch' needs PyTorch installed "
                             "(pip install 'refattn[peers]' or torch)") from exc
    return torch


def _jax():
    try:
        import jax
    except ImportError as exc:
        raise ParameterError("framework: 'jax' needs JAX installed (pip install 'jax[cpu]')") from exc
    jax.config.update("jax_enable_x64", True)  # float64 stays float64 (module docstring)
    return jax


def _flex(mods: FlexMods, dtype, device):
    """``(score_mod, block_mask)`` for torch's flex_attention from the adapter's record."""
    torch = _torch()
    from torch.nn.attention.flex_attention import create_block_mask

    keep = torch.from_dlpack(np.ascontiguousarray(mods.keep)).to(device or "cpu")
    kb, kh, sq, sk = keep.shape
    if mods.batch_heads is not None:  # the flex variant: the user's own mods, as they are
        block_mask = None
        if mods.mask_mod is not None:
            block_mask = create_block_mask(mods.mask_mod, *mods.batch_heads, sq, sk, device=device or "cpu")
        return mods.score_mod, block_mask

    def mask_mod(b, h, i, j):
        return keep[b if kb > 1 else 0, h if kh > 1 else 0, i, j]

    block_mask = create_block_mask(mask_mod, kb if kb > 1 else None, kh if kh > 1 else None, sq,
                                   sk, device=device or "cpu")
    add = None
    if mods.additive is not None:
        add = torch.from_dlpack(np.ascontiguousarray(mods.additive)).to(
            device=device or "cpu", dtype=torch.float64 if dtype is None else torch.float32)
    if add is None and mods.softcap is None:
        return None, block_mask
    ab, ah = (1, 1) if add is None else add.shape[:2]
    cap = mods.softcap

    def score_mod(score, b, h, i, j):
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if add is not None:
            score = score + add[b if ab > 1 else 0, h if ah > 1 else 0, i, j].to(score.dtype)
        return score
    return score_mod, block_mask


def _to_framework(x, framework, dtype, device, is_data):
    """One argument in the framework's kind; data arrays in ``dtype`` (or float64)."""
    if not isinstance(x, np.ndarray):
        return x
    if is_data:
        x = numerics.round_to(x, dtype) if dtype else np.asarray(x, dtype=np.float64)
    if framework == "numpy":
        return x.astype(numerics.np_dtype(dtype)) if is_data and dtype else x
    if framework == "jax":
        if device not in (None, "cpu"):
            raise ParameterError(f"device: framework 'jax' runs on the CPU here, got {device!r}")
        jnp = _jax().numpy
        return jnp.asarray(x.astype(numerics.np_dtype(dtype)) if is_data and dtype else x)
    torch = _torch()
    host = np.ascontiguousarray(x.astype(np.float32) if is_data and dtype else x)
    t = torch.from_dlpack(host)
    if is_data and dtype:
        t = t.to(getattr(torch, numerics.canonical(dtype)))
    return t.to(device or "cpu")


def to_numpy(x, name: str = "out") -> np.ndarray:
    """A result (numpy, ml_dtypes, torch on any device) as a float64 numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach()
        if t.dtype.is_floating_point and t.element_size() < 4 or str(t.dtype) == "torch.bfloat16":
            t = t.float()
        x = np.from_dlpack(t.cpu().contiguous())
    from .validate import as_compute
    return as_compute(x, name)


def _convert_call(sc, framework, dtype, device):
    conv = lambda a: _to_framework(a.array if isinstance(a, Data) else a, framework, dtype, device,
                                   isinstance(a, Data))
    kwargs = {n: conv(a) for n, a in sc.kwargs.items() if not isinstance(a, FlexMods)}
    mods = sc.kwargs.get("score_mod")
    if isinstance(mods, FlexMods):
        if framework != "torch":
            raise ParameterError("adapter: 'flex' passes torch score_mod/block_mask; use "
                                 "framework='torch'")
        score_mod, block_mask = _flex(mods, dtype, device)
        kwargs.update(**({} if block_mask is None else {"block_mask": block_mask}),
                      **({} if score_mod is None else {"score_mod": score_mod}))
        if kwargs.get("return_lse"):  # newer torch: return_aux=AuxRequest(lse=True)
            try:
                from torch.nn.attention.flex_attention import AuxRequest
            except ImportError:
                pass
            else:
                del kwargs["return_lse"]
                kwargs["return_aux"] = AuxRequest(lse=True)
    return [conv(a) for a in sc.args], kwargs


def _split(case):
    missing = [n for n in ("q", "k", "v") if n not in case]
    if missing:
        raise ParameterError(f"{missing[0]}: expected the case to hold q, k and v, got keys "
                             f"{', '.join(sorted(case)) or 'none'}")
    arrays = {n: case[n] for n in ("q", "k", "v")}
    params = {n: val for n, val in case.items() if n not in ("q", "k", "v")}
    params.pop("return_lse", None)
    return arrays, params


def _invoke(fn, args, kwargs):
    """Call the function under test; whatever it raises -- a refattn error from a call it makes,
    any exception, even ``sys.exit`` -- becomes an :class:`ImplCallError` naming it (Ctrl-C,
    ``KeyboardInterrupt``, is left to stop the run)."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        raise ImplCallError(f"impl: {name} called sys.exit({exc.code!r}); a function under test "
                            f"must return its output") from None
    except Exception as exc:
        raise ImplCallError(f"impl: {name} raised {type(exc).__name__}: {exc}") from exc


def _check_framework(framework):
    from .validate import check_choice
    check_choice(framework, "framework", FRAMEWORKS)


# -- calling --------------------------------------------------------------------------------------------
def call(fn: Callable, case: dict, *, adapter: str = "refattn", framework: str = "numpy",
         dtype=None, device: Optional[str] = None, want_lse: bool = False) -> dict:
    """``{"out": ..., "lse": ...?}`` (float64 numpy, the case's layout) of ``fn`` on ``case``."""
    _check_framework(framework)
    dtype = None if dtype is None else numerics.canonical(dtype)
    arrays, params = _split(case)
    sc = signature_call(adapter, arrays, params, want_lse=want_lse)
    args, kwargs = _convert_call(sc, framework, dtype, device)
    res = _invoke(fn, args, kwargs)
    items = res if isinstance(res, (tuple, list)) else (res,)
    items = [getattr(a, "lse", a) for a in items]  # flex_attention's AuxOutput holds the LSE
    as_np = [to_numpy(a, n) if a is not None else None for a, n in zip(items, ("out", "lse", "extra"))]
    return {n: a for n, a in sc.unpack(tuple(as_np) if isinstance(res, (tuple, list))
                                       else as_np[0]).items()}


def grads(fn: Callable, case: dict, dout, *, adapter: str = "refattn", framework: str = "torch",
          dtype=None, device: Optional[str] = None) -> dict:
    """``{"dq", "dk", "dv"}`` of ``fn`` on ``case`` for the upstream gradient ``dout`` (given in the
    case's layout, like the output). See the module docstring for the two frameworks."""
    _check_framework(framework)
    dtype = None if dtype is None else numerics.canonical(dtype)
    arrays, params = _split(case)
    if framework == "jax":
        return _jax_grads(fn, adapter, arrays, params, dout, dtype, device)
    if framework == "numpy":
        if adapter != "refattn":
            raise ParameterError(f"adapter: gradients with framework 'numpy' call a backward "
                                 f"fn(q, k, v, dout, **params) (adapter 'refattn'), got {adapter!r}")
        sc = signature_call("refattn", arrays, params)
        args, kwargs = _convert_call(sc, "numpy", dtype, device)
        d = _to_framework(np.asarray(dout, dtype=np.float64), "numpy", dtype, device, True)
        res = _invoke(fn, args[:3] + [d], kwargs)
        return {n: to_numpy(g, n) for n, g in zip(("dq", "dk", "dv"), res[:3])}
    _torch()  # a clear error when PyTorch is missing
    sc = signature_call(adapter, arrays, params)
    if not sc.grads:
        raise ParameterError(f"head_map: gradients through the {adapter!r} adapter need the "
                             f"default head relation")
    args, kwargs = _convert_call(sc, "torch", dtype, device)
    leaves = [a.detach().requires_grad_(True) for a in args[:3]]
    res = _invoke(fn, leaves + args[3:], kwargs)
    out = res[0] if isinstance(res, (tuple, list)) else res
    d = _to_framework(sc.from_case(np.asarray(dout, dtype=np.float64)), "torch", dtype, device, True)
    try:
        out.backward(d.to(out.dtype))
    except Exception as exc:
        raise ImplCallError(f"impl: backward through the output failed: {type(exc).__name__}: "
                            f"{exc}") from exc
    return {n: sc.to_case(to_numpy(t.grad, n)) for n, t in zip(("dq", "dk", "dv"), leaves)}


def _jax_grads(fn, adapter, arrays, params, dout, dtype, device) -> dict:
    """``dq, dk, dv`` of a JAX function by ``jax.vjp`` with respect to its first three arguments."""
    jax = _jax()
    sc = signature_call(adapter, arrays, params)
    if not sc.grads:
        raise ParameterError(f"head_map: gradients through the {adapter!r} adapter need the "
                             f"default head relation")
    args, kwargs = _convert_call(sc, "jax", dtype, device)

    def out_of(q, k, v):
        res = _invoke(fn, [q, k, v] + args[3:], kwargs)
        return res[0] if isinstance(res, (tuple, list)) else res

    try:
        out, pullback = jax.vjp(out_of, *args[:3])
        d = _to_framework(sc.from_case(np.asarray(dout, dtype=np.float64)), "jax", dtype, device, True)
        got = pullback(d.astype(out.dtype))
    except RefattnError:
        raise
    except Exception as exc:
        raise ImplCallError(f"impl: jax.vjp through the output failed: {type(exc).__name__}: "
                            f"{exc}") from exc
    return {n: sc.to_case(to_numpy(g, n)) for n, g in zip(("dq", "dk", "dv"), got)}


# -- any variant: inputs by name -----------------------------------------------------------------------
def call_named(fn: Callable, variant, inputs: dict, params: dict, *, framework: str = "numpy",
               device: Optional[str] = None) -> dict:
    """``{output name: float64 numpy}`` of ``fn(**inputs, **params)`` for any registered variant.

    ``fn`` receives the variant's declared inputs by their documented names (``Variant.inputs``;
    e.g. ``x, w_router`` for ``moe_topk``, ``x, w_router, w_gate, w_up, w_down`` for ``moe_layer``)
    and the case's parameters by name, as numpy arrays (float inputs float64, integer ones int64)
    or, with ``framework="torch"``, torch tensors on ``device`` made with DLPack. It returns a dict
    keyed by the variant's output names (``Variant.outputs``: ``{"out": ..., "indices": ...}``), a
    tuple in that order (``(out, indices, ...)``, None for ones it does not compute), or the
    ``out`` array alone; each comes back as float64 numpy. ``return_*`` flags are not passed.
    """
    from .pipeline import variant_of

    _check_framework(framework)
    var = variant_of(variant)

    def conv(a):
        if not isinstance(a, np.ndarray):
            return a
        if a.dtype.kind == "f":
            a = np.asarray(a, dtype=np.float64)
        return _to_framework(a, framework, None, device, False)

    kwargs = {n: conv(np.asarray(inputs[n]) if hasattr(inputs[n], "shape") else inputs[n])
              for n in var.inputs}
    kwargs.update({n: conv(v) for n, v in params.items() if not n.startswith("return_")})
    res = _invoke(fn, (), kwargs)
    names = tuple(var.outputs)
    if isinstance(res, dict):
        unknown = sorted(set(res) - set(names))
        if unknown:
            raise ParameterError(f"impl: returned output {unknown[0]!r}, which variant {var.name!r} "
                                 f"does not have; its outputs are {', '.join(names)}")
        items = dict(res)
    elif isinstance(res, (tuple, list)):
        if len(res) > len(names):
            raise ParameterError(f"impl: returned {len(res)} values; variant {var.name!r} has "
                                 f"{len(names)} outputs ({', '.join(names)})")
        items = dict(zip(names, res))
    else:
        items = {"out": res}
    return {n: to_numpy(a, n) for n, a in items.items() if a is not None}

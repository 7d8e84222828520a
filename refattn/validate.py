"""Input validation, in one place.

Every check raises a :mod:`refattn.errors` exception whose message names the argument, what was
expected and what came. Nothing here modifies its input: arrays are converted with a copy to the
compute dtype (float64 by default) -- the one cast refattn makes -- and nothing is truncated or
broadcast beyond the documented broadcasting of ``mask``, ``bias`` and ``dropout_mask``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import DTypeError, ParameterError, ShapeError, fmt_shape

LAYOUTS = ("bhsd", "bshd")
COMPUTE_DTYPES = ("float64", "float32")


def to_numpy(x, name: str) -> np.ndarray:
    """A numpy view of an array from any framework, without importing it.

    numpy arrays pass through; CuPy arrays are copied to the host (``.get()``); anything with
    ``__dlpack__`` on the CPU in a dtype numpy knows (torch, JAX, ...) is viewed with
    ``numpy.from_dlpack`` (no copy); what DLPack cannot hand over (a torch tensor that requires
    grad, bf16/fp8 tensors) goes through the framework's own conversion: torch ``.detach().cpu()``
    (bf16/fp8 widened to float32, exactly), else ``__array__`` (JAX bf16 arrives as ml_dtypes
    bfloat16). Anything else is an error naming ``name``.
    """
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("cupy") and hasattr(x, "get"):
        return x.get()
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, ValueError, RuntimeError):
            pass  # not exportable to numpy as is: fall through to the framework's conversion
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensors, incl. requires_grad / bf16
        t = x.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):
            t = t.float()
        return t.numpy()
    try:
        a = np.asarray(x)
    except Exception as exc:
        raise DTypeError(f"{name}: expected an array, got {type(x).__name__} ({exc})") from exc
    if a.dtype.kind == "O":
        raise DTypeError(f"{name}: expected a numeric array, got {type(x).__name__} holding "
                         f"Python objects")
    return a


def as_compute(x, name: str, dtype: str = "float64", *, copy: bool = True) -> np.ndarray:
    """``x`` as a new float array of the compute dtype; rejects non-real dtypes.

    ``copy=False``: when ``x`` already is a C-contiguous array of ``dtype`` on the host (numpy, or
    a CPU tensor viewed through DLPack), a READ-ONLY view of it instead of a copy -- for the large
    inputs the attention kernels only read (q, k, v, dout), so a float64 caller's arrays are not
    duplicated; a write through the view is an error, never a change to the caller's array.
    Otherwise a new array, as with ``copy=True``.
    """
    a = to_numpy(x, name)
    kind = a.dtype.kind
    if kind not in "fiu" and not _is_ml_float(a.dtype):
        raise DTypeError(f"{name}: expected a real floating or integer array, got dtype {a.dtype}")
    if not copy and a.dtype == np.dtype(dtype) and a.flags.c_contiguous:
        view = a.view()
        view.flags.writeable = False
        return view
    return np.array(a, dtype=dtype, copy=True)


def _is_ml_float(dt) -> bool:
    return dt.kind == "V" and dt.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3",
                                          "float8_e5m2fnuz", "float8_e4m3fnuz")


def _nonfinite(a):
    """``(nan, posinf, neginf)`` counts of a float array (zeros for other dtypes)."""
    if a.dtype.kind not in "fc" and not _is_ml_float(a.dtype):
        return 0, 0, 0
    a = a.astype(np.float64, copy=False) if _is_ml_float(a.dtype) else a
    if np.all(np.isfinite(a)):
        return 0, 0, 0
    return int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum())


def check_finite(x, name: str, *, masking: bool = False):
    """Reject NaN and +inf in a float array (and -inf unless ``masking``: -inf hides a pair in a
    bias-like array); integer and boolean arrays pass. The one finiteness rule of every input."""
    a = x if isinstance(x, np.ndarray) else to_numpy(x, name)
    nan, pos, neg = _nonfinite(np.asarray(a))
    if nan or pos or (neg and not masking):
        what = ", ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (pos, "+inf"), (0 if masking else neg, "-inf")) if n)
        allowed = "no NaN or +inf (-inf hides a pair)" if masking else "finite values"
        raise ParameterError(f"{name}: expected {allowed}, got {what} entries")
    return x


def _array_like(value) -> bool:
    if isinstance(value, (str, bytes, dict)) or value is None:
        return False
    if isinstance(value, (np.ndarray, list, tuple)):
        return True
    return hasattr(value, "__array__") or hasattr(value, "__dlpack__")


def check_all_finite(var, arrays: dict, params):
    """:func:`check_finite` for every input of a call and every array (or list of numbers)
    parameter; parameters declared with ``masking`` metadata (``bias``) may hold -inf."""
    import dataclasses
    for name, a in arrays.items():
        check_finite(a, name)
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if not _array_like(value):
            continue
        try:
            a = np.asarray(value) if isinstance(value, (list, tuple)) else to_numpy(value, f.name)
        except (ValueError, TypeError, DTypeError):
            continue  # ragged or non-numeric: the variant's own check names it
        check_finite(a, f.name, masking=f.metadata.get("masking", False))


def check_score_range(q, k, scale: float, bias=None, name: str = "q, k"):
    """Refuse scores that can overflow float64: ``max|q| * max|k| * D * |scale|`` (a bound of
    ``|scale * q.k|``, partial sums included) plus ``max|bias|`` must stay below the largest
    float64. Such scores would come back as inf or NaN, which a backend can turn into an output that
    looks valid; the error says how large the bound is."""
    aq = float(np.max(np.abs(q), initial=0.0))
    ak = float(np.max(np.abs(k), initial=0.0))
    d = q.shape[-1] if np.ndim(q) else 1
    ab = 0.0 if bias is None else float(np.max(np.abs(np.where(np.isfinite(bias), bias, 0.0)), initial=0.0))
    with np.errstate(over="ignore"):
        bound = aq * ak * d * abs(scale) + ab
    if not math.isfinite(bound) or bound >= np.finfo(np.float64).max / 4:
        raise ParameterError(
            f"{name}: expected scores scale * q.k that float64 can hold, got a bound max|q| * max|k| "
            f"* D * |scale| + max|bias| = {aq:.3g} * {ak:.3g} * {d} * {abs(scale):.3g} + {ab:.3g} "
            f"beyond {np.finfo(np.float64).max / 4:.3g}; scores this large overflow float64, "
            f"rescale q or k")


def check_choice(value, name: str, choices):
    if value not in choices:
        raise ParameterError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_rank4(a: np.ndarray, name: str, layout: str, dims: str = "D"):
    if a.ndim != 4:
        order = "(B, H, S, %s)" % dims if layout == "bhsd" else "(B, S, H, %s)" % dims
        raise ShapeError(f"{name}: expected rank 4 {order} in layout {layout!r}, "
                         f"got shape {fmt_shape(a.shape)}")


def check_qkv(q, k, v, layout: str):
    """Ranks and agreement of ``q (B,Hq,Sq,D)``, ``k (B,Hkv,Sk,D)``, ``v (B,Hkv,Sk,Dv)`` (bhsd).

    Empty dimensions: an empty batch (``B = 0`` in all three) and no queries (``Sq = 0``) are valid
    and give empty results; zero heads, zero keys (``Sk = 0``) or a zero head dim are errors (a
    shape mistake, not an empty workload)."""
    check_rank4(q, "q", layout)
    check_rank4(k, "k", layout)
    check_rank4(v, "v", layout, "Dv")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ShapeError(f"q, k, v: expected the same batch size B, got {q.shape[0]}, {k.shape[0]} "
                         f"and {v.shape[0]}")
    for name, a, dims in (("q", q, ((1, "query heads Hq"), (3, "head dim D"))),
                          ("k", k, ((1, "KV heads Hkv"), (2, "keys Sk"), (3, "head dim D"))),
                          ("v", v, ((3, "value dim Dv"),))):
        for axis, what in dims:
            if a.shape[axis] == 0:
                raise ShapeError(f"{name}: expected {what} >= 1, got shape "
                                 f"{fmt_shape(_in_layout(a.shape, layout))} in layout {layout!r}")
    if q.shape[3] != k.shape[3]:
        raise ShapeError(f"k: expected head dim {q.shape[3]} as in q, got {k.shape[3]} "
                         f"(k shape {fmt_shape(_in_layout(k.shape, layout))} in layout {layout!r})")
    if k.shape[1] != v.shape[1]:
        raise ShapeError(f"v: expected {k.shape[1]} heads as in k, got {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ShapeError(f"v: expected sequence length {k.shape[2]} as in k, got {v.shape[2]}")
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_finite(a, name)


def _in_layout(shape_bhsd, layout: str):
    """A ``bhsd`` shape as the caller passed it (``bshd`` swaps heads and sequence)."""
    b, h, s, d = shape_bhsd
    return (b, s, h, d) if layout == "bshd" else (b, h, s, d)


def int_array(x, name: str, shape=None, low=None, high=None, meaning: str = "") -> np.ndarray:
    """``x`` as an int64 array: integral dtype, of ``shape`` when given (a tuple, with ``None`` for
    any size), with values in ``[low, high)`` when given. Messages name ``name`` and add
    ``meaning`` (``"(the KV heads)"``) after what was expected."""
    meaning = f" {meaning}" if meaning else ""
    a = np.asarray(to_numpy(x, name))
    if a.dtype.kind not in "iu":
        raise ParameterError(f"{name}: expected integers{meaning}, got dtype {a.dtype}")
    if shape is not None and (a.ndim != len(shape) or any(w is not None and w != h
                                                          for w, h in zip(shape, a.shape))):
        want = "(" + ", ".join("n" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ShapeError(f"{name}: expected shape {want}{meaning}, got {fmt_shape(a.shape)}")
    if a.size and ((low is not None and a.min() < low) or (high is not None and a.max() >= high)):
        span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high})"
        raise ParameterError(f"{name}: expected values in {span}{meaning}, got values in "
                             f"[{a.min()}, {a.max()}]")
    return a.astype(np.int64)


def head_map_for(hq: int, hkv: int, head_map=None) -> np.ndarray:
    """The query-head -> KV-head map: ``h // (Hq // Hkv)`` by default, else the validated map."""
    if head_map is None:
        if hkv < 1 or hq % hkv:
            raise ShapeError(f"k: expected a number of KV heads dividing the {hq} query heads, got "
                             f"{hkv} (pass head_map= for uneven groupings)")
        return np.arange(hq) // (hq // hkv)
    return int_array(head_map, "head_map", (hq,), 0, hkv,
                     meaning="(one KV head per query head)").astype(np.intp)


def check_int(value, name: str, minimum=None, maximum=None, *, what=None) -> int:
    """The one integer check: a Python or numpy integer (never a bool, a float or a string) in
    ``[minimum, maximum]`` (either bound optional), returned as ``int``. ``what`` replaces the
    expectation in the message ("an integer >= 1")."""
    what = what or f"an integer{_bounds(minimum, maximum)}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ParameterError(f"{name}: expected {what}, got {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ParameterError(f"{name}: expected {what}, got {v}")
    return v


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"


def check_scale(scale, d: int) -> float:
    """``1/sqrt(d)`` when None; otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ParameterError(f"scale: expected a finite real number, got {scale!r}")
    return float(scale)


def check_positive(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise ParameterError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def check_bool(value, name: str) -> bool:
    """True or False (numpy bools too); anything else is an error, never truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


#: a window side at least this large reaches past any sequence: it is unbounded (-1)
UNBOUNDED_SIDE = 2 ** 62


def check_window(window):
    """``(left, right)`` integers >= -1 (-1 = unbounded; a side >= 2**62 is unbounded too, since
    no sequence is that long); None passes."""
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise ParameterError(f"window: expected a pair (left, right), got {window!r}")
    sides = (check_int(w, "window", -1, what=f"{side} an integer >= -1 (-1 = unbounded)")
             for side, w in zip(("left", "right"), window))
    return tuple(-1 if w >= UNBOUNDED_SIDE else w for w in sides)


def check_broadcast(a, name: str, target, *, dtype=None, kind: str = "float") -> np.ndarray:
    """A mask/bias-like array padded to rank 4 and checked broadcastable to ``target``."""
    arr = to_numpy(a, name)
    if kind == "bool":
        if arr.dtype != np.bool_:
            raise ParameterError(f"{name}: expected a boolean array (True = keep), got dtype {arr.dtype}")
    else:
        arr = as_compute(arr, name, dtype or "float64")
        if np.any(np.isnan(arr)) or np.any(np.isposinf(arr)):
            raise ParameterError(f"{name}: expected no NaN or +inf values (-inf hides a pair), "
                                 f"got {np.sum(np.isnan(arr) | np.isposinf(arr))}")
    if arr.ndim > 4:
        raise ShapeError(f"{name}: expected rank <= 4, broadcastable to {fmt_shape(target)} "
                         f"(B, H, Sq, Sk), got shape {fmt_shape(arr.shape)}")
    arr4 = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
    for have, want in zip(arr4.shape, target):
        if have not in (1, want):
            raise ShapeError(f"{name}: expected a shape broadcastable to {fmt_shape(target)} "
                             f"(B, H, Sq, Sk), got {fmt_shape(arr.shape)}")
    return arr4


def check_per_head(a, name: str, hq: int) -> np.ndarray:
    """A finite ``(Hq,)`` float array (ALiBi slopes, sinks)."""
    arr = as_compute(a, name)
    if arr.shape != (hq,):
        raise ShapeError(f"{name}: expected shape ({hq},) (one value per query head), "
                         f"got {fmt_shape(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ParameterError(f"{name}: expected finite values, got {arr}")
    return arr


def check_dropout(p, seed, mask):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= p < 1.0):
        raise ParameterError(f"dropout_p: expected a number in [0, 1), got {p!r}")
    if seed is not None and mask is not None:
        raise ParameterError("dropout_seed, dropout_mask: expected one of them, got both")
    if seed is not None:
        check_int(seed, "dropout_seed", 0, 2 ** 64 - 1, what="an integer in [0, 2**64)")
        if p == 0:
            raise ParameterError("dropout_seed: expected dropout_p in (0, 1) with a seed, "
                                 "got dropout_p=0")
    elif mask is not None and p == 0:
        raise ParameterError("dropout_p: expected a value in (0, 1) with dropout_mask (kept "
                             "probabilities are scaled by 1/(1-p)), got dropout_p=0")
    elif p > 0 and mask is None:
        raise ParameterError(f"dropout_p: expected dropout_seed= (Philox) or dropout_mask= with "
                             f"dropout_p > 0 (refattn draws no hidden randomness), got "
                             f"dropout_p={p} and neither")
    return float(p)

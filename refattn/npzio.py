"""Saved outputs of an implementation under test: the ``.npz`` format ``refattn compare --outputs``
reads.

Keys (every array numeric; ``allow_pickle=False`` always -- a pickled/object array is an error)

================  =============================================  ===============================
key               shape (layout ``bhsd``; ``bshd`` swaps H, S)    meaning
================  =============================================  ===============================
``q``             ``(B, Hq, Sq, D)``                              queries (required)
``k``             ``(B, Hkv, Sk, D)``                             keys (required)
``v``             ``(B, Hkv, Sk, Dv)``                            values (required)
``out``           ``(B, Hq, Sq, Dv)``                             the output under test (required)
``lse``           ``(B, Hq, Sq)`` in either layout               its log-sum-exp (optional)
``dout``          as ``out``                                      upstream gradient (needed by dq/dk/dv)
``dq dk dv``      as ``q``, ``k``, ``v``                          its gradients (optional, all three)
``cu_seqlens_q``  ``(N + 1,)`` integers                           packed batch offsets (optional;
``cu_seqlens_k``  ``(N + 1,)`` integers                           both or neither)
``mask``          bool, broadcastable to ``(B, Hq, Sq, Sk)``      array parameters of the variant,
``bias``          float, broadcastable to ``(B, Hq, Sq, Sk)``     passed on as if given with
``alibi_slopes``  ``(Hq,)``                                       ``--param`` (optional)
``sinks``         ``(Hq,)``
``head_map``      ``(Hq,)`` integers
``dropout_mask``  bool, broadcastable to ``(B, Hq, Sq, Sk)``
``dtypes``        strings ``"name:dtype"``                        the dtype each array had before
                                                                  it was saved (written by
                                                                  :func:`save`; optional)
================  =============================================  ===============================

The dtype record
----------------
numpy cannot store bfloat16 or fp8, so a bf16 kernel's output is saved as float32, which alone
cannot say whether the kernel computed in bf16 or in float32 -- and the verdict depends on it.
:func:`save` therefore writes ``dtypes`` (e.g. ``["out:bfloat16", "q:bfloat16"]``), and
:func:`saved_dtypes` reads it back. ``refattn compare --outputs`` uses the recorded dtype of
``out``; for a file without the record it takes the stored dtype, and where the stored values all
fit a narrower dtype than they are stored in (a bf16 output saved as float32, an all-zero output)
it asks for ``--dtype`` instead of guessing.

With ``cu_seqlens_q``/``cu_seqlens_k`` (flash-attn's varlen layout) q is ``(total_q, Hq, D)``,
k/v ``(total_k, Hkv, D|Dv)``, out ``(total_q, Hq, Dv)`` and lse ``(Hq, total_q)``.

Floating arrays may be float16, float32 or float64 (numpy has no bfloat16: save bf16 tensors with
``t.float().numpy()`` -- exact -- or as ml_dtypes arrays, which numpy stores as raw ``V2`` bytes
that cannot be told apart from other 2-byte data, so they are refused). Any other key is an error
(it is most likely a misspelling). :func:`save` writes such a file from numpy arrays or torch
tensors.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .errors import InputFileError, fmt_shape

REQUIRED = ("q", "k", "v", "out")
GRADS = ("dq", "dk", "dv")
OFFSETS = ("cu_seqlens_q", "cu_seqlens_k")
ARRAY_PARAMS = ("mask", "bias", "alibi_slopes", "sinks", "head_map", "dropout_mask")
KNOWN = REQUIRED + ("lse", "dout") + GRADS + OFFSETS + ARRAY_PARAMS + ("dtypes",)
_INT_KEYS = OFFSETS + ("head_map",)
_BOOL_KEYS = ("mask", "dropout_mask")
#: inputs must be finite; outputs may hold NaN/Inf (the metrics count them); bias may hold -inf
_FINITE = ("q", "k", "v", "dout", "alibi_slopes", "sinks")


def _fail(path, msg):
    raise InputFileError(f"{os.path.basename(str(path))}: {msg}")


def _read(path) -> dict:
    if not os.path.isfile(path):
        _fail(path, "no such file")
    with open(path, "rb") as fh:  # np.load would take any other bytes for a pickle
        head = fh.read(6)
    if not head.startswith((b"PK", b"\x93NUMPY")):
        what = "a pickle" if head[:1] == b"\x80" else f"it starts with {head!r}"
        _fail(path, f"not a readable .npz archive ({what}); write it with numpy.savez")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as exc:
        _fail(path, f"cannot be read without pickle ({exc}); refattn loads with allow_pickle=False")
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        _fail(path, f"not a readable .npz archive ({type(exc).__name__}: {exc})")
    if not isinstance(archive, np.lib.npyio.NpzFile):
        _fail(path, f"expected an .npz archive of named arrays (np.savez), got a single "
                    f"{'array' if isinstance(archive, np.ndarray) else type(archive).__name__}")
    arrays = {}
    with archive:
        unknown = sorted(set(archive.files) - set(KNOWN))
        if unknown:
            _fail(path, f"unknown key {unknown[0]!r}; expected keys among {', '.join(KNOWN)}")
        _check_headers(path, archive)
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:  # object arrays need pickle
                _fail(path, f"key {key!r} holds Python objects (a pickled array); save numeric "
                            f"arrays ({exc})")
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                _fail(path, f"key {key!r} is corrupt ({type(exc).__name__}: {exc})")
    return arrays


def _check_headers(path, archive):
    """Read every member's ``.npy`` header before any data: a truncated or garbage header, an
    object dtype, or arrays that together would not fit in memory are errors naming the key."""
    from . import memory
    total = 0
    for key in archive.files:
        try:
            with archive.zip.open(key + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    raise ValueError(f"unknown .npy format version {version}")
                shape, _, dtype = reader(fh)
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            _fail(path, f"key {key!r} has a truncated or unreadable .npy header ({exc}); write the "
                        f"file with numpy.savez or refattn.npzio.save")
        if dtype.hasobject:
            _fail(path, f"key {key!r} holds Python objects (a pickled array); save numeric arrays")
        total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    try:
        memory.check(total, os.path.basename(str(path)), "its arrays")
    except Exception as exc:  # a ParameterError: report it as a problem of the file
        _fail(path, str(exc).split(": ", 1)[-1])


def _check_dtypes(path, arrays):
    for key, a in arrays.items():
        kind = a.dtype.kind
        if key == "dtypes":
            continue  # checked by saved_dtypes
        if key in _INT_KEYS:
            ok = kind in "iu"
            want = "integers"
        elif key in _BOOL_KEYS:
            ok = kind == "b"
            want = "booleans"
        else:
            ok = kind == "f" or (kind in "iu" and key not in REQUIRED + ("lse",))
            want = "floats (float16/32/64; save bf16 as float32)"
        if not ok:
            _fail(path, f"key {key!r}: expected {want}, got dtype {a.dtype}")
        if key in _FINITE and not np.all(np.isfinite(a)):
            _fail(path, f"key {key!r}: expected finite values, got {int(np.sum(~np.isfinite(a)))} "
                        f"NaN/Inf")


def _expect(path, arrays, key, shape, what):
    if key in arrays and tuple(arrays[key].shape) != tuple(shape):
        _fail(path, f"key {key!r}: expected shape {fmt_shape(shape)} ({what}), got "
                    f"{fmt_shape(arrays[key].shape)}")


def _check_shapes(path, a, layout):
    varlen = any(k in a for k in OFFSETS)
    rank = 3 if varlen else 4
    for key in ("q", "k", "v"):
        if a[key].ndim != rank:
            want = "(total, H, D) with cu_seqlens" if varlen else (
                "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)")
            _fail(path, f"key {key!r}: expected rank {rank} {want}, got shape "
                        f"{fmt_shape(a[key].shape)}")
    q, k, v = a["q"], a["k"], a["v"]
    if varlen:
        if not all(k_ in a for k_ in OFFSETS):
            _fail(path, "expected both cu_seqlens_q and cu_seqlens_k, got only "
                        f"{[k_ for k_ in OFFSETS if k_ in a][0]}")
        for key, total in (("cu_seqlens_q", q.shape[0]), ("cu_seqlens_k", k.shape[0])):
            c = a[key]
            if c.ndim != 1 or c.size < 2 or c[0] != 0 or c[-1] != total or np.any(np.diff(c) < 0):
                _fail(path, f"key {key!r}: expected non-decreasing offsets from 0 to {total} "
                            f"(packed length), got {c.tolist() if c.size < 12 else fmt_shape(c.shape)}")
        if a["cu_seqlens_q"].size != a["cu_seqlens_k"].size:
            _fail(path, "keys 'cu_seqlens_q', 'cu_seqlens_k': expected the same number of sequences")
        heads, seq = (q.shape[1], q.shape[0])
        _expect(path, a, "k", (k.shape[0], k.shape[1], q.shape[2]), "head dim as q")
        _expect(path, a, "lse", (q.shape[1], q.shape[0]), "(Hq, total_q)")
    else:
        b = q.shape[0]
        h_ax, s_ax = (1, 2) if layout == "bhsd" else (2, 1)
        kshape = list(k.shape)
        kshape[0], kshape[3] = b, q.shape[3]
        _expect(path, a, "k", tuple(kshape), "batch and head dim as q")
        heads, seq = q.shape[h_ax], q.shape[s_ax]
        _expect(path, a, "lse", (b, heads, seq), "(B, Hq, Sq)")
    _expect(path, a, "v", k.shape[:-1] + (v.shape[-1],), "as k except the last dim")
    out_shape = q.shape[:-1] + (v.shape[-1],)
    _expect(path, a, "out", out_shape, "q's shape with v's last dim")
    _expect(path, a, "dout", out_shape, "as out")
    for g, src in zip(GRADS, ("q", "k", "v")):
        _expect(path, a, g, a[src].shape, f"as {src}")
    present = [g for g in GRADS if g in a]
    if present and (len(present) < 3 or "dout" not in a):
        missing = [g for g in GRADS + ("dout",) if g not in a]
        _fail(path, f"gradients need dout, dq, dk and dv together; missing {', '.join(missing)}")
    for key in ("alibi_slopes", "sinks", "head_map"):
        _expect(path, a, key, (heads,), "one value per query head")


def load_outputs(path, variant: str = "sdpa", *, layout: str = "bhsd"):
    """``(inputs, outputs)`` from a saved file (module docstring).

    ``inputs`` holds q, k, v, the offsets and array parameters (ready for
    :func:`refattn.numerics.reference` together with ``--param`` values); ``outputs`` holds
    ``out`` and whichever of ``lse``, ``dq``, ``dk``, ``dv`` are present, plus ``dout`` when saved.
    Every problem is an :class:`refattn.errors.InputFileError` naming the file and the key.
    ``variant`` is checked to exist (its own parameters are validated when the case is run).
    """
    from . import variants
    from .validate import LAYOUTS, check_choice
    check_choice(layout, "layout", LAYOUTS)
    variants.get(variant)
    path = os.fspath(path)
    arrays = _read(path)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        _fail(path, f"missing key {missing[0]!r}; required keys are {', '.join(REQUIRED)} "
                    f"(found {', '.join(sorted(arrays)) or 'none'})")
    _check_dtypes(path, arrays)
    _check_shapes(path, arrays, layout)
    arrays.pop("dtypes", None)
    outputs = {k: arrays.pop(k) for k in ("out", "lse", "dout") + GRADS if k in arrays}
    return arrays, outputs


def saved_dtypes(path) -> dict:
    """``{array name: canonical dtype name}`` recorded by :func:`save` (module docstring); ``{}``
    for a file without the record. A malformed record is an error naming the file."""
    from .numerics import canonical
    path = os.fspath(path)
    arrays = _read(path)
    if "dtypes" not in arrays:
        return {}
    rec = arrays["dtypes"]
    if rec.dtype.kind != "U" or rec.ndim != 1:
        _fail(path, f"key 'dtypes': expected strings 'name:dtype', got {rec.dtype} {fmt_shape(rec.shape)}")
    out = {}
    for item in rec.tolist():
        name, sep, dt = item.partition(":")
        if not sep or name not in KNOWN:
            _fail(path, f"key 'dtypes': expected entries 'name:dtype' naming saved arrays, got {item!r}")
        try:
            out[name] = "float64" if dt in ("float64", "double") else canonical(dt)
        except Exception:
            _fail(path, f"key 'dtypes': unknown dtype {dt!r} for {name!r}")
    return out


def save(path, **arrays):
    """Write ``arrays`` (numpy arrays or torch tensors, any device; bf16/fp8 as float32, exactly)
    under the documented keys; unknown keys are an error."""
    unknown = sorted(set(arrays) - set(KNOWN))
    if unknown:
        raise InputFileError(f"{unknown[0]}: not a documented key; expected keys among "
                             f"{', '.join(KNOWN)}")
    from .impl import to_numpy
    if "dtypes" in arrays:
        raise InputFileError("dtypes: written by save itself (the dtype of each array); not a key to pass")
    plain, source = {}, []
    for k, a in arrays.items():
        if hasattr(a, "dtype") and getattr(a.dtype, "is_floating_point", False) or (
                isinstance(a, np.ndarray) and (a.dtype.kind == "f" or a.dtype.kind == "V")):
            source.append(f"{k}:{str(a.dtype).replace('torch.', '')}")
        if hasattr(a, "detach") and hasattr(a, "cpu"):
            if a.dtype.is_floating_point:  # float16/32/64 kept; bf16/fp8 -> float32 (exact)
                keep = np.float64 if a.element_size() == 8 else np.float32
                keep = np.float16 if str(a.dtype) == "torch.float16" else keep
                a = to_numpy(a, k).astype(keep)
            else:
                a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.dtype.kind == "V":  # ml_dtypes bf16/fp8: exact in float32
            a = a.astype(np.float32)
        plain[k] = a
    np.savez(path, **plain, dtypes=np.array(source, dtype=str))

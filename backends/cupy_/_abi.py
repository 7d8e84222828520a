"""The host side of the kernels' interface: constants, tile sizes and the parameter records.

Every kernel takes one argument, the device address of a parameter record. The records are
``struct AttendParams`` and ``struct MergeParams`` in ``kernels/common.cuh``; here they are numpy
dtypes with the same fields in the same order, every field 8 bytes (device addresses and integers as
int64/uint64, reals as float64), so the layout has no padding to disagree about. The loader passes
the record sizes to the compiler (``static_assert`` there) and ``tests/test_cupy_host.py`` compares
the fields with the C text one by one.

Nothing here imports CuPy: CI (no GPU) tests all of it.
"""

from __future__ import annotations

import numpy as np

#: threads per block, a 16 x 16 grid (the kernels static_assert this)
THREADS = 256
#: output columns one block accumulates in registers (Dv, D beyond it take more blocks)
COLUMNS_PER_BLOCK = 128

#: (block_q, block_k) of each kernel file per compute dtype: the loader instantiates the kernels
#: with these and the host plans tiles with the same numbers. The sizes keep each kernel's static
#: shared memory under 48 KiB (see the static_asserts in the .cu files).
TILES = {
    "attend_forward.cu": {"float64": (64, 32), "float32": (64, 64)},
    "attend_backward.cu": {"float64": (32, 32), "float32": (32, 32)},
}

#: compute dtype -> (C type, kernel-name suffix)
STORAGE = {"float64": ("double", "f64"), "float32": ("float", "f32")}

#: stands for an unbounded side of the band (j - (i + s) never reaches it)
UNBOUNDED = 1 << 62

#: C declarations -> numpy field kinds (every one 8 bytes)
PTR, I64, U64, F64 = "ptr", "i64", "u64", "f64"
_NUMPY = {PTR: np.uint64, I64: np.int64, U64: np.uint64, F64: np.float64}

ATTEND_FIELDS = (
    [(name, PTR) for name in (
        "q", "k", "v", "out", "lse", "head_map", "sinks", "layout", "pindex", "pmasks",
        "q_tile_lo", "q_tile_hi", "k_tile_lo", "k_tile_hi", "slopes", "bias", "drop_mask",
        "block_table", "seq_lens", "dout", "delta", "dq", "dk", "dv", "dbias_part", "group_ptr",
        "group_idx")]
    + [(name, I64) for name in (
        "B", "Hq", "Hkv", "Sq", "Sk", "D", "Dv", "block_q", "block_k", "nbq", "nbk", "lay_b",
        "lay_h", "bias_b", "bias_h", "bias_i", "bias_j", "dm_b", "dm_h", "dm_i", "dm_j",
        "page_size", "table_cols", "dbias_j", "band_s", "band_lo", "band_hi")]
    + [("scale", F64), ("softcap", F64), ("alibi", I64), ("alibi_offset", I64),
       ("dropout", I64), ("drop_p", F64), ("drop_scale", F64), ("seed", U64)]
)

MERGE_FIELDS = [("o_a", PTR), ("lse_a", PTR), ("o_b", PTR), ("lse_b", PTR), ("out", PTR),
                ("lse", PTR), ("rows", I64), ("Dv", I64)]

_KINDS = {**dict(ATTEND_FIELDS), **dict(MERGE_FIELDS)}
ATTEND_PARAMS = np.dtype([(name, _NUMPY[kind]) for name, kind in ATTEND_FIELDS])
MERGE_PARAMS = np.dtype([(name, _NUMPY[kind]) for name, kind in MERGE_FIELDS])

# the codes of common.cuh's enums
ALIBI = {None: 0, "symmetric": 1, "flash": 2}
DROP_NONE, DROP_PHILOX, DROP_MASK = 0, 1, 2


def defines() -> dict:
    """The ``#define``s the loader puts before every translation unit."""
    return {"REFATTN_THREADS": THREADS, "REFATTN_COLUMNS_PER_BLOCK": COLUMNS_PER_BLOCK,
            "REFATTN_ATTEND_PARAMS_BYTES": ATTEND_PARAMS.itemsize,
            "REFATTN_MERGE_PARAMS_BYTES": MERGE_PARAMS.itemsize}


def column_blocks(width: int) -> int:
    """Blocks along the output columns for a width of ``width`` (at least one: the LSE)."""
    return max(1, -(-int(width) // COLUMNS_PER_BLOCK))


def record(dtype: np.dtype, address, **values) -> np.ndarray:
    """A zeroed record of ``dtype`` with ``values`` set; arrays (or None) become device addresses
    through ``address(array)``. Unknown names are an error, so a typo never leaves a field 0."""
    rec = np.zeros((), dtype)
    for name, value in values.items():
        if name not in dtype.names:
            raise KeyError(f"{name}: not a field of the kernel parameter record")
        kind = _KINDS[name]
        if kind == PTR:
            rec[name] = 0 if value is None else np.uint64(address(value))
        elif kind == F64:
            rec[name] = float(value)
        elif kind == U64:
            rec[name] = np.uint64(int(value) % (1 << 64))
        else:
            rec[name] = int(value)
    return rec

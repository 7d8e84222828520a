"""Position encodings: sinusoidal, RoPE (every HF scaling), ALiBi, T5 buckets, Transformer-XL.

Plain numpy functions in float64 (VARIANTS section B). The attention variants built on them
(``rope``, ``alibi``, ``t5``, ``transformer_xl``, ``nope``) live in :mod:`refattn.variants.position`.

Conventions
-----------
* Positions are integers (or reals) counted from 0. For attention the diagonal offset is
  ``s = Sk - Sq`` (``alignment="bottom_right"``, default: query ``i`` sits at key position ``i + s``,
  as in KV-cache decoding) or ``s = 0`` (``"top_left"``).
* RoPE: ``theta_i = base ** (-2 i / d_rot)`` for ``i < d_rot / 2``; the pair ``(x_a, x_b)`` is rotated
  by the angle ``p * theta_i``: ``(x_a cos - x_b sin, x_b cos + x_a sin)``, both multiplied by the
  scaling's ``attention_factor`` (yarn, longrope; 1 otherwise). ``style="neox"`` pairs
  ``(x_i, x_{i + d_rot/2})`` (HF Llama's ``rotate_half``); ``style="gptj"`` pairs ``(x_{2i}, x_{2i+1})``.
  Dimensions past ``d_rot`` pass through unchanged.
* RoPE scaling dicts use HF's names and defaults, in both spellings: v4 ``rope_scaling``
  (``{"type" or "rope_type": ..., "factor": ...}``) and v5 ``rope_parameters`` (the same plus
  ``rope_theta``). Unknown keys are an error (HF only warns): a typo must not silently change a result.
* ALiBi bias ``-slope_h * |i + s - j|``; T5 relative position ``r = j - (i + s)``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ...errors import ParameterError, ShapeError, fmt_shape
from ...patterns import diagonal_offset
from ...validate import as_compute, check_choice, check_int, to_numpy

__all__ = ["sinusoidal", "rope_frequencies", "rope_cos_sin", "rope", "ROPE_TYPES", "alibi_slopes",
           "alibi_bias", "t5_relative_bucket", "t5_bias", "relative_distances",
           "transformer_xl_bias", "rel_shift"]

#: rope types understood by :func:`rope_frequencies` (HF ``ROPE_INIT_FUNCTIONS`` plus "default")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")

_SCALING_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                 "long_factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "proportional": {"factor"},
}
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


# -- small validators ---------------------------------------------------------------------------------
def _int(value, name, minimum=0):
    return check_int(value, name, minimum)


def _real(value, name, positive=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
            positive and value <= 0):
        raise ParameterError(f"{name}: expected a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


# -- sinusoidal -----------------------------------------------------------------------------------------
def sinusoidal(num_positions: int, dim: int, base: float = 10000.0, order: str = "interleaved",
               freq: str = "paper", padding_idx=None) -> np.ndarray:
    """The sinusoidal position table ``(num_positions, dim)``, row ``p`` for position ``p``.

    ``freq="paper"`` (Vaswani et al.): angle ``p / base ** (2i / dim)`` for ``i < dim / 2``; ``dim``
    must be even. ``order="interleaved"`` (the paper): ``PE[p, 2i] = sin``, ``PE[p, 2i + 1] = cos``;
    ``order="concat"``: ``[sin | cos]`` (tensor2tensor, HF's ports).

    ``freq="fairseq"``: fairseq's ``SinusoidalPositionalEmbedding.get_embedding`` (also HF's M2M100,
    Speech2Text, ...): frequencies ``exp(-i * ln(base) / (dim/2 - 1))``, ``[sin | cos]`` order
    (``order`` must be ``"concat"``), a zero column appended when ``dim`` is odd, and row ``padding_idx``
    zeroed when given. fairseq looks token ``t`` (0-based, non-padding) up at row ``padding_idx + 1 + t``.
    """
    n = _int(num_positions, "num_positions")
    d = _int(dim, "dim", 1)
    base = _real(base, "base")
    check_choice(order, "order", ("interleaved", "concat"))
    check_choice(freq, "freq", ("paper", "fairseq"))
    p = np.arange(n, dtype=np.float64)[:, None]
    if freq == "paper":
        if padding_idx is not None:
            raise ParameterError("padding_idx: only meaningful with freq='fairseq', got "
                                 f"{padding_idx!r} with freq='paper'")
        if d % 2:
            raise ParameterError(f"dim: expected an even dimension for freq='paper', got {d}")
        angle = p / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    else:
        if order != "concat":
            raise ParameterError("order: freq='fairseq' uses 'concat' ([sin | cos]), got 'interleaved'")
        half = d // 2
        if half < 2:
            raise ParameterError(f"dim: expected >= 4 for freq='fairseq' (it divides by dim/2 - 1), got {d}")
        angle = p * np.exp(np.arange(half, dtype=np.float64) * -(math.log(base) / (half - 1)))
    if order == "interleaved":
        table = np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(n, -1)
    else:
        table = np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
    if table.shape[1] < d:  # fairseq, odd dim
        table = np.concatenate([table, np.zeros((n, d - table.shape[1]))], axis=1)
    if padding_idx is not None:
        table[_int(padding_idx, "padding_idx")] = 0.0
    return table


# -- RoPE -------------------------------------------------------------------------------------------------
def _parse_scaling(scaling, base):
    """``(rope_type, params, base)`` from an HF-style dict (v4 or v5 spelling)."""
    if scaling is None:
        return "default", {}, 10000.0 if base is None else _real(base, "base")
    if not isinstance(scaling, dict):
        raise ParameterError(f"scaling: expected a dict in HF's rope_scaling/rope_parameters form, "
                             f"got {type(scaling).__name__}")
    params = dict(scaling)
    rtype = params.pop("rope_type", None)
    old = params.pop("type", None)
    if rtype is not None and old is not None and rtype != old:
        raise ParameterError(f"scaling: 'type' ({old!r}) and 'rope_type' ({rtype!r}) disagree")
    rtype = rtype if rtype is not None else (old if old is not None else "default")
    if rtype not in ROPE_TYPES:
        raise ParameterError(f"scaling['rope_type']: expected one of {', '.join(map(repr, ROPE_TYPES))}, "
                             f"got {rtype!r}")
    unknown = sorted(set(params) - _SCALING_KEYS[rtype] - _COMMON_KEYS)
    if unknown:
        raise ParameterError(f"scaling[{unknown[0]!r}]: not a parameter of rope_type {rtype!r}; expected "
                             f"one of {', '.join(sorted(_SCALING_KEYS[rtype] | _COMMON_KEYS - {'type'}))}")
    theta = params.pop("rope_theta", None)
    if theta is not None:
        theta = _real(theta, "scaling['rope_theta']")
        if base is not None and _real(base, "base") != theta:
            raise ParameterError(f"scaling['rope_theta']: {theta} disagrees with base={base}; give one")
    base = theta if theta is not None else (10000.0 if base is None else _real(base, "base"))
    return rtype, params, base


def _original_max(params, mpe, rtype):
    ompe = params.get("original_max_position_embeddings")
    if ompe is None:
        ompe = mpe  # HF's standardize_rope_params: setdefault(..., max_position_embeddings)
    if ompe is None:
        raise ParameterError(f"scaling['original_max_position_embeddings']: rope_type {rtype!r} needs it "
                             f"(or max_position_embeddings=), got neither")
    return _int(ompe, "scaling['original_max_position_embeddings']", 1)


def _factor(params, rtype, mpe, ompe=None, required=True):
    f = params.get("factor")
    if f is None and ompe is not None and mpe is not None and not required:
        return mpe / ompe  # HF: DeepSeek-V3 / Phi3 derive it from the two lengths
    if f is None:
        raise ParameterError(f"scaling['factor']: rope_type {rtype!r} needs a factor, got none")
    return _real(f, "scaling['factor']")


def rope_frequencies(dim: int, *, base=None, scaling=None, seq_len=None, max_position_embeddings=None):
    """RoPE inverse frequencies and attention factor: ``(inv_freq, attention_factor)``, float64.

    ``dim`` is the head dimension in HF's sense; the rotated dimension is
    ``d_rot = int(dim * scaling.get("partial_rotary_factor", 1))`` (even), and ``inv_freq`` has
    ``d_rot / 2`` entries ``base ** (-2i / d_rot)`` before scaling. ``base`` defaults to 10000, or to
    the dict's ``rope_theta`` (v5); both given and different is an error.

    ``scaling`` (HF ``ROPE_INIT_FUNCTIONS``, same key names and defaults):

    * ``linear``: ``inv_freq / factor`` (positions divided by ``factor``).
    * ``dynamic`` (NTK): ``base * (factor * L / max_position_embeddings - (factor - 1)) ** (d/(d-2))``
      with ``L = max(seq_len, max_position_embeddings)`` (``seq_len`` defaults to the latter).
    * ``yarn``: ramp between interpolation (``/factor``) and extrapolation over the correction range
      from ``beta_fast`` (32) and ``beta_slow`` (1) at ``original_max_position_embeddings``
      (``truncate`` True: floor/ceil); attention factor ``attention_factor`` or
      ``0.1 * mscale * ln(factor) + 1`` (ratio of two with ``mscale_all_dim``); ``factor`` None means
      ``max_position_embeddings / original``.
    * ``longrope``: ``inv_freq / ext`` with ``ext = long_factor`` when ``seq_len > original`` else
      ``short_factor``; attention factor ``sqrt(1 + ln(factor) / ln(original))`` (1 when factor <= 1).
    * ``llama3``: wavelengths above ``original / low_freq_factor`` divided by ``factor``, below
      ``original / high_freq_factor`` kept, a linear blend between.
    * ``proportional``: ``dim / 2`` entries: the first ``int(prf * dim // 2)`` are
      ``base ** (-2i / dim)``, the rest 0 (no rotation); all divided by ``factor`` (default 1).

    ``original_max_position_embeddings`` falls back to ``max_position_embeddings`` when the dict
    lacks it, as HF's ``standardize_rope_params`` does. HF computes in float32; this in float64.
    """
    rtype, prm, base = _parse_scaling(scaling, base)
    dim = _int(dim, "dim", 1)
    mpe = None if max_position_embeddings is None else _int(max_position_embeddings,
                                                            "max_position_embeddings", 1)
    prf = _real(prm.get("partial_rotary_factor", 1.0), "scaling['partial_rotary_factor']")
    if rtype == "proportional":
        angles = int(prf * dim // 2)
        inv = np.zeros(dim // 2)
        inv[:angles] = base ** (-np.arange(0, 2 * angles, 2, dtype=np.float64) / dim)
        return inv / _real(prm.get("factor", 1.0), "scaling['factor']"), 1.0
    d = int(dim * prf)
    if d < 2 or d % 2:
        raise ParameterError(f"rotary_dim: expected an even number >= 2 of rotated dims, got {d}"
                             + (f" (dim={dim} * partial_rotary_factor={prf})" if prf != 1 else ""))
    exponent = np.arange(0, d, 2, dtype=np.float64) / d
    inv = base ** -exponent
    if rtype == "default":
        return inv, 1.0
    if rtype == "linear":
        return inv / _factor(prm, rtype, mpe), 1.0
    if rtype == "dynamic":
        factor = _factor(prm, rtype, mpe)
        if mpe is None:
            raise ParameterError("max_position_embeddings: rope_type 'dynamic' needs it, got None")
        length = mpe if seq_len is None else max(_int(seq_len, "seq_len", 1), mpe)
        new_base = base * (factor * length / mpe - (factor - 1)) ** (d / (d - 2))
        return new_base ** -exponent, 1.0
    if rtype == "yarn":
        return _yarn(inv, d, base, prm, mpe)
    if rtype == "longrope":
        return _longrope(inv, d, prm, mpe, seq_len)
    return _llama3(inv, prm, mpe)


def _yarn(inv, d, base, prm, mpe):
    ompe = _original_max(prm, mpe, "yarn")
    factor = _factor(prm, "yarn", mpe, ompe, required=False)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = prm.get("attention_factor")
    if att is None:
        ms, ms_all = prm.get("mscale"), prm.get("mscale_all_dim")
        att = mscale(factor, ms) / mscale(factor, ms_all) if (ms and ms_all) else mscale(factor)
    beta_fast = prm.get("beta_fast") or 32  # HF: `or`, so 0 means the default too
    beta_slow = prm.get("beta_slow") or 1

    def correction_dim(rotations):
        return d * math.log(ompe / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if prm.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF: prevents a division by zero
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    return inv / factor * ramp + inv * extrapolation, float(att)


def _longrope(inv, d, prm, mpe, seq_len):
    ompe = _original_max(prm, mpe, "longrope")
    factor = _factor(prm, "longrope", mpe, ompe, required=False)
    att = prm.get("attention_factor")
    if att is None:
        att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(ompe))
    key = "long_factor" if (seq_len is not None and seq_len > ompe) else "short_factor"
    for name in ("long_factor", "short_factor"):
        if name not in prm:
            raise ParameterError(f"scaling[{name!r}]: rope_type 'longrope' needs it ({d // 2} numbers)")
    ext = as_compute(prm[key], f"scaling[{key!r}]")
    if ext.shape != (d // 2,):
        raise ShapeError(f"scaling[{key!r}]: expected {d // 2} numbers (rotary dim / 2), "
                         f"got shape {fmt_shape(ext.shape)}")
    return inv / ext, float(att)


def _llama3(inv, prm, mpe):
    ompe = _original_max(prm, mpe, "llama3")
    factor = _factor(prm, "llama3", mpe)
    for name in ("low_freq_factor", "high_freq_factor"):
        if name not in prm:
            raise ParameterError(f"scaling[{name!r}]: rope_type 'llama3' needs it, got none")
    low, high = _real(prm["low_freq_factor"], "low_freq_factor"), _real(prm["high_freq_factor"],
                                                                         "high_freq_factor")
    if high <= low:
        raise ParameterError(f"scaling['high_freq_factor']: expected > low_freq_factor ({low}), got {high}")
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > ompe / low, inv / factor, inv)
    smooth = (ompe / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < ompe / high) & ~(wavelen > ompe / low)
    return np.where(medium, blended, scaled), 1.0


def rope_cos_sin(positions, inv_freq, attention_factor=1.0):
    """``(cos, sin)`` of shape ``positions.shape + (len(inv_freq),)``, times ``attention_factor``.

    One entry per rotated pair (HF concatenates two copies for ``rotate_half``).
    """
    angle = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    return np.cos(angle) * attention_factor, np.sin(angle) * attention_factor


def _positions(positions, shape):
    """Positions as float64 broadcastable to ``shape[:-1]`` (``(S,)``, or ``(B, S)`` for rank 4)."""
    pos = to_numpy(positions, "positions")
    if pos.dtype.kind not in "iuf":
        raise ParameterError(f"positions: expected integer or real positions, got dtype {pos.dtype}")
    pos = pos.astype(np.float64)
    lead = shape[:-1]
    if pos.ndim == 2 and len(shape) == 4:
        pos = pos[:, None, :]  # (B, S) -> (B, 1, S): the same positions for every head
    ok = pos.ndim <= len(lead) and all(a in (1, b) for a, b in zip(pos.shape[::-1], lead[::-1]))
    if not ok or pos.shape[-1:] != lead[-1:]:
        raise ShapeError(f"positions: expected shape ({lead[-1]},) or (B, {lead[-1]}) matching x "
                         f"{fmt_shape(shape)}, got {fmt_shape(to_numpy(positions, 'positions').shape)}")
    if not np.all(np.isfinite(pos)) or np.any(pos < 0):
        raise ParameterError("positions: expected finite positions >= 0")
    return pos


def rope(x, positions, *, base=None, rotary_dim=None, style: str = "neox", scaling=None,
         max_position_embeddings=None, seq_len=None, inverse: bool = False) -> np.ndarray:
    """``x`` (``(..., S, D)``, e.g. ``(B, H, S, D)``) rotated by RoPE at ``positions``; float64.

    ``positions`` is ``(S,)`` or, for rank-4 ``x``, ``(B, S)`` (KV-cache offsets, packed sequences).
    ``rotary_dim`` (default ``D``, or ``int(D * partial_rotary_factor)`` from the dict) must be even
    and ``<= D``; the first ``rotary_dim`` dims are rotated, the rest pass through.
    ``style="neox"`` rotates ``(x_i, x_{i + r/2})`` (HF Llama), ``"gptj"`` ``(x_{2i}, x_{2i+1})``.
    ``scaling``/``base``/``max_position_embeddings`` as in :func:`rope_frequencies`; ``seq_len``
    (what ``dynamic`` and ``longrope`` depend on) defaults to ``max(positions) + 1``, which is what
    HF's ``dynamic_rope_update`` uses in the forward pass (HF's module also keeps grown ``dynamic``
    frequencies across calls until a short input resets them; this is a fresh module's answer).
    The rotated part is multiplied by the scaling's attention factor.

    ``inverse=True`` applies the transpose (rotation by ``-angle``, same attention factor): the
    gradient of ``rope`` w.r.t. ``x`` is ``rope(dy, ..., inverse=True)``.

    Properties (tested): ``<rope(q, p), rope(k, p')>`` depends on ``p - p'`` only; norms are kept
    (attention factor 1).
    """
    x = as_compute(x, "x")
    if x.ndim < 2:
        raise ShapeError(f"x: expected rank >= 2 (..., S, D), got shape {fmt_shape(x.shape)}")
    check_choice(style, "style", ("neox", "gptj"))
    d = x.shape[-1]
    pos = _positions(positions, x.shape)
    has_prf = isinstance(scaling, dict) and "partial_rotary_factor" in scaling
    if rotary_dim is not None:
        if has_prf:
            raise ParameterError("rotary_dim: given together with scaling['partial_rotary_factor']; give one")
        rotary_dim = _int(rotary_dim, "rotary_dim", 1)
        if rotary_dim % 2 or rotary_dim > d:
            raise ParameterError(f"rotary_dim: expected an even number <= D={d}, got {rotary_dim}")
    if seq_len is None and pos.size:
        seq_len = int(np.max(pos)) + 1
    inv, att = rope_frequencies(rotary_dim or d, base=base, scaling=scaling, seq_len=seq_len,
                                max_position_embeddings=max_position_embeddings)
    cos, sin = rope_cos_sin(pos, inv, att)
    if inverse:
        sin = -sin
    r = 2 * inv.size
    if r > d:
        raise ParameterError(f"rotary_dim: expected an even number <= D={d}, got {r}")
    if style == "neox":
        a, b = x[..., : r // 2], x[..., r // 2: r]
    else:
        a, b = x[..., 0:r:2], x[..., 1:r:2]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = x.copy()
    if style == "neox":
        out[..., : r // 2], out[..., r // 2: r] = ra, rb
    else:
        out[..., 0:r:2], out[..., 1:r:2] = ra, rb
    return out


# -- ALiBi ------------------------------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes ``(num_heads,)`` (Press et al.), float64.

    For ``n`` a power of two ``m_h = 2 ** (-8 (h + 1) / n)``. Otherwise, with ``c`` the largest power
    of two below ``n``: the ``c`` slopes for ``c`` heads, then the first ``n - c`` of the
    even-indexed (0, 2, 4, ...) slopes for ``2c`` heads -- the paper's code, BLOOM and flash-attn.
    """
    n = _int(num_heads, "num_heads", 1)
    c = 1 << (n.bit_length() - 1)
    slopes = 2.0 ** (-8.0 * np.arange(1, c + 1) / c)
    extra = 2.0 ** (-8.0 * np.arange(1, 2 * c + 1, 2)[: n - c] / (2 * c))
    return np.concatenate([slopes, extra])


def relative_distances(sq: int, sk: int, alignment: str = "bottom_right") -> np.ndarray:
    """``(sq, sk)`` integer matrix ``j - (i + s)``: key position minus query position."""
    sq, sk = _int(sq, "sq"), _int(sk, "sk")
    s = diagonal_offset(alignment, sq, sk)
    return np.arange(sk)[None, :] - (np.arange(sq)[:, None] + s)


def alibi_bias(num_heads: int, sq: int, sk: int, *, alignment: str = "bottom_right", slopes=None):
    """``(num_heads, sq, sk)`` ALiBi bias ``-slope_h * |i + s - j|`` (slopes from :func:`alibi_slopes`).

    Symmetric form (flash-attn's reference); under a causal mask it equals the paper's
    ``-slope_h * (i + s - j)``. flash-attn's causal kernel adds ``+slope_h * j`` instead: the same
    softmax, an LSE larger by ``slope_h * (i + s)``.
    """
    m = alibi_slopes(num_heads) if slopes is None else as_compute(slopes, "slopes")
    if m.shape != (num_heads,):
        raise ShapeError(f"slopes: expected shape ({num_heads},), got {fmt_shape(m.shape)}")
    return -m[:, None, None] * np.abs(relative_distances(sq, sk, alignment))[None]


# -- T5 -----------------------------------------------------------------------------------------------
def t5_relative_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32,
                       max_distance: int = 128) -> np.ndarray:
    """T5's bucket of each relative position ``r = j - i`` (key minus query), as int64.

    Bidirectional: ``nb = num_buckets // 2``, bucket offset ``nb`` for ``r > 0``, then ``n = |r|``.
    Unidirectional: ``nb = num_buckets``, ``n = max(-r, 0)`` (future keys share bucket 0).
    With ``max_exact = nb // 2``: ``n < max_exact`` is its own bucket; otherwise
    ``max_exact + floor(ln(n / max_exact) / ln(max_distance / max_exact) * (nb - max_exact))``,
    clamped to ``nb - 1``. (Evaluated in float64; HF and Mesh TensorFlow use float32 -- the peer test
    checks that the two agree on every tested distance.)
    """
    r = to_numpy(relative_position, "relative_position")
    if r.dtype.kind not in "iu":
        raise ParameterError(f"relative_position: expected integers, got dtype {r.dtype}")
    r = r.astype(np.int64)
    nb = _int(num_buckets, "num_buckets", 2)
    max_distance = _int(max_distance, "max_distance", 1)
    if bidirectional:
        nb //= 2
        offset = np.where(r > 0, nb, 0)
        n = np.abs(r)
    else:
        offset = np.zeros_like(r)
        n = -np.minimum(r, 0)
    max_exact = nb // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ParameterError(f"max_distance: expected > num_buckets/{4 if bidirectional else 2} "
                             f"= {max_exact} (and num_buckets >= {4 if bidirectional else 2}), got "
                             f"{max_distance} with num_buckets={num_buckets}")
    safe = np.maximum(n, max_exact).astype(np.float64)
    large = max_exact + np.floor(np.log(safe / max_exact) / math.log(max_distance / max_exact)
                                 * (nb - max_exact)).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return offset + np.where(n < max_exact, n, large)


def t5_bias(table, sq: int, sk: int, *, bidirectional: bool = True, max_distance: int = 128,
            alignment: str = "bottom_right") -> np.ndarray:
    """``(H, sq, sk)`` T5 bias: ``table[bucket(j - (i + s)), h]`` for a learned ``table (num_buckets, H)``.

    Bottom-right alignment puts query ``i`` at position ``i + sk - sq`` (HF's ``cache_position`` with
    a KV cache); ``"top_left"`` at ``i``. T5 uses ``scale = 1`` (no ``1/sqrt(d)``).
    """
    t = as_compute(table, "table")
    if t.ndim != 2:
        raise ShapeError(f"table: expected (num_buckets, H), got shape {fmt_shape(t.shape)}")
    buckets = t5_relative_bucket(relative_distances(sq, sk, alignment), bidirectional=bidirectional,
                                 num_buckets=t.shape[0], max_distance=max_distance)
    return np.moveaxis(t[buckets], -1, 0)


# -- Transformer-XL -------------------------------------------------------------------------------------
def _txl_check(q, k, pos_k, bias_u, bias_v):
    q, k = as_compute(q, "q"), as_compute(k, "k")
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ShapeError(f"q, k: expected (B, H, Sq, D) and (B, H, Sk, D), got {fmt_shape(q.shape)} "
                         f"and {fmt_shape(k.shape)}")
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if sk < sq:
        raise ShapeError(f"k: expected Sk >= Sq (memory + current segment), got Sk={sk} < Sq={sq}")
    pos_k = as_compute(pos_k, "pos_k")
    if pos_k.shape != (h, sk, d):
        raise ShapeError(f"pos_k: expected ({h}, {sk}, {d}) = (H, Sk, D) for distances 0..Sk-1, "
                         f"got {fmt_shape(pos_k.shape)}")
    u, v = as_compute(bias_u, "bias_u"), as_compute(bias_v, "bias_v")
    for name, a in (("bias_u", u), ("bias_v", v)):
        if a.shape != (h, d):
            raise ShapeError(f"{name}: expected ({h}, {d}) = (H, D), got {fmt_shape(a.shape)}")
    return q, k, pos_k, u, v


def rel_shift(x: np.ndarray) -> np.ndarray:
    """Transformer-XL's relative shift of ``(..., Sq, Sk)`` scores whose column ``c`` is distance
    ``Sk - 1 - c``: pad a zero column on the left, view as ``(Sk + 1, Sq)``, drop the first row, view
    back. Afterwards ``out[i, j]`` holds distance ``i + (Sk - Sq) - j`` wherever that is >= 0
    (entries above the causal diagonal are leftovers and must be masked)."""
    *lead, sq, sk = x.shape
    padded = np.concatenate([np.zeros((*lead, sq, 1)), x], axis=-1)
    return padded.reshape(*lead, sk + 1, sq)[..., 1:, :].reshape(*lead, sq, sk)


def transformer_xl_bias(q, k, pos_k, bias_u, bias_v, *, form: str = "shift") -> np.ndarray:
    """The position terms of Transformer-XL's scores, ``(B, H, Sq, Sk)``, unscaled.

    Scores are ``(a) q_i·k_j + (b) q_i·W_R R_{i+s-j} + (c) u·k_j + (d) v·W_R R_{i+s-j}``; this
    returns ``(b) + (c) + (d)`` so that ``scale * (q·k + bias)`` is the full score. Keys are
    ``[memory; current segment]`` so ``s = Sk - Sq`` (bottom-right). ``pos_k (H, Sk, D)`` holds
    ``W_R R_d`` for distances ``d = 0 .. Sk - 1``; ``bias_u``/``bias_v`` are ``(H, D)``. The model is
    causal: pairs with ``j > i + s`` get ``-inf``.

    ``form="direct"`` looks distance ``i + s - j`` up per pair; ``form="shift"`` multiplies by the
    reversed table and applies :func:`rel_shift` (the paper's O(N) trick). They agree (tested).
    """
    check_choice(form, "form", ("shift", "direct"))
    q, k, pos_k, u, v = _txl_check(q, k, pos_k, bias_u, bias_v)
    sq, sk = q.shape[2], k.shape[2]
    dist = -relative_distances(sq, sk)  # i + s - j
    future = dist < 0
    c = np.einsum("hd,bhkd->bhk", u, k)[:, :, None, :]
    qv = q + v[None, :, None, :]
    if form == "direct":
        by_distance = np.einsum("bhqd,hkd->bhqk", qv, pos_k)  # [i, d] = (q_i + v)·W_R R_d
        idx = np.broadcast_to(np.where(future, 0, dist), by_distance.shape)
        bd = np.take_along_axis(by_distance, idx, axis=-1)  # (b) + (d) at d = i + s - j
    else:
        bd = rel_shift(np.einsum("bhqd,hkd->bhqk", qv, pos_k[:, ::-1]))
    return np.where(future, -np.inf, bd + c)

"""Bad input raises a :mod:`refattn.errors` exception naming the argument, what was expected and
what came (issue 3, item 7). Each case checks the exact class, its builtin base (ValueError or
TypeError, so ``except ValueError`` keeps working) and the message."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import refattn
from refattn import errors

B, HQ, SQ, SK, D, HKV, DV = 2, 4, 5, 6, 3, 2, 2
TARGET = f"({B}, {HQ}, {SQ}, {SK})"


def qkv(q=(B, HQ, SQ, D), k=(B, HKV, SK, D), v=(B, HKV, SK, DV), dtype=np.float64):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (q, k, v))


def call(arrays=None, **kw):
    q, k, v = arrays if arrays is not None else qkv()
    return refattn.attention(q, k, v, **kw)


def _nan_q():
    q, k, v = qkv()
    q[0, 0, 0, 0] = np.nan
    return q, k, v


def _str_q():
    q, k, v = qkv()
    return q.astype(str), k, v


# id: (arrays, kwargs, error class, builtin base, argument, further substrings)
CASES = {
    "q_rank": (qkv(q=(HQ, SQ, D)), {}, errors.ShapeError, ValueError, "q",
               ["expected rank 4", "got shape (4, 5, 3)"]),
    "k_rank": (qkv(k=(1, B, HKV, SK, D)), {}, errors.ShapeError, ValueError, "k", ["rank 4"]),
    "v_rank": (qkv(v=(HKV, SK, DV)), {}, errors.ShapeError, ValueError, "v", ["rank 4"]),
    "q_rank_bshd": (qkv(q=(SQ, HQ, D)), dict(layout="bshd"), errors.ShapeError, ValueError, "q",
                    ["(B, S, H, D)", "'bshd'"]),
    "batch_mismatch": (qkv(k=(3, HKV, SK, D), v=(3, HKV, SK, DV)), {}, errors.ShapeError, ValueError,
                       "q", ["same batch size B", "got 2, 3 and 3"]),
    "zero_query_heads": (qkv(q=(B, 0, SQ, D)), {}, errors.ShapeError, ValueError, "q",
                         ["query heads Hq >= 1", "got shape (2, 0, 5, 3)"]),
    "head_dim_mismatch": (qkv(k=(B, HKV, SK, D + 1)), {}, errors.ShapeError, ValueError, "k",
                          ["head dim 3", "got 4"]),
    "head_dim_mismatch_bshd": (qkv(q=(B, SQ, HQ, D), k=(B, SK, HKV, D + 1), v=(B, SK, HKV, DV)),
                               dict(layout="bshd"), errors.ShapeError, ValueError, "k",
                               ["head dim 3", "got 4", "(k shape (2, 6, 2, 4) in layout 'bshd')"]),
    "kv_heads_mismatch": (qkv(v=(B, 1, SK, DV)), {}, errors.ShapeError, ValueError, "v",
                          ["2 heads", "got 1"]),
    "kv_length_mismatch": (qkv(v=(B, HKV, SK - 1, DV)), {}, errors.ShapeError, ValueError, "v",
                           ["sequence length 6", "got 5"]),
    "empty_keys": (qkv(k=(B, HKV, 0, D), v=(B, HKV, 0, DV)), {}, errors.ShapeError, ValueError, "k",
                   ["keys Sk >= 1", "got shape (2, 2, 0, 3)"]),
    "groups_not_divisible": (qkv(k=(B, 3, SK, D), v=(B, 3, SK, DV)), {}, errors.ShapeError,
                             ValueError, "k", ["dividing the 4 query heads", "got 3"]),
    "gqa_not_divisible": (qkv(k=(B, 3, SK, D), v=(B, 3, SK, DV)), dict(variant="gqa"),
                          errors.ShapeError, ValueError, "k", ["dividing"]),
    "mha_heads": (None, dict(variant="mha"), errors.ShapeError, ValueError, "k",
                  ["as many KV heads as query heads (4) for variant 'mha'", "got 2"]),
    "mqa_heads": (None, dict(variant="mqa"), errors.ShapeError, ValueError, "k",
                  ["1 KV head for variant 'mqa'", "got 2"]),
    "head_map_length": (None, dict(head_map=[0, 1, 0]), errors.ShapeError, ValueError, "head_map",
                        ["(4,)", "got (3,)"]),
    "head_map_range": (None, dict(head_map=[0, 1, 2, 0]), errors.ParameterError, ValueError,
                       "head_map", ["[0, 2)", "got values in [0, 2]"]),
    "head_map_negative": (None, dict(head_map=[0, -1, 1, 0]), errors.ParameterError, ValueError,
                          "head_map", ["[0, 2)", "[-1, 1]"]),
    "head_map_float": (None, dict(head_map=[0.0, 1.0, 0.0, 1.0]), errors.ParameterError, ValueError,
                       "head_map", ["integers", "float64"]),
    "head_map_bool": (None, dict(head_map=[True, False, True, False]), errors.ParameterError,
                      ValueError, "head_map", ["integers", "bool"]),
    "window_negative": (None, dict(window=(-2, 0)), errors.ParameterError, ValueError, "window",
                        ["left an integer >= -1", "got -2"]),
    "window_right_negative": (None, dict(window=(0, -5)), errors.ParameterError, ValueError,
                              "window", ["right an integer >= -1", "got -5"]),
    "window_float": (None, dict(window=(1.5, 0)), errors.ParameterError, ValueError, "window",
                     ["integer", "got 1.5"]),
    "window_bool": (None, dict(window=(True, 0)), errors.ParameterError, ValueError, "window",
                    ["integer", "got True"]),
    "window_length": (None, dict(window=(1, 2, 3)), errors.ParameterError, ValueError, "window",
                      ["pair (left, right)", "got (1, 2, 3)"]),
    "window_scalar": (None, dict(window=3), errors.ParameterError, ValueError, "window",
                      ["pair", "got 3"]),
    "window_string": (None, dict(window="10"), errors.ParameterError, ValueError, "window",
                      ["pair", "got '10'"]),
    "mask_not_bool": (None, dict(mask=np.ones((SQ, SK))), errors.ParameterError, ValueError, "mask",
                      ["boolean", "got dtype float64"]),
    "mask_int": (None, dict(mask=np.ones((SQ, SK), dtype=np.int8)), errors.ParameterError, ValueError,
                 "mask", ["boolean", "int8"]),
    "mask_shape": (None, dict(mask=np.ones((SQ + 1, SK), dtype=bool)), errors.ShapeError, ValueError,
                   "mask", [f"broadcastable to {TARGET}", "got (6, 6)"]),
    "mask_rank": (None, dict(mask=np.ones((1, B, HQ, SQ, SK), dtype=bool)), errors.ShapeError,
                  ValueError, "mask", ["rank <= 4", "got shape (1, 2, 4, 5, 6)"]),
    "bias_shape": (None, dict(bias=np.zeros((HQ, SQ, SK + 2))), errors.ShapeError, ValueError, "bias",
                   [f"broadcastable to {TARGET}", "got (4, 5, 8)"]),
    "bias_nan": (None, dict(bias=np.full((SQ, SK), np.nan)), errors.ParameterError, ValueError, "bias",
                 ["no NaN", f"got {SQ * SK}"]),
    "bias_pos_inf": (None, dict(bias=np.array([0, 0, 0, 0, 0, np.inf])), errors.ParameterError,
                     ValueError, "bias", ["+inf", "got 1"]),
    "bias_complex": (None, dict(bias=np.ones((SQ, SK), complex)), errors.DTypeError, TypeError, "bias",
                     ["real floating", "got dtype complex128"]),
    "scale_nan": (None, dict(scale=math.nan), errors.ParameterError, ValueError, "scale",
                  ["finite real number", "got nan"]),
    "scale_inf": (None, dict(scale=math.inf), errors.ParameterError, ValueError, "scale",
                  ["finite", "got inf"]),
    "scale_string": (None, dict(scale="0.5"), errors.ParameterError, ValueError, "scale",
                     ["real number", "got '0.5'"]),
    "scale_complex": (None, dict(scale=1j), errors.ParameterError, ValueError, "scale",
                      ["real number", "got 1j"]),
    "scale_bool": (None, dict(scale=True), errors.ParameterError, ValueError, "scale", ["got True"]),
    "dropout_p_negative": (None, dict(dropout_p=-0.1, dropout_seed=1), errors.ParameterError,
                           ValueError, "dropout_p", ["[0, 1)", "got -0.1"]),
    "dropout_p_one": (None, dict(dropout_p=1.0, dropout_seed=1), errors.ParameterError, ValueError,
                      "dropout_p", ["[0, 1)", "got 1.0"]),
    "dropout_p_string": (None, dict(dropout_p="0.1", dropout_seed=1), errors.ParameterError,
                         ValueError, "dropout_p", ["[0, 1)", "got '0.1'"]),
    "dropout_p_without_seed": (None, dict(dropout_p=0.1), errors.ParameterError, ValueError,
                               "dropout_p", ["dropout_seed=", "dropout_mask=", "got dropout_p=0.1"]),
    "dropout_seed_and_mask": (None, dict(dropout_p=0.1, dropout_seed=3,
                                         dropout_mask=np.ones((SQ, SK), bool)),
                              errors.ParameterError, ValueError, "dropout_seed", ["both"]),
    "dropout_seed_without_p": (None, dict(dropout_seed=3), errors.ParameterError, ValueError,
                               "dropout_seed", ["dropout_p in (0, 1)", "got dropout_p=0"]),
    "dropout_seed_negative": (None, dict(dropout_p=0.1, dropout_seed=-1), errors.ParameterError,
                              ValueError, "dropout_seed", ["[0, 2**64)", "got -1"]),
    "dropout_seed_float": (None, dict(dropout_p=0.1, dropout_seed=1.0), errors.ParameterError,
                           ValueError, "dropout_seed", ["integer", "got 1.0"]),
    "dropout_seed_too_big": (None, dict(dropout_p=0.1, dropout_seed=2 ** 64), errors.ParameterError,
                             ValueError, "dropout_seed", ["[0, 2**64)", "got 18446744073709551616"]),
    "dropout_mask_not_bool": (None, dict(dropout_p=0.1, dropout_mask=np.ones((SQ, SK))),
                              errors.ParameterError, ValueError, "dropout_mask",
                              ["boolean", "float64"]),
    "dropout_mask_shape": (None, dict(dropout_p=0.1, dropout_mask=np.ones((SK, SQ), bool)),
                           errors.ShapeError, ValueError, "dropout_mask",
                           ["broadcastable", "got (6, 5)"]),
    "softcap_zero": (None, dict(softcap=0.0), errors.ParameterError, ValueError, "softcap",
                     ["> 0", "got 0.0"]),
    "softcap_negative": (None, dict(softcap=-1), errors.ParameterError, ValueError, "softcap",
                         ["> 0", "got -1"]),
    "softcap_inf": (None, dict(softcap=math.inf), errors.ParameterError, ValueError, "softcap",
                    ["finite", "got inf"]),
    "alibi_shape": (None, dict(alibi_slopes=[0.5, 0.25]), errors.ShapeError, ValueError,
                    "alibi_slopes", ["(4,)", "got (2,)"]),
    "alibi_nan": (None, dict(alibi_slopes=[0.5, np.nan, 0.1, 0.1]), errors.ParameterError, ValueError,
                  "alibi_slopes", ["finite", "got"]),
    "alibi_form": (None, dict(alibi_slopes=[1, 1, 1, 1], alibi_form="causal"), errors.ParameterError,
                   ValueError, "alibi_form", ["'symmetric', 'flash'", "got 'causal'"]),
    "sinks_shape": (None, dict(sinks=np.zeros((1, HQ))), errors.ShapeError, ValueError, "sinks",
                    ["(4,)", "got (1, 4)"]),
    "sinks_inf": (None, dict(sinks=[0, 0, np.inf, 0]), errors.ParameterError, ValueError, "sinks",
                  ["finite", "got"]),
    "unknown_variant": (None, dict(variant="sdpaa"), errors.UnknownVariant, ValueError, "variant",
                        ["sdpa, ", "got 'sdpaa'"]),
    "unknown_parameter": (None, dict(causall=True), errors.ParameterError, ValueError, "causall",
                          ["not an input or parameter of variant 'sdpa'", "causal", "got causall"]),
    "causal_string": (None, dict(causal="yes"), errors.ParameterError, ValueError, "causal",
                      ["'top_left'", "got 'yes'"]),
    "causal_int": (None, dict(causal=1), errors.ParameterError, ValueError, "causal", ["got 1"]),
    "causal_array": (None, dict(causal=np.array([True, False])), errors.ParameterError, ValueError,
                     "causal", ["got array"]),
    "causal_none": (None, dict(causal=None), errors.ParameterError, ValueError, "causal",
                    ["got None"]),
    "alignment": (None, dict(alignment="center"), errors.ParameterError, ValueError, "alignment",
                  ["'bottom_right', 'top_left'", "got 'center'"]),
    "layout": (None, dict(layout="bsdh"), errors.ParameterError, ValueError, "layout",
               ["'bhsd', 'bshd'", "got 'bsdh'"]),
    "empty_row": (None, dict(empty_row="inf"), errors.ParameterError, ValueError, "empty_row",
                  ["'zero', 'nan'", "got 'inf'"]),
    "lse_base": (None, dict(lse_base=10), errors.ParameterError, ValueError, "lse_base",
                 ["e (math.e or 'e') or 2", "got 10"]),
    "compute_dtype": (None, dict(compute_dtype="float16"), errors.ParameterError, ValueError,
                      "compute_dtype", ["'float64'", "got 'float16'"]),
    "complex_q": (qkv(dtype=np.complex128), {}, errors.DTypeError, TypeError, "q",
                  ["real floating or integer", "got dtype complex128"]),
    "string_q": (_str_q(), {}, errors.DTypeError, TypeError, "q", ["real", "got dtype <U"]),
    "bool_k": ((qkv()[0], qkv()[1] > 0, qkv()[2]), {}, errors.DTypeError, TypeError, "k",
               ["real", "got dtype bool"]),
    "nan_q": (_nan_q(), {}, errors.ParameterError, ValueError, "q", ["finite", "got 1 NaN entries"]),
    "flash_block": (None, dict(variant="flash", block_q=0), errors.ParameterError, ValueError,
                    "block_q", [">= 1", "got 0"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_named_error(name):
    arrays, kw, cls, builtin, arg, parts = CASES[name]
    with pytest.raises(cls) as info:
        call(arrays, **kw)
    err = info.value
    assert type(err) is cls
    assert isinstance(err, errors.RefattnError) and isinstance(err, builtin)
    msg = str(err)
    assert msg.startswith(arg + ":") or msg.startswith(arg + ","), msg
    assert "expected" in msg and "got" in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    assert "\n" not in msg


def _installed(msg):
    """The list after "installed:" in a backend error message."""
    found = re.search(r"[Ii]nstalled: ([a-z, ]+)", msg)
    assert found, msg
    return found.group(1).split(", ")


def test_unknown_backend_names_installed_backends():
    with pytest.raises(errors.BackendUnavailable) as info:
        call(backend="torch")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith("backend:") and "got 'torch'" in msg
    assert "'numpy'" in msg and "numpy" in _installed(msg)


def test_missing_backend_says_how_to_install():
    from refattn import backends
    if "cupy" in backends.available():
        pytest.skip("cupy is installed here")
    with pytest.raises(errors.BackendUnavailable) as info:
        call(backend="cupy")
    msg = str(info.value)
    assert msg.startswith("backend:") and "'cupy'" in msg
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert "pip install" in msg  # CuPy is what is missing
    else:
        assert "CUDA device" in msg  # CuPy is here; the device is what is missing
    assert "numpy" in _installed(msg)


def test_backward_dout_shape():
    q, k, v = qkv()
    with pytest.raises(errors.ShapeError) as info:
        refattn.attention_backward(q, k, v, np.zeros((B, HQ, SQ, DV + 1)))
    msg = str(info.value)
    assert msg.startswith("dout:") and "(2, 4, 5, 2)" in msg and "got (2, 4, 5, 3)" in msg


def test_backward_dout_dtype():
    q, k, v = qkv()
    with pytest.raises(errors.DTypeError, match="^dout: expected a real"):
        refattn.attention_backward(q, k, v, np.zeros((B, HQ, SQ, DV), complex))


def test_bad_input_is_not_modified_on_error():
    q, k, v = qkv()
    bias = np.zeros((SQ, SK))
    bias[0, 0] = np.nan
    copies = [a.copy() for a in (q, k, v, bias)]
    with pytest.raises(errors.ParameterError):
        refattn.attention(q, k, v, bias=bias)
    for a, c in zip((q, k, v, bias), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kw", [dict(mask=np.ones((SQ, SK), bool)), dict(bias=np.zeros((1, HQ, 1, SK))),
                                dict(dropout_p=0.2, dropout_mask=np.ones(SK, bool)),
                                dict(head_map=np.array([1, 1, 0, 0], dtype=np.uint8)),
                                dict(window=(np.int64(2), -1)), dict(scale=np.float32(0.5)),
                                dict(lse_base="e"), dict(lse_base=2.0), dict(bias=np.full(SK, -np.inf)),
                                dict(dropout_p=0.5, dropout_seed=2 ** 64 - 1),
                                dict(causal=np.True_), dict(causal=np.False_)])
def test_accepted_edge_values(kw):
    """Values at the edge of what is documented as accepted do not raise."""
    out = call(**kw)
    assert out.shape == (B, HQ, SQ, DV)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window=(3, 0)), dict(window=(-1, 2))])
def test_alibi_flash_form_outside_flash_attns_causal_kernel_is_an_error(kw):
    """flash-attn adds +slope*j only in its causal kernel (causal, unbounded left); elsewhere it
    uses the symmetric form, so 'flash' there would define a result nothing computes."""
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(errors.ParameterError, match=r"^alibi_form: expected 'symmetric'.*got 'flash'"):
        refattn.attention(q, q, q, alibi_slopes=[0.5, 0.25], alibi_form="flash", **kw)
    refattn.attention(q, q, q, alibi_slopes=[0.5, 0.25], alibi_form="flash", causal=True)
    refattn.attention(q, q, q, alibi_slopes=[0.5, 0.25], alibi_form="flash", window=(-1, 0))


def test_dropout_mask_with_p_zero_is_an_error():
    q = np.zeros((1, 1, 2, 2))
    with pytest.raises(errors.ParameterError, match=r"^dropout_p: expected a value in \(0, 1\) with dropout_mask"):
        refattn.attention(q, q, q, dropout_mask=np.ones((2, 2), bool))


@pytest.mark.parametrize("value", ["no", 1, None])
def test_return_lse_must_be_a_bool(value):
    q = np.zeros((1, 1, 2, 2))
    with pytest.raises(errors.ParameterError, match=r"^return_lse: expected True or False"):
        refattn.attention(q, q, q, return_lse=value)


@pytest.mark.parametrize("window", [("a", 0), (2.0, 0), (True, 0), (-2, 0)])
def test_pattern_window_is_validated_like_the_window_parameter(window):
    from refattn.patterns import Pattern
    with pytest.raises(errors.ParameterError, match=r"^window: expected"):
        Pattern(window=window)


@pytest.mark.parametrize("variant", ["sdpa", "sliding_window", "rope"])
def test_backward_dout_shape_is_reported_in_the_callers_layout(variant):
    """One dout check serves every family: with layout='bshd' both shapes are (B, S, H, Dv)."""
    q = np.zeros((1, 5, 2, 4))  # bshd: S=5, H=2
    with pytest.raises(errors.ShapeError) as exc:
        refattn.attention_backward(q, q, q, np.zeros((1, 2, 5, 4)), variant=variant, layout="bshd")
    assert str(exc.value) == "dout: expected the output's shape (1, 5, 2, 4), got (1, 2, 5, 4)"

"""The dense core (sdpa, mha, mqa, gqa, flash) against the loop reference and known identities.

Every expected value comes from ``tests/reference.py`` (loops over the definitions) or from a second
formulation written here (repeated K/V heads, permuted keys, a decode row, merged halves, a tiled
forward written in this file); never from refattn itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn
from refattn.backends import get as get_backend
from reference import reference_attention, reference_probabilities

RTOL = ATOL = 1e-12


def make_qkv(seed, b, hq, sq, sk, d, hkv, dv=None):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, dv or d)))


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    """Equal to float64 rounding, with ``-inf``/NaN required in the same places."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# (B, Hq, Sq, Sk, D, Hkv, Dv): Sq < Sk, Sq > Sk (empty causal rows bottom-right), a decode row
SHAPES = [(2, 4, 5, 7, 3, 2, 2), (1, 4, 7, 4, 3, 1, 3), (2, 2, 1, 6, 4, 2, 4)]


def _knobs(shape, rng):
    """Named keyword sets, one knob or a few at a time, built for ``shape``."""
    b, hq, sq, sk, d, hkv, dv = shape
    empty_mask = rng.random((b, hq, sq, sk)) < 0.6
    empty_mask[0, 0, 0] = False  # an empty row
    slopes = 2.0 ** -np.arange(1, hq + 1)
    bias_inf = rng.standard_normal((sq, sk))
    bias_inf[0, : sk // 2] = -np.inf
    bias_row_inf = rng.standard_normal((sq, sk))
    bias_row_inf[-1] = -np.inf  # a row emptied by the bias alone
    return {
        "plain": {},
        "scale": dict(scale=0.37),
        "causal_bottom_right": dict(causal=True),
        "causal_str_bottom_right": dict(causal="bottom_right", alignment="top_left"),
        "causal_top_left": dict(causal="top_left"),
        "causal_alignment_top_left": dict(causal=True, alignment="top_left"),
        "window_1_0": dict(window=(1, 0)),
        "window_0_0": dict(window=(0, 0)),
        "window_unbounded_left": dict(window=(-1, 1)),
        "window_unbounded_right": dict(window=(2, -1)),
        "window_unbounded": dict(window=(-1, -1)),
        "window_top_left": dict(window=(1, 2), alignment="top_left"),
        "window_causal": dict(window=(2, 3), causal=True),
        "mask_full_with_empty_row": dict(mask=empty_mask),
        "mask_2d": dict(mask=rng.random((sq, sk)) < 0.7),
        "mask_head_key": dict(mask=rng.random((1, hq, 1, sk)) < 0.7),
        "bias_full": dict(bias=rng.standard_normal((b, hq, sq, sk))),
        "bias_head_key": dict(bias=rng.standard_normal((1, hq, 1, sk))),
        "bias_2d_neg_inf": dict(bias=bias_inf),
        "bias_row_all_neg_inf": dict(bias=bias_row_inf, sinks=rng.standard_normal(hq)),
        "large_scores": dict(scale=500.0, causal=True),  # exp would overflow unshifted
        "large_scores_softcap": dict(scale=80.0, softcap=30.0, alibi_slopes=slopes * 50),
        "softcap": dict(softcap=1.3, scale=2.0),
        "alibi": dict(alibi_slopes=slopes),
        "alibi_causal_top_left": dict(alibi_slopes=slopes, causal="top_left"),
        "alibi_flash_causal": dict(alibi_slopes=slopes, alibi_form="flash", causal=True),
        "softcap_alibi_bias": dict(softcap=0.9, alibi_slopes=slopes,
                                   bias=rng.standard_normal((hq, 1, sk))),
        "sinks": dict(sinks=rng.standard_normal(hq)),
        "sinks_causal": dict(sinks=rng.standard_normal(hq), causal=True),
        "head_map": dict(head_map=rng.integers(0, hkv, hq)),
        "dropout_mask": dict(dropout_p=0.3, dropout_mask=rng.random((b, hq, sq, sk)) < 0.7),
        "empty_row_nan": dict(causal=True, empty_row="nan", mask=empty_mask),
        "lse_base_2": dict(lse_base=2, causal=True),
        "everything": dict(scale=0.8, causal=True, window=(3, 0), mask=empty_mask, softcap=2.5,
                           alibi_slopes=slopes, bias=rng.standard_normal((1, hq, sq, 1)),
                           sinks=rng.standard_normal(hq), head_map=rng.integers(0, hkv, hq),
                           dropout_p=0.2, dropout_mask=rng.random((1, 1, sq, sk)) < 0.8),
    }


KNOB_NAMES = list(_knobs(SHAPES[0], np.random.default_rng(0)))


def _reference_kwargs(kw):
    """refattn's keywords -> the reference's (an explicit keep mask for dropout)."""
    kw = dict(kw)
    if "dropout_mask" in kw:
        kw["keep"] = kw.pop("dropout_mask")
    return kw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("knob", KNOB_NAMES)
@pytest.mark.parametrize("variant", ["sdpa", "flash"])
def test_every_knob_against_reference(variant, knob, shape):
    kw = _knobs(shape, np.random.default_rng(1))[knob]
    q, k, v = make_qkv(2, *shape)
    extra = dict(block_q=2, block_k=3) if variant == "flash" else {}
    out, lse = refattn.attention(q, k, v, variant=variant, return_lse=True, **kw, **extra)
    ref_out, ref_lse = reference_attention(q, k, v, **_reference_kwargs(kw))
    assert out.dtype == lse.dtype == np.float64
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


@pytest.mark.parametrize("knob", ["everything", "bias_full", "alibi_causal_top_left", "sinks_causal",
                                  "mask_full_with_empty_row", "dropout_mask"])
def test_query_chunking_does_not_change_results(knob, monkeypatch):
    """The numpy backend works in chunks of query rows (for long sequences); tiny chunks must give
    the reference's forward and the unchunked backward."""
    shape = SHAPES[1]
    kw = _knobs(shape, np.random.default_rng(1))[knob]
    q, k, v = make_qkv(2, *shape)
    dout = np.random.default_rng(3).standard_normal(q.shape[:3] + (v.shape[3],))
    whole = refattn.attention_backward(q, k, v, dout, **kw)
    backend = get_backend("numpy")
    monkeypatch.setattr(backend, "chunk_elements", 5)  # one or two rows per chunk
    out, lse = refattn.attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = reference_attention(q, k, v, **_reference_kwargs(kw))
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    chunked = refattn.attention_backward(q, k, v, dout, **kw)
    for a, b in zip(chunked[:3], whole[:3]):
        assert_close(a, b)
    assert chunked[3].keys() == whole[3].keys()
    for name in whole[3]:
        assert_close(chunked[3][name], whole[3][name])


def test_knob_cases_really_have_empty_rows():
    """The cases above exercise empty rows (output 0, LSE -inf), both from a mask and from
    bottom-right causal alignment with Sq > Sk."""
    q, k, v = make_qkv(0, *SHAPES[1])
    out, lse = refattn.attention(q, k, v, causal=True, return_lse=True)
    assert np.all(np.isneginf(lse[:, :, :3])) and np.all(out[:, :, :3] == 0)
    assert np.all(np.isfinite(lse[:, :, 3:]))
    kw = _knobs(SHAPES[0], np.random.default_rng(1))["mask_full_with_empty_row"]
    q, k, v = make_qkv(0, *SHAPES[0])
    out, lse = refattn.attention(q, k, v, return_lse=True, **kw)
    assert np.isneginf(lse[0, 0, 0]) and np.all(out[0, 0, 0] == 0)


# -- random cases with Hypothesis -------------------------------------------------------------------
@st.composite
def core_cases(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    sq, sk = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    d, dv = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    kw = {}
    causal = draw(st.sampled_from([False, True, "bottom_right", "top_left"]))
    if causal is not False:
        kw["causal"] = causal
    if draw(st.booleans()):
        kw["alignment"] = draw(st.sampled_from(["bottom_right", "top_left"]))
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 6)), draw(st.integers(-1, 6)))
    if draw(st.booleans()):
        kw["mask"] = rng.random((b, hq, sq, sk)) < draw(st.sampled_from([0.2, 0.6, 0.9]))
    if draw(st.booleans()):
        kw["bias"] = rng.standard_normal(draw(st.sampled_from(
            [(b, hq, sq, sk), (1, hq, 1, sk), (sq, sk), (hq, sq, 1), (sk,)])))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.5, 5.0))
    if draw(st.booleans()):
        kw["alibi_slopes"] = rng.random(hq)
        # 'flash' (+slope*j) exists only in flash-attn's causal kernel: the band is j <= i + s
        # with no left bound (causal makes the right bound 0 whatever the window's right side)
        left, right = kw.get("window", (-1, -1))
        flash_ok = left == -1 and (causal is not False or right == 0)
        kw["alibi_form"] = draw(st.sampled_from(["symmetric", "flash"] if flash_ok else ["symmetric"]))
    if draw(st.booleans()):
        kw["sinks"] = rng.standard_normal(hq)
    if draw(st.booleans()):
        kw["head_map"] = rng.integers(0, hkv, hq)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.1, 3.0))
    variant = draw(st.sampled_from(["sdpa", "flash"]))
    if variant == "flash":
        kw["block_q"] = draw(st.integers(1, sq + 3))
        kw["block_k"] = draw(st.integers(1, sk + 3))
    return variant, make_qkv(seed, b, hq, sq, sk, d, hkv, dv), kw


@settings(max_examples=150)
@given(core_cases())
def test_random_cases_against_reference(case):
    variant, (q, k, v), kw = case
    out, lse = refattn.attention(q, k, v, variant=variant, return_lse=True, **kw)
    ref_kw = {n: x for n, x in kw.items() if n not in ("block_q", "block_k")}
    ref_out, ref_lse = reference_attention(q, k, v, **ref_kw)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


# -- identities -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, dict(causal=True, sinks=[0.1, -0.4, 1.0, 0.0, 2.0, -1.0]),
                                dict(window=(2, 1), softcap=3.0, alibi_slopes=np.linspace(.1, 1, 6))])
def test_gqa_equals_mha_with_repeated_kv_heads(kw):
    q, k, v = make_qkv(3, 2, 6, 5, 8, 4, 2)
    out, lse = refattn.attention(q, k, v, variant="gqa", return_lse=True, **kw)
    rk, rv = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    out_mha, lse_mha = refattn.attention(q, rk, rv, variant="mha", return_lse=True, **kw)
    assert_close(out, out_mha)
    assert_close(lse, lse_mha)


def test_head_map_equals_mha_with_gathered_kv_heads():
    q, k, v = make_qkv(4, 1, 5, 4, 6, 3, 3)
    head_map = np.array([2, 0, 0, 1, 2])  # uneven groups (QCQA)
    out = refattn.attention(q, k, v, head_map=head_map, causal=True)
    assert_close(out, refattn.attention(q, k[:, head_map], v[:, head_map], causal=True))


def test_mqa_equals_sdpa_and_mha_checks_heads():
    q, k, v = make_qkv(5, 2, 3, 4, 4, 2, 1)
    assert_close(refattn.attention(q, k, v, variant="mqa"), refattn.attention(q, k, v))
    assert_close(refattn.attention(q, k, v, variant="mqa"),
                 refattn.attention(q, np.repeat(k, 3, 1), np.repeat(v, 3, 1), variant="mha"))
    with pytest.raises(refattn.ShapeError, match=r"k: expected as many KV heads as query heads \(3\)"):
        refattn.attention(q, k, v, variant="mha")
    q2, k2, v2 = make_qkv(5, 1, 4, 3, 3, 2, 2)
    with pytest.raises(refattn.ShapeError, match="k: expected 1 KV head for variant 'mqa', got 2"):
        refattn.attention(q2, k2, v2, variant="mqa")
    with pytest.raises(refattn.ParameterError, match="head_map: not an input or parameter of variant 'mqa'"):
        refattn.attention(q, k, v, variant="mqa", head_map=[0, 0, 0])
    q3, k3, v3 = make_qkv(5, 1, 5, 3, 3, 2, 2)
    with pytest.raises(refattn.ShapeError, match="k: expected a number of KV heads dividing"):
        refattn.attention(q3, k3, v3, variant="gqa")


def test_permuting_keys_and_values_leaves_out_and_lse_unchanged():
    b, hq, sq, sk = 2, 4, 5, 9
    q, k, v = make_qkv(6, b, hq, sq, sk, 3, 2)
    rng = np.random.default_rng(7)
    mask = rng.random((b, 1, sq, sk)) < 0.7
    bias = rng.standard_normal((hq, sq, sk))
    kw = dict(softcap=2.0, sinks=rng.standard_normal(hq))
    out, lse = refattn.attention(q, k, v, mask=mask, bias=bias, return_lse=True, **kw)
    perm = rng.permutation(sk)
    out_p, lse_p = refattn.attention(q, k[:, :, perm], v[:, :, perm], mask=mask[..., perm],
                                     bias=bias[..., perm], return_lse=True, **kw)
    assert not np.array_equal(perm, np.arange(sk))
    assert_close(out_p, out)
    assert_close(lse_p, lse)


@pytest.mark.parametrize("kw", [{}, dict(window=(3, 0)), dict(alibi_slopes=[0.5, 0.125]),
                                dict(softcap=1.5, sinks=[0.2, -0.3])])
def test_decode_row_equals_last_row_of_full_causal(kw):
    q, k, v = make_qkv(8, 1, 2, 7, 7, 4, 2)
    full, full_lse = refattn.attention(q, k, v, causal=True, return_lse=True, **kw)
    row, row_lse = refattn.attention(q[:, :, -1:], k, v, causal=True, return_lse=True, **kw)
    assert_close(row, full[:, :, -1:])
    assert_close(row_lse, full_lse[:, :, -1:])
    # a few new queries against a longer cache: the last rows of full causal attention
    rows = refattn.attention(q[:, :, -3:], k, v, causal=True, **kw)
    assert_close(rows, full[:, :, -3:])


# -- flash: tile sizes and the running-max trap -----------------------------------------------------
@pytest.mark.parametrize("kw", [{}, dict(causal=True, sinks=[0.5, -1.0]),
                                dict(causal="top_left", window=(1, 2), softcap=1.5,
                                     alibi_slopes=[.3, .7],
                                     dropout_p=0.25, dropout_seed=11),
                                dict(mask=np.random.default_rng(0).random((5, 7)) < 0.5,
                                     bias=np.random.default_rng(1).standard_normal((2, 1, 7)))])
def test_flash_equals_sdpa_for_every_tile_size(kw):
    sq, sk = 5, 7
    q, k, v = make_qkv(9, 2, 2, sq, sk, 3, 1)
    want, want_lse = refattn.attention(q, k, v, return_lse=True, **kw)
    for bq in range(1, sq + 4):
        for bk in range(1, sk + 4):
            out, lse = refattn.attention(q, k, v, variant="flash", block_q=bq, block_k=bk,
                                         return_lse=True, **kw)
            assert_close(out, want)
            assert_close(lse, want_lse)


def tiled_forward(q, k, v, block_k, rule="running_max"):
    """A minimal FlashAttention forward over key tiles, written here, with a choice of rescaling rule:
    ``"running_max"`` (correct), ``"tile_max"`` (exponentiates a tile against its own max) or
    ``"no_rescale"`` (forgets to rescale what was accumulated when the max grows)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    m = np.full(q.shape[:-1] + (1,), -np.inf)
    l = np.zeros_like(m)
    acc = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for j0 in range(0, k.shape[2], block_k):
        s = scale * q @ np.swapaxes(k[:, :, j0:j0 + block_k], -1, -2)
        m_tile = s.max(axis=-1, keepdims=True)
        m_new = np.maximum(m, m_tile)
        e = np.exp(s - (m_tile if rule == "tile_max" else m_new))
        alpha = np.ones_like(m) if rule == "no_rescale" else np.exp(m - m_new)
        l = alpha * l + e.sum(axis=-1, keepdims=True)
        acc = alpha * acc + e @ v[:, :, j0:j0 + block_k]
        m = m_new
    return acc / l


def _trap_case(later_tile):
    """One query over two key tiles of 2; the later tile's max is ``"lower"`` or ``"higher"``."""
    big, small = [[3.0], [2.5]], [[-1.0], [0.5]]
    keys = big + small if later_tile == "lower" else small + big
    q = np.array([[[[2.0]]]])
    k = np.array([[keys]])
    v = np.array([[[[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, 1.0]]]])
    s = (q @ np.swapaxes(k, -1, -2))[0, 0, 0]
    assert (s[2:].max() < s[:2].max()) == (later_tile == "lower")
    return q, k, v


@pytest.mark.parametrize("later_tile", ["lower", "higher"])
def test_flash_running_max_trap(later_tile):
    q, k, v = _trap_case(later_tile)
    want, _ = reference_attention(q, k, v)
    assert_close(refattn.attention(q, k, v, variant="flash", block_q=1, block_k=2), want)
    assert_close(tiled_forward(q, k, v, 2), want)  # the test's own tiled forward is right
    # ... and the same check catches each wrong rescaling rule on the case that exposes it
    wrong_rule = {"lower": "tile_max", "higher": "no_rescale"}[later_tile]
    with pytest.raises(AssertionError):
        assert_close(tiled_forward(q, k, v, 2, rule=wrong_rule), want)
    # tile_max is only wrong where a later tile's max is below the running max
    if later_tile == "higher":
        assert_close(tiled_forward(q, k, v, 2, rule="tile_max"), want)


def test_flash_stats_running_max_is_monotone():
    from refattn.variants.core import flash_tiles, prepare, CoreParams
    q, k, v = _trap_case("lower")
    be = get_backend("numpy")
    pre = prepare(be, {"q": q, "k": k, "v": v}, CoreParams())
    stats = []
    flash_tiles(be, pre, 1, 2, stats)
    ms = [float(m[0, 0, 0, 0]) for _, _, m, _ in stats]
    assert ms == [3.0 * 2.0, 3.0 * 2.0]  # the running max stays at tile 1's max (scale 1/sqrt(1))


# -- merging partial states -------------------------------------------------------------------------
@pytest.mark.parametrize("split", [0, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_merge_states_of_two_key_halves_equals_whole(split, causal):
    """Two disjoint key sets (a mask each) merged with ``merge_states`` equal the whole; sinks are
    applied once, after merging. ``split=0`` makes the first half empty for every row, and causal
    bottom-right with Sq > Sk gives rows with no key in either half."""
    b, hq, sq, sk = 1, 2, 10, 8
    q, k, v = make_qkv(10, b, hq, sq, sk, 3, 2)
    first = np.arange(sk) < split
    be = get_backend("numpy")
    o_a, l_a = refattn.attention(q, k, v, mask=first, causal=causal, return_lse=True)
    o_b, l_b = refattn.attention(q, k, v, mask=~first, causal=causal, return_lse=True)
    o, l = be.merge_states(o_a, l_a, o_b, l_b)
    whole, whole_lse = refattn.attention(q, k, v, causal=causal, return_lse=True)
    assert_close(o, whole)
    assert_close(l, whole_lse)
    sinks = np.array([0.7, -0.2])
    with np.errstate(over="ignore"):
        o_sink = o / (1.0 + np.exp(sinks[None, :, None] - l))[..., None]
    assert_close(o_sink, refattn.attention(q, k, v, causal=causal, sinks=sinks))
    if split == 0:
        assert np.all(np.isneginf(l_a))


def test_merge_states_of_sliced_keys_equals_whole():
    q, k, v = make_qkv(11, 2, 2, 4, 9, 3, 1)
    be = get_backend("numpy")
    o_a, l_a = refattn.attention(q, k[:, :, :4], v[:, :, :4], return_lse=True)
    o_b, l_b = refattn.attention(q, k[:, :, 4:], v[:, :, 4:], return_lse=True)
    o, l = be.merge_states(o_a, l_a, o_b, l_b)
    ref_out, ref_lse = reference_attention(q, k, v)
    assert_close(o, ref_out)
    assert_close(l, ref_lse)


# -- output conventions -----------------------------------------------------------------------------
def test_lse_base_2_is_natural_lse_over_ln2():
    q, k, v = make_qkv(12, 1, 2, 6, 4, 3, 2)
    _, lse_e = refattn.attention(q, k, v, causal=True, return_lse=True)
    _, lse_2 = refattn.attention(q, k, v, causal=True, return_lse=True, lse_base=2)
    assert np.isneginf(lse_2[0, 0, 0])  # empty rows stay -inf
    assert_close(lse_2 * math.log(2.0), lse_e)
    _, ref_lse = reference_attention(q, k, v, causal=True)
    assert_close(2.0 ** lse_2[..., 2:], np.exp(ref_lse[..., 2:]))


def test_empty_row_nan():
    q, k, v = make_qkv(13, 1, 2, 6, 4, 3, 2)
    out, lse = refattn.attention(q, k, v, causal=True, empty_row="nan", return_lse=True)
    assert np.all(np.isnan(out[:, :, :2])) and np.all(np.isneginf(lse[:, :, :2]))
    assert np.all(np.isfinite(out[:, :, 2:]))
    zero = refattn.attention(q, k, v, causal=True)
    assert np.all(zero[:, :, :2] == 0)
    assert_close(out[:, :, 2:], zero[:, :, 2:])


@pytest.mark.parametrize("variant", ["sdpa", "flash"])
def test_layout_bshd_is_transposed_bhsd(variant):
    q, k, v = make_qkv(14, 2, 4, 5, 6, 3, 2, 2)
    mask = np.random.default_rng(0).random((2, 4, 5, 6)) < 0.8  # masks stay (B, H, Sq, Sk)
    kw = dict(causal=True, mask=mask, sinks=[0.1, 0.2, 0.3, 0.4])
    t = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3))  # noqa: E731
    out, lse = refattn.attention(t(q), t(k), t(v), variant=variant, layout="bshd", return_lse=True,
                                 **kw)
    ref_out, ref_lse = reference_attention(q, k, v, **kw)
    assert out.shape == (2, 5, 4, 2) and lse.shape == (2, 4, 5)
    assert_close(out, t(ref_out))
    assert_close(lse, ref_lse)


def test_inputs_are_never_modified():
    q, k, v = make_qkv(15, 2, 4, 5, 6, 3, 2)
    rng = np.random.default_rng(1)
    params = dict(scale=0.9, causal=True, window=(3, 1), mask=rng.random((2, 4, 5, 6)) < 0.8,
                  bias=rng.standard_normal((1, 4, 5, 6)), softcap=2.0, alibi_slopes=rng.random(4),
                  sinks=rng.standard_normal(4), head_map=np.array([1, 0, 1, 0]), dropout_p=0.3,
                  dropout_mask=rng.random((5, 6)) < 0.7)
    dout = rng.standard_normal((2, 4, 5, 3))
    arrays = dict(q=q, k=k, v=v, dout=dout, **{n: x for n, x in params.items()
                                                if isinstance(x, np.ndarray)})
    copies = {n: a.copy() for n, a in arrays.items()}
    out, lse = refattn.attention(q, k, v, return_lse=True, **params)
    refattn.attention(q, k, v, variant="flash", block_q=2, block_k=4, **params)
    grads = refattn.attention_backward(q, k, v, dout, **params)
    for n, a in arrays.items():
        assert np.array_equal(a, copies[n]), n
    for result in (out, lse, *grads[:3], *grads[3].values()):
        assert not any(np.shares_memory(result, a) for a in arrays.values())


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.float32, np.float16])
def test_other_dtypes_are_cast_to_float64(dtype):
    q, k, v = (np.round(2 * a).astype(dtype) if np.dtype(dtype).kind in "iu" else a.astype(dtype)
               for a in (np.abs(x) for x in make_qkv(16, 1, 2, 3, 4, 5, 2)))
    out, lse = refattn.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == lse.dtype == np.float64
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, causal=True)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    assert q.dtype == dtype  # the caller's arrays keep their dtype


# -- sinks ------------------------------------------------------------------------------------------
def test_sinks_take_their_share_and_lse_excludes_them():
    q, k, v = make_qkv(17, 1, 3, 4, 5, 3, 3)
    sinks = np.array([0.0, 1.5, -2.0])
    sk = k.shape[2]
    eye = np.broadcast_to(np.eye(sk), (1, 3, sk, sk))
    # with v = identity the output rows are the rows of P (the visible keys' probabilities)
    p_rows, lse = refattn.attention(q, k, eye, sinks=sinks, return_lse=True)
    sink_share = np.exp(sinks[None, :, None]) / (np.exp(lse) + np.exp(sinks[None, :, None]))
    assert_close(p_rows.sum(axis=-1) + sink_share, np.ones_like(lse))
    assert np.all(p_rows.sum(axis=-1) < 1)
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    assert_close(lse, np.log(np.exp(scores).sum(axis=-1)))  # no sink in the LSE
    assert_close(p_rows, reference_probabilities(q, k, sinks=sinks))


def test_alibi_flash_form_shifts_lse_by_slope_times_diagonal():
    """Under a causal mask ``+slope*j`` and ``-slope*|i+s-j|`` give the same output; the LSE of the
    flash form is larger by ``slope * (i + s)`` (DESIGN section 3)."""
    q, k, v = make_qkv(19, 1, 2, 4, 6, 3, 2)
    slopes = np.array([0.25, 0.8])
    for causal in ("bottom_right", "top_left"):
        sym, lse_sym = refattn.attention(q, k, v, causal=causal, alibi_slopes=slopes, return_lse=True)
        fl, lse_fl = refattn.attention(q, k, v, causal=causal, alibi_slopes=slopes,
                                       alibi_form="flash", return_lse=True)
        s = 2 if causal == "bottom_right" else 0
        assert_close(fl, sym)
        assert_close(lse_fl - lse_sym, slopes[None, :, None] * (np.arange(4) + s)[None, None, :])


def test_rows_of_p_sum_to_one_without_sinks():
    q, k, _ = make_qkv(18, 2, 2, 5, 6, 3, 2)
    sk = k.shape[2]
    eye = np.broadcast_to(np.eye(sk), (2, 2, sk, sk))
    p_rows = refattn.attention(q, k, eye, causal=True, window=(2, 0))
    assert_close(p_rows.sum(axis=-1), np.ones((2, 2, 5)))


def test_numpy_bools_and_integers_are_accepted_as_python_ones():
    q, k, v = make_qkv(20, 1, 2, 4, 6, 3, 2)
    want = refattn.attention(q, k, v, causal=True, window=(2, 0))
    assert_close(refattn.attention(q, k, v, causal=np.True_, window=np.array([2, 0])), want)
    assert_close(refattn.attention(q, k, v, variant="flash", block_q=np.int64(3), block_k=np.int32(2),
                                   causal=True, window=(2, 0)), want)

"""refattn.testing: assert_attention_close and the public Hypothesis strategies.

Journey 4 of JOURNEYS.md is run *as written*, with a fake ``my_attn`` that does what a correct
bf16 kernel does (bf16 inputs, exact attention, bf16 output); a kernel with a real bug must fail
with the metrics table.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as hst

import refattn
from refattn import numerics
from refattn.errors import ParameterError


def my_attn(q, k, v, **params):
    """A correct bf16 kernel: inputs and output stored in bf16, accumulation exact."""
    q, k, v = (numerics.round_to(a, "bf16") for a in (q, k, v))
    return numerics.round_to(refattn.attention(q, k, v, variant="gqa", **params), "bf16")


# -- journey 4, verbatim ----------------------------------------------------------------------------
from hypothesis import given  # noqa: E402
from refattn.testing import assert_attention_close, strategies as st  # noqa: E402


@given(st.attention_inputs(variant="gqa", max_seq=256))
def test_my_kernel(case):
    assert_attention_close(my_attn(**case.kwargs), variant="gqa", dtype="bf16", **case.kwargs)
# ---------------------------------------------------------------------------------------------------


def off_by_one_window(q, k, v, window=None, **params):
    if window is not None and window[0] > 0:
        window = (window[0] + 1, window[1])
    return my_attn(q, k, v, window=window, **params)


def test_buggy_kernel_fails_with_table():
    rng = np.random.default_rng(0)
    case = dict(q=rng.standard_normal((1, 4, 40, 16)), k=rng.standard_normal((1, 2, 40, 16)),
                v=rng.standard_normal((1, 2, 40, 16)), causal=True, window=(6, 0))
    with pytest.raises(AssertionError) as info:
        assert_attention_close(off_by_one_window(**case), variant="gqa", dtype="bf16", **case)
    msg = str(info.value)
    assert "FAIL: gqa against float64, bf16 baseline" in msg
    assert "output  max_abs" in msg and "FAIL" in msg.splitlines()[3]
    assert "one key left of the window's left edge" in msg


def test_buggy_kernel_is_found_by_the_strategy():
    found = []

    @settings(max_examples=100, database=None, suppress_health_check=list(HealthCheck))
    @given(st.attention_inputs(variant="gqa", max_seq=64))
    def run(case):
        try:
            assert_attention_close(off_by_one_window(**case.kwargs), variant="gqa", dtype="bf16",
                                   **case.kwargs)
        except AssertionError:
            found.append(case)
            raise

    with pytest.raises(AssertionError):
        run()
    shrunk = found[-1]
    assert shrunk.kwargs["window"] is not None and shrunk.kwargs["window"][0] >= 0


def test_outputs_lse_and_grads():
    rng = np.random.default_rng(1)
    case = dict(q=rng.standard_normal((1, 2, 12, 8)), k=rng.standard_normal((1, 2, 12, 8)),
                v=rng.standard_normal((1, 2, 12, 8)), causal=True)
    r = {n: numerics.round_to(case[n], "fp16") for n in "qkv"}
    out, lse = refattn.attention(r["q"], r["k"], r["v"], causal=True, return_lse=True)
    assert_attention_close((numerics.round_to(out, "fp16"), lse), variant="sdpa", dtype="fp16",
                           **case)
    with pytest.raises(AssertionError, match="lse"):
        assert_attention_close((numerics.round_to(out, "fp16"), lse + 0.01), dtype="fp16", **case)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv, _ = refattn.attention_backward(r["q"], r["k"], r["v"], numerics.round_to(dout, "fp16"),
                                               causal=True)
    grads = {n: numerics.round_to(g, "fp16") for n, g in (("dq", dq), ("dk", dk), ("dv", dv))}
    assert_attention_close(grads, dtype="fp16", dout=dout, **case)
    with pytest.raises(AssertionError, match="dk"):
        assert_attention_close({**grads, "dk": 1.05 * grads["dk"]}, dtype="fp16", dout=dout, **case)
    with pytest.raises(ParameterError, match="dout: gradients dq/dk/dv were given"):
        assert_attention_close(grads, dtype="fp16", **case)
    with pytest.raises(ParameterError, match="actual: unknown output 'dx'"):
        assert_attention_close({"dx": out}, dtype="fp16", **case)


@settings(max_examples=60, deadline=None)
@given(st.attention_inputs(variant="gqa", max_seq=32, max_heads=8))
def test_strategy_gqa_shapes(case):
    q, k, v = case.kwargs["q"], case.kwargs["k"], case.kwargs["v"]
    assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape[:3] + (k.shape[3],)
    assert 1 <= q.shape[2] <= 32 and 1 <= k.shape[2] <= 32
    assert set(case.kwargs) == {"q", "k", "v", "causal", "alignment", "window", "mask"}
    assert "array(" not in repr(case) and f"seed={case.seed}" in repr(case)


def test_strategy_covers_groups_empty_rows_and_knobs():
    seen = {"group>1": False, "group=1": False, "empty rows": False, "window": False,
            "top_left": False, "softcap": False}

    @settings(max_examples=150, database=None, deadline=None)
    @given(st.attention_inputs(variant="sdpa", max_seq=16, softcap=True, alibi=True, scale=True))
    def run(case):
        kw = case.kwargs
        g = kw["q"].shape[1] // kw["k"].shape[1]
        seen["group>1"] |= g > 1
        seen["group=1"] |= g == 1
        seen["window"] |= kw["window"] is not None
        seen["top_left"] |= kw["alignment"] == "top_left"
        seen["softcap"] |= kw["softcap"] is not None
        if kw["mask"] is not None:
            seen["empty rows"] |= bool((~kw["mask"].any(axis=-1)).any())
        refattn.attention(**kw)  # every drawn case is valid input

    run()
    assert all(seen.values()), seen


@pytest.mark.parametrize("variant, rel", [("mha", lambda hq, hkv: hq == hkv),
                                          ("mqa", lambda hq, hkv: hkv == 1)])
def test_strategy_head_relations(variant, rel):
    @settings(max_examples=20, database=None)
    @given(st.attention_inputs(variant=variant, max_seq=8, mask=False, window=False,
                               dtype="bf16"))
    def run(case):
        q, k = case.kwargs["q"], case.kwargs["k"]
        assert rel(q.shape[1], k.shape[1])
        assert numerics.representable(q, "bf16")
        assert set(case.kwargs) == {"q", "k", "v", "causal", "alignment"}

    run()


def test_strategy_argument_errors():
    with pytest.raises(ParameterError, match=r"max_seq: expected an integer >= min_seq \(1\), got 0"):
        st.attention_inputs(max_seq=0)
    with pytest.raises(refattn.UnknownVariant):
        st.attention_inputs(variant="no_such_variant")
    with pytest.raises(ParameterError, match="dtype: expected one of"):
        st.attention_inputs(dtype="bf17")


def test_importing_testing_does_not_import_hypothesis():
    import subprocess
    import sys
    code = ("import sys, refattn.testing; print('hypothesis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=5)
@given(hst.tuples(st.attention_inputs(variant="mqa", max_seq=4), hst.integers(0, 3)))
def test_hypothesis_strategies_are_composable(pair):
    case, n = pair
    assert case.variant == "mqa" and 0 <= n <= 3 and case.kwargs["k"].shape[1] == 1

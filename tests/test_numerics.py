"""refattn.numerics: rounding, ULPs, the same-precision baseline, metrics and the verdict rule.

Expected values come from formulas written here (a textbook round-to-nearest-even on the binary
expansion, a float32 per-row loop of the baseline's definition, hand-computed metrics), not from
the code under test.
"""

import math

import numpy as np
import pytest

import refattn
from refattn import numerics as N
from refattn.errors import ParameterError, ShapeError

#: (mantissa bits, minimum normal exponent, largest finite value) -- from the format definitions
FORMATS = {
    "bf16": (7, -126, (2 - 2 ** -7) * 2.0 ** 127),
    "fp16": (10, -14, 65504.0),
    "fp8_e4m3": (3, -6, 448.0),
    "fp8_e5m2": (2, -14, 57344.0),
    "fp32": (23, -126, (2 - 2 ** -23) * 2.0 ** 127),
}


def rne(x, dtype):
    """Round-to-nearest-even of float64 values to a binary format, from its definition."""
    nmant, emin, _ = FORMATS[dtype]
    out = np.empty_like(x)
    for n, val in enumerate(x.ravel()):
        if val == 0:
            out.flat[n] = val
            continue
        e = max(math.floor(math.log2(abs(val))), emin)
        ulp = 2.0 ** (e - nmant)
        lo = math.floor(val / ulp)
        frac = val / ulp - lo
        if frac > 0.5 or (frac == 0.5 and lo % 2 == 1):
            lo += 1
        out.flat[n] = lo * ulp
    return out


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_round_to_matches_definition(dtype):
    rng = np.random.default_rng(0)
    _, emin, top = FORMATS[dtype]
    x = np.concatenate([rng.standard_normal(400) * 3, rng.uniform(-top / 2, top / 2, 50),
                        rng.standard_normal(50) * 2.0 ** (emin - 1)])  # subnormals too
    np.testing.assert_array_equal(N.round_to(x, dtype), rne(x, dtype))


def test_round_to_ties_to_even_and_overflow():
    # 1 + 2**-8 is halfway between 1 and 1 + 2**-7 in bf16: the even mantissa (1.0) wins
    assert N.round_to(1 + 2 ** -8, "bf16") == 1.0
    assert N.round_to(1 + 3 * 2 ** -8, "bf16") == 1 + 2 ** -6
    assert N.round_to(2049.0, "fp16") == 2048.0
    # float8_e4m3fn has no infinity: beyond the range is NaN (as a device cast gives)
    assert np.isnan(N.round_to(500.0, "fp8_e4m3"))
    assert N.round_to(70000.0, "fp16") == np.inf


def test_canonical_names_and_errors():
    assert N.canonical("bf16") == N.canonical("bfloat16") == "bfloat16"
    assert N.canonical(np.float16) == "float16"
    assert N.canonical("e4m3") == "float8_e4m3fn"
    with pytest.raises(ParameterError, match=r"dtype: expected one of .*got 'bf17'"):
        N.canonical("bf17")
    torch = pytest.importorskip("torch", reason="torch dtypes need PyTorch (the peers extra)")
    assert N.canonical(torch.bfloat16) == "bfloat16"
    assert N.canonical(torch.float8_e5m2) == "float8_e5m2"


@pytest.mark.parametrize("dtype, np_type", [("fp16", np.float16), ("fp32", np.float32)])
def test_spacing_matches_numpy(dtype, np_type):
    x = np.array([1.0, 1.5, 3.0, 1e-3, 6e-5, 1e-6, 1000.0, -7.25], dtype=np_type)
    np.testing.assert_array_equal(N.spacing(x.astype(np.float64), dtype),
                                  np.spacing(np.abs(x)).astype(np.float64))
    assert N.spacing(0.0, dtype) == np.finfo(np_type).smallest_subnormal


def test_spacing_bf16_and_fp8_by_hand():
    assert N.spacing(1.0, "bf16") == 2 ** -7
    assert N.spacing(3.0, "bf16") == 2 ** -6
    assert N.spacing(1.0, "fp8_e4m3") == 2 ** -3
    assert N.spacing(1e-9, "fp8_e4m3") == 2 ** -9  # smallest subnormal of e4m3


def test_infer_dtype():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100)
    assert N.infer_dtype(N.round_to(x, "bf16")) == "bfloat16"
    assert N.infer_dtype(N.round_to(x, "fp16")) == "float16"
    assert N.infer_dtype(N.round_to(x, "fp32")) == "float32"
    assert N.infer_dtype(N.round_to(x, "fp8_e4m3")) == "float8_e4m3fn"
    assert N.infer_dtype(x) == "float64"


# -- metrics and verdict -----------------------------------------------------------------------------
def test_metrics_by_hand():
    ref = np.array([[1.0, -2.0], [0.0, 4.0]])
    act = np.array([[1.5, -2.0], [0.25, 3.0]])
    m = N.metrics(act, ref, dtype="bf16", threshold=0.3)
    assert m["max_abs"] == 1.0 and m["worst_index"] == (1, 1)
    assert m["worst_actual"] == 3.0 and m["worst_expected"] == 4.0
    assert m["max_rel"] == math.inf  # 0.25 where the reference is 0: a relative error is unbounded
    m_nz = N.metrics(act[:, 1], ref[:, 1])
    assert m_nz["max_rel"] == 0.25  # 1 / 4 beats 0 / 2
    assert m["normwise_rel"] == pytest.approx(math.sqrt(0.25 + 0.0625 + 1) / math.sqrt(21))
    assert m["mismatches"] == 2
    # ULPs count the bf16 values between: 0.25 = 2**-2 is bf16 bit pattern 125 << 7 = 16000 above
    # +0; 1.5 vs 1.0 and 3 vs 4 are 64 apart (half a binade of 128 mantissa steps)
    assert m["max_ulp"] == 16000.0
    assert (m["nan"], m["inf"], m["nonfinite_mismatch"]) == ([0, 0], [0, 0], 0)


def test_metrics_ulp_and_nans():
    ref = np.array([1.0, 2.0, 3.0])
    act = ref + np.array([2 ** -7, 0, 2 * 2 ** -6])
    assert N.metrics(act, ref, dtype="bf16")["max_ulp"] == 2.0
    a = np.array([np.nan, 1.0, np.inf])
    r = np.array([np.nan, 1.0, 1.0])
    m = N.metrics(a, r, dtype="fp16")
    assert (m["nan"], m["inf"], m["max_abs"], m["worst_index"]) == ([1, 1], [1, 0], math.inf, (2,))
    assert m["nonfinite_mismatch"] == 1 and m["normwise_rel"] == math.inf
    m = N.metrics(np.array([np.nan]), np.array([0.0]))
    assert m["max_abs"] == math.inf
    with pytest.raises(ShapeError, match=r"out: expected shape \(3,\) as the reference, got \(2,\)"):
        N.metrics(np.zeros(2), np.zeros(3))


def test_verdict_rule_boundary_and_defaults():
    ref = np.array([0.0, 0.0, 0.0, 4.0])  # max |ref| = 4: atol counts in units of it
    base = np.array([0.0, 0.01, 0.0, 4.0])
    atol = 2.0 ** -8  # eps(bf16) / 2
    assert N.defaults("bf16") == (2.0, atol)
    assert N.defaults("fp16") == (2.0, 2.0 ** -11)
    assert N.defaults("fp8_e4m3") == (2.0, 2.0 ** -4)
    assert N.defaults("fp8_e5m2") == (2.0, 2.0 ** -3)
    assert N.defaults("fp32") == (2.0, 2.0 ** -24)
    allowed = 2 * 0.01 + atol * 4.0
    at = N.compare(np.array([0, 0, allowed, 4]), ref, base, dtype="bf16")
    assert at["verdict"] == "PASS" and at["allowed"] == allowed and at["mismatches"] == 0
    assert at["reference_max"] == 4.0 and at["reason"] is None
    above = N.compare(np.array([0, 0, np.nextafter(allowed, 1), 4]), ref, base, dtype="bf16")
    assert above["verdict"] == "FAIL" and above["mismatches"] == 1 and above["worst_index"] == (2,)
    loose = N.compare(np.array([0, 0, 0.05, 4]), ref, base, dtype="bf16", factor=5, atol=0)
    assert loose["verdict"] == "PASS" and loose["allowed"] == 0.05
    nan = N.compare(np.array([np.nan, 0, 0, 4]), ref, base, dtype="bf16", factor=1e9)
    assert nan["verdict"] == "FAIL"
    # an allowance that reaches max |ref| would pass zeros: INCONCLUSIVE, not PASS
    zeros = N.compare(np.zeros(4), ref, base, dtype="bf16", factor=400)
    assert zeros["verdict"] == "INCONCLUSIVE" and "would pass" in zeros["reason"]
    assert N.overall(["PASS", "INCONCLUSIVE"]) == "INCONCLUSIVE" and N.overall(["INCONCLUSIVE", "FAIL"]) == "FAIL"
    # an all-zero reference: no magnitude, so atol adds nothing and exact zeros pass
    exact = N.compare(np.zeros(3), np.zeros(3), np.zeros(3), dtype="bf16")
    assert exact["verdict"] == "PASS" and exact["allowed"] == 0.0
    with pytest.raises(ParameterError, match="factor: expected a finite number >= 0, got -1"):
        N.compare(ref, ref, base, dtype="bf16", factor=-1)


def test_variant_declared_verdict(monkeypatch):
    import dataclasses
    from refattn import variants

    @dataclasses.dataclass(frozen=True)
    class Declaring(variants.Variant):
        verdict: dict = dataclasses.field(default_factory=lambda: {"factor": 3, "atol": {"bf16": 0.1}})

    sdpa = variants.get("sdpa")
    fields = {f.name: getattr(sdpa, f.name) for f in dataclasses.fields(variants.Variant)}
    fields.update(name="declaring_test_variant", aliases=())
    fields.pop("verdict", None)  # Variant.verdict exists now: keep the subclass's declaration
    monkeypatch.setitem(variants._REGISTRY, "declaring_test_variant", Declaring(**fields))
    assert N.defaults("bf16", "declaring_test_variant") == (3.0, 0.1)
    assert N.defaults("fp16", "declaring_test_variant") == (3.0, 2.0 ** -11)
    assert N.defaults("bf16", "sdpa") == (2.0, 2.0 ** -8)


# -- the baseline --------------------------------------------------------------------------------------
def _case(seed=0, b=1, hq=2, hkv=1, sq=9, sk=12, d=8, **params):
    rng = np.random.default_rng(seed)
    return dict(q=rng.standard_normal((b, hq, sq, d)), k=rng.standard_normal((b, hkv, sk, d)),
                v=rng.standard_normal((b, hkv, sk, d)), **params)


def loop_baseline(case, dtype, softcap=None, window=None):
    """The same-precision baseline from its definition, one row at a time in float32."""
    q, k, v = (rne(case[n], dtype).astype(np.float32) for n in ("q", "k", "v"))
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = np.float32(1 / math.sqrt(d))
    out = np.zeros((b, hq, sq, v.shape[-1]))
    for bb in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(sq):
                s = np.array([scale * np.dot(q[bb, h, i], k[bb, kv, j]) for j in range(sk)],
                             dtype=np.float32)
                if softcap is not None:
                    s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
                pos = i + sk - sq
                keep = np.ones(sk, bool) if window is None else (
                    (np.arange(sk) >= pos - window[0]) & (np.arange(sk) <= pos + window[1]))
                s = np.where(keep, s, -np.inf).astype(np.float32)
                e = np.exp(s - s.max())
                p = rne((e / e.sum()).astype(np.float64), dtype).astype(np.float32)
                out[bb, h, i] = p @ v[bb, kv]
    return rne(out, dtype)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8_e4m3"])
def test_baseline_matches_definition(dtype):
    case = _case(softcap=4.0, window=(3, 2))
    base = N.baseline(case, dtype=dtype)["out"]
    want = loop_baseline(case, dtype, softcap=4.0, window=(3, 2))
    # float32 sums in another order may round a product differently: at most one ulp apart, and
    # nearly always identical
    assert np.all(np.abs(base - want) <= N.spacing(want, dtype))
    assert np.mean(base == want) > 0.9
    assert N.representable(base, dtype)


def test_baseline_nonzero_for_inputs_already_in_dtype():
    case = _case(seed=3, sq=16, sk=16)
    case = {n: (N.round_to(a, "bf16") if n in "qkv" else a) for n, a in case.items()}
    ref = N.reference(case)["out"]
    same = np.abs(N.baseline(case, dtype="bf16")["out"] - ref).max()
    weak = np.abs(N.baseline(case, dtype="bf16", mode="inputs_only")["out"] - ref).max()
    assert same > 0 and weak > 0
    # at most the rounding of P (<= eps/2 relative on each p) plus the output's half ulp
    assert same < 2 ** -8 * np.abs(case["v"]).max() + 2 ** -8 * np.abs(ref).max()


def test_inputs_only_is_rounding_at_the_boundaries():
    case = _case(seed=4, causal=True)
    r = {n: N.round_to(case[n], "fp16") for n in "qkv"}
    want = N.round_to(refattn.attention(r["q"], r["k"], r["v"], causal=True), "fp16")
    np.testing.assert_array_equal(N.baseline(case, dtype="fp16", mode="inputs_only")["out"], want)


def test_baseline_fp32_is_close_and_flash_uses_sdpa():
    case = _case(seed=5, sq=20, sk=20, causal=True)
    ref = N.reference(case)
    b32 = N.baseline(case, dtype="fp32")
    assert 0 < np.abs(b32["out"] - ref["out"]).max() < 1e-5
    assert np.abs(b32["lse"] - ref["lse"]).max() < 1e-5
    flash = N.baseline({**case, "block_q": 4, "block_k": 8}, variant="flash", dtype="bf16")
    np.testing.assert_array_equal(flash["out"], N.baseline(case, dtype="bf16")["out"])


def test_baseline_backward():
    case = _case(seed=6, hq=4, hkv=2, sq=10, sk=14, softcap=5.0, causal=True)
    dout = np.random.default_rng(7).standard_normal(case["q"].shape)
    ref = N.reference(case, dout=dout)
    base = N.baseline(case, dtype="bf16", dout=dout)
    for name in ("dq", "dk", "dv"):
        assert N.representable(base[name], "bf16")
        rel = np.linalg.norm(base[name] - ref[name]) / np.linalg.norm(ref[name])
        assert 1e-4 < rel < 3e-2, (name, rel)  # bf16-sized, not zero, not wrong
        b32 = N.baseline(case, dtype="fp32", dout=dout)[name]
        assert np.linalg.norm(b32 - ref[name]) / np.linalg.norm(ref[name]) < 1e-5


def test_baseline_errors():
    case = _case()
    with pytest.raises(ParameterError, match="baseline: expected one of"):
        N.baseline(case, mode="fast")
    with pytest.raises(ParameterError, match=r"q: expected the case to hold the inputs of variant 'sdpa' \(q, k, v\)"):
        N.baseline({"k": case["k"], "v": case["v"]})


def test_compare_all_and_table():
    case = _case(seed=8)
    ref = N.reference(case)
    base = N.baseline(case, dtype="bf16")
    res = N.compare_all({"out": base["out"], "lse": base["lse"]}, ref, base, dtype="bf16")
    assert res["verdict"] == "PASS" and set(res["results"]) == {"out", "lse"}
    table = N.format_table(res["results"])
    assert table.splitlines()[0].split()[0] == "output" and "PASS" in table
    with pytest.raises(ParameterError, match="dq: no reference for this output"):
        N.compare_all({"dq": ref["out"]}, ref, base, dtype="bf16")


def test_a_non_finite_baseline_is_an_error_not_an_infinite_allowance():
    """An overflowing baseline (fp8 inputs beyond +-448 become NaN) would allow inf: any output,
    NaN included, would pass. It is an error naming the baseline instead."""
    from refattn.errors import ParameterError
    ref = np.array([1.0, 2.0])
    with pytest.raises(ParameterError, match="baseline"):
        N.compare(np.array([np.nan, np.nan]), ref, np.array([np.nan, 2.0]), dtype="fp8_e4m3")
    rng = np.random.default_rng(3)
    q, k, v = (300 * rng.standard_normal((1, 1, 8, 4)) for _ in range(3))
    with pytest.raises(ParameterError, match=r"^q: expected values a fp8_e4m3 kernel can hold"):
        N.baseline(dict(q=q, k=k, v=v), dtype="fp8_e4m3")  # inputs beyond 448: no baseline


def test_flash_baseline_is_rounded_with_and_without_gradients():
    """flash's forward does not call attend but its backward does: the out baseline must still be
    the rounded sdpa emulation when gradients are compared (it was exact float64, allowance atol)."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 16, 8)) for _ in range(3))
    case = dict(q=q, k=k, v=v, causal=True)
    ref = N.reference(case, variant="flash")["out"]
    plain = N.baseline(case, variant="flash", dtype="bf16")["out"]
    with_grad = N.baseline(case, variant="flash", dtype="bf16", dout=np.ones_like(ref))["out"]
    assert np.abs(plain - ref).max() > 1e-4  # bf16 rounding is visible
    np.testing.assert_array_equal(with_grad, plain)

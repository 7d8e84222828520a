"""The linear family: linear, performer, gla, simple_gla, retention, delta_rule, gated_delta_rule,
rwkv -- and the backend primitive ``linear_scan`` they run on.

Every expected value here comes from code written in this file from the definitions (VARIANTS E):
loops over (batch, head, step) with the state as a matrix, direct O(L^2) sums, central finite
differences, mpmath for sums whose exponentials overflow float64. Nothing is computed by the code
under test except the numbers under test. Float64 agreement is normwise relative
``||a - b|| / ||b|| <= 1e-12`` unless a test says otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import refattn
from refattn import backends
from refattn.errors import DTypeError, ParameterError, ShapeError
from fd_variants import fd_grad

TOL = 1e-12
BACKENDS = ["numpy"] + (["numba"] if "numba" in backends.available() else [])
GATED = ("gla", "simple_gla", "retention", "delta_rule", "gated_delta_rule")


def close(got, want, tol=TOL, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
    assert err <= tol, f"{what}: normwise {err:.3g} > {tol:g}"


# -- the definitions, written out ----------------------------------------------------------------------
def loop_scan(q, k, v, *, alpha=None, beta=None, scale=1.0, s0=None):
    """``S_t = A_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T`` (``A_t = diag(alpha_t)``, beta 1 and
    no projection without the delta rule), ``o_t = scale S_t^T q_t``; one (b, h) at a time."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    o = np.zeros((b, h, n, dv))
    final = np.zeros((b, h, dk, dv))
    for bi in range(b):
        for hi in range(h):
            S = np.zeros((dk, dv)) if s0 is None else s0[bi, hi].copy()
            for t in range(n):
                kt, vt = k[bi, hi, t], v[bi, hi, t]
                A = np.eye(dk) if alpha is None else np.diag(np.broadcast_to(alpha[bi, hi, t], (dk,)))
                if beta is None:
                    S = A @ S + np.outer(kt, vt)
                else:
                    bt = beta[bi, hi, t]
                    S = (np.eye(dk) - bt * np.outer(kt, kt)) @ (A @ S) + bt * np.outer(kt, vt)
                o[bi, hi, t] = scale * (S.T @ q[bi, hi, t])
            final[bi, hi] = S
    return o, final


def gated_reference(name, arrays, scale=None, s0=None, qk_l2norm=False):
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    b, h, n, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    alpha = None
    if name in ("gla", "simple_gla", "gated_delta_rule"):
        alpha = np.exp(arrays["g"])
    elif name == "retention":
        alpha = np.broadcast_to((1 - 2.0 ** (-5 - np.arange(h)))[None, :, None], (b, h, n))
    if qk_l2norm:
        q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
        k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    return loop_scan(q, k, v, alpha=alpha, beta=arrays.get("beta"), scale=scale, s0=s0)


def make_gated(name, rng, b=2, h=3, n=23, dk=5, dv=4, gate_scale=1.0):
    q, k = rng.standard_normal((2, b, h, n, dk))
    v = rng.standard_normal((b, h, n, dv))
    arrays = {"q": q, "k": k, "v": v}
    if name in ("delta_rule", "gated_delta_rule"):
        arrays["k"] = k / np.linalg.norm(k, axis=-1, keepdims=True)
        arrays["beta"] = rng.uniform(0.1, 0.9, (b, h, n))
    if name == "gla":
        arrays["g"] = -gate_scale * rng.uniform(0.0, 0.5, (b, h, n, dk))
    if name in ("simple_gla", "gated_delta_rule"):
        arrays["g"] = -gate_scale * rng.uniform(0.0, 0.5, (b, h, n))
    return arrays


def call(name, arrays, backend="numpy", **params):
    return refattn.attention(variant=name, backend=backend, **arrays, return_final_state=True,
                             **params)


# -- the primitive ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [None, "head", "dim"])
@pytest.mark.parametrize("delta", [False, True])
def test_linear_scan_every_form_equals_the_loop(backend, gate, delta):
    rng = np.random.default_rng(3)
    b, h, n, dk, dv = 2, 2, 29, 4, 3
    q, k = rng.standard_normal((2, b, h, n, dk))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((b, h, n, dv))
    g = None if gate is None else -rng.uniform(0, 1, (b, h, n) + ((dk,) if gate == "dim" else ()))
    beta = rng.uniform(0, 1, (b, h, n)) if delta else None
    s0 = rng.standard_normal((b, h, dk, dv))
    want_o, want_s = loop_scan(q, k, v, alpha=None if g is None else np.exp(g), beta=beta, s0=s0)
    be = backends.get(backend)
    for form, chunk in (("recurrent", 64), ("chunked", 1), ("chunked", 4), ("chunked", 7),
                        ("chunked", 29), ("chunked", 100), ("parallel", 64)):
        o, s = be.linear_scan(q, k, v, decay=g, beta=beta, form=form, chunk_size=chunk,
                              initial_state=s0)
        close(o, want_o, what=f"o {form} {chunk}")
        close(s, want_s, what=f"state {form} {chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scan_empty_and_one_step(backend):
    be = backends.get(backend)
    rng = np.random.default_rng(0)
    s0 = rng.standard_normal((1, 2, 3, 2))
    for form in ("recurrent", "chunked", "parallel"):
        o, s = be.linear_scan(np.zeros((1, 2, 0, 3)), np.zeros((1, 2, 0, 3)), np.zeros((1, 2, 0, 2)),
                              decay=np.zeros((1, 2, 0)), form=form, initial_state=s0)
        assert o.shape == (1, 2, 0, 2)
        np.testing.assert_array_equal(s, s0)  # no step: the state is the initial state
        q, k, v = rng.standard_normal((1, 2, 1, 3)), rng.standard_normal((1, 2, 1, 3)), rng.standard_normal((1, 2, 1, 2))
        o, s = be.linear_scan(q, k, v, form=form)
        close(s[0, :], np.einsum("hk,hv->hkv", k[0, :, 0], v[0, :, 0]))
        close(o[0, :, 0], np.einsum("hk,hkv->hv", q[0, :, 0], s[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strong_decay_chunked_equals_recurrent(backend):
    """Cumulative log-gates far beyond exp's range inside one chunk (|G| up to ~3000): the chunked
    and parallel forms form exp(G_t - G_i) per pair, so nothing overflows; per-key-dim gates take
    numba's exact path (|G| > 100) as well as its factorised one (small gates)."""
    rng = np.random.default_rng(1)
    b, h, n, dk, dv = 1, 2, 64, 4, 3
    q, k = rng.standard_normal((2, b, h, n, dk))
    v = rng.standard_normal((b, h, n, dv))
    be = backends.get(backend)
    for g in (-rng.uniform(20, 80, (b, h, n)), -rng.uniform(20, 80, (b, h, n, dk)),
              -rng.uniform(0, 3, (b, h, n, dk))):
        want = loop_scan(q, k, v, alpha=np.exp(g))
        for form in ("chunked", "parallel"):
            o, s = be.linear_scan(q, k, v, decay=g, form=form, chunk_size=64)
            assert np.all(np.isfinite(o))
            close(o, want[0], what=form)
            close(s, want[1], what=form)


# -- every form of every gated variant, against the loop ----------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", GATED)
def test_gated_variants_equal_the_loop_in_every_form(name, backend):
    rng = np.random.default_rng(7)
    arrays = make_gated(name, rng)
    s0 = rng.standard_normal((2, 3, 5, 4))
    want_o, want_s = gated_reference(name, arrays, s0=s0)
    for form, chunk in (("recurrent", 64), ("chunked", 5), ("chunked", 16), ("parallel", 64)):
        out, state = call(name, arrays, backend, form=form, chunk_size=chunk, initial_state=s0)
        close(out, want_o, what=f"{name} {form} {chunk}")
        close(state, want_s, what=f"{name} state {form}")


@pytest.mark.parametrize("name", GATED)
def test_gated_scale_layout_and_streaming(name):
    rng = np.random.default_rng(11)
    arrays = make_gated(name, rng, n=20)
    out, state = call(name, arrays, scale=0.7)
    close(out, gated_reference(name, arrays, scale=0.7)[0])
    # bshd (fla's layout): every per-step array swapped, the output swapped back
    bshd = {n: np.ascontiguousarray(a.swapaxes(1, 2)) for n, a in arrays.items()}
    out2, state2 = call(name, bshd, layout="bshd", scale=0.7)
    np.testing.assert_allclose(out2.swapaxes(1, 2), out, rtol=0, atol=1e-13)
    np.testing.assert_allclose(state2, state, rtol=0, atol=1e-13)
    # the final state of the first part, fed as the initial state, continues the sequence
    first = {n: a[:, :, :9] for n, a in arrays.items()}
    rest = {n: a[:, :, 9:] for n, a in arrays.items()}
    o1, s1 = call(name, first, form="chunked", chunk_size=np.int64(4))
    o2, s2 = call(name, rest, initial_state=s1, form="parallel")
    full_o, full_s = call(name, arrays)
    close(np.concatenate([o1, o2], axis=2), full_o)
    close(s2, full_s)


def test_retention_gammas_are_retnets():
    from refattn.variants.linear import retention_gammas
    np.testing.assert_array_equal(retention_gammas(4), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256])


def test_delta_rule_qk_l2norm_is_flas():
    rng = np.random.default_rng(5)
    arrays = make_gated("gated_delta_rule", rng)
    arrays["k"] = 3 * rng.standard_normal(arrays["k"].shape)  # not unit: the option normalises
    out, state = call("gated_delta_rule", arrays, qk_l2norm=True, form="chunked", chunk_size=8)
    want_o, want_s = gated_reference("gated_delta_rule", arrays, qk_l2norm=True)
    close(out, want_o)
    close(state, want_s)


# -- linear attention --------------------------------------------------------------------------------
def phi_reference(x, name):
    if name == "elu+1":
        return np.where(x > 0, x + 1, np.exp(x))  # elu(x) + 1
    return np.maximum(x, 0) if name == "relu" else x


def linear_reference(q, k, v, *, feature_map="elu+1", causal=False, normalize=True, eps=1e-6,
                     scale=1.0):
    """Direct sums over keys: ``num_i = sum_j phi(q_i).phi(k_j) v_j`` over ``j <= i`` (causal) or all
    ``j``; ``out = scale num / (scale den + eps)``."""
    fq, fk = phi_reference(q, feature_map), phi_reference(k, feature_map)
    w = np.einsum("bhid,bhjd->bhij", fq, fk) * scale
    if causal:
        w = np.tril(w)
    num = w @ v
    if not normalize:
        return num
    return num / (w.sum(-1, keepdims=True) + eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature_map", ["elu+1", "relu", "identity"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_the_direct_sums(backend, feature_map, causal, normalize):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 17, 4)) for _ in range(3))
    if feature_map == "identity" and normalize:  # keep the normaliser away from 0
        q, k = np.abs(q) + 0.5, np.abs(k) + 0.5
    want = linear_reference(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize,
                            scale=0.8)
    for form, chunk in (("recurrent", 64), ("chunked", 5), ("parallel", 64)):
        got = refattn.attention(q, k, v, variant="linear", backend=backend, feature_map=feature_map,
                                causal=causal, normalize=normalize, scale=0.8, form=form,
                                chunk_size=chunk)
        close(got, want, what=f"{form}")


def test_linear_eps_and_state_with_the_normaliser_column():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 9, 3)) for _ in range(3))
    got = refattn.attention(q, k, v, variant="linear", eps=0.5, causal=True)
    close(got, linear_reference(q, k, v, eps=0.5, causal=True))
    _, state = refattn.attention(q, k, v, variant="linear", return_final_state=True)
    fk = phi_reference(k, "elu+1")
    close(state[..., :3], np.einsum("bhtk,bhtv->bhkv", fk, v))  # S
    close(state[..., 3], fk.sum(axis=2))  # z, the last column
    # streaming the causal form through the state
    o1, s1 = refattn.attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], variant="linear", causal=True,
                               return_final_state=True)
    o2 = refattn.attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], variant="linear", causal=True,
                           initial_state=s1)
    close(np.concatenate([o1, o2], axis=2), linear_reference(q, k, v, causal=True))


# -- performer ---------------------------------------------------------------------------------------
def softmax_attention(q, k, v, causal=False):
    s = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def favor_reference(q, k, v, omega, causal=False, kernel="softmax"):
    """The Performer reference's formulas, written out: ``x' = x d^-1/4``; softmax features
    ``m^-1/2 (exp(w x' - |x'|^2/2 - max) + 1e-6)`` (the max over features per query row, over
    features and positions for keys), ReLU ``m^-1/2 relu(w x) + 1e-3``; output num / den."""
    m, d = omega.shape
    def feats(x, query):
        if kernel == "relu":
            return np.maximum(x @ omega.T, 0) / math.sqrt(m) + 1e-3
        xs = x * d ** -0.25
        wx = xs @ omega.T
        top = wx.max(-1, keepdims=True) if query else wx.max(axis=(-2, -1), keepdims=True)
        return (np.exp(wx - 0.5 * np.sum(xs ** 2, -1, keepdims=True) - top) + 1e-6) / math.sqrt(m)
    fq, fk = feats(q, True), feats(k, False)
    w = np.einsum("bhim,bhjm->bhij", fq, fk)
    if causal:
        w = np.tril(w)
    return (w @ v) / w.sum(-1, keepdims=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_its_formulas_for_an_explicit_omega(backend, kernel, causal):
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((2, 2, 13, 4)) for _ in range(3))
    omega = rng.standard_normal((10, 4))
    got = refattn.attention(q, k, v, variant="performer", backend=backend, omega=omega,
                            kernel=kernel, causal=causal, form="chunked", chunk_size=4)
    close(got, favor_reference(q, k, v, omega, causal, kernel))


def test_performer_draws_are_deterministic_and_orthogonal():
    from refattn.variants.linear import draw_omega
    a = draw_omega(40, 16, seed=3)
    np.testing.assert_array_equal(a, draw_omega(40, 16, seed=3))
    assert not np.array_equal(a, draw_omega(40, 16, seed=4))
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    for block in (unit[:16], unit[16:32], unit[32:]):  # rows within a block are orthogonal
        np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=1e-12)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 6, 16)) for _ in range(3))
    by_seed = refattn.attention(q, k, v, variant="performer", seed=3, num_features=40)
    by_omega = refattn.attention(q, k, v, variant="performer", omega=a)
    np.testing.assert_array_equal(by_seed, by_omega)
    iid = draw_omega(40, 16, seed=3, features="iid")
    np.testing.assert_array_equal(iid, np.random.default_rng(3).standard_normal((40, 16)))


def test_performer_error_falls_with_features_and_orthogonal_beats_iid():
    """Fixed seeds, D = 32, small logits: the mean squared error against exact softmax attention
    (relative, averaged over 12 draws) falls as m grows -- at least 2.5x per 4x more features (its
    variance goes as 1/m) -- and orthogonal features beat i.i.d. ones at every m >= D (their
    variance is lower: the Performer paper's Theorem 2)."""
    rng = np.random.default_rng(2024)
    q, k = (0.3 * rng.standard_normal((1, 2, 32, 32)) for _ in range(2))
    v = rng.standard_normal((1, 2, 32, 32))
    want = softmax_attention(q, k, v)
    ms = (32, 128, 512)
    mse = {}
    for features in ("orthogonal", "iid"):
        for m in ms:
            mse[features, m] = float(np.mean([
                np.linalg.norm(refattn.attention(q, k, v, variant="performer", num_features=m,
                                                 features=features, seed=s) - want) ** 2
                for s in range(12)]) / np.linalg.norm(want) ** 2)
    for features in ("orthogonal", "iid"):
        for small, big in zip(ms, ms[1:]):
            assert mse[features, big] * 2.5 < mse[features, small], mse
    for m in ms:
        assert mse["orthogonal", m] < mse["iid", m], mse
    causal = refattn.attention(q, k, v, variant="performer", num_features=2048, causal=True)
    want_causal = softmax_attention(q, k, v, True)
    assert np.linalg.norm(causal - want_causal) / np.linalg.norm(want_causal) < 0.1


def test_performer_parameter_rules():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 3, 4)) for _ in range(3))
    omega = rng.standard_normal((8, 4))
    with pytest.raises(ParameterError, match=r"^omega: given together with seed"):
        refattn.attention(q, k, v, variant="performer", omega=omega, seed=0)
    refattn.attention(q, k, v, variant="performer", omega=omega, num_features=8)  # consistent: fine
    with pytest.raises(ParameterError, match=r"^omega: given together with num_features"):
        refattn.attention(q, k, v, variant="performer", omega=omega, num_features=9)
    with pytest.raises(ShapeError, match=r"^omega: expected shape \(m, 4\)"):
        refattn.attention(q, k, v, variant="performer", omega=rng.standard_normal((8, 5)))
    with pytest.raises(ParameterError, match=r"^scale: applies to kernel='softmax'"):
        refattn.attention(q, k, v, variant="performer", kernel="relu", scale=0.5)
    with pytest.raises(ParameterError, match=r"^features: expected one of 'orthogonal', 'iid'"):
        refattn.attention(q, k, v, variant="performer", features="sobol")
    with pytest.raises(ParameterError, match=r"^num_features: expected an integer >= 1"):
        refattn.attention(q, k, v, variant="performer", num_features=0)
    with pytest.raises(ParameterError, match=r"^feature_eps: expected a finite number >= 0"):
        refattn.attention(q, k, v, variant="performer", feature_eps=-1.0)
    a = refattn.attention(q, k, v, variant="performer", num_features=np.int64(8), seed=np.int32(2))
    b = refattn.attention(q, k, v, variant="performer", num_features=8, seed=2)
    np.testing.assert_array_equal(a, b)
    got = refattn.attention(q, k, v, variant="performer", omega=omega, feature_eps=0.0, scale=0.3)
    fq = np.exp(np.sqrt(0.3) * q @ omega.T - 0.15 * np.sum(q * q, -1, keepdims=True))
    fk = np.exp(np.sqrt(0.3) * k @ omega.T - 0.15 * np.sum(k * k, -1, keepdims=True))
    w = np.einsum("bhim,bhjm->bhij", fq, fk)  # the stabilisers cancel without eps
    close(got, (w @ v) / w.sum(-1, keepdims=True))


# -- rwkv ------------------------------------------------------------------------------------------
def wkv_mpmath(k, v, w, u, state=None):
    """The direct sums in mpmath (60 digits): exact where float64 exponentials overflow."""
    import mpmath
    mpmath.mp.dps = 60
    b, n, c = k.shape
    y = np.empty((b, n, c))
    for bi in range(b):
        for ci in range(c):
            for t in range(n):
                num = den = mpmath.mpf(0)
                if state is not None:
                    a0, b0, p0 = state[bi, :, ci]
                    if np.isfinite(p0):
                        weight = mpmath.e ** (mpmath.mpf(p0) - t * mpmath.mpf(w[ci]))
                        num += weight * mpmath.mpf(a0)
                        den += weight * mpmath.mpf(b0)
                for i in range(t):
                    e = mpmath.e ** (-(t - 1 - i) * mpmath.mpf(w[ci]) + mpmath.mpf(k[bi, i, ci]))
                    num += e * mpmath.mpf(v[bi, i, ci])
                    den += e
                e = mpmath.e ** (mpmath.mpf(u[ci]) + mpmath.mpf(k[bi, t, ci]))
                num += e * mpmath.mpf(v[bi, t, ci])
                den += e
                y[bi, t, ci] = float(num / den)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["recurrent", "parallel"])
def test_rwkv_equals_the_direct_sums_even_where_exp_overflows(backend, form):
    rng = np.random.default_rng(9)
    b, n, c = 2, 12, 5
    k = rng.standard_normal((b, n, c))
    k[0, 3, :] = 800.0  # e^800 overflows float64
    k[1, :, 2] = rng.uniform(700, 760, n)
    k[1, 5, 4] = -900.0
    v = rng.standard_normal((b, n, c))
    w = np.exp(rng.normal(-1, 1, c))
    u = rng.standard_normal(c)
    u[1] = 50.0
    with np.errstate(over="ignore", invalid="ignore"):  # the naive sums do overflow
        naive = np.exp(k[0, 3, 0] + u[0])
    assert np.isinf(naive)
    got, state = refattn.attention(k, v, w, u, variant="rwkv", backend=backend, form=form,
                                   return_final_state=True)
    close(got, wkv_mpmath(k, v, w, u), tol=1e-13)
    k2, v2 = rng.standard_normal((2, b, 4, c))
    got2 = refattn.attention(k2, v2, w, u, variant="rwkv", backend=backend, form=form,
                             initial_state=state)
    whole = wkv_mpmath(np.concatenate([k, k2], 1), np.concatenate([v, v2], 1), w, u)
    close(got2, whole[:, n:], tol=1e-13)
    close(got2, wkv_mpmath(k2, v2, w, u, state=state), tol=1e-13)


def test_rwkv_forms_agree_on_state_and_output():
    rng = np.random.default_rng(10)
    k, v = rng.standard_normal((2, 3, 40, 7)) * 5
    w, u = np.exp(rng.standard_normal(7)), rng.standard_normal(7)
    init = np.stack([rng.standard_normal((3, 7)), rng.uniform(0.5, 2, (3, 7)), rng.standard_normal((3, 7))], 1)
    init[0, 2, 3] = -np.inf  # one empty channel
    init[0, :2, 3] = 0.0
    for be in BACKENDS:
        r = refattn.attention(k, v, w, u, variant="rwkv", backend=be, initial_state=init,
                              return_final_state=True)
        p = refattn.attention(k, v, w, u, variant="rwkv", form="parallel", initial_state=init,
                              return_final_state=True)
        close(r[0], p[0])
        close(r[1], p[1])


# -- backward against central finite differences -------------------------------------------------------
def check_grads(name, arrays, params, tol=2e-7, names=None, extra=None):
    """``attention_backward`` against central differences of ``sum(out * dout)`` for each float
    input (and ``extra`` parameter arrays), every backend."""
    rng = np.random.default_rng(99)
    arrays = {n: np.array(a, dtype=np.float64) for n, a in arrays.items()}
    extra = {n: np.array(a, dtype=np.float64) for n, a in (extra or {}).items()}
    out = refattn.attention(variant=name, **arrays, **params, **extra)
    dout = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(refattn.attention(variant=name, **arrays, **params, **extra) * dout))

    for be in BACKENDS:
        got = refattn.attention_backward(variant=name, backend=be, dout=dout, **arrays, **params, **extra)
        if isinstance(got, tuple):
            got = {"q": got[0], "k": got[1], "v": got[2], **got[3]}
        for n, a in list(arrays.items()) + list(extra.items()):
            if names is not None and n not in names:
                continue
            assert got[n].shape == a.shape, n
            for idx, want in fd_grad(loss, a, max_entries=25).items():
                assert abs(got[n][idx] - want) <= tol * max(1.0, abs(want)), (be, n, idx, got[n][idx], want)


@pytest.mark.parametrize("name", GATED)
def test_gated_backward_matches_finite_differences(name):
    rng = np.random.default_rng(12)
    arrays = make_gated(name, rng, b=1, h=2, n=9, dk=3, dv=2)
    check_grads(name, arrays, {"form": "chunked", "chunk_size": 4}, extra={
        "initial_state": rng.standard_normal((1, 2, 3, 2))})


def test_delta_rule_backward_through_the_l2_norm_and_bshd():
    rng = np.random.default_rng(13)
    arrays = make_gated("gated_delta_rule", rng, b=1, h=2, n=7, dk=3, dv=2)
    arrays["k"] = 2 * rng.standard_normal(arrays["k"].shape)
    bshd = {n: np.ascontiguousarray(a.swapaxes(1, 2)) for n, a in arrays.items()}
    check_grads("gated_delta_rule", bshd, {"qk_l2norm": True, "layout": "bshd", "scale": 0.9})


@pytest.mark.parametrize("feature_map", ["elu+1", "relu", "identity"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_backward_matches_finite_differences(feature_map, causal):
    rng = np.random.default_rng(14)
    q, k, v = (rng.standard_normal((1, 2, 7, 3)) for _ in range(3))
    if feature_map == "identity":
        q, k = np.abs(q) + 0.5, np.abs(k) + 0.5
    check_grads("linear", {"q": q, "k": k, "v": v},
                {"feature_map": feature_map, "causal": causal, "eps": 0.1},
                extra={"initial_state": np.abs(rng.standard_normal((1, 2, 3, 4)))})
    check_grads("linear", {"q": q, "k": k, "v": v},
                {"feature_map": feature_map, "causal": causal, "normalize": False, "scale": 0.5})


def test_rwkv_backward_matches_finite_differences():
    rng = np.random.default_rng(15)
    k, v = rng.standard_normal((2, 2, 8, 3))
    init = np.stack([rng.standard_normal((2, 3)), rng.uniform(0.5, 2, (2, 3)), rng.standard_normal((2, 3))], 1)
    check_grads("rwkv", {"k": k, "v": v, "w": np.exp(rng.standard_normal(3)), "u": rng.standard_normal(3)},
                {}, extra={"initial_state": init})


# -- bad input: one clear line naming the argument --------------------------------------------------
def test_errors_name_the_argument():
    rng = np.random.default_rng(0)
    arrays = make_gated("gated_delta_rule", rng, b=1, h=2, n=5, dk=3, dv=2)

    def err(exc, pattern, **change):
        a = dict(arrays)
        params = {n: change.pop(n) for n in list(change) if n not in a}
        a.update(change)
        with pytest.raises(exc, match=pattern):
            refattn.attention(variant="gated_delta_rule", **a, **params)

    err(ParameterError, r"^g: expected log-gates <= 0 .* got 0\.3 at \(b, h, t\) = \(0, 1, 2\)",
        g=np.stack([np.full(5, -0.1), np.where(np.arange(5) == 2, 0.3, -0.1)])[None])
    err(ParameterError, r"^beta: expected values in \[0, 2\]", beta=np.full((1, 2, 5), 2.5))
    for name in ("q", "k", "v", "g", "beta"):
        bad = arrays[name].copy()
        bad.flat[1] = np.nan
        err(ParameterError, rf"^{name}: expected finite values, got 1 NaN entries", **{name: bad})
    bad = arrays["g"].copy()
    bad.flat[0] = -np.inf  # alpha = 0 is out of range too: the chunked form needs finite gates
    err(ParameterError, r"^g: expected finite values", g=bad)
    err(ShapeError, r"^k: expected batch, heads and length \(1, 2, 5\) as q", k=arrays["k"][:, :, :4])
    err(ShapeError, r"^k: expected key dim 3 as q, got 4", k=rng.standard_normal((1, 2, 5, 4)))
    err(ShapeError, r"^q: expected rank 4 \(B, H, L, D\) in layout 'bhsd'", q=arrays["q"][0])
    err(ShapeError, r"^g: expected shape \(1, 2, 5\) \(B, H, L\) in layout 'bhsd', got \(1, 2, 5, 3\)",
        g=-np.ones((1, 2, 5, 3)))
    err(ShapeError, r"^initial_state: expected shape \(1, 2, 3, 2\) \(B, H, Dk, Dv\)",
        initial_state=np.zeros((1, 2, 2, 3)))
    err(ParameterError, r"^initial_state: expected finite values", initial_state=np.full((1, 2, 3, 2), np.inf))
    err(ParameterError, r"^form: expected one of 'recurrent', 'chunked', 'parallel'", form="fused")
    err(ParameterError, r"^chunk_size: expected an integer >= 1, got 0", chunk_size=0)
    err(ParameterError, r"^chunk_size: expected an integer >= 1, got 4\.0", chunk_size=4.0)
    err(ParameterError, r"^return_final_state: expected True or False", return_final_state=1)
    err(ParameterError, r"^qk_l2norm: expected True or False", qk_l2norm="yes")
    err(ParameterError, r"^layout: expected one of 'bhsd', 'bshd'", layout="bhds")
    err(DTypeError, r"^q: expected a real floating or integer array, got dtype complex128",
        q=arrays["q"] + 0j)
    err(ParameterError, r"^scale: expected a finite real number", scale=float("nan"))
    with pytest.raises(ShapeError, match=r"^v: expected a non-empty head dim"):
        refattn.attention(np.zeros((1, 1, 2, 3)), np.zeros((1, 1, 2, 3)), np.zeros((1, 1, 2, 0)),
                          variant="retention")
    with pytest.raises(ShapeError, match=r"^dout: expected the output's shape \(1, 2, 5, 2\)"):
        refattn.attention_backward(variant="gated_delta_rule", dout=np.zeros((1, 2, 5, 3)), **arrays)
    with pytest.raises(ParameterError, match=r"^feature_map: expected one of 'elu\+1', 'relu', 'identity'"):
        refattn.attention(arrays["q"], arrays["k"], arrays["v"], variant="linear", feature_map="exp")
    with pytest.raises(ParameterError, match=r"^eps: expected a finite number >= 0"):
        refattn.attention(arrays["q"], arrays["k"], arrays["v"], variant="linear", eps=float("inf"))
    with pytest.raises(ShapeError, match=r"^initial_state: expected shape \(1, 2, 3, 3\) \(B, H, Dk, Dv \+ 1\) with normalize"):
        refattn.attention(arrays["q"], arrays["k"], arrays["v"], variant="linear",
                          initial_state=np.zeros((1, 2, 3, 2)))


def test_rwkv_errors():
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 1, 4, 3))
    w, u = np.ones(3), np.zeros(3)
    with pytest.raises(ShapeError, match=r"^w: expected shape \(3,\) \(one per channel"):
        refattn.attention(k, v, np.ones(4), u, variant="rwkv")
    with pytest.raises(ShapeError, match=r"^v: expected shape \(1, 4, 3\) as k"):
        refattn.attention(k, v[:, :3], w, u, variant="rwkv")
    with pytest.raises(ParameterError, match=r"^u: expected finite values"):
        refattn.attention(k, v, w, np.array([0, np.nan, 0]), variant="rwkv")
    with pytest.raises(ParameterError, match=r"^form: expected one of 'recurrent', 'parallel'"):
        refattn.attention(k, v, w, u, variant="rwkv", form="chunked")
    with pytest.raises(ParameterError, match=r"^initial_state: expected finite a, finite b >= 0"):
        refattn.attention(k, v, w, u, variant="rwkv", initial_state=-np.ones((1, 3, 3)))
    with pytest.raises(ShapeError, match=r"^initial_state: expected shape \(1, 3, 3\)"):
        refattn.attention(k, v, w, u, variant="rwkv", initial_state=np.zeros((1, 3, 4)))


def test_empty_sequences_and_single_steps_through_the_variants():
    rng = np.random.default_rng(1)
    for n in (0, 1):
        for name in GATED:
            arrays = make_gated(name, rng, b=1, h=2, n=n, dk=3, dv=2)
            s0 = rng.standard_normal((1, 2, 3, 2))
            for be in BACKENDS:
                for form in ("recurrent", "chunked", "parallel"):
                    out, state = call(name, arrays, be, form=form, initial_state=s0)
                    want_o, want_s = gated_reference(name, arrays, s0=s0)
                    assert out.shape == (1, 2, n, 2)
                    np.testing.assert_allclose(out, want_o, rtol=1e-13, atol=1e-15)
                    np.testing.assert_allclose(state, want_s, rtol=1e-13, atol=1e-15)
            grads = refattn.attention_backward(variant=name, dout=np.ones((1, 2, n, 2)), **arrays,
                                               initial_state=s0)
            assert grads[0].shape == (1, 2, n, 3)
        k = rng.standard_normal((1, n, 3))
        out, state = refattn.attention(k, k, np.ones(3), np.zeros(3), variant="rwkv",
                                       return_final_state=True)
        assert out.shape == (1, n, 3) and state.shape == (1, 3, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_magnitudes_stay_exact(backend):
    """Values of 1e150 (products near 1e300) and of 1e-150: the scan is linear in v and q, so the
    forms still agree to rounding."""
    rng = np.random.default_rng(3)
    arrays = make_gated("gla", rng)
    for factor in (1e100, 1e-150):
        a = dict(arrays, v=arrays["v"] * factor)
        want = gated_reference("gla", a)[0]
        for form in ("recurrent", "chunked", "parallel"):
            close(call("gla", a, backend, form=form, chunk_size=6)[0], want, what=f"{factor} {form}")


def test_numba_agrees_with_numpy_on_every_variant_and_form():
    if "numba" not in BACKENDS:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(21)
    for name in GATED:
        arrays = make_gated(name, rng, n=70, dk=8, dv=6)
        s0 = rng.standard_normal((2, 3, 8, 6))
        for form in ("recurrent", "chunked", "parallel"):
            a = call(name, arrays, "numpy", form=form, chunk_size=16, initial_state=s0)
            b = call(name, arrays, "numba", form=form, chunk_size=16, initial_state=s0)
            close(b[0], a[0], what=f"{name} {form}")
            close(b[1], a[1], what=f"{name} {form} state")


# -- the golden files pin what the definitions give ----------------------------------------------------
def _golden_names():
    from refattn.golden import cases_linear
    return [c.name for c in cases_linear.CASES]


@pytest.mark.parametrize("name", _golden_names())
def test_golden_linear_cases_match_the_references_written_here(name):
    from refattn import golden
    from refattn.golden.cases import select
    from refattn.variants.linear import draw_omega

    case = select()[name]
    stored = golden.load(name)
    inputs, params, _ = golden.stored_inputs(case, stored)
    out = stored.arrays["output.out"]
    var = case.variant
    if var == "rwkv":
        state = params.get("initial_state")
        close(out, wkv_mpmath(inputs["k"], inputs["v"], inputs["w"], inputs["u"], state), tol=1e-13)
        return
    bshd = params.get("layout") == "bshd"
    if bshd:
        inputs = {n: a.swapaxes(1, 2) for n, a in inputs.items()}
        out = out.swapaxes(1, 2)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if var == "performer":
        omega = params.get("omega")
        if omega is None:
            omega = draw_omega(params["num_features"], q.shape[-1], params["seed"],
                               params.get("features", "orthogonal"))
        close(out, favor_reference(q, k, v, omega, params.get("causal", False),
                                   params.get("kernel", "softmax")))
        return
    if var == "linear":
        s0 = params.get("initial_state")
        fmap, scale = params.get("feature_map", "elu+1"), params.get("scale", 1.0)
        if s0 is None:
            want = linear_reference(q, k, v, feature_map=fmap, causal=params.get("causal", False),
                                    normalize=params.get("normalize", True), scale=scale)
        else:  # a causal sum that starts from S0 (and z0, its last column, when normalising)
            fq, fk = phi_reference(q, fmap), phi_reference(k, fmap)
            w = np.tril(np.einsum("bhid,bhjd->bhij", fq, fk))
            num = scale * (w @ v + fq @ s0[..., : v.shape[-1]])
            if params.get("normalize", True):
                den = scale * (w.sum(-1) + np.einsum("bhid,bhd->bhi", fq, s0[..., -1]))
                want = num / (den[..., None] + 1e-6)
            else:
                want = num
        close(out, want)
        return
    want_o, want_s = gated_reference(var, inputs, scale=params.get("scale"),
                                     s0=params.get("initial_state"),
                                     qk_l2norm=params.get("qk_l2norm", False))
    close(out, want_o)
    close(stored.arrays["output.final_state"], want_s)


@pytest.mark.parametrize("name", [n for n in _golden_names() if "performer" not in n])
def test_golden_linear_gradients_match_finite_differences(name):
    from refattn import golden
    from refattn.golden.cases import select

    case = select()[name]
    stored = golden.load(name)
    inputs, params, dout = golden.stored_inputs(case, stored)
    inputs = {n: np.array(a) for n, a in inputs.items()}

    def loss():
        return float(np.sum(refattn.attention(variant=case.variant, **inputs, **params) * dout))

    var = refattn.variants.get(case.variant)
    for n in inputs:
        key = f"grad.d{n}" if (n in ("q", "k", "v") or not var.on_qkv) else f"grad.extras.{n}"
        for idx, want in fd_grad(loss, inputs[n], max_entries=8).items():
            assert abs(stored.arrays[key][idx] - want) <= 2e-7 * max(1.0, abs(want)), (n, idx)


def test_linear_and_performer_take_fla_layout():
    rng = np.random.default_rng(30)
    q, k, v = (rng.standard_normal((2, 3, 11, 4)) for _ in range(3))
    t = [np.ascontiguousarray(a.swapaxes(1, 2)) for a in (q, k, v)]
    for name, params in (("linear", {"causal": True}), ("performer", {"causal": True, "seed": 5})):
        a = refattn.attention(q, k, v, variant=name, **params)
        b = refattn.attention(*t, variant=name, layout="bshd", **params)
        np.testing.assert_allclose(b.swapaxes(1, 2), a, rtol=0, atol=1e-14)
    with pytest.raises(ShapeError, match=r"^q: expected rank 4 \(B, L, H, D\) in layout 'bshd'"):
        refattn.attention(q[0], k, v, variant="linear", layout="bshd")


def test_packed_batches_are_refused_for_variants_without_an_lse():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((7, 2, 4)) for _ in range(3))
    cu = np.array([0, 3, 7])
    with pytest.raises(ParameterError, match=r"^cu_seqlens_q: packed batches need an attention "
                                             r"variant .* 'retention' has no LSE"):
        refattn.attention(q, k, v, variant="retention", cu_seqlens_q=cu, cu_seqlens_k=cu)

"""State space models: mamba (selective scan), mamba2 (SSD) and s4, and ``refattn.ssm``.

Expected values come from loops written here from the papers' equations (mamba: VARIANTS E, the
discretisation of ``selective_scan_ref``: ``A_bar = exp(delta A)``, ``B_bar u = delta B u``; Mamba-2:
the recurrence and the masked-attention dual ``(L o C B^T)(dt x)``; S4: closed forms of ZOH and the
bilinear rule for a diagonalisable ``A``), and from central finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn import backends, ssm
from refattn.errors import DTypeError, ParameterError, ShapeError
from fd_variants import fd_grad

TOL = 1e-12
BACKENDS = ["numpy"] + (["numba"] if "numba" in backends.available() else [])


def close(got, want, tol=TOL, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
    assert err <= tol, f"{what}: normwise {err:.3g} > {tol:g}"


# -- mamba ---------------------------------------------------------------------------------------------
def mamba_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None):
    """Mamba (S6), one (batch, channel, step) at a time:
    ``dt = softplus(delta + bias)``; ``h = exp(dt A_d) * h + dt B_t u_t``; ``y = C_t . h + D u``;
    ``y *= z sigmoid(z)``. ``B``/``C``: ``(D, N)``, ``(B, N, L)`` or ``(B, G, N, L)``."""
    nb, nd, n = u.shape
    y = np.zeros(u.shape)
    last = np.zeros((nb, nd, A.shape[1]))

    def at(M, b, d, t):
        if M.ndim == 2:
            return M[d]
        if M.ndim == 3:
            return M[b, :, t]
        return M[b, d // (nd // M.shape[1]), :, t]

    for b in range(nb):
        for d in range(nd):
            h = np.zeros(A.shape[1]) if h0 is None else h0[b, d].copy()
            for t in range(n):
                dt = delta[b, d, t] + (0.0 if delta_bias is None else delta_bias[d])
                if delta_softplus:
                    dt = np.log1p(np.exp(dt))
                h = np.exp(dt * A[d]) * h + dt * at(B, b, d, t) * u[b, d, t]
                y[b, d, t] = at(C, b, d, t) @ h + (0.0 if D is None else D[d] * u[b, d, t])
                if z is not None:
                    y[b, d, t] *= z[b, d, t] / (1 + np.exp(-z[b, d, t]))
            last[b, d] = h
    return y, last


def mamba_inputs(rng, nb=2, nd=4, n=3, length=11, mode="selective", groups=2):
    u = rng.standard_normal((nb, nd, length))
    delta = rng.uniform(-1, 1, (nb, nd, length))
    A = -np.exp(rng.normal(0, 0.5, (nd, n)))
    shape = {"fixed": (nd, n), "selective": (nb, n, length), "grouped": (nb, groups, n, length)}[mode]
    return dict(u=u, delta=delta, A=A, B=rng.standard_normal(shape), C=rng.standard_normal(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fixed", "selective", "grouped"])
def test_mamba_equals_the_loop_in_every_form(backend, mode):
    rng = np.random.default_rng(1)
    x = mamba_inputs(rng, mode=mode)
    extra = dict(D=rng.standard_normal(4), z=rng.standard_normal((2, 4, 11)),
                 delta_bias=rng.standard_normal(4), delta_softplus=True,
                 h0=rng.standard_normal((2, 4, 3)))
    want_y, want_h = mamba_loop(**x, **extra)
    params = dict(extra)
    params["initial_state"] = params.pop("h0")
    for form, chunk in (("recurrent", 64), ("chunked", 4), ("chunked", 11), ("parallel", 64)):
        y, h = refattn.attention(variant="mamba", backend=backend, **x, **params, form=form,
                                 chunk_size=chunk, return_final_state=True)
        close(y, want_y, what=f"{mode} {form} {chunk}")
        close(h, want_h, what=f"{mode} state {form}")


def test_selective_scan_is_selective_scan_ref():
    """refattn.ssm.selective_scan: mamba's argument names and return convention."""
    rng = np.random.default_rng(2)
    x = mamba_inputs(rng, mode="selective")
    want_y, want_h = mamba_loop(**x, delta_softplus=True)
    out = ssm.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=True)
    close(out, want_y)
    out, last = ssm.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], None, None, None, True,
                                   True)
    close(out, want_y)
    close(last, want_h)
    D = rng.standard_normal(4)
    close(ssm.selective_scan(**x, D=D), mamba_loop(**x, D=D)[0])
    if "numba" in BACKENDS:
        close(ssm.selective_scan(**x, D=D, backend="numba", form="chunked", chunk_size=3),
              mamba_loop(**x, D=D)[0])


def test_mamba_takes_torch_tensors_and_big_deltas():
    torch = pytest.importorskip("torch", reason="needs torch")
    rng = np.random.default_rng(3)
    x = mamba_inputs(rng)
    x["delta"] = x["delta"] * 40  # softplus far in its linear range, exp(dt A) tiny
    t = {n: torch.from_numpy(a) for n, a in x.items()}
    close(ssm.selective_scan(**t, delta_softplus=True), mamba_loop(**x, delta_softplus=True)[0])


def mamba_errors():
    rng = np.random.default_rng(0)
    x = mamba_inputs(rng, nb=1, nd=4, n=3, length=5)
    cases = [
        (DTypeError, r"^A: expected a real floating or integer array, got dtype complex128",
         dict(A=x["A"] + 1j)),
        (ShapeError, r"^B: expected shape \(4, 3\) \(D, N\), \(1, 3, 5\) \(B, N, L\) or \(1, G, 3, 5\)",
         dict(B=np.zeros((1, 3, 4)))),
        (ShapeError, r"^C: expected shape .* with G dividing D=4, got \(1, 3, 3, 5\)",
         dict(C=np.zeros((1, 3, 3, 5)))),
        (ShapeError, r"^delta: expected shape \(1, 4, 5\) as u", dict(delta=np.zeros((1, 4, 4)))),
        (ShapeError, r"^A: expected shape \(4, N\)", dict(A=np.zeros((3, 3)))),
        (ParameterError, r"^u: expected finite values", dict(u=np.where(x["u"] > 0, np.inf, x["u"]))),
        (ParameterError, r"^delta: expected finite values", dict(delta=x["delta"] * np.nan)),
        (ShapeError, r"^D: expected shape \(4,\)", dict(D=np.zeros(3))),
        (ShapeError, r"^z: expected shape \(1, 4, 5\) as u", dict(z=np.zeros((1, 4, 6)))),
        (ShapeError, r"^initial_state: expected shape \(1, 4, 3\) \(B, D, N\)",
         dict(initial_state=np.zeros((1, 3, 4)))),
        (ParameterError, r"^delta_softplus: expected True or False", dict(delta_softplus=1)),
        (ParameterError, r"^form: expected one of 'recurrent', 'chunked', 'parallel'", dict(form="scan")),
    ]
    return x, cases


def test_mamba_errors_name_the_argument():
    x, cases = mamba_errors()
    for exc, pattern, change in cases:
        args = dict(x)
        args.update(change)
        with pytest.raises(exc, match=pattern):
            refattn.attention(variant="mamba", **args)


# -- mamba2 --------------------------------------------------------------------------------------------
def mamba2_inputs(rng, b=2, length=13, h=4, p=3, g=2, n=5):
    return dict(x=rng.standard_normal((b, length, h, p)),
                dt=np.log1p(np.exp(rng.standard_normal((b, length, h)) - 1)),
                A=-np.exp(rng.random(h)), B=rng.standard_normal((b, length, g, n)),
                C=rng.standard_normal((b, length, g, n)))


def ssd_dual(x, dt, A, B, C, D=None, h0=None):
    """The masked-attention dual: ``y_i = sum_{j<=i} L_ij (C_i . B_j) dt_j x_j`` with
    ``L_ij = exp(sum_{k=j+1..i} dt_k A)``, plus the initial state read through ``exp(sum_{k<=i}
    dt_k A) h0 C_i`` and ``D x``; head ``h`` reads group ``h // (H / G)``."""
    b, length, h, p = x.shape
    g = B.shape[2]
    y = np.zeros(x.shape)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            a = dt[bi, :, hi] * A[hi]
            cum = np.cumsum(a)
            L = np.exp(cum[:, None] - cum[None, :]) * np.tril(np.ones((length, length)))
            M = L * (C[bi, :, gi] @ B[bi, :, gi].T)
            y[bi, :, hi] = M @ (dt[bi, :, hi, None] * x[bi, :, hi])
            if h0 is not None:
                y[bi, :, hi] += np.exp(cum)[:, None] * (C[bi, :, gi] @ h0[bi, hi].T)
            if D is not None:
                y[bi, :, hi] += (D[hi] if D.ndim == 1 else D[hi][None]) * x[bi, :, hi]
    return y


def ssd_loop(x, dt, A, B, C, h0=None):
    """The recurrence ``h = exp(dt A) h + dt x B^T`` (p x n), ``y = h C``; returns y and the state."""
    b, length, h, p = x.shape
    g, n = B.shape[2:]
    y = np.zeros(x.shape)
    last = np.zeros((b, h, p, n))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            st = np.zeros((p, n)) if h0 is None else h0[bi, hi].copy()
            for t in range(length):
                st = np.exp(dt[bi, t, hi] * A[hi]) * st + dt[bi, t, hi] * np.outer(x[bi, t, hi], B[bi, t, gi])
                y[bi, t, hi] = st @ C[bi, t, gi]
            last[bi, hi] = st
    return y, last


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssd_chunked_equals_the_dual_form_and_the_recurrence(backend):
    rng = np.random.default_rng(4)
    x = mamba2_inputs(rng)
    h0 = rng.standard_normal((2, 4, 3, 5))
    D = rng.standard_normal(4)
    want = ssd_dual(**x, D=D, h0=h0)
    want_y, want_h = ssd_loop(**x, h0=h0)
    close(want, want_y + D[None, None, :, None] * x["x"])  # the two test references agree
    for form, chunk in (("chunked", 4), ("chunked", 64), ("recurrent", 64), ("parallel", 64)):
        y, h = ssm.ssd(**x, D=D, chunk_size=chunk, form=form, initial_states=h0,
                       return_final_states=True, backend=backend)
        close(y, want, what=f"{form} {chunk}")
        close(h, want_h, what=f"state {form} {chunk}")


def test_ssd_options_dt_bias_softplus_z_and_per_channel_D():
    rng = np.random.default_rng(5)
    x = mamba2_inputs(rng, g=1)
    bias = rng.standard_normal(4)
    D = rng.standard_normal((4, 3))
    z = rng.standard_normal(x["x"].shape)
    dt = np.log1p(np.exp(x["dt"] + bias))
    want = ssd_dual(**dict(x, dt=dt), D=D) * z / (1 + np.exp(-z))
    for be in BACKENDS:
        got = ssm.ssd(**x, D=D, z=z, dt_bias=bias, dt_softplus=True, chunk_size=5, backend=be)
        close(got, want)


def test_mamba2_errors():
    rng = np.random.default_rng(0)
    x = mamba2_inputs(rng, b=1, length=4, h=4, g=2)
    with pytest.raises(ShapeError, match=r"^B: expected shape \(1, 4, g, n\) with g dividing h=4"):
        refattn.attention(variant="mamba2", **dict(x, B=np.zeros((1, 4, 3, 5)), C=np.zeros((1, 4, 3, 5))))
    with pytest.raises(ShapeError, match=r"^C: expected shape \(1, 4, 2, 5\) as B"):
        refattn.attention(variant="mamba2", **dict(x, C=np.zeros((1, 4, 2, 4))))
    with pytest.raises(ShapeError, match=r"^A: expected shape \(4,\)"):
        refattn.attention(variant="mamba2", **dict(x, A=np.zeros(3)))
    with pytest.raises(ShapeError, match=r"^D: expected shape \(4,\) or \(4, 3\)"):
        refattn.attention(variant="mamba2", **x, D=np.zeros(3))
    with pytest.raises(ParameterError, match=r"^dt: expected finite values"):
        refattn.attention(variant="mamba2", **dict(x, dt=np.where(x["dt"] > 0.5, np.inf, x["dt"])))
    with pytest.raises(ParameterError, match=r"^chunk_size: expected an integer >= 1"):
        refattn.attention(variant="mamba2", **x, chunk_size=-1)


# -- s4 -----------------------------------------------------------------------------------------------
def s4_diagonalisable(rng, h=3, n=4):
    """``A = V diag(lam) V^-1`` with real negative eigenvalues, so ZOH and bilinear have closed forms."""
    lam = -rng.uniform(0.5, 3.0, (h, n))
    V = rng.standard_normal((h, n, n)) + 3 * np.eye(n)
    A = np.einsum("hij,hj,hjk->hik", V, lam, np.linalg.inv(V))
    return A, lam, V


def test_s4_discretisations_match_their_closed_forms():
    rng = np.random.default_rng(6)
    A, lam, V = s4_diagonalisable(rng)
    B = rng.standard_normal((3, 4))
    dt = np.array([0.01, 0.1, 0.7])
    Vi = np.linalg.inv(V)
    a_bar, b_bar = ssm.discretize(A, B, dt, "zoh")
    e = np.exp(dt[:, None] * lam)
    close(a_bar, np.einsum("hij,hj,hjk->hik", V, e, Vi))
    close(b_bar, np.einsum("hij,hj,hjk,hk->hi", V, (e - 1) / lam, Vi, B))
    a_bar, b_bar = ssm.discretize(A, B, dt, "bilinear")
    r = (1 + dt[:, None] * lam / 2) / (1 - dt[:, None] * lam / 2)
    close(a_bar, np.einsum("hij,hj,hjk->hik", V, r, Vi))
    close(b_bar, np.einsum("hij,hj,hjk,hk->hi", V, dt[:, None] / (1 - dt[:, None] * lam / 2), Vi, B))
    # singular A: ZOH's B_bar is dt B (the block exponential needs no inverse)
    _, b0 = ssm.discretize(np.zeros((1, 2, 2)), np.ones((1, 2)), np.array([0.3]), "zoh")
    close(b0, [[0.3, 0.3]])


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4_recurrence_equals_convolution_and_fft(method):
    rng = np.random.default_rng(7)
    A, _, _ = s4_diagonalisable(rng)
    B, C = rng.standard_normal((2, 3, 4))
    dt = np.array([0.05, 0.2, 0.5])
    u = rng.standard_normal((2, 3, 40))
    D = rng.standard_normal(3)
    x0 = rng.standard_normal((2, 3, 4))
    a_bar, b_bar = ssm.discretize(A, B, dt, method)
    # the loop of the definition, in the test
    y_want = np.zeros(u.shape)
    x = x0.copy()
    for t in range(40):
        x = np.einsum("hnm,bhm->bhn", a_bar, x) + b_bar * u[:, :, t, None]
        y_want[:, :, t] = np.einsum("hn,bhn->bh", C, x) + D * u[:, :, t]
    for form in ("recurrent", "convolution", "fft"):
        y, last = ssm.s4(u, A, B, C, dt, D, method=method, form=form, initial_state=x0,
                         return_final_state=True)
        close(y, y_want, what=form)
        close(last, x, what=form)
    # the kernel is the impulse response
    K = ssm.kernel(A, B, C, dt, 40, method)
    impulse = np.zeros((1, 3, 40))
    impulse[..., 0] = 1.0
    close(ssm.s4(impulse, A, B, C, dt, method=method)[0], K)


def test_s4_hippo_example_and_errors():
    var = refattn.variants.get("s4")
    arrays = var.example((1, 2, 64, 64, 8, 1), np.random.default_rng(0), var.parse_params({}))
    outs = [refattn.attention(variant="s4", **arrays, form=f) for f in ("recurrent", "convolution", "fft")]
    close(outs[1], outs[0])
    close(outs[2], outs[0])
    with pytest.raises(ParameterError, match=r"^dt: expected steps > 0"):
        refattn.attention(variant="s4", **dict(arrays, dt=-arrays["dt"]))
    with pytest.raises(ShapeError, match=r"^A: expected shape \(2, N, N\)"):
        refattn.attention(variant="s4", **dict(arrays, A=arrays["A"][:, :, :4]))
    with pytest.raises(ParameterError, match=r"^discretization: expected one of 'zoh', 'bilinear'"):
        refattn.attention(variant="s4", **arrays, discretization="euler")
    from refattn.errors import BackendUnavailable
    with pytest.raises(BackendUnavailable, match=r"^backend: expected one of numpy for variant 's4'"):
        refattn.attention(variant="s4", backend="numba", **arrays)


# -- backward against central finite differences -------------------------------------------------------
def check_grads(name, arrays, params, tol=2e-7, backends=None):
    rng = np.random.default_rng(99)
    arrays = {n: np.array(a, dtype=np.float64) for n, a in arrays.items()}
    params = {n: (np.array(a, dtype=np.float64) if isinstance(a, np.ndarray) else a)
              for n, a in params.items()}
    out = refattn.attention(variant=name, **arrays, **params)
    dout = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(refattn.attention(variant=name, **arrays, **params) * dout))

    learnable = {n: a for n, a in params.items() if isinstance(a, np.ndarray)}
    for be in backends or BACKENDS:
        got = refattn.attention_backward(variant=name, backend=be, dout=dout, **arrays, **params)
        assert set(got) == set(arrays) | set(learnable), sorted(got)
        for n, a in list(arrays.items()) + list(learnable.items()):
            assert got[n].shape == a.shape, n
            for idx, want in fd_grad(loss, a, max_entries=20).items():
                assert abs(got[n][idx] - want) <= tol * max(1.0, abs(want)), (be, n, idx, got[n][idx], want)


@pytest.mark.parametrize("mode", ["fixed", "selective", "grouped"])
def test_mamba_backward_matches_finite_differences(mode):
    rng = np.random.default_rng(8)
    x = mamba_inputs(rng, nb=1, nd=4, n=3, length=6, mode=mode)
    check_grads("mamba", x, dict(D=rng.standard_normal(4), z=rng.standard_normal((1, 4, 6)),
                                 delta_bias=rng.standard_normal(4), delta_softplus=True,
                                 initial_state=rng.standard_normal((1, 4, 3)), form="chunked",
                                 chunk_size=4))
    check_grads("mamba", x, {})


def test_mamba2_backward_matches_finite_differences():
    rng = np.random.default_rng(9)
    x = mamba2_inputs(rng, b=1, length=6, h=4, p=2, g=2, n=3)
    check_grads("mamba2", x, dict(D=rng.standard_normal((4, 2)), z=rng.standard_normal((1, 6, 4, 2)),
                                  dt_bias=rng.standard_normal(4), dt_softplus=True,
                                  initial_state=rng.standard_normal((1, 4, 2, 3)), chunk_size=4))
    check_grads("mamba2", x, dict(D=rng.standard_normal(4)))


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4_backward_matches_finite_differences(method):
    """The adjoint recurrence and the discretisation's backward (expm's Frechet derivative for
    ZOH, the solve for bilinear) against central differences, every input and learnable."""
    rng = np.random.default_rng(12)
    A, _, _ = s4_diagonalisable(rng, h=2, n=3)
    x = {"u": rng.standard_normal((2, 2, 7)), "A": A, "B": rng.standard_normal((2, 3)),
         "C": rng.standard_normal((2, 3)), "dt": np.array([0.1, 0.3])}
    check_grads("s4", x, dict(D=rng.standard_normal(2), initial_state=rng.standard_normal((2, 2, 3)),
                              discretization=method), backends=("numpy",))
    check_grads("s4", x, dict(discretization=method, form="fft"), backends=("numpy",))


def test_one_step_and_empty_sequences():
    rng = np.random.default_rng(10)
    for length in (0, 1):
        x = mamba_inputs(rng, nb=1, length=length)
        h0 = rng.standard_normal((1, 4, 3))
        for be in BACKENDS:
            y, h = refattn.attention(variant="mamba", backend=be, **x, initial_state=h0,
                                     return_final_state=True, form="chunked")
            want_y, want_h = mamba_loop(**x, h0=h0)
            assert y.shape == (1, 4, length)
            np.testing.assert_allclose(y, want_y, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(h, want_h, rtol=1e-13, atol=1e-15)
        x2 = mamba2_inputs(rng, b=1, length=length)
        y, h = ssm.ssd(**x2, return_final_states=True)
        assert y.shape == (1, length, 4, 3) and h.shape == (1, 4, 3, 5)


# -- the golden files pin what the definitions give ----------------------------------------------------
def _golden_names():
    from refattn.golden import cases_ssm
    return [c.name for c in cases_ssm.CASES]


def _zoh_by_eigen(A, B, dt, method):
    """Discretisation through an eigendecomposition (real, distinct eigenvalues, as HiPPO-LegS's)."""
    lam, V = np.linalg.eig(A)
    lam, V = lam.real, V.real
    Vi = np.linalg.inv(V)
    if method == "zoh":
        e = np.exp(dt[:, None] * lam)
        return (np.einsum("hij,hj,hjk->hik", V, e, Vi),
                np.einsum("hij,hj,hjk,hk->hi", V, (e - 1) / lam, Vi, B))
    r = 1 - dt[:, None] * lam / 2
    return (np.einsum("hij,hj,hjk->hik", V, (1 + dt[:, None] * lam / 2) / r, Vi),
            np.einsum("hij,hj,hjk,hk->hi", V, dt[:, None] / r, Vi, B))


@pytest.mark.parametrize("name", _golden_names())
def test_golden_ssm_cases_match_the_references_written_here(name):
    from refattn import golden
    from refattn.golden.cases import select

    case = select()[name]
    stored = golden.load(name)
    x, params, _ = golden.stored_inputs(case, stored)
    out, state = stored.arrays["output.out"], stored.arrays["output.final_state"]
    if case.variant == "mamba":
        want_y, want_h = mamba_loop(**x, D=params.get("D"), z=params.get("z"),
                                    delta_bias=params.get("delta_bias"),
                                    delta_softplus=params.get("delta_softplus", False),
                                    h0=params.get("initial_state"))
    elif case.variant == "mamba2":
        dt = x["dt"] + params.get("dt_bias", 0.0)
        if params.get("dt_softplus"):
            dt = np.log1p(np.exp(dt))
        args = dict(x, dt=dt)
        want_y = ssd_dual(**args, D=params.get("D"), h0=params.get("initial_state"))
        if "z" in params:
            want_y = want_y * params["z"] / (1 + np.exp(-params["z"]))
        want_h = ssd_loop(**args, h0=params.get("initial_state"))[1]
    else:
        a_bar, b_bar = _zoh_by_eigen(x["A"], x["B"], x["dt"], params.get("discretization", "zoh"))
        u = x["u"]
        want_h = params.get("initial_state", np.zeros(u.shape[:2] + (x["A"].shape[1],)))
        want_y = np.zeros(u.shape)
        for t in range(u.shape[2]):
            want_h = np.einsum("hnm,bhm->bhn", a_bar, want_h) + b_bar * u[:, :, t, None]
            want_y[:, :, t] = np.einsum("hn,bhn->bh", x["C"], want_h)
        if "D" in params:
            want_y = want_y + params["D"][:, None] * u
    close(out, want_y)
    close(state, want_h)

"""MoE routing and layers against loops written here from the formulas (VARIANTS F), never from
refattn's code: per token, Python loops over experts with ``math.fsum``; ranking with ``sorted`` by
``(-value, index)``; capacity by walking the assignments in priority order with a counter per
expert; losses from their definitions. Plus the edge cases a suspicious user would try: ties,
capacity at the exact boundary, perfectly balanced routing, numpy integers, every bad input.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import refattn
from refattn import moe
from refattn.block import FFN
from refattn.errors import ParameterError, RefattnError, ShapeError

from fd_variants import fd_grad


# -- the reference, from the formulas -----------------------------------------------------------------
def ref_route(x, w, *, k, scoring="softmax", normalize="none", order="softmax_then_topk", cap=None,
              policy="token_order", n_group=None, topk_group=None, group_score="top2_sum",
              selection_bias=None, router_bias=None, rsf=1.0):
    """Per-token loops: ``{"indices", "weights", "slot", "combine", "logits", "scores", "aux",
    "aux_hf", "z"}`` as nested lists / floats."""
    t_count, d = x.shape
    e_count = w.shape[1]
    sb = [0.0] * e_count if selection_bias is None else list(selection_bias)
    rb = [0.0] * e_count if router_bias is None else list(router_bias)
    out = {"indices": [], "weights": [], "logits": [], "scores": [], "norm_scores": []}
    for t in range(t_count):
        logits = [math.fsum(x[t, i] * w[i, e] for i in range(d)) + rb[e] for e in range(e_count)]
        if scoring == "softmax":
            m = max(logits)
            ex = [math.exp(l - m) for l in logits]
            z = math.fsum(ex)
            scores = [a / z for a in ex]
            norm = scores
        else:
            scores = [1.0 / (1.0 + math.exp(-l)) for l in logits]
            total = math.fsum(scores)
            norm = [s / total for s in scores]
        base = logits if order == "topk_then_softmax" else scores
        choice = [base[e] + sb[e] for e in range(e_count)]
        allowed = list(range(e_count))
        if n_group is not None:
            size = e_count // n_group
            gscore = []
            for g in range(n_group):
                vals = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
                gscore.append(vals[0] + vals[1] if group_score == "top2_sum" and size > 1 else vals[0])
            groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
            allowed = [e for g in sorted(groups) for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: (-choice[e], e))[:k]
        if scoring == "softmax" and order == "topk_then_softmax":
            m = max(logits[e] for e in chosen)
            ex = [math.exp(logits[e] - m) for e in chosen]
            raw = [a / math.fsum(ex) for a in ex]
        else:
            raw = [scores[e] for e in chosen]
        if normalize == "topk":
            total = math.fsum(raw)
            raw = [r / total for r in raw]
        out["indices"].append(chosen)
        out["weights"].append([r * rsf for r in raw])
        out["logits"].append(logits)
        out["scores"].append(scores)
        out["norm_scores"].append(norm)
    pairs = ([(t, j) for t in range(t_count) for j in range(k)] if policy == "token_order"
             else [(t, j) for j in range(k) for t in range(t_count)])
    count = [0] * e_count
    slot = [[-1] * k for _ in range(t_count)]
    for t, j in pairs:
        e = out["indices"][t][j]
        if cap is None or count[e] < cap:
            slot[t][j] = count[e]
            count[e] += 1
    combine = [[0.0] * e_count for _ in range(t_count)]
    for t in range(t_count):
        for j in range(k):
            if slot[t][j] >= 0:
                combine[t][out["indices"][t][j]] = out["weights"][t][j]
    n = [sum(1 for t in range(t_count) for e2 in out["indices"][t] if e2 == e) for e in range(e_count)]
    p = [math.fsum(out["norm_scores"][t][e] for t in range(t_count)) / t_count for e in range(e_count)]
    out["aux"] = e_count * math.fsum(n[e] / (t_count * k) * p[e] for e in range(e_count))
    out["aux_hf"] = e_count * math.fsum(n[e] / t_count * p[e] for e in range(e_count))
    lse = []
    for logits in out["logits"]:
        m = max(logits)
        lse.append(m + math.log(math.fsum(math.exp(l - m) for l in logits)))
    out["z"] = math.fsum(v * v for v in lse) / t_count
    out["slot"], out["combine"], out["kept_count"] = slot, combine, count
    return out


def ref_expert(xt, wg, wu, wd, act="silu"):
    """One SwiGLU expert on one token, with explicit sums."""
    d, f = wu.shape
    a = [math.fsum(xt[i] * wu[i, j] for i in range(d)) for j in range(f)]
    g = [math.fsum(xt[i] * wg[i, j] for i in range(d)) for j in range(f)]
    if act == "silu":
        h = [g[j] / (1.0 + math.exp(-g[j])) * a[j] for j in range(f)]
    else:  # relu
        h = [max(g[j], 0.0) * a[j] for j in range(f)]
    return np.array([math.fsum(h[j] * wd[j, i] for j in range(f)) for i in range(d)])


def data(t=24, d=6, e=8, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((t, d)), rng.standard_normal((d, e)) * scale / math.sqrt(d)


def assert_routing(r, ref, tol=1e-13):
    np.testing.assert_array_equal(r.indices, np.array(ref["indices"]))
    np.testing.assert_array_equal(r.slot, np.array(ref["slot"]))
    np.testing.assert_array_equal(r.dropped, np.array(ref["slot"]) < 0)
    np.testing.assert_array_equal(r.dispatch, np.array(ref["combine"]) != 0)
    np.testing.assert_array_equal(r.load, np.array(ref["kept_count"]))
    for name in ("weights", "combine", "logits", "scores"):
        np.testing.assert_allclose(getattr(r, name), np.array(ref[name]), rtol=tol, atol=tol, err_msg=name)


CONFIGS = [
    dict(k=1),
    dict(k=2),
    dict(k=3, normalize="topk"),
    dict(k=2, order="topk_then_softmax"),
    dict(k=2, scoring="sigmoid"),
    dict(k=2, scoring="sigmoid", normalize="topk", rsf=2.5),
    dict(k=2, rsf=0.3, normalize="topk"),
    dict(k=2, selection_bias=True),
    dict(k=2, scoring="sigmoid", normalize="topk", selection_bias=True, router_bias=True),
    dict(k=3, n_group=4, topk_group=2),
    dict(k=2, n_group=2, topk_group=1, group_score="max"),
    dict(k=4, scoring="sigmoid", normalize="topk", n_group=4, topk_group=2, selection_bias=True, rsf=2.5),
    dict(k=2, order="topk_then_softmax", selection_bias=True, n_group=4, topk_group=3),
]


def _kwargs(cfg, e, seed=3):
    rng = np.random.default_rng(seed)
    kw = {n: v for n, v in cfg.items() if n not in ("rsf", "selection_bias", "router_bias")}
    ref = dict(kw)
    if "rsf" in cfg:
        kw["routed_scaling_factor"] = ref["rsf"] = cfg["rsf"]
    for name in ("selection_bias", "router_bias"):
        if cfg.get(name):
            kw[name] = ref[name] = rng.standard_normal(e) * 0.3
    return kw, ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("capacity", [None, ("cf", 1.0), ("cf", 1.25), ("ec", 2)])
@pytest.mark.parametrize("policy", ["token_order", "choice_order"])
def test_route_equals_loops_from_the_formulas(cfg, capacity, policy):
    x, w = data()
    t, e = x.shape[0], w.shape[1]
    kw, ref_kw = _kwargs(cfg, e)
    cap = None
    if capacity is not None:
        what, value = capacity
        if what == "cf":
            kw["capacity_factor"] = value
            cap = math.ceil(value * t * cfg["k"] / e)  # exact here: 1.0, 1.25 are dyadic
        else:
            kw["expert_capacity"] = cap = value
    r = moe.route(x, w, drop_policy=policy, **kw)
    ref = ref_route(x, w, cap=cap, policy=policy, **ref_kw)
    assert r.capacity == cap
    assert_routing(r, ref)
    assert r.aux_loss == pytest.approx(ref["aux"], rel=1e-13)
    assert r.z_loss == pytest.approx(ref["z"], rel=1e-13)
    hf = moe.route(x, w, drop_policy=policy, aux_loss_form="hf_mixtral", **kw)
    assert hf.aux_loss == pytest.approx(ref["aux_hf"], rel=1e-13)
    assert hf.aux_loss == pytest.approx(cfg["k"] * r.aux_loss, rel=1e-13)  # HF's = k × Switch's
    if cap is not None and policy == "token_order":
        assert r.dropped.any()  # the cases really drop something


def test_tokens_are_the_rows_of_x_flattened_row_major():
    x, w = data(t=24)
    a = moe.route(x, w, k=2, capacity_factor=1.0)
    b = moe.route(x.reshape(4, 6, -1), w, k=2, capacity_factor=1.0)
    for name in ("indices", "weights", "slot", "combine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert b.token_shape == (4, 6)


# -- presets ---------------------------------------------------------------------------------------
def test_presets_are_their_published_formulas():
    x, w = data(e=8)
    # switch: y = p_{argmax} E_argmax, no renormalisation
    r = moe.route(x, w, preset="switch")
    p = np.exp(x @ w) / np.exp(x @ w).sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(r.indices[:, 0], np.argmax(p, axis=1))
    np.testing.assert_allclose(r.weights[:, 0], p.max(axis=1), rtol=1e-14)
    # mixtral: softmax over the top-2 logits == HF's softmax, top-2, renormalise
    r = moe.route(x, w, preset="mixtral")
    hf = moe.route(x, w, k=2, normalize="topk")
    np.testing.assert_array_equal(r.indices, hf.indices)
    np.testing.assert_allclose(r.weights, hf.weights, rtol=1e-14)
    l = x @ w
    top = np.sort(l, axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(r.weights, np.exp(top) / np.exp(top).sum(axis=1, keepdims=True), rtol=1e-14)
    # deepseek_v3: sigmoid, grouped, normalised over the selection, times 2.5
    x, w = data(e=64, t=10)
    b = np.random.default_rng(1).standard_normal(64) * 0.1
    r = moe.route(x, w, preset="deepseek_v3", selection_bias=b)
    ref = ref_route(x, w, k=8, scoring="sigmoid", normalize="topk", n_group=8, topk_group=4,
                    selection_bias=b, rsf=2.5)
    assert_routing(r, ref)
    np.testing.assert_allclose(r.weights.sum(axis=1), 2.5, rtol=1e-14)
    assert r.settings.routed_scaling_factor == 2.5 and r.settings.n_group == 8


def test_explicit_values_win_over_the_preset():
    x, w = data(e=8)
    r = moe.route(x, w, preset="deepseek_v3", k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    ref = ref_route(x, w, k=2, scoring="sigmoid", normalize="topk")
    assert_routing(r, ref)
    r = moe.route(x, w, preset="switch", k=2)
    assert r.k == 2 and r.settings.normalize == "none"


def test_preset_descriptions_name_formula_and_source():
    for name, preset in moe.PRESETS.items():
        assert preset.name == name and preset.formula and preset.source


# -- ties ------------------------------------------------------------------------------------------
def test_ties_go_to_the_lower_expert_index():
    x = np.ones((3, 4))
    w = np.zeros((4, 6))  # every logit 0: a six-way tie
    for kw in (dict(), dict(order="topk_then_softmax"), dict(scoring="sigmoid")):
        r = moe.route(x, w, k=3, **kw)
        np.testing.assert_array_equal(r.indices, [[0, 1, 2]] * 3)
    w = np.zeros((4, 6))
    w[:, 3] = w[:, 5] = 1.0  # experts 3 and 5 tie at the top, 0, 1, 2, 4 tie below
    r = moe.route(x, w, k=3)
    np.testing.assert_array_equal(r.indices, [[3, 5, 0]] * 3)
    # group ties: groups {0,1} {2,3} {4,5} all score equally -> groups 0 and 1 kept
    r = moe.route(x, np.zeros((4, 6)), k=2, n_group=3, topk_group=2)
    np.testing.assert_array_equal(r.indices, [[0, 1]] * 3)
    r = moe.route(x, np.zeros((4, 6)), k=3, n_group=3, topk_group=2, selection_bias=[0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(r.indices, [[4, 0, 1]] * 3)


def test_equal_selection_is_deterministic_across_calls_and_shapes():
    x = np.tile(np.random.default_rng(0).standard_normal((1, 4)), (5, 1))
    w = np.random.default_rng(1).standard_normal((4, 4))
    w[:, 2] = w[:, 1]  # experts 1 and 2 always tie
    r = moe.route(x, w, k=4)
    order = list(r.indices[0])
    assert order.index(1) < order.index(2)
    assert all((row == r.indices[0]).all() for row in r.indices)


# -- capacity --------------------------------------------------------------------------------------
def _all_to(expert, t, e, d=3, second=None):
    """Inputs routing every token to ``expert`` first (and ``second`` second)."""
    x = np.ones((t, d))
    w = np.zeros((d, e))
    w[:, expert] = 1.0
    if second is not None:
        w[:, second] = 0.5
    return x, w


@pytest.mark.parametrize("t, e, k, cf, want", [
    (8, 4, 1, 1.0, 2), (8, 4, 2, 1.0, 4), (10, 4, 1, 1.0, 3), (12, 4, 1, 1.0, 3),
    (13, 4, 1, 1.0, 4), (10, 1, 1, 1.1, 11), (10, 3, 1, 0.3, 1), (10, 3, 2, 0.9, 6),
    (7, 2, 1, 2.0, 7), (100, 8, 2, 1.25, 32), (3, 8, 1, 0.01, 1)])
def test_capacity_is_ceil_of_cf_t_k_over_e_exactly(t, e, k, cf, want):
    assert moe.capacity(cf, t, k, e) == want
    x, w = _all_to(0, t, e, second=1 if k > 1 else None)
    r = moe.route(x, w, k=k, capacity_factor=cf)
    assert r.capacity == want


def test_capacity_drops_overflow_at_the_exact_boundary_in_token_order():
    t, e = 12, 4
    x, w = _all_to(2, t, e)
    # C = ceil(1.0 * 12 / 4) = 3: tokens 0, 1, 2 keep expert 2, tokens 3.. are dropped
    r = moe.route(x, w, k=1, capacity_factor=1.0)
    assert r.capacity == 3
    np.testing.assert_array_equal(r.slot[:, 0], [0, 1, 2] + [-1] * 9)
    np.testing.assert_array_equal(r.load, [0, 0, 3, 0])
    # exactly C tokens: nothing dropped; C + 1: only the last
    for n, dropped in ((3, []), (4, [3])):
        r = moe.route(x[:n], w, k=1, expert_capacity=3)
        assert list(np.nonzero(r.dropped[:, 0])[0]) == dropped
    # expert_capacity = 0 drops everything; combine is then all zero
    r = moe.route(x, w, k=1, expert_capacity=0)
    assert r.dropped.all() and not r.combine.any() and not r.dispatch.any()


def test_choice_order_differs_from_token_order_as_documented():
    # token 0 prefers 0 then 1; token 1 prefers 1 then 0; capacity 1 per expert
    x = np.eye(2)
    w = np.array([[2.0, 1.0], [1.0, 2.0]])
    tok = moe.route(x, w, k=2, expert_capacity=1, drop_policy="token_order")
    cho = moe.route(x, w, k=2, expert_capacity=1, drop_policy="choice_order")
    # token order: token 0 takes expert 0 and expert 1 (its second choice); token 1 gets nothing
    np.testing.assert_array_equal(tok.dropped, [[False, False], [True, True]])
    # choice order: every first choice first -> token 0 keeps 0, token 1 keeps 1, seconds dropped
    np.testing.assert_array_equal(cho.dropped, [[False, True], [False, True]])


def test_dispatch_and_combine_tensors():
    x, w = data()
    r = moe.route(x, w, k=2, capacity_factor=1.0)
    dt = r.dispatch_tensor()
    assert dt.shape == (24, 8, r.capacity) and dt.sum() == (~r.dropped).sum()
    np.testing.assert_array_equal(dt.any(axis=2), r.dispatch)
    assert (dt.sum(axis=0) <= 1).all()  # one token per buffer slot
    np.testing.assert_array_equal(r.combine_tensor().sum(axis=2), r.combine)
    with pytest.raises(ParameterError, match=r"^capacity:"):
        moe.route(x, w, k=2).dispatch_tensor()


# -- losses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_is_one_for_perfectly_balanced_routing(k):
    e = 6
    # token t: logits high on experts t, t+1, ..., t+k-1 (mod E): circulant, so every expert is chosen
    # by exactly k tokens (f_e = 1/E) and every expert's mean probability is 1/E
    x = np.eye(e)
    w = np.zeros((e, e))
    for t in range(e):
        for j in range(k):
            w[t, (t + j) % e] = 2.0 - 0.1 * j
    r = moe.route(x, w, k=k)
    np.testing.assert_array_equal(np.bincount(r.indices.ravel(), minlength=e), [k] * e)
    assert abs(r.aux_loss - 1.0) < 1e-14
    assert abs(moe.route(x, w, k=k, aux_loss_form="hf_mixtral").aux_loss - k) < 1e-13
    # the opposite extreme: every token on the same k experts with probability ~1 gives ~E/k
    xs, ws = _all_to(0, 10, e, second=1)
    r = moe.route(xs * 40, ws, k=1)
    assert r.aux_loss == pytest.approx(e, rel=1e-12)


def test_aux_loss_of_sigmoid_scores_uses_scores_normalised_per_token():
    x, w = data()
    r = moe.route(x, w, k=2, scoring="sigmoid")
    s = 1 / (1 + np.exp(-(x @ w)))
    p = (s / s.sum(axis=1, keepdims=True)).mean(axis=0)
    f = np.bincount(r.indices.ravel(), minlength=8) / (24 * 2)
    assert r.aux_loss == pytest.approx(8 * np.sum(f * p), rel=1e-13)


def test_z_loss_is_the_mean_squared_logsumexp():
    x, w = data(scale=30.0)  # large logits: a naive exp would overflow in float32, not here
    r = moe.route(x, w, k=2)
    l = x @ w
    lse = [max(row) + math.log(math.fsum(math.exp(v - max(row)) for v in row)) for row in l]
    assert r.z_loss == pytest.approx(math.fsum(v * v for v in lse) / len(lse), rel=1e-13)


def test_aux_loss_counts_assignments_before_capacity():
    x, w = _all_to(1, 12, 4)
    full = moe.route(x, w, k=1)
    capped = moe.route(x, w, k=1, expert_capacity=1)
    assert capped.aux_loss == full.aux_loss and capped.load.sum() == 1


# -- experts ---------------------------------------------------------------------------------------
def experts(e=8, d=6, f=5, seed=4, gated=True):
    rng = np.random.default_rng(seed)
    return FFN(w_up=rng.standard_normal((e, d, f)) / math.sqrt(d),
               w_down=rng.standard_normal((e, f, d)) / math.sqrt(f),
               w_gate=rng.standard_normal((e, d, f)) / math.sqrt(d) if gated else None)


@pytest.mark.parametrize("kw", [dict(k=2), dict(k=2, capacity_factor=1.0), dict(preset="mixtral"),
                                dict(k=3, scoring="sigmoid", normalize="topk", routed_scaling_factor=2.5)])
def test_moe_forward_equals_loops(kw):
    x, w = data()
    ex = experts()
    r = moe.route(x, w, **kw)
    y = moe.moe_forward(x, r, ex)
    want = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(r.k):
            if r.slot[t, j] >= 0:
                e = r.indices[t, j]
                want[t] += r.weights[t, j] * ref_expert(x[t], ex.w_gate[e], ex.w_up[e], ex.w_down[e])
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)


def test_shared_experts_are_added_with_weight_one_and_dropped_tokens_give_zero():
    x, w = _all_to(0, 6, 4)
    x = x + np.random.default_rng(0).standard_normal(x.shape) * 0.01
    ex = experts(e=4, d=3)
    r = moe.route(x, w, k=1, expert_capacity=2)
    y = moe.moe_forward(x, r, ex)
    assert np.all(y[2:] == 0.0)  # tokens 2.. dropped: nothing (the block's residual passes them)
    rng = np.random.default_rng(2)
    sh = FFN(rng.standard_normal((3, 4)), rng.standard_normal((4, 3)), rng.standard_normal((3, 4)))
    ys = moe.moe_forward(x, r, ex, shared_experts=sh)
    for t in range(6):
        np.testing.assert_allclose(ys[t] - y[t], ref_expert(x[t], sh.w_gate, sh.w_up, sh.w_down),
                                   rtol=1e-12, atol=1e-14)
    # stacked shared experts are summed: two halves of a wide MLP = the wide MLP (DeepSeek's merge)
    halves = FFN(np.stack([sh.w_up[:, :2], sh.w_up[:, 2:]]), np.stack([sh.w_down[:2], sh.w_down[2:]]),
                 np.stack([sh.w_gate[:, :2], sh.w_gate[:, 2:]]))
    np.testing.assert_allclose(moe.moe_forward(x, r, ex, shared_experts=halves), ys, rtol=1e-13, atol=1e-15)


def test_plain_relu_experts_without_gate():
    x, w = data()
    ex = experts(gated=False)
    r = moe.route(x, w, preset="switch")
    y = moe.moe_forward(x, r, FFN(ex.w_up, ex.w_down, activation="relu"))
    e0 = r.indices[:, 0]
    want = np.stack([r.weights[t, 0] * (np.maximum(x[t] @ ex.w_up[e], 0) @ ex.w_down[e])
                     for t, e in enumerate(e0)])
    np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-15)


# -- backward --------------------------------------------------------------------------------------
BACKWARD = [dict(k=2), dict(k=2, normalize="topk"), dict(preset="mixtral"), dict(k=1, preset="switch"),
            dict(k=3, scoring="sigmoid", normalize="topk", routed_scaling_factor=2.5),
            dict(k=2, scoring="sigmoid"), dict(k=2, capacity_factor=1.0)]


@pytest.mark.parametrize("kw", BACKWARD, ids=[str(k) for k in BACKWARD])
def test_moe_layer_backward_matches_finite_differences(kw):
    rng = np.random.default_rng(5)
    x, w = data(t=10, d=4, e=6)
    ex = experts(e=6, d=4, f=3)
    arrays = {"x": x, "w_router": w, "w_gate": np.array(ex.w_gate), "w_up": np.array(ex.w_up),
              "w_down": np.array(ex.w_down)}
    params = dict(kw, router_bias=rng.standard_normal(6) * 0.1,
                  shared_w_up=rng.standard_normal((4, 3)), shared_w_down=rng.standard_normal((3, 4)),
                  shared_w_gate=rng.standard_normal((4, 3)))
    dout = rng.standard_normal(x.shape)

    def loss():
        return float(np.sum(refattn.attention(variant="moe_layer", **arrays, **params) * dout))

    g = refattn.attention_backward(variant="moe_layer", dout=dout, **arrays, **params)
    assert set(g) == {"x", "w_router", "w_gate", "w_up", "w_down", "router_bias", "shared_w_up",
                      "shared_w_down", "shared_w_gate"}
    targets = dict(arrays)
    targets.update({n: params[n] for n in ("router_bias", "shared_w_up", "shared_w_down", "shared_w_gate")})
    for name, arr in targets.items():
        for idx, want in fd_grad(loss, arr, eps=1e-6, max_entries=15).items():
            assert abs(g[name][idx] - want) <= 1e-7 * max(1.0, abs(want)), (name, idx, g[name][idx], want)


def test_router_gradient_flows_only_through_kept_assignments():
    x, w = _all_to(0, 6, 4)
    x = x + np.random.default_rng(0).standard_normal(x.shape) * 0.01
    ex = experts(e=4, d=3)
    r = moe.route(x, w, k=1, expert_capacity=2)
    g = moe.moe_backward(x, w, r, ex, np.ones_like(x))
    assert np.all(g["x"][2:] == 0) and np.all(g["weights"][2:] == 0)


# -- through the one call --------------------------------------------------------------------------
def test_moe_topk_through_the_one_call_returns_route():
    x, w = data()
    got = refattn.attention(x, w, variant="moe_topk", preset="mixtral", capacity_factor=1.0,
                            return_indices=True, return_dispatch=True, return_aux_loss=True)
    r = moe.route(x, w, preset="mixtral", capacity_factor=1.0)
    np.testing.assert_array_equal(got[0], r.combine)
    np.testing.assert_array_equal(got[1], r.indices)
    np.testing.assert_array_equal(got[2], r.dispatch)
    assert float(got[3]) == r.aux_loss


def test_moe_layer_example_for_every_preset():
    var = refattn.variants.get("moe_layer")
    for preset in moe.PRESETS:
        params = {"preset": preset}
        arrays = var.example((1, 4, 12, 12, 8, 4), np.random.default_rng(0), var.parse_params(params))
        out, combine = refattn.attention(variant="moe_layer", **arrays, **params, return_combine=True)
        assert out.shape == (1, 12, 8) and combine.shape[0] == 12
    # deepseek_v3's 8 groups and k = 8 need E >= 32: the example makes enough experts
    assert arrays["w_router"].shape[1] >= 32


def test_numpy_integers_are_accepted_for_integer_parameters():
    x, w = data()
    a = moe.route(x, w, k=np.int64(2), expert_capacity=np.int32(3), n_group=np.int16(4),
                  topk_group=np.uint8(2))
    b = moe.route(x, w, k=2, expert_capacity=3, n_group=4, topk_group=2)
    np.testing.assert_array_equal(a.combine, b.combine)
    c = moe.route(x, w, k=2, capacity_factor=np.float32(1.25))
    assert c.capacity == moe.route(x, w, k=2, capacity_factor=1.25).capacity


# -- bad input -------------------------------------------------------------------------------------
def _bad(**kw):
    x, w = data()
    args = {"x": x, "w_router": w}
    args.update({n: kw.pop(n) for n in ("x", "w_router") if n in kw})
    return args, kw


@pytest.mark.parametrize("kw, match", [
    (dict(k=9), r"^k: expected an integer in \[1, 8\]"),
    (dict(k=0), r"^k: expected an integer in \[1, 8\]"),
    (dict(k=2.0), r"^k: expected an integer"),
    (dict(k=True), r"^k: expected an integer"),
    (dict(capacity_factor=0), r"^capacity_factor: expected a finite number > 0"),
    (dict(capacity_factor=-1.0), r"^capacity_factor: expected a finite number > 0"),
    (dict(capacity_factor=float("nan")), r"^capacity_factor: expected a finite number > 0"),
    (dict(capacity_factor=float("inf")), r"^capacity_factor: expected a finite number > 0"),
    (dict(capacity_factor=True), r"^capacity_factor: expected a finite number > 0"),
    (dict(capacity_factor=1.0, expert_capacity=2), r"^capacity_factor: expected either"),
    (dict(expert_capacity=-1), r"^expert_capacity: expected an integer >= 0"),
    (dict(n_group=3, topk_group=1), r"^n_group: expected a divisor of the E = 8 experts, got 3"),
    (dict(n_group=4), r"^topk_group: expected n_group and topk_group together"),
    (dict(topk_group=2), r"^n_group: expected n_group and topk_group together"),
    (dict(n_group=4, topk_group=5), r"^topk_group: expected an integer in \[1, n_group = 4\]"),
    (dict(n_group=8, topk_group=2), r"^n_group: group_score='top2_sum' sums"),
    (dict(k=5, n_group=4, topk_group=2), r"^k: expected at most topk_group"),
    (dict(scoring="relu"), r"^scoring: expected one of 'softmax', 'sigmoid'"),
    (dict(normalize="all"), r"^normalize: expected one of"),
    (dict(order="sideways"), r"^order: expected one of"),
    (dict(scoring="sigmoid", order="topk_then_softmax"), r"^order: 'topk_then_softmax'"),
    (dict(drop_policy="random"), r"^drop_policy: expected one of"),
    (dict(aux_loss_form="gshard"), r"^aux_loss_form: expected one of"),
    (dict(group_score="mean", n_group=2, topk_group=1), r"^group_score: expected one of"),
    (dict(preset="gpt4"), r"^preset: expected one of 'switch', 'mixtral', 'deepseek_v3'"),
    (dict(routed_scaling_factor=0.0), r"^routed_scaling_factor: expected a finite number > 0"),
    (dict(selection_bias=np.ones(7)), r"^selection_bias: expected shape \(8,\)"),
    (dict(router_bias=np.ones((1, 8))), r"^router_bias: expected shape \(8,\)"),
    (dict(w_router=np.ones((5, 8))), r"^w_router: expected shape \(6, n\)"),
    (dict(x=np.ones(6)), r"^x: expected \(\.\.\., d\) with at least one token"),
    (dict(x=np.ones((0, 6))), r"^x: expected \(\.\.\., d\) with at least one token"),
])
def test_bad_input_is_a_named_error(kw, match):
    args, kw = _bad(**kw)
    with pytest.raises(RefattnError, match=match):
        moe.route(args["x"], args["w_router"], **kw)


@pytest.mark.parametrize("name", ["x", "w_router", "selection_bias", "router_bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected_in_every_router_array(name, value):
    x, w = data()
    arrays = {"x": x, "w_router": w, "selection_bias": np.zeros(8), "router_bias": np.zeros(8)}
    arrays[name] = arrays[name].copy()
    arrays[name].flat[3] = value
    with pytest.raises(ParameterError, match=rf"^{name}: expected finite values, got 1 (NaN|\+inf|-inf) entries"):
        refattn.attention(variant="moe_topk", **arrays)


@pytest.mark.parametrize("name", ["w_gate", "w_up", "w_down", "shared_w_up"])
def test_nan_in_expert_weights_is_rejected(name):
    var = refattn.variants.get("moe_layer")
    arrays = var.example((1, 4, 6, 6, 4, 4), np.random.default_rng(0), var.parse_params({}))
    rng = np.random.default_rng(1)
    params = {"shared_w_up": rng.standard_normal((4, 3)), "shared_w_down": rng.standard_normal((3, 4))}
    target = arrays if name in arrays else params
    target[name] = target[name].copy()
    target[name].flat[0] = np.nan
    with pytest.raises(ParameterError, match=rf"{name}: expected finite values"):
        refattn.attention(variant="moe_layer", **arrays, **params)


def test_expert_shapes_are_checked_against_the_router():
    x, w = data()
    r = moe.route(x, w, k=2)
    ex = experts(e=7)
    with pytest.raises(ShapeError, match=r"^experts.w_up: expected 8 experts"):
        moe.moe_forward(x, r, ex)
    with pytest.raises(ShapeError, match=r"^experts.w_up: expected \(E, d, f\) with d = 6"):
        moe.moe_forward(x, r, FFN(np.ones((8, 5, 2)), np.ones((8, 2, 5))))
    with pytest.raises(ShapeError, match=r"^routing: expected a routing of the 23 tokens"):
        moe.moe_forward(x[:23], r, experts())
    with pytest.raises(ParameterError, match=r"^shared_w_up: shared experts need"):
        refattn.attention(variant="moe_layer", x=x, w_router=w, w_gate=np.ones((8, 6, 2)),
                          w_up=np.ones((8, 6, 2)), w_down=np.ones((8, 2, 6)), shared_w_gate=np.ones((6, 2)))


# -- refattn compare ---------------------------------------------------------------------------------
def compare(*args):
    from click.testing import CliRunner
    from refattn.cli.main import cli
    return CliRunner().invoke(cli, ["compare", *args], catch_exceptions=False)


def compare_json(*args):
    import json
    res = compare("--json", *args)
    assert res.exit_code in (0, 1), (res.output, res.stderr)
    return res.exit_code, json.loads(res.stdout)


def test_compare_moe_topk_prints_pass_and_the_routing_agreement():
    res = compare("--variant", "moe_topk")
    assert res.exit_code == 0, res.output
    assert "routing (from dispatch): all 128 tokens went to the same experts" in res.output
    assert res.output.rstrip().splitlines()[-1].startswith("PASS")


def test_compare_impl_gets_the_inputs_by_name_made_from_the_seed():
    import moe_impls
    code, data = compare_json("--variant", "moe_topk", "--impl", "moe_impls:router", "--seed", "7",
                              "--param", "normalize=topk")
    assert code == 0 and data["verdict"] == "PASS"
    assert set(data["arrays"]) == {"out", "indices"}  # what the function returned is compared
    assert data["routing"]["source"] == "indices" and data["routing"]["disagreeing"] == 0
    # the documented order: x (B, Sq, D) first, then w_router (D, E) / sqrt(D), E = 2·Hq
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 64, 16))
    w = rng.standard_normal((16, 8)) / 4.0
    np.testing.assert_array_equal(moe_impls.SEEN["x"], x)
    np.testing.assert_array_equal(moe_impls.SEEN["w_router"], w)
    assert moe_impls.SEEN["params"] == {"k": 2, "normalize": "topk"}  # the given parameters only


def test_compare_reports_which_token_went_to_which_other_expert():
    import moe_impls
    code, data = compare_json("--variant", "moe_topk", "--impl", "moe_impls:router_wrong_token")
    assert code == 1 and data["verdict"] == "FAIL"
    p = moe_impls._probs(moe_impls.SEEN["x"], moe_impls.SEEN["w_router"])[5]
    first, second, third = (int(e) for e in np.argsort(-p, kind="stable")[:3])
    rep = data["routing"]
    assert rep["disagreeing"] == 1 and rep["tokens"] == 128 and rep["token_shape"] == [2, 64]
    assert rep["first"] == [{"token": 5, "position": [0, 5], "under_test": sorted([first, third]),
                             "reference": sorted([first, second]), "only_under_test": [third],
                             "only_reference": [second]}]
    text = compare("--variant", "moe_topk", "--impl", "moe_impls:router_wrong_token").output
    assert (f"token 5 (0, 5): experts {sorted([first, third])} under test, "
            f"{sorted([first, second])} in the reference: to [{third}] instead of [{second}]") in text


def test_compare_impl_with_torch_tensors():
    pytest.importorskip("torch")
    code, data = compare_json("--variant", "moe_topk", "--impl", "moe_impls:torch_router",
                              "--framework", "torch")
    assert code == 0 and data["routing"]["disagreeing"] == 0


@pytest.mark.parametrize("args, needle", [
    (("--variant", "moe_topk", "--impl", "moe_impls:router", "--adapter", "sdpa"),
     "--adapter sdpa: expected a variant on q, k, v; variant 'moe_topk' takes x, w_router"),
    (("--variant", "moe_topk", "--impl", "moe_impls:router", "--dtype", "bf16"),
     "--dtype: --impl on variant 'moe_topk' (inputs x, w_router) compares float64 outputs only"),
    (("--variant", "moe_layer", "--impl", "moe_impls:router", "--grad", "--framework", "torch"),
     "--grad: --impl on variant 'moe_layer'"),
    (("--variant", "moe_topk", "--impl", "moe_impls:router_unknown_output"),
     "impl: returned output 'experts', which variant 'moe_topk' does not have"),
    (("--variant", "moe_topk", "--param", "k=0"), "k: expected an integer in [1, 8]"),
    (("--variant", "moe_topk", "--param", "capacity_factor=-1"), "capacity_factor: expected a finite number > 0"),
])
def test_compare_usage_errors_are_one_line(args, needle):
    res = compare(*args)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and needle in err, err


def test_compare_golden_cases_of_the_family():
    for case in ("moe_topk_switch_capacity", "moe_layer_deepseek_v3_shared"):
        res = compare("--case", case, "--against", "golden")
        assert res.exit_code == 0, res.output
        assert "tokens went to the same experts" in res.output


def test_other_families_get_no_routing_report():
    code, data = compare_json("--variant", "sdpa", "--shape", "1,2,8,4", "--backend", "numpy")
    assert code == 0 and data["routing"] is None


def test_extreme_logits_keep_exact_normalised_weights():
    # every sigmoid score underflows (logits ~ -800): s / Σ s is still defined; its limit, and the
    # float64 value, is the softmax over the selected logits (log sigmoid(l) = l + O(e^l))
    x = np.ones((2, 1))
    w = np.array([[-800.0, -801.0, -805.0, -900.0]])
    r = moe.route(x, w, k=2, scoring="sigmoid", normalize="topk", routed_scaling_factor=2.5)
    np.testing.assert_array_equal(r.indices, [[0, 1]] * 2)
    want = 2.5 * np.exp([0.0, -1.0]) / (1 + math.exp(-1.0))
    np.testing.assert_allclose(r.weights, [want] * 2, rtol=1e-15)
    assert np.isfinite(r.aux_loss) and np.isfinite(r.z_loss)
    # softmax scoring where a selection bias picks experts whose probabilities underflow
    w = np.array([[0.0, -1000.0, -1001.0]])
    r = moe.route(x, w, k=2, normalize="topk", selection_bias=[-1.0, 1.0, 1.0])
    np.testing.assert_array_equal(r.indices, [[1, 2]] * 2)
    np.testing.assert_allclose(r.weights, [[1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))]] * 2,
                               rtol=1e-15)
    # moderate logits: the log-space evaluation is r / Σ r to rounding
    xs, ws = data()
    r = moe.route(xs, ws, k=3, scoring="sigmoid", normalize="topk")
    s = 1 / (1 + np.exp(-(xs @ ws)))
    raw = np.take_along_axis(s, r.indices, 1)
    np.testing.assert_allclose(r.weights, raw / raw.sum(1, keepdims=True), rtol=1e-15, atol=0)


def test_overflowing_logits_are_a_named_error():
    x = np.full((2, 3), 1e200)
    with pytest.raises(ParameterError, match=r"^x: the logits x @ w_router overflow float64"):
        moe.route(x, np.full((3, 4), 1e200), k=1)

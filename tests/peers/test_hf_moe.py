"""MoE routers and sparse MLPs against HF transformers in float64: Mixtral (``MixtralTopKRouter``,
``MixtralSparseMoeBlock``, ``load_balancing_loss_func``), Switch Transformers
(``SwitchTransformersTop1Router`` with expert capacity, ``SwitchTransformersSparseMLP``,
``router_z_loss_func``, ``load_balancing_loss_func``) and DeepSeek-V3 (``DeepseekV3TopkRouter`` with
group-limited routing and the score-correction bias, ``DeepseekV3MoE`` with its shared expert).

Tiny randomly initialised configs (no download), float64 weights (``hf_float64.randomise``). HF's
float32 casts are patched as :mod:`hf_float64` describes (VARIANTS H): Mixtral's
``router_logits.float()`` and DeepSeek's ``.type(torch.float32)`` keep float64, and Switch's router
gets ``router.dtype = torch.float64`` (its ``router_dtype``, default float32). One exception is
compared at float32 rounding instead (rtol 1e-6): HF's two ``load_balancing_loss_func`` count
tokens in float32 (Mixtral's in ``torch.float32`` buffers it allocates itself, Switch's after
``expert_mask.to(torch.float32)`` of an integer mask), which the patch does not touch. The last test shows the patch is what
closes the gap (without it, the router weights differ at float32 size).

HF's ``topk(..., sorted=False)`` (DeepSeek) returns the k experts in no particular order, so those
comparisons sort each token's experts first.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers import DeepseekV3Config, MixtralConfig, SwitchTransformersConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3MoE, DeepseekV3TopkRouter)
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock, MixtralTopKRouter, load_balancing_loss_func as mixtral_aux)
from transformers.models.switch_transformers.modeling_switch_transformers import (  # noqa: E402
    SwitchTransformersSparseMLP, SwitchTransformersTop1Router, load_balancing_loss_func as switch_aux,
    router_z_loss_func)

from refattn import moe  # noqa: E402
from refattn.block import FFN  # noqa: E402

from .hf_float64 import keep_float64, normwise, np64, randomise  # noqa: E402

pytestmark = pytest.mark.peers

D, E, F = 16, 8, 12


@pytest.fixture
def f64(monkeypatch):
    keep_float64(monkeypatch)


def hidden(b, s, seed=0):
    return torch.tensor(np.random.default_rng(seed).standard_normal((b, s, D)))


def stacked_experts(experts):
    """HF's fused ``gate_up_proj (E, 2f, d)`` / ``down_proj (E, d, f)`` as refattn's stacked FFN."""
    gu, down = np64(experts.gate_up_proj), np64(experts.down_proj)
    f = gu.shape[1] // 2
    return FFN(w_gate=gu[:, :f].transpose(0, 2, 1), w_up=gu[:, f:].transpose(0, 2, 1),
               w_down=down.transpose(0, 2, 1))


# -- Mixtral ---------------------------------------------------------------------------------------
def mixtral_config(k=2):
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = "eager"
    return cfg


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mixtral_router_matches(f64, k):
    router = randomise(MixtralTopKRouter(mixtral_config(k)), seed=k)
    x = hidden(2, 9, seed=k)
    with torch.no_grad():
        logits, weights, indices = router(x)
    w_router = np64(router.weight).T
    for kw in ({"preset": "mixtral", "k": k}, {"k": k, "normalize": "topk"}):
        r = moe.route(np64(x), w_router, **kw)
        np.testing.assert_array_equal(r.indices, indices.numpy())
        assert normwise(r.weights, np64(weights)) <= 1e-14
        assert normwise(r.logits, np64(logits)) <= 1e-14


def test_mixtral_sparse_moe_block_matches(f64):
    cfg = mixtral_config()
    block = randomise(MixtralSparseMoeBlock(cfg), seed=11)
    x = hidden(2, 7, seed=3)
    with torch.no_grad():
        y = block(x)
    r = moe.route(np64(x), np64(block.gate.weight).T, preset="mixtral")
    ours = moe.moe_forward(np64(x), r, stacked_experts(block.experts))
    assert normwise(ours, np64(y)) <= 1e-13


def test_mixtral_aux_loss_is_k_times_switch_and_matches_hf_at_float32_rounding(f64):
    router = randomise(MixtralTopKRouter(mixtral_config()), seed=5)
    x = hidden(3, 10, seed=5)
    with torch.no_grad():
        logits, _, _ = router(x)
        hf = float(mixtral_aux((logits,), num_experts=E, top_k=2))
    r = moe.route(np64(x), np64(router.weight).T, preset="mixtral", aux_loss_form="hf_mixtral")
    # HF accumulates counts and probabilities in float32 buffers of its own: float32 rounding
    assert r.aux_loss == pytest.approx(hf, rel=1e-6)
    switch = moe.route(np64(x), np64(router.weight).T, preset="mixtral")
    assert r.aux_loss == pytest.approx(2 * switch.aux_loss, rel=1e-14)


# -- Switch Transformers ----------------------------------------------------------------------------
def switch_router(capacity, seed):
    cfg = SwitchTransformersConfig(d_model=D, d_ff=F, num_experts=E, expert_capacity=capacity,
                                   router_bias=False)
    cfg._experts_implementation = "eager"
    return cfg


@pytest.mark.parametrize("capacity", [1, 2, 4, 64])
def test_switch_router_with_expert_capacity_matches(capacity):
    cfg = switch_router(capacity, 0)
    router = randomise(SwitchTransformersTop1Router(cfg), seed=capacity)
    router.dtype = torch.float64  # HF's router_dtype (default float32), read in forward
    x = hidden(2, 12, seed=capacity)
    with torch.no_grad():
        expert_index, probs, logits = router(x)
    w_router = np64(router.classifier.weight).T
    for b in range(2):  # HF applies expert_capacity per sequence (cumsum over the sequence axis)
        r = moe.route(np64(x[b]), w_router, preset="switch", expert_capacity=capacity)
        np.testing.assert_array_equal(r.dispatch, expert_index[b].numpy().astype(bool))
        assert normwise(r.weights[:, 0], np64(probs[b, :, 0])) <= 1e-15
        assert normwise(r.logits, np64(logits[b])) <= 1e-15
        if capacity < 4:
            assert r.dropped.any()


def test_switch_losses_match():
    cfg = switch_router(4, 0)
    router = randomise(SwitchTransformersTop1Router(cfg), seed=7)
    router.dtype = torch.float64
    x = hidden(3, 10, seed=7)
    with torch.no_grad():
        _, _, logits = router(x)
        z = float(router_z_loss_func(logits))
        aux = float(switch_aux(torch.softmax(logits, dim=-1), logits.argmax(dim=-1)))
    w_router = np64(router.classifier.weight).T
    r_all = moe.route(np64(x), w_router, preset="switch")
    assert r_all.z_loss == pytest.approx(z, rel=1e-14)
    # HF's aux loss is the mean over sequences (groups) of each sequence's Switch loss; HF turns the
    # integer expert mask into float32 (`expert_mask.to(torch.float32)`) before averaging it, so
    # the token fractions carry float32 rounding: compared at rtol 1e-6
    per_seq = [moe.route(np64(x[b]), w_router, preset="switch").aux_loss for b in range(3)]
    assert float(np.mean(per_seq)) == pytest.approx(aux, rel=1e-6)


@pytest.mark.parametrize("capacity", [2, 64])
def test_switch_sparse_mlp_matches(capacity):
    cfg = switch_router(capacity, 0)
    mlp = randomise(SwitchTransformersSparseMLP(cfg), seed=13)
    mlp.router.dtype = torch.float64
    x = hidden(2, 10, seed=13)
    with torch.no_grad():
        y = mlp(x)
    w_router = np64(mlp.router.classifier.weight).T
    wi = np.stack([np64(mlp.experts[f"expert_{e}"].wi.weight).T for e in range(E)])
    wo = np.stack([np64(mlp.experts[f"expert_{e}"].wo.weight).T for e in range(E)])
    experts = FFN(wi, wo, activation="relu")  # T5's DenseReluDense: wo(relu(wi(x)))
    ours = np.stack([moe.moe_forward(np64(x[b]), moe.route(np64(x[b]), w_router, preset="switch",
                                                           expert_capacity=capacity), experts)
                     for b in range(2)])
    assert normwise(ours, np64(y)) <= 1e-13
    if capacity == 2:
        assert np.any(np.all(ours == 0, axis=-1))  # dropped tokens: 0 from the MLP, like HF


# -- DeepSeek-V3 -----------------------------------------------------------------------------------
def deepseek_config(e=16, k=4, n_group=4, topk_group=2, norm=True, shared=1):
    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=e,
                           num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                           norm_topk_prob=norm, n_shared_experts=shared, routed_scaling_factor=2.5)
    cfg._experts_implementation = "eager"
    return cfg


def sorted_by_expert(indices, weights):
    order = np.argsort(indices, axis=1)
    return np.take_along_axis(indices, order, 1), np.take_along_axis(weights, order, 1)


@pytest.mark.parametrize("e, k, n_group, topk_group, norm", [
    (16, 4, 4, 2, True), (16, 4, 4, 2, False), (32, 8, 8, 4, True), (8, 2, 1, 1, True),
    (12, 3, 3, 1, True)])
def test_deepseek_v3_router_matches(f64, e, k, n_group, topk_group, norm):
    cfg = deepseek_config(e, k, n_group, topk_group, norm)
    router = randomise(DeepseekV3TopkRouter(cfg), seed=e + k)
    x = hidden(2, 9, seed=e)
    with torch.no_grad():
        logits, weights, indices = router(x)
    r = moe.route(np64(x), np64(router.weight).T, preset="deepseek_v3", k=k, n_group=n_group,
                  topk_group=topk_group, normalize="topk" if norm else "none",
                  selection_bias=np64(router.e_score_correction_bias))
    got_i, got_w = sorted_by_expert(r.indices, r.weights)
    want_i, want_w = sorted_by_expert(indices.numpy(), np64(weights))
    np.testing.assert_array_equal(got_i, want_i)
    assert normwise(got_w, want_w) <= 1e-14
    assert normwise(r.logits, np64(logits)) <= 1e-14
    # the correction bias changes the selection, never the weights: they are the plain sigmoid's
    s = 1 / (1 + np.exp(-r.logits))
    raw = np.take_along_axis(s, r.indices, 1)
    want = raw / raw.sum(1, keepdims=True) if norm else raw
    np.testing.assert_allclose(r.weights, 2.5 * want, rtol=1e-14)


def test_deepseek_v3_group_limit_is_really_exercised(f64):
    cfg = deepseek_config(16, 4, 4, 1)
    router = randomise(DeepseekV3TopkRouter(cfg), seed=3)
    x = hidden(1, 20, seed=3)
    with torch.no_grad():
        _, _, indices = router(x)
    r = moe.route(np64(x), np64(router.weight).T, preset="deepseek_v3", k=4, n_group=4, topk_group=1,
                  selection_bias=np64(router.e_score_correction_bias))
    free = moe.route(np64(x), np64(router.weight).T, preset="deepseek_v3", k=4, n_group=1, topk_group=1,
                     selection_bias=np64(router.e_score_correction_bias))
    assert (np.sort(r.indices, 1) != np.sort(free.indices, 1)).any()  # the limit changed choices
    assert (np.ptp(r.indices // 4, axis=1) == 0).all()  # one group per token, as asked
    np.testing.assert_array_equal(np.sort(r.indices, 1), np.sort(indices.numpy(), 1))


@pytest.mark.parametrize("shared", [1, 2])
def test_deepseek_v3_moe_with_shared_experts_matches(f64, shared):
    cfg = deepseek_config(16, 4, 4, 2, shared=shared)
    block = randomise(DeepseekV3MoE(cfg), seed=21 + shared)
    x = hidden(2, 8, seed=21)
    with torch.no_grad():
        y = block(x)
    r = moe.route(np64(x), np64(block.gate.weight).T, preset="deepseek_v3", k=4, n_group=4,
                  topk_group=2, selection_bias=np64(block.gate.e_score_correction_bias))
    se = block.shared_experts
    shared_ffn = FFN(np64(se.up_proj.weight).T, np64(se.down_proj.weight).T, np64(se.gate_proj.weight).T)
    ours = moe.moe_forward(np64(x), r, stacked_experts(block.experts), shared_experts=shared_ffn)
    assert normwise(ours, np64(y)) <= 1e-13


def test_without_the_patch_hf_rounds_router_weights_to_float32():
    router = randomise(MixtralTopKRouter(mixtral_config()), seed=2)
    x = hidden(2, 9, seed=2)
    with torch.no_grad():
        _, weights, indices = router(x)
    r = moe.route(np64(x), np64(router.weight).T, preset="mixtral")
    np.testing.assert_array_equal(r.indices, indices.numpy())
    err = normwise(r.weights, np64(weights))
    assert 1e-12 < err < 1e-6, err  # float32 rounding, not a semantic difference

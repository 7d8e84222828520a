"""Golden cases of the linear family (VARIANTS section E): linear, performer, gla, simple_gla,
retention, delta_rule, gated_delta_rule, rwkv -- each in more than one form, with initial states
and gradients where the variant has a backward.

``shape`` is ``(B, Hq, Sq, Sk, D, Hkv)`` as everywhere; the variants read ``B, H = Hq, L = Sq,
Dk = Dv = D`` (rwkv: ``C = Hq * D``). Array parameters (initial states, an explicit ``omega``) are
made by the :data:`MAKERS` below from the case's generator; their ``how`` names the state layout.
"""

from __future__ import annotations

from .cases import Case

SHAPE = (2, 3, 7, 7, 4, 1)


def _c(name, variant, doc, shape=SHAPE, arrays=None, grads=False, **params):
    seed = sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % 2 ** 31
    return Case(name=name, variant=variant, shape=shape, seed=seed, params=params,
                arrays=dict(arrays or {}), grads=grads, doc=doc)


def _fla_state(shape, rng, params):
    b, h, _, _, d, _ = shape
    return rng.standard_normal((b, h, d, d))


def _linear_state(shape, rng, params):
    """S and the normaliser z (last column) of elu+1 features: positive, as sums of them are."""
    b, h, _, _, d, _ = shape
    return rng.uniform(0.1, 2.0, (b, h, d, d + 1))


def _rwkv_state(shape, rng, params):
    b, h, _, _, d, _ = shape
    c = h * d
    return rng.standard_normal((b, 3, c)) * [[1.0], [0.0], [1.0]] + [[0.0], [1.0], [0.0]] * rng.uniform(
        0.5, 2.0, (b, 1, c))


MAKERS = {
    ("initial_state", "fla"): _fla_state,
    ("initial_state", "linear"): _linear_state,
    ("initial_state", "rwkv"): _rwkv_state,
    ("omega", "random"): lambda shape, rng, params: rng.standard_normal((2 * shape[4] + 1, shape[4])),
}

CASES = (
    _c("linear_linear_elu", "linear", "elu+1 features, normalised, non-causal (the paper)", grads=True),
    _c("linear_linear_relu_causal_chunked", "linear", "relu features, causal, chunks of 3",
       feature_map="relu", causal=True, form="chunked", chunk_size=3, grads=True),
    _c("linear_linear_identity_unnormalised", "linear", "identity features, no normaliser, "
       "scale 1/2, initial state (fla's linear_attn)", feature_map="identity", normalize=False,
       scale=0.5, causal=True, arrays={"initial_state": "fla"}, grads=True),
    _c("linear_linear_streaming", "linear", "causal, continuing from a state with its z column",
       causal=True, form="parallel", arrays={"initial_state": "linear"}, grads=True),
    _c("linear_performer_softmax", "performer", "FAVOR+ softmax kernel, 16 orthogonal features",
       num_features=16, seed=1),
    _c("linear_performer_relu_iid_causal", "performer", "ReLU kernel, 12 i.i.d. features, causal",
       kernel="relu", num_features=12, features="iid", seed=2, causal=True),
    _c("linear_performer_omega", "performer", "explicit omega (9 x 4), causal, chunked",
       arrays={"omega": "random"}, causal=True, form="chunked", chunk_size=2),
    _c("linear_gla", "gla", "per-key-dim gates, from a state", arrays={"initial_state": "fla"},
       grads=True),
    _c("linear_gla_chunked", "gla", "chunks of 3 (the last one shorter)", form="chunked", chunk_size=3,
       grads=True),
    _c("linear_simple_gla_parallel", "simple_gla", "scalar gates, the masked-attention form",
       form="parallel", grads=True),
    _c("linear_retention_bshd", "retention", "fixed decays 1 - 2^(-5-h), layout bshd",
       layout="bshd", grads=True),
    _c("linear_delta_rule", "delta_rule", "DeltaNet, chunked (WY), q/k L2-normalised",
       form="chunked", chunk_size=4, qk_l2norm=True, grads=True),
    _c("linear_gated_delta_rule", "gated_delta_rule", "Gated DeltaNet from a state, scale 0.7",
       arrays={"initial_state": "fla"}, scale=0.7, grads=True),
    _c("linear_rwkv", "rwkv", "RWKV-4 WKV, the running-maximum recurrence", grads=True),
    _c("linear_rwkv_parallel_state", "rwkv", "the direct sums, from a state",
       form="parallel", arrays={"initial_state": "rwkv"}, grads=True),
)

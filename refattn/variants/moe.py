"""Mixture-of-experts routing and layers (VARIANTS section F): :func:`route`, :func:`moe_forward`,
:func:`moe_backward`, the presets, and the registered variants ``moe_topk`` (the router) and
``moe_layer`` (router plus SwiGLU-type experts).

Tokens
------
``x`` is ``(..., d)``; its leading axes are flattened row-major into ``T`` tokens, and token ``t`` is
row ``t`` of ``x.reshape(-1, d)`` -- "token order" below means increasing ``t`` (for ``(B, S, d)``:
batch entry 0's sequence first). Every routing table is indexed by that ``t``.

Routing, step by step (:func:`route`)
-------------------------------------
1. **Logits** ``l = x @ w_router (+ router_bias)``, ``w_router (d, E)`` (HF's ``gate.weight`` is
   its transpose).
2. **Scores** ``s = softmax(l)`` over the ``E`` experts (``scoring="softmax"``, max-subtracted, float64)
   or ``s = sigmoid(l)`` (``"sigmoid"``, DeepSeek-V3's affinities).
3. **Choice values** ``c = s + selection_bias`` (``order="softmax_then_topk"`` and sigmoid scoring) or
   ``c = l + selection_bias`` (``order="topk_then_softmax"``: select on the logits, Mistral's reference
   code). ``selection_bias (E,)`` (DeepSeek-V3's ``e_score_correction_bias``, aux-loss-free balancing)
   affects the selection only, never the weights.
4. **Group-limited routing** (``n_group``, ``topk_group``): the ``E`` experts form ``n_group``
   consecutive groups of ``E / n_group``; a group's score is the sum of its two largest choice values
   (``group_score="top2_sum"``, DeepSeek-V3) or its largest (``"max"``, DeepSeek-V2); the
   ``topk_group`` best groups stay and every expert of the other groups is excluded (``-inf``).
5. **Selection**: the ``k`` experts with the largest choice values, in decreasing order. **Ties** are
   broken deterministically by the **lower expert index** (and, in step 4, the lower group index):
   the order is a stable sort of ``-c``.
6. **Weights** of the selected experts: ``s[e]`` (softmax scores, ``softmax_then_topk``; or sigmoid
   scores), or ``softmax(l[selected])`` (``topk_then_softmax``); with ``normalize="topk"`` divided by
   their sum; finally times ``routed_scaling_factor``. The normalised weights are evaluated as a
   softmax over the selected log-scores (the same numbers, without ``0/0`` when every selected score
   underflows: sigmoid of logits below about -745). HF's DeepSeek adds 1e-20 to the sum, which
   changes nothing unless the selected scores sum below ~1e-4 and gives 0 instead of the limit when
   they underflow.
7. **Capacity** (with ``capacity_factor`` or ``expert_capacity``): each expert takes at most
   ``C = ceil(capacity_factor · T · k / E)`` assignments -- computed exactly, with the factor read as
   its shortest decimal (1.1 means 11/10) -- or ``C = expert_capacity``. Assignments are granted in
   priority order and an expert's overflow is **dropped**: ``drop_policy="token_order"`` visits
   token 0's k choices (best first), then token 1's, ...; ``"choice_order"`` (GShard) visits every
   token's first choice in token order, then every second choice, ... A dropped assignment
   contributes nothing: a token whose every assignment is dropped leaves the MoE with 0 (plus shared
   experts) and so **passes through the residual** of the block unchanged.

Outputs (:class:`Routing`): ``indices (T, k)`` in selection order, ``weights (T, k)`` (step 6, before
capacity), ``dropped (T, k)``, ``slot (T, k)`` (the position in the expert's buffer, ``-1`` when
dropped), ``dispatch (T, E)`` (bool: kept assignments), ``combine (T, E)`` (the weight of expert
``e`` in token ``t``'s output; 0 when not selected or dropped), ``load (E,)`` (kept assignments per
expert), ``logits``, ``scores`` (T, E), the capacity, and the losses:

* ``aux_loss`` (``aux_loss_form="switch"``, default) ``= E · Σ_e f_e · P_e`` with ``f_e`` the fraction
  of the ``T·k`` assignments that chose expert ``e`` (step 5, *before* capacity drops, as Switch's
  ``argmax`` count) and ``P_e`` the mean over tokens of the normalised scores (softmax
  probabilities; for sigmoid scoring ``s / Σ_e s``, DeepSeek-V3's ``s'``). Perfect balance gives 1.
  Switch Transformer eq. (4)-(6) for k = 1; DeepSeek-V3's sequence-wise balance loss eq. (17)-(20)
  (without its α) when ``x`` is one sequence. The coefficient α is the caller's.
* ``aux_loss_form="hf_mixtral"``: HF's ``load_balancing_loss_func`` normalisation,
  ``E · Σ_e (n_e / T) · P_e`` with ``n_e`` the assignment count, which is k times the Switch form
  (perfect balance gives k).
* ``z_loss = mean_t (logsumexp_e l[t, e])²`` (ST-MoE eq. (5); HF ``router_z_loss_func``).

Presets (``preset=``; every explicitly given value wins over the preset's)
-------------------------------------------------------------------------
* ``switch`` -- ``k=1``, softmax, no renormalisation: ``y = p_e*(x) · E_e*(x)`` with
  ``e* = argmax p``. Fedus, Zoph & Shazeer, *Switch Transformers*, JMLR 2022, eq. (1)-(2); capacity
  eq. (3) (tokens per batch / experts × capacity factor, §2.2) and the aux loss eq. (4)-(6) as above. No capacity is implied:
  give ``capacity_factor`` (the paper uses 1.0-2.0) or ``expert_capacity`` (HF's fixed
  ``expert_capacity``, applied per sequence by HF: route each sequence on its own for that).
* ``mixtral`` -- ``k=2``, ``G(x) = softmax(top2(x W_g))`` (``order="topk_then_softmax"``):
  ``y = Σ_{i ∈ top2} G(x)_i · SwiGLU_i(x)``. Jiang et al., *Mixtral of Experts*, 2024, eq. (1)-(3);
  equal to HF ``MixtralTopKRouter``'s softmax, top-2, renormalise (``softmax_then_topk`` with
  ``normalize="topk"``).
* ``deepseek_v3`` -- sigmoid affinities ``s = σ(x W)``, selection on ``s + b`` (``selection_bias``),
  group-limited (``n_group=8``, ``topk_group=4``, top-2-sum group score), ``k=8``, weights
  ``s_i / Σ_selected s`` times ``routed_scaling_factor=2.5``; shared experts added unweighted
  (:func:`moe_forward`). DeepSeek-AI, *DeepSeek-V3 Technical Report*, 2024, §2.1.2 eq. (12)-(16)
  (the group limit and 2.5 are the released configuration, HF ``DeepseekV3TopkRouter``). The preset
  keeps V3's sizes (256 experts); for small E give ``k``, ``n_group`` and ``topk_group``
  (``n_group=1, topk_group=1`` turns the group limit off).

Without a preset: ``k=2``, softmax, ``normalize="none"``, ``softmax_then_topk``, scaling 1.

Experts (:func:`moe_forward`)
-----------------------------
Stacked weights in a :class:`refattn.block.FFN`: ``w_gate (E, d, f)``, ``w_up (E, d, f)``,
``w_down (E, f, d)`` (SwiGLU: ``(silu(x W_gate) * (x W_up)) W_down``; ``activation`` picks the gate's
function) or, without ``w_gate``, plain experts ``act(x W_up) W_down`` (Switch's ReLU experts).
``y_t = Σ_e combine[t, e] · Expert_e(x_t) + Σ_shared Shared(x_t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any, Optional

import numpy as np

from .. import validate as V
from ..errors import ParameterError, ShapeError, fmt_shape
from . import Variant, param_field, register
from .block import FFN, _ffn_one, _ffn_one_backward, _sigmoid, ffn, ffn_backward, finite, shaped

__all__ = ["SCORINGS", "NORMALIZATIONS", "ORDERS", "DROP_POLICIES", "AUX_LOSS_FORMS", "GROUP_SCORES",
           "PRESETS", "Preset", "RouterSettings", "Routing", "route", "settings", "capacity",
           "moe_forward", "moe_backward", "router_backward", "num_experts_for", "FFN"]

SCORINGS = ("softmax", "sigmoid")
NORMALIZATIONS = ("none", "topk")
ORDERS = ("softmax_then_topk", "topk_then_softmax")
DROP_POLICIES = ("token_order", "choice_order")
AUX_LOSS_FORMS = ("switch", "hf_mixtral")
GROUP_SCORES = ("top2_sum", "max")


@dataclass(frozen=True)
class Preset:
    """A parameter preset: the values it sets, its formula and where the formula is published."""

    name: str
    values: dict
    formula: str
    source: str


PRESETS = {
    "switch": Preset(
        "switch", dict(k=1, scoring="softmax", normalize="none", order="softmax_then_topk"),
        "p = softmax(x W_r); e* = argmax_e p_e; y = p_e* · E_e*(x); capacity C = ceil(cf·T/E) "
        "when a capacity factor is given, overflow dropped (residual); aux = E·Σ_e f_e·P_e",
        "Fedus, Zoph & Shazeer, Switch Transformers: Scaling to Trillion Parameter Models with "
        "Simple and Efficient Sparsity, JMLR 2022, eq. (1)-(2); capacity eq. (3), §2.2; aux loss "
        "eq. (4)-(6)"),
    "mixtral": Preset(
        "mixtral", dict(k=2, scoring="softmax", normalize="none", order="topk_then_softmax"),
        "G(x) = softmax(top2(x W_g)); y = Σ_{i in top2} G(x)_i · SwiGLU_i(x)",
        "Jiang et al., Mixtral of Experts, 2024, eq. (1)-(3); HF MixtralTopKRouter (softmax, top-2, "
        "renormalise: the same numbers)"),
    "deepseek_v3": Preset(
        "deepseek_v3", dict(k=8, scoring="sigmoid", normalize="topk", order="softmax_then_topk",
                            n_group=8, topk_group=4, group_score="top2_sum",
                            routed_scaling_factor=2.5),
        "s = sigmoid(x W); select top-8 of s + b within the 4 best of 8 groups (group score: sum of "
        "its 2 largest s + b); g_i = s_i / Σ_selected s; weight 2.5·g_i; y = Σ g_i·FFN_i(x) + "
        "Σ shared(x)",
        "DeepSeek-AI, DeepSeek-V3 Technical Report, 2024, §2.1.2 eq. (12)-(16); group limit and "
        "routed_scaling_factor = 2.5 from the released config (HF DeepseekV3TopkRouter)"),
}

#: values without a preset
GENERIC = dict(k=2, scoring="softmax", normalize="none", order="softmax_then_topk",
               group_score="top2_sum", routed_scaling_factor=1.0)


@dataclass(frozen=True)
class RouterSettings:
    """Resolved routing parameters (the preset applied, everything validated against E and T)."""

    k: int
    scoring: str
    normalize: str
    order: str
    capacity_factor: Optional[float]
    expert_capacity: Optional[int]
    drop_policy: str
    n_group: Optional[int]
    topk_group: Optional[int]
    group_score: str
    routed_scaling_factor: float
    aux_loss_form: str
    preset: Optional[str]


def _resolve(preset, given: dict) -> dict:
    """Explicit values, else the preset's, else :data:`GENERIC` (no validation against E yet)."""
    if preset is not None:
        V.check_choice(preset, "preset", tuple(PRESETS))
    base = dict(GENERIC)
    base.update(PRESETS[preset].values if preset is not None else {})
    out = {}
    for name, value in given.items():
        out[name] = value if value is not None else base.get(name)
    return out


def settings(num_experts: int, *, k=None, scoring=None, normalize=None, order=None,
             capacity_factor=None, expert_capacity=None, drop_policy="token_order", n_group=None,
             topk_group=None, group_score=None, routed_scaling_factor=None, aux_loss_form="switch",
             preset=None) -> RouterSettings:
    """The validated :class:`RouterSettings` for ``num_experts`` experts (module docstring)."""
    r = _resolve(preset, dict(k=k, scoring=scoring, normalize=normalize, order=order,
                              n_group=n_group, topk_group=topk_group, group_score=group_score,
                              routed_scaling_factor=routed_scaling_factor))
    e = num_experts
    kk = V.check_int(r["k"], "k", 1, e, what=f"an integer in [1, {e}] (at most the E = {e} experts)")
    V.check_choice(r["scoring"], "scoring", SCORINGS)
    V.check_choice(r["normalize"], "normalize", NORMALIZATIONS)
    V.check_choice(r["order"], "order", ORDERS)
    if r["scoring"] == "sigmoid" and r["order"] == "topk_then_softmax":
        raise ParameterError("order: 'topk_then_softmax' (a softmax over the selected logits) "
                             "applies to scoring='softmax', got scoring='sigmoid'")
    V.check_choice(r["group_score"], "group_score", GROUP_SCORES)
    V.check_choice(drop_policy, "drop_policy", DROP_POLICIES)
    V.check_choice(aux_loss_form, "aux_loss_form", AUX_LOSS_FORMS)
    rsf = r["routed_scaling_factor"]
    if isinstance(rsf, bool) or not isinstance(rsf, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(rsf) and rsf > 0):
        raise ParameterError(f"routed_scaling_factor: expected a finite number > 0, got {rsf!r}")
    if capacity_factor is not None and expert_capacity is not None:
        raise ParameterError(f"capacity_factor: expected either capacity_factor or expert_capacity, "
                             f"got both ({capacity_factor!r} and {expert_capacity!r})")
    cf = None
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(
                capacity_factor, (int, float, np.integer, np.floating)) \
                or not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ParameterError(f"capacity_factor: expected a finite number > 0, got {capacity_factor!r}")
        cf = float(capacity_factor)
    ec = None if expert_capacity is None else V.check_int(expert_capacity, "expert_capacity", 0)
    ng, tg = r["n_group"], r["topk_group"]
    if (ng is None) != (tg is None):
        missing = "topk_group" if tg is None else "n_group"
        raise ParameterError(f"{missing}: expected n_group and topk_group together (group-limited "
                             f"routing), got only {'n_group' if tg is None else 'topk_group'}")
    if ng is not None:
        ng = V.check_int(ng, "n_group", 1, e)
        if e % ng:
            raise ParameterError(f"n_group: expected a divisor of the E = {e} experts, got {ng}")
        tg = V.check_int(tg, "topk_group", 1, ng, what=f"an integer in [1, n_group = {ng}]")
        size = e // ng
        if r["group_score"] == "top2_sum" and size < 2 and ng > 1:
            raise ParameterError(f"n_group: group_score='top2_sum' sums each group's two largest "
                                 f"scores, so groups need >= 2 experts; got {ng} groups of {size}")
        if kk > tg * size:
            raise ParameterError(f"k: expected at most topk_group · E / n_group = {tg} · {size} = "
                                 f"{tg * size} (the experts of the kept groups), got {kk}")
    return RouterSettings(k=kk, scoring=r["scoring"], normalize=r["normalize"], order=r["order"],
                          capacity_factor=cf, expert_capacity=ec, drop_policy=drop_policy,
                          n_group=ng, topk_group=tg, group_score=r["group_score"],
                          routed_scaling_factor=float(rsf), aux_loss_form=aux_loss_form,
                          preset=preset)


def capacity(capacity_factor, tokens: int, k: int, experts: int) -> int:
    """``C = ceil(capacity_factor · T · k / E)``, exactly: the factor is read as its shortest decimal
    (``repr``), so ``capacity(1.1, 10, 1, 1) == 11`` (a float product would give 12)."""
    cf = Fraction(repr(float(capacity_factor)))
    return math.ceil(cf * tokens * k / experts)


@dataclass(frozen=True)
class Routing:
    """What :func:`route` decided, over ``T`` flattened tokens and ``E`` experts (module docstring)."""

    indices: np.ndarray
    weights: np.ndarray
    dropped: np.ndarray
    slot: np.ndarray
    dispatch: np.ndarray
    combine: np.ndarray
    load: np.ndarray
    logits: np.ndarray
    scores: np.ndarray
    aux_loss: float
    z_loss: float
    capacity: Optional[int]
    settings: RouterSettings
    token_shape: tuple = ()

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def dispatch_tensor(self) -> np.ndarray:
        """GShard/Switch's ``(T, E, C)`` boolean dispatch tensor (needs a capacity)."""
        if self.capacity is None:
            raise ParameterError("capacity: the (T, E, C) dispatch tensor needs a capacity "
                                 "(capacity_factor or expert_capacity)")
        out = np.zeros((self.num_tokens, self.num_experts, self.capacity), dtype=bool)
        t, j = np.nonzero(~self.dropped)
        out[t, self.indices[t, j], self.slot[t, j]] = True
        return out

    def combine_tensor(self) -> np.ndarray:
        """The ``(T, E, C)`` combine tensor: the dispatch tensor times each assignment's weight."""
        return self.dispatch_tensor() * self.combine[:, :, None]

    def outputs(self) -> dict:
        """The router's named outputs, as the registered variants return them (``out`` = combine)."""
        return {"out": self.combine, "indices": self.indices, "weights": self.weights,
                "dispatch": self.dispatch, "dropped": self.dropped, "slot": self.slot,
                "load": self.load, "scores": self.scores, "logits": self.logits,
                "aux_loss": np.asarray(self.aux_loss), "z_loss": np.asarray(self.z_loss)}


# -- the router ------------------------------------------------------------------------------------
def tokens(x) -> tuple:
    """``(x.reshape(-1, d), leading shape)`` of a finite ``(..., d)`` array with at least one token."""
    x = finite(x, "x")
    if x.ndim < 2 or x.shape[-1] == 0 or x.size == 0:
        raise ShapeError(f"x: expected (..., d) with at least one token and d >= 1 (e.g. (T, d) or "
                         f"(B, S, d)), got {fmt_shape(x.shape)}")
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=-1, keepdims=True)))[..., 0]


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries per row, largest first; ties: lower index first."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


def _group_limit(c: np.ndarray, s: RouterSettings) -> np.ndarray:
    """``c`` with the experts outside the ``topk_group`` best groups set to ``-inf`` (step 4)."""
    t, e = c.shape
    grouped = c.reshape(t, s.n_group, e // s.n_group)
    ranked = -np.sort(-grouped, axis=-1)
    score = ranked[..., 0] + ranked[..., 1] if s.group_score == "top2_sum" and grouped.shape[2] > 1 \
        else ranked[..., 0]
    keep = np.zeros((t, s.n_group), dtype=bool)
    keep[np.arange(t)[:, None], _top(score, s.topk_group)] = True
    return np.where(np.repeat(keep, e // s.n_group, axis=1), c, -np.inf)


def _log_sigmoid(a: np.ndarray) -> np.ndarray:
    """``log sigmoid(a) = -log(1 + exp(-a))`` without overflow or underflow."""
    return -(np.log1p(np.exp(-np.abs(a))) + np.maximum(-a, 0.0))


def _raw_weights(logits, scores, indices, s: RouterSettings) -> np.ndarray:
    """Step 6 before scaling. ``normalize="topk"``'s ``r / Σ r`` is evaluated as a softmax over the
    selected ``log r`` (``l - lse``: the lse cancels; ``log sigmoid(l)``), the same number without
    the ``0 / 0`` of scores that all underflow (sigmoid of logits below about -745, or softmax
    probabilities of experts chosen through a large selection bias)."""
    rows = np.arange(indices.shape[0])[:, None]
    sel = logits[rows, indices]
    if s.normalize == "topk":
        return _softmax(_log_sigmoid(sel) if s.scoring == "sigmoid" else sel)
    if s.scoring == "softmax" and s.order == "topk_then_softmax":
        return _softmax(sel)
    return scores[rows, indices]


def _slots(indices: np.ndarray, experts: int, cap: Optional[int], policy: str) -> np.ndarray:
    """``slot (T, k)``: how many assignments to the same expert come earlier in the priority order
    (step 7), or -1 where that reaches ``cap``. The loop it vectorises::

        count = [0] * E
        for (t, j) in priority order:          # token_order: t outer; choice_order: j outer
            e = indices[t, j]
            slot[t, j] = count[e] if count[e] < cap else -1
            count[e] += 1
    """
    order_major = indices if policy == "token_order" else indices.T  # rows in priority order
    flat = order_major.ravel()
    perm = np.argsort(flat, kind="stable")  # grouped by expert, priority order kept inside
    first = np.searchsorted(flat[perm], np.arange(experts))
    rank = np.empty(flat.size, dtype=np.int64)
    rank[perm] = np.arange(flat.size) - first[flat[perm]]
    rank = rank.reshape(order_major.shape)
    rank = rank if policy == "token_order" else rank.T
    return rank if cap is None else np.where(rank < cap, rank, -1)


def route(x, w_router, *, k=None, scoring=None, normalize=None, order=None, capacity_factor=None,
          expert_capacity=None, drop_policy="token_order", n_group=None, topk_group=None,
          group_score=None, selection_bias=None, router_bias=None, routed_scaling_factor=None,
          aux_loss_form="switch", preset=None) -> Routing:
    """Route the tokens of ``x (..., d)`` to experts with the router ``w_router (d, E)``.

    Parameters and every convention are in the module docstring (steps 1-7, the losses and the
    presets); ``selection_bias`` and ``router_bias`` are ``(E,)``. Returns a :class:`Routing`.
    Bad input raises :class:`refattn.errors.RefattnError` subclasses naming the argument: NaN/Inf in
    any array, ``k > E``, ``capacity_factor <= 0``, ``n_group`` not dividing ``E``, ...
    """
    flat, lead = tokens(x)
    t, d = flat.shape
    w = shaped(w_router, "w_router", (d, None), f"(d, E) with d = {d} (logits = x @ w_router)")
    e = w.shape[1]
    s = settings(e, k=k, scoring=scoring, normalize=normalize, order=order,
                 capacity_factor=capacity_factor, expert_capacity=expert_capacity,
                 drop_policy=drop_policy, n_group=n_group, topk_group=topk_group,
                 group_score=group_score, routed_scaling_factor=routed_scaling_factor,
                 aux_loss_form=aux_loss_form, preset=preset)
    rb = None if router_bias is None else shaped(router_bias, "router_bias", (e,), "(one per expert)")
    sb = None if selection_bias is None else shaped(selection_bias, "selection_bias", (e,),
                                                    "(one per expert)")
    with np.errstate(over="ignore", invalid="ignore"):
        logits = flat @ w if rb is None else flat @ w + rb
    if not np.all(np.isfinite(logits)):
        raise ParameterError(f"x: the logits x @ w_router overflow float64 in "
                             f"{int(np.sum(~np.isfinite(logits)))} entries (|x| up to "
                             f"{float(np.abs(flat).max()):.3g}, |w_router| up to {float(np.abs(w).max()):.3g})")
    scores = _softmax(logits) if s.scoring == "softmax" else _sigmoid(logits)
    choice = logits if s.order == "topk_then_softmax" else scores
    if sb is not None:
        choice = choice + sb
    if s.n_group is not None:
        choice = _group_limit(choice, s)
    indices = _top(choice, s.k)
    weights = _raw_weights(logits, scores, indices, s) * s.routed_scaling_factor

    cap = s.expert_capacity
    if s.capacity_factor is not None:
        cap = capacity(s.capacity_factor, t, s.k, e)
    slot = _slots(indices, e, cap, s.drop_policy)
    dropped = slot < 0
    rows = np.broadcast_to(np.arange(t)[:, None], indices.shape)
    kept = ~dropped
    dispatch = np.zeros((t, e), dtype=bool)
    dispatch[rows[kept], indices[kept]] = True
    combine = np.zeros((t, e))
    combine[rows[kept], indices[kept]] = weights[kept]
    load = np.bincount(indices[kept], minlength=e).astype(np.int64)

    counts = np.bincount(indices.ravel(), minlength=e)  # before capacity
    norm_scores = scores if s.scoring == "softmax" else _softmax(_log_sigmoid(logits))  # s / Σ_e s
    p_mean = norm_scores.mean(axis=0)
    if s.aux_loss_form == "switch":
        aux = e * float(np.sum(counts / (t * s.k) * p_mean))
    else:
        aux = e * float(np.sum(counts / t * p_mean))
    z = float(np.mean(_logsumexp(logits) ** 2))
    return Routing(indices=indices.astype(np.int64), weights=weights, dropped=dropped,
                   slot=slot.astype(np.int64), dispatch=dispatch, combine=combine, load=load,
                   logits=logits, scores=scores, aux_loss=aux, z_loss=z, capacity=cap, settings=s,
                   token_shape=tuple(lead))


# -- experts ---------------------------------------------------------------------------------------
def _experts(experts, d: int, e: int, prefix: str = "experts.") -> FFN:
    if isinstance(experts, dict):
        experts = FFN(**experts)
    if not isinstance(experts, FFN):
        raise ParameterError(f"experts: expected a refattn.block.FFN (or a dict with w_up, w_down, "
                             f"w_gate, activation) of stacked weights, got {type(experts).__name__}")
    w = experts.checked(d, prefix, stacked=True)
    if w.w_up.shape[0] != e:
        raise ShapeError(f"{prefix}w_up: expected {e} experts (the router's E) on the first axis, "
                         f"got {fmt_shape(w.w_up.shape)}")
    return w


def _shared(shared, d: int, prefix: str = "shared_experts.") -> Optional[FFN]:
    if shared is None:
        return None
    if isinstance(shared, dict):
        shared = FFN(**shared)
    if not isinstance(shared, FFN):
        raise ParameterError(f"shared_experts: expected a refattn.block.FFN or a dict, got "
                             f"{type(shared).__name__}")
    return shared.checked(d, prefix)


def _check_routing(routing, t: int):
    if not isinstance(routing, Routing):
        raise ParameterError(f"routing: expected the Routing record of refattn.moe.route, got "
                             f"{type(routing).__name__}")
    if routing.num_tokens != t:
        raise ShapeError(f"routing: expected a routing of the {t} tokens of x, got one of "
                         f"{routing.num_tokens} tokens")


def _pick(w: FFN, e: int) -> tuple:
    return w.w_up[e], w.w_down[e], None if w.w_gate is None else w.w_gate[e], w.activation


def moe_forward(x, routing: Routing, experts, shared_experts=None) -> np.ndarray:
    """``y (x's shape)``: ``y_t = Σ_e combine[t, e] · Expert_e(x_t) + Σ Shared(x_t)``.

    ``experts``: a :class:`refattn.block.FFN` with stacked ``w_gate``/``w_up (E, d, f)``,
    ``w_down (E, f, d)`` (or a dict of them). ``shared_experts`` (DeepSeek): an FFN with ``(d, f)``
    weights or stacked ``(S, d, f)`` ones (summed), always applied with weight 1. Expert ``e`` runs
    on the tokens dispatched to it (kept after capacity); dropped assignments contribute 0.
    """
    flat, lead = tokens(x)
    _check_routing(routing, flat.shape[0])
    w = _experts(experts, flat.shape[1], routing.num_experts)
    y = np.zeros_like(flat)
    for e in range(routing.num_experts):
        toks = np.nonzero(routing.dispatch[:, e])[0]
        if toks.size:
            out, _ = _ffn_one(flat[toks], *_pick(w, e))
            y[toks] += routing.combine[toks, e, None] * out
    shared = _shared(shared_experts, flat.shape[1])
    if shared is not None:
        y += ffn(flat, shared)
    return y.reshape(lead + (flat.shape[1],))


def router_backward(routing: Routing, dweights) -> np.ndarray:
    """``dlogits (T, E)`` for the gradient ``dweights (T, k)`` of :attr:`Routing.weights`, with the
    selection held fixed (exact wherever no two choice values tie). Chain: scaling; with
    ``normalize="topk"`` the softmax over the selected ``log r`` (``dlog r = ŵ ⊙ (dw - Σ ŵ dw)``),
    then ``d log r / dl`` = 1 (softmax scoring: the lse's share sums to 0) or ``1 - sigmoid(l)``;
    without it, softmax over all experts (``dl = p ⊙ (dp - Σ p dp)``), over the selected logits,
    or sigmoid (``s (1 - s)``)."""
    s = routing.settings
    idx = routing.indices
    t = idx.shape[0]
    rows = np.arange(t)[:, None]
    dw = np.asarray(dweights, dtype=np.float64) * s.routed_scaling_factor
    raw = _raw_weights(routing.logits, routing.scores, idx, s)
    dl = np.zeros_like(routing.logits)
    if s.normalize == "topk":
        dlog = raw * (dw - np.sum(raw * dw, axis=-1, keepdims=True))
        sel = routing.logits[rows, idx]
        dl[rows, idx] = dlog * _sigmoid(-sel) if s.scoring == "sigmoid" else dlog
    elif s.scoring == "softmax" and s.order == "topk_then_softmax":
        dl[rows, idx] = raw * (dw - np.sum(raw * dw, axis=-1, keepdims=True))
    elif s.scoring == "softmax":
        p = routing.scores
        dp = np.zeros_like(p)
        dp[rows, idx] = dw
        dl = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    else:
        dl[rows, idx] = dw * raw * (1.0 - raw)
    return dl


def moe_backward(x, w_router, routing: Routing, experts, dy, shared_experts=None) -> dict:
    """Gradients of ``sum(moe_forward(x, routing, experts, shared) * dy)`` with the selection and
    capacity decisions of ``routing`` held fixed (the routing must come from ``route(x, w_router,
    ...)``): ``x`` (through the experts, the shared experts and the router), ``w_router``,
    ``router_bias`` (``(E,)``, whether or not one was given), ``w_up``, ``w_down``, ``w_gate`` of the
    experts, ``shared_w_up``... of the shared experts, and ``combine (T, E)`` and ``weights (T, k)``
    (the gradient with respect to the routing weights)."""
    flat, lead = tokens(x)
    t, d = flat.shape
    _check_routing(routing, t)
    wr = shaped(w_router, "w_router", (d, routing.num_experts), "(d, E)")
    w = _experts(experts, d, routing.num_experts)
    dflat = finite(dy, "dy")
    if dflat.shape != lead + (d,):
        raise ShapeError(f"dy: expected the output's shape {fmt_shape(lead + (d,))}, got "
                         f"{fmt_shape(dflat.shape)}")
    dflat = dflat.reshape(t, d)
    dx = np.zeros_like(flat)
    dcombine = np.zeros((t, routing.num_experts))
    grads = {n: np.zeros_like(a) for n, a in (("w_up", w.w_up), ("w_down", w.w_down),
                                                ("w_gate", w.w_gate)) if a is not None}
    for e in range(routing.num_experts):
        toks = np.nonzero(routing.dispatch[:, e])[0]
        if not toks.size:
            continue
        args = _pick(w, e)
        out, cache = _ffn_one(flat[toks], *args)
        c = routing.combine[toks, e, None]
        dcombine[toks, e] = np.sum(dflat[toks] * out, axis=-1)
        ddx, g = _ffn_one_backward(flat[toks], *args, cache, c * dflat[toks])
        dx[toks] += ddx
        for n in grads:
            grads[n][e] = g[n]
    rows = np.arange(t)[:, None]
    dweights = np.where(routing.dropped, 0.0, dcombine[rows, routing.indices])
    dlogits = router_backward(routing, dweights)
    dx += dlogits @ wr.T
    grads.update(x=dx.reshape(lead + (d,)), w_router=flat.T @ dlogits,
                 router_bias=dlogits.sum(axis=0), combine=dcombine, weights=dweights)
    shared = _shared(shared_experts, d)
    if shared is not None:
        sdx, sg = ffn_backward(flat, shared, dflat)
        grads["x"] = grads["x"] + sdx.reshape(lead + (d,))
        grads.update({f"shared_{n}": a for n, a in sg.items()})
    return grads


# -- registered variants ---------------------------------------------------------------------------
ROUTER_OUTPUTS = ("indices", "weights", "dispatch", "dropped", "slot", "load", "scores", "logits",
                  "aux_loss", "z_loss")


def _ret(name, what):
    return param_field(False, f"also return {what}")


@dataclass(frozen=True)
class RouterParams:
    """Parameters of ``moe_topk`` (and the routing part of ``moe_layer``)."""

    preset: Optional[str] = param_field(None, "'switch', 'mixtral' or 'deepseek_v3': a parameter preset; explicit values win")
    k: Optional[int] = param_field(None, "experts per token; default 2 or the preset's")
    scoring: Optional[str] = param_field(None, "'softmax' (default) or 'sigmoid' affinities")
    normalize: Optional[str] = param_field(None, "'none' (default) or 'topk': divide the k weights by their sum")
    order: Optional[str] = param_field(None, "'softmax_then_topk' (default: select on probabilities) or 'topk_then_softmax' (select on logits, softmax over the k)")
    capacity_factor: Optional[float] = param_field(None, "C = ceil(cf·T·k/E) assignments per expert, exact; overflow dropped")
    expert_capacity: Optional[int] = param_field(None, "C given directly (instead of capacity_factor)")
    drop_policy: str = param_field("token_order", "'token_order' (token by token, best choice first) or 'choice_order' (all first choices, then second, GShard)")
    n_group: Optional[int] = param_field(None, "group-limited routing: E experts in n_group consecutive groups")
    topk_group: Optional[int] = param_field(None, "groups kept per token (with n_group)")
    group_score: Optional[str] = param_field(None, "'top2_sum' (DeepSeek-V3, default) or 'max' (V2): a group's score")
    selection_bias: Any = param_field(None, "(E,) bias added to the choice values only (aux-loss-free balancing)")
    router_bias: Any = param_field(None, "(E,) bias added to the logits")
    routed_scaling_factor: Optional[float] = param_field(None, "weights multiplied by it; default 1 (deepseek_v3: 2.5)")
    aux_loss_form: str = param_field("switch", "'switch' (E·Σ f_e P_e, balance = 1) or 'hf_mixtral' (k times it, HF)")
    return_indices: bool = _ret("indices", "indices (T, k): selected experts, best first")
    return_weights: bool = _ret("weights", "weights (T, k) before capacity")
    return_dispatch: bool = _ret("dispatch", "dispatch (T, E) bool: kept assignments")
    return_dropped: bool = _ret("dropped", "dropped (T, k) bool: assignments over capacity")
    return_slot: bool = _ret("slot", "slot (T, k): position in the expert's buffer, -1 dropped")
    return_load: bool = _ret("load", "load (E,): kept assignments per expert")
    return_scores: bool = _ret("scores", "scores (T, E): softmax or sigmoid affinities")
    return_logits: bool = _ret("logits", "logits (T, E)")
    return_aux_loss: bool = _ret("aux_loss", "aux_loss (): the load-balancing loss")
    return_z_loss: bool = _ret("z_loss", "z_loss (): mean logsumexp(logits)^2")


@dataclass(frozen=True)
class LayerParams(RouterParams):
    """Parameters of ``moe_layer``: the router's, the experts' activation and shared experts."""

    activation: str = param_field("silu", "gate activation of the experts: silu (SwiGLU), gelu, gelu_tanh, relu")
    shared_w_gate: Any = param_field(None, "(d, f_s) or (S, d, f_s): shared experts' gate (DeepSeek)")
    shared_w_up: Any = param_field(None, "(d, f_s) or (S, d, f_s): shared experts' up projection")
    shared_w_down: Any = param_field(None, "(f_s, d) or (S, f_s, d): shared experts' down projection")
    return_combine: bool = param_field(False, "also return combine (T, E): each expert's weight per token")


def _route_kwargs(p: RouterParams) -> dict:
    return {f.name: getattr(p, f.name) for f in fields(RouterParams) if not f.name.startswith("return_")}


def _check_flags(p):
    for f in fields(p):
        if f.name.startswith("return_"):
            V.check_bool(getattr(p, f.name), f.name)


def _topk_forward(backend, arrays, p: RouterParams):
    _check_flags(p)
    return route(arrays["x"], arrays["w_router"], **_route_kwargs(p)).outputs()


def _shared_of(p: LayerParams):
    given = [n for n in ("shared_w_gate", "shared_w_up", "shared_w_down") if getattr(p, n) is not None]
    if not given:
        return None
    if "shared_w_up" not in given or "shared_w_down" not in given:
        raise ParameterError("shared_w_up: shared experts need shared_w_up and shared_w_down "
                             f"(and shared_w_gate for SwiGLU), got {', '.join(given)}")
    return FFN(p.shared_w_up, p.shared_w_down, p.shared_w_gate, p.activation)


def _layer_parts(arrays, p: LayerParams):
    _check_flags(p)
    V.check_choice(p.activation, "activation", ("silu", "gelu", "gelu_tanh", "relu"))
    routing = route(arrays["x"], arrays["w_router"], **_route_kwargs(p))
    d = np.shape(arrays["x"])[-1]
    experts = _experts(FFN(arrays["w_up"], arrays["w_down"], arrays["w_gate"], p.activation), d,
                       routing.num_experts, prefix="")  # messages name the inputs: w_up, ...
    shared = _shared_of(p)
    return routing, experts, None if shared is None else _shared(shared, d, prefix="shared_")


def _layer_forward(backend, arrays, p: LayerParams):
    routing, experts, shared = _layer_parts(arrays, p)
    out = routing.outputs()
    out["combine"] = out.pop("out")
    return {"out": moe_forward(arrays["x"], routing, experts, shared), **out}


def _layer_backward(backend, arrays, dout, p: LayerParams):
    """Gradients keyed by input (x, w_router, w_gate, w_up, w_down) and by the learnable parameters
    given (router_bias, shared_w_*), the routing held fixed."""
    routing, experts, shared = _layer_parts(arrays, p)
    g = moe_backward(arrays["x"], arrays["w_router"], routing, experts, dout, shared)
    out = {n: g[n] for n in ("x", "w_router", "w_gate", "w_up", "w_down")}
    if p.router_bias is not None:
        out["router_bias"] = g["router_bias"]
    for n in ("shared_w_gate", "shared_w_up", "shared_w_down"):
        if getattr(p, n) is not None:
            out[n] = g[n]
    return out


def num_experts_for(shape, params) -> int:
    """E of the example inputs for ``shape = (B, Hq, Sq, Sk, D, Hkv)``: ``2·Hq``, raised where the
    parameters need more (``k``, group-limited routing: groups of >= 2 experts and at least 2k
    experts in the kept groups), a multiple of ``n_group``."""
    get = params.get if isinstance(params, dict) else (lambda n, d=None: getattr(params, n, d))
    r = _resolve(get("preset"), {n: get(n) for n in ("k", "n_group", "topk_group")})
    k = int(r["k"]) if isinstance(r["k"], (int, np.integer)) else 2
    e = max(2 * int(shape[1]), 2 * k)
    ng, tg = r.get("n_group"), r.get("topk_group")
    if isinstance(ng, (int, np.integer)) and ng >= 1 and isinstance(tg, (int, np.integer)) and tg >= 1:
        size = max(-(-e // ng), 2, -(-2 * k // tg))
        e = ng * size
    return e


def _example(shape, rng, params, layer: bool = False):
    """``x (B, Sq, D)`` (T = B·Sq tokens, d = D), ``w_router (D, E)`` with E from
    :func:`num_experts_for`; for the layer, SwiGLU experts with f = D. Weights scaled by
    1/sqrt(fan_in)."""
    b, hq, sq, sk, d, hkv = shape
    e = num_experts_for(shape, params)
    out = {"x": rng.standard_normal((b, sq, d)),
           "w_router": rng.standard_normal((d, e)) / math.sqrt(d)}
    if layer:
        f = d
        out["w_gate"] = rng.standard_normal((e, d, f)) / math.sqrt(d)
        out["w_up"] = rng.standard_normal((e, d, f)) / math.sqrt(d)
        out["w_down"] = rng.standard_normal((e, f, d)) / math.sqrt(f)
    return out


_CITE = ("Shazeer et al., Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts "
         "Layer, ICLR 2017; Fedus et al., Switch Transformers, JMLR 2022; Jiang et al., Mixtral of "
         "Experts, 2024; DeepSeek-AI, DeepSeek-V3 Technical Report, 2024")
_SHAPES = {"x": "(..., d): T tokens", "w_router": "(d, E)"}

register(Variant(
    name="moe_topk", family="moe",
    doc="Top-k MoE router with every option (softmax/sigmoid scoring, renormalisation, order, "
    "capacity with token- or choice-order drops, group-limited routing, selection bias, scaling, "
    "presets switch/mixtral/deepseek_v3); out = the combine table (T, E), plus the dispatch table, "
    "indices, load and the aux and z losses. Ties go to the lower expert index.",
    citation=_CITE, params=RouterParams, forward=_topk_forward, backends=("numpy",),
    inputs=("x", "w_router"), input_shapes=dict(_SHAPES), outputs=("out",) + ROUTER_OUTPUTS,
    example=_example, default_shape=(2, 4, 64, 64, 16, 4), tolerance=1e-12))

register(Variant(
    name="moe_layer", family="moe",
    doc="MoE layer: moe_topk routing plus stacked SwiGLU experts (w_gate, w_up (E, d, f), w_down "
    "(E, f, d)), optional shared experts; y_t = Σ_e combine[t, e]·Expert_e(x_t) (+ shared). "
    "Backward with the routing held fixed (through the combine weights into the router).",
    citation=_CITE, params=LayerParams, forward=_layer_forward, backward=_layer_backward,
    backends=("numpy",), inputs=("x", "w_router", "w_gate", "w_up", "w_down"),
    input_shapes={**_SHAPES, "w_gate": "(E, d, f)", "w_up": "(E, d, f)", "w_down": "(E, f, d)"},
    outputs=("out", "combine") + ROUTER_OUTPUTS, example=lambda s, r, p: _example(s, r, p, True),
    default_shape=(2, 4, 64, 64, 16, 4), tolerance=1e-12))

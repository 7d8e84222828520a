"""MoE implementations "under test" for ``refattn compare --impl`` (test helper, no refattn code):
a top-k router written from the formula, the same router with one known routing bug, and a
torch version. Each records the arrays it was called with in ``SEEN``."""

from __future__ import annotations

import numpy as np

SEEN = {}


def _probs(x, w_router):
    t = np.asarray(x).reshape(-1, np.shape(x)[-1])
    logits = t @ np.asarray(w_router)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def router(x, w_router, k=2, normalize="none", **params):
    """softmax, top-k (ties to the lower index), optional renormalisation: ``{"out", "indices"}``."""
    SEEN.update(x=np.array(x), w_router=np.array(w_router), params=dict(params, k=k, normalize=normalize))
    p = _probs(x, w_router)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, 1)
    if normalize == "topk":
        w = w / w.sum(axis=1, keepdims=True)
    combine = np.zeros_like(p)
    np.put_along_axis(combine, idx, w, 1)
    return {"out": combine, "indices": idx}


def router_wrong_token(x, w_router, k=2, normalize="none", **params):
    """``router`` except that token 5 sends its second assignment to its third choice instead."""
    res = router(x, w_router, k=k, normalize=normalize)
    p = _probs(x, w_router)
    third = int(np.argsort(-p[5], kind="stable")[2])
    out, idx = res["out"].copy(), res["indices"].copy()
    out[5, third], out[5, idx[5, 1]] = out[5, idx[5, 1]], 0.0
    idx[5, 1] = third
    return out, idx  # a tuple in the variant's output order: out, indices


def router_unknown_output(x, w_router, **params):
    return {"out": router(x, w_router)["out"], "experts": None}


def torch_router(x, w_router, k=2, **params):
    import torch
    p = torch.softmax(x.reshape(-1, x.shape[-1]) @ w_router, dim=-1)
    v, i = torch.topk(p, k)
    return {"out": torch.zeros_like(p).scatter(1, i, v), "indices": i}

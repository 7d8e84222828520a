"""Where the errors are: a short account on FAIL, and the ``--report out.md|out.html`` writer.

:func:`analyse` looks at the error of an attention output ``(B, H, Sq, Dv)`` against the float64
reference and says where it clusters:

* **rows** -- how many rows ``(b, h, i)`` exceed the allowed error, and whether they concentrate
  in the first or last query rows, in particular heads or batch entries;
* **keys** -- which key explains a row's error. An implementation that mis-weights one key ``j``
  (includes a hidden key, drops a visible one, counts one twice) outputs
  ``o'_i = (Z o_i + w v_j) / (Z + w)``, so its error ``e_i = o'_i - o_i`` is parallel to
  ``v_j - o_i``. For each key we measure the fraction of ``||e_i||²`` explained by that direction,
  ``cos²(e_i, v_j - o_i)``, and the same for each key block ``J`` with the block's own weighted
  average ``o_J`` (an implementation that mis-scales a whole tile moves ``o_i`` towards ``o_J``).
  The best explanation of the worst row gives the worst ``(b, h, i, j)``; its position relative to
  the causal/window band (``j - (i + s)`` against ``[lo, hi]``) tells "one key outside the window's
  left edge", "on the diagonal", and so on. This needs ``Dv >= 2`` and a variant that calls the
  ``attend`` primitive once (every core and Pattern-based variant); otherwise only rows are
  described. Packed (varlen) cases are described by rows only.

**Global explanations come first.** When most rows fail, one key rarely explains anything; the
account then tests, in this order, the hypotheses of a global bug and names the first that fits
the output (within the allowed error): the output is all zero or constant; the arrays are in the
other layout (``bshd`` for ``bhsd``); the causal alignment is flipped (top-left for bottom-right);
the scale is off by a factor (estimated by a one-dimensional fit of the scale, and recognised as
``1/D`` or ``1`` for ``1/sqrt(D)``); the softmax is not normalised (each row the reference times a
factor of its own). For the LSE: base 2 instead of e. Only when none fits, and most rows fail, it
says that no single key explains them.

**A key is only named when the row could involve it**: a key the row sees, or a hidden key next to
one it sees (what an off-by-one edge includes). A key far outside the row's visible set is never
a row's explanation.

The **heat map** is, for the worst ``(b, h)``, the error of each (query row, key block) explained
by re-weighting that block or one of its keys: ``||e_i|| * max(cos²)``; rows are sampled evenly
(at most :data:`HEAT_ROWS`) and keys grouped into at most :data:`HEAT_BLOCKS` blocks.

:func:`write` writes ``.md`` (the heat map as a PNG beside it) or ``.html`` (PNG embedded) with
the metrics table of :func:`refattn.numerics.compare_all`, the verdict and the account; without
matplotlib the heat map is left out and the report says so.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Optional

import numpy as np

from refattn.backends.numpy_ import NumpyBackend
from .errors import ParameterError

HEAT_ROWS = 256
HEAT_BLOCKS = 64
#: a row/column group "concentrates" the failures when it holds this share of them ...
SHARE = 0.5
#: ... while being at most this fraction of all rows
ENRICH = 4.0


class _Recorder(NumpyBackend):
    """The numpy backend, recording the arguments of every ``attend`` call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def attend(self, q, k, v, **kw):
        self.calls.append(dict(q=q, k=k, v=v, **kw))
        return super().attend(q, k, v, **kw)


def _trace(case: dict, variant: str):
    """The single ``attend`` call of the variant on this case (run through the one pipeline on a
    recording numpy backend), or None."""
    from . import pipeline
    from .numerics import split_case
    var = pipeline.variant_of(variant)
    arrays, params, _ = split_case(var, case)
    rec = _Recorder()
    pipeline.run(var, rec, arrays, params)
    return rec.calls[0] if len(rec.calls) == 1 else None


def _to_bhsd(a, case):
    a = np.asarray(a, dtype=np.float64)
    return a.transpose(0, 2, 1, 3) if case.get("layout") == "bshd" else a


# -- rows -----------------------------------------------------------------------------------------------
def row_clusters(row_err: np.ndarray, threshold: float) -> tuple:
    """``(failing mask, lines)`` for row errors ``(B, H, Sq)`` against ``threshold``."""
    fail = row_err > threshold
    total = fail.size
    n = int(fail.sum())
    lines = []
    if n == 0:
        return fail, ["no row exceeds the allowed error"]
    b, h, sq = fail.shape
    lines.append(f"{n} of {total} rows (b, h, i) exceed the allowed error {threshold:.3g}")
    edge = max(1, math.ceil(sq / 16))
    if sq >= 2 * edge:
        for label, sl in (("first", slice(0, edge)), ("last", slice(sq - edge, sq))):
            share = fail[:, :, sl].sum() / n
            if share >= SHARE and share >= ENRICH * edge / sq:
                where = f"i < {edge}" if label == "first" else f"i >= {sq - edge}"
                lines.append(f"{share:.0%} of them are in the {label} {edge} query rows ({where})")
    for axis, name, size in ((1, "heads", h), (0, "batch entries", b)):
        counts = fail.sum(axis=tuple(a for a in (0, 1, 2) if a != axis))
        hit = np.nonzero(counts)[0]
        if size > 1 and hit.size < size:
            listed = ", ".join(map(str, hit[:8])) + (", ..." if hit.size > 8 else "")
            lines.append(f"only {name} {listed} fail ({hit.size} of {size})")
    return fail, lines


# -- keys -----------------------------------------------------------------------------------------------
def _probabilities(call, rows, bb, hh):
    """Reference probabilities ``(r, Sk)`` of rows ``rows`` for batch ``bb``, head ``hh``."""
    be = NumpyBackend()
    q, k = call["q"], call["k"][:, call["head_map"]]
    sq, sk = q.shape[2], k.shape[2]
    s, _ = be.scores(q[:, :, rows], k, rows, sq, sk, pattern=call["pattern"], scale=call["scale"],
                     score_mod=call.get("score_mod"))
    s = np.broadcast_to(s, q.shape[:2] + s.shape[2:])[bb, hh]
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(l > 0, e / l, 0.0)


def _explained(e, o, vals, p, block: int):
    """Per key ``cos²(e, v_j - o)`` and per block ``cos²(e, o_J - o)`` for one row."""
    ne = np.linalg.norm(e)
    u = vals - o[None, :]
    nu = np.linalg.norm(u, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        key = np.where(nu > 0, (u @ e) / (nu * ne), 0.0) ** 2 if ne > 0 else np.zeros(len(u))
    nb = -(-len(vals) // block)
    blk = np.zeros(nb)
    for t in range(nb):
        sl = slice(t * block, (t + 1) * block)
        w = p[sl].sum()
        if w > 0 and ne > 0:
            d = (p[sl] @ vals[sl]) / w - o
            nd = np.linalg.norm(d)
            blk[t] = 0.0 if nd == 0 else (d @ e / (nd * ne)) ** 2
    return np.nan_to_num(key), blk


def relation(j: int, i: int, band, visible: Optional[bool] = None) -> str:
    """Where key ``j`` lies for query ``i`` relative to the band ``(s, lo, hi)``; ``visible`` (the
    pattern's verdict on the pair) is mentioned when the band alone does not decide it."""
    s, lo, hi = band
    rel = j - (i + s)
    if lo is None and hi is None:
        return {None: "at no band edge (no causal/window band)", True: "among the visible keys",
                False: "among the hidden keys"}[visible]
    if lo is not None and rel < lo:
        return ("one key left of the window's left edge" if rel == lo - 1
                else f"{lo - rel} keys left of the window's left edge")
    if hi is not None and rel > hi:
        what = "the causal diagonal" if hi == 0 else "the window's right edge"
        return f"one key right of {what}" if rel == hi + 1 else f"{rel - hi} keys right of {what}"
    if hi is not None and rel == hi:
        return "on the causal diagonal" if hi == 0 else "on the window's right edge"
    if lo is not None and rel == lo:
        return "on the window's left edge"
    return "inside the band" + ("" if visible is None or visible else " but hidden by the mask")


def block_size(sk: int) -> int:
    """Default key block: a power of two >= 16 giving at most :data:`HEAT_BLOCKS` blocks."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, -(-sk // HEAT_BLOCKS))))))


def candidate_keys(visible: np.ndarray) -> np.ndarray:
    """The keys a row's error may be put on: those it sees and the hidden keys next to one it
    sees (an off-by-one edge); a row that sees nothing has no candidate."""
    near = visible.copy()
    near[1:] |= visible[:-1]
    near[:-1] |= visible[1:]
    return near


def _key_account(call, err_vec, ref, rows_idx, block):
    """Attribution for rows ``rows_idx`` (list of (b, h, i)): list of dicts (a row without a
    candidate key is left out)."""
    v = call["v"][:, call["head_map"]]
    sq, sk = call["q"].shape[2], call["k"].shape[2]
    pattern = call["pattern"]
    band = pattern.band(sq, sk)
    found = []
    for bb, hh, i in rows_idx:
        p = _probabilities(call, slice(i, i + 1), bb, hh)[0]
        key, blk = _explained(err_vec[bb, hh, i], ref[bb, hh, i], v[bb, hh], p, block)
        m = pattern.mask(sq, sk, slice(i, i + 1))
        seen = np.broadcast_to(m[min(bb, m.shape[0] - 1), min(hh, m.shape[1] - 1), 0], (sk,))
        allowed = candidate_keys(seen)
        if not allowed.any():
            continue
        key = np.where(allowed, key, -1.0)
        j = int(np.argmax(key))
        t = int(np.argmax(blk))
        vis = seen[j]
        found.append({"row": (int(bb), int(hh), int(i)), "key": j, "key_explained": float(key[j]),
                      "key_relation": relation(j, i, band, bool(vis)), "block": t,
                      "block_keys": (t * block, min(sk, (t + 1) * block) - 1),
                      "block_explained": float(blk[t])})
    return found


def _key_lines(found, sk):
    lines = []
    strong = [f for f in found if f["key_explained"] >= 0.9]
    if strong:
        rels = {}
        cols = {}
        for f in strong:
            rels[f["key_relation"]] = rels.get(f["key_relation"], 0) + 1
            cols[f["key"]] = cols.get(f["key"], 0) + 1
        rel, count = max(rels.items(), key=lambda kv: kv[1])
        lines.append(f"in {len(strong)} of {len(found)} examined failing rows one key explains "
                     f">= 90% of the error; for {count} of them it lies {rel}")
        col, ccount = max(cols.items(), key=lambda kv: kv[1])
        if ccount >= SHARE * len(found) and len(found) > 1:
            lines.append(f"key column j = {col} explains the error in {ccount} of "
                         f"{len(found)} examined rows")
    blocks = {}
    for f in found:
        if f["block_explained"] >= 0.9 and f["block_explained"] > f["key_explained"]:
            blocks[f["block_keys"]] = blocks.get(f["block_keys"], 0) + 1
    if blocks:
        keys, count = max(blocks.items(), key=lambda kv: kv[1])
        lines.append(f"in {sum(blocks.values())} examined rows re-weighting one key block explains "
                     f">= 90% of the error (most often keys {keys[0]}..{keys[1]}, {count} rows)")
    return lines


def heat_map(call, err_vec, ref, bb, hh, block) -> dict:
    """``{"rows", "block_starts", "values"}``: explained error per (sampled row, key block)."""
    sq, sk = call["q"].shape[2], call["k"].shape[2]
    v = call["v"][:, call["head_map"]][bb, hh]
    rows = np.unique(np.linspace(0, sq - 1, min(sq, HEAT_ROWS)).round().astype(int))
    nb = -(-sk // block)
    values = np.zeros((rows.size, nb))
    for r, i in enumerate(rows):
        p = _probabilities(call, slice(i, i + 1), bb, hh)[0]
        e = err_vec[bb, hh, i]
        key, blk = _explained(e, ref[bb, hh, i], v, p, block)
        keymax = np.array([key[t * block:(t + 1) * block].max() for t in range(nb)])
        values[r] = np.linalg.norm(e) * np.maximum(keymax, blk)
    return {"batch": int(bb), "head": int(hh), "rows": rows, "sk": sk,
            "block_starts": np.arange(nb) * block, "values": values}


def analyse(actual, reference, threshold: float, *, case: Optional[dict] = None,
            variant: str = "sdpa", max_rows: int = 32, heat: bool = True,
            block_k: Optional[int] = None, max_pairs: int = 1 << 26) -> dict:
    """Where the output error clusters (module docstring).

    ``actual``/``reference`` are outputs in the case's layout (``bhsd`` or ``bshd``; packed
    ``(total, H, Dv)`` is described by rows only). Returns ``{"lines": [...], "worst": {...} or None,
    "attribution": [...], "heat": {...} or None}``; ``worst`` holds ``index`` ``(b, h, i, j)`` (key
    ``j``) with its ``relation`` and ``explained`` share when a key can be attributed.
    ``block_k`` is the key block of the block attribution and the heat map (default
    :func:`block_size`; pass your kernel's tile size). Key attribution re-runs the variant once
    on the numpy backend to see its ``attend`` call; it is skipped (and says so) beyond
    ``max_pairs`` query-key pairs ``B * Hq * Sq * Sk``.
    """
    case = case or {}
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    from .numerics import abs_error
    err = abs_error(a, r)
    res = {"lines": [], "worst": None, "attribution": [], "heat": None, "explanations": []}
    if err.size == 0:
        return res
    if err.ndim == 3:  # packed (total, H, Dv): describe (h, row)
        row_err = err.max(axis=-1).T[None]
        _, res["lines"] = row_clusters(row_err, threshold)
        return res
    err = _to_bhsd(err, case)
    a, r = _to_bhsd(a, case), _to_bhsd(r, case)
    row_err = err.max(axis=-1)
    fail, res["lines"] = row_clusters(row_err, threshold)
    bad_nan = int(np.isnan(a).any(axis=-1).sum())
    if bad_nan:
        res["lines"].append(f"{bad_nan} rows contain NaN in the output under test")
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    res["worst"] = {"index": tuple(int(x) for x in worst[:3]) + (None,), "element": tuple(
        int(x) for x in worst)}
    if not all(k in case for k in ("q", "k", "v")) or a.shape[-1] < 2 or not np.isfinite(a).all():
        return res
    pairs = a.shape[0] * a.shape[1] * a.shape[2] * np.shape(case["k"])[
        1 if case.get("layout") == "bshd" else 2]
    if pairs > max_pairs:
        res["lines"].append(f"(key attribution skipped: {pairs} query-key pairs > max_pairs "
                            f"{max_pairs})")
        return res
    globals_ = global_explanations(a, r, threshold, case, variant, fail)
    res["explanations"] = globals_
    if globals_:  # a global error explains the output: no per-key account after it
        res["lines"] = [g["line"] for g in globals_] + res["lines"]
        return res
    call = _trace(case, variant)
    if call is None:
        res["lines"].append(f"(no key attribution: variant {variant!r} does not call attend once)")
        return res
    sk = call["k"].shape[2]
    block = block_size(sk) if block_k is None else int(block_k)
    diff = a - r
    order = np.argsort(row_err, axis=None, kind="stable")[::-1]
    chosen = [tuple(int(x) for x in worst[:3])]  # the worst element's row first
    chosen += [c for c in (np.unravel_index(int(x), row_err.shape) for x in order[:max_rows])
               if fail[c] and tuple(int(x) for x in c) != chosen[0]][:max_rows - 1]
    found = _key_account(call, diff, r, chosen, block)
    res["attribution"] = found
    res["lines"] += _key_lines(found, sk)
    most = fail.mean() >= MOST_ROWS
    if most and not globals_ and not any(f["key_explained"] >= 0.9 for f in found):
        res["lines"].insert(0, f"{int(fail.sum())} of {fail.size} rows fail and no single key "
                               f"explains them: a global error, not one misplaced key")
    if not found:
        return res
    top = found[0]
    res["worst"].update(index=top["row"] + (top["key"],), relation=top["key_relation"],
                        explained=top["key_explained"], block_keys=top["block_keys"],
                        block_explained=top["block_explained"])
    if heat:
        res["heat"] = heat_map(call, diff, r, top["row"][0], top["row"][1], block)
    return res


#: "most rows fail": global hypotheses are reported first, and a per-key account alone is not
#: trusted, from this share of failing rows on
MOST_ROWS = 0.5


def _rerun(case, variant, **changes):
    """The float64 output of ``variant`` on ``case`` with some parameters changed, or None when
    that combination is not valid (the hypothesis then does not apply)."""
    from . import pipeline
    from .errors import RefattnError
    from .numerics import split_case
    try:
        var = pipeline.variant_of(variant)
        arrays, params, _ = split_case(var, case)
        params = {**params, **changes}
        return np.asarray(pipeline.run(var, "numpy", arrays, params).outputs["out"], np.float64)
    except (RefattnError, ValueError, TypeError):
        return None


#: a hypothesis fits when it brings the error within the allowed one, or to this share of the error
#: against the reference (a float32 kernel judged by the float64 rule keeps its rounding noise)
FIT_SHARE = 0.01


def _fits(a, candidate, threshold, error=0.0) -> bool:
    """Whether ``candidate`` (the reference with one thing changed) explains ``a``: within
    ``threshold``, or within :data:`FIT_SHARE` of ``error`` (max |a - reference|)."""
    return candidate is not None and candidate.shape == a.shape and bool(
        np.all(np.isfinite(candidate))
        and np.max(np.abs(candidate - a), initial=0.0) <= max(threshold, FIT_SHARE * error))


def _scale_fit(a, case, variant, d):
    """``(factor, output)`` of the scale that brings the output closest to ``a``: a golden-section
    search over log(factor) in [1/256, 256] of the normwise error (about 40 evaluations)."""
    base = case.get("scale") or 1.0 / np.sqrt(d)
    cache = {}

    def err(x):
        if x not in cache:
            out = _rerun(case, variant, scale=float(base * np.exp(x)))
            cache[x] = (np.inf if out is None or out.shape != a.shape else float(np.linalg.norm(out - a)), out)
        return cache[x][0]

    lo, hi = np.log(1 / 256), np.log(256)
    grid = np.linspace(lo, hi, 17)  # a coarse grid first: the error is not unimodal everywhere
    best = min(grid, key=err)
    lo, hi = best - (hi - lo) / 16, best + (hi - lo) / 16
    g = (np.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(30):
        if err(x1) < err(x2):
            hi, x2 = x2, x1
            x1 = hi - g * (hi - lo)
        else:
            lo, x1 = x1, x2
            x2 = lo + g * (hi - lo)
    x = min(cache, key=lambda k: cache[k][0])
    return float(np.exp(x)), cache[x][1]


def global_explanations(a, r, threshold, case, variant, fail) -> list:
    """The global hypotheses of the module docstring that fit the output ``a`` (bhsd, as the case
    reads it) within ``threshold``: ``[{"name", "line", ...}]`` -- the first that fits only (they
    are tested in order). Each re-runs the numpy reference with one thing changed."""
    if fail.mean() < MOST_ROWS or not case:
        return []
    error = float(np.max(np.abs(a - r)))
    if np.all(a == 0):
        return [{"name": "zero", "line": "the output under test is all zero (nothing written?)"}]
    if np.all(a == a.reshape(-1)[0]):
        return [{"name": "constant",
                 "line": f"the output under test is constant ({a.reshape(-1)[0]:.6g})"}]

    def rerun(**change):
        out = _rerun(case, variant, **change)
        return None if out is None or out.size != a.size else _to_bhsd(out, case).reshape(a.shape)

    layout = case.get("layout", "bhsd")
    other = "bshd" if layout == "bhsd" else "bhsd"
    if _fits(a, rerun(layout=other), threshold, error):
        shape = "(B, S, H, D)" if other == "bshd" else "(B, H, S, D)"
        return [{"name": "layout", "line": f"the output matches the reference computed with "
                 f"layout={other!r}: the arrays look like {shape}; pass --param layout={other}"}]
    causal = case.get("causal", False)
    if (causal or case.get("window") is not None) and np.shape(case["q"])[-2] != np.shape(case["k"])[-2]:
        flipped = {"top_left": "bottom_right", "bottom_right": "top_left"}
        align = causal if isinstance(causal, str) else case.get("alignment", "bottom_right")
        change = {"causal": flipped[align]} if isinstance(causal, str) else {"alignment": flipped[align]}
        if _fits(a, rerun(**change), threshold, error):
            return [{"name": "alignment", "line": f"the output matches the {flipped[align]} alignment "
                     f"of the causal diagonal and window; the reference's is {align} (s = Sk - Sq "
                     f"bottom-right, 0 top-left)"}]
    d = np.shape(case["q"])[-1]
    factor, fitted = _scale_fit(a, case, variant, d)
    fitted = None if fitted is None or fitted.size != a.size else _to_bhsd(fitted, case).reshape(a.shape)
    if abs(np.log(factor)) > 0.01 and _fits(a, fitted, 2 * threshold, error):
        hint = ""
        if abs(factor * np.sqrt(d) - 1) < 0.02:
            hint = " -- 1/D instead of 1/sqrt(D)?"
        elif abs(factor / np.sqrt(d) - 1) < 0.02:
            hint = " -- no 1/sqrt(D) at all?"
        return [{"name": "scale", "factor": factor,
                 "line": f"the scale looks off by a factor of {factor:.4g}: the output matches the "
                         f"reference with scale x {factor:.4g}{hint}"}]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.sum(a * r, axis=-1) / np.sum(r * r, axis=-1)
    alpha = np.where(np.isfinite(alpha), alpha, 1.0)
    if _fits(a, r * alpha[..., None], threshold, error) and np.max(np.abs(alpha - 1)) > 0.05:
        return [{"name": "normalisation",
                 "line": f"each output row is the reference times a factor of its own (from "
                         f"{alpha.min():.3g} to {alpha.max():.3g}): the softmax is not normalised "
                         f"(missing the division by the row sum?)"}]
    return []


def lse_explanations(a, r, threshold) -> list:
    """``[line]`` when the LSE under test is the reference in another base (2 instead of e, or e
    instead of 2)."""
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    fin = np.isfinite(r) & np.isfinite(a)
    if not fin.any():
        return []
    for factor, text in ((1 / np.log(2), "base 2 (log2 of the row sums), the reference natural log "
                          "(pass lse_base=2 to compare in base 2)"),
                         (np.log(2), "natural log, the reference base 2 (lse_base=2 was given)")):
        if np.max(np.abs(a[fin] - r[fin] * factor)) <= threshold and not np.allclose(a[fin], r[fin]):
            return [f"the LSE under test is in {text}"]
    return []


def worst_line(worst: Optional[dict]) -> str:
    """One line naming the worst (b, h, i, j)."""
    if not worst:
        return "worst: n/a"
    b, h, i, j = worst["index"]
    if j is None:
        return f"worst element (b, h, i, d) = {worst['element']}"
    return (f"worst (b, h, i, j) = ({b}, {h}, {i}, {j}): key {j} explains "
            f"{worst['explained']:.0%} of row {i}'s error and lies {worst['relation']}")


# -- writing --------------------------------------------------------------------------------------------
def _heat_png(heat) -> Optional[bytes]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    bs, rows = heat["block_starts"], heat["rows"]
    step = bs[1] - bs[0] if len(bs) > 1 else 1
    right = heat.get("sk", bs[-1] + step)
    im = ax.imshow(heat["values"], aspect="auto", origin="upper", cmap="magma",
                   extent=(bs[0], right, rows[-1] + 0.5, rows[0] - 0.5))
    ax.set_xlabel(f"key j (blocks of {step})")
    ax.set_ylabel("query row i")
    ax.set_title(f"explained error, batch {heat['batch']}, head {heat['head']}")
    fig.colorbar(im, ax=ax, label="|e_i| x cos^2")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _table(results: dict):
    head = ["output", "verdict", "max abs", "allowed", "baseline", "max rel", "normwise rel",
            "max ULP", "mismatches", "NaN/Inf", "worst index"]
    rows = [[n, r["verdict"], f"{r['max_abs']:.3e}", f"{r['allowed']:.3e}",
             f"{r['baseline_max_abs']:.3e}", f"{r['max_rel']:.3e}", f"{r['normwise_rel']:.3e}",
             f"{r['max_ulp']:.1f}", str(r["mismatches"]), f"{r['nan']}/{r['inf']}",
             str(r["worst_index"])] for n, r in results.items()]
    return head, rows


def write(path: str, comparison: dict, analysis: Optional[dict] = None, *,
          title: str = "refattn comparison", context: Optional[dict] = None) -> list:
    """Write the report to ``path`` (``.md`` or ``.html``); returns the files written.

    ``comparison`` is :func:`refattn.numerics.compare_all`'s result; ``analysis`` is
    :func:`analyse`'s; ``context`` maps labels to values shown first (variant, dtype, shape ...).
    """
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in (".md", ".html", ".htm"):
        raise ParameterError(f"report: expected a path ending in .md or .html, got {path!r}")
    analysis = analysis or {"lines": [], "worst": None, "heat": None}
    head, rows = _table(comparison["results"])
    lines = list(analysis.get("lines", []))
    if comparison["verdict"] == "FAIL" and analysis.get("worst"):
        lines.insert(0, worst_line(analysis["worst"]))
    png = _heat_png(analysis["heat"]) if analysis.get("heat") else None
    no_png = ("no heat map (install matplotlib: pip install 'refattn[plot]')"
              if analysis.get("heat") and png is None else None)
    ctx = list((context or {}).items())
    written = [str(path)]
    if ext == ".md":
        out = [f"# {title}", "", f"**Verdict: {comparison['verdict']}**", ""]
        out += [f"- {k}: `{v}`" for k, v in ctx] + ([""] if ctx else [])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += [""] + [f"- {l}" for l in lines]
        if png is not None:
            img = os.path.splitext(str(path))[0] + "_heatmap.png"
            with open(img, "wb") as fh:
                fh.write(png)
            written.append(img)
            out += ["", f"![error per (query, key block)]({os.path.basename(img)})"]
        elif no_png:
            out += ["", no_png]
        text = "\n".join(out) + "\n"
    else:
        esc = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
               "<style>td,th{padding:2px 8px;border:1px solid #ccc}table{border-collapse:collapse}"
               "</style></head><body>", f"<h1>{esc(title)}</h1>",
               f"<p><b>Verdict: {esc(comparison['verdict'])}</b></p>"]
        if ctx:
            out.append("<ul>" + "".join(f"<li>{esc(str(k))}: <code>{esc(str(v))}</code></li>"
                                        for k, v in ctx) + "</ul>")
        out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
        out.append("</table><ul>" + "".join(f"<li>{esc(l)}</li>" for l in lines) + "</ul>")
        if png is not None:
            out.append("<img alt='error per (query, key block)' src='data:image/png;base64,"
                       + base64.b64encode(png).decode() + "'>")
        elif no_png:
            out.append(f"<p>{esc(no_png)}</p>")
        text = "\n".join(out) + "\n</body></html>\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return written

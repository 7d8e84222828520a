"""A slow, obviously-correct attention reference for the tests.

Written from the definitions in ``VARIANTS.md`` (section A) and ``DESIGN.md`` (section 3), *not* from
refattn's code, and importing nothing from refattn. Explicit Python loops over ``(b, h, i)`` and
``j``: for each query the visible keys are listed from the definitions, their scores are computed one
by one, and the softmax is a max-subtracted sum done with :func:`math.fsum`. Small shapes only.

Conventions (bhsd layout only; callers transpose for bshd):

* ``s = Sk - Sq`` for ``alignment="bottom_right"``, ``0`` for ``"top_left"``; ``causal=True`` uses
  ``alignment``; ``causal="top_left"|"bottom_right"`` sets the alignment;
* causal: ``j <= i + s``; window ``(left, right)``, ``-1`` unbounded: ``i+s-left <= j <= i+s+right``;
* score ``x = scale * q.k``; softcap ``x = c * tanh(x / c)``; ALiBi ``-slope * |i + s - j|``
  (``"symmetric"``) or ``+slope * j`` (``"flash"``); bias added; mask hides the pair;
* sinks: ``exp(sink_h)`` is one more term of the softmax denominator; the LSE excludes it;
* dropout: ``P_ij * keep_ij / (1 - p)``; the LSE is unaffected;
* empty rows (no visible key, or every visible score ``-inf``): output 0 (``"nan"``: NaN), LSE -inf.
"""

from __future__ import annotations

import math

import numpy as np


def element(a, b, h, i, j):
    """Element ``(b, h, i, j)`` of ``a``, broadcast to ``(B, H, Sq, Sk)`` by numpy's rules."""
    a = np.asarray(a)
    idx = (b, h, i, j)[4 - a.ndim:]
    return a[tuple(0 if n == 1 else x for n, x in zip(a.shape, idx))]


def diagonal_offset(alignment, sq, sk):
    if alignment == "bottom_right":
        return sk - sq
    assert alignment == "top_left", alignment
    return 0


def is_visible(i, j, *, s, causal, window):
    """The band part of the visibility of key ``j`` to query ``i`` (no dense mask)."""
    if causal and j > i + s:
        return False
    if window is not None:
        left, right = window
        if left != -1 and j < i + s - left:
            return False
        if right != -1 and j > i + s + right:
            return False
    return True


def reference_attention(q, k, v, *, scale=None, causal=False, alignment="bottom_right", window=None,
                        mask=None, bias=None, softcap=None, alibi_slopes=None,
                        alibi_form="symmetric", sinks=None, head_map=None, keep=None, dropout_p=0.0,
                        empty_row="zero", lse_base=math.e):
    """``(out, lse)`` of attention by loops over the definition. ``keep`` is an explicit dropout
    keep-mask (bool, broadcastable to (B, H, Sq, Sk)) used with ``dropout_p``."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    nb, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if isinstance(causal, str):
        alignment, causal = causal, True
    s = diagonal_offset(alignment, sq, sk)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if head_map is None:
        head_map = [h // (hq // hkv) for h in range(hq)]
    out = np.zeros((nb, hq, sq, v.shape[3]))
    lse = np.full((nb, hq, sq), -np.inf)
    for b in range(nb):
        for h in range(hq):
            kh = int(head_map[h])
            for i in range(sq):
                scores = {}
                for j in range(sk):
                    if not is_visible(i, j, s=s, causal=causal, window=window):
                        continue
                    if mask is not None and not element(mask, b, h, i, j):
                        continue
                    x = scale * float(np.dot(q[b, h, i], k[b, kh, j]))
                    if softcap is not None:
                        x = softcap * math.tanh(x / softcap)
                    if alibi_slopes is not None:
                        slope = float(alibi_slopes[h])
                        x += slope * j if alibi_form == "flash" else -slope * abs(i + s - j)
                    if bias is not None:
                        x += float(element(bias, b, h, i, j))
                    if x != -math.inf:
                        scores[j] = x
                if not scores:
                    if empty_row == "nan":
                        out[b, h, i] = np.nan
                    continue
                m = max(scores.values())
                lse[b, h, i] = m + math.log(math.fsum(math.exp(x - m) for x in scores.values()))
                # the denominator, with the sink as one more term
                terms = [math.exp(x - m) for x in scores.values()]
                if sinks is not None:
                    terms.append(math.exp(float(sinks[h]) - m))
                den = math.fsum(terms)
                for j, x in scores.items():
                    pij = math.exp(x - m) / den
                    if keep is not None:
                        pij = pij / (1.0 - dropout_p) if element(keep, b, h, i, j) else 0.0
                    out[b, h, i] += pij * v[b, kh, j]
    if lse_base == 2:
        lse = lse / math.log(2.0)
    return out, lse


def reference_probabilities(q, k, **kw):
    """The softmax matrix ``P (B, Hq, Sq, Sk)`` (sink share excluded), via the reference with
    ``v`` the identity: row ``i`` of the output is row ``i`` of ``P``."""
    nb, hkv, sk, _ = np.shape(k)
    eye = np.broadcast_to(np.eye(sk), (nb, hkv, sk, sk))
    return reference_attention(q, k, eye, **kw)[0]


def philox_keep_mask(seed, p, nb, nh, sq, sk):
    """The dropout keep-mask of DESIGN section 3, element by element from ``numpy.random.Philox``.

    Pair ``(b, h, i, j)``: key ``(seed, b*H + h)``; ``n = i*Sk + j``; the block for the 256-bit
    counter ``c = n // 4`` is ``Philox(key, counter=(c - 1) % 2**256).random_raw(4)`` (numpy
    increments before generating); word ``n % 4``; ``u = (w >> 11) * 2**-53``; keep iff ``u >= p``.
    """
    keep = np.zeros((nb, nh, sq, sk), dtype=bool)
    for b in range(nb):
        for h in range(nh):
            blocks = {}
            for i in range(sq):
                for j in range(sk):
                    n = i * sk + j
                    c = n // 4
                    if c not in blocks:
                        key = np.array([seed, b * nh + h], dtype=np.uint64)  # not a list: >= 2**63
                        gen = np.random.Philox(key=key, counter=(c - 1) % 2 ** 256)
                        blocks[c] = gen.random_raw(4)
                    u = (int(blocks[c][n % 4]) >> 11) * 2.0 ** -53
                    keep[b, h, i, j] = u >= p
    return keep

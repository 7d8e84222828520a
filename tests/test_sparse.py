"""Every sparse variant against an independent computation.

For each variant the test writes the visibility rule from VARIANTS.md section D as a plain Python
predicate over ``(b, h, i, j)``, builds the mask with loops and feeds it to ``tests/reference.py``'s
loop-over-the-definition attention (which imports nothing from refattn). Data-dependent selections
(block_sparse top-k/threshold, seer, nsa) are recomputed in the test with loops. Gradients of the
pattern variants are checked against central finite differences.
"""

import math
import warnings

import numpy as np
import pytest

import refattn
from refattn.errors import ParameterError, ShapeError
from reference import reference_attention

RNG = np.random.default_rng(1234)


def qkv(b=2, hq=4, sq=24, sk=None, d=8, hkv=2, seed=0):
    rng = np.random.default_rng(seed)
    sk = sq if sk is None else sk
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, d)))


def mask_from(pred, b, h, sq, sk):
    return np.array([[[[bool(pred(bb, hh, i, j)) for j in range(sk)] for i in range(sq)]
                      for hh in range(h)] for bb in range(b)])


def check(variant, pred, q, k, v, tol=1e-12, **params):
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    m = mask_from(pred, b, hq, sq, sk)
    ref, ref_lse = reference_attention(q, k, v, mask=m)
    out, lse = refattn.attention(q, k, v, variant=variant, return_lse=True, **params)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=tol)
    return m


# -- the simple predicates (s = 0 here: Sq == Sk) ---------------------------------------------------
def test_sliding_window_both_forms():
    q, k, v = qkv()
    check("sliding_window", lambda b, h, i, j: i - 4 <= j <= i, q, k, v, window=(4, 0))
    check("sliding_window", lambda b, h, i, j: abs(i - j) <= 3, q, k, v, window=3)
    check("local", lambda b, h, i, j: i - 1 <= j <= i + 2, q, k, v, window=(1, 2))


def test_sliding_window_bottom_right_decode_rows():
    q, k, v = qkv(sq=5, sk=19)
    s = 19 - 5
    check("sliding_window", lambda b, h, i, j: i + s - 6 <= j <= i + s, q, k, v, window=(6, 0))


def test_dilated_and_per_head():
    q, k, v = qkv()
    check("dilated", lambda b, h, i, j: (j - i) % 3 == 0 and -6 <= j - i <= 3, q, k, v,
          steps=(2, 1), dilation=3)
    ds = (1, 2, 3, 4)
    check("dilated", lambda b, h, i, j: (j - i) % ds[h] == 0 and abs(j - i) <= 2 * ds[h], q, k, v,
          steps=(2, 2), dilation=ds)


def test_strided_union_and_heads():
    q, k, v = qkv()
    a = lambda i, j: 0 <= i - j < 5  # noqa: E731
    bb = lambda i, j: j <= i and (i - j) % 5 == 0  # noqa: E731
    check("strided", lambda b, h, i, j: a(i, j) or bb(i, j), q, k, v, stride=5)
    check("strided", lambda b, h, i, j: a(i, j) if h % 2 == 0 else bb(i, j), q, k, v, stride=5,
          mode="heads")


def test_fixed_causal_and_bidirectional():
    q, k, v = qkv()
    ell, c = 6, 2
    rule = lambda i, j: j // ell == i // ell or j % ell >= ell - c  # noqa: E731
    check("fixed", lambda b, h, i, j: j <= i and rule(i, j), q, k, v, block=ell, c=c)
    check("fixed", lambda b, h, i, j: rule(i, j), q, k, v, block=ell, c=c, causal=False)


def test_global_hybrid_streaming():
    q, k, v = qkv()
    g = {0, 7, 23}
    check("global", lambda b, h, i, j: i in g or j in g, q, k, v, tokens=(0, 7, 23))
    g2 = {0, 12}
    check("hybrid", lambda b, h, i, j: abs(i - j) <= 2 or i in g2 or j in g2, q, k, v, local=2,
          tokens=(0, 12))
    check("streaming", lambda b, h, i, j: j <= i and (j < 2 or i - j < 6), q, k, v, n_sink=2, recent=6)


def test_global_mask_per_batch_item():
    q, k, v = qkv()
    gm = np.zeros((2, 24), dtype=bool)
    gm[0, [1, 9]] = True
    gm[1, [20]] = True
    check("global", lambda b, h, i, j: gm[b, i] or gm[b, j], q, k, v, tokens=gm)


def test_random_keys_explicit_table_and_seeded_draw():
    q, k, v = qkv(b=1)
    table = RNG.integers(0, 24, (4, 24, 3))
    table[0, 0] = [5, 5, 5]  # repeats are one key
    check("random", lambda b, h, i, j: j in set(table[h, i]), q, k, v, r=3, table=table)
    m = check("random", lambda b, h, i, j: True, q[:, :, :1], k, v, r=24)  # r = Sk: everything
    assert m.all()
    # the seeded draw: r distinct keys per row and head, different heads differ
    out = refattn.attention(q, k, v, variant="random", r=3, seed=7)
    out2 = refattn.attention(q, k, v, variant="random", r=3, seed=7)
    np.testing.assert_array_equal(out, out2)


def test_random_blocks_table():
    q, k, v = qkv(b=1)
    table = RNG.integers(0, 6, (4, 6, 2))
    check("random", lambda b, h, i, j: j // 4 in set(table[h, i // 4]), q, k, v, r=2, block=4,
          table=table)


# -- BigBird ----------------------------------------------------------------------------------------
def bigbird_multiplicity(nb, table, h, qb, kb):
    """Times HF counts key block kb for query block qb (written from VARIANTS D)."""
    if qb in (0, nb - 1):
        return 1
    structural = kb in (0, nb - 1) or abs(kb - qb) <= 1
    return int(structural) + int(np.sum(table[h, qb - 1] == kb))


def multiset_reference(q, k, v, weights):
    """Attention where pair (i, j) is counted weights[b, h, i, j] times (loops)."""
    b, hq, sq, _ = q.shape
    hkv = k.shape[1]
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    scale = 1 / math.sqrt(q.shape[3])
    for bb in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                js = [j for j in range(k.shape[2]) if weights[bb, h, i, j] > 0]
                x = {j: scale * float(q[bb, h, i] @ k[bb, kh, j]) for j in js}
                m = max(x.values())
                den = math.fsum(weights[bb, h, i, j] * math.exp(x[j] - m) for j in js)
                for j in js:
                    out[bb, h, i] += weights[bb, h, i, j] * math.exp(x[j] - m) / den * v[bb, kh, j]
    return out


def test_bigbird_explicit_table_once_and_hf():
    bs, r, L = 4, 1, 32
    nb = L // bs
    q, k, v = qkv(b=1, hq=2, sq=L, hkv=2)
    table = np.array([[[0], [4], [3], [1], [7], [2]], [[5], [6], [1], [2], [3], [0]]])
    w = np.array([[[[bigbird_multiplicity(nb, table, h, i // bs, j // bs) for j in range(L)]
                    for i in range(L)] for h in range(2)]])
    hf = refattn.attention(q, k, v, variant="bigbird", block_size=bs, num_random_blocks=r,
                           rand_attn=table, duplicates="hf")
    np.testing.assert_allclose(hf, multiset_reference(q, k, v, w), rtol=0, atol=1e-12)
    once = refattn.attention(q, k, v, variant="bigbird", block_size=bs, num_random_blocks=r,
                             rand_attn=table)
    np.testing.assert_allclose(once, multiset_reference(q, k, v, np.minimum(w, 1)), rtol=0, atol=1e-12)


def test_bigbird_hf_duplicates_lse_and_gradients():
    bs, r, L = 4, 1, 32
    q, k, v = qkv(b=1, hq=2, sq=L, hkv=2, seed=3)
    table = np.zeros((2, 6, 1), dtype=int)  # HF eval: block 0 everywhere
    kw = dict(variant="bigbird", block_size=bs, num_random_blocks=r, rand_attn=table, duplicates="hf")
    _, lse = refattn.attention(q, k, v, return_lse=True, **kw)
    # row 12 (block 3) counts block 0 twice: lse = log(sum exp over set + sum exp over block 0)
    x = (q[0, 0, 12] @ k[0, 0].T) / math.sqrt(8)
    vis = [j for j in range(L) if j // bs in (0, 7, 2, 3, 4)]
    want = np.logaddexp(np.logaddexp.reduce(x[vis]), np.logaddexp.reduce(x[:bs]))
    assert abs(lse[0, 0, 12] - want) < 1e-12
    fd_check(q, k, v, **kw)


def test_bigbird_our_generator():
    bs, r, L = 4, 2, 64
    nb = L // bs
    from refattn.variants.sparse.bigbird import refattn_rand_attn, window_and_global
    t = refattn_rand_attn(nb, r, 3, seed=11)
    seen = window_and_global(nb)
    assert t.shape == (3, nb - 2, r)
    for h in range(3):
        for row in range(nb - 2):
            assert len(set(t[h, row])) == r and not seen[row + 1, t[h, row]].any()
    q, k, v = qkv(b=1, hq=3, sq=L, hkv=3)
    w = np.array([[[[bigbird_multiplicity(nb, t, h, i // bs, j // bs) for j in range(L)]
                    for i in range(L)] for h in range(3)]])
    assert w.max() == 1
    out = refattn.attention(q, k, v, variant="bigbird", block_size=bs, num_random_blocks=r, seed=11)
    np.testing.assert_allclose(out, multiset_reference(q, k, v, w), rtol=0, atol=1e-12)


def test_bigbird_errors_pad_and_fallback():
    q, k, v = qkv(b=1, hq=2, sq=30, hkv=2)
    with pytest.raises(ShapeError, match="multiple of block_size=4"):
        refattn.attention(q, k, v, variant="bigbird", block_size=4, num_random_blocks=1)
    # pad=True: the ragged last block is global; the rest as if padded with masked keys
    table = np.array([[[3]] * 6, [[5]] * 6])
    out = refattn.attention(q, k, v, variant="bigbird", block_size=4, num_random_blocks=1,
                            pad=True, rand_attn=table)
    nb = 8
    w = np.array([[[[bigbird_multiplicity(nb, table, h, i // 4, j // 4) for j in range(30)]
                    for i in range(30)] for h in range(2)]])
    np.testing.assert_allclose(out, multiset_reference(q, k, v, np.minimum(w, 1)), rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match="full attention"):
        full = refattn.attention(q[:, :, :28], k[:, :, :28], v[:, :, :28], variant="bigbird",
                                 block_size=4, num_random_blocks=1)
    np.testing.assert_allclose(full, refattn.attention(q[:, :, :28], k[:, :, :28], v[:, :, :28]),
                               rtol=0, atol=1e-14)
    with pytest.raises(ShapeError, match=r"rand_attn: expected shape \(2, 6, 1\) \(Hq, nb-2, r\) of block indices"):
        refattn.attention(q, k, v, variant="bigbird", block_size=4,
                          num_random_blocks=1, rand_attn=np.zeros((2, 5, 1), int), pad=True)
    with pytest.raises(ParameterError, match=r"rand_attn: expected values in \[0, 8\)"):
        refattn.attention(q, k, v, variant="bigbird", block_size=4, num_random_blocks=1, pad=True,
                          rand_attn=np.full((2, 6, 1), 8))
    with pytest.raises(ParameterError, match="duplicates"):
        refattn.attention(q, k, v, variant="bigbird", block_size=4, num_random_blocks=1, pad=True,
                          duplicates="twice")


# -- Longformer ------------------------------------------------------------------------------------
def test_longformer_without_projections_is_hybrid():
    q, k, v = qkv()
    g = {0, 10}
    check("longformer", lambda b, h, i, j: abs(i - j) <= 3 or i in g or j in g, q, k, v,
          attention_window=6, global_tokens=(0, 10))
    check("longformer", lambda b, h, i, j: (abs(i - j) <= 4 and (j - i) % 2 == 0) or i in g or j in g,
          q, k, v, attention_window=2, one_sided=True, dilation=2, global_tokens=(0, 10))


def test_longformer_projections():
    q, k, v = qkv(b=2)
    qg, kg, vg = qkv(b=2, seed=5)
    gm = np.zeros((2, 24), dtype=bool)
    gm[0, [0, 11]] = True
    gm[1, [4]] = True
    out = refattn.attention(q, k, v, variant="longformer", attention_window=4, global_mask=gm,
                            q_global=qg, k_global=kg, v_global=vg)
    local = mask_from(lambda b, h, i, j: abs(i - j) <= 2 or gm[b, j], 2, 4, 24, 24)
    ref_local, _ = reference_attention(q, k, v, mask=local)
    ref_global, _ = reference_attention(qg, kg, vg)
    want = np.where(gm[:, None, :, None], ref_global, ref_local)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)
    with pytest.raises(ParameterError, match="attention_window: expected an even"):
        refattn.attention(q, k, v, variant="longformer", attention_window=5)
    with pytest.raises(ShapeError, match="global_mask"):
        refattn.attention(q, k, v, variant="longformer", global_mask=np.ones((3, 24), bool))
    with pytest.raises(ShapeError, match="q_global"):
        refattn.attention(q, k, v, variant="longformer", q_global=qg[:, :, :5])


def test_longformer_projection_gradients():
    q, k, v = qkv(b=1, hq=2, sq=10, hkv=2)
    qg, kg, vg = qkv(b=1, hq=2, sq=10, hkv=2, seed=9)
    gm = np.zeros((1, 10), dtype=bool)
    gm[0, [0, 6]] = True
    kw = dict(variant="longformer", attention_window=2, global_mask=gm)
    rng = np.random.default_rng(2)
    dout = rng.standard_normal(q.shape[:3] + (v.shape[3],))

    def loss(**arrays):
        a = dict(q=q, k=k, v=v, q_global=qg, k_global=kg, v_global=vg)
        a.update(arrays)
        return float(np.sum(dout * refattn.attention(a["q"], a["k"], a["v"], q_global=a["q_global"],
                                                     k_global=a["k_global"], v_global=a["v_global"], **kw)))
    dq, dk, dv, extras = refattn.attention_backward(q, k, v, dout, q_global=qg, k_global=kg,
                                                    v_global=vg, **kw)
    for name, x, g in (("q", q, dq), ("k", k, dk), ("v", v, dv), ("q_global", qg, extras["q_global"]),
                       ("k_global", kg, extras["k_global"]), ("v_global", vg, extras["v_global"])):
        np.testing.assert_allclose(g, numeric_grad(lambda y: loss(**{name: y}), x), rtol=1e-6, atol=1e-8)


# -- block_sparse / seer (selection recomputed with loops) -----------------------------------------
def pooled(x, bs, how=np.mean):
    b, h, s, d = x.shape
    return np.array([[[how(x[bb, hh, n * bs:(n + 1) * bs], axis=0) for n in range(-(-s // bs))]
                      for hh in range(h)] for bb in range(b)])


def select_loop(probs, bs, sq, causal, k=None, tau=None):
    """Per (b, h, block row): forced first + diagonal; then top-k (ties: lower index) or >= tau."""
    b, h, nbq, nbk = probs.shape
    keep = np.zeros(probs.shape, dtype=bool)
    for idx in np.ndindex(b, h, nbq):
        r = idx[2]
        diag = (min((r + 1) * bs, sq) - 1) // bs
        allowed = [c for c in range(nbk) if not causal or c * bs <= min((r + 1) * bs, sq) - 1]
        chosen = {0, diag}
        if k is not None:
            rest = sorted((c for c in allowed if c not in chosen), key=lambda c: (-probs[idx][c], c))
            chosen |= set(rest[:max(0, k - len(chosen))])
        else:
            chosen |= {c for c in allowed if probs[idx][c] >= tau}
        keep[idx][sorted(chosen)] = True
    return keep


def softmax_rows(x, hidden):
    x = np.where(hidden, -np.inf, x)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("causal, select", [(False, "topk"), (True, "topk"), (False, "threshold"),
                                            (True, "threshold")])
def test_block_sparse_selection(causal, select):
    bs, L = 4, 24
    q, k, v = qkv(b=2, hq=4, sq=L, hkv=2, seed=4)
    nb = L // bs
    hidden = np.array([[c * bs > min((r + 1) * bs, L) - 1 if causal else False for c in range(nb)]
                       for r in range(nb)])
    kh = np.repeat(pooled(k, bs), 2, axis=1)
    probs = softmax_rows(pooled(q, bs) @ np.swapaxes(kh, -1, -2) / math.sqrt(8), hidden)
    keep = select_loop(probs, bs, L, causal, k=2 if select == "topk" else None,
                       tau=0.2 if select == "threshold" else None)
    pred = lambda b, h, i, j: keep[b, h, i // bs, j // bs] and (not causal or j <= i)  # noqa: E731
    check("block_sparse", pred, q, k, v, block_size=bs, select=select, topk=2, tau=0.2, causal=causal)


def test_block_sparse_explicit_mask():
    q, k, v = qkv(seed=6)
    lay = RNG.random((4, 6, 6)) < 0.4
    check("block_sparse", lambda b, h, i, j: lay[h, i // 4, j // 4], q, k, v, block_size=4, block_mask=lay)
    with pytest.raises(ShapeError, match=r"block_mask: expected \(nbq, nbk\) = \(6, 6\)"):
        refattn.attention(q, k, v, variant="block_sparse", block_size=4, block_mask=lay[:, :5])


def test_seer_gate_and_selection():
    bs, L, d = 4, 24, 8
    q, k, v = qkv(b=1, hq=2, sq=L, hkv=2, seed=8)
    rng = np.random.default_rng(3)
    w_q, w_k = rng.standard_normal((d, 4)), rng.standard_normal((3 * d, 4))
    kp = np.concatenate([pooled(k, bs), pooled(k, bs, np.max), pooled(k, bs, np.min)], axis=-1)
    hidden = np.array([[c > r for c in range(6)] for r in range(6)])
    probs = softmax_rows((pooled(q, bs) @ w_q) @ np.swapaxes(kp @ w_k, -1, -2) / 2.0, hidden)
    keep = select_loop(probs, bs, L, True, k=3)
    check("seer", lambda b, h, i, j: keep[b, h, i // bs, j // bs] and j <= i, q, k, v, block_size=bs,
          topk=3, causal=True, w_q=w_q, w_k=w_k)


def test_seer_ground_truth():
    from refattn.variants.sparse import seer_ground_truth
    q, k, _ = qkv(b=1, hq=2, sq=12, hkv=2, seed=2)
    gt = seer_ground_truth(q, k, block_size=4, causal=True)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(8)
    p = softmax_rows(s, np.triu(np.ones((12, 12), bool), 1))
    pooled_max = p.reshape(1, 2, 3, 4, 3, 4).max(axis=(3, 5))
    np.testing.assert_allclose(gt, pooled_max / pooled_max.sum(-1, keepdims=True), rtol=0, atol=1e-14)


# -- NSA (recomputed with loops) --------------------------------------------------------------------
def nsa_loop(q, k, v, *, ell, d, ell2, n, n_local, recent, gates):
    b, hq, sq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1 / math.sqrt(dim)
    nc = (sq - ell) // d + 1
    kc = np.array([[[k[bb, h, c * d:c * d + ell].mean(0) for c in range(nc)] for h in range(hkv)]
                   for bb in range(b)])
    vc = np.array([[[v[bb, h, c * d:c * d + ell].mean(0) for c in range(nc)] for h in range(hkv)]
                   for bb in range(b)])
    cmp_mask = np.array([[c * d + ell - 1 <= i for c in range(nc)] for i in range(sq)])
    o_cmp, _ = reference_attention(q, kc, vc, mask=cmp_mask)
    # compressed probabilities
    p_cmp = np.zeros((b, hq, sq, nc))
    for bb, h, i in np.ndindex(b, hq, sq):
        vis = [c for c in range(nc) if cmp_mask[i, c]]
        if vis:
            x = np.array([scale * q[bb, h, i] @ kc[bb, h // group, c] for c in vis])
            p_cmp[bb, h, i, vis] = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    nsel = -(-sq // ell2)
    a, cc = ell2 // d, ell // d
    sel = np.zeros((b, hq, sq, sq), dtype=bool)
    for bb, g, i in np.ndindex(b, hkv, sq):
        heads = range(g * group, (g + 1) * group)
        score = [sum(p_cmp[bb, h, i, a * j - m - t] for h in heads for m in range(a) for t in range(cc)
                     if 0 <= a * j - m - t < nc) for j in range(nsel)]
        cand = [j for j in range(nsel) if j * ell2 <= i]
        cur = i // ell2
        forced = {j for j in cand if j == 0 or cur - n_local < j <= cur}
        rest = sorted((j for j in cand if j not in forced), key=lambda j: (-score[j], j))
        chosen = forced | set(rest[:max(0, n - len(forced))])
        for h in heads:
            for j in range(sq):
                sel[bb, h, i, j] = j // ell2 in chosen and j <= i
    o_sel, _ = reference_attention(q, k, v, mask=sel)
    win = np.array([[i - recent < j <= i for j in range(sq)] for i in range(sq)])
    o_win, _ = reference_attention(q, k, v, mask=win)
    return gates[..., :1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:] * o_win


def test_nsa_against_loops():
    q, k, v = qkv(b=1, hq=4, sq=24, hkv=2, seed=12)
    gates = np.random.default_rng(5).uniform(0.1, 0.9, (1, 4, 24, 3))
    kw = dict(ell=4, d=2, ell2=4, n=3, n_local=1, recent=5)
    want = nsa_loop(q, k, v, gates=gates, **kw)
    out = refattn.attention(q, k, v, variant="nsa", cmp_block=4, cmp_stride=2, sel_block=4,
                            n_select=3, n_local=1, recent=5, gates=gates)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)
    with pytest.raises(ParameterError, match="multiples of cmp_stride"):
        refattn.attention(q, k, v, variant="nsa", cmp_block=5, cmp_stride=2)


# -- gradients of the pattern variants -------------------------------------------------------------
def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def fd_check(q, k, v, **kw):
    dout = np.random.default_rng(1).standard_normal(q.shape[:3] + (v.shape[3],))
    dq, dk, dv, _ = refattn.attention_backward(q, k, v, dout, **kw)
    f = {"q": lambda x: np.sum(dout * refattn.attention(x, k, v, **kw)),
         "k": lambda x: np.sum(dout * refattn.attention(q, x, v, **kw)),
         "v": lambda x: np.sum(dout * refattn.attention(q, k, x, **kw))}
    for name, x, g in (("q", q, dq), ("k", k, dk), ("v", v, dv)):
        np.testing.assert_allclose(g, numeric_grad(f[name], x), rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("variant, params", [
    ("sliding_window", dict(window=(2, 1))), ("dilated", dict(steps=(2, 2), dilation=2)),
    ("strided", dict(stride=3)), ("fixed", dict(block=4, c=1)), ("hybrid", dict(local=1, tokens=(3,))),
    ("streaming", dict(n_sink=1, recent=3)), ("random", dict(r=3, seed=1)),
    ("block_sparse", dict(block_size=4, topk=2)), ("longformer", dict(attention_window=2)),
])
def test_gradients(variant, params):
    q, k, v = qkv(b=1, hq=2, sq=12, d=4, hkv=1, seed=7)
    fd_check(q, k, v, variant=variant, **params)


def test_core_knobs_intersect():
    """causal / mask / window of the core are intersected with the variant's pattern."""
    q, k, v = qkv(b=1, seed=2)
    g = {0, 7}
    m = RNG.random((24, 24)) < 0.8
    check("hybrid", lambda b, h, i, j: (abs(i - j) <= 2 or i in g or j in g) and j <= i and m[i, j],
          q, k, v, local=2, tokens=(0, 7), causal=True, mask=m)


def test_bshd_layout_and_gqa_head_map():
    q, k, v = qkv(b=1, hq=4, hkv=2, seed=3)
    a = refattn.attention(q, k, v, variant="strided", stride=4)
    bq, bk, bv = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    b = refattn.attention(bq, bk, bv, variant="strided", stride=4, layout="bshd")
    np.testing.assert_allclose(b.transpose(0, 2, 1, 3), a, rtol=0, atol=0)
    hm = np.array([1, 0, 0, 1])
    out = refattn.attention(q, k, v, variant="strided", stride=4, head_map=hm)
    ref = refattn.attention(q, k[:, hm], v[:, hm], variant="strided", stride=4)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-15)


def test_bad_parameters_are_one_line_errors():
    q, k, v = qkv(b=1)
    with pytest.raises(ParameterError, match="dilation: expected an integer >= 1, got 0"):
        refattn.attention(q, k, v, variant="dilated", dilation=0)
    with pytest.raises(ShapeError, match="dilation: expected one value per query head"):
        refattn.attention(q, k, v, variant="dilated", dilation=(1, 2))
    with pytest.raises(ParameterError, match="mode: expected one of"):
        refattn.attention(q, k, v, variant="strided", mode="both")
    with pytest.raises(ParameterError, match="tokens: expected positions < Sk=24"):
        refattn.attention(q, k, v, variant="global", tokens=(30,))
    with pytest.raises(ParameterError, match="c: expected at most block=4"):
        refattn.attention(q, k, v, variant="fixed", block=4, c=5)
    with pytest.raises(ParameterError, match="window: expected"):
        refattn.attention(q, k, v, variant="sliding_window", window="wide")


def test_every_sparse_variant_has_docs_citation_and_example():
    from refattn import variants
    names = {v.name for v in variants.list("sparse")}
    assert names == {"sliding_window", "dilated", "strided", "fixed", "global", "random", "hybrid",
                     "streaming", "longformer", "bigbird", "block_sparse", "nsa", "seer"}
    for var in variants.list("sparse"):
        assert var.doc and var.citation and var.example is not None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default example is truly sparse (no fallback)
            arrays = var.example(None, np.random.default_rng(0), var.parse_params({}))
            out = refattn.attention(**arrays, variant=var.name)
        assert np.isfinite(out).all()


# -- refattn mask ----------------------------------------------------------------------------------
def run_mask(*args):
    from click.testing import CliRunner
    from refattn.cli.main import cli
    return CliRunner().invoke(cli, ["mask", *args])


def test_cli_mask_draws_exact_tiles_and_counts():
    res = run_mask("--variant", "sliding_window", "--seq", "64", "--width", "8", "-p", "window=7,0")
    assert res.exit_code == 0, res.output
    rows = [ln[1:-1] for ln in res.output.splitlines() if ln.startswith("│")]
    # tiles 16 x 8 (a tile is twice as tall as wide); glyphs from the definition j in [i-7, i]
    want = []
    for ti in range(4):
        line = ""
        for tj in range(8):
            n = sum(i - 7 <= j <= i for i in range(16 * ti, 16 * ti + 16) for j in range(8 * tj, 8 * tj + 8))
            line += "█" if n == 128 else "▒" if n else " "
        want.append(line)
    assert rows == want and rows[1] == " ▒▒▒    "
    visible = sum(min(i, 7) + 1 for i in range(64))
    assert f"visible pairs {visible:,} of 4,096" in res.output
    assert f"density {visible / 4096:.4f}" in res.output


def test_cli_mask_bigbird_head_and_png(tmp_path):
    res = run_mask("--variant", "bigbird", "--seq", "1024", "-p", "block_size=64", "--head", "3",
                   "--width", "16", "--png", str(tmp_path / "bb.png"))
    assert res.exit_code == 0, res.output
    rows = [ln[1:-1] for ln in res.output.splitlines() if ln.startswith("│")]
    # tiles 128 x 64: the first and last key blocks are global columns, seen by every row
    assert all(r[0] == "█" and r[-1] == "█" for r in rows) and len(rows) == 8
    assert any("▒" in r for r in rows) and any(" " in r for r in rows)
    assert (tmp_path / "bb.png").stat().st_size > 1000
    assert "head 3" in res.output


def test_cli_mask_errors(monkeypatch, tmp_path):
    res = run_mask("--variant", "bigbird", "--seq", "1000")
    assert res.exit_code == 2 and "multiple of block_size=64" in res.output
    res = run_mask("--variant", "nope_not_a_variant")
    assert res.exit_code == 2 and "variant: expected one of" in res.output
    res = run_mask("--variant", "strided", "--head", "9")
    assert res.exit_code == 2 and "--head: expected a head in [0, 4)" in res.output
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the 'plot' extra were missing
    res = run_mask("--variant", "strided", "--png", str(tmp_path / "x.png"))
    assert res.exit_code == 2 and "pip install 'refattn[plot]'" in res.output


def test_bigbird_hf_duplicates_bias_gradient():
    """With repeated blocks, the bias gradient sums over the multiplicity layers (spot-checked
    against central differences, including pairs inside a block counted twice)."""
    bs, L = 4, 32
    q, k, v = qkv(b=1, hq=2, sq=L, hkv=2, seed=13)
    bias = np.random.default_rng(4).standard_normal((1, 2, L, L))
    kw = dict(variant="bigbird", block_size=bs, num_random_blocks=1, rand_attn=np.zeros((2, 6, 1), int),
              duplicates="hf")
    dout = np.random.default_rng(5).standard_normal((1, 2, L, 8))
    _, _, _, extras = refattn.attention_backward(q, k, v, dout, bias=bias, **kw)
    for idx in [(0, 0, 12, 1), (0, 1, 20, 3), (0, 0, 12, 13), (0, 1, 0, 30), (0, 0, 9, 31), (0, 1, 5, 20)]:
        e = np.zeros_like(bias)
        e[idx] = 1e-6
        num = (np.sum(dout * refattn.attention(q, k, v, bias=bias + e, **kw))
               - np.sum(dout * refattn.attention(q, k, v, bias=bias - e, **kw))) / 2e-6
        assert abs(extras["bias"][idx] - num) < 1e-7, idx


def test_nsa_query_chunks_do_not_change_the_answer(monkeypatch):
    import refattn.variants.sparse as sparse
    q, k, v = qkv(b=1, hq=4, sq=40, hkv=2, seed=14)
    kw = dict(variant="nsa", cmp_block=4, cmp_stride=2, sel_block=8, n_select=3, recent=6)
    whole = refattn.attention(q, k, v, **kw)
    monkeypatch.setattr(sparse, "NSA_CHUNK_ROWS", 7)
    np.testing.assert_array_equal(refattn.attention(q, k, v, **kw), whole)


def test_cli_mask_png_without_matplotlib_is_one_clear_line(tmp_path, monkeypatch):
    """The `plot` extra is optional: --png without matplotlib says how to install it (exit 2)."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    res = run_mask("--variant", "sliding_window", "--seq", "64", "--png", str(tmp_path / "w.png"))
    assert res.exit_code == 2
    assert "--png" in res.output and "pip install 'refattn[plot]'" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "w.png").exists()

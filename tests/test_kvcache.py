"""KV cache, decode, paged, MLA, merging, cascade, ring, expected attention (VARIANTS C).

Every identity is checked against ``tests/reference.py`` (loops over the definition) or a second
formulation written here: decode against the last rows of full causal attention, paged against the
contiguous cache, naive MLA against absorbed MLA and against K/V built by hand, cascade and ring
against attention over everything, the Gaussian expectation against Gauss-Hermite quadrature.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn
import refattn.backends
import refattn.variants
from refattn import kvcache as KV
from refattn.backends import get as get_backend
from refattn.errors import ParameterError, ShapeError
from reference import reference_attention
from test_position import rope_by_complex

RNG = np.random.default_rng(66)
NP = get_backend("numpy")


def rand(*shape):
    return RNG.standard_normal(shape)


def run(name, arrays, **params):
    var = refattn.variants.get(name)
    return var.forward(NP, arrays, var.parse_params(dict(params, return_lse=True)))


def assert_close(got, want, atol=1e-12):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


# -- decode -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_new", [1, 3])
def test_decode_equals_last_rows_of_causal(n_new):
    q, k, v = rand(2, 4, 9, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    full = reference_attention(q, k, v, causal=True)
    got = run("decode", {"q": q[:, :, -n_new:], "k": k, "v": v})
    assert_close(got, (full[0][:, :, -n_new:], full[1][:, :, -n_new:]))


def test_decode_per_sequence_lengths_and_window():
    sq, sk = 2, 10
    q, k, v = rand(3, 2, sq, 8), rand(3, 2, sk, 8), rand(3, 2, sk, 8)
    lens = np.array([10, 4, 7])
    for params, window in (({}, None), ({"sliding_window": 3}, (2, 0))):
        out, lse = run("decode", {"q": q, "k": k, "v": v}, cache_seqlens=lens, **params)
        for b, n in enumerate(lens):  # sequence b: keys 0..n-1, queries are its last sq tokens
            ref = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True,
                                      window=window)
            assert_close((out[b:b + 1], lse[b:b + 1]), ref)


def test_decode_alibi_uses_each_sequence_position():
    sq, sk = 2, 8
    q, k, v = rand(2, 3, sq, 4), rand(2, 3, sk, 4), rand(2, 3, sk, 4)
    lens, slopes = np.array([8, 5]), np.array([0.5, 0.25, 0.125])
    out, lse = run("decode", {"q": q, "k": k, "v": v}, cache_seqlens=lens, alibi_slopes=slopes, causal=False)
    for b, n in enumerate(lens):  # bottom-right inside sequence b: distances |n - sq + i - j|
        ref = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], alibi_slopes=slopes)
        assert_close((out[b:b + 1], lse[b:b + 1]), ref)


@pytest.mark.parametrize("params, err, name", [
    ({"cache_seqlens": np.array([11, 5])}, ParameterError, "^cache_seqlens"),   # beyond the cache
    ({"cache_seqlens": np.array([1, 5])}, ParameterError, "^cache_seqlens"),    # shorter than the queries
    ({"cache_seqlens": np.array([5])}, ShapeError, "cache_seqlens"),
    ({"cache_seqlens": np.array([5.0, 5.0])}, ParameterError, "cache_seqlens"),
    ({"causal": "top_left"}, ParameterError, "alignment"),
    ({"sliding_window": 0}, ParameterError, "sliding_window"),
])
def test_decode_bad_input(params, err, name):
    with pytest.raises(err, match=name):
        run("decode", {"q": rand(2, 2, 2, 4), "k": rand(2, 2, 10, 4), "v": rand(2, 2, 10, 4)}, **params)


# -- KVCache ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 4])
def test_cache_token_by_token_equals_full_attention(window):
    b, hq, hkv, d, steps = 2, 4, 2, 8, 11
    q, k, v = rand(b, hq, steps, d), rand(b, hkv, steps, d), rand(b, hkv, steps, d)
    cache = KV.KVCache(b, hkv, d, capacity=steps, window=window)
    full = reference_attention(q, k, v, causal=True, window=None if window is None else (window - 1, 0))
    cache.append(k[:, :, :3], v[:, :, :3])  # a prefill of 3, then one token at a time
    for t in range(3, steps):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        out, lse = cache.attend(q[:, :, t:t + 1])
        assert_close((out, lse), (full[0][:, :, t:t + 1], full[1][:, :, t:t + 1]))
    assert cache.length == steps
    if window is not None:
        assert sorted(cache.positions) == list(range(steps - window, steps))
        kc, vc, pos = cache.contiguous()
        np.testing.assert_array_equal(kc, k[:, :, steps - window:])
        np.testing.assert_array_equal(pos, np.arange(steps - window, steps))


def test_cache_errors():
    cache = KV.KVCache(1, 1, 4, capacity=3)
    cache.append(rand(1, 1, 3, 4), rand(1, 1, 3, 4))
    with pytest.raises(ShapeError, match="capacity"):
        cache.append(rand(1, 1, 1, 4), rand(1, 1, 1, 4))
    with pytest.raises(ParameterError, match="q_positions"):  # a position beyond the cache
        cache.attend(rand(1, 2, 1, 4), q_positions=[3])
    with pytest.raises(ShapeError, match="k"):
        cache.append(rand(1, 2, 1, 4), rand(1, 2, 1, 4))
    ring = KV.KVCache(1, 1, 4, window=2)
    ring.append(rand(1, 1, 5, 4), rand(1, 1, 5, 4))
    with pytest.raises(ParameterError, match="evicted"):
        ring.attend(rand(1, 1, 1, 4), q_positions=[2])


# -- paged --------------------------------------------------------------------------------------------
def scatter_pages(k, lens, block_size, rng, spare=3):
    """Write a contiguous cache into pages of a shuffled pool; unused table slots are -1."""
    b, hkv, sk, d = k.shape
    needed = [-(-int(n) // block_size) for n in lens]
    nblocks = sum(needed) + spare
    perm = rng.permutation(nblocks)
    pages = rng.standard_normal((nblocks, block_size, hkv, d))  # garbage where unused
    table = np.full((b, max(needed) + 2), -1)
    used = 0
    for bb, n in enumerate(needed):
        table[bb, :n] = perm[used:used + n]
        used += n
        for t in range(int(lens[bb])):
            pages[table[bb, t // block_size], t % block_size] = k[bb, :, t]
    return pages, table


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_equals_contiguous(block_size, seed):
    rng = np.random.default_rng(seed)
    b, hq, hkv, sq, sk, d = 3, 4, 2, 2, 11, 8
    q, k, v = (rng.standard_normal(s) for s in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d)))
    lens = rng.integers(sq, sk + 1, size=b)
    kp, table = scatter_pages(k, lens, block_size, np.random.default_rng(seed + 10))
    vp, table_v = scatter_pages(v, lens, block_size, np.random.default_rng(seed + 10))
    assert (table == table_v).all()
    out, lse = run("paged", {"q": q, "k_pages": kp, "v_pages": vp, "block_table": table, "seq_lens": lens},
                   block_size=block_size)
    for bb, n in enumerate(lens):
        ref = reference_attention(q[bb:bb + 1], k[bb:bb + 1, :, :n], v[bb:bb + 1, :, :n], causal=True)
        assert_close((out[bb:bb + 1], lse[bb:bb + 1]), ref)
    gathered = KV.gather_paged(kp, table, lens)
    for bb, n in enumerate(lens):
        np.testing.assert_array_equal(gathered[bb, :, :n], k[bb, :, :n])
        assert not gathered[bb, :, n:].any()


def test_paged_bad_tables():
    k = rand(1, 2, 9, 4)
    pages, table = scatter_pages(k, [9], 4, np.random.default_rng(0), spare=0)  # 3 pages, all used
    arrays = {"q": rand(1, 2, 1, 4), "k_pages": pages, "v_pages": pages, "block_table": table,
              "seq_lens": np.array([9])}
    bad = table.copy()
    bad[0, 1] = 3  # out of range
    with pytest.raises(ParameterError, match=r"block_table.*\[0, 3\).*\[0, 1\]"):
        run("paged", dict(arrays, block_table=bad))
    bad[0, 1] = -1  # padding where a page is needed
    with pytest.raises(ParameterError, match="block_table"):
        run("paged", dict(arrays, block_table=bad))
    with pytest.raises(ShapeError, match="block_table: too short"):
        run("paged", dict(arrays, block_table=table[:, :2]))
    with pytest.raises(ShapeError, match="seq_lens"):
        run("paged", dict(arrays, seq_lens=np.array([9, 9])))
    with pytest.raises(ShapeError, match="k_pages"):
        run("paged", arrays, block_size=3)


# -- MLA ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_mla_naive_equals_absorbed_and_hand_built(causal):
    var = refattn.variants.get("mla")
    arrays = var.example((2, 3, 4, 6, 12, 3), np.random.default_rng(3), None)
    naive = run("mla", arrays, form="naive", causal=causal)
    absorbed = run("mla", arrays, form="absorbed", causal=causal)
    assert_close(absorbed, naive, atol=1e-12)
    # by hand: expand K and V per head, rotate the rope parts, plain attention
    c = arrays["hidden"] @ arrays["w_dkv"]
    d_rope = arrays["w_kr"].shape[1]
    k_rope = rope_by_complex((arrays["hidden"] @ arrays["w_kr"])[:, None], range(6), 10000.0, d_rope, "neox")
    heads = range(3)
    k = np.stack([np.concatenate([c @ arrays["w_uk"][h], k_rope[:, 0]], -1) for h in heads], 1)
    v = np.stack([c @ arrays["w_uv"][h] for h in heads], 1)
    qn, qr = np.split(arrays["q"], [arrays["q"].shape[-1] - d_rope], axis=-1)
    q = np.concatenate([qn, rope_by_complex(qr, range(2, 6), 10000.0, d_rope, "neox")], -1)
    assert_close(naive, reference_attention(q, k, v, causal=causal), atol=1e-12)


def test_mla_cache_bytes_deepseek_v2():
    got = KV.mla_cache_bytes(num_heads=128, d_nope=128, d_rope=64, d_v=128, d_c=512, bytes_per_element=2)
    assert got["naive"] == 128 * (128 + 64 + 128) * 2 == 81920
    assert got["absorbed"] == (512 + 64) * 2 == 1152


def test_mla_bad_shapes():
    var = refattn.variants.get("mla")
    arrays = var.example((1, 2, 3, 4, 8, 2), np.random.default_rng(0), None)
    with pytest.raises(ShapeError, match="q"):
        run("mla", dict(arrays, q=arrays["q"][..., :-1]))
    with pytest.raises(ShapeError, match="w_uk"):
        run("mla", dict(arrays, w_uk=arrays["w_uk"][:, :-1]))
    with pytest.raises(ParameterError, match="form"):
        run("mla", arrays, form="fused")


# -- merge_states and cascade -----------------------------------------------------------------------------
def test_merge_states_split_kv_equals_full():
    q, k, v = rand(1, 2, 5, 4), rand(1, 2, 12, 4), rand(1, 2, 12, 4)
    mask = np.ones((1, 1, 5, 12), dtype=bool)
    mask[:, :, 2] = False  # an empty row in every part
    parts = []
    for cols in (slice(0, 3), slice(3, 4), slice(4, 12)):
        parts.append(reference_attention(q, k[:, :, cols], v[:, :, cols], mask=mask[..., cols]))
    merged = KV.merge_states(*parts)
    assert_close(merged, reference_attention(q, k, v, mask=mask))
    assert np.isneginf(merged[1][:, :, 2]).all() and not merged[0][:, :, 2].any()
    with pytest.raises(ParameterError, match="states"):
        KV.merge_states()


@pytest.mark.parametrize("causal", [True, False])
def test_cascade_equals_concatenation(causal):
    b, hq, hkv, sq, ss, sp, d = 3, 4, 2, 3, 5, 7, 8
    q, k, v = rand(b, hq, sq, d), rand(b, hkv, ss, d), rand(b, hkv, ss, d)
    pk, pv = rand(hkv, sp, d), rand(hkv, sp, d)
    got = run("cascade", {"q": q, "k": k, "v": v, "prefix_k": pk, "prefix_v": pv}, causal=causal)
    kk = np.concatenate([np.broadcast_to(pk, (b, hkv, sp, d)), k], axis=2)
    vv = np.concatenate([np.broadcast_to(pv, (b, hkv, sp, d)), v], axis=2)
    assert_close(got, reference_attention(q, kk, vv, causal=causal))


def test_cascade_bad_prefix():
    arrays = {"q": rand(1, 2, 2, 4), "k": rand(1, 2, 3, 4), "v": rand(1, 2, 3, 4),
              "prefix_k": rand(2, 5, 3), "prefix_v": rand(2, 5, 4)}
    with pytest.raises(ShapeError, match="prefix_k"):
        run("cascade", arrays)


# -- ring ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_devices", range(1, 9))
@pytest.mark.parametrize("causal", [False, True])
def test_ring_equals_full_attention(num_devices, causal):
    q, k, v = rand(1, 4, 13, 8), rand(1, 2, 13, 8), rand(1, 2, 13, 8)
    ref = reference_attention(q, k, v, causal=causal)
    for sharding in ("zigzag", "contiguous"):
        assert_close(run("ring", {"q": q, "k": k, "v": v}, num_devices=num_devices, causal=causal,
                         sharding=sharding), ref)


def test_ring_uneven_lengths_and_top_left():
    q, k, v = rand(2, 2, 5, 4), rand(2, 2, 11, 4), rand(2, 2, 11, 4)
    for causal in (True, "top_left"):
        assert_close(run("ring", {"q": q, "k": k, "v": v}, num_devices=3, causal=causal),
                     reference_attention(q, k, v, causal=causal))


def test_ring_report_bytes_and_balance():
    b, h, s, d, p = 1, 2, 32, 4, 4
    q, k, v = rand(b, h, s, d), rand(b, h, s, d), rand(b, h, s, d)
    work = {}
    for sharding in ("zigzag", "contiguous"):
        _, _, rep = KV.ring_attention(q, k, v, num_devices=p, causal=True, sharding=sharding)
        assert len(rep.steps) == p and all(len(st) == p for st in rep.steps)
        # every step but the last moves the whole K and V once around the ring
        assert rep.bytes_per_step == [b * h * s * 2 * d * 8] * (p - 1) + [0]
        assert sum(rep.work_per_device()) == b * h * s * (s + 1) // 2  # the causal pairs, each once
        for t, st in enumerate(rep.steps):
            assert [c["kv_from"] for c in st] == [(r - t) % p for r in range(p)]
        work[sharding] = rep.work_per_device()
        assert "step 0" in rep.table()
    assert max(work["zigzag"]) - min(work["zigzag"]) == 0  # s divisible by 2P: perfectly balanced
    assert max(work["contiguous"]) > max(work["zigzag"])


def test_ring_bad_params():
    arrays = {"q": rand(1, 1, 4, 4), "k": rand(1, 1, 4, 4), "v": rand(1, 1, 4, 4)}
    with pytest.raises(ParameterError, match="num_devices"):
        run("ring", arrays, num_devices=0)
    with pytest.raises(ParameterError, match="sharding"):
        run("ring", arrays, sharding="striped")


# -- expected attention ---------------------------------------------------------------------------------
def test_expected_scores_gauss_hermite():
    d = 2
    x, w = np.polynomial.hermite.hermgauss(60)
    k = rand(1, 1, 5, d)
    mu = rand(1, 1, d)
    a = rand(d, d) * 0.5
    cov = a @ a.T
    chol = np.linalg.cholesky(cov)
    got = KV.expected_attention_scores(k, mu, cov[None, None], scale=0.7)
    for j in range(5):  # E[exp(0.7 q·k)], q = mu + L sqrt(2) z over the Gauss-Hermite grid
        total = math.fsum(w[a_] * w[b_] * math.exp(0.7 * (mu[0, 0] + chol @ (math.sqrt(2) * np.array(
            [x[a_], x[b_]]))) @ k[0, 0, j]) for a_ in range(60) for b_ in range(60)) / math.pi
        assert got[0, 0, j] == pytest.approx(math.log(total), abs=1e-10)


def kvpress_mask(q, k, v, mu, cov, ratio, n_sink=0, vnorm=False, use_cov=True):
    """The kept keys by kvpress's rule, with loops: per query head log E, softmax over the non-sink
    keys, mean over the group, times ||v||, sinks at the max, the int(Sk (1 - ratio)) best kept."""
    b_, hq, _, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g, scale = hq // hkv, 1 / math.sqrt(d)
    mask = np.zeros((b_, hq, 1, sk), dtype=bool)
    for b in range(b_):
        per_kv = []
        for kh in range(hkv):
            acc = [0.0] * (sk - n_sink)
            for h in range(kh * g, kh * g + g):
                logs = [scale * mu[b, h] @ k[b, kh, j]
                        + (scale ** 2 / 2 * k[b, kh, j] @ cov[b, h] @ k[b, kh, j] if use_cov else 0.0)
                        for j in range(n_sink, sk)]
                m = max(logs)
                z = math.fsum(math.exp(x - m) for x in logs)
                acc = [a + math.exp(x - m) / z / g for a, x in zip(acc, logs)]
            if vnorm:
                acc = [a * np.linalg.norm(v[b, kh, j + n_sink]) for j, a in enumerate(acc)]
            per_kv.append(acc)
        top = max(max(acc) for acc in per_kv)  # kvpress pads sinks with the max over the batch
        for kh, acc in enumerate(per_kv):
            full = [top] * n_sink + acc
            kept = sorted(range(sk), key=lambda j: (-full[j], j))[: max(1, int(sk * (1 - ratio)))]
            for h in range(kh * g, kh * g + g):
                mask[b, h, 0, kept] = True
    return mask


@pytest.mark.parametrize("params", [dict(ratio=0.3), dict(ratio=0.5, n_sink=2, use_vnorm=True),
                                    dict(ratio=0.25, use_covariance=False, causal=True), dict(ratio=0.95)])
def test_expected_attention_prunes_lowest_keys(params):
    var = refattn.variants.get("expected_attention")
    arrays = var.example((2, 4, 3, 10, 6, 2), np.random.default_rng(5), None)
    q, k, v, mu, cov = (arrays[n] for n in ("q", "k", "v", "mu", "cov"))
    got = run("expected_attention", arrays, **params)
    mask = kvpress_mask(q, k, v, mu, cov, params["ratio"], params.get("n_sink", 0),
                        params.get("use_vnorm", False), params.get("use_covariance", True))
    assert mask[0, 0, 0].sum() == max(1, int(10 * (1 - params["ratio"])))  # 0.95: one key survives
    assert_close(got, reference_attention(q, k, v, mask=mask, causal=params.get("causal", False)))
    with pytest.raises(ParameterError, match="ratio"):
        run("expected_attention", arrays, ratio=1.0)
    with pytest.raises(ShapeError, match="mu"):
        run("expected_attention", dict(arrays, mu=mu[:, :2]))


def test_rope_average_rotation_kvpress_form():
    """kvpress builds R(p) = cos I + sin P with P = [[0, -I], [I, 0]] (rotate_half) and averages it."""
    d, positions = 8, np.arange(10, 17)
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)
    p_mat = np.zeros((d, d))
    p_mat[d // 2:, : d // 2], p_mat[: d // 2, d // 2:] = np.eye(d // 2), -np.eye(d // 2)
    want = np.zeros((d, d))
    for p in positions:
        cos = np.cos(p * np.concatenate([inv, inv]))
        sin = np.sin(p * np.concatenate([inv, inv]))
        want += (cos[:, None] * np.eye(d) + sin[:, None] * p_mat) / len(positions)
    np.testing.assert_allclose(KV.rope_average_rotation(d, positions), want, atol=1e-14, rtol=0)


def test_expected_attention_future_positions_rotate_statistics():
    var = refattn.variants.get("expected_attention")
    arrays = var.example((1, 2, 2, 8, 4, 2), np.random.default_rng(7), None)
    got = run("expected_attention", arrays, ratio=0.5, future_positions=5)
    rot = KV.rope_average_rotation(4, np.arange(8, 13))
    rotated = dict(arrays, mu=arrays["mu"] @ rot.T, cov=rot @ arrays["cov"] @ rot.T)
    assert_close(got, run("expected_attention", rotated, ratio=0.5))


# -- the other backends run the same variants ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["decode", "paged", "mla", "cascade", "ring", "expected_attention"])
def test_numba_backend_agrees(name):
    from refattn import backends
    if "numba" not in backends.available():
        pytest.skip("numba backend not available")
    from refattn import pipeline
    var = refattn.variants.get(name)
    p = var.parse_params({})
    arrays = var.example((2, 4, 3, 9, 8, 2), np.random.default_rng(2), p)
    ref = pipeline.run(var, "numpy", arrays, p)
    dout = np.random.default_rng(2).standard_normal(ref.outputs["out"].shape)
    ref = pipeline.run(var, "numpy", arrays, p, dout=dout if var.backward else None)
    got = pipeline.run(var, "numba", arrays, p, dout=dout if var.backward else None)
    assert set(got.outputs) == set(ref.outputs) == {"out", "lse"}
    for n, b in ref.outputs.items():
        assert np.linalg.norm(got.outputs[n] - b) <= var.tolerance * np.linalg.norm(b)
    if var.backward is not None:
        assert set(got.grads) == set(ref.grads)
        for n, b in ref.grads.items():
            assert np.linalg.norm(got.grads[n] - b) <= 1e-12 * np.linalg.norm(b), n



def test_public_entry_points():
    q, k, v = rand(2, 2, 2, 4), rand(2, 2, 7, 4), rand(2, 2, 7, 4)
    lens = np.array([7, 5])
    with pytest.warns(DeprecationWarning, match=r"refattn.attention\(..., variant='decode'\)"):
        out, lse = KV.decode_attention(q, k, v, cache_seqlens=lens, return_lse=True)
    kp, table = scatter_pages(k, lens, 3, np.random.default_rng(4))
    vp, _ = scatter_pages(v, lens, 3, np.random.default_rng(4))
    with pytest.warns(DeprecationWarning, match="paged_attention is deprecated"):
        paged = KV.paged_attention(q, kp, vp, table, lens, return_lse=True)
    one_call = refattn.attention(q, kp, vp, table, lens, variant="paged", return_lse=True)
    np.testing.assert_array_equal(one_call[0], paged[0])
    for b, n in enumerate(lens):
        ref = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True)
        assert_close((out[b:b + 1], lse[b:b + 1]), ref)
        assert_close((paged[0][b:b + 1], paged[1][b:b + 1]), ref)
    pk, pv = rand(2, 3, 4), rand(2, 3, 4)
    with pytest.warns(DeprecationWarning):
        got = KV.cascade_attention(q, k, v, pk, pv)
    kk = np.concatenate([np.broadcast_to(pk, (2, 2, 3, 4)), k], axis=2)
    vv = np.concatenate([np.broadcast_to(pv, (2, 2, 3, 4)), v], axis=2)
    np.testing.assert_allclose(got, reference_attention(q, kk, vv, causal=True)[0], atol=1e-12, rtol=0)


# -- gradients against central finite differences ------------------------------------------------------
def test_decode_backward_finite_differences():
    from fd_variants import check_variant_grads
    var = refattn.variants.get("decode")
    p = var.parse_params({"cache_seqlens": np.array([9, 5]), "sliding_window": 4,
                          "alibi_slopes": np.array([0.5, 0.25])})
    arrays = var.example((2, 2, 2, 9, 4, 1), np.random.default_rng(6), p)

    def grads(dout):
        dq, dk, dv, _ = var.backward(NP, arrays, dout, p)
        return {"q": dq, "k": dk, "v": dv}
    check_variant_grads(var, NP, arrays, p, grads, "qkv")


def test_paged_backward_finite_differences():
    from fd_variants import check_variant_grads
    var = refattn.variants.get("paged")
    p = var.parse_params({"block_size": 3})
    arrays = var.example((2, 2, 2, 7, 4, 1), np.random.default_rng(7), p)

    def grads(dout):
        g = var.backward(NP, arrays, dout, p)
        assert set(g) == {"q", "k_pages", "v_pages"}
        return g
    check_variant_grads(var, NP, arrays, p, grads, ["q", "k_pages", "v_pages"])


@pytest.mark.parametrize("causal", [True, False])
def test_ring_backward_finite_differences_and_bytes(causal):
    from fd_variants import check_variant_grads
    var = refattn.variants.get("ring")
    p = var.parse_params({"num_devices": 3, "causal": causal})
    arrays = var.example((1, 4, 7, 7, 4, 2), np.random.default_rng(8), p)

    def grads(dout):
        dq, dk, dv, _ = var.backward(NP, arrays, dout, p)
        return {"q": dq, "k": dk, "v": dv}
    check_variant_grads(var, NP, arrays, p, grads, "qkv")
    *_, report = KV.ring_attention_backward(arrays["q"], arrays["k"], arrays["v"], np.ones((1, 4, 7, 4)),
                                            num_devices=3, causal=causal)
    assert report.bytes_per_step == [2 * 1 * 2 * 7 * (4 + 4) * 8] * 2 + [0]  # K, V, dK, dV all move


def test_cascade_backward_finite_differences():
    from fd_variants import check_variant_grads
    var = refattn.variants.get("cascade")
    p = var.parse_params({})
    arrays = var.example((2, 4, 3, 5, 4, 2), np.random.default_rng(9), p)

    def grads(dout):
        dq, dk, dv, extras = var.backward(NP, arrays, dout, p)
        return {"q": dq, "k": dk, "v": dv, **extras}
    check_variant_grads(var, NP, arrays, p, grads, ["q", "k", "v", "prefix_k", "prefix_v"])


@pytest.mark.parametrize("name", ["decode", "mla", "ring", "expected_attention"])
def test_bad_causal_names_the_argument(name):
    var = refattn.variants.get(name)
    arrays = var.example((1, 2, 2, 5, 8, 2), np.random.default_rng(0), None)
    with pytest.raises(ParameterError, match="causal"):
        run(name, arrays, causal="diagonal")


# -- property tests over random shapes ------------------------------------------------------------------
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.integers(1, 2), sk=st.integers(1, 12),
       block_size=st.integers(1, 5), data=st.data())
def test_paged_property(b, hkv, group, sk, block_size, data):
    sq = data.draw(st.integers(1, sk))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    q = rng.standard_normal((b, hkv * group, sq, 4))
    k, v = rng.standard_normal((2, b, hkv, sk, 4))
    lens = rng.integers(sq, sk + 1, size=b)
    kp, table = scatter_pages(k, lens, block_size, np.random.default_rng(1), spare=2)
    vp, _ = scatter_pages(v, lens, block_size, np.random.default_rng(1), spare=2)
    out, lse = refattn.attention(q, kp, vp, table, lens, variant="paged", return_lse=True)
    for bb, n in enumerate(lens):
        ref = reference_attention(q[bb:bb + 1], k[bb:bb + 1, :, :n], v[bb:bb + 1, :, :n], causal=True)
        assert_close((out[bb:bb + 1], lse[bb:bb + 1]), ref)


@given(p=st.integers(1, 8), sq=st.integers(1, 12), sk=st.integers(1, 12),
       causal=st.sampled_from([False, True, "top_left"]), sharding=st.sampled_from(["zigzag", "contiguous"]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_ring_property(p, sq, sk, causal, sharding, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 2, sq, 4))
    k, v = rng.standard_normal((2, 1, 1, sk, 4))
    got = run("ring", {"q": q, "k": k, "v": v}, num_devices=p, causal=causal, sharding=sharding)
    assert_close(got, reference_attention(q, k, v, causal=causal))

"""refattn.npzio: saved outputs load by documented keys; every bad file is one clear error."""

import numpy as np
import pytest

import refattn
from refattn import npzio, numerics
from refattn.errors import InputFileError


def _arrays(seed=0, b=1, hq=2, hkv=1, sq=5, sk=6, d=4):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)), \
        rng.standard_normal((b, hkv, sk, d))
    out, lse = refattn.attention(q, k, v, causal=True, return_lse=True)
    return dict(q=q, k=k, v=v, out=out, lse=lse)


def _save(tmp_path, name="run.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_load_good_file_and_compare(tmp_path):
    a = _arrays()
    dout = np.ones_like(a["out"])
    dq, dk, dv, _ = refattn.attention_backward(a["q"], a["k"], a["v"], dout, causal=True)
    path = _save(tmp_path, **a, dout=dout, dq=dq, dk=dk, dv=dv,
                 alibi_slopes=np.array([0.5, 0.25]))
    inputs, outputs = npzio.load_outputs(path, "sdpa")
    assert set(inputs) == {"q", "k", "v", "alibi_slopes"}
    assert set(outputs) == {"out", "lse", "dout", "dq", "dk", "dv"}
    np.testing.assert_array_equal(outputs["out"], a["out"])
    # journey 3: the saved float64 outputs agree with the reference recomputed from the inputs
    ref = numerics.reference({**{n: inputs[n] for n in "qkv"}, "causal": True})
    np.testing.assert_allclose(outputs["lse"], ref["lse"], rtol=1e-15)


def test_load_varlen_keys(tmp_path):
    rng = np.random.default_rng(1)
    cq, ck = np.array([0, 2, 5], np.int32), np.array([0, 3, 7], np.int32)
    q, k, v = rng.standard_normal((5, 2, 4)), rng.standard_normal((7, 1, 4)), \
        rng.standard_normal((7, 1, 3))
    out, lse = refattn.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True)
    assert out.shape == (5, 2, 3) and lse.shape == (2, 5)
    path = _save(tmp_path, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cq, cu_seqlens_k=ck)
    inputs, outputs = npzio.load_outputs(path)
    assert set(inputs) == {"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"}
    bad = _save(tmp_path, "bad.npz", q=q, k=k, v=v, out=out, cu_seqlens_q=cq,
                cu_seqlens_k=np.array([0, 3, 6]))
    with pytest.raises(InputFileError, match=r"bad.npz: key 'cu_seqlens_k': expected non-decreasing "
                                             r"offsets from 0 to 7"):
        npzio.load_outputs(bad)
    with pytest.raises(InputFileError, match="expected both cu_seqlens_q and cu_seqlens_k"):
        npzio.load_outputs(_save(tmp_path, "one.npz", q=q, k=k, v=v, out=out, cu_seqlens_q=cq))
    with pytest.raises(InputFileError, match=r"key 'lse': expected shape \(2, 5\) \(\(Hq, total_q\)\)"):
        npzio.load_outputs(_save(tmp_path, "l.npz", q=q, k=k, v=v, out=out, lse=lse.T,
                                 cu_seqlens_q=cq, cu_seqlens_k=ck))


def test_bshd_layout(tmp_path):
    a = _arrays()
    t = {n: a[n].transpose(0, 2, 1, 3) for n in ("q", "k", "v", "out")}
    path = _save(tmp_path, **t, lse=a["lse"])
    npzio.load_outputs(path, layout="bshd")
    with pytest.raises(InputFileError, match=r"key 'lse': expected shape \(1, 5, 2\)"):
        npzio.load_outputs(path, layout="bhsd")


BAD = {
    "missing out": (lambda a: {n: a[n] for n in "qkv"},
                    r"run.npz: missing key 'out'; required keys are q, k, v, out"),
    "wrong out shape": (lambda a: {**a, "out": a["out"][..., :3]},
                        r"key 'out': expected shape \(1, 2, 5, 4\) \(q's shape with v's last dim\), "
                        r"got \(1, 2, 5, 3\)"),
    "rank 3 q": (lambda a: {**a, "q": a["q"][0]}, r"key 'q': expected rank 4 \(B, H, S, D\)"),
    "k head dim": (lambda a: {**a, "k": a["k"][..., :3]}, r"key 'k': expected shape \(1, 1, 6, 4\)"),
    "lse shape": (lambda a: {**a, "lse": a["lse"][..., :4]}, r"key 'lse': expected shape \(1, 2, 5\)"),
    "unknown key": (lambda a: {**a, "o": a["out"]}, r"unknown key 'o'; expected keys among q, k, v"),
    "integer q": (lambda a: {**a, "q": a["q"].astype(np.int32)}, r"key 'q': expected floats"),
    "nan in q": (lambda a: {**a, "q": np.where(a["q"] > 1, np.nan, a["q"])},
                 r"key 'q': expected finite values"),
    "half the grads": (lambda a: {**a, "dq": a["q"], "dout": a["out"]},
                       r"gradients need dout, dq, dk and dv together; missing dk, dv"),
    "bool mask as float": (lambda a: {**a, "mask": np.ones((5, 6))}, r"key 'mask': expected booleans"),
    "slopes per head": (lambda a: {**a, "alibi_slopes": np.ones(3)},
                        r"key 'alibi_slopes': expected shape \(2,\) \(one value per query head\)"),
    "bf16 raw bytes": (lambda a: {**a, "out": numerics.round_to(a["out"], "bf16").astype(
        numerics.np_dtype("bf16"))}, r"key 'out': expected floats .* got dtype \|V2"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_files(tmp_path, name):
    make, message = BAD[name]
    path = _save(tmp_path, **make(_arrays()))
    with pytest.raises(InputFileError, match=message):
        npzio.load_outputs(path)


def test_pickled_and_broken_files(tmp_path):
    a = _arrays()
    obj = np.empty(2, dtype=object)
    obj[:] = [a["out"], None]
    path = tmp_path / "pickled.npz"
    np.savez(path, **{**a, "out": obj})  # np.savez pickles object arrays
    with pytest.raises(InputFileError, match="pickled.npz: key 'out' holds Python objects"):
        npzio.load_outputs(path)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as fh:
        np.save(fh, a["out"])
    with pytest.raises(InputFileError, match="expected an .npz archive of named arrays"):
        npzio.load_outputs(npy)
    text = tmp_path / "text.npz"
    text.write_text("q,k,v\n1,2,3\n")
    with pytest.raises(InputFileError, match="text.npz: "):
        npzio.load_outputs(text)
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes((_save(tmp_path, **a)).read_bytes()[:200])
    with pytest.raises(InputFileError, match="trunc.npz: "):
        npzio.load_outputs(truncated)
    with pytest.raises(InputFileError, match="nothere.npz: no such file"):
        npzio.load_outputs(tmp_path / "nothere.npz")
    assert isinstance(InputFileError("x"), ValueError)


def test_save_round_trip_numpy_and_torch(tmp_path):
    a = _arrays()
    path = tmp_path / "saved.npz"
    npzio.save(path, **a)
    _, outputs = npzio.load_outputs(path)
    np.testing.assert_array_equal(outputs["out"], a["out"])
    with pytest.raises(InputFileError, match="o: not a documented key"):
        npzio.save(path, o=a["out"])
    torch = pytest.importorskip("torch", reason="saving torch tensors needs PyTorch")
    t = {n: torch.from_numpy(x).to(torch.bfloat16) for n, x in a.items()}
    npzio.save(path, **t)
    inputs, outputs = npzio.load_outputs(path)
    assert outputs["out"].dtype == np.float32
    np.testing.assert_array_equal(outputs["out"], numerics.round_to(a["out"], "bf16"))
    assert numerics.infer_dtype(outputs["out"]) == "bfloat16"


def test_journey_3_saved_bf16_run(tmp_path):
    """Outputs of a bf16 kernel saved elsewhere: PASS as saved; a corrupted row FAILs there."""
    from refattn.testing import check_attention
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 32, 16)) for _ in range(3))
    r = {n: numerics.round_to(a, "bf16") for n, a in (("q", q), ("k", k), ("v", v))}
    out, lse = refattn.attention(r["q"], r["k"], r["v"], causal=True, return_lse=True)
    out = numerics.round_to(out, "bf16").astype(np.float32)
    path = _save(tmp_path, q=q, k=k, v=v, out=out, lse=lse.astype(np.float32))
    inputs, outputs = npzio.load_outputs(path)
    assert numerics.infer_dtype(outputs["out"]) == "bfloat16"
    res = check_attention(outputs, dtype="bf16", causal=True, **inputs)
    assert res["verdict"] == "PASS" and res["analysis"] is None
    out[0, 1, 20] += 0.25
    _, outputs = npzio.load_outputs(_save(tmp_path, "bad.npz", q=q, k=k, v=v, out=out))
    res = check_attention(outputs, dtype="bf16", causal=True, **inputs)
    assert res["verdict"] == "FAIL"
    assert res["results"]["out"]["worst_index"][:3] == (0, 1, 20)
    assert res["analysis"]["lines"][0].startswith("1 of 64 rows (b, h, i) exceed")
    # gradients saved with their dout are compared too
    dout = rng.standard_normal(out.shape)
    grads = refattn.attention_backward(r["q"], r["k"], r["v"], numerics.round_to(dout, "bf16"),
                                       causal=True)[:3]
    saved = {n: numerics.round_to(g, "bf16") for n, g in zip(("dq", "dk", "dv"), grads)}
    _, outputs = npzio.load_outputs(_save(tmp_path, "g.npz", q=q, k=k, v=v, out=out, dout=dout,
                                          **saved))
    res = check_attention(outputs, dtype="bf16", causal=True, **inputs)
    assert set(res["results"]) == {"out", "dq", "dk", "dv"}
    assert [res["results"][n]["verdict"] for n in ("dq", "dk", "dv")] == ["PASS"] * 3

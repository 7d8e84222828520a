"""refattn.distributed on Dask's scheduler: equal to the single-machine backend, pruned, fault tolerant.

Every expected value is the single-machine numba call on the whole problem (itself checked against
the numpy oracle elsewhere); task counts are checked against visible tile pairs counted by brute force
from the definition of the band or the block mask.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="refattn.distributed needs dask[distributed] "
                                                         "(pip install 'refattn[dask]')")
da = pytest.importorskip("dask.array", reason="refattn.distributed needs dask.array")
zarr = pytest.importorskip("zarr", reason="refattn.distributed's store needs zarr")

import refattn  # noqa: E402
from refattn import distributed as rd  # noqa: E402
from refattn.errors import ParameterError, ShapeError  # noqa: E402

TOL = 1e-13


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    fin = np.isfinite(b)  # empty rows: -inf LSE on both sides
    assert np.array_equal(fin, np.isfinite(a))
    return np.linalg.norm(np.where(fin, a, 0) - np.where(fin, b, 0)) / np.linalg.norm(np.where(fin, b, 0))


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def qkv(seed, b=1, hq=2, hkv=2, sq=200, sk=200, d=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, d)))


def attend_tasks(x) -> int:
    return sum(1 for key in x.__dask_graph__() if str(key[0] if isinstance(key, tuple) else key)
               .startswith(rd.ATTEND))


CASES = {
    "causal": ("sdpa", dict(causal=True), {}),
    "causal_top_left_sq_lt_sk": ("sdpa", dict(causal="top_left"), dict(sq=150, sk=230)),
    "causal_bottom_right_sq_lt_sk": ("sdpa", dict(causal=True), dict(sq=150, sk=230)),
    "window": ("sdpa", dict(window=(30, 5)), {}),
    "gqa": ("gqa", dict(causal=True), dict(hq=4, hkv=2)),
    "alibi": ("sdpa", dict(causal=True, alibi_slopes=np.array([0.5, 0.25])), {}),
    "sinks": ("sdpa", dict(causal=True, sinks=np.array([0.5, -1.0])), {}),
    "dropout": ("sdpa", dict(causal=True, dropout_p=0.2, dropout_seed=3), {}),
    "sliding_window": ("sliding_window", dict(window=(40, 0)), {}),
    "bigbird": ("bigbird", dict(block_size=16, num_random_blocks=2, seed=1), dict(sq=256, sk=256)),
    "block_sparse": ("block_sparse", dict(block_size=40, causal=True,
                                          block_mask=np.random.default_rng(0).random((5, 5)) < 0.5), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_the_single_machine_backend(client, case):
    variant, kw, shape = CASES[case]
    q, k, v = qkv(len(case), **shape)
    want, want_lse = refattn.attention(q, k, v, variant=variant, backend="numba", return_lse=True, **kw)
    out, lse = rd.attention(q, k, v, variant=variant, client=client, q_chunk=48, kv_chunk=40,
                            return_lse=True, **kw)
    assert out.shape == want.shape and lse.shape == want_lse.shape
    assert rel(out, want) <= TOL and rel(lse, want_lse) <= TOL


@pytest.mark.parametrize("case", ["causal", "window", "gqa", "sinks", "dropout", "bigbird"])
def test_backward_equals_the_single_machine_backward(client, case):
    variant, kw, shape = CASES[case]
    q, k, v = qkv(len(case) + 100, **shape)
    dout = np.random.default_rng(7).standard_normal(q.shape[:3] + (v.shape[3],))
    want = refattn.attention_backward(q, k, v, dout, variant=variant, backend="numba", **kw)
    got = rd.attention_backward(q, k, v, dout, variant=variant, client=client, q_chunk=56, kv_chunk=48, **kw)
    for g, w in zip(got[:3], want[:3]):
        assert g.shape == w.shape and rel(g, w) <= 1e-12
    assert set(got[3]) == set(want[3])
    for name in want[3]:
        assert rel(got[3][name], want[3][name]) <= 1e-12


def visible_pairs(vis, qc, kc) -> int:
    """Tile pairs of the dense visibility ``vis`` (Sq x Sk) holding a visible pair, by brute force."""
    sq, sk = vis.shape
    return sum(bool(vis[i:i + qc, j:j + kc].any()) for i in range(0, sq, qc) for j in range(0, sk, kc))


@pytest.mark.parametrize("kw, vis", [
    (dict(), lambda i, j, s: np.ones_like(i + j, bool)),
    (dict(causal=True), lambda i, j, s: j <= i + s),
    (dict(causal="top_left"), lambda i, j, s: j <= i),
    (dict(window=(50, 0)), lambda i, j, s: (j <= i + s) & (j >= i + s - 50)),
    (dict(window=(20, 30)), lambda i, j, s: (j <= i + s + 30) & (j >= i + s - 20)),
], ids=["full", "causal", "top_left", "causal_window", "window"])
def test_task_count_is_the_visible_tile_pairs(kw, vis):
    sq, sk, qc, kc = 300, 420, 32, 40
    q, k, v = qkv(0, sq=sq, sk=sk)
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    want = visible_pairs(vis(i, j, sk - sq), qc, kc)
    out = rd.attention(q, k, v, q_chunk=qc, kv_chunk=kc, compute=False, **kw)
    assert attend_tasks(out) == want == rd.plan(q.shape, k.shape, q_chunk=qc, kv_chunk=kc, **kw).n_tasks


def test_task_counts_scale_as_the_pattern_says():
    n, c = 2048, 64
    shape = (1, 1, n, 8)
    full = rd.plan(shape, shape, q_chunk=c, kv_chunk=c).n_tasks
    causal = rd.plan(shape, shape, q_chunk=c, kv_chunk=c, causal=True).n_tasks
    assert full == (n // c) ** 2 and causal == (n // c) * (n // c + 1) // 2  # about half
    w = 200
    window = rd.plan(shape, shape, q_chunk=c, kv_chunk=c, window=(w, 0)).n_tasks
    assert window <= (n // c) * (w // c + 2)  # O((N / q_chunk) * (w / kv_chunk + 1))


def test_block_sparse_and_bigbird_tasks_follow_their_blocks():
    rng = np.random.default_rng(3)
    mask = rng.random((8, 8)) < 0.3
    q, k, v = qkv(1, sq=256, sk=256)
    out = rd.attention(q, k, v, variant="block_sparse", block_size=32, block_mask=mask, q_chunk=32,
                       kv_chunk=32, compute=False)
    assert attend_tasks(out) == visible_pairs(np.kron(mask, np.ones((32, 32), bool)), 32, 32) == mask.sum()
    q, k, v = qkv(1, sq=512, sk=512)
    bb = dict(block_size=16, num_random_blocks=1, seed=2)
    from refattn.variants.sparse import pattern_of
    from refattn import variants
    var = variants.get("bigbird")
    pat = pattern_of(var, {"q": q, "k": k, "v": v}, var.parse_params(bb))
    vis = np.asarray(pat.keep(np.arange(512), np.arange(512), 512, 512)).reshape(-1, 512, 512).any(axis=0)
    out = rd.attention(q, k, v, variant="bigbird", q_chunk=32, kv_chunk=32, compute=False, **bb)
    assert attend_tasks(out) == visible_pairs(vis, 32, 32) < 16 * 16


def test_inputs_from_dask_memmap_npy_and_zarr(client, tmp_path):
    q, k, v = qkv(5, sq=160, sk=160)
    want, want_lse = refattn.attention(q, k, v, causal=True, backend="numba", return_lse=True)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "k.npy", k)
    zarr.save_array(str(tmp_path / "v.zarr"), v)
    sources = [
        (da.from_array(q, chunks=(1, 2, 33, 8)), da.from_array(k), da.from_array(v)),
        (np.load(tmp_path / "q.npy", mmap_mode="r"), str(tmp_path / "k.npy"), str(tmp_path / "v.zarr")),
        (str(tmp_path / "q.npy"), np.load(tmp_path / "k.npy", mmap_mode="r"),
         zarr.open_array(str(tmp_path / "v.zarr"), mode="r")),
    ]
    for a, b, c in sources:
        out = rd.attention(a, b, c, causal=True, client=client, q_chunk=64, kv_chunk=48)
        assert rel(out, want) <= TOL
    store = str(tmp_path / "result.zarr")
    out, lse = rd.attention(q, k, v, causal=True, client=client, q_chunk=64, kv_chunk=48,
                            store=store, return_lse=True)
    assert isinstance(out, zarr.Array) and rel(out[...], want) <= TOL and rel(lse[...], want_lse) <= TOL
    lazy = rd.attention(q, k, v, causal=True, q_chunk=64, kv_chunk=48, compute=False)
    assert isinstance(lazy, da.Array) and rel(lazy.compute(scheduler="sync"), want) <= TOL


def test_bshd_layout_and_row_knobs(client):
    q, k, v = qkv(8, sq=120, sk=120)
    kw = dict(causal="top_left", window=(10, 0), lse_base=2, empty_row="nan", layout="bshd")
    t = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))  # noqa: E731
    want, want_lse = refattn.attention(t(q), t(k), t(v), backend="numba", return_lse=True, **kw)
    out, lse = rd.attention(t(q), t(k), t(v), client=client, q_chunk=32, kv_chunk=32, return_lse=True, **kw)
    assert rel(out, want) <= TOL and rel(lse, want_lse) <= TOL


def test_bad_arguments_name_themselves(tmp_path):
    q, k, v = qkv(0, sq=64, sk=64)
    with pytest.raises(ParameterError, match="variant: expected one that computes a sub-rectangle"):
        rd.attention(q, k, v, variant="flash", compute=False)
    with pytest.raises(ParameterError, match="q_chunk: expected a positive number of tokens per chunk, got 0"):
        rd.attention(q, k, v, q_chunk=0, compute=False)
    with pytest.raises(ParameterError, match="mask: not supported on a sub-rectangle"):
        rd.attention(q, k, v, mask=np.ones((64, 64), bool), compute=False).compute(scheduler="sync")
    with pytest.raises(ShapeError, match="q: expected a 4-d array"):
        rd.attention(q[0], k, v, compute=False)
    with pytest.raises(ParameterError, match="client: expected a dask.distributed.Client"):
        rd.attention(q, k, v, client=3)
    with pytest.raises(ParameterError, match="threads: expected a positive thread count"):
        rd.attention(q, k, v, threads=0, compute=False)
    with pytest.raises(ParameterError, match="q: expected an np.memmap as opened"):
        np.save(tmp_path / "q.npy", q)
        rd.attention(np.load(tmp_path / "q.npy", mmap_mode="r")[:, :, ::2], k, v, compute=False)


def test_a_killed_worker_is_recomputed():
    """LocalCluster of 2 workers; one worker process is killed mid-run; Dask recomputes its tasks and
    the result is still exact."""
    q, k, v = qkv(11, sq=1024, sk=1024, d=32)
    want = refattn.attention(q, k, v, causal=True, backend="numba")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        c.wait_for_workers(2)
        out = rd.attention(q, k, v, causal=True, q_chunk=32, kv_chunk=32, backend="numpy", compute=False)
        fut = c.compute(out)
        victim = None
        deadline = time.time() + 60
        while victim is None and time.time() < deadline:
            busy = [w for w, tasks in c.processing().items() if tasks]
            done = sum(1 for st in c.run_on_scheduler(_attend_done))
            if busy and done >= 1:
                victim = busy[0]
            time.sleep(0.02)
        assert victim is not None and not fut.done()
        nanny = next(n for n in cluster.workers.values() if n.worker_address == victim)
        os.kill(nanny.process.process.pid, signal.SIGKILL)  # the worker process dies mid-run
        got = fut.result(timeout=240)
        assert victim not in c.scheduler_info()["workers"]  # it really died (the nanny starts anew)
    assert rel(got, want) <= TOL


def _attend_done(dask_scheduler=None):
    return [k for k, ts in dask_scheduler.tasks.items()
            if str(k[0] if isinstance(k, tuple) else k).startswith(rd.ATTEND) and ts.state == "memory"]


def test_a_scheduler_address(tmp_path):
    """A `dask scheduler` subprocess and a `dask worker` on 127.0.0.1, reached by address."""
    exe = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    if exe is None:
        pytest.skip("the dask command is not installed")
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([exe, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        import json
        address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen([exe, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                       "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(address) as c:
            c.wait_for_workers(1, timeout=60)
        q, k, v = qkv(4, sq=96, sk=96)
        want = refattn.attention(q, k, v, causal=True, backend="numba")
        assert address.startswith("tcp://127.0.0.1:")
        out = rd.attention(q, k, v, causal=True, client=address, q_chunk=32, kv_chunk=32)
        assert rel(out, want) <= TOL
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)


def test_client_memory_stays_bounded_with_memmapped_inputs(client, tmp_path):
    """Inputs of 3 x 32 MiB memory-mapped from .npy, output to a zarr store: the client's resident
    memory grows far less than one input (the workers read their chunks from the files)."""
    import psutil
    n, d = 65536, 64
    paths = []
    for name in "qkv":
        m = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float64, shape=(1, 1, n, d))
        for s in range(0, n, 8192):
            m[0, 0, s:s + 8192] = np.random.default_rng(s).standard_normal((8192, d))
        m.flush()
        del m
        paths.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    proc = psutil.Process()
    base, peak, stop = proc.memory_info().rss, [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)
    th = threading.Thread(target=watch)
    th.start()
    try:
        out, lse = rd.attention(*paths, causal=True, window=(63, 0), client=client, q_chunk=4096,
                                kv_chunk=4096, store=str(tmp_path / "out.zarr"), return_lse=True)
    finally:
        stop.set()
        th.join()
    nbytes = paths[0].nbytes
    assert peak[0] - base < nbytes / 4, (peak[0] - base, nbytes)
    rows = slice(n - 300, n)  # spot-check the last rows against the single-machine call on their keys
    q, k, v = (np.array(a[:, :, n - 400:]) for a in paths)
    want = refattn.attention(q, k, v, causal=True, window=(63, 0), backend="numba")
    assert rel(out[:, :, rows], want[:, :, -300:]) <= TOL


def test_cli_compare_and_bench_distributed(client):
    """`refattn compare --distributed --scheduler ADDRESS` passes against numpy; `refattn bench
    --distributed` times both the numba backend alone and the Dask run."""
    import json
    from click.testing import CliRunner
    from refattn.cli.main import cli
    address = client.scheduler.address
    res = CliRunner().invoke(cli, ["compare", "--variant", "sdpa", "--backend", "numba", "--shape",
                                   "1,2,192,16", "--param", "causal=true", "--grad", "--distributed",
                                   "--scheduler", address, "--chunk", "64", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["verdict"] == "PASS" and "on dask" in json.dumps(got)
    res = CliRunner().invoke(cli, ["compare", "--scheduler", address])
    assert res.exit_code == 2 and "--scheduler: only with --distributed" in res.output
    res = CliRunner().invoke(cli, ["bench", "--distributed", "--shape", "1,1,512,16", "--scheduler",
                                   address, "--chunk", "128,256", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    assert [r["impl"] for r in rows] == ["numba", "distributed", "distributed"]
    assert [r["tasks"] for r in rows[1:]] == [10, 3]  # causal: 4 * 5 / 2 and 2 * 3 / 2 chunk pairs

"""Where users wait: the numpy reference skips what no query can see, both backends report
progress in shares of the work, and a numba compile is announced once, only when it happens."""

import io

import numpy as np
import pytest

import refattn
from refattn.backends.numba_ import NumbaBackend
from refattn.backends.numba_ import _kernels
from refattn.backends.numba_.backend import announce_compile, will_compile, _rows2d
from refattn.backends.numpy_ import KEY_BLOCK, NumpyBackend
from refattn.patterns import Pattern


class Counting(NumpyBackend):
    """The numpy backend, counting the score elements it computes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.elements = 0

    def scores(self, q_rows, k, *args, **kwargs):
        s, t = super().scores(q_rows, k, *args, **kwargs)
        self.elements += s.size
        return s, t


def count(n, threads=1, chunk=1 << 16, **params):
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((1, 2, n, 16)) for _ in range(3))
    be = Counting(chunk_elements=chunk, threads=threads)
    out = refattn.attention(q, k, v, backend=be, **params)
    return be.elements, out


def test_the_reference_work_follows_the_visible_pairs():
    n = 2048
    full, _ = count(n)
    causal, _ = count(n, causal=True)
    assert full == 2 * n * n
    # causal: about half, plus the diagonal blocks of a chunk's rows x KEY_BLOCK tiles
    assert causal < 0.5 * full + 2 * n * (16 + KEY_BLOCK)
    window, _ = count(n, window=(127, 0))
    assert window <= 2 * n * (128 + 16 + 2 * KEY_BLOCK)  # O(N w), not O(N^2)
    # BigBird with 64-blocks: each block row sees 3 window, 2 global and 1 random block of 32, but
    # the global rows see everything: (30 * 6 + 2 * 32) / 32**2 of the pairs = 0.24
    bigbird, _ = count(n, variant="bigbird", block_size=64, num_random_blocks=1)
    assert bigbird < 0.3 * full


def test_threads_do_not_change_a_single_bit():
    _, one = count(1024, threads=1, causal=True, softcap=20.0)
    _, two = count(1024, threads=2, causal=True, softcap=20.0)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("backend", [NumpyBackend(chunk_elements=1 << 14),
                                     NumbaBackend(block_q=16, block_k=16)])
def test_progress_shares_add_up_to_each_call(backend):
    r = np.random.default_rng(1)
    q, k, v = (r.standard_normal((1, 2, 200, 8)) for _ in range(3))
    shares = []
    be = backend.configured(progress=shares.append)
    from refattn import pipeline
    pipeline.run("sdpa", be, {"q": q, "k": k, "v": v}, {"causal": True})
    assert len(shares) > 4 and abs(sum(shares) - 1.0) < 1e-9
    shares.clear()
    pipeline.run("sdpa", be, {"q": q, "k": k, "v": v}, {"causal": True}, dout=np.ones((1, 2, 200, 8)),
                 forward=False)
    # the backward: the recomputed forward, then the two passes -- each call sums to 1
    assert abs(sum(shares) - 3.0) < 1e-9 if isinstance(be, NumbaBackend) else abs(sum(shares) - 2.0) < 1e-9


def test_a_compile_is_announced_once_and_only_when_it_happens():
    be = NumbaBackend()
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((1, 2, 64, 16)) for _ in range(3))
    refattn.attention(q, k, v, causal=True, backend=be)  # compiled (or loaded) now
    plan = be._plan(Pattern(causal=True), q, k)
    rec = be._records(q, k, plan, 0.25, np.arange(2), None, None)
    args = (_rows2d(q), _rows2d(k), _rows2d(v), np.zeros((128, 16)), np.zeros(128), *rec, plan.tlo,
            plan.thi, 0, 1)
    assert not will_compile(_kernels.forward, args)
    quiet = io.StringIO()
    assert not announce_compile(_kernels.forward, args, np.float64, None, None, stream=quiet)
    assert quiet.getvalue() == ""
    # int32 storage: a signature never compiled nor cached (checked, not compiled)
    odd = tuple(a.astype(np.int32) if i < 5 else a for i, a in enumerate(args))
    assert will_compile(_kernels.forward, odd)
    said = io.StringIO()
    assert announce_compile(_kernels.forward, odd, np.int32, None, None, stream=said)
    line = said.getvalue()
    assert line.count("\n") == 1 and "compiling the numba forward kernel (int32, plain)" in line
    assert "about 10 s" in line
    assert not announce_compile(_kernels.forward, odd, np.int32, None, None, stream=said)  # once

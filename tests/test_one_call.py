"""Every registered variant through the one call, on every backend it lists.

One parametrised test per variant: ``refattn.attention`` with the variant's declared inputs
(positionally and by name), every output it returns, and ``refattn.attention_backward`` where it has
a backward; the numba backend (default tiles, and a ``NumbaBackend(block_q=16, block_k=16)``
instance so that sequences of >= 100 tokens span several tiles) agrees with numpy to <= 1e-12
normwise on every output and gradient. A new family is covered the day it registers: its example
inputs come from its own ``Variant.example``.
"""

import numpy as np
import pytest

import refattn
from refattn import backends, variants
from refattn.errors import ParameterError

#: (B, Hq, Sq, Sk, D, Hkv) and parameters per variant: Sq != Sk and >= 100 tokens wherever the
#: variant allows it, so tiles of 16 are partial and several
DEFAULT = ((2, 4, 100, 131, 16, 2), {})
SHAPES = {
    "mha": ((2, 4, 100, 131, 16, 4), {}),
    "mqa": ((2, 4, 100, 131, 16, 1), {}),
    "bigbird": ((2, 4, 128, 128, 16, 2), {"block_size": 8, "num_random_blocks": 1}),
    "longformer": ((2, 4, 100, 128, 16, 2), {"attention_window": 32}),
    "sliding_window": (DEFAULT[0], {"window": (20, 10)}),
    "global": (DEFAULT[0], {"tokens": (0, 7, 30, 64)}),
    "nsa": ((2, 4, 100, 160, 16, 2), {}),
}

NAMES = [v.name for v in variants.list()]


def case_of(name):
    var = variants.get(name)
    shape, params = SHAPES.get(name, DEFAULT)
    arrays = var.example(shape, np.random.default_rng(abs(hash(name)) % 2 ** 32), var.parse_params(params))
    return var, arrays, params


def numba_backends():
    if "numba" not in backends.available():
        return []
    from refattn.backends.numba_ import NumbaBackend
    return [backends.get("numba"), NumbaBackend(block_q=16, block_k=16)]


def assert_agree(got, want, what, tol=1e-12):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=what)
    assert np.linalg.norm(got[fin] - want[fin]) <= tol * max(np.linalg.norm(want[fin]), 1e-300), what


def all_outputs(var):
    """Keyword flags asking for every extra output (return_lse=True, ...)."""
    return {f"return_{n}": True for n in var.outputs[1:] if f"return_{n}" in var.fields()}


@pytest.mark.parametrize("name", NAMES)
def test_every_variant_through_one_call(name):
    var, arrays, params = case_of(name)
    flags = all_outputs(var)
    ref = refattn.attention(variant=name, **arrays, **params, **flags)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(ref) == 1 + len(flags)
    positional = refattn.attention(*(arrays[n] for n in var.inputs), variant=name, **params, **flags)
    positional = positional if isinstance(positional, tuple) else (positional,)
    for a, b in zip(positional, ref):
        np.testing.assert_array_equal(a, b)
    plain = refattn.attention(variant=name, **arrays, **params)
    np.testing.assert_array_equal(plain, ref[0])  # out alone without the flags

    dout = np.random.default_rng(1).standard_normal(np.shape(ref[0])) if var.backward else None
    grads = (refattn.attention_backward(variant=name, dout=dout, **arrays, **params)
             if var.backward else None)
    if grads is not None:
        if var.on_qkv:
            assert isinstance(grads, tuple) and len(grads) == 4 and isinstance(grads[3], dict)
            named = {"q": grads[0], "k": grads[1], "v": grads[2], **grads[3]}
            pos = refattn.attention_backward(*(arrays[n] for n in var.inputs), dout, variant=name,
                                             **params)
            np.testing.assert_array_equal(pos[0], grads[0])
        else:
            assert isinstance(grads, dict)
            named = grads
        for n in var.inputs:
            a = np.asarray(arrays[n])
            if a.dtype.kind == "f":
                assert n in named and np.shape(named[n]) == a.shape, n

    for be in numba_backends() if "numba" in var.backends else []:
        got = refattn.attention(variant=name, backend=be, **arrays, **params, **flags)
        got = got if isinstance(got, tuple) else (got,)
        for n, a, b in zip(var.outputs, got, ref):
            assert_agree(a, b, f"{name} {n} on {be!r} block_q={getattr(be, 'block_q', '')}")
        if grads is not None:
            g = refattn.attention_backward(variant=name, backend=be, dout=dout, **arrays, **params)
            g = {"q": g[0], "k": g[1], "v": g[2], **g[3]} if var.on_qkv else g
            assert set(g) == set(named)
            for n in named:
                assert_agree(g[n], named[n], f"{name} d{n} on {be!r}")


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_input_is_named_with_the_variants_inputs(name):
    var, arrays, params = case_of(name)
    gone = var.inputs[-1]
    kept = {n: a for n, a in arrays.items() if n != gone}
    with pytest.raises(ParameterError) as err:
        refattn.attention(variant=name, **kept, **params)
    msg = str(err.value)
    assert msg.startswith(f"{gone}: a missing input") and all(n in msg for n in var.inputs)


def test_paged_missing_inputs_are_all_named():
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(ParameterError, match=r"^k_pages, v_pages, block_table, seq_lens: missing inputs"):
        refattn.attention(q, variant="paged")


def test_an_unexpected_array_and_a_repeated_input_are_errors():
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((1, 2, 3, 4)) for _ in range(3))
    with pytest.raises(ParameterError, match=r"^table: not an input or parameter of variant 'sdpa'"):
        refattn.attention(q, k, v, table=np.zeros((32, 2)))
    with pytest.raises(ParameterError, match=r"^q: given twice"):
        refattn.attention(q, k, v, q=q)
    with pytest.raises(ParameterError, match=r"^inputs: variant 'sdpa' takes inputs q, k, v .* got 4"):
        refattn.attention(q, k, v, v)


def test_the_registry_is_there_right_after_import():
    import subprocess
    import sys
    code = "import refattn; print(len(refattn.variants.list()) > 20, refattn.variants.get('t5').name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "t5"]


def test_one_integer_rule_accepts_numpy_integers_everywhere():
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((1, 2, 6, 4)) for _ in range(3))
    a = refattn.attention(q, k, v, variant="decode", sliding_window=np.int64(3))
    b = refattn.attention(q, k, v, variant="decode", sliding_window=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(refattn.attention(q, k, v, window=(np.int32(3), np.int64(0))),
                                  refattn.attention(q, k, v, window=(3, 0)))
    for bad in (True, 2.0, "3"):
        with pytest.raises(ParameterError, match=r"^sliding_window: expected an integer >= 1"):
            refattn.attention(q, k, v, variant="decode", sliding_window=bad)


# -- inputs from any array framework ----------------------------------------------------------------------
class OnlyDLPack:
    """An array-like offering nothing but the DLPack protocol (as a foreign framework would)."""

    def __init__(self, a):
        self._a = np.ascontiguousarray(a)

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class OnlyArray:
    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._a, dtype=dtype)


def qkv(seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal(s) for s in ((1, 2, 5, 4), (1, 2, 7, 4), (1, 2, 7, 4))]


@pytest.mark.parametrize("wrap", [OnlyDLPack, OnlyArray])
def test_arrays_from_any_protocol_give_numpy_results(wrap):
    q, k, v = qkv()
    want = refattn.attention(q, k, v, causal=True, return_lse=True)
    got = refattn.attention(wrap(q), wrap(k), wrap(v), causal=True, return_lse=True)
    assert all(type(a) is np.ndarray for a in got)
    np.testing.assert_array_equal(got[0], want[0])
    table = np.random.default_rng(1).standard_normal((32, 2))
    np.testing.assert_array_equal(refattn.attention(wrap(q), wrap(k), wrap(v), variant="t5", table=wrap(table)),
                                  refattn.attention(q, k, v, variant="t5", table=table))


def test_python_objects_are_a_named_error():
    q, k, v = qkv()
    with pytest.raises(refattn.errors.DTypeError, match=r"^q: expected a"):
        refattn.attention(np.array([object()] * 40).reshape(1, 2, 5, 4), k, v)


def test_torch_tensors_including_bf16_and_requires_grad():
    torch = pytest.importorskip("torch", reason="torch tensors need PyTorch (the peers extra)")
    q, k, v = qkv()
    t = [torch.from_numpy(a).requires_grad_(True) for a in (q, k, v)]
    np.testing.assert_array_equal(refattn.attention(*t), refattn.attention(q, k, v))
    bf = [torch.from_numpy(a).to(torch.bfloat16) for a in (q, k, v)]
    exact = [a.float().numpy().astype(np.float64) for a in bf]  # bf16 values, widened exactly
    np.testing.assert_array_equal(refattn.attention(*bf), refattn.attention(*exact))


def test_jax_cpu_arrays_including_bf16():
    jax = pytest.importorskip("jax", reason="JAX arrays need jax (the peers extra)")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import ml_dtypes
    q, k, v = qkv()
    got = refattn.attention(*(jnp.asarray(a) for a in (q, k, v)), causal=True)
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, refattn.attention(q, k, v, causal=True))
    bf = [jnp.asarray(a.astype(ml_dtypes.bfloat16)) for a in (q, k, v)]
    exact = [a.astype(ml_dtypes.bfloat16).astype(np.float64) for a in (q, k, v)]
    np.testing.assert_array_equal(refattn.attention(*bf), refattn.attention(*exact))
    dq, dk, dv, _ = refattn.attention_backward(*bf, jnp.ones((1, 2, 5, 4)))
    assert dq.dtype == np.float64 and dk.shape == (1, 2, 7, 4)

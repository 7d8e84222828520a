"""Mamba against HF transformers' ``MambaMixer`` slow (pure torch) path in float64.

A tiny randomly initialised config (no download), eval mode, no cache: the mixer then runs its
torch-only path (``causal_conv1d_fn`` and ``mamba_selective_scan`` fall back to their torch code
without the ``causal_conv1d``/``mamba_ssm`` packages, which these tests require to be absent).

HF casts to float32 inside that path (VARIANTS H): ``A = -exp(A_log.float())``, ``B.float()``,
``hidden_states.float()``, ``D.float()``, ``dt_proj.bias.float()``. The ``float64`` fixture patches
``torch.Tensor.float`` (pytest's ``monkeypatch``, undone after the test) so that it returns a float64
tensor unchanged -- every other dtype is cast as before -- and the mixer then computes in float64.
The last test shows that without the patch the difference is float32-sized, so the patch is what
closes the gap, not a loose bound.

The end-to-end test rebuilds the mixer's projections from its weights with torch functional ops
(in_proj, depthwise causal conv + SiLU, x_proj split into dt/B/C, dt_proj without its bias) and
feeds them to :func:`refattn.ssm.selective_scan` (``delta_bias`` = the dt_proj bias,
``delta_softplus=True``, ``D``, ``z`` = the gate), then applies out_proj.
"""

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer tests need torch (pip install 'refattn[peers]')")
pytest.importorskip("transformers", reason="peer tests need transformers (pip install 'refattn[peers]')")

from transformers import MambaConfig  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402
from transformers.models.mamba.modeling_mamba import MambaMixer  # noqa: E402

from refattn import backends, ssm  # noqa: E402

from .hf_float64 import keep_float64, normwise  # noqa: E402

pytestmark = [pytest.mark.peers,
              pytest.mark.skipif(any(importlib.util.find_spec(m) is not None
                                     for m in ("mamba_ssm", "causal_conv1d", "mambapy")),
                                 reason="mamba_ssm/causal_conv1d/mambapy installed: HF would not run "
                                        "its pure torch path")]

BACKENDS = ["numpy"] + (["numba"] if "numba" in backends.available() else [])


@pytest.fixture
def float64(monkeypatch):
    """HF's float32 casts leave float64 tensors alone (tests/peers/hf_float64.py)."""
    keep_float64(monkeypatch)


def tiny_mixer(seed=0):
    torch.manual_seed(seed)
    config = MambaConfig(hidden_size=8, state_size=4, expand=2, conv_kernel=3, time_step_rank=3,
                         use_bias=True, use_conv_bias=True, num_hidden_layers=1, vocab_size=16)
    mixer = MambaMixer(config, layer_idx=0).double().eval()
    with torch.no_grad():  # away from the deterministic init: random A, D, dt bias
        mixer.A_log.copy_(torch.randn_like(mixer.A_log) * 0.5)
        mixer.D.copy_(torch.randn_like(mixer.D))
        mixer.dt_proj.bias.copy_(torch.randn_like(mixer.dt_proj.bias) - 1.0)
        mixer.out_proj.bias.copy_(torch.randn_like(mixer.out_proj.bias))
    return mixer


def refattn_mixer(mixer, hidden, backend):
    """The mixer's forward with refattn's selective scan in place of HF's."""
    F = torch.nn.functional
    with torch.no_grad():
        xz = mixer.in_proj(hidden).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        length = x.shape[-1]
        x = F.silu(F.conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias, padding=mixer.conv_kernel_size - 1,
                            groups=mixer.intermediate_size)[..., :length])
        dt, B, C = torch.split(mixer.x_proj(x.transpose(1, 2)),
                               [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
        delta = (dt @ mixer.dt_proj.weight.T).transpose(1, 2)
        y = ssm.selective_scan(x, delta, -torch.exp(mixer.A_log), B.transpose(1, 2), C.transpose(1, 2),
                               D=mixer.D, z=z, delta_bias=mixer.dt_proj.bias, delta_softplus=True,
                               backend=backend)
        return mixer.out_proj(torch.from_numpy(y).transpose(1, 2)).numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mamba_mixer_end_to_end_float64(float64, backend):
    mixer = tiny_mixer()
    hidden = torch.randn(2, 19, 8, dtype=torch.float64)
    with torch.no_grad():
        want = mixer(hidden).numpy()
    got = refattn_mixer(mixer, hidden, backend)
    assert normwise(got, want) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_selective_scan_function_float64(float64, backend):
    """HF's ``mamba_selective_scan`` (the slow path's scan) with its last state."""
    rng = np.random.default_rng(1)
    b, d, n, length = 2, 6, 4, 23
    u, delta, z = rng.standard_normal((3, b, d, length))
    A = -np.exp(rng.normal(0, 0.5, (d, n)))
    B, C = rng.standard_normal((2, b, n, length))
    D, bias = rng.standard_normal((2, d))
    t = {name: torch.from_numpy(a) for name, a in dict(u=u, delta=delta, z=z, A=A, B=B, C=C, D=D,
                                                       bias=bias).items()}
    out, last = modeling_mamba.mamba_selective_scan(
        t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["bias"],
        delta_softplus=True, return_last_state=True)
    got, got_last = ssm.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                                       delta_softplus=True, return_last_state=True, backend=backend,
                                       form="chunked", chunk_size=8)
    assert out.dtype == torch.float64
    assert normwise(got, out.numpy()) <= 1e-12
    assert normwise(got_last, last.numpy()) <= 1e-12


def test_without_the_patch_the_difference_is_float32_sized():
    mixer = tiny_mixer()
    hidden = torch.randn(2, 19, 8, dtype=torch.float64)
    with torch.no_grad():
        hf = mixer(hidden).numpy()
    err = normwise(refattn_mixer(mixer, hidden, "numpy"), hf)
    assert 1e-11 < err < 1e-5, err  # measured: about 2e-9

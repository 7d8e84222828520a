"""Golden cases of the ssm family (VARIANTS section E): mamba, mamba2, s4.

``shape`` ``(B, Hq, Sq, Sk, D, Hkv)``: mamba reads batch B, channels Hq, length Sq, state N = D;
mamba2 b = B, l = Sq, h = Hq, p = n = D, g = Hkv; s4 batch B, channels Hq, length Sq, N = D.
Optional arrays (D, z, biases, states) are made by the :data:`MAKERS` below; ``how`` names the
variant whose layout they take.
"""

from __future__ import annotations

from .cases import Case

SHAPE = (2, 4, 9, 9, 3, 2)


def _c(name, variant, doc, shape=SHAPE, arrays=None, grads=False, **params):
    seed = sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % 2 ** 31
    return Case(name=name, variant=variant, shape=shape, seed=seed, params=params,
                arrays=dict(arrays or {}), grads=grads, doc=doc)


def _normal(dims):
    def make(shape, rng, params):
        b, h, sq, _, d, _ = shape
        sizes = {"B": b, "H": h, "L": sq, "N": d}
        return rng.standard_normal(tuple(sizes[x] for x in dims))
    return make


MAKERS = {
    ("D", "mamba"): _normal("H"),
    ("z", "mamba"): _normal("BHL"),
    ("delta_bias", "random"): _normal("H"),
    ("initial_state", "mamba"): _normal("BHN"),
    ("D", "mamba2"): _normal("HN"),
    ("z", "mamba2"): _normal("BLHN"),
    ("dt_bias", "random"): _normal("H"),
    ("initial_state", "mamba2"): _normal("BHNN"),
    ("D", "s4"): _normal("H"),
    ("initial_state", "s4"): _normal("BHN"),
}

CASES = (
    _c("ssm_mamba", "mamba", "selective B, C (B, N, L), no options", grads=True),
    _c("ssm_mamba_everything", "mamba", "D, z gate, delta_bias with softplus, initial state, chunked",
       arrays={"D": "mamba", "z": "mamba", "delta_bias": "random", "initial_state": "mamba"},
       delta_softplus=True, form="chunked", chunk_size=4, grads=True),
    _c("ssm_mamba2_chunked", "mamba2", "SSD, chunks of 4, 4 heads in 2 groups", chunk_size=4,
       grads=True),
    _c("ssm_mamba2_dual_everything", "mamba2", "the masked-attention dual; D (h, p), z, dt_bias with "
       "softplus, initial state", form="parallel",
       arrays={"D": "mamba2", "z": "mamba2", "dt_bias": "random", "initial_state": "mamba2"},
       dt_softplus=True, grads=True),
    _c("ssm_s4_zoh", "s4", "HiPPO-LegS A, zero-order hold, recurrence"),
    _c("ssm_s4_bilinear_fft", "s4", "bilinear rule, FFT convolution, D and an initial state",
       discretization="bilinear", form="fft", arrays={"D": "s4", "initial_state": "s4"}),
)

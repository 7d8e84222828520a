"""The runtime side of each supported model type: where its attention module lives, how its RoPE
tables are laid out, which function rotates q and k, and how to build one layer from a config.

``rope``: the layout of ``position_embeddings`` the module expects -- ``"concat"`` (``cos, sin`` of
shape ``(B, S, r)`` holding ``cat(freqs, freqs)``: Llama and most), ``"half"`` (``(B, S, r/2)``:
gpt-oss), ``"complex"`` (one complex ``(B, S, r/2)`` tensor ``exp(i p θ)``: DeepSeek-V2), or None.
``rotary``: the names of the module-level functions in the modeling file that apply RoPE to q and
k; :mod:`refattn.hf.capture` wraps them to see q and k *before* the rotation.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ParameterError


@dataclass(frozen=True)
class Runtime:
    module: str                     # the modeling module (import path)
    attention: str                  # the attention class in it
    rope: Optional[str] = "concat"  # position_embeddings layout
    rotary: tuple = ("apply_rotary_pos_emb",)
    rotary_class: Optional[str] = None

    def modeling(self):
        return importlib.import_module(self.module)

    def attention_class(self):
        return getattr(self.modeling(), self.attention)


_M = "transformers.models."
RUNTIME = {
    "llama": Runtime(_M + "llama.modeling_llama", "LlamaAttention", rotary_class="LlamaRotaryEmbedding"),
    "mistral": Runtime(_M + "mistral.modeling_mistral", "MistralAttention", rotary_class="MistralRotaryEmbedding"),
    "mixtral": Runtime(_M + "mixtral.modeling_mixtral", "MixtralAttention", rotary_class="MixtralRotaryEmbedding"),
    "qwen2": Runtime(_M + "qwen2.modeling_qwen2", "Qwen2Attention", rotary_class="Qwen2RotaryEmbedding"),
    "qwen3": Runtime(_M + "qwen3.modeling_qwen3", "Qwen3Attention", rotary_class="Qwen3RotaryEmbedding"),
    "gemma2": Runtime(_M + "gemma2.modeling_gemma2", "Gemma2Attention", rotary_class="Gemma2RotaryEmbedding"),
    "gemma3_text": Runtime(_M + "gemma3.modeling_gemma3", "Gemma3Attention", rotary_class="Gemma3RotaryEmbedding"),
    "gpt_oss": Runtime(_M + "gpt_oss.modeling_gpt_oss", "GptOssAttention", rope="half",
                       rotary_class="GptOssRotaryEmbedding"),
    "phi3": Runtime(_M + "phi3.modeling_phi3", "Phi3Attention", rotary_class="Phi3RotaryEmbedding"),
    "gpt_neox": Runtime(_M + "gpt_neox.modeling_gpt_neox", "GPTNeoXAttention",
                        rotary_class="GPTNeoXRotaryEmbedding"),
    "deepseek_v2": Runtime(_M + "deepseek_v2.modeling_deepseek_v2", "DeepseekV2Attention", rope="complex",
                           rotary=("apply_rotary_emb",), rotary_class="DeepseekV2RotaryEmbedding"),
    "t5": Runtime(_M + "t5.modeling_t5", "T5Attention", rope=None, rotary=()),
    "deepseek_v3": Runtime(_M + "deepseek_v3.modeling_deepseek_v3", "DeepseekV3Attention",
                           rotary=("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave"),
                           rotary_class="DeepseekV3RotaryEmbedding"),
}


def runtime(model_type: str) -> Runtime:
    if model_type not in RUNTIME:
        raise ParameterError(f"module: no runtime for model type {model_type!r}")
    return RUNTIME[model_type]


def rope_dims(spec, config) -> int:
    """The rotated width of the layer: ``rotary_dim``, MLA's ``qk_rope_head_dim``, or the head dim."""
    if "rotary_dim" in spec.params:
        return int(spec.params["rotary_dim"])
    if spec.variant == "mla":
        return int(config.qk_rope_head_dim)
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd and spec.model_type != "gpt_neox" else int(config.hidden_size // config.num_attention_heads)


def rope_tables(spec, config, positions: np.ndarray, layout: str):
    """float64 ``position_embeddings`` of the layer for ``positions (B, S)`` in ``layout``, from
    :func:`refattn.position.rope_frequencies` with the spec's base/scaling (the tables HF's rotary
    module would compute, without its float32 ``inv_freq``)."""
    import torch
    from ..position import rope_frequencies

    p = spec.params
    seq_len = int(positions.max()) + 1 if positions.size else 1
    inv, att = rope_frequencies(rope_dims(spec, config), base=p.get("base"), scaling=p.get("scaling"),
                                seq_len=seq_len, max_position_embeddings=p.get("max_position_embeddings"))
    freqs = positions.astype(np.float64)[..., None] * inv
    if layout == "complex":
        return torch.tensor(att * np.exp(1j * freqs))
    if layout == "concat":
        freqs = np.concatenate([freqs, freqs], axis=-1)
    return torch.tensor(np.cos(freqs) * att), torch.tensor(np.sin(freqs) * att)


def hf_rope_tables(module, spec, positions: np.ndarray, layout: str):
    """HF's own rotary module's tables for ``positions`` (for the float32 ``inv_freq`` quirk), or None."""
    import torch
    rt = runtime(spec.model_type)
    if rt.rotary_class is None:
        return None
    cls = getattr(rt.modeling(), rt.rotary_class)
    rot = cls(module.config).double()
    x = torch.zeros(1, dtype=torch.float64)
    pos = torch.tensor(positions)
    with torch.no_grad():
        if spec.layer_type is not None and spec.model_type == "gemma3_text":
            return rot(x, pos, spec.layer_type)
        return rot(x, pos)


def randomise(module, seed: int):
    """Every floating parameter of ``module`` redrawn in float64 (in place; returns it): norm weights
    ``1 + 0.1·N(0, 1)``, other vectors (biases, sinks) ``N(0, 1)·0.5``, matrices ``N(0, 1)/sqrt(fan_in)``
    -- unit-variance hidden states then give unit-variance q, k, v. HF initialises sinks and some
    biases to zero, which would hide a missing term."""
    import torch
    g = torch.Generator().manual_seed(int(seed))
    module.double().eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name.lower() and p.ndim == 1:
                p.copy_(1.0 + 0.1 * z)
            elif p.ndim == 1:
                p.copy_(0.5 * z)
            else:
                p.copy_(z / math.sqrt(p.shape[-1]))
    return module

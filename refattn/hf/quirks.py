"""Peer quirks: where an HF model's own eager code deviates from its config, from its sdpa path or
from float64 (VARIANTS H). Each was found by comparing -- the module run with and without
:func:`refattn.hf.float64.float64_casts`, its eager attention function against its sdpa one on the
same captured inputs, its output against the float64 oracle -- and is recorded with the
transformers version it was seen in. :func:`refattn.hf.check_module` measures the dynamic ones on
every run and warns with the reason (``refattn.hf.QuirkWarning``); :func:`refattn.hf.attention_spec`
warns about the static ones (config options the code ignores).

``what`` is a format string (``{value}``, ``{site}``, ``{diff}`` filled in by the caller).
"""

from __future__ import annotations

QUIRKS = {
    "float32_cast": {
        "model": "eager code", "seen_in": "5.23.0",
        "what": "casts float64 tensors to float32 at {site}; run as is, the float64 module's attention "
                "output differs from its float64 semantics by {diff} (normwise); check_module patches "
                "the cast (refattn.hf.float64) and compares the semantics",
    },
    "eager_softmax_float32": {
        "model": "every eager_attention_forward (Llama, Mistral, Mixtral, Qwen2/3, Gemma2/3, Phi-3, "
                 "GPT-NeoX, DeepSeek-V2/V3)", "seen_in": "5.23.0",
        "what": "softmax(..., dtype=torch.float32) rounds the probabilities of a float64 model to float32",
    },
    "rmsnorm_float32": {
        "model": "RMSNorms (Qwen3/Gemma3 q_norm/k_norm, DeepSeek kv_a_layernorm/q_a_layernorm)",
        "seen_in": "5.23.0", "what": "hidden_states.to(torch.float32) before the norm of a float64 model",
    },
    "deepseek_v2_rope_float32": {
        "model": "DeepSeek-V2 apply_rotary_emb", "seen_in": "5.23.0",
        "what": "xq.float() / xk.float(): the rope part of q and k is rotated in float32 (complex64)",
    },
    "rotary_inv_freq_float32": {
        "model": "every *RotaryEmbedding (ROPE_INIT_FUNCTIONS)", "seen_in": "5.23.0",
        "what": "inv_freq is computed in float32 (torch.arange(...).float()): HF's cos/sin tables differ "
                "from float64 ones by {diff} (max abs); check_module passes float64 tables built from "
                "the config (refattn.position.rope_frequencies) as position_embeddings",
    },
    "gemma3_softcap": {
        "model": "Gemma3Attention", "seen_in": "5.23.0",
        "what": "config.attn_logit_softcapping={value} is stored (self.attn_logit_softcapping) but never "
                "passed to the attention function: no softcap is applied; the spec follows the code (no "
                "softcap)",
    },
    "deepseek_latent_eps": {
        "model": "DeepSeek-V2/V3 attention", "seen_in": "5.23.0",
        "what": "kv_a_layernorm and q_a_layernorm are built without eps=config.rms_norm_eps ({value}): "
                "they use RMSNorm's default 1e-6 (as DeepSeek's reference code does); the spec uses 1e-6",
    },
    "sdpa_differs": {
        "model": "sdpa path", "seen_in": "5.23.0",
        "what": "transformers' sdpa attention function on the same captured q, k, v, mask and keywords "
                "differs from this model's eager function by {diff} (normwise){site}",
    },
    "sdpa_refuses": {
        "model": "sdpa path", "seen_in": "5.23.0",
        "what": "transformers' sdpa attention function refuses this layer's keywords: {site}",
    },
    "gpt_oss_sdpa_sinks": {
        "model": "gpt-oss", "seen_in": "5.23.0",
        "what": "the sdpa attention function ignores the sinks (s_aux=module.sinks) that the eager function "
                "adds to the softmax denominator",
    },
    "alibi_slopes_lowp": {
        "model": "{model}", "seen_in": "5.23.0",
        "what": "the ALiBi slopes are built in {dtype}: they differ from float64 slopes by {diff} (max abs); "
                "check_module passes float64 ALiBi to the module",
    },
    "mpt_ignored": {
        "model": "MPT", "seen_in": "5.23.0",
        "what": "config.attn_config.{option}={value} is not implemented by HF's MptAttention/MptModel; the "
                "spec follows the code",
    },
    "bigbird_eval_table": {
        "model": "BigBirdBlockSparseAttention", "seen_in": "5.23.0",
        "what": "in eval mode HF draws no random blocks (an all-zero table: block 0, already global, counted "
                "again); check_module runs the copy in training mode with dropout off to draw them",
    },
    "falcon_alibi_twice": {
        "model": "Falcon (alibi=True), eager path", "seen_in": "5.23.0",
        "what": "{site}",
    },
}

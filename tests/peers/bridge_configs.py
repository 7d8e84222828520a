"""Tiny random configs of every family of the transformers bridge (config.json dicts), with the layers
worth checking (a sliding and a full layer where the model has both). Shared by the bridge's peer
tests and its CLI tests."""

from __future__ import annotations

H = 32  # hidden size
_BASE = dict(hidden_size=H, num_attention_heads=4, num_hidden_layers=4, intermediate_size=16, vocab_size=16,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LONG = [1.0, 1.25, 1.5, 2.0]
_SHORT = [1.0, 1.05, 1.1, 1.2]

#: name -> (config dict, layers to check)
CONFIGS = {
    "llama": (dict(_BASE, model_type="llama", num_key_value_heads=2,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}), (0,)),
    "mistral": (dict(_BASE, model_type="mistral", num_key_value_heads=2, sliding_window=4), (1,)),
    "mixtral": (dict(_BASE, model_type="mixtral", num_key_value_heads=1, sliding_window=5, num_local_experts=2,
                     rope_theta=1e6), (0,)),
    "qwen2": (dict(_BASE, model_type="qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                   max_window_layers=2), (1, 2)),
    "qwen3": (dict(_BASE, model_type="qwen3", num_key_value_heads=2, head_dim=12, use_sliding_window=True,
                   sliding_window=4, max_window_layers=1,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}), (0, 3)),
    "gemma2": (dict(_BASE, model_type="gemma2", num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
                    attn_logit_softcapping=3.0, sliding_window=4), (0, 1)),
    "gemma3": (dict(_BASE, model_type="gemma3_text", num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=10,
                    sliding_window=4, num_hidden_layers=6, rope_local_base_freq=100.0, rope_theta=5000.0,
                    rope_scaling={"rope_type": "linear", "factor": 4.0}), (0, 5)),
    "gpt_oss": (dict(_BASE, model_type="gpt_oss", num_key_value_heads=2, head_dim=8, sliding_window=4,
                     num_local_experts=2,
                     rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "truncate": False, "original_max_position_embeddings": 8}), (0, 1)),
    "phi3": (dict(_BASE, model_type="phi3", num_key_value_heads=2, partial_rotary_factor=0.5,
                  max_position_embeddings=64, original_max_position_embeddings=8, sliding_window=5,
                  rope_scaling={"rope_type": "longrope", "short_factor": _SHORT[:2], "long_factor": _LONG[:2]}),
             (0,)),
    "gpt_neox": (dict(_BASE, model_type="gpt_neox", rotary_pct=0.5, rotary_emb_base=500.0), (0,)),
    "deepseek_v2": (dict(_BASE, model_type="deepseek_v2", num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=10,
                         qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5, n_routed_experts=4,
                         first_k_dense_replace=4, moe_intermediate_size=8, max_position_embeddings=64,
                         rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
                                       "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32,
                                       "beta_slow": 1}), (0,)),
    "deepseek_v3": (dict(_BASE, model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10,
                         qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5, n_routed_experts=4,
                         first_k_dense_replace=4, moe_intermediate_size=8, max_position_embeddings=320,
                         rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 8,
                                       "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}),
                    (0,)),
}

#: the families that compute attention inline (per-model hooks) or, T5, with a position bias
HOOKED = {
    "gptj": (dict(model_type="gptj", n_embd=H, n_head=4, n_layer=2, rotary_dim=4, n_positions=64, vocab_size=16), (1,)),
    "bloom": (dict(model_type="bloom", hidden_size=64, n_head=16, n_layer=2, vocab_size=16), (0,)),
    "falcon_rope_mqa": (dict(model_type="falcon", hidden_size=H, num_attention_heads=4, num_hidden_layers=2,
                             vocab_size=16, multi_query=True, rope_theta=500.0), (1,)),
    "falcon_new_arch": (dict(model_type="falcon", hidden_size=H, num_attention_heads=4, num_kv_heads=2,
                             num_hidden_layers=2, vocab_size=16, new_decoder_architecture=True), (0,)),
    "falcon_alibi": (dict(model_type="falcon", hidden_size=H, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=16, alibi=True, multi_query=False), (0,)),
    "mpt": (dict(model_type="mpt", d_model=36, n_heads=6, n_layers=2, vocab_size=16, max_seq_len=64,
                 attn_config={"clip_qkv": 0.8, "softmax_scale": 0.3}), (1,)),
    "t5_encoder": (dict(model_type="t5", d_model=H, d_kv=8, num_heads=4, num_layers=2, d_ff=16, vocab_size=16,
                        relative_attention_num_buckets=8, relative_attention_max_distance=6), (1,)),
    "t5_decoder": (dict(model_type="t5", d_model=H, d_kv=8, num_heads=4, num_layers=2, d_ff=16, vocab_size=16,
                        is_decoder=True, relative_attention_num_buckets=8, relative_attention_max_distance=6),
                   (0,)),
}

#: the sparse families: (config, layer, sequence length) -- Longformer needs S a multiple of its window,
#: BigBird S a multiple of block_size above (5 + 2r) * block_size; neither takes padding here
SPARSE = {
    "longformer": (dict(model_type="longformer", hidden_size=16, num_attention_heads=2, num_hidden_layers=2,
                        attention_window=[4, 8], intermediate_size=8, vocab_size=16), 1, 16),
    "big_bird": (dict(model_type="big_bird", hidden_size=16, num_attention_heads=2, num_hidden_layers=2,
                      block_size=2, num_random_blocks=1, intermediate_size=8, vocab_size=16,
                      attention_type="block_sparse"), 0, 16),
}

#: (family name, layer) pairs of the attention-interface families
CASES = [(name, layer) for name, (_, layers) in CONFIGS.items() for layer in layers]
HOOKED_CASES = [(name, layer) for name, (_, layers) in HOOKED.items() for layer in layers]
ALL = {**CONFIGS, **HOOKED, **{n: (c, (layer,)) for n, (c, layer, _) in SPARSE.items()}}
ALL_CASES = CASES + HOOKED_CASES + [(n, layer) for n, (_, layer, _) in SPARSE.items()]

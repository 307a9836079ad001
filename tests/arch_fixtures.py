"""Small configs of each decoder family (the real architectures at reduced width and depth), written by hand:
for the analytic-vs-trace tests and the tiny-model training tests."""

from __future__ import annotations

BASE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            intermediate_size=1536, vocab_size=8000, max_position_embeddings=8192, tie_word_embeddings=False)

SMALL_CONFIGS = {
    "llama": BASE | dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    "qwen3": BASE | dict(model_type="qwen3", tie_word_embeddings=True),
    "qwen3_moe": BASE | dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=384,
                             norm_topk_prob=True),
    "mixtral": BASE | dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=768),
    "gemma2": BASE | dict(model_type="gemma2", tie_word_embeddings=True, sliding_window=512, attn_logit_softcapping=50.0,
                          final_logit_softcapping=30.0, query_pre_attn_scalar=64, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": BASE | dict(model_type="gemma3_text", num_hidden_layers=4, tie_word_embeddings=True, sliding_window=512,
                               sliding_window_pattern=2, query_pre_attn_scalar=64, rope_local_base_freq=10000.0),
    "phi3": {k: v for k, v in BASE.items() if k != "head_dim"} | dict(model_type="phi3", sliding_window=None, pad_token_id=0,
                                                                      bos_token_id=1, eos_token_id=2),
    "mistral": BASE | dict(model_type="mistral", sliding_window=None),
    "smollm3": BASE | dict(model_type="smollm3", no_rope_layer_interval=2, tie_word_embeddings=True, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2),
}

"""The tiny Llama configuration used by the built-in world (a few million parameters, CPU-trainable)."""

from __future__ import annotations

from transformers import LlamaConfig


def tiny_llama_config(vocab_size: int, hidden: int = 192, layers: int = 4, heads: int = 4,
                      intermediate: int = 512, max_positions: int = 256, bos: int = 1, eos: int = 2,
                      pad: int = 0) -> LlamaConfig:
    """A LlamaForCausalLM config with untied embeddings (the Fisher engine treats ``lm_head`` as its own
    parameter) and eager attention (deterministic on CPU, no backend-dependent kernels)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                       max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, attn_implementation="eager")

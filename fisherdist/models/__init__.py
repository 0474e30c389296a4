"""Model helpers: loading local Hugging Face causal LMs, the tiny Llama factory, PEFT utilities."""

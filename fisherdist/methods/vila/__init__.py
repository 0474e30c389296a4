"""VILA and FILA: Fisher-guided LoRA unlearning (importance, Fisher-weighted initialisation, training)."""

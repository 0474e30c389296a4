"""The tiny world: a deterministic tokenizer, a few-million-parameter Llama and the data that give it a
measurable behaviour for every method (memorised books, author facts, refusals, a task, general text).

``fisherdist world build --out DIR`` reproduces the copy shipped in ``fisherdist/world/default``."""

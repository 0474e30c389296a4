"""LQ-LoRA (arXiv 2311.12023): W ~ Q + L1 L2 with Q NF-b quantized, configurations chosen by an ILP under a
bits-per-parameter budget. This package holds the decomposition, cost table, allocator and their commands;
the quantizer itself is general and lives in :mod:`fisherdist.models.quant`."""

"""A tiny Hugging Face model directory (Llama + word-level tokenizer) and a JSONL file, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.fisher_oracle import tiny_llama

WORDS = "the cat sat on a mat and dog ran to hill under sun moon star sky sea fish bird tree leaf".split()


def texts(n: int = 12) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + (i % 6))) for i in range(n)]


def build_model_dir(root: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = tiny_llama(seed).to(torch.float32)
    out = root / "model"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: r}) + "\n" for r in rows))
    return path

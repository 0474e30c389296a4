"""Fine-tune with ``transformers.Trainer`` and get the sharded Fisher of the run for free.

    python examples/hf_trainer_fisher.py --model @world/model --data @world/data/general_heldout.jsonl --out runs/hf
    torchrun --nproc_per_node 2 examples/hf_trainer_fisher.py --deepspeed zero2 ...
    accelerate launch --num_processes 2 examples/hf_trainer_fisher.py ...
    fisherdist export runs/hf/fisher_out --out runs/hf/fisher.safetensors

``--data`` is any fisherdist data reference (JSONL, Parquet, a ``save_to_disk`` directory, a dataset id,
``?split=...&text=COLUMN``). ``--lr 0`` measures the Fisher of the model as loaded.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from fisherdist.config import resolve_path
from fisherdist.data.jsonl import read_records
from fisherdist.fisher.spec import FisherSpec
from fisherdist.integrations.hf import FisherCallback


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="@world/model")
    p.add_argument("--data", default="@world/data/general_heldout.jsonl")
    p.add_argument("--out", default="runs/hf_trainer")
    p.add_argument("--params", nargs="+", default=["*mlp*"], help="fnmatch patterns of the Fisher's targets")
    p.add_argument("--deepspeed", choices=["zero1", "zero2", "zero3"], default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    return p.parse_args()


class Records(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """One tokenized record per sample, labels = input ids (the Trainer's collator pads them with -100)."""

    def __init__(self, ref: str, tokenizer: Any, max_length: int = 128) -> None:
        texts = [r["text"] for r in read_records(ref, ["text"])]
        self.rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.rows[i], "labels": list(self.rows[i])}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    a = _args()
    model_dir = str(resolve_path(a.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ds = None if a.deepspeed is None else {
        "zero_optimization": {"stage": int(a.deepspeed[-1])}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=a.lr, max_steps=a.steps, save_steps=10, logging_steps=5,
                             report_to=[], deepspeed=ds, use_cpu=not torch.cuda.is_available())
    if a.deepspeed == "zero3" and not torch.cuda.is_available():
        # with use_cpu accelerate starts DeepSpeed's comm layer only in deepspeed.initialize, but from_pretrained
        # partitions the model while loading (zero.Init) and needs the world size now
        import deepspeed

        deepspeed.comm.init_distributed(dist_backend="gloo")
    callback = FisherCallback(spec=FisherSpec(params=a.params), save_dir=f"{a.out}/fisher_out")
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                      train_dataset=Records(a.data, tokenizer),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100), callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if a.resume else None)


if __name__ == "__main__":
    main()

"""Sequence packing for ``fisherdist pretrain`` (fisherdist.data.packing): every token of every document
lands exactly once, in order, on 1 and 2 ranks; a resume mid-epoch sees the same sequences as an
uninterrupted run; the first packed step's loss equals a float64 NLL computed here position by position;
a preempted packed run resumes to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisherdist.config import default_world_dir
from fisherdist.data.packing import pack_documents
from fisherdist.recipes.losses import collate_prompted
from fisherdist.recipes.trainer import DataPlan

REPO = Path(__file__).resolve().parent.parent
EOS, PAD = 0, -7


def ragged_docs() -> list[list[int]]:
    """Documents of ragged lengths (one empty) with distinct token ids, so any loss or repeat shows."""
    lengths, start, docs = [5, 1, 13, 0, 7, 9, 3], 1, []
    for n in lengths:
        docs.append(list(range(start, start + n)))
        start += n
    return docs


def rows_seen(plan: DataPlan, chunks: list[list[int]], world: int, start: int = 0) -> list[list[list[int]]]:
    """Per step, the token rows all ranks feed the model (rank order), as the SFT objective collates them."""
    steps: list[list[list[int]]] = []
    for rank in range(world):
        for k, batch in enumerate(plan.steps(start, rank, world)):
            real = [chunks[i] for i in batch.mine if i >= 0]
            rows = []
            if real:
                tb = collate_prompted([[]] * len(real), real, PAD, len(chunks[0]))
                rows = [ids[mask.bool()].tolist() for ids, mask in zip(tb.input_ids, tb.attention_mask)]
                assert tb.labels[tb.attention_mask.bool()].tolist() == sum(rows, [])  # every token scored
            if rank == 0:
                steps.append([])
            steps[k].extend(rows)
    return steps


def test_every_token_once_in_order_on_1_and_2_ranks_and_resume() -> None:
    docs, length = ragged_docs(), 4
    chunks = pack_documents(docs, length, EOS)
    stream = [t for d in docs for t in d + [EOS]]
    assert sum(chunks, []) == stream  # in order, nothing dropped or repeated
    assert all(len(c) == length for c in chunks[:-1]) and 0 < len(chunks[-1]) <= length  # no padding but the last
    assert pack_documents(docs, length, EOS) == chunks  # deterministic
    plan = DataPlan(len(chunks), global_batch=4, epochs=2, seed=3)  # 12 sequences: 3 steps an epoch
    one, two = rows_seen(plan, chunks, 1), rows_seen(plan, chunks, 2)
    assert one == two  # the same sequences per step on 1 and 2 ranks
    per_epoch = plan.steps_per_epoch
    for epoch in range(2):
        seen = sum(one[epoch * per_epoch:(epoch + 1) * per_epoch], [])
        assert sorted(seen) == sorted(chunks)  # every sequence (so every token) exactly once an epoch
    resumed = rows_seen(plan, chunks, 2, start=per_epoch + 1)  # mid second epoch, on the other world size
    assert resumed == one[per_epoch + 1:]


def test_pack_is_default_only_for_pretrain_and_needs_plain_text() -> None:
    from fisherdist.config import load_config
    from fisherdist.errors import ConfigError
    from fisherdist.methods.sft import PretrainConfig, PretrainData, SftConfig, SftData

    train = str(default_world_dir() / "data" / "general_train.jsonl")
    assert PretrainData(train=train).pack and not SftData(train=train).pack  # the defaults
    assert load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny.yaml").data.pack
    assert not load_config(SftConfig, REPO / "configs" / "finetune" / "tiny.yaml").data.pack
    with pytest.raises(ConfigError, match="data.pack: true packs plain text"):
        load_config(SftConfig, REPO / "configs" / "finetune" / "tiny.yaml", ["data.pack=true"])


def _packed_run(ckpt: Path, stop_at: int = -1) -> tuple[list[dict], dict[str, torch.Tensor], list]:
    """run_sft on the first world document packed into 16-token sequences (17 of them: the last step is
    uneven: 8 + 8 + 1), float64, batch 8."""
    from transformers import AutoTokenizer

    from fisherdist.methods.sft import PretrainData, SftTrain, load_training_records, run_sft
    from fisherdist.models.sharded_load import load_wrapped
    from fisherdist.recipes.optimizers import OptimizerSettings, optimizer_factory
    from tests.test_trainer import StopAt

    path = default_world_dir() / "model"
    tok = AutoTokenizer.from_pretrained(path)
    data = PretrainData(train=str(default_world_dir() / "data" / "general_train.jsonl"), num_samples=1)
    records = load_training_records(data, tok, 16)
    t = SftTrain(batch_size=8, max_length=16, checkpoint_every=None, checkpoint_minutes=None)
    held: dict[str, torch.nn.Module] = {}
    opt = optimizer_factory(OptimizerSettings(), t.lr, 0.0, lambda: held["model"])
    w = load_wrapped(path, torch.float64, "none", "cpu", prepare=lambda m: held.setdefault("model", m), optimizer_factory=opt)
    history = run_sft(w, records, t, int(tok.pad_token_id), checkpoint_dir=ckpt, hooks=[StopAt(stop_at)], progress=False)
    return history, {n: p.detach().clone() for n, p in held["model"].named_parameters()}, records


def _oracle(seqs: list[list[int]]) -> float:
    """Token-mean NLL of each packed sequence's next tokens under the world model, float64, position by position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_world_dir() / "model", dtype=torch.float64)
    total, count = 0.0, 0
    for ids in seqs:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        count += len(ids) - 1
    return total / count


def test_packed_first_loss_matches_oracle_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fisherdist.data.jsonl import read_records
    from fisherdist.recipes.trainer import TrainingPreempted

    ref_log, ref_weights, records = _packed_run(tmp_path / "ref")
    tok = AutoTokenizer.from_pretrained(default_world_dir() / "model")
    text = read_records(default_world_dir() / "data" / "general_train.jsonl", ["text"])[0]["text"]
    stream = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert [c for _, c in records] == [stream[i:i + 16] for i in range(0, len(stream), 16)]
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    assert ref_log[0]["nll"] == pytest.approx(_oracle([records[i][1] for i in order[:8]]), rel=1e-9)
    with pytest.raises(TrainingPreempted):
        _packed_run(tmp_path / "ckpt", stop_at=1)
    log, weights, _ = _packed_run(tmp_path / "ckpt")
    assert [r["records"] for r in log] == [r["records"] for r in ref_log]
    assert [r["nll"] for r in log] == pytest.approx([r["nll"] for r in ref_log], rel=1e-10)
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=1e-10, atol=1e-12, msg=name)

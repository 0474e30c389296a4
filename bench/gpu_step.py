"""Step time and peak memory of a 7B-architecture Llama (random bf16 weights) with vs without Fisher.

    python bench/gpu_step.py --out bench/results/gpu_step.json          # on one GPU (bench/gpu.sh)
    python bench/gpu_step.py --tiny --device cpu --out /tmp/gpu_step.json   # the same code path, tiny, on CPU

Plain steps and accumulating steps alternate on one model; each granularity gets its own accumulator
(fp32 statistics for the targeted weights). Reports median step times, ratios and peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(tiny: bool, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    else:  # Llama-2-7B architecture
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                          tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/gpu_step.json")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--params", default="model.layers.*.self_attn.*_proj.weight,model.layers.*.mlp.*_proj.weight")
    args = p.parse_args()
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher import FisherAccumulator, FisherSpec, per_sample_nll

    model = build(args.tiny, args.device)
    w = wrap_model(model, "none", lambda ps: torch.optim.SGD(ps, lr=1e-6))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)

    def step(acc: FisherAccumulator | None) -> float:
        sync(args.device)
        t0 = time.perf_counter()
        nll = per_sample_nll(w.module(input_ids=ids).logits, ids)
        if acc is None:
            w.backward(nll.mean())
        else:
            with acc.record(ids, loss_scale=1.0 / len(nll)):
                w.backward(nll.mean())
            acc.step()
        w.step()
        sync(args.device)
        return time.perf_counter() - t0

    cuda = args.device.startswith("cuda")
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else args.device,
                                  "batch_size": args.batch, "seq_len": args.seq,
                                  "params": sum(p.numel() for p in model.parameters())}
    step(None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    plain = [step(None) for _ in range(args.steps)]
    results["plain"] = {"median_s": statistics.median(plain),
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    for gran in ("batch", "microbatch", "sample"):
        try:
            acc = FisherAccumulator(w, FisherSpec(granularity=gran, params=args.params.split(",")))
            step(acc)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = [step(acc) for _ in range(args.steps)]
            results[gran] = {"median_s": statistics.median(times),
                             "ratio": statistics.median(times) / results["plain"]["median_s"],  # type: ignore[index]
                             "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                             "fisher_elements": acc.placement.total_numel()}
            acc.close()
            del acc
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for one granularity: report, continue
            results[gran] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if cuda:
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

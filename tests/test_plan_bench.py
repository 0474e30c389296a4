"""``bench/gpu.sh --smoke``: the GPU benchmark's every section runs on CPU, so the script cannot rot
between the rare runs on a GPU; its JSON and table carry each section's step times and the planner's
prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_step.json").read_text())
    engine, suv = doc["engine"], doc["suv"]
    for case in ("plain", "batch", "microbatch", "sample"):
        assert engine[case]["median_s"] > 0 and engine[case]["planned_gib"] > 0, case
    # the planner's prediction grows with what each granularity keeps in flight
    assert engine["plain"]["planned_gib"] < engine["batch"]["planned_gib"] < engine["sample"]["planned_gib"]
    assert suv["lora"]["median_s"] > 0 and suv["lora_suv"]["ratio"] > 0 and suv["lora_suv"]["planned_gib"] > 0
    ngalore = doc["ngalore"]
    for name in ("adamw", "galore", "natural_galore"):
        assert ngalore[name]["median_s"] > 0 and ngalore[name]["refresh_s"] > 0, name
    # the optimizer state by part, as the optimizers report it: GaLore keeps projectors, Natural GaLore a window
    assert ngalore["galore"]["state_bytes"]["projectors"] > 0 and ngalore["galore"]["state_bytes"]["history"] == 0
    assert ngalore["natural_galore"]["state_bytes"]["history"] > 0
    assert ngalore["galore"]["state_bytes"]["moments"] < ngalore["adamw"]["state_bytes"]["moments"]
    assert ngalore["natural_galore"]["planned_gib"] > 0
    lq = doc["lqlora"]["decompose"]
    assert 0 < lq["rel_frobenius_lq_nf3"] < 1 and 0 < lq["rel_frobenius_nf4"] < 1 and lq["iterations"] >= 1
    vila, agl = doc["vila"], doc["agl"]
    for method in ("vila", "fila"):
        assert vila[method]["median_s"] > 0 and vila[method]["planned_gib"] > 0, method
    # VILA's statistics live on the LoRA factors, FILA's on the whole base weights
    assert 0 < vila["vila"]["statistics_bytes"] < vila["fila"]["statistics_bytes"]
    assert agl["penalty"]["median_s"] > 0 and agl["penalty"]["modules"] > 0
    table = (tmp_path / "gpu_step.md").read_text()
    assert "| engine | sample |" in table and "| suv | lora_suv |" in table and "| ngalore | natural_galore |" in table
    assert "| lqlora | decompose |" in table and "| vila | fila |" in table and "| agl | penalty |" in table

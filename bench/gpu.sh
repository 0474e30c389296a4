#!/usr/bin/env bash
# One short GPU check (device tool, ~5 minutes): 7B-architecture Llama, random bf16 weights, one GPU.
# Step time with and without Fisher accumulation (batch / microbatch / sample granularity) and peak memory.
#   bash bench/gpu.sh            # writes $OUT/gpu_step.json (or bench/results/gpu_step.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
export PYTHONUNBUFFERED=1
timeout 480 python3 bench/gpu_step.py --out "$out/gpu_step.json" --batch 4 --seq 256 --steps 5 2>&1 | tee "$out/gpu_step.log"

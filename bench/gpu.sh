#!/usr/bin/env bash
# The GPU benchmark, one section per process under its own timeout (under 5 minutes on one H100/H200):
#   engine  Llama-2-7B shape, random bf16 weights: plain step vs Fisher accumulation per granularity
#   suv     LoRA r=8 (q,k,v,o) AdamW step without / with SUV's differential-Fisher log barrier
#   ngalore Llama-3.2-1B shape: AdamW vs GaLore vs Natural GaLore training step (normal and refresh step)
#   lqlora  LQ decomposition of one 4096 x 4096 matrix (nf3, rank 64)
#   vila    Llama-3.2-1B shape, LoRA r=8: VILA's importance pass vs FILA's (forget + retain micro-batch)
#   agl     AlignGuard-LoRA's penalties over the 7B shape's 128 q,k,v,o modules (forward + backward)
# each with its peak memory next to `fisherdist plan`'s prediction. The JSON is rewritten after every
# section, so a cut run still reports what finished.
#   bash bench/gpu.sh            # writes $OUT/gpu_step.json (or bench/results/gpu_step.json) and prints a table
#   bash bench/gpu.sh --smoke    # the same sections on the tiny world model on CPU, one process (tests/test_plan_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
json="$out/gpu_step.json"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--smoke" ]]; then  # every section in one CPU process (one interpreter start, not seven)
    rm -f "$json"
    status=0
    timeout 600 "$python" bench/gpu_step.py --section engine,suv,ngalore,lqlora,vila,agl --table --out "$json" --smoke \
        2>&1 | tee "$out/gpu_step_smoke.log" || status=$?
    sed -n '/^| section |/,$p' "$out/gpu_step_smoke.log" > "$out/gpu_step.md"
    exit "$status"
else
    limits=(engine=90 suv=60 ngalore=50 lqlora=30 vila=40 agl=25)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
        | tee -a "$out/gpu.txt"
fi
rm -f "$json"
status=0
for entry in "${limits[@]}"; do
    section="${entry%%=*}"
    timeout "${entry#*=}" "$python" bench/gpu_step.py --section "$section" --out "$json" \
        2>&1 | tee "$out/gpu_step_$section.log" || { echo "section $section failed or timed out" >&2; status=1; }
done
"$python" bench/gpu_step.py --table --out "$json" | tee "$out/gpu_step.md"
exit "$status"

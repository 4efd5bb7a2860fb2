#!/usr/bin/env bash
# Issue 10's GPU checks and benchmarks in one run on the lent H200 (device tool), budgeted to stay under
# 8 minutes so that one rerun fits in the 15 minutes of device time. Results land in $OUT (the device
# tool fetches it) and bench/results/.
#
#   run: bash bench/device_check.sh        (carry the quart/hypercorn/kopf wheels if the HTTP part is added)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

log "Triton attention kernels (decode and prefill), compiled, against torch on cuda (the CPU test runs it interpreted)"
FLEETLM_CHECK_DEVICE=cuda timeout 120 python tests/triton_attention_check.py 2>&1 | tee "$OUT/triton_check.txt"

log "engine benchmark: Llama-3.1-8B shape, bf16, random weights, against transformers generate"
timeout 420 python -m bench.gpu_bench --config bench/configs/llama-3.1-8b --device cuda --dtype bfloat16 \
  --out "$OUT/gpu_bench.json" 2>&1 | grep -v '^{"ts' | tee "$OUT/gpu_bench.txt"
cp "$OUT/gpu_bench.json" bench/results/gpu_bench.json 2>/dev/null || true
log "done"

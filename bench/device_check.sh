#!/usr/bin/env bash
# Issue 10's GPU checks and benchmarks in one run on the lent H200 (device tool), budgeted to stay under
# 8 minutes (FLEETLM_DEVICE_BUDGET_S, default 480) so that one rerun fits in the 15 minutes of device
# time: each check has a cap, and the benchmarks get what the checks left (gpu_bench first; it writes
# its JSON after every phase, so a cut run keeps its figures). Results land in $OUT (the device tool
# fetches it) and bench/results/.
#
#   here:   bash bench/device_wheels.sh                 (the wheels the device image lacks)
#           bash bench/device_preflight.sh              (optional: what runs on CPU, under the image's versions)
#   device: run(command="FLEETLM_COMMIT=<git rev-parse --short HEAD, here> bash bench/device_check.sh",
#               carry=[".device-wheels"], kind="nvidia-h200", timeout_s=540)
#           (the commit: the tree travels without .git, and every JSON names the commit it measured)
#           (name the kind: a plain first call gets an H100, whose ~3.0 TB/s cannot meet the single-stream
#           target, set for the H200's 4.3 TB/s)
#
# Order: what must hold before any figure means anything (kernels compiled against torch, greedy parity
# with transformers on cuda in fp32 and bf16, CUDA graphs included: some 3 minutes, two lanes at once),
# then the figures (gpu_bench gets what is left but a minute, quant_gpu_bench that minute).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT" bench/results
# One log of everything (the device tool brings back at most 8 files from $OUT: this log and the JSONs).
exec > >(tee -a "$OUT/device_check.log") 2>&1
log() { echo "== $(date +%T) [${SECONDS}s] $*"; }
DEADLINE=${FLEETLM_DEVICE_BUDGET_S:-480}
cap() {  # cap SECONDS [RESERVE]: SECONDS, or less when the deadline (less RESERVE for what follows) is nearer
  local left=$((DEADLINE - SECONDS - ${2:-0}))
  ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"
}
keep() { cp "$OUT/$1" "bench/results/$1" 2>/dev/null || true; }  # keep NAME: a result, beside the others here too
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FLEETLM_COMMIT="${FLEETLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
export FLEETLM_COMMIT
[ -n "$FLEETLM_COMMIT" ] || echo "warning: no .git here and FLEETLM_COMMIT unset: the results will name commit 'unknown'"

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -d .device-wheels ]; then  # what the image lacks (one resolution: it goes before the image's own site-packages)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device-wheels/*.whl 2>&1 | tail -3
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, triton, quart, hypercorn; print('torch', torch.__version__, 'triton', triton.__version__)"

# The checks, in two lanes at once: what they spend is mostly compiling Triton kernels, on the CPU (16 cores
# there), not GPU time. Only lane 1's engines size a KV cache from free GPU memory (the oracle's, one at a
# time); lane 2's kernels and tiny models take a few MB beside them. Each lane's output is kept apart and
# printed whole once both are done.
LANES=$(mktemp -d)
(
  # Greedy parity with transformers on tiny models of each architecture, mixed staggered batches, chunked
  # prefill, preemption, prefix caching and the CUDA graphs' padded buckets, on cuda; then that a step
  # waits for the GPU once, for its sampled ids (tests/test_cuda_host_sync.py).
  ORACLE="single_request or mixed_staggered or preemption or static_padded or order_asked or prefix_cache or waits_for_the_gpu_once"
  for dtype in float32 bfloat16; do
    log "engine oracle on cuda, $dtype"
    FLEETLM_TEST_DEVICE=cuda FLEETLM_TEST_DTYPE=$dtype timeout "$(cap 85)" python3 -m pytest -q -p no:cacheprovider -x \
      tests/test_engine_oracle.py tests/test_cuda_host_sync.py -k "$ORACLE" 2>&1 | tail -15
  done
) >"$LANES/oracle.log" 2>&1 &
ORACLE_LANE=$!
(
  log "Triton attention kernels (decode and prefill), compiled, against torch on cuda"
  FLEETLM_CHECK_DEVICE=cuda timeout "$(cap 90)" python3 tests/triton_attention_check.py 2>&1 | tail -5
  log "Triton fused RMS norm, rotary and silu * up, compiled, against the torch path on cuda"
  FLEETLM_CHECK_DEVICE=cuda timeout "$(cap 30)" python3 tests/triton_ops_check.py 2>&1 | tail -5
  log "Triton quantized matmuls (q8_0, q4_0, q4_1), compiled, against dequantize + matmul on cuda"
  FLEETLM_CHECK_DEVICE=cuda timeout "$(cap 50)" python3 tests/triton_quant_check.py 2>&1 | tail -5
) >"$LANES/kernels.log" 2>&1 &
wait "$ORACLE_LANE" $!  # the lanes only: a bare wait would also wait for the log's tee, which never ends
cat "$LANES/kernels.log" "$LANES/oracle.log"

log "decode attention: split-K against one part per sequence and the torch path (8B attention shape)"
timeout "$(cap 30)" python3 -m bench.decode_attention_bench --out "$OUT/decode_attention_bench.json" 2>&1 | tail -16
keep decode_attention_bench.json

log "engine benchmark: Llama-3.1-8B shape, bf16, random weights, transformers generate and HTTP at c64"
timeout "$(cap 360 60)" python3 -m bench.gpu_bench --config bench/configs/llama-3.1-8b --device cuda --dtype bfloat16 \
  --out "$OUT/gpu_bench.json" 2>&1 | grep -v '^{"ts' | tail -40
keep gpu_bench.json

log "quantized weights (q8_0, q4_0) against bf16: memory, decode speed, greedy agreement on the demo model"
timeout "$(cap 90)" python3 -m bench.quant_gpu_bench --config bench/configs/llama-3.1-8b --device cuda --dtype bfloat16 \
  --out "$OUT/quant_gpu_bench.json" 2>&1 | grep -v '^{"ts' | tail -20
keep quant_gpu_bench.json

log "the README's GPU table, from the JSONs above (here: python -m bench.gpu_table --readme README.md)"
python3 -m bench.gpu_table --results "$OUT/gpu_bench.json" --quant-results "$OUT/quant_gpu_bench.json" 2>&1 | tail -30

log "done"
# Let the log's tee write its last lines before the command ends (the device tool then takes $OUT).
exec 1>&- 2>&-
sleep 1

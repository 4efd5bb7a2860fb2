#!/usr/bin/env bash
# Here, before spending device time: runs what bench/device_check.sh runs that a CPU can run (greedy
# parity with transformers, random-weight loading, gpu_bench and quant_gpu_bench end to end on tiny
# shapes, HTTP phase included) under the device image's versions of the libraries that differ from
# this machine's (.library/device/KINDS.md: transformers 5.17, huggingface_hub 1.33, ...), installed
# apart in --target so this machine's own stay as they are. torch and Python stay this machine's.
#
#   bash bench/device_preflight.sh [DIR]        (DIR: where the versions go, default /tmp/fleetlm-devsite)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="${1:-/tmp/fleetlm-devsite}"
# The image's versions (KINDS.md's pip list): those this project's code meets at import and load.
DEVICE_PINS=(transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0 accelerate==1.15.0
             triton==3.6.0)  # fmt: skip
if [ ! -f "$SITE/.pins" ] || [ "$(cat "$SITE/.pins")" != "${DEVICE_PINS[*]}" ]; then
  rm -rf "$SITE" && mkdir -p "$SITE/.wheels"
  python3 -m pip download -q --no-deps -d "$SITE/.wheels" "${DEVICE_PINS[@]}"
  python3 -m pip install -q --no-deps --no-compile --target "$SITE" "$SITE"/.wheels/*.whl
  echo "${DEVICE_PINS[*]}" >"$SITE/.pins"
fi
PYTHONPATH="$SITE" python3 -c 'import transformers, huggingface_hub, tokenizers, triton
print("preflight with transformers", transformers.__version__, "huggingface_hub", huggingface_hub.__version__,
      "tokenizers", tokenizers.__version__, "triton", triton.__version__)'
# Not the Triton interpreter's tests (tests/test_triton_*.py): 3.6's interpreter fails with numpy >= 2.4,
# which the device's compiled path never meets. Their compile tests do run: every kernel built to sm_90
# PTX by the device's Triton, so a kernel that only a newer Triton compiles shows up here.
PYTHONPATH="$SITE" python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_triton_ops.py \
  tests/test_triton_quant.py -k compile
PYTHONPATH="$SITE" python3 -m pytest -q -p no:cacheprovider tests/test_engine_oracle.py tests/test_dummy_load.py \
  tests/test_gpu_bench.py tests/test_quant_gpu_bench.py tests/test_cuda_host_sync.py

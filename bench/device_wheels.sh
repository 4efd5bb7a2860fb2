#!/usr/bin/env bash
# Downloads, here (where PyPI is reachable), the wheels that the lent GPU machine's image lacks and that
# bench/gpu_bench.py and its server need: nothing can be fetched there. The image is assumed to hold
# torch, triton and transformers (at the versions below) with everything they depend on, and nothing
# else; what the server imports at start and the load generator needs (pyproject's dependencies, less
# those only the operator, GGUF through transformers or constrained decoding load) is resolved for the
# device's Python and platform, and what that assumed set already provides is left out.
#
#   bash bench/device_wheels.sh [--python-version 3.12] [--platform manylinux_2_28_x86_64 ...]
#                               [--dest .device-wheels] [--python PYTHON]
#
# --python runs the resolver (default: pythonX.Y for --python-version, else python3): pip evaluates
# environment markers (python_version < "3.13" ...) for the interpreter it runs under, so one of the
# device's version resolves exactly. On the device, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .device-wheels/*.whl; export PYTHONPATH=/tmp/site
# (the project itself needs no install: `python -m bench.gpu_bench` and the `python -m serving` it
# starts import from the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=3.12          # the image's python3 is 3.12.3 (.library/device/KINDS.md)
PLATFORMS=()
DEST=.device-wheels
PYTHON=
MAX_MIB=50               # the device tool carries at most 64 MiB with the working tree
# What the server and the benchmark import that the image may lack (pyproject's [project]
# dependencies and the bench's openai/httpx); xgrammar, accelerate, kopf and kubernetes load only
# for constrained decoding, GGUF through transformers and the operator.
NEEDED=(pydantic gguf quart quart-schema hypercorn prometheus-client jinja2 openai httpx)
DEVICE_HAS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0)

while (($#)); do
  case "$1" in
    --python-version) PY_VERSION="$2"; shift 2 ;;
    --platform) PLATFORMS+=("$2"); shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
((${#PLATFORMS[@]})) || PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
if [[ -z "$PYTHON" ]]; then
  if "python$PY_VERSION" -c '' 2>/dev/null; then PYTHON="python$PY_VERSION"; else PYTHON=python3; fi
fi
running=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$running" == "$PY_VERSION" ]] || echo "warning: resolving with Python $running for $PY_VERSION: markers are evaluated for $running" >&2

target=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp)
for p in "${PLATFORMS[@]}"; do target+=(--platform "$p"); done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
resolve() {  # resolve REPORT REQUIREMENT...: pip's resolution for the target, metadata only (nothing installed)
  local report="$1"; shift
  "$PYTHON" -m pip install -q --dry-run --ignore-installed --target "$work/t" "${target[@]}" --report "$report" "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
names() {  # names REPORT: "name==version" per package pip would install
  "$PYTHON" -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"].lower().replace("_", "-") + "==" + item["metadata"]["version"])' "$1"
}

# 1. What the image has: torch, triton, transformers and what they require directly (CUDA's own
# packages aside, large and surely there). Their dependencies' dependencies are carried all the same:
# today's resolution may need ones that the image's older versions did not (pydantic, through typer).
resolve "$work/device-top.json" --no-deps "${DEVICE_HAS[@]}"
mapfile -t device_reqs < <("$PYTHON" -c 'import json, sys
from pip._vendor.packaging.requirements import Requirement
for item in json.load(open(sys.argv[1]))["install"]:
    for spec in item["metadata"].get("requires_dist", []):
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if not req.name.lower().startswith(("nvidia-", "cuda-", "torch", "triton")):
            print(spec.split(";")[0].strip())' "$work/device-top.json")
resolve "$work/device.json" "${device_reqs[@]}"
{ names "$work/device.json"; printf '%s\n' "${DEVICE_HAS[@]}"; } | sort -u >"$work/device.txt"  # pins, for step 2
{ printf '%s\n' "${DEVICE_HAS[@]%%==*}"
  printf '%s\n' "${device_reqs[@]}" | sed -E 's/[ <>=!~;\[(].*//' | tr 'A-Z_' 'a-z-'; } | sort -u >"$work/device-names.txt"

# 2. What we need, resolved against those versions; then what the image lacks of it.
resolve "$work/needed.json" "${NEEDED[@]}" -c "$work/device.txt"
names "$work/needed.json" | sort -u >"$work/needed-all.txt"
mapfile -t carry < <(awk -F'==' 'NR == FNR { have[$1] = 1; next } !($1 in have)' "$work/device-names.txt" "$work/needed-all.txt")

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps "${target[@]}" -d "$DEST" "${carry[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
printf '%s\n' "${NEEDED[@]}" >"$DEST/needed.txt"
cp "$work/device-names.txt" "$DEST/assumed-on-device.txt"

count=$(find "$DEST" -name '*.whl' | wc -l)
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$count wheels, $((bytes / 1024 / 1024)) MiB ($bytes bytes) in $DEST for Python $PY_VERSION on ${PLATFORMS[0]}:"
printf '  %s\n' "${carry[@]}"
echo "left out, assumed on the device: $(tr '\n' ' ' <"$work/device-names.txt")"
if ((bytes > MAX_MIB * 1024 * 1024)); then
  echo "error: over $MAX_MIB MiB: the device tool carries 64 MiB with the working tree" >&2
  exit 1
fi

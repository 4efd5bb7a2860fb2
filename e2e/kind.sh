#!/usr/bin/env bash
# End to end on kind: a cluster, the two images, the chart, the CPU demo served and answering, then the
# e2e tests. Needs docker, kind, kubectl and helm. Run from anywhere; CLUSTER=name to reuse a cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-fleetlm-e2e}
VERSION=$(python3 -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
# kind's nodes have no GPU: the serving image built here is the CPU one (torch from PyTorch's CPU index,
# no CUDA libraries), under the tag the chart gives CPU pods, and the chart is told so explicitly.
SERVING_IMAGE=ghcr.io/fleetlm/fleetlm:$VERSION-cpu
OPERATOR_IMAGE=ghcr.io/fleetlm/fleetlm-operator:$VERSION

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER"

docker build -f images/operator/Dockerfile -t "$OPERATOR_IMAGE" .
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE"
if [ -f images/serving/Dockerfile ]; then
  docker build -f images/serving/Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    -t "$SERVING_IMAGE" .
  kind load docker-image --name "$CLUSTER" "$SERVING_IMAGE"
  export FLEETLM_E2E_SERVE=1 FLEETLM_E2E_IMAGE="$SERVING_IMAGE" FLEETLM_E2E_CPU_IMAGE="$SERVING_IMAGE"
fi

helm upgrade --install fleetlm-operator charts/fleetlm-operator \
  --namespace fleetlm-system --create-namespace \
  --set image.pullPolicy=Never --set requireGpuNodes=false \
  --set servingImage="$SERVING_IMAGE" --set servingCpuImage="$SERVING_IMAGE" --wait --timeout 5m
kubectl -n fleetlm-system rollout status deployment/fleetlm-operator

if [ "${FLEETLM_E2E_SERVE:-0}" = 1 ]; then
  kubectl apply -f examples/cpu-demo.yaml
  kubectl wait --for=condition=Ready llmd/smollm2-demo --timeout=20m
  kubectl get llmd smollm2-demo
  kubectl run fleetlm-e2e-curl --rm -i --restart=Never --image=curlimages/curl -- \
    curl -sf "http://smollm2-demo.default.svc/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}'
  kubectl delete -f examples/cpu-demo.yaml --wait
fi

# The in-process operator of the tests serves only its own namespaces; scale the chart's down meanwhile.
kubectl -n fleetlm-system scale deployment/fleetlm-operator --replicas=0
python3 -m pytest e2e -v
kubectl -n fleetlm-system scale deployment/fleetlm-operator --replicas=2

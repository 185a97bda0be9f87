#!/usr/bin/env bash
# Build the serving image with docker or podman, whichever works here (`make image` calls this).
#
#   deploy/build-image.sh [-t TAG] [--model PATH] [--ort onnxruntime|onnxruntime-gpu] [--base IMAGE]
#   deploy/build-image.sh --print-engine          # prints podman, docker or nothing
#
# The build context is the repository root; the model (default export/model.onnx) is baked in.
# The base image (default localhost/tlcv-base:bookworm, see deploy/make-base-image.sh) is never pulled.
set -euo pipefail

engine() {
  if [[ -n ${ENGINE:-} ]]; then echo "$ENGINE"; return; fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  if command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then echo podman; return; fi
  echo ""
}

TAG=localhost/tlcv-serve:latest
MODEL=export/model.onnx
ORT=onnxruntime
BASE=localhost/tlcv-base:bookworm
while (($#)); do
  case $1 in
    --print-engine) engine; exit 0 ;;
    -t|--tag) TAG=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --ort) ORT=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ENGINE=$(engine)
if [[ -z $ENGINE ]]; then
  echo "build-image.sh: neither docker nor podman works here (sudo deploy/setup-podman.sh installs podman)" >&2
  exit 1
fi
if [[ ! -f $MODEL ]]; then
  echo "build-image.sh: $MODEL not found (make run exports it)" >&2
  exit 1
fi
case $MODEL in /*) MODEL=$(realpath --relative-to="$ROOT" "$MODEL") ;; esac
if [[ $MODEL == ../* ]]; then
  echo "build-image.sh: the model must lie inside the repository (the build context)" >&2
  exit 1
fi

# podman's default OCI format drops HEALTHCHECK; the docker format keeps it.
FLAGS=(--pull=never --format docker)
[[ $ENGINE == docker ]] && FLAGS=(--pull=false)
echo "build-image.sh: $ENGINE build -t $TAG (base $BASE, $ORT, model $MODEL)"
exec $ENGINE build "${FLAGS[@]}" -f deploy/Dockerfile -t "$TAG" \
  --build-arg BASE_IMAGE="$BASE" --build-arg ORT_PACKAGE="$ORT" --build-arg MODEL="$MODEL" .

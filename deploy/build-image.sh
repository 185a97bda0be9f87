#!/usr/bin/env bash
# Build the serving image with docker or podman, whichever works here (`make image` calls this).
#
#   deploy/build-image.sh [-t TAG] [--model PATH] [--ort onnxruntime|onnxruntime-gpu] [--base IMAGE]
#   deploy/build-image.sh --print-engine          # prints docker, podman or nothing (docker wins if its daemon answers)
#   deploy/build-image.sh --print-files           # the repository files the image holds, one a line
#
# The model (default export/model.onnx; any path) is baked in as /models/model.onnx. The build
# context is a temporary folder holding only what deploy/Dockerfile copies (deploy/*.py and the
# torch-free part of tasks/: contract.py, preprocess.py, runtime.py, each task's serve.py with the
# packages' __init__.py; then the model), laid out as in the repository: the repository root with
# its multi-GB .venv is never sent to a docker daemon. The base image (default
# localhost/tlcv-base:bookworm, see deploy/make-base-image.sh) is never pulled.
set -euo pipefail

engine() {
  if [[ -n ${ENGINE:-} ]]; then echo "$ENGINE"; return; fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  if command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then echo podman; return; fi
  echo ""
}

# What the image holds of this repository: the server and everything it imports, none of it torch
# (tests/test_serve_deploy.py holds this list to deploy/'s imports and to deploy/Dockerfile's COPY lines).
image_files() {
  printf '%s\n' deploy/*.py tasks/__init__.py tasks/contract.py tasks/preprocess.py tasks/runtime.py
  for f in tasks/*/serve.py; do printf '%s\n' "$(dirname "$f")/__init__.py" "$f"; done
}

TAG=localhost/tlcv-serve:latest
MODEL=export/model.onnx
ORT=onnxruntime
BASE=localhost/tlcv-base:bookworm
while (($#)); do
  case $1 in
    --print-engine) engine; exit 0 ;;
    --print-files) cd "$(dirname "$0")/.." && image_files; exit 0 ;;
    -t|--tag) TAG=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --ort) ORT=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[[ $MODEL == /* ]] || MODEL=$([[ -f $MODEL ]] && realpath "$MODEL" || echo "$ROOT/$MODEL")
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
CTX=$(mktemp -d /tmp/tlcv-build.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/deploy" "$CTX/export"
cp deploy/Dockerfile deploy/requirements.txt "$CTX/deploy/"
image_files | while read -r f; do mkdir -p "$CTX/$(dirname "$f")" && cp "$f" "$CTX/$f"; done
cp "$MODEL" "$CTX/export/model.onnx"

# podman's default OCI format drops HEALTHCHECK; the docker format keeps it.
FLAGS=(--pull=never --format docker)
[[ $ENGINE == docker ]] && FLAGS=(--pull=false)
echo "build-image.sh: $ENGINE build -t $TAG (base $BASE, $ORT, model $MODEL)"
$ENGINE build "${FLAGS[@]}" -f "$CTX/deploy/Dockerfile" -t "$TAG" \
  --build-arg BASE_IMAGE="$BASE" --build-arg ORT_PACKAGE="$ORT" --build-arg MODEL=export/model.onnx "$CTX"

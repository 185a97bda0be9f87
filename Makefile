# The README's commands. `make run` and `make test` each set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# DVC stages call `python -m tasks.<stage>`: put the venv first on PATH.
export PATH := $(BIN):$(PATH)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv run test bench deployment-run serve image clean-artifacts

help:
	@echo "make run    - set up .venv, run the pipeline (dvc repro) on params.yaml, print a summary"
	@echo "make test   - set up .venv, run the test suite"
	@echo "make bench  - benchmarks (needs ../shared/datasets: hymenoptera, multilabel, bccd, camvid)"
	@echo "make serve  - serve export/model.onnx on 127.0.0.1:8000 (Open Inference Protocol + /v1/predict)"
	@echo "make image  - build the serving image (podman or docker; offline base image made first)"
	@echo "make deployment-run - Prefect: server (if none answers), pool, deployments, worker; run transfer-learning/local"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	dvc repro
	python -m tasks.summary

test: venv
	python -m pytest -q tests

serve: venv
	python -m deploy.server --model-path $(or $(MODEL_PATH),export/model.onnx) --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),8000)

image:
	deploy/make-base-image.sh
	deploy/build-image.sh --model export/model.onnx

deployment-run: venv
	python -m flows.deployment_run

bench: venv
	python bench/train_speed.py ../shared/datasets/hymenoptera
	python bench/inference.py ../shared/datasets/hymenoptera
	python bench/serve_load.py
	python bench/serve_memory.py
	python bench/backbone_select.py ../shared/datasets/hymenoptera
	python bench/backbone_select.py digits --far ../shared/datasets/hymenoptera
	python bench/feature_options.py digits ../shared/datasets/hymenoptera
	python bench/audit.py ../shared/datasets/hymenoptera
	python bench/audit.py digits
	python bench/multilabel.py ../shared/datasets/multilabel
	python bench/detection.py ../shared/datasets/bccd
	python bench/segmentation.py ../shared/datasets/camvid
	python bench/dense_profile.py ../shared/datasets/bccd
	python bench/dense_profile.py ../shared/datasets/camvid --task segmentation
	python bench/distributed.py
	python bench/predict.py ../shared/datasets/hymenoptera

clean-artifacts:
	rm -rf data/prepared features models reports

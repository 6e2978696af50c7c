# Two entry points a newcomer needs: `make demo` and `make test` (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU wheel first: any unpinned torch on a machine without it pulls GBs of CUDA builds.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(BIN)/rcdeploy: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu torch
	$(BIN)/pip install -q -e ".[dev]"
# Dev-only, for tests/test_attack_crosscheck.py; --no-deps: its torchvision requirement breaks CPU torch.
	$(BIN)/pip install -q --no-deps "torchattacks>=3.5,<4" || true
	touch $(BIN)/rcdeploy

install: $(BIN)/rcdeploy

demo: install
	$(BIN)/rcdeploy train
	$(BIN)/rcdeploy export --bits 4 --prune-channels
	$(BIN)/rcdeploy bench model.onnx --attack ifgsm20,autoattack-fast

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs model.onnx model.qonnx.onnx model.ort model.json .pytest_cache

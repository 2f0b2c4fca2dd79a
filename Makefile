# Two commands do all set-up on a fresh machine (see README):
#   make demo   - run the main job on an embedded default data set (no download)
#   make test   - run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned here first: 2.13.0 resolves to the local CPU build; other specs may pull CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mbbo run --task hyperparam --dataset breast_cancer --algorithm bsvrb_v2 --iterations 2000 --eval-every 50 --out runs/demo --overwrite
	$(BIN)/mbbo plot runs/demo --x epoch --y val_loss -o runs/demo/val_loss.png

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

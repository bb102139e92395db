# Two commands: `make quickstart` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup quickstart test test-slow bench bench-gpu bench-gpu-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "k-diffusion>=0.1.1"  # its sampling module only (see pyproject)
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lit-score fit --config experiments/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The end-to-end runs marked slow (pytest exits 5 when none are collected).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS) || test $$? -eq 5

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The GPU suite (at most 8 minutes on one GPU), and the same code on tiny sizes on CPU (about a minute; CI).
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu --json gpu_benchmark.json

bench-gpu-quick: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.gpu --device cpu --quick --json gpu_benchmark_quick.json

clean:
	rm -rf $(VENV) runs .pytest_cache

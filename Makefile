# The two set-up commands of the README:
#   make demo   installs the runtime and runs the main job on the synthetic default
#   make test   installs the dev extra (CPU torch for parity tests) and runs pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
WORKDIR ?= runs/synthetic

.PHONY: install install-dev demo test lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime: the package plus OpenAI's BPE vocabulary (shipped in clip-anytorch,
# whose declared dependencies would pull torchvision/CUDA, hence --no-deps).
$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	$(PIP) --no-deps clip-anytorch==2.6.0
	touch $@

# Dev: torch 2.13.0 (CPU) must go in before anything that depends on torch.
$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/python -m jmceln_jax.train --config configs/synthetic.py --workdir $(WORKDIR)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)

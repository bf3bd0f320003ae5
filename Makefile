# The two set-up commands of the README:
#   make demo   installs the runtime and runs the main job on the synthetic default
#   make test   installs the dev extra (CPU torch for parity tests) and runs pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
WORKDIR ?= runs/synthetic

.PHONY: install install-dev demo test lint gpu-wheels clean-venv

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

# The GPU kit's wheels (bench/gpu_kit.sh): what a lent GPU machine (Python
# 3.12, no network) lacks, downloaded here into .whl/.
GPU_WHEELS := grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 \
  pycocotools==2.0.11 ftfy==6.3.1 wcwidth==0.9.5 portpicker==1.6.0 \
  clip-anytorch==2.6.0
gpu-wheels: $(BIN)/python
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d .whl $(GPU_WHEELS)

clean-venv:
	rm -rf $(VENV)

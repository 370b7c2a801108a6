# Two entry points for a fresh machine: `make demo` (default study end to end) and
# `make test` (the whole suite). Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

# torch first: deepspeed's `torch>=2.0` would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# A new name each time, so `make demo` can be run again (a study name is never reused).
demo: $(STAMP)
	$(VENV)/bin/soups run --name demo-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) soups_home .pytest_cache .ruff_cache

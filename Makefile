# Two entry points for a fresh machine: `make demo` (default study end to end) and
# `make test` (the whole suite). Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv system demo test lint clean real gpu-check

venv: $(STAMP)

# The sandbox of generated programs (docs/sandbox.md) needs bubblewrap and libseccomp; its
# tests re-derive the system-call allow list with strace. Installed with apt-get where they
# are missing (root, or sudo), else named.
system:
	@if ! command -v bwrap >/dev/null 2>&1 || ! command -v strace >/dev/null 2>&1 \
	  || ! $(PYTHON) -c "import ctypes.util, sys; \
	sys.exit(not ctypes.util.find_library('seccomp'))"; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq bubblewrap libseccomp2 strace; \
	  else \
	    echo "install bubblewrap, libseccomp and strace with your package manager (docs/sandbox.md)"; \
	    exit 1; \
	  fi; \
	fi

# torch first: deepspeed's `torch>=2.0` would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,real]"
	@# DeepSpeed compiles its CPU communication op on first use (about 40 s on 2 cores, in the
	@# first fine-tune of the first study); built here once instead. No-op on a GPU machine.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
	touch $(STAMP)

# A new name each time, so `make demo` can be run again (a study name is never reused).
demo: $(STAMP) system
	$(VENV)/bin/soups run --name demo-$$(date +%Y%m%d-%H%M%S)

# The real-model tier (docs/real_model.md): SmolLM2-135M-Instruct, fetched and dequantized once.
real: $(STAMP) system
	$(VENV)/bin/soups run studies/real_composition.yaml --name real-$$(date +%Y%m%d-%H%M%S)

# One GPU, under 8 minutes: the real-model check in ZeRO-2 bfloat16, the resident evaluator's
# candidates per minute at k = 1 and 8, merged against unmerged answers, peak GPU memory.
gpu-check: $(STAMP) system
	$(PY) -m benchmarks.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) system lint
	$(VENV)/bin/pytest --durations=15

clean:
	rm -rf $(VENV) soups_home .pytest_cache .ruff_cache

# One entry point: `make bench` (the main job) and `make test`. Each sets up what it needs:
# a virtual environment in .venv (reusing an installed CUDA torch when there is one, else
# installing torch $(TORCH_VERSION) from the package index), the extension built in place, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# Needed to build and test; a machine without network must already have them.
DEPS := numpy pytest ninja setuptools wheel pybind11
TEST_DEPS := ruff
# Optional, for `make bench` only (the PNG chart): the bench runs without them, so an install that fails
# (no network) costs the chart, not the run.
BENCH_DEPS := matplotlib
ifndef CUDA_HOME
ifneq ($(wildcard /usr/local/cuda/include/cuda_runtime.h),)
export CUDA_HOME := /usr/local/cuda
endif
endif

.PHONY: all venv build test bench lint clean

all: build

$(VENV)/.ready:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing the installed torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	@missing=$$(for m in $(DEPS) $(TEST_DEPS); do $(PY) -c "import $$m" 2>/dev/null || echo $$m; done); \
	if [ -n "$$missing" ]; then $(PY) -m pip install -q $$missing; fi
	@touch $@

venv: $(VENV)/.ready

build: venv
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m normext.info
	$(PY) -m pytest tests -q -ra

bench: build
	@for m in $(BENCH_DEPS); do $(PY) -c "import $$m" 2>/dev/null || \
		$(PY) -m pip install -q --retries 1 --timeout 15 $$m || echo "$$m not installed: no chart"; done
	$(PY) -m normext.bench $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check normext tests bench setup.py

clean:
	rm -rf build normext/_C*.so *.egg-info

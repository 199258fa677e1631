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
# Test-only, for the real models of tests/test_models.py: torchvision (the release built for the installed
# torch, 0.<minor + 15>.<patch>) and timm, installed without dependencies (pip would otherwise try to change
# torch), plus the small ones they import. Where they cannot be installed those tests skip, saying why.
TIMM_VERSION ?= 1.0.31
MODEL_DEPS := pillow pyyaml
ifndef CUDA_HOME
ifneq ($(wildcard /usr/local/cuda/include/cuda_runtime.h),)
export CUDA_HOME := /usr/local/cuda
endif
endif

.PHONY: all venv build test bench lint clean build-emu test-emu

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

$(VENV)/.models: $(VENV)/.ready
	@if $(PY) -c "import torchvision, timm" 2>/dev/null; then touch $@; else \
		tv=$$($(PY) -c "import re, torch; v = re.match(r'(\d+)\.(\d+)\.(\d+)', torch.__version__).groups(); \
			print(f'0.{int(v[1]) + 15}.{v[2]}')"); \
		if $(PY) -m pip install -q $(MODEL_DEPS) && \
			$(PY) -m pip install -q --no-deps "torchvision==$$tv" "timm==$(TIMM_VERSION)"; then touch $@; \
		else echo "WARNING: torchvision==$$tv / timm could not be installed; the real-model tests will skip"; fi; \
	fi

build: venv
	$(PY) setup.py -q build_ext --inplace

test: build $(VENV)/.models
	$(PY) -m normext.info
	$(PY) -m pytest tests -q -ra
	$(MAKE) --no-print-directory test-emu

# The CUDA kernels run on the CPU (csrc/cuda/emu): the emulated build runs the suite's CUDA cases, a
# sanitizer build (AddressSanitizer + UndefinedBehaviorSanitizer; libasan is preloaded before libstdc++ so that
# it intercepts C++ throws; --capture=sys keeps its reports on stderr) a reduced set of them, and the last line
# is the kernel coverage of the first run. Needs only the host compiler, so it runs with or without nvcc.
EMU := build/emu/_C.so
EMU_ASAN := build/emu-asan/_C.so
# Small shapes of every kernel path: fused and two-kernel, vector and scalar, both layouts, views.
EMU_ASAN_TESTS := -m "not compile" -k "emu or odd_shapes or storage_offset or noncontiguous or row_lengths or activation"

build-emu: venv
	$(PY) csrc/cuda/emu/build.py
	$(PY) csrc/cuda/emu/build.py --sanitize

test-emu: build-emu
	NORMEXT_CUDA_EMU=$(EMU) NORMEXT_EMU_LAUNCHES=build/emu/launches.json $(PY) -m pytest tests -q -ra -p no:cacheprovider
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1 NORMEXT_CUDA_EMU=$(EMU_ASAN) \
		$(PY) -m pytest tests -q -p no:cacheprovider --capture=sys $(EMU_ASAN_TESTS)
	@$(PY) csrc/cuda/emu/kernel_coverage.py build/emu/launches.json

bench: build
	@for m in $(BENCH_DEPS); do $(PY) -c "import $$m" 2>/dev/null || \
		$(PY) -m pip install -q --retries 1 --timeout 15 $$m || echo "$$m not installed: no chart"; done
	$(PY) -m normext.bench $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check normext tests bench setup.py csrc/cuda/emu tools

clean:
	rm -rf build normext/_C*.so *.egg-info

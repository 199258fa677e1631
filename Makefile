# One entry point: `make bench` (the main job) and `make test`. Each sets up what it needs: the Python
# environment (PYTHON's own when it is a virtual environment that has torch, else a .venv), the extension
# built in place, then the run. Nothing already installed is installed again.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
# Extra pytest arguments for `make test` (tools/gpu_check.sh adds its junit file and workers).
PYTEST_ARGS ?=
# Needed to build and test; a machine without network must already have them.
DEPS := numpy pytest ninja setuptools wheel pybind11
# Optional, each for one other target only: `make test` neither needs nor installs them, it names the missing
# ones. ruff: `make lint`. matplotlib: the PNG chart of `make bench`, which runs without it.
LINT_DEPS := ruff
BENCH_DEPS := matplotlib
# Test-only, for the real models of tests/test_models.py: torchvision (the release built for the installed
# torch, 0.<minor + 15>.<patch>) and timm, installed without dependencies (pip would otherwise try to change
# torch), plus the small ones they import. Where they cannot be installed those tests skip, saying why.
TIMM_VERSION ?= 1.0.31
MODEL_DEPS := PIL:pillow yaml:pyyaml
ifndef CUDA_HOME
ifneq ($(wildcard /usr/local/cuda/include/cuda_runtime.h),)
export CUDA_HOME := /usr/local/cuda
endif
endif

# Which Python runs everything. A PYTHON that is a virtual environment (sys.prefix != sys.base_prefix) and
# already has torch is used as it is, with the packages beside it; only what it lacks is installed into it.
# Why not a .venv on top: `-m venv --system-site-packages` run by a venv's interpreter builds on the *base*
# interpreter's site-packages, not the venv's, so that .venv has no torch; a second venv chained to it by a
# .pth file would need the base Python's ensurepip (missing on Debian/Ubuntu without python3-venv) and
# still miss the programs in the env's bin/ (ninja). Any other PYTHON (a system or conda Python, whose
# site-packages are its base's) gets a .venv: with --system-site-packages when it has torch (installs then
# land in .venv, never in the system Python), else a plain one with torch==$(TORCH_VERSION) from the index.
# Probed without importing torch (fast).
PROBE := $(shell $(PYTHON) -c 'import importlib.util as u, sys; \
	print(int(sys.prefix != sys.base_prefix and u.find_spec("torch") is not None), sys.executable)' 2>/dev/null)
ifeq ($(word 1,$(PROBE)),1)
PY := $(word 2,$(PROBE))
else
PY := $(VENV)/bin/python
endif
# torch's cpp_extension runs `ninja` from PATH, and pip's ninja lives in the environment's bin/: put it first,
# as activating the environment would.
export PATH := $(abspath $(dir $(PY))):$(PATH)
# `$(PY) $(MISSING) module[:requirement] ...` prints the requirement (default: the module name) of each
# module that cannot be found; nothing is imported.
MISSING := -c 'import importlib.util as u, sys; \
	print(*[a.partition(":")[2] or a for a in sys.argv[1:] if u.find_spec(a.partition(":")[0]) is None])'
# Optional installs give up quickly: on a machine without network they cost a message, not minutes.
PIP_OPTIONAL := -m pip install -q --retries 1 --timeout 15

.PHONY: all venv models build test bench lint clean build-emu test-emu cuda-report

all: build

venv:
ifeq ($(PY),$(VENV)/bin/python)
	@if [ ! -x $(PY) ]; then \
		if $(PYTHON) -c "import torch" 2>/dev/null; then \
			echo "reusing the installed torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
			$(PYTHON) -m venv --system-site-packages $(VENV); \
		else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@if [ -n "$$($(PY) $(MISSING) torch)" ]; then $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; fi
else
	@echo "using $(PYTHON)'s environment as it is: $(PY)"
endif
	@missing=$$($(PY) $(MISSING) $(DEPS)); if [ -n "$$missing" ]; then \
		echo "installing what $(PY) lacks: $$missing"; $(PY) -m pip install -q $$missing; fi
	@optional=$$($(PY) $(MISSING) $(LINT_DEPS) $(BENCH_DEPS)); if [ -n "$$optional" ]; then \
		echo "not installed (optional: ruff for make lint, matplotlib for the bench chart): $$optional"; fi

models: venv
	@missing=$$($(PY) $(MISSING) $(MODEL_DEPS) torchvision timm); if [ -n "$$missing" ]; then \
		tv=$$($(PY) -c "import re, torch; v = re.match(r'(\d+)\.(\d+)\.(\d+)', torch.__version__).groups(); \
			print(f'0.{int(v[1]) + 15}.{v[2]}')"); \
		small=$$($(PY) $(MISSING) $(MODEL_DEPS)); \
		big=$$($(PY) $(MISSING) "torchvision:torchvision==$$tv" "timm:timm==$(TIMM_VERSION)"); \
		if { [ -z "$$small" ] || $(PY) $(PIP_OPTIONAL) $$small; } && \
			{ [ -z "$$big" ] || $(PY) $(PIP_OPTIONAL) --no-deps $$big; }; then :; \
		else echo "WARNING: could not install $$missing; the tests that need them will skip"; fi; \
	fi

build: venv
	$(PY) setup.py -q build_ext --inplace

test: build models
	$(PY) -m normext.info
	$(PY) tools/cuda_report.py --if-possible --max-regs 128
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)
	@if [ "$(TEST_EMU)" = 1 ]; then $(MAKE) --no-print-directory test-emu; else echo "TEST_EMU=$(TEST_EMU): make test-emu skipped"; fi

# The CUDA kernels run on the CPU (csrc/cuda/emu): the emulated build runs the suite's CUDA cases, a
# sanitizer build (AddressSanitizer + UndefinedBehaviorSanitizer; libasan is preloaded before libstdc++ so that
# it intercepts C++ throws; --capture=sys keeps its reports on stderr) a reduced set of them, and the last line
# is the kernel coverage of the first run. Needs only the host compiler, so it runs with or without nvcc.
# TEST_EMU=0 leaves it out of make test (tools/gpu_check.sh: on a GPU the real kernels run instead).
TEST_EMU ?= 1
EMU := build/emu/_C.so
EMU_ASAN := build/emu-asan/_C.so
# gcc's libasan (an absolute path when it has one): without it the sanitizer build and run are skipped, saying so.
ASAN_LIB := $(shell gcc -print-file-name=libasan.so 2>/dev/null)
HAVE_ASAN := $(filter /%,$(ASAN_LIB))
# Small shapes of every kernel path: fused and two-kernel, vector and scalar, both layouts, views.
EMU_ASAN_TESTS := -m "not compile" -k "emu or odd_shapes or storage_offset or noncontiguous or row_lengths or activation"

build-emu: venv
	$(PY) csrc/cuda/emu/build.py
	@if [ -n "$(HAVE_ASAN)" ]; then $(PY) csrc/cuda/emu/build.py --sanitize; \
	else echo "gcc has no libasan: the sanitizer build is skipped"; fi

test-emu: build-emu
	NORMEXT_CUDA_EMU=$(EMU) NORMEXT_EMU_LAUNCHES=build/emu/launches.json $(PY) -m pytest tests -q -ra -p no:cacheprovider
	@if [ -n "$(HAVE_ASAN)" ]; then set -x; \
		LD_PRELOAD="$(ASAN_LIB) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1 NORMEXT_CUDA_EMU=$(EMU_ASAN) \
		$(PY) -m pytest tests -q -p no:cacheprovider --capture=sys $(EMU_ASAN_TESTS); \
	else echo "gcc has no libasan: the sanitizer run is skipped"; fi
	@$(PY) csrc/cuda/emu/kernel_coverage.py build/emu/launches.json

# Per CUDA kernel instantiation: sm_90 registers, spill bytes, static shared memory and theoretical occupancy,
# read from the objects `make build` made (seconds, nothing recompiled); fails on any spill not listed in its
# KNOWN_SPILLS (empty) and on any kernel above 128 registers. `make test` runs it (--if-possible: skipped,
# saying so, without CUDA objects or cuobjdump).
cuda-report: build
	$(PY) tools/cuda_report.py --max-regs 128

bench: build
	@missing=$$($(PY) $(MISSING) $(BENCH_DEPS)); if [ -n "$$missing" ]; then \
		$(PY) $(PIP_OPTIONAL) $$missing || echo "$$missing not installed: no chart"; fi
	$(PY) -m normext.bench $(BENCH_ARGS)

lint: venv
	@if [ -n "$$($(PY) $(MISSING) $(LINT_DEPS))" ]; then $(PY) -m pip install -q $(LINT_DEPS) || \
		{ echo "make lint needs $(LINT_DEPS), which is not installed and could not be"; exit 1; }; fi
	$(PY) -m ruff check normext tests bench setup.py csrc/cuda/emu tools

clean:
	rm -rf build normext/_C*.so *.egg-info

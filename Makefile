# `make train` and `make test` each bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/lm.py:tiny
WORKDIR ?= runs/tiny
ARGS ?=

.PHONY: train test test-drills test-kernels-latest test-compile bench clean-venv

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were selected (exit 5), treated as success"; rc=0; fi; \
	exit $$rc

# The kill/fault/load drills (minutes of real subprocesses); CI runs them after `make test`.
# The drill worker's aborts in XLA during the whole-split evaluation were the unbounded
# dispatch loop, not the compilation cache (issue 41, effjax/train/inflight.py); the drills
# still run without the shared cache, which saves them nothing.
test-drills: $(VENV)/.installed
	JAX_ENABLE_COMPILATION_CACHE=false EFFJAX_DRILLS=1 $(PY) -m pytest -q -n 2 -m drill $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no drills were selected (exit 5), treated as success"; rc=0; fi; \
	exit $$rc

# The kernel tests, drills included, again on the newest JAX (the only place the LMs on the Mosaic
# GPU kernels run: GPU interpret mode needs jax >= 0.12), which needs Python >= 3.12 (3.11 has 0.10.2):
# a python3.12 on PATH, else pyenv's newest 3.12.x; skipped, saying so, when there is neither.
VENV312 := .venv312
PYTHON312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
  (command -v pyenv >/dev/null && v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$$' | sort -V | tail -n1) && \
   [ -n "$$v" ] && echo "$$(pyenv root)/versions/$$v/bin/python3.12"))
KERNEL_TESTS := tests/test_flash_attention.py tests/test_grouped_matmul.py tests/test_mosaic_gpu_gmm.py tests/test_mosaic_gpu_attention.py tests/test_monarch_kernel.py

$(VENV312)/.installed: setup.cfg pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -m pip install --quiet --upgrade -e '.[test]' jax
	touch $@

test-kernels-latest:
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "test-kernels-latest: SKIPPED: no Python 3.12 found (python3.12 on PATH or pyenv 3.12.x)"; \
	  exit 0; fi; \
	$(MAKE) --no-print-directory $(VENV312)/.installed || exit $$?; \
	$(VENV312)/bin/python -c 'import sys, jax; print("test-kernels-latest: Python", sys.version.split()[0], "jax", jax.__version__)'; \
	EFFJAX_DRILLS=1 $(VENV312)/bin/python -m pytest -q -n 2 $(KERNEL_TESTS) $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no kernel tests were selected (exit 5), treated as success"; rc=0; fi; \
	exit $$rc

# The kernels and the train step (aot_check --target) through the accelerators' own compilers,
# compile-only: libtpu for TPU v4/v5e/v5p/v6e and the CUDA plugin for H100s (targets.py). Needs
# Python >= 3.12 and a JAX whose libtpu the registry serves (jax 0.12.1 asks for a libtpu it
# does not have), so the pair is pinned here; skipped, saying why, when either is missing.
COMPILE_JAX ?= 0.12.0.1
VENV_COMPILE := .venv-compile
COMPILE_TESTS := tests/test_compile_targets.py tests/test_aot_target.py

$(VENV_COMPILE)/.installed: setup.cfg pyproject.toml
	$(PYTHON312) -m venv $(VENV_COMPILE)
	$(VENV_COMPILE)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_COMPILE)/bin/python -m pip install --quiet -e '.[test]' "jax[tpu,cuda12]==$(COMPILE_JAX)"
	touch $@

test-compile:
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "test-compile: SKIPPED: no Python 3.12 found (python3.12 on PATH or pyenv 3.12.x)"; \
	  exit 0; fi; \
	if ! $(MAKE) --no-print-directory $(VENV_COMPILE)/.installed; then \
	  echo "test-compile: SKIPPED: could not install jax[tpu,cuda12]==$(COMPILE_JAX) (libtpu and the CUDA plugin)"; \
	  exit 0; fi; \
	$(VENV_COMPILE)/bin/python -c 'import sys, jax, libtpu; print("test-compile: Python", sys.version.split()[0], "jax", jax.__version__)'; \
	JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 \
	  $(VENV_COMPILE)/bin/python -m pytest -q -n 2 -m compile $(COMPILE_TESTS) $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no compile tests were selected (exit 5), treated as success"; rc=0; fi; \
	exit $$rc

bench: $(VENV)/.installed
	$(PY) -m experiments.bench_train $(ARGS)

clean-venv:
	rm -rf $(VENV)

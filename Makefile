# Every target sets itself up: a virtual environment at .venv, the package installed editable into it
# with the extras the repository's own tools need (TensorFlow, the training kit, the tests), and
# (where apt is available) Debian's offline copy of Fashion-MNIST. `pip install .` alone gives the
# layer with keras and numpy only. `make docs` and `make test-torch` use light environments of their
# own (.venv-docs, .venv-torch) with only what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= /usr/share/datasets/fashion-mnist
ARGS ?=
# Two test processes (pytest-xdist), each taking a whole file at a time (a file's module fixtures are built
# once): much of a test's time is tracing, process start-up and waits on worker processes, which leave a
# core idle. `make test XDIST=` runs in one process.
XDIST ?= -n 2 --dist loadfile
# The tests of the backend-agnostic core (keras.ops math, the layer, transforms, callbacks): `make test`
# runs them under TensorFlow with the rest, then again under each other backend.
BACKEND_TESTS := tests/test_ops.py tests/test_properties.py tests/test_validation.py tests/test_layer_compiled.py tests/test_layer_errors.py tests/test_layer_masks_dtypes.py tests/test_layer_parity.py tests/test_layer_plan.py tests/test_layer_recompute.py tests/test_layer_renorm_ghost.py tests/test_layer_serialization.py tests/test_transforms.py tests/test_experimental.py tests/test_callbacks.py

TORCH_VENV := .venv-torch
DOCS_VENV := .venv-docs

.PHONY: train test test-slow test-torch test-python bench tune exercises export docs data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[tensorflow,train,dev]'
	touch $(STAMP)

# The PyTorch backend alone, beside no TensorFlow or JAX: the `torch` extra (torch 2.13, whose CPU
# build pip finds on this project's machines; PyPI's Linux wheel is the CUDA build, several GB) and
# the `test` extra. Measured here: 2-3 minutes, 1.1 GB.
$(TORCH_VENV)/.installed: pyproject.toml
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q -e '.[torch,test]'
	touch $@

# MkDocs reads the docstrings from the source (griffe), so the site needs the `docs` extra alone.
$(DOCS_VENV)/.installed: pyproject.toml
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install -q -e '.[docs]'
	touch $@

# Debian ships the original IDX files; tfds' own download needs a network these machines lack.
data:
	@if [ ! -s $(DATA_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Debian's dataset-fashion-mnist into $(DATA_DIR)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

train: $(STAMP) data
	$(PY) -m training.train $(ARGS)

# `make test`: everything but the end-to-end runs marked slow (minutes each); `make test-slow` runs
# those; CI (.ci/run) runs both.
test: $(STAMP) data
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests $(ARGS)
	@# The layers' math is keras.ops: their tests run under JAX too (exit 5: ARGS selected none of them).
	KERAS_BACKEND=jax $(PY) -m pytest -q $(XDIST) -m "not slow" $(BACKEND_TESTS) $(ARGS) || [ $$? -eq 5 ]

test-slow: $(STAMP) data
	$(PY) -m pytest -q -m slow tests $(ARGS)

# The backend tests under PyTorch (what torch lacks is skipped, naming why: docs/getting-started.md).
test-torch: $(TORCH_VENV)/.installed
	KERAS_BACKEND=torch $(TORCH_VENV)/bin/python -m pytest -q $(XDIST) -m "not slow" $(BACKEND_TESTS) $(ARGS) || [ $$? -eq 5 ]

# The wheel built and tested under every Python version the package declares (3.11-3.13; part of
# `make test-slow`): each in a fresh environment with JAX, from pyenv where it is not on PATH.
test-python: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_packaging.py $(ARGS)

bench: $(STAMP) data
	$(PY) -m bench $(ARGS)

tune: $(STAMP) data
	$(PY) -m training.tune $(ARGS)

exercises: $(STAMP) data
	$(PY) -m training.exercises $(ARGS)

export: $(STAMP)
	$(PY) -m training.export $(ARGS)

# The documentation site, warnings (griffe's docstring checks, broken links and anchors) as errors.
docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/python -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) $(TORCH_VENV) $(DOCS_VENV) runs build dist site *.egg-info

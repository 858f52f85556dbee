# Every target sets itself up: a virtual environment at .venv, the package installed editable into it
# with the extras the repository's own tools need (TensorFlow, the training kit, the tests), and
# (where apt is available) Debian's offline copy of Fashion-MNIST. `pip install .` alone gives the
# layer with keras and numpy only.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= /usr/share/datasets/fashion-mnist
ARGS ?=
# The tests of the backend-agnostic core (keras.ops math, the layer, transforms, callbacks): `make test`
# runs them under TensorFlow with the rest, then again under each other backend.
BACKEND_TESTS := tests/test_ops.py tests/test_properties.py tests/test_validation.py tests/test_layer_compiled.py tests/test_layer_errors.py tests/test_layer_masks_dtypes.py tests/test_layer_parity.py tests/test_layer_plan.py tests/test_layer_recompute.py tests/test_layer_renorm_ghost.py tests/test_layer_serialization.py tests/test_transforms.py tests/test_experimental.py tests/test_callbacks.py

.PHONY: train test test-slow bench tune exercises export docs data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[tensorflow,train,dev]'
	touch $(STAMP)

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
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)
	@# The layers' math is keras.ops: their tests run under JAX too (exit 5: ARGS selected none of them).
	KERAS_BACKEND=jax $(PY) -m pytest -q -m "not slow" $(BACKEND_TESTS) $(ARGS) || [ $$? -eq 5 ]

test-slow: $(STAMP) data
	$(PY) -m pytest -q -m slow tests $(ARGS)

bench: $(STAMP) data
	$(PY) -m bench $(ARGS)

tune: $(STAMP) data
	$(PY) -m training.tune $(ARGS)

exercises: $(STAMP) data
	$(PY) -m training.exercises $(ARGS)

export: $(STAMP)
	$(PY) -m training.export $(ARGS)

# The documentation site, warnings (griffe's docstring checks, broken links and anchors) as errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs build dist site *.egg-info

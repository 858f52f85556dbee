"""Smoke tests of examples/: each script runs with `--tiny` in a fresh process and checks itself.

Every example compares what it built against an independent run (a reloaded
model, a folded copy, one device) and exits non-zero when they differ; the
test asserts exit code 0 and the line where the script prints the
comparison.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from _procs import REPO_ROOT, run_python

EXAMPLES = REPO_ROOT / "examples"
HAS_TF = importlib.util.find_spec("tensorflow") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="the example needs TensorFlow")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="the example needs JAX")

# "max |difference| ... 1.23e-06 < 1e-05"-style lines: the printed value must be below the printed bound.
DIFFERENCE = re.compile(r"max \|difference\|.*?(\d\.\d+e[+-]\d+) < (1e-\d+)")


def run_example(name, backend, *args):
    result = run_python(
        [str(EXAMPLES / name), "--tiny", *args],
        env={"KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": "-1"},
        timeout=300,
    )
    checks = DIFFERENCE.findall(result.stdout)
    assert checks, result.stdout
    for value, bound in checks:
        assert float(value) < float(bound), result.stdout
    return result.stdout


@pytest.mark.parametrize(
    "backend", [pytest.param("tensorflow", marks=needs_tf), pytest.param("jax", marks=needs_jax)]
)
def test_dropin_functional(backend):
    out = run_example("dropin_functional.py", backend)
    assert f"{backend}: saved and reloaded dropin.keras" in out


@needs_tf
def test_convert_fold_export():
    out = run_example("convert_fold_export.py", "tensorflow")
    assert "converted 52 batch norms" in out
    assert "folded 52 batch norms into the layer before them, 0 became a constant affine" in out
    assert "SavedModel: max |difference|" in out


@needs_tf
def test_custom_loop_mirrored():
    out = run_example("custom_loop_mirrored.py", "tensorflow")
    assert "3 steps on 2 replicas" in out
    # The replicas' copies really differed before the handover.
    spread = float(re.search(r"differ by up to (\S+)", out).group(1))
    assert spread > 1e-3, out


@needs_jax
def test_jax_data_parallel():
    out = run_example("jax_data_parallel.py", "jax")
    assert "DataParallel over 2 devices" in out
    assert len(DIFFERENCE.findall(out)) == 2  # local statistics and synchronized ones, each against one device

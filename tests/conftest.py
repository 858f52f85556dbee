"""Shared test set-up for kerasbn.

* Puts the repository root on `sys.path`, so the tests run from a checkout
  without `pip install -e .`.
* Quietens TensorFlow's C++ logging (`TF_CPP_MIN_LOG_LEVEL=2`) before anything
  imports it.
* Float64 NumPy references for batch normalization (`np_moments`,
  `np_batch_norm`, `np_batch_norm_grads`), used by several test files.
* `run_python`, as a fixture: run Python in a fresh process (needed for
  anything that must configure TensorFlow before it initialises, e.g. logical
  CPU devices for distribution tests). It and the other process helpers live
  in `tests/_procs.py`; the layer tests' helpers in `tests/_layer_helpers.py`.

The Keras backend is whatever `KERAS_BACKEND` says (TensorFlow by default);
`tf_only` marks tests that need TensorFlow, and `TORCH_SKIPS` names the
tests that cannot pass on PyTorch (`make test-torch`) and why.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras  # noqa: E402
from _procs import run_python  # noqa: E402

BACKEND = keras.backend.backend()

tf_only = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason=f"TensorFlow-only feature (fused kernel / tf.function / XLA / SavedModel); backend is {BACKEND!r}",
)


def _float64_available() -> bool:
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


needs_float64 = pytest.mark.skipif(
    not _float64_available(),
    reason="JAX computes float64 tensors in float32 unless jax_enable_x64 is set",
)

# Tests that cannot pass on PyTorch for a reason outside kerasbn, by test name (a regular
# expression matched in full against the name with its parameters), wherever the test lives.
_BITWISE = (
    "asserts kerasbn's inference bitwise equal to the stock layer's; on torch Keras's batch_normalization "
    "computes (x - mean) * (rsqrt(variance + epsilon) * gamma) + beta, kerasbn x * a + b: 1 ulp apart"
)
TORCH_SKIPS = {
    r"test_moments_match_numpy\[float64-.*": (
        "Keras 3.15.1's torch ops.mean reduces float64 in float32 (error 4e-8 against NumPy), "
        "below this test's 1e-12"
    ),
    r"test_normalize_with_batch_moments_has_zero_mean_unit_variance": (
        "multiplies a NumPy array by torch tensors (the statistics): NumPy's `*` neither converts "
        "nor defers to torch.Tensor (TypeError)"
    ),
    r"test_axis_and_mask_errors_read_as_the_stock_layers": (
        "the stock layer's mask error prints the shape as torch.Size([4, 2, 3]), kerasbn's as (4, 2, 3)"
    ),
    r"test_masked_sequences_and_bare_ops_in_the_graph": _BITWISE,
    r"test_a_lambda_layer_is_kept": _BITWISE,
    r"test_nested_models": _BITWISE,
    r"test_batch_norm_inside_time_distributed_and_wrappers": _BITWISE,
    r"test_sequential": _BITWISE,
}


def pytest_collection_modifyitems(config, items):
    if BACKEND != "torch":
        return
    for item in items:
        for pattern, reason in TORCH_SKIPS.items():
            if re.fullmatch(pattern, item.name):
                item.add_marker(pytest.mark.skip(reason=f"PyTorch backend: {reason}"))


# --------------------------------------------------------------- fixtures


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: reproducible, and different per test."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.name)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture
def dtype_policy(request):
    """Sets the global dtype policy to `request.param` and restores the old one afterwards.

    Use with `@pytest.mark.parametrize("dtype_policy", [...], indirect=True)`.
    """
    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy(old)


@pytest.fixture(autouse=True)
def _global_policy_is_restored():
    """Every test starts and ends with the float32 policy (a leak would skew later tests)."""
    before = keras.mixed_precision.global_policy().name
    yield
    after = keras.mixed_precision.global_policy().name
    if after != before:
        keras.mixed_precision.set_global_policy(before)
        pytest.fail(f"test changed the global dtype policy from {before!r} to {after!r} without restoring it")


# ------------------------------------------------------- NumPy references


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _feature_axes(rank: int, axis) -> tuple:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return tuple(sorted(a % rank for a in axes))


def param_shape(shape: Sequence[int], axis) -> tuple:
    """The shape of gamma/beta/moving statistics for inputs of `shape`."""
    return tuple(shape[a] for a in _feature_axes(len(shape), axis))


def _keep_shape(shape, axis) -> list:
    rank = len(shape)
    features = _feature_axes(rank, axis)
    return [shape[i] if i in features else 1 for i in range(rank)]


def np_moments(x, axis, mask=None):
    """Float64 mean and biased variance over every axis but `axis` (int or list).

    `mask` follows Keras: shape `x.shape[:-1]`, one weight per position, shared
    by the last axis; masked-out positions do not count. Returns arrays of the
    parameter shape (`param_shape(x.shape, axis)`).
    """
    x = np.asarray(x, np.float64)
    rank = x.ndim
    features = _feature_axes(rank, axis)
    reduce = tuple(i for i in range(rank) if i not in features)
    if mask is None:
        weights = np.ones_like(x)
    else:
        weights = np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
    count = weights.sum(axis=reduce, keepdims=True)
    mean = (weights * x).sum(axis=reduce, keepdims=True) / count
    variance = (weights * (x - mean) ** 2).sum(axis=reduce, keepdims=True) / count
    shape = param_shape(x.shape, axis)
    return mean.reshape(shape), variance.reshape(shape)


def np_batch_norm(x, mean, variance, gamma, beta, epsilon, axis):
    """Float64 `gamma * (x - mean) / sqrt(variance + epsilon) + beta` (parameters of the parameter shape)."""
    x = np.asarray(x, np.float64)
    keep = _keep_shape(x.shape, axis)

    def b(p):
        return np.asarray(p, np.float64).reshape(keep)

    return b(gamma) * (x - b(mean)) / np.sqrt(b(variance) + epsilon) + b(beta)


def np_batch_norm_train(x, gamma, beta, epsilon, axis, mask=None):
    """Training-mode output and the batch statistics, in float64."""
    mean, variance = np_moments(x, axis, mask)
    return np_batch_norm(x, mean, variance, gamma, beta, epsilon, axis), mean, variance


def np_batch_norm_grads(x, upstream, gamma, epsilon, axis, mask=None):
    """Closed-form gradients of `sum(upstream * BN_train(x))` w.r.t. x, gamma and beta (float64).

    With weights w (mask), n = sum(w), s = 1/sqrt(var + eps), xhat = (x - mean) s
    and gh = upstream * gamma:
      dx_i    = s gh_i - s w_i / n * sum(gh) - s^3 w_i (x_i - mean) / n * sum(gh (x - mean))
      dgamma  = sum(upstream * xhat),   dbeta = sum(upstream)
    (sums over the reduction axes; the statistics depend only on unmasked x).
    """
    x = np.asarray(x, np.float64)
    g = np.asarray(upstream, np.float64)
    rank = x.ndim
    features = _feature_axes(rank, axis)
    reduce = tuple(i for i in range(rank) if i not in features)
    keep = _keep_shape(x.shape, axis)
    w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
    n = w.sum(axis=reduce, keepdims=True)
    mean = (w * x).sum(axis=reduce, keepdims=True) / n
    centered = x - mean
    variance = (w * centered**2).sum(axis=reduce, keepdims=True) / n
    s = 1.0 / np.sqrt(variance + epsilon)
    gh = g * np.asarray(gamma, np.float64).reshape(keep)
    dx = (
        s * gh
        - s * w / n * gh.sum(axis=reduce, keepdims=True)
        - s**3 * w * centered / n * (gh * centered).sum(axis=reduce, keepdims=True)
    )
    shape = param_shape(x.shape, axis)
    dgamma = (g * centered * s).sum(axis=reduce).reshape(shape)
    dbeta = g.sum(axis=reduce).reshape(shape)
    return dx, dgamma, dbeta


# ------------------------------------------------------ fresh processes


@pytest.fixture(name="run_python")
def _run_python_fixture():
    """`_procs.run_python`, as a fixture."""
    return run_python

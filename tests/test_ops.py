"""Tests of the pure batch-normalization math in `kerasbn.ops` (and the fused wrapper).

Everything is checked against float64 NumPy closed forms (`conftest.np_*`).
Runs under the TensorFlow and the JAX backend; the fused-kernel tests are
TensorFlow-only.
"""

import numpy as np
import pytest
from conftest import needs_float64, np_batch_norm, np_moments, param_shape, tf_only, to_numpy

import keras
from keras import ops

import kerasbn
from kerasbn import ops as bn_ops


def _reduce_axes(rank, axis):
    features = [a % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis])]
    return tuple(i for i in range(rank) if i not in features)


# ----------------------------------------------------------------- moments


@pytest.mark.parametrize(
    "shape, axis",
    [((6, 3), -1), ((4, 5, 3), -1), ((4, 3, 5), 1), ((3, 4, 2, 5), -1), ((3, 4, 2, 5), 1), ((2, 3, 2, 2, 4), [1, 4])],
)
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=needs_float64)])
def test_moments_match_numpy(rng, shape, axis, dtype):
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    axes = _reduce_axes(len(shape), axis)
    mean, variance = kerasbn.moments(ops.convert_to_tensor(x), axes)
    ref_mean, ref_variance = np_moments(x, axis)
    assert keras.backend.standardize_dtype(mean.dtype) == dtype
    atol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(to_numpy(mean), ref_mean, atol=atol)
    np.testing.assert_allclose(to_numpy(variance), ref_variance, atol=atol)


def test_moments_keepdims_keeps_reduced_axes(rng):
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    mean, variance = kerasbn.moments(x, (0, 2), keepdims=True)
    assert tuple(mean.shape) == (1, 3, 1) and tuple(variance.shape) == (1, 3, 1)
    ref_mean, ref_variance = np_moments(x, 1)
    np.testing.assert_allclose(to_numpy(mean).ravel(), ref_mean, atol=1e-6)
    np.testing.assert_allclose(to_numpy(variance).ravel(), ref_variance, atol=1e-5)


def test_moments_variance_is_biased(rng):
    x = np.array([[1.0], [2.0], [3.0], [6.0]], "float32")
    mean, variance = kerasbn.moments(x, (0,))
    np.testing.assert_allclose(to_numpy(mean), [3.0])
    # Divides by n = 4 (3.5), not n - 1 (4.666...).
    np.testing.assert_allclose(to_numpy(variance), [3.5], rtol=1e-6)


def test_moments_two_pass_keeps_digits_for_large_means(rng):
    # E[x^2] - E[x]^2 in float32 would lose every digit here (1e8 - 1e8).
    x = (1e4 + rng.normal(size=(256, 3))).astype("float32")
    _, variance = kerasbn.moments(x, (0,))
    _, ref_variance = np_moments(x, -1)
    np.testing.assert_allclose(to_numpy(variance), ref_variance, rtol=1e-3)


@pytest.mark.parametrize("shape", [(4, 5, 3), (3, 2, 4, 2)])
@pytest.mark.parametrize("mask_dtype", ["bool", "float32"])
def test_moments_with_keras_mask(rng, shape, mask_dtype):
    x = rng.normal(size=shape).astype("float32") * 2 + 1
    mask = rng.random(shape[:-1]) < 0.6
    mask.flat[0] = True
    # Masked positions hold huge values: they must not leak into the statistics.
    x[~mask] = 1e3
    axes = tuple(range(len(shape) - 1))
    mean, variance = kerasbn.moments(x, axes, mask=mask.astype(mask_dtype))
    ref_mean, ref_variance = np_moments(x, -1, mask)
    np.testing.assert_allclose(to_numpy(mean), ref_mean, atol=1e-5)
    np.testing.assert_allclose(to_numpy(variance), ref_variance, atol=1e-5)


def test_moments_all_masked_is_zero_not_nan(rng):
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    mean, variance = kerasbn.moments(x, (0, 1), mask=np.zeros((4, 5), bool))
    np.testing.assert_array_equal(to_numpy(mean), np.zeros(3))
    np.testing.assert_array_equal(to_numpy(variance), np.zeros(3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_moments_of_half_precision_are_float32(rng, dtype):
    x32 = (rng.normal(size=(64, 4)) * 4 + 100).astype("float32")
    x = ops.cast(x32, dtype)
    exact = to_numpy(ops.cast(x, "float32"))  # the half-rounded inputs, exactly
    mean, variance = kerasbn.moments(x, (0,))
    assert keras.backend.standardize_dtype(mean.dtype) == "float32"
    assert keras.backend.standardize_dtype(variance.dtype) == "float32"
    ref_mean, ref_variance = np_moments(exact, -1)
    # Float32 arithmetic on the rounded inputs: far tighter than half precision could give.
    np.testing.assert_allclose(to_numpy(mean), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(variance), ref_variance, rtol=1e-4)


def test_statistics_dtype():
    assert bn_ops.statistics_dtype("float16") == "float32"
    assert bn_ops.statistics_dtype("bfloat16") == "float32"
    assert bn_ops.statistics_dtype("float32") == "float32"
    assert bn_ops.statistics_dtype("float64") == "float64"
    for dtype in ("int32", "int64", "uint8", "bool"):  # as keras.layers.BatchNormalization computes them
        assert bn_ops.statistics_dtype(dtype) == "float32" == keras.backend.result_type(dtype, "float32")


def test_broadcast_and_reduction_axes():
    assert bn_ops.broadcast_shape(4, (3,), (5,)) == (1, 1, 1, 5)
    assert bn_ops.broadcast_shape(4, (3, 1), (2, 5)) == (1, 2, 1, 5)
    assert bn_ops.broadcast_shape(5, (2,), (7,)) == (1, 1, 7, 1, 1)
    assert bn_ops.reduction_axes(4, (1,)) == (0, 2, 3)
    assert bn_ops.reduction_axes(5, (1, 4)) == (0, 2, 3)
    assert bn_ops.reduction_axes(2, (1,)) == (0,)


# ------------------------------------------------- fold_affine / normalize


@pytest.mark.parametrize("with_gamma", [True, False])
@pytest.mark.parametrize("with_beta", [True, False])
def test_fold_affine_closed_form(rng, with_gamma, with_beta):
    mean = rng.normal(size=5)
    variance = rng.uniform(0.1, 3.0, size=5)
    gamma = rng.uniform(0.5, 2.0, size=5) if with_gamma else None
    beta = rng.normal(size=5) if with_beta else None
    eps = 1e-3
    a, b = kerasbn.fold_affine(
        *(None if t is None else ops.convert_to_tensor(t, "float32") for t in (mean, variance, gamma, beta)),
        epsilon=eps,
    )
    ref_a = (gamma if with_gamma else 1.0) / np.sqrt(variance + eps)
    ref_b = (beta if with_beta else 0.0) - mean * ref_a
    np.testing.assert_allclose(to_numpy(a), ref_a, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(b), ref_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, axis", [((6, 3), -1), ((3, 4, 2, 5), 1), ((2, 3, 2, 4), [1, 3])])
def test_normalize_matches_closed_form(rng, shape, axis):
    x = (rng.normal(size=shape) * 2 + 1).astype("float32")
    pshape = param_shape(shape, axis)
    mean = rng.normal(size=pshape)
    variance = rng.uniform(0.2, 3.0, size=pshape)
    gamma = rng.uniform(0.5, 1.5, size=pshape)
    beta = rng.normal(size=pshape)
    features = [a % len(shape) for a in np.atleast_1d(axis)]
    keep = [shape[i] if i in features else 1 for i in range(len(shape))]
    args = [ops.convert_to_tensor(np.reshape(t, keep), "float32") for t in (mean, variance, gamma, beta)]
    y = kerasbn.normalize(ops.convert_to_tensor(x), *args, epsilon=1e-3)
    ref = np_batch_norm(x, mean, variance, gamma, beta, 1e-3, axis)
    np.testing.assert_allclose(to_numpy(y), ref, atol=1e-5)


def test_normalize_with_batch_moments_has_zero_mean_unit_variance(rng):
    x = (rng.normal(size=(256, 4)) * 5 + 3).astype("float32")
    mean, variance = kerasbn.moments(x, (0,), keepdims=True)
    y = to_numpy(kerasbn.normalize(x, mean, variance, epsilon=1e-5))
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(y.std(axis=0), 1.0, atol=1e-3)


# ------------------------------------------------------- fold_into_kernel


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_dense_kernel(rng, with_bias):
    x = rng.normal(size=(5, 4)).astype("float32")
    kernel = rng.normal(size=(4, 3)).astype("float32")
    bias = rng.normal(size=3).astype("float32") if with_bias else None
    mean, variance = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    gamma, beta = rng.uniform(0.5, 1.5, size=3), rng.normal(size=3)
    t = lambda v: ops.convert_to_tensor(v, "float32")  # noqa: E731
    new_kernel, new_bias = kerasbn.fold_into_kernel(
        t(kernel), None if bias is None else t(bias), t(mean), t(variance), t(gamma), t(beta), epsilon=1e-3
    )
    folded = x.astype(np.float64) @ to_numpy(new_kernel) + to_numpy(new_bias)
    z = x.astype(np.float64) @ kernel + (0.0 if bias is None else bias)
    np.testing.assert_allclose(folded, np_batch_norm(z, mean, variance, gamma, beta, 1e-3, -1), atol=1e-5)


def test_fold_into_conv_kernel(rng):
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    kernel = rng.normal(size=(3, 3, 3, 4)).astype("float32")
    bias = rng.normal(size=4).astype("float32")
    mean, variance = rng.normal(size=4).astype("float32"), rng.uniform(0.5, 2.0, size=4).astype("float32")
    gamma, beta = rng.uniform(0.5, 1.5, size=4).astype("float32"), rng.normal(size=4).astype("float32")
    new_kernel, new_bias = kerasbn.fold_into_kernel(kernel, bias, mean, variance, gamma, beta, epsilon=1e-3)
    folded = ops.conv(x, new_kernel, padding="valid") + new_bias
    z = to_numpy(ops.conv(x, kernel, padding="valid")) + bias
    np.testing.assert_allclose(to_numpy(folded), np_batch_norm(z, mean, variance, gamma, beta, 1e-3, -1), atol=1e-4)


# --------------------------------------------------- TensorFlow-only ops


@tf_only
def test_cross_replica_moments_without_strategy_equals_moments(rng):
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    mask = rng.random((4, 3)) < 0.7
    mean, variance = kerasbn.cross_replica_moments(x, (0, 1), mask=mask)
    ref_mean, ref_variance = np_moments(x, -1, mask)
    np.testing.assert_allclose(to_numpy(mean), ref_mean, atol=1e-5)
    np.testing.assert_allclose(to_numpy(variance), ref_variance, atol=1e-5)


@tf_only
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_batch_norm_training_matches_reference(rng, data_format, affine):
    from kerasbn.fused import fused_batch_norm_training

    axis = -1 if data_format == "NHWC" else 1
    shape = (3, 4, 2, 5) if data_format == "NHWC" else (3, 5, 4, 2)
    x = (rng.normal(size=shape) * 2 + 1).astype("float32")
    gamma = rng.uniform(0.5, 1.5, size=5).astype("float32") if affine else None
    beta = rng.normal(size=5).astype("float32") if affine else None
    y, mean, variance = fused_batch_norm_training(x, gamma, beta, 1e-3, data_format)
    ref_mean, ref_variance = np_moments(x, axis)
    ref_y = np_batch_norm(
        x, ref_mean, ref_variance, np.ones(5) if gamma is None else gamma, np.zeros(5) if beta is None else beta, 1e-3, axis
    )
    np.testing.assert_allclose(to_numpy(y), ref_y, atol=1e-5)
    np.testing.assert_allclose(to_numpy(mean), ref_mean, atol=1e-5)
    # The kernel reports the unbiased variance; the wrapper must return the biased one.
    np.testing.assert_allclose(to_numpy(variance), ref_variance, atol=1e-5)


@pytest.mark.parametrize("rows, channels, expected_k", [(144, 6, 8), (16, 2, 8), (15, 2, 1), (12, 6, 4), (64, 16, 1), (64, 4, 4)])
def test_widened_moments_equal_moments(rows, channels, expected_k):
    k = bn_ops.widen_factor(rows, channels)
    assert k == expected_k
    x = np.random.default_rng(rows).normal(3.0, 2.0, size=(rows, channels)).astype("float32")
    stats = bn_ops.widened_deviations(keras.ops.reshape(x, (-1, k * channels)), channels)
    mean, variance = stats.pivot + stats.mean, stats.variance
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mean), x.astype("float64").mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variance), x.astype("float64").var(0), rtol=1e-5, atol=1e-6)


def test_renorm_affine_matches_the_paper(rng):
    """Ioffe (2017), eq. 2: r = sigma_B / sigma, d = (mu_B - mu) / sigma, clipped; then gamma * (x_hat * r + d) + beta."""
    mean, variance = rng.normal(size=5), rng.uniform(0.1, 4.0, size=5)
    renorm_mean, renorm_stddev = rng.normal(size=5), rng.uniform(0.5, 2.0, size=5)
    gamma, beta, epsilon = rng.normal(size=5), rng.normal(size=5), 1e-3
    clipping = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}
    r = np.clip(np.sqrt(variance + epsilon) / renorm_stddev, 0.8, 1.25)
    d = np.clip((mean - renorm_mean) / renorm_stddev, -0.5, 0.5)
    args = [ops.convert_to_tensor(v.astype("float32")) for v in (mean, variance, renorm_mean, renorm_stddev, gamma, beta)]
    g, b = bn_ops.renorm_affine(*args, epsilon, clipping)
    np.testing.assert_allclose(to_numpy(g), r * gamma, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(b), d * gamma + beta, rtol=1e-5, atol=1e-6)
    # Without gamma and beta, and at the renorm statistics themselves: r = 1, d = 0.
    stddev = np.sqrt(variance + epsilon).astype("float32")
    g, b = bn_ops.renorm_affine(args[0], args[1], args[0], ops.convert_to_tensor(stddev), None, None, epsilon)
    np.testing.assert_allclose(to_numpy(g), np.ones(5), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(b), np.zeros(5), atol=1e-6)

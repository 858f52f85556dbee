"""Ghost batches (`virtual_batch_size`) and batch renormalization (`renorm`)."""

import numpy as np
import pytest
from conftest import np_batch_norm, np_batch_norm_train, to_numpy
from _layer_helpers import (
    RENORM_STATS,
    assert_stats_close,
    build,
    layer_gradients,
    random_mask,
    randomize_weights,
    sample,
    value,
)

import keras

from kerasbn import BatchNorm


# ------------------------------------------------------ virtual batch size


VIRTUAL_CASES = [
    ((8, 3), -1, 2, False),
    ((8, 5, 3), -1, 4, False),
    ((6, 3, 2, 2), 1, 2, False),
    ((8, 5, 3), -1, 4, True),
    ((4, 3, 2, 5), [1, 3], 2, False),
]


@pytest.mark.parametrize("shape, axis, virtual_batch_size, masked", VIRTUAL_CASES)
def test_virtual_batch_size_normalizes_each_sub_batch(rng, shape, axis, virtual_batch_size, masked):
    momentum, epsilon = 0.8, 1e-3
    layer = build(BatchNorm(axis=axis, momentum=momentum, virtual_batch_size=virtual_batch_size), shape)
    weights = randomize_weights(rng, layer)
    moving_mean = weights["moving_mean"].astype(np.float64)
    moving_variance = weights["moving_variance"].astype(np.float64)
    for step in range(2):
        x = sample(rng, shape, loc=step, scale=1.0 + step)
        # Sub-batches with different statistics, so that ghost BN differs from plain BN.
        x[: virtual_batch_size] = 3.0 * x[: virtual_batch_size] + 2.0
        mask = random_mask(rng, shape) if masked else None
        y = to_numpy(layer(x, training=True, mask=mask))
        means, variances = [], []
        for start in range(0, shape[0], virtual_batch_size):
            part = slice(start, start + virtual_batch_size)
            expected, mean, variance = np_batch_norm_train(
                x[part], weights["gamma"], weights["beta"], epsilon, axis, None if mask is None else mask[part]
            )
            np.testing.assert_allclose(y[part], expected, atol=1e-5, rtol=1e-5)
            means.append(mean)
            variances.append(variance)
        whole, _, _ = np_batch_norm_train(x, weights["gamma"], weights["beta"], epsilon, axis, mask)
        assert not np.allclose(y, whole, atol=1e-2)
        moving_mean = momentum * moving_mean + (1 - momentum) * np.mean(means, axis=0)
        moving_variance = momentum * moving_variance + (1 - momentum) * np.mean(variances, axis=0)
    np.testing.assert_allclose(value(layer, "moving_mean"), moving_mean, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_variance"), moving_variance, atol=1e-5)
    # Inference uses the moving statistics, whatever the batch.
    x = sample(rng, shape)
    expected = np_batch_norm(x, moving_mean, moving_variance, weights["gamma"], weights["beta"], epsilon, axis)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), expected, atol=1e-5)


def test_virtual_batch_size_equal_to_batch_is_plain_batch_norm(rng):
    shape = (6, 4)
    ours = build(BatchNorm(virtual_batch_size=6, momentum=0.8), shape)
    stock = build(keras.layers.BatchNormalization(momentum=0.8), shape)
    randomize_weights(rng, ours, stock)
    x = sample(rng, shape, loc=1.0, scale=2.0)
    np.testing.assert_allclose(to_numpy(ours(x, training=True)), to_numpy(stock(x, training=True)), atol=1e-5)
    assert_stats_close(ours, stock, atol=1e-5)


# ------------------------------------------------------------------ renorm


@pytest.mark.parametrize(
    "shape, axis, clipping",
    [
        ((8, 3), -1, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}),
        ((4, 3, 2, 2), 1, {"rmax": 2.0, "dmax": 1.0}),
        ((4, 5, 3), -1, None),
    ],
)
def test_renorm_parity_with_keras(rng, shape, axis, clipping):
    kwargs = dict(axis=axis, renorm=True, renorm_clipping=clipping, renorm_momentum=0.7, momentum=0.8)
    ours = build(BatchNorm(**kwargs), shape)
    stock = build(keras.layers.BatchNormalization(**kwargs), shape)
    randomize_weights(rng, ours, stock, moving=False)
    # Shifting and rescaling batches, so that r and d hit their clipping limits.
    for step, (loc, scale) in enumerate([(2.0, 3.0), (-1.0, 0.3), (0.5, 1.0), (3.0, 5.0)]):
        x = sample(rng, shape, loc=loc, scale=scale)
        np.testing.assert_allclose(
            to_numpy(ours(x, training=True)), to_numpy(stock(x, training=True)), atol=1e-5, err_msg=f"step {step}"
        )
    assert_stats_close(ours, stock, names=RENORM_STATS, atol=1e-5)
    x = sample(rng, shape)
    np.testing.assert_allclose(to_numpy(ours(x, training=False)), to_numpy(stock(x, training=False)), atol=1e-5)


def test_renorm_gradients_match_keras(rng):
    shape, kwargs = (8, 3), dict(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, momentum=0.8)
    ours = build(BatchNorm(**kwargs), shape)
    stock = build(keras.layers.BatchNormalization(**kwargs), shape)
    randomize_weights(rng, ours, stock, moving=False)
    x = sample(rng, shape, loc=2.0, scale=3.0)
    upstream = rng.normal(size=shape).astype("float32")
    for name, got, want in zip(
        ("inputs", "gamma", "beta"), layer_gradients(ours, x, upstream), layer_gradients(stock, x, upstream)
    ):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


def test_ghost_batches_are_contiguous_and_equal_tf_keras_strided_ones_after_a_permutation(rng):
    """kerasbn: examples 0..v-1, v..2v-1, ...; tf-keras: k, k + B/v, k + 2B/v, ... (B/v groups of v)."""
    batch, size, shape = 12, 3, (12, 2, 4)
    groups = batch // size
    layer = build(BatchNorm(virtual_batch_size=size, momentum=0.0, center=False, scale=False), shape)
    x = sample(rng, shape)
    x[::groups] = 4.0 * x[::groups] + 3.0  # strided group 0 differs from the rest

    def strided_reference(x):  # tf-keras: reshape to (v, B/v, ...), statistics over axis 0 and the rest
        view = x.astype(np.float64).reshape((size, groups) + shape[1:])
        mean = view.mean(axis=(0, 2), keepdims=True)
        variance = view.var(axis=(0, 2), keepdims=True)
        return ((view - mean) / np.sqrt(variance + 1e-3)).reshape(shape), mean.mean(axis=1).ravel()

    expected, expected_mean = strided_reference(x)
    assert not np.allclose(to_numpy(layer(x, training=True)), expected, atol=1e-2)  # without the permutation
    order = np.array([k + j * groups for k in range(groups) for j in range(size)])  # strided groups, made contiguous
    outputs = to_numpy(layer(x[order], training=True))
    np.testing.assert_allclose(outputs[np.argsort(order)], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_mean"), expected_mean, rtol=1e-5, atol=1e-6)

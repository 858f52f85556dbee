"""`kerasbn.BatchNorm` with masks, non-finite padding, integer inputs and mixed precision."""

import numpy as np
import pytest
from conftest import np_batch_norm_train, np_moments, to_numpy
from _layer_helpers import (
    MASK_CASES,
    STATS,
    assert_stats_close,
    build,
    random_mask,
    randomize_weights,
    sample,
    value,
)

import keras
from keras import ops

from kerasbn import BatchNorm


# ------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape, axis", MASK_CASES)
def test_mask_matches_numpy_reference(rng, shape, axis):
    momentum, epsilon = 0.8, 1e-3
    layer = build(BatchNorm(axis=axis, momentum=momentum), shape)
    weights = randomize_weights(rng, layer)
    moving_mean = weights["moving_mean"].astype(np.float64)
    moving_variance = weights["moving_variance"].astype(np.float64)
    for step in range(3):
        x = sample(rng, shape, loc=step, scale=1.0 + step)
        mask = random_mask(rng, shape)
        x[~mask] += 100.0  # masked-out values are far off: any leak into the statistics shows
        expected, mean, variance = np_batch_norm_train(x, weights["gamma"], weights["beta"], epsilon, axis, mask)
        np.testing.assert_allclose(to_numpy(layer(x, training=True, mask=mask)), expected, atol=1e-4, rtol=1e-5)
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_variance = momentum * moving_variance + (1 - momentum) * variance
    np.testing.assert_allclose(value(layer, "moving_mean"), moving_mean, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_variance"), moving_variance, atol=1e-5)


@pytest.mark.parametrize("shape, axis", MASK_CASES)
def test_mask_parity_with_keras(rng, shape, axis):
    ours = build(BatchNorm(axis=axis, momentum=0.8), shape)
    stock = build(keras.layers.BatchNormalization(axis=axis, momentum=0.8), shape)
    randomize_weights(rng, ours, stock)
    for step in range(3):
        x = sample(rng, shape, loc=step, scale=1.0 + step)
        mask = random_mask(rng, shape)
        np.testing.assert_allclose(
            to_numpy(ours(x, training=True, mask=mask)), to_numpy(stock(x, training=True, mask=mask)), atol=1e-5
        )
    assert_stats_close(ours, stock, atol=1e-5)


def test_mask_propagated_from_embedding(rng):
    tokens = rng.integers(1, 10, size=(4, 6))
    tokens[:, 4:] = 0
    tokens[0, 2:] = 0
    embedding = keras.layers.Embedding(10, 3, mask_zero=True)
    bn = BatchNorm(momentum=0.0)
    model = keras.Sequential([keras.Input((6,), dtype="int32"), embedding, bn])
    model(tokens, training=True)
    embedded = to_numpy(embedding(tokens))
    mean, variance = np_moments(embedded, -1, tokens != 0)
    np.testing.assert_allclose(value(bn, "moving_mean"), mean, atol=1e-5)
    np.testing.assert_allclose(value(bn, "moving_variance"), variance, atol=1e-5)


# ------------------------------- drop-in at the edges: side by side with the stock layer


def _side_by_side(rng, shape, axis=-1, momentum=0.8):
    """A kerasbn layer and a stock keras.layers.BatchNormalization, built, with the same weights."""
    ours = build(BatchNorm(axis=axis, momentum=momentum), shape)
    stock = build(keras.layers.BatchNormalization(axis=axis, momentum=momentum), shape)
    randomize_weights(rng, ours, stock)
    return ours, stock


@pytest.mark.parametrize("padding", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("shape, axis", MASK_CASES)
def test_non_finite_values_at_masked_positions_are_ignored_like_keras(rng, shape, axis, padding):
    ours, stock = _side_by_side(rng, shape, axis)
    for step in range(2):
        x = sample(rng, shape, loc=step)
        mask = random_mask(rng, shape)
        x[~mask] = padding
        got, want = (to_numpy(layer(x, training=True, mask=mask)) for layer in (ours, stock))
        np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    for name in STATS:
        assert np.all(np.isfinite(value(ours, name))), name
    assert_stats_close(ours, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 3, 4), (4, 6, 6, 6), (4, 3, 5)])
def test_integer_inputs_compute_in_float32_like_keras(rng, shape):
    ours, stock = _side_by_side(rng, shape)
    x = rng.integers(-5, 20, size=shape).astype("int32")
    for training in (True, False):
        got, want = (layer(x, training=training) for layer in (ours, stock))
        assert keras.backend.standardize_dtype(got.dtype) == keras.backend.standardize_dtype(want.dtype) == "float32"
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-5, err_msg=f"training={training}")
    assert_stats_close(ours, stock, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------- mixed precision


@pytest.mark.parametrize("dtype_policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("shape, axis", [((8, 3), -1), ((4, 3, 3, 2), -1), ((4, 2, 3, 3), 1)])
def test_mixed_precision(rng, dtype_policy, shape, axis):
    half = "float16" if dtype_policy == "mixed_float16" else "bfloat16"
    # Output rounding is 2^-11 (float16) or 2^-8 (bfloat16) relative, |y| < ~6.
    output_atol = 5e-3 if half == "float16" else 5e-2
    # Statistics of the half-rounded inputs vs. of the float32 inputs.
    stats_tol = 3e-3 if half == "float16" else 3e-2
    momentum, epsilon = 0.8, 1e-3
    layer = build(BatchNorm(axis=axis, momentum=momentum), shape)
    reference = build(BatchNorm(axis=axis, momentum=momentum, dtype="float32"), shape)
    assert layer.compute_dtype == half and layer.variable_dtype == "float32"
    assert reference.compute_dtype == "float32"
    weights = randomize_weights(rng, layer, reference)
    moving_mean = weights["moving_mean"].astype(np.float64)
    moving_variance = weights["moving_variance"].astype(np.float64)
    for step in range(3):
        x = sample(rng, shape, loc=step, scale=1.0 + step)
        y = layer(x, training=True)
        reference(x, training=True)
        assert keras.backend.standardize_dtype(y.dtype) == half
        rounded = to_numpy(ops.cast(ops.cast(x, half), "float32"))  # what the layer actually sees
        expected, mean, variance = np_batch_norm_train(rounded, weights["gamma"], weights["beta"], epsilon, axis)
        np.testing.assert_allclose(to_numpy(ops.cast(y, "float32")), expected, atol=output_atol)
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_variance = momentum * moving_variance + (1 - momentum) * variance
    for name in ("gamma", "beta") + STATS:
        assert getattr(layer, name).dtype == "float32", name
    # Statistics are computed in float32: exact for the rounded inputs, far
    # tighter than half precision arithmetic could be.
    np.testing.assert_allclose(value(layer, "moving_mean"), moving_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_variance"), moving_variance, rtol=1e-5, atol=1e-5)
    assert_stats_close(layer, reference, rtol=stats_tol, atol=stats_tol)
    x = sample(rng, shape)
    y = layer(x, training=False)
    assert keras.backend.standardize_dtype(y.dtype) == half
    np.testing.assert_allclose(
        to_numpy(ops.cast(y, "float32")), to_numpy(reference(x, training=False)), atol=output_atol + stats_tol * 4
    )


@pytest.mark.parametrize("dtype_policy", ["mixed_float16"], indirect=True)
def test_mixed_precision_statistics_do_not_overflow(rng, dtype_policy):
    # The sum of 2048 values near 300 (and of their squares) overflows float16 (max 65504).
    layer = build(BatchNorm(momentum=0.0), (2048, 2))
    x = (300.0 + rng.normal(size=(2048, 2))).astype("float32")
    y = to_numpy(ops.cast(layer(x, training=True), "float32"))
    assert np.isfinite(y).all()
    rounded = x.astype(np.float16).astype(np.float64)
    mean, variance = np_moments(rounded, -1)
    np.testing.assert_allclose(value(layer, "moving_mean"), mean, rtol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_variance"), variance, rtol=1e-3)

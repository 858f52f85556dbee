"""Single-device tests of `kerasbn.BatchNorm` and `kerasbn.recompute_statistics`.

References: stock `keras.layers.BatchNormalization` given identical weights,
and float64 NumPy closed forms (`conftest.np_*`). Runs under the TensorFlow
and the JAX backend; TensorFlow-only features (fused kernel, tf.function
inference path, XLA, SavedModel) are marked `tf_only` and skip under JAX.
"""

import inspect
import json
import re

import numpy as np
import pytest
from conftest import (
    BACKEND,
    np_batch_norm,
    np_batch_norm_grads,
    np_batch_norm_train,
    np_moments,
    param_shape,
    tf_only,
    to_numpy,
)

import keras
from keras import ops

import kerasbn
from kerasbn import BatchNorm

STATS = ("moving_mean", "moving_variance")
TF_INSTALL = "(`pip install 'kerasbn[tensorflow]'`, KERAS_BACKEND=tensorflow). "
RENORM_STATS = STATS + ("moving_stddev", "renorm_mean", "renorm_stddev")

# (shape, axis): ranks 2 to 5, channels on the last axis and on axis 1.
RANK_AXIS_CASES = [
    ((6, 3), -1),
    ((6, 3), 1),
    ((4, 3, 5), -1),
    ((4, 5, 3), 1),
    ((3, 4, 2, 5), -1),
    ((3, 5, 4, 2), 1),
    ((2, 3, 2, 2, 4), -1),
    ((2, 4, 3, 2, 2), 1),
]
MULTI_AXIS_CASES = [
    ((4, 3, 2, 5), [1, 3]),
    ((4, 3, 5), [1, 2]),
    ((2, 3, 2, 2, 4), [-1, 1]),
    ((4, 3, 2, 5), [3, 1]),
]


# ----------------------------------------------------------------- helpers


def sample(rng, shape, loc=0.0, scale=1.0):
    """Random float32 inputs whose features have different means and spreads."""
    offsets = rng.uniform(-1.0, 1.0, size=shape[1:])
    spread = rng.uniform(0.5, 1.5, size=shape[1:])
    return (loc + offsets + scale * spread * rng.normal(size=shape)).astype("float32")


def build(layer, shape):
    layer.build(shape)
    return layer


def randomize_weights(rng, *layers, moving=True):
    """Draws gamma, beta (and the moving statistics) once and assigns them to every layer."""
    shape = tuple(layers[0].moving_mean.shape)
    values = {
        "gamma": rng.uniform(0.5, 1.5, size=shape),
        "beta": rng.normal(size=shape),
    }
    if moving:
        values["moving_mean"] = 0.5 * rng.normal(size=shape)
        values["moving_variance"] = rng.uniform(0.5, 2.0, size=shape)
    for layer in layers:
        for name, value in values.items():
            variable = getattr(layer, name)
            if variable is not None:
                variable.assign(value.astype("float32"))
    return {name: value.astype("float32") for name, value in values.items()}


def value(layer, name):
    return to_numpy(getattr(layer, name))


def assert_stats_close(ours, reference, names=STATS, **tolerance):
    for name in names:
        np.testing.assert_allclose(value(ours, name), value(reference, name), err_msg=name, **tolerance)


def layer_gradients(layer, x, upstream, mask=None):
    """Gradients of `sum(upstream * layer(x, training=True))` w.r.t. (x, gamma, beta), as NumPy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
        grads = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, inputs):
            outputs, _ = layer.stateless_call(trainable, non_trainable, inputs, training=True, mask=mask)
            return jnp.sum(outputs.astype("float32") * upstream)

        grad_trainable, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, jnp.asarray(x))
        by_name = dict(zip([v.name for v in layer.trainable_variables], grad_trainable))
        grads = [grad_x, by_name["gamma"], by_name["beta"]]
    else:
        pytest.skip(f"no gradient helper for backend {BACKEND!r}")
    return [to_numpy(g) for g in grads]


# ------------------------------------------------------------ the weights


@pytest.mark.parametrize(
    "kwargs, trainable, non_trainable",
    [
        ({}, ["gamma", "beta"], ["moving_mean", "moving_variance"]),
        ({"center": False}, ["gamma"], ["moving_mean", "moving_variance"]),
        ({"scale": False, "center": False}, [], ["moving_mean", "moving_variance"]),
        (
            {"renorm": True},
            ["gamma", "beta"],
            ["moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"],
        ),
    ],
)
def test_weights_and_initial_values(kwargs, trainable, non_trainable):
    layer = build(BatchNorm(**kwargs), (None, 2, 5))
    assert [v.name for v in layer.trainable_variables] == trainable
    assert [v.name for v in layer.non_trainable_variables] == non_trainable
    for v in layer.weights:
        assert tuple(v.shape) == (5,) and v.dtype == "float32", v.name
    np.testing.assert_array_equal(value(layer, "moving_mean"), np.zeros(5))
    # Ones, not zeros: a zero variance would blow up at inference.
    np.testing.assert_array_equal(value(layer, "moving_variance"), np.ones(5))
    if "gamma" in trainable:
        np.testing.assert_array_equal(value(layer, "gamma"), np.ones(5))
    if "beta" in trainable:
        np.testing.assert_array_equal(value(layer, "beta"), np.zeros(5))
    if kwargs.get("renorm"):
        for name in ("moving_stddev", "renorm_stddev"):
            np.testing.assert_array_equal(value(layer, name), np.ones(5))


def test_multi_axis_weights_have_the_feature_shape():
    layer = build(BatchNorm(axis=[3, 1]), (None, 3, 2, 5))
    for v in layer.weights:
        assert tuple(v.shape) == (3, 5), v.name


# ----------------------------------------------- parity with the stock layer


@pytest.mark.parametrize("shape, axis", RANK_AXIS_CASES)
def test_parity_with_keras_batch_normalization(rng, shape, axis):
    ours = build(BatchNorm(axis=axis, momentum=0.8), shape)
    stock = build(keras.layers.BatchNormalization(axis=axis, momentum=0.8), shape)
    initial = randomize_weights(rng, ours, stock)
    for step in range(3):
        x = sample(rng, shape, loc=step - 1.0, scale=1.0 + step)
        np.testing.assert_allclose(
            to_numpy(ours(x, training=True)), to_numpy(stock(x, training=True)), atol=1e-5, err_msg=f"step {step}"
        )
    assert_stats_close(ours, stock, atol=1e-5)
    # The moving statistics really moved (so the comparison above means something).
    assert not np.allclose(value(ours, "moving_mean"), initial["moving_mean"], atol=1e-2)
    x = sample(rng, shape, loc=0.5, scale=2.0)
    for training in (False, None):
        np.testing.assert_allclose(
            to_numpy(ours(x, training=training)), to_numpy(stock(x, training=training)), atol=1e-5
        )


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((6, 3), {"center": False}),
        ((4, 3, 5), {"scale": False}),
        ((3, 4, 2, 5), {"epsilon": 1e-5}),
        ((3, 4, 2, 5), {"axis": 2, "epsilon": 0.1}),
        pytest.param((6, 3), {"synchronized": True}, marks=tf_only),
    ],
)
def test_parity_with_keras_for_other_arguments(rng, shape, kwargs):
    kwargs = {"momentum": 0.7, **kwargs}
    ours = build(BatchNorm(**kwargs), shape)
    stock = build(keras.layers.BatchNormalization(**kwargs), shape)
    randomize_weights(rng, ours, stock)
    for step in range(3):
        x = sample(rng, shape, loc=step, scale=1.0 + step)
        np.testing.assert_allclose(to_numpy(ours(x, training=True)), to_numpy(stock(x, training=True)), atol=1e-5)
    assert_stats_close(ours, stock, atol=1e-5)
    x = sample(rng, shape)
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(stock(x)), atol=1e-5)


# ------------------------------------------------- float64 NumPy reference


@pytest.mark.parametrize("shape, axis", RANK_AXIS_CASES[::2] + MULTI_AXIS_CASES)
def test_matches_numpy_reference_over_several_steps(rng, shape, axis):
    momentum, epsilon = 0.8, 1e-3
    layer = build(BatchNorm(axis=axis, momentum=momentum, epsilon=epsilon), shape)
    weights = randomize_weights(rng, layer)
    assert tuple(layer.moving_mean.shape) == param_shape(shape, axis)
    moving_mean, moving_variance = weights["moving_mean"].astype(np.float64), weights["moving_variance"].astype(np.float64)
    for step in range(3):
        x = sample(rng, shape, loc=step - 1.0, scale=1.0 + step)
        expected, mean, variance = np_batch_norm_train(x, weights["gamma"], weights["beta"], epsilon, axis)
        np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, atol=1e-5)
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_variance = momentum * moving_variance + (1 - momentum) * variance
    np.testing.assert_allclose(value(layer, "moving_mean"), moving_mean, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_variance"), moving_variance, atol=1e-5)
    x = sample(rng, shape)
    expected = np_batch_norm(x, moving_mean, moving_variance, weights["gamma"], weights["beta"], epsilon, axis)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), expected, atol=1e-5)


def test_training_output_is_standardized(rng):
    layer = build(BatchNorm(epsilon=1e-5), (512, 4))
    y = to_numpy(layer(sample(rng, (512, 4), loc=5.0, scale=3.0), training=True))
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(y.std(axis=0), 1.0, atol=1e-3)


# ------------------------------------------------------------------- masks


MASK_CASES = [((4, 5, 3), -1), ((3, 4, 2, 5), -1), ((4, 3, 5), 1)]


def _mask(rng, shape):
    mask = rng.random(shape[:-1]) < 0.6
    mask.flat[0] = mask.flat[-1] = True
    return mask


@pytest.mark.parametrize("shape, axis", MASK_CASES)
def test_mask_matches_numpy_reference(rng, shape, axis):
    momentum, epsilon = 0.8, 1e-3
    layer = build(BatchNorm(axis=axis, momentum=momentum), shape)
    weights = randomize_weights(rng, layer)
    moving_mean = weights["moving_mean"].astype(np.float64)
    moving_variance = weights["moving_variance"].astype(np.float64)
    for step in range(3):
        x = sample(rng, shape, loc=step, scale=1.0 + step)
        mask = _mask(rng, shape)
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
        mask = _mask(rng, shape)
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


# --------------------------------------------------------------- gradients


GRADIENT_CASES = [
    ((6, 3), -1, False),
    ((4, 5, 3), 1, False),
    ((3, 4, 2, 5), -1, False),
    ((3, 5, 4, 2), 1, False),
    ((4, 5, 3), -1, True),
    ((4, 3, 2, 5), [1, 3], False),
]


@pytest.mark.parametrize("shape, axis, masked", GRADIENT_CASES)
def test_gradients_match_closed_form_and_keras(rng, shape, axis, masked):
    epsilon = 1e-3
    ours = build(BatchNorm(axis=axis, epsilon=epsilon), shape)
    weights = randomize_weights(rng, ours)
    x = sample(rng, shape, loc=1.0, scale=2.0)
    upstream = rng.normal(size=shape).astype("float32")
    mask = _mask(rng, shape) if masked else None
    grads = layer_gradients(ours, x, upstream, mask)
    expected = np_batch_norm_grads(x, upstream, weights["gamma"], epsilon, axis, mask)
    for name, got, want in zip(("inputs", "gamma", "beta"), grads, expected):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)
    if isinstance(axis, int):
        stock = build(keras.layers.BatchNormalization(axis=axis, epsilon=epsilon), shape)
        randomize_weights(rng, stock)
        for v, w in zip(stock.weights, ours.weights):
            v.assign(w)
        for name, got, want in zip(("inputs", "gamma", "beta"), grads, layer_gradients(stock, x, upstream, mask)):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


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
        mask = _mask(rng, shape) if masked else None
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


# ---------------------------------------------------------- trainable=False


@pytest.mark.parametrize("shape, axis", [((6, 3), -1), ((3, 4, 2, 5), -1), ((3, 5, 4, 2), 1)])
def test_frozen_layer_runs_in_inference_mode(rng, shape, axis):
    layer = build(BatchNorm(axis=axis, momentum=0.5), shape)
    weights = randomize_weights(rng, layer)
    layer.trainable = False
    assert layer.trainable_variables == []
    x = sample(rng, shape, loc=2.0, scale=3.0)
    y = to_numpy(layer(x, training=True))
    expected = np_batch_norm(
        x, weights["moving_mean"], weights["moving_variance"], weights["gamma"], weights["beta"], 1e-3, axis
    )
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_array_equal(value(layer, "moving_mean"), weights["moving_mean"])
    np.testing.assert_array_equal(value(layer, "moving_variance"), weights["moving_variance"])
    # Unfrozen, the same call trains again.
    layer.trainable = True
    layer(x, training=True)
    assert not np.allclose(value(layer, "moving_mean"), weights["moving_mean"], atol=1e-2)


def test_frozen_layer_in_fit_keeps_moving_statistics(rng):
    bn = BatchNorm(momentum=0.5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), bn])
    bn.trainable = False
    before = [value(bn, name) for name in STATS]
    model.compile(optimizer="sgd", loss="mse")
    model.fit(sample(rng, (8, 4), loc=3.0), rng.normal(size=(8, 3)), batch_size=4, epochs=1, verbose=0)
    for name, old in zip(STATS, before):
        np.testing.assert_array_equal(value(bn, name), old)


# -------------------------------------------------- assign_moving_average


def test_assign_moving_average_formula_and_direction(rng):
    layer = build(BatchNorm(momentum=0.9), (None, 4))
    old = rng.normal(size=4).astype("float32")
    new = rng.normal(size=4).astype("float32")
    layer.moving_mean.assign(old)
    returned = layer.assign_moving_average(layer.moving_mean, new)
    assert returned is layer.moving_mean
    np.testing.assert_allclose(value(layer, "moving_mean"), 0.9 * old + 0.1 * new, rtol=1e-6, atol=1e-7)
    # Momentum weighs the old value (Keras), not the new one (PyTorch).
    layer.moving_variance.assign(np.zeros(4, "float32"))
    layer.assign_moving_average(layer.moving_variance, np.ones(4, "float32"))
    np.testing.assert_allclose(value(layer, "moving_variance"), np.full(4, 0.1), rtol=1e-6)
    # An explicit momentum overrides the layer's; 0 takes the new value.
    layer.assign_moving_average(layer.moving_variance, np.full(4, 2.0, "float32"), momentum=0.5)
    np.testing.assert_allclose(value(layer, "moving_variance"), np.full(4, 1.05), rtol=1e-6)
    layer.assign_moving_average(layer.moving_variance, new, momentum=0.0)
    np.testing.assert_allclose(value(layer, "moving_variance"), new, rtol=1e-6)
    assert layer.momentum == 0.9


# ----------------------------------------------------- TensorFlow: fused


def _traced_op_types(layer, x, mask=None):
    import tensorflow as tf

    specs = [tf.TensorSpec(x.shape, tf.as_dtype(x.dtype))]
    if mask is None:
        function = tf.function(lambda t: layer(t, training=True))
    else:
        specs.append(tf.TensorSpec(mask.shape, tf.bool))
        function = tf.function(lambda t, m: layer(t, training=True, mask=m))
    graph = function.get_concrete_function(*specs).graph
    return {op.type for op in graph.get_operations()}


FUSED_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}


def plan_of(layer, shape, dtype, training, masked=False, device=None):
    """The layer's path plan for inputs of this static shape and dtype (device None: this machine's)."""
    return layer._plan(keras.KerasTensor(shape, dtype=dtype), training=training, masked=masked, device=device)


def _fused_true_can(shape, kwargs, dtype, masked) -> bool:
    """Whether a layer with fused=True takes these inputs (it raises where it cannot)."""
    try:
        layer = build(BatchNorm(dtype=dtype, **{**kwargs, "fused": True}), shape)
        plan_of(layer, shape, dtype, training=True, masked=masked, device="GPU")
    except ValueError:
        return False
    return True


@tf_only
@pytest.mark.parametrize(
    "shape, kwargs, dtype, masked, fused_expected",
    [
        ((2, 3, 3, 4), {}, "float32", False, True),
        ((2, 4, 3, 3), {"axis": 1}, "float32", False, True),
        ((2, 3, 3, 4), {"fused": True}, "float32", False, True),
        ((2, 3, 3, 4), {"epsilon": 1.001e-5}, "float32", False, True),
        ((2, 3, 3, 4), {"fused": False}, "float32", False, False),
        ((2, 4, 3, 3), {"axis": 1, "fused": False}, "float32", False, False),
        ((2, 3, 3, 4), {"epsilon": 1e-5}, "float32", False, False),
        ((2, 3, 3, 4), {"epsilon": 1e-6}, "float32", False, False),
        ((2, 3, 3, 4), {}, "float64", False, False),
        ((2, 3, 3, 4), {}, "float32", True, False),
        ((2, 3, 3, 4), {"renorm": True}, "float32", False, False),
        ((2, 3, 3, 4), {"virtual_batch_size": 1}, "float32", False, False),
        ((2, 3, 3, 4), {"axis": 2}, "float32", False, False),
        ((2, 3, 3, 4), {"axis": [1, 3]}, "float32", False, False),
        # Other ranks normalized over the last axis only can go in as (-1, 1, 1, channels);
        # fused=None does so where that was faster on CPU (>= 100,000 elements).
        ((6, 3), {"fused": True}, "float32", False, True),
        ((2, 3, 4), {"fused": True}, "float32", False, True),
        ((2, 3, 2, 2, 4), {"fused": True}, "float32", False, True),
        ((6, 3), {}, "float32", False, False),
        ((2, 3, 2, 2, 4), {}, "float32", False, False),
        ((1024, 120), {}, "float32", False, True),
        # 4-D NHWC on CPU: fused where the channel count is a multiple of 4.
        ((2, 3, 3, 6), {}, "float32", False, False),
        ((2, 3, 3, 6), {"fused": True}, "float32", False, True),
        ((2, 6, 3, 3), {"axis": 1}, "float32", False, True),  # NCHW: the kernel was faster at any count
        ((2, 3, 4), {"axis": 1}, "float32", False, False),
        ((2, 3, 2, 2, 4), {"axis": 1}, "float32", False, False),
        # Without a strategy, synchronized statistics are local ones: fused is exact.
        ((2, 3, 3, 4), {"synchronized": True}, "float32", False, True),
    ],
)
def test_fused_is_used_exactly_where_exact(rng, shape, kwargs, dtype, masked, fused_expected):
    layer = build(BatchNorm(dtype=dtype, **kwargs), shape)
    # The CPU rule, pinned, so the expectation holds on a machine with a GPU too.
    plan = plan_of(layer, shape, dtype, training=True, masked=masked, device="CPU")
    assert (plan.path == "fused") == fused_expected, plan
    # On a GPU the rule takes the fused kernel where TensorFlow's own layer did
    # (4-D inputs, wherever fused=True could), and anything else only on request.
    on_gpu = plan_of(layer, shape, dtype, training=True, masked=masked, device="GPU")
    can = _fused_true_can(shape, kwargs, dtype, masked)
    assert (on_gpu.path == "fused") == (kwargs.get("fused") is True or (
        kwargs.get("fused") is None and len(shape) == 4 and can)), on_gpu
    assert on_gpu.path != "widened"
    # The traced graph runs the plan this machine gets.
    x = rng.normal(size=shape).astype(dtype)
    mask = _mask(rng, shape) if masked else None
    ops_seen = _traced_op_types(layer, x, mask)
    here = plan_of(layer, shape, dtype, training=True, masked=masked)
    assert bool(ops_seen & FUSED_OPS) == (here.path == "fused"), sorted(t for t in ops_seen if "Batch" in t or "Mean" in t)


@tf_only
@pytest.mark.parametrize(
    "shape, axis",
    [((3, 4, 3, 5), -1), ((3, 4, 3, 5), 3), ((3, 5, 4, 3), 1), ((6, 3), -1), ((4, 3, 5), -1), ((2, 3, 2, 2, 4), -1)],
)
def test_fused_true_false_none_agree(rng, shape, axis):
    layers = {fused: build(BatchNorm(axis=axis, momentum=0.8, fused=fused), shape) for fused in (True, False, None)}
    randomize_weights(rng, *layers.values())
    for step in range(3):
        x = sample(rng, shape, loc=step - 1.0, scale=1.0 + step)
        outputs = {fused: to_numpy(layer(x, training=True)) for fused, layer in layers.items()}
        for fused in (True, None):
            np.testing.assert_allclose(outputs[fused], outputs[False], rtol=1e-5, atol=1e-5, err_msg=f"fused={fused}")
    for fused in (True, None):
        assert_stats_close(layers[fused], layers[False], rtol=1e-5, atol=1e-5)
    x = sample(rng, shape, loc=0.5)
    for fused in (True, None):
        np.testing.assert_allclose(
            to_numpy(layers[fused](x, training=False)), to_numpy(layers[False](x, training=False)), atol=1e-5
        )
    # Gradients through the fused kernel equal those of the generic path.
    upstream = rng.normal(size=shape).astype("float32")
    reference = layer_gradients(layers[False], x, upstream)
    for fused in (True, None):
        for name, got, want in zip(("inputs", "gamma", "beta"), layer_gradients(layers[fused], x, upstream), reference):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"fused={fused} d/d{name}")


@tf_only
@pytest.mark.parametrize("epsilon", [1e-5, 1e-6])
def test_small_epsilon_is_exact(rng, epsilon):
    """Below 1.001e-5 (cuDNN's historical minimum) the layer avoids the fused kernel; the result is exact."""
    shape = (4, 3, 3, 2)
    # A variance of about 1e-6, so that epsilon matters (a clamp to 1.001e-5 would show at rtol 1e-5).
    x = (1e-3 * rng.normal(size=shape)).astype("float32")
    layer = build(BatchNorm(epsilon=epsilon, center=False, scale=False, momentum=0.0), shape)
    expected, mean, variance = np_batch_norm_train(x, np.ones(2), np.zeros(2), epsilon, -1)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(value(layer, "moving_variance"), variance, rtol=1e-5)
    clamped = np_batch_norm(x, mean, variance, np.ones(2), np.zeros(2), 1.001e-5, -1)
    assert not np.allclose(clamped, expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------- TensorFlow: XLA


XLA_CASES = [
    ((3, 4, 2, 5), {"axis": -1}),
    ((3, 5, 4, 2), {"axis": 1}),
    ((4, 3, 5), {"axis": -1}),
    ((4, 3, 2, 5), {"axis": [1, 3]}),
    ((8, 3), {"virtual_batch_size": 4}),
    ((8, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}}),
]


@tf_only
@pytest.mark.parametrize("shape, kwargs", XLA_CASES)
def test_xla_training_step_matches_non_xla(rng, shape, kwargs):
    import tensorflow as tf

    xla_layer = build(BatchNorm(momentum=0.8, **kwargs), shape)
    plain_layer = build(BatchNorm(momentum=0.8, **kwargs), shape)
    randomize_weights(rng, xla_layer, plain_layer, moving=not kwargs.get("renorm"))
    xla_step = tf.function(lambda t: xla_layer(t, training=True), jit_compile=True)
    plain_step = tf.function(lambda t: plain_layer(t, training=True), jit_compile=False)
    for step in range(3):
        x = tf.constant(sample(rng, shape, loc=step - 1.0, scale=1.0 + step))
        np.testing.assert_allclose(to_numpy(xla_step(x)), to_numpy(plain_step(x)), rtol=1e-5, atol=1e-5)
    names = [v.name for v in plain_layer.non_trainable_variables]
    assert_stats_close(xla_layer, plain_layer, names=names, rtol=1e-5, atol=1e-5)
    # It really was compiled by XLA (this raises for graphs XLA cannot compile).
    assert "HloModule" in xla_step.experimental_get_compiler_ir(x)(stage="hlo")
    x = tf.constant(sample(rng, shape))
    xla_inference = tf.function(lambda t: xla_layer(t, training=False), jit_compile=True)
    np.testing.assert_allclose(to_numpy(xla_inference(x)), to_numpy(plain_layer(x, training=False)), rtol=1e-5, atol=1e-5)


# ------------------------------------- TensorFlow: the compiled inference path


def _trained_layer(rng, shape, axis):
    layer = build(BatchNorm(axis=axis, momentum=0.5), shape)
    randomize_weights(rng, layer)
    for step in range(2):
        layer(sample(rng, shape, loc=step, scale=2.0), training=True)
    return layer


@tf_only
@pytest.mark.parametrize("shape, axis", [((6, 3), -1), ((3, 5, 4, 2), 1), ((4, 3, 2, 5), [1, 3])])
def test_inference_function_equals_call_and_traces_once(rng, shape, axis):
    layer = _trained_layer(rng, shape, axis)
    function = layer.inference_function
    assert layer.inference_function is function
    for batch in (1, 3, 7):
        x = sample(rng, (batch,) + shape[1:], loc=1.0)
        np.testing.assert_allclose(to_numpy(function(x)), to_numpy(layer(x, training=False)), rtol=1e-5, atol=1e-6)
    assert layer.inference_trace_count == 1
    # It reads the variables, not a snapshot taken at trace time.
    layer(sample(rng, shape, loc=-2.0, scale=3.0), training=True)
    x = sample(rng, (2,) + shape[1:])
    np.testing.assert_allclose(to_numpy(function(x)), to_numpy(layer(x, training=False)), rtol=1e-5, atol=1e-6)
    assert layer.inference_trace_count == 1


@tf_only
@pytest.mark.parametrize("dtype_policy", ["mixed_float16"], indirect=True)
def test_inference_function_under_mixed_precision(rng, dtype_policy):
    shape = (4, 3, 3, 2)
    layer = _trained_layer(rng, shape, -1)
    x = sample(rng, (3,) + shape[1:])
    half = ops.cast(x, "float16")
    y = layer.inference_function(half)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    np.testing.assert_array_equal(to_numpy(y), to_numpy(layer(half, training=False)))
    assert layer.inference_trace_count == 1


@tf_only
def test_inference_function_saved_model_round_trip(rng, tmp_path):
    import tensorflow as tf

    shape = (3, 4, 2, 5)
    layer = _trained_layer(rng, shape, -1)
    module = tf.Module()
    module.layer = layer
    module.serve = layer.inference_function
    path = str(tmp_path / "saved_model")
    tf.saved_model.save(module, path, signatures={"serving_default": layer.inference_function})
    reloaded = tf.saved_model.load(path)
    for batch in (1, 4):
        x = sample(rng, (batch,) + shape[1:], loc=0.5)
        expected = to_numpy(layer(x, training=False))
        np.testing.assert_allclose(reloaded.serve(x).numpy(), expected, rtol=1e-5, atol=1e-6)
        served = reloaded.signatures["serving_default"](inputs=tf.constant(x))
        np.testing.assert_allclose(next(iter(served.values())).numpy(), expected, rtol=1e-5, atol=1e-6)


@tf_only
def test_inference_function_needs_a_built_layer():
    with pytest.raises(RuntimeError, match=re.escape("Layer 'unbuilt_bn' must be built before its inference_function is used.")):
        BatchNorm(name="unbuilt_bn").inference_function


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the error on non-TensorFlow backends")
def test_inference_function_needs_tensorflow():
    layer = build(BatchNorm(), (None, 3))
    with pytest.raises(
        RuntimeError,
        match=re.escape(f"`inference_function` needs the TensorFlow backend {TF_INSTALL}Received: backend {BACKEND!r}"),
    ):
        layer.inference_function


# ------------------------------------------------------------ serialization


def _constructor_arguments(cls):
    return {
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    }


def test_drop_in_arguments_and_defaults():
    ours = inspect.signature(BatchNorm.__init__).parameters
    stock = inspect.signature(keras.layers.BatchNormalization.__init__).parameters
    stock_arguments = _constructor_arguments(keras.layers.BatchNormalization)
    assert stock_arguments <= _constructor_arguments(BatchNorm)
    for name in stock_arguments:
        assert ours[name].default == stock[name].default, name


def test_get_config_has_every_constructor_argument():
    config = BatchNorm().get_config()
    assert _constructor_arguments(BatchNorm) <= set(config)
    assert {"name", "trainable", "dtype"} <= set(config)


NON_DEFAULT_ARGUMENTS = dict(
    axis=[1, 3],
    momentum=0.9,
    epsilon=1e-4,
    center=False,
    scale=True,
    beta_initializer="random_normal",
    gamma_initializer=keras.initializers.Constant(2.0),
    moving_mean_initializer="ones",
    moving_variance_initializer=keras.initializers.Constant(3.0),
    beta_regularizer="l2",
    gamma_regularizer=keras.regularizers.L1(0.01),
    beta_constraint="non_neg",
    gamma_constraint=keras.constraints.MaxNorm(2.0),
    renorm=True,
    renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
    renorm_momentum=0.8,
    synchronized=True,
    sync_group_size=2,
    virtual_batch_size=2,
    fused=False,
    name="custom_bn",
    trainable=False,
)


def test_config_round_trip_with_every_argument_changed(rng):
    assert set(NON_DEFAULT_ARGUMENTS) >= _constructor_arguments(BatchNorm)
    layer = BatchNorm(**NON_DEFAULT_ARGUMENTS)
    config = layer.get_config()
    json.dumps(config)  # plain JSON, as a .keras file stores it
    for name in ("axis", "momentum", "epsilon", "center", "renorm", "renorm_clipping", "renorm_momentum",
                 "synchronized", "sync_group_size", "virtual_batch_size", "fused", "name", "trainable"):
        assert config[name] == NON_DEFAULT_ARGUMENTS[name], name
    clone = BatchNorm.from_config(config)
    assert clone.get_config() == config
    assert keras.initializers.serialize(clone.gamma_initializer) == keras.initializers.serialize(
        keras.initializers.Constant(2.0)
    )
    assert isinstance(clone.gamma_constraint, keras.constraints.MaxNorm)
    assert isinstance(clone.gamma_regularizer, keras.regularizers.L1)
    # Equal layers: same weights in, same numbers out.
    shape = (4, 3, 2, 5)
    build(layer, shape)
    build(clone, shape)
    np.testing.assert_array_equal(value(clone, "moving_variance"), np.full((3, 5), 3.0))
    np.testing.assert_array_equal(value(clone, "moving_stddev"), np.full((3, 5), np.sqrt(3.0), "float32"))
    for v, w in zip(clone.weights, layer.weights):
        v.assign(w)
    x = sample(rng, shape)
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(layer(x)))


def test_registered_and_deserializable_by_name():
    assert keras.saving.get_registered_name(BatchNorm) == "kerasbn>BatchNorm"
    layer = BatchNorm(axis=1, momentum=0.9, name="bn_by_name")
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is BatchNorm
    assert restored.get_config() == layer.get_config()
    assert restored.get_config()["axis"] == 1


def test_regularizer_losses(rng):
    layer = build(BatchNorm(gamma_regularizer=keras.regularizers.L2(0.1), beta_regularizer=keras.regularizers.L1(0.2)), (None, 4))
    weights = randomize_weights(rng, layer)
    expected = 0.1 * np.sum(weights["gamma"] ** 2) + 0.2 * np.sum(np.abs(weights["beta"]))
    assert len(layer.losses) == 2
    np.testing.assert_allclose(sum(float(to_numpy(loss)) for loss in layer.losses), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((4,), {}),
        ((3, 2, 4), {"axis": [1, 3]}),
        ((4,), {"renorm": True, "virtual_batch_size": 4}),
    ],
)
def test_keras_file_round_trip_after_fit(rng, tmp_path, input_shape, kwargs):
    bn = BatchNorm(momentum=0.5, name="bn", **kwargs)
    model = keras.Sequential(
        [keras.Input(input_shape), bn, keras.layers.Flatten(), keras.layers.Dense(2)], name="with_bn"
    )
    model.compile(optimizer="sgd", loss="mse")
    initial = {name: value(bn, name) for name in STATS}
    kernel_before = to_numpy(model.layers[-1].kernel)
    x = sample(rng, (16,) + input_shape, loc=2.0, scale=3.0)
    history = model.fit(x, rng.normal(size=(16, 2)), batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(to_numpy(model.layers[-1].kernel), kernel_before)
    for name in STATS:
        assert not np.allclose(value(bn, name), initial[name], atol=1e-2), name
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)  # no custom_objects: the layer is registered
    reloaded_bn = reloaded.get_layer("bn")
    assert type(reloaded_bn) is BatchNorm
    assert reloaded_bn.get_config() == bn.get_config()
    for variable in bn.weights:
        np.testing.assert_array_equal(value(reloaded_bn, variable.name), to_numpy(variable), err_msg=variable.name)
    x = sample(rng, (5,) + input_shape)
    np.testing.assert_array_equal(to_numpy(reloaded.predict(x, verbose=0)), to_numpy(model.predict(x, verbose=0)))


# --------------------------------------------------- recompute_statistics


def _recompute_model(rng, renorm=False):
    bn1 = BatchNorm(momentum=0.95, name="bn1", renorm=renorm)
    bn2 = BatchNorm(momentum=0.9, epsilon=1e-2, name="bn2", renorm=renorm)
    stock = keras.layers.BatchNormalization(momentum=0.5, name="stock_bn")
    dense1, dense2 = keras.layers.Dense(5, name="dense1"), keras.layers.Dense(3, name="dense2")
    model = keras.Sequential([keras.Input((4,)), dense1, bn1, dense2, bn2, stock], name="recompute")
    for layer in (bn1, bn2, stock):
        randomize_weights(rng, layer)
    dense1.bias.assign(rng.normal(size=5).astype("float32"))
    dense2.bias.assign(rng.normal(size=3).astype("float32"))
    return model


def _reference_population_statistics(model, batches):
    """Each kerasbn layer's batch statistics, run layer by layer in float64, averaged over the batches."""
    w1, b1 = (to_numpy(v).astype(np.float64) for v in model.get_layer("dense1").weights)
    w2, b2 = (to_numpy(v).astype(np.float64) for v in model.get_layer("dense2").weights)
    bn1 = model.get_layer("bn1")
    sums = {"bn1": [0.0, 0.0], "bn2": [0.0, 0.0]}
    for x in batches:
        h1 = np.asarray(x, np.float64) @ w1 + b1
        z1, mean1, variance1 = np_batch_norm_train(h1, value(bn1, "gamma"), value(bn1, "beta"), bn1.epsilon, -1)
        h2 = z1 @ w2 + b2
        mean2, variance2 = np_moments(h2, -1)
        for name, mean, variance in (("bn1", mean1, variance1), ("bn2", mean2, variance2)):
            sums[name][0] = sums[name][0] + mean
            sums[name][1] = sums[name][1] + variance
    return {name: (s[0] / len(batches), s[1] / len(batches)) for name, s in sums.items()}


@pytest.mark.parametrize(
    "dataset_kind",
    ["arrays", "tuples", pytest.param("tf.data", marks=tf_only)],
)
def test_recompute_statistics_equals_population_average(rng, dataset_kind):
    model = _recompute_model(rng)
    batches = [sample(rng, (6, 4), loc=float(i), scale=1.0 + i) for i in range(4)]
    targets = [rng.normal(size=(6, 3)).astype("float32") for _ in batches]
    if dataset_kind == "arrays":
        dataset = batches
    elif dataset_kind == "tuples":
        dataset = list(zip(batches, targets))
    else:
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), np.concatenate(targets))).batch(6)
    trainable_before = [to_numpy(v) for v in model.trainable_variables]
    stock = model.get_layer("stock_bn")
    stock_before = [to_numpy(v) for v in stock.weights]
    used = kerasbn.recompute_statistics(model, dataset, num_batches=3)
    assert used == 3
    expected = _reference_population_statistics(model, batches[:3])
    for name, momentum in (("bn1", 0.95), ("bn2", 0.9)):
        layer = model.get_layer(name)
        np.testing.assert_allclose(value(layer, "moving_mean"), expected[name][0], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(value(layer, "moving_variance"), expected[name][1], atol=1e-5, err_msg=name)
        assert layer.momentum == momentum and type(layer.momentum) is float
    for before, variable in zip(trainable_before, model.trainable_variables):
        np.testing.assert_array_equal(to_numpy(variable), before, err_msg=variable.path)
    for before, variable in zip(stock_before, stock.weights):
        np.testing.assert_array_equal(to_numpy(variable), before, err_msg=variable.path)


def test_recompute_statistics_uses_the_whole_dataset_by_default(rng):
    model = _recompute_model(rng)
    batches = [sample(rng, (5, 4), loc=float(i)) for i in range(3)]
    assert kerasbn.recompute_statistics(model, batches) == 3
    expected = _reference_population_statistics(model, batches)
    np.testing.assert_allclose(value(model.get_layer("bn2"), "moving_mean"), expected["bn2"][0], atol=1e-5)
    np.testing.assert_allclose(value(model.get_layer("bn2"), "moving_variance"), expected["bn2"][1], atol=1e-5)


def test_recompute_statistics_on_renorm_layers(rng):
    """As the docstring says: population moving statistics, moving_stddev in step, renorm statistics untouched."""
    model = _recompute_model(rng, renorm=True)
    for step in range(2):  # training steps first, so the renorm statistics hold values of their own
        model(sample(rng, (6, 4), loc=2.0 + step, scale=3.0), training=True)
    layers = [model.get_layer(name) for name in ("bn1", "bn2")]
    renorm_before = {(layer.name, name): value(layer, name) for layer in layers for name in ("renorm_mean", "renorm_stddev")}
    batches = [sample(rng, (6, 4), loc=float(i), scale=1.0 + i) for i in range(3)]
    assert kerasbn.recompute_statistics(model, batches) == 3
    expected = _reference_population_statistics(model, batches)
    for layer in layers:
        assert layer.renorm is True
        mean, variance = expected[layer.name]
        np.testing.assert_allclose(value(layer, "moving_mean"), mean, atol=1e-5, err_msg=layer.name)
        np.testing.assert_allclose(value(layer, "moving_variance"), variance, atol=1e-5, err_msg=layer.name)
        np.testing.assert_allclose(value(layer, "moving_stddev"), np.sqrt(variance + layer.epsilon), atol=1e-5)
        for name in ("renorm_mean", "renorm_stddev"):
            np.testing.assert_array_equal(value(layer, name), renorm_before[(layer.name, name)], err_msg=name)
    # The moving statistics really moved (the test could fail).
    assert not np.allclose(value(layers[0], "renorm_mean"), value(layers[0], "moving_mean"), atol=1e-2)


@pytest.mark.parametrize("num_batches", [0, -2, True])
def test_recompute_statistics_rejects_bad_num_batches(rng, num_batches):
    model = _recompute_model(rng)
    with pytest.raises(
        ValueError,
        match=re.escape(f"`num_batches` must be a positive integer or None. Received: num_batches={num_batches!r}"),
    ):
        kerasbn.recompute_statistics(model, [sample(rng, (4, 4))], num_batches=num_batches)


def test_recompute_statistics_needs_a_batch_norm_layer(rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), keras.layers.BatchNormalization()], name="no_kerasbn")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`model` has no trainable kerasbn.BatchNorm layer whose statistics could be recomputed. "
            "Received: model='no_kerasbn'"
        ),
    ):
        kerasbn.recompute_statistics(model, [sample(rng, (4, 4))])


def test_recompute_statistics_needs_a_batch(rng):
    model = _recompute_model(rng)
    before = [to_numpy(v) for v in model.weights]
    with pytest.raises(ValueError, match=re.escape("`dataset` yielded no batch: nothing to recompute the statistics from.")):
        kerasbn.recompute_statistics(model, [])
    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(to_numpy(variable), old)


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
        mask = _mask(rng, shape)
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


def test_fit_with_a_last_batch_of_one_example_trains_like_keras(rng):
    """17 examples, batch 16: the last batch holds one example (JAX traces that concrete shape)."""
    x = sample(rng, (17, 5), loc=1.0, scale=2.0)
    y = rng.normal(size=(17, 1)).astype("float32")
    results = {}
    for name, norm in (("kerasbn", BatchNorm), ("keras", keras.layers.BatchNormalization)):
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), norm(momentum=0.5), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results[name] = (history.history["loss"], [to_numpy(w) for w in model.layers[1].weights])
    losses, weights = results["kerasbn"]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), losses
    np.testing.assert_allclose(losses, results["keras"][0], rtol=1e-4)
    for got, want in zip(weights, results["keras"][1]):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3), (0, 2, 2, 4), (0, 4, 4, 6)])
def test_empty_batch_leaves_moving_statistics_unchanged(rng, shape):
    """The stock layer turns them into NaN (the mean of nothing); kerasbn keeps them."""
    layer = build(BatchNorm(momentum=0.5), (None,) + shape[1:])
    weights = randomize_weights(rng, layer)
    outputs = layer(np.zeros(shape, "float32"), training=True)
    assert tuple(outputs.shape) == shape
    for name in STATS:
        np.testing.assert_allclose(value(layer, name), weights[name], rtol=1e-6, err_msg=name)


@tf_only
@pytest.mark.parametrize("shape", [(3,), (2, 2, 4), (4, 4, 6)])
def test_empty_batch_of_unknown_size_leaves_moving_statistics_unchanged(rng, shape):
    """With the batch size unknown while tracing, the choice happens in the graph (a select)."""
    import tensorflow as tf

    layer = build(BatchNorm(momentum=0.5), (None,) + shape)
    weights = randomize_weights(rng, layer)
    step = tf.function(lambda t: layer(t, training=True), input_signature=[tf.TensorSpec((None,) + shape)])
    step(tf.zeros((0,) + shape))
    for name in STATS:
        np.testing.assert_allclose(value(layer, name), weights[name], rtol=1e-6, err_msg=name)
    x = sample(rng, (4,) + shape)
    step(tf.constant(x))
    _, mean, variance = np_batch_norm_train(x, weights["gamma"], weights["beta"], 1e-3, -1)
    np.testing.assert_allclose(value(layer, "moving_mean"), 0.5 * weights["moving_mean"] + 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value(layer, "moving_variance"), 0.5 * weights["moving_variance"] + 0.5 * variance, rtol=1e-5, atol=1e-6)


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


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"momentum": 1.0}, "`momentum` must be in [0, 1). Received: momentum=1.0"),
        ({"momentum": -0.1}, "`momentum` must be in [0, 1). Received: momentum=-0.1"),
        ({"momentum": 1.5}, "`momentum` must be in [0, 1). Received: momentum=1.5"),
        ({"renorm_momentum": 1.0}, "`renorm_momentum` must be in [0, 1). Received: renorm_momentum=1.0"),
        ({"epsilon": 0.0}, "`epsilon` must be a positive float. Received: epsilon=0.0"),
        ({"epsilon": -0.001}, "`epsilon` must be a positive float. Received: epsilon=-0.001"),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmidn": 0.5}},
            "Received invalid keys for `renorm_clipping` argument: {'rmax': 2.0, 'rmidn': 0.5}. "
            "Supported values: ['rmax', 'rmin', 'dmax']. Unknown keys: ['rmidn']",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}},
            "rmax should be greater than rmin in the `renorm_clipping` argument. Received: rmax=0.5, rmin=2.0.",
        ),
        (
            {"renorm": True, "renorm_clipping": {"dmax": -1.0}},
            "dmax should be non-negative in the `renorm_clipping` argument. Received: dmax=-1.0.",
        ),
        (
            {"renorm": True, "renorm_clipping": [1.0]},
            "`renorm_clipping` must be a dict with keys among ['rmax', 'rmin', 'dmax']. Received: renorm_clipping=[1.0]",
        ),
        ({"axis": [1, 1]}, "`axis` must not repeat an axis. Received: axis=[1, 1]"),
        ({"axis": []}, "`axis` must be an int or a non-empty list of ints. Received: axis=[]"),
        ({"axis": 1.0}, "`axis` must be an int or a non-empty list of ints. Received: axis=1.0"),
        ({"virtual_batch_size": 0}, "`virtual_batch_size` must be a positive integer or None. Received: virtual_batch_size=0"),
        ({"virtual_batch_size": 2.0}, "`virtual_batch_size` must be a positive integer or None. Received: virtual_batch_size=2.0"),
        ({"fused": "yes"}, "`fused` must be None, True or False. Received: fused='yes'"),
    ],
)
def test_constructor_errors_name_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchNorm(**kwargs)


@pytest.mark.parametrize(
    "kwargs, shape, message",
    [
        ({}, (4,), "`inputs` must have rank >= 2 (a batch axis and a feature axis). Received: inputs.shape=(4,)"),
        ({"axis": 2}, (2, 3), "Axis 2 is out of bounds for input shape (2, 3). Received: axis=2"),
        ({"axis": -3}, (2, 3), "Axis -3 is out of bounds for input shape (2, 3). Received: axis=-3"),
        ({"axis": [1, 4]}, (2, 3, 4, 5), "Axis 4 is out of bounds for input shape (2, 3, 4, 5). Received: axis=[1, 4]"),
        ({"axis": [1, -2]}, (2, 3, 4), "`axis` names the same input axis twice. Received: axis=[1, -2] for inputs of rank 3"),
        (
            {"axis": 0},
            (2, 3),
            "`axis` cannot include the batch axis 0: there would be nothing to compute batch statistics over. "
            "Received: axis=0",
        ),
        (
            {},
            (None, None),
            "The feature dimension(s) of the input must be known when the layer is built. "
            "Received: inputs.shape=(None, None) with axis=-1",
        ),
        (
            {"axis": [1, 3]},
            (None, 3, 4, None),
            "The feature dimension(s) of the input must be known when the layer is built. "
            "Received: inputs.shape=(None, 3, 4, None) with axis=[1, 3]",
        ),
    ],
)
def test_build_errors_name_argument_and_value(kwargs, shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchNorm(**kwargs).build(shape)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmidn": 0.5}},
        {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}},
        {"renorm": True, "renorm_clipping": {"dmax": -1.0}},
    ],
)
def test_constructor_errors_begin_with_the_stock_layers_wording(kwargs):
    """Code matching keras.layers.BatchNormalization's messages keeps working; the values come after."""
    with pytest.raises(ValueError) as stock:
        keras.layers.BatchNormalization(**kwargs)
    with pytest.raises(ValueError) as ours:
        BatchNorm(**kwargs)
    # Keras 3.15.1 leaves "{rmax}" unformatted in one message: compare up to the values.
    stock_words = str(stock.value).split(" Received: ")[0].rstrip(".")
    assert str(ours.value).startswith(stock_words), (str(ours.value), str(stock.value))


def test_renorm_clipping_is_checked_only_with_renorm_like_the_stock_layer():
    kwargs = {"renorm_clipping": {"rmidn": 0.5}}
    keras.layers.BatchNormalization(**kwargs)
    assert BatchNorm(**kwargs).get_config()["renorm_clipping"] == {"rmidn": 0.5}


def test_axis_and_mask_errors_read_as_the_stock_layers():
    with pytest.raises(ValueError) as stock:
        keras.layers.BatchNormalization(axis=2).compute_output_shape((2, 3))
    with pytest.raises(ValueError) as ours:
        BatchNorm(axis=2).build((2, 3))
    assert str(ours.value) == str(stock.value)
    x, mask = np.ones((4, 2, 3), "float32"), np.ones((4, 2, 3), bool)
    with pytest.raises(ValueError) as stock:
        keras.layers.BatchNormalization()(x, training=True, mask=mask)
    with pytest.raises(ValueError) as ours:
        BatchNorm()(x, training=True, mask=mask)
    assert "The mask provided should be one dimension less than the inputs. Received: mask.shape=(4, 2, 3)" in str(stock.value)
    assert "The mask provided should be one dimension less than the inputs. Received: mask.shape=(4, 2, 3)" in str(ours.value)


def test_error_for_rank_one_call():
    with pytest.raises(ValueError, match=re.escape("Received: inputs.shape=(4,)")):
        BatchNorm()(np.zeros((4,), "float32"))


def test_error_for_unknown_channels_in_functional_model():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "The feature dimension(s) of the input must be known when the layer is built. "
            "Received: inputs.shape=(None, 5, None) with axis=-1"
        ),
    ):
        BatchNorm()(keras.Input((5, None)))


@pytest.mark.parametrize("training", [True, False])
def test_error_for_different_channel_count_than_built(training):
    layer = build(BatchNorm(name="bn_three"), (None, 3))
    with pytest.raises(
        ValueError,
        match=re.escape("Layer 'bn_three' was built for 3 channels on axis 1. Received: inputs.shape=(2, 4) (4 channels)"),
    ):
        layer(np.ones((2, 4), "float32"), training=training)


def test_error_for_different_rank_than_built():
    layer = build(BatchNorm(name="bn_rank3"), (None, 2, 3))
    with pytest.raises(ValueError, match=re.escape("Layer 'bn_rank3' was built for inputs of rank 3. Received: inputs.shape=(2, 3)")):
        layer(np.ones((2, 3), "float32"))


def test_error_for_mask_of_wrong_rank():
    layer = build(BatchNorm(), (None, 2, 3))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "The mask provided should be one dimension less than the inputs. "
            "Received: mask.shape=(4, 2, 3), inputs.shape=(4, 2, 3)"
        ),
    ):
        layer(np.ones((4, 2, 3), "float32"), training=True, mask=np.ones((4, 2, 3), bool))


@pytest.mark.parametrize("batch, virtual_batch_size", [(4, 3), (6, 4), (5, 2)])
def test_error_for_virtual_batch_size_not_dividing_batch(batch, virtual_batch_size):
    layer = BatchNorm(virtual_batch_size=virtual_batch_size)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"`virtual_batch_size` must divide the batch size. Received: virtual_batch_size={virtual_batch_size}, "
            f"batch size {batch}"
        ),
    ):
        layer(np.ones((batch, 3), "float32"), training=True)


@pytest.mark.parametrize(
    "shape, kwargs, axis_text",
    [
        ((1, 4), {}, "-1"),
        ((1, 1, 1, 3), {}, "-1"),
        ((1, 3, 1, 1), {"axis": 1}, "1"),
        ((1, 3, 1, 5), {"axis": [1, 3]}, "[1, 3]"),
    ],
)
def test_single_value_per_channel_warns_and_trains_like_keras(rng, shape, kwargs, axis_text):
    """One value per channel: a warning, and the stock layer's numbers (output beta, batch variance 0)."""
    ours = build(BatchNorm(momentum=0.5, **kwargs), shape)
    stock_axis = kwargs.get("axis", -1)
    x = rng.normal(size=shape).astype("float32")
    weights = randomize_weights(rng, ours)
    with pytest.warns(
        UserWarning,
        match=re.escape(
            "Training-mode batch normalization received one value per channel: the batch variance is 0 and "
            f"the output is beta, as with keras.layers.BatchNormalization. Received: inputs.shape={shape} "
            f"with axis={axis_text}"
        ),
    ):
        outputs = to_numpy(ours(x, training=True))
    beta = weights["beta"].reshape([shape[a] if a in ours._feature_axes else 1 for a in range(len(shape))])
    np.testing.assert_allclose(outputs, np.broadcast_to(beta, shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value(ours, "moving_mean"), 0.5 * weights["moving_mean"] + 0.5 * x.reshape(weights["beta"].shape), rtol=1e-6)
    np.testing.assert_allclose(value(ours, "moving_variance"), 0.5 * weights["moving_variance"], rtol=1e-6)
    if isinstance(stock_axis, int):
        stock = build(keras.layers.BatchNormalization(axis=stock_axis, momentum=0.5), shape)
        randomize_weights(np.random.default_rng(0), stock)
        for name in ("gamma", "beta") + STATS:
            getattr(stock, name).assign(value(ours, name) if name in ("gamma", "beta") else weights[name])
        np.testing.assert_allclose(outputs, to_numpy(stock(x, training=True)), rtol=1e-5, atol=1e-5)
        assert_stats_close(ours, stock, rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 3), (4, 1, 1, 3)])
def test_error_for_virtual_batch_size_one_with_one_value_per_example(shape):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`virtual_batch_size=1` leaves one value per channel in every sub-batch (the output would be all "
            f"zeros, i.e. beta). Received: virtual_batch_size=1, inputs.shape={shape} with axis=-1"
        ),
    ):
        BatchNorm(virtual_batch_size=1)(np.ones(shape, "float32"), training=True)


@pytest.mark.parametrize("shape, axis", [((1, 2, 2, 3), -1), ((1, 3, 2), 1), ((2, 3), -1)])
def test_batch_of_one_with_several_values_per_channel_trains(rng, shape, axis):
    layer = build(BatchNorm(axis=axis, momentum=0.0), shape)
    weights = randomize_weights(rng, layer)
    x = sample(rng, shape, scale=2.0)
    expected, mean, variance = np_batch_norm_train(x, weights["gamma"], weights["beta"], 1e-3, axis)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_mean"), mean, atol=1e-6)
    np.testing.assert_allclose(value(layer, "moving_variance"), variance, atol=1e-5)


@tf_only
@pytest.mark.parametrize(
    "kwargs, shape, received",
    [
        (
            {"axis": 1},
            (2, 3, 4),
            "inputs.shape=(2, 3, 4), axis=1, renorm=False, virtual_batch_size=None, epsilon=0.001",
        ),
        (
            {"axis": [1, 3]},
            (2, 3, 3, 4),
            "inputs.shape=(2, 3, 3, 4), axis=[1, 3], renorm=False, virtual_batch_size=None, "
            "epsilon=0.001",
        ),
        (
            {"epsilon": 1e-5},
            (2, 3, 3, 4),
            "inputs.shape=(2, 3, 3, 4), axis=-1, renorm=False, virtual_batch_size=None, "
            "epsilon=1e-05",
        ),
        (
            {"renorm": True},
            (2, 3, 3, 4),
            "inputs.shape=(2, 3, 3, 4), axis=-1, renorm=True, virtual_batch_size=None, "
            "epsilon=0.001",
        ),
        (
            {"virtual_batch_size": 2},
            (4, 3),
            "inputs.shape=(4, 3), axis=-1, renorm=False, virtual_batch_size=2, epsilon=0.001",
        ),
    ],
)
def test_error_for_impossible_fused_true(kwargs, shape, received):
    with pytest.raises(ValueError, match=re.escape("`fused=True` needs") + ".*" + re.escape("Received: fused=True, " + received)):
        BatchNorm(fused=True, **kwargs).build(shape)


@tf_only
@pytest.mark.parametrize(
    "dtype, masked, blocker",
    [("float32", True, "a mask"), ("float64", False, "float64 inputs")],
)
def test_fused_true_raises_where_the_kernel_cannot_run(rng, dtype, masked, blocker):
    shape = (4, 3, 3, 4)
    layer = build(BatchNorm(fused=True, dtype=dtype), shape)
    x = rng.normal(size=shape).astype(dtype)
    mask = _mask(rng, shape) if masked else None
    with pytest.raises(
        ValueError,
        match=re.escape(f"`fused=True` cannot take the fused kernel here: {blocker}. Use fused=None to let the layer choose. ")
        + ".*"
        + re.escape(f"Received: fused=True, inputs.shape={shape}, dtype={dtype}"),
    ):
        layer(x, training=True, mask=mask)
    layer(x, training=False, mask=mask)  # inference needs no batch statistics


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the error on non-TensorFlow backends")
def test_error_for_fused_true_without_tensorflow():
    with pytest.raises(
        ValueError,
        match=re.escape(f"`fused=True` needs the TensorFlow backend {TF_INSTALL}Received: fused=True with backend {BACKEND!r}"),
    ):
        BatchNorm(fused=True)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the error on non-TensorFlow backends")
def test_cross_replica_moments_needs_tensorflow():
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"`cross_replica_moments` (tf.distribute) needs the TensorFlow backend {TF_INSTALL}Received: backend {BACKEND!r}"
        ),
    ):
        kerasbn.cross_replica_moments(np.ones((4, 3), "float32"), axes=[0])


def test_axis_attribute_keeps_the_type_it_was_given_like_the_stock_layer():
    # Code written against keras.layers.BatchNormalization reads `layer.axis` as an int.
    assert BatchNorm().axis == -1 and BatchNorm(axis=1).get_config()["axis"] == 1
    assert BatchNorm(axis=(1, 3)).axis == [1, 3]
    assert BatchNorm.from_config(BatchNorm(axis=[1, 3]).get_config()).axis == [1, 3]


@tf_only
@pytest.mark.parametrize(
    "shape, kwargs, dtype, fused_expected",
    [
        ((2, 3, 3, 16), {}, "float32", True),
        ((2, 3, 3, 32), {}, "float16", True),
        ((2, 3, 3, 16), {"fused": False}, "float32", False),
        ((2, 3, 3, 15), {}, "float32", False),  # below FUSED_INFERENCE_MIN_CHANNELS
        ((2, 16, 3, 3), {"axis": 1}, "float32", False),  # NCHW: the kernel was slower than x * a + b
        ((4, 16), {}, "float32", False),
        ((2, 3, 3, 16), {}, "float64", False),
    ],
)
def test_inference_applies_the_affine_map_with_the_fused_kernel_where_faster(rng, shape, kwargs, dtype, fused_expected):
    import tensorflow as tf

    layer = build(BatchNorm(dtype=dtype, **kwargs), shape)
    randomize_weights(rng, layer)
    plan = plan_of(layer, shape, dtype, training=False, device="CPU")  # the CPU rule, pinned
    assert (plan.path == "fused_affine") == fused_expected, plan
    # Measured on CPUs only: a GPU gets x * a + b as it is.
    assert plan_of(layer, shape, dtype, training=False, device="GPU").path == "generic"
    graph = layer.inference_function.get_concrete_function().graph
    here = plan_of(layer, shape, dtype, training=False)
    assert bool({op.type for op in graph.get_operations()} & FUSED_OPS) == (here.path == "fused_affine")
    x = sample(rng, shape, loc=0.5, scale=2.0).astype(dtype)
    mean, variance, gamma, beta = (value(layer, n) for n in ("moving_mean", "moving_variance", "gamma", "beta"))
    axis = kwargs.get("axis", -1)
    expected = np_batch_norm(x.astype("float64"), mean, variance, gamma, beta, layer.epsilon, axis)
    tolerance = 1e-2 if dtype == "float16" else 1e-5
    got = to_numpy(layer(x, training=False))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(to_numpy(layer.inference_function(tf.constant(x))), got)



@tf_only
@pytest.mark.parametrize(
    "shape, kwargs, widened",
    [
        ((4, 6, 6, 6), {}, True),  # LeNet's first BN: 6 channels, k = 8
        ((4, 6, 6, 6), {"fused": False}, True),
        ((4, 4, 2), {}, True),
        ((3, 5, 2), {}, False),  # no k > 1 divides the 15 rows
        ((4, 6, 6, 16), {"fused": False}, False),  # 16 channels fill the registers already
        ((4, 6, 6, 6), {"fused": True}, False),
        ((4, 6, 6, 6), {"axis": 2}, False),
        ((5, 3), {}, False),  # 2-D: k must divide the (unknown at inference) batch
    ],
)
def test_few_channels_run_on_a_widened_view_with_the_same_numbers(rng, shape, kwargs, widened):
    """(rows, C) viewed as (rows / k, k * C): same statistics, outputs, gradients and moving averages."""
    import tensorflow as tf

    layer = build(BatchNorm(momentum=0.7, **kwargs), shape)
    randomize_weights(rng, layer)
    assert (plan_of(layer, shape, "float32", training=True, device="CPU").path == "widened") == widened
    assert plan_of(layer, shape, "float32", training=True, device="GPU").path != "widened"
    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(tf.TensorSpec(shape)).graph
    here = plan_of(layer, shape, "float32", training=True)
    assert ("Tile" in {op.type for op in graph.get_operations()}) == (here.path == "widened")
    axis = kwargs.get("axis", -1)
    gamma, beta = value(layer, "gamma"), value(layer, "beta")
    mean0, variance0 = value(layer, "moving_mean"), value(layer, "moving_variance")
    x = sample(rng, shape, loc=1.5, scale=2.0)
    expected, mean, variance = np_batch_norm_train(x.astype("float64"), gamma, beta, layer.epsilon, axis)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_mean"), 0.7 * mean0 + 0.3 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value(layer, "moving_variance"), 0.7 * variance0 + 0.3 * variance, rtol=1e-5, atol=1e-6)
    upstream = rng.normal(size=shape)
    want = np_batch_norm_grads(x.astype("float64"), upstream, gamma, layer.epsilon, axis)
    got = layer_gradients(layer, x, upstream.astype("float32"))
    for name, g, w in zip(("inputs", "gamma", "beta"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
    inference = np_batch_norm(
        x.astype("float64"), *(value(layer, n) for n in ("moving_mean", "moving_variance")), gamma, beta, layer.epsilon, axis
    )
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), inference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.inference_function(tf.constant(x))), inference, rtol=1e-5, atol=1e-5)


@tf_only
@pytest.mark.parametrize(
    "shape, path",
    [
        # LeNet's dense layers, as `fit` traces them without drop_remainder: the
        # widened view needs a static batch, and the fused kernel measured ~1.9x
        # slower than the generic path there (kerasbn/plan.py).
        ((None, 120), "generic"),
        ((None, 84), "generic"),
        ((None, 1000), "fused"),  # TYPICAL_BATCH x 1000 >= FUSED_MIN_ELEMENTS
        ((None, None, 64), "fused"),  # an unknown length: as before, unmeasured
        ((None, 6, 6, 6), "widened"),  # k divides the 36 positions of every example
    ],
)
def test_an_unknown_batch_is_planned_as_a_typical_one(shape, path):
    import tensorflow as tf

    from kerasbn.plan import FUSED_MIN_ELEMENTS, TYPICAL_BATCH

    assert TYPICAL_BATCH * 120 < FUSED_MIN_ELEMENTS <= TYPICAL_BATCH * 1000
    layer = build(BatchNorm(), shape)
    assert plan_of(layer, shape, "float32", training=True, device="CPU").path == path
    if None not in shape[1:]:
        known = (TYPICAL_BATCH,) + shape[1:]
        assert plan_of(layer, known, "float32", training=True, device="CPU").path in (path, "widened")
    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(tf.TensorSpec(shape)).graph
    here = plan_of(layer, shape, "float32", training=True)
    assert bool({op.type for op in graph.get_operations()} & FUSED_OPS) == (here.path == "fused")


@tf_only
@pytest.mark.parametrize("device, fused", [("/GPU:0", True), ("/CPU:0", False)])
def test_the_plan_follows_the_device_the_op_is_placed_on(device, fused):
    """Traced (not run) under a device scope: a GPU placement gets the GPU rule on any machine."""
    import tensorflow as tf

    from kerasbn.backend import device_type, has_gpu

    # 6 channels NHWC: widened on a CPU, the fused kernel on a GPU (as TensorFlow's own layer).
    layer = build(BatchNorm(), (8, 4, 4, 6))

    def step(x):
        with tf.device(device):
            return layer(x, training=True), layer(x, training=False)

    graph = tf.function(step).get_concrete_function(tf.TensorSpec((8, 4, 4, 6))).graph
    types = {op.type for op in graph.get_operations()}
    assert bool(types & FUSED_OPS) == fused
    assert ("Tile" in types) == (not fused)  # the widened view, CPU only (inference too)

    def placed(x):
        with tf.device(device):
            y = tf.identity(x)
        return device_type(y)  # no scope here: the device the input was placed on decides

    kinds = []
    tf.function(lambda x: kinds.append(placed(x)) or x).get_concrete_function(tf.TensorSpec((2,)))
    assert kinds == [device[1:4]]
    with tf.device(device):
        # Eagerly, where TensorFlow really puts the op: soft placement runs a
        # GPU scope's ops on the CPU of a machine without a GPU.
        assert device_type() == ("GPU" if device == "/GPU:0" and has_gpu() else "CPU")


@pytest.mark.parametrize(
    "device, shape, training, path",
    [
        ("CPU", (256, 24, 24, 6), True, "widened"),
        ("GPU", (256, 24, 24, 6), True, "fused"),
        ("TPU", (256, 24, 24, 6), True, "fused"),  # any device but the CPU: TensorFlow's own rule
        ("CPU", (1024, 120), True, "fused"),
        ("GPU", (1024, 120), True, "generic"),
        ("CPU", (256, 24, 24, 16), False, "fused_affine"),
        ("GPU", (256, 24, 24, 16), False, "generic"),
        ("GPU", (256, 24, 24, 6), False, "generic"),
    ],
)
def test_the_plan_is_a_pure_function_of_what_the_layer_knows(device, shape, training, path):
    """`kerasbn.plan.plan` runs on any backend: no tensor, no TensorFlow."""
    from kerasbn.plan import plan

    got = plan(shape, "float32", training=training, feature_axes=(len(shape) - 1,), device=device)
    assert got.path == path, got
    assert got.reason
    assert plan(shape, "float32", training=training, feature_axes=(len(shape) - 1,), backend="jax").path == "generic"
    with pytest.raises(ValueError, match=re.escape("`fused=True` cannot take the fused kernel here: a mask.")):
        plan(shape, "float32", training=True, feature_axes=(len(shape) - 1,), fused=True, masked=True)

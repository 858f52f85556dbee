"""`kerasbn.BatchNorm` against the stock layer and float64 NumPy: weights, outputs, gradients, moving averages.

References: stock `keras.layers.BatchNormalization` given identical weights,
and float64 NumPy closed forms (`conftest.np_*`). Runs under every backend;
`tf_only` tests skip elsewhere.
"""

import numpy as np
import pytest
from conftest import (
    np_batch_norm,
    np_batch_norm_grads,
    np_batch_norm_train,
    param_shape,
    tf_only,
    to_numpy,
)
from _layer_helpers import (
    MULTI_AXIS_CASES,
    RANK_AXIS_CASES,
    STATS,
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
    mask = random_mask(rng, shape) if masked else None
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


# ------------------------------------------------- drop-in at the edges


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

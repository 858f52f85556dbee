"""`kerasbn.recompute_statistics`: population statistics against a float64 layer-by-layer reference."""

import re

import numpy as np
import pytest
from conftest import np_batch_norm_train, np_moments, tf_only, to_numpy
from _layer_helpers import randomize_weights, sample, value

import keras

import kerasbn
from kerasbn import BatchNorm


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

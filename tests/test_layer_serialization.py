"""Drop-in arguments, `get_config`, registration, regularizers and `.keras` round trips."""

import inspect
import json

import numpy as np
import pytest
from conftest import to_numpy
from _layer_helpers import STATS, build, randomize_weights, sample, value

import keras

from kerasbn import BatchNorm


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
    fused=False,
    name="custom_bn",
    trainable=False,
)
# Ghost batches cannot be synchronized: the one argument left out above, in a set of its own.
GHOST_ARGUMENTS = {**NON_DEFAULT_ARGUMENTS, "synchronized": False, "sync_group_size": None, "virtual_batch_size": 2}


@pytest.mark.parametrize("arguments", [NON_DEFAULT_ARGUMENTS, GHOST_ARGUMENTS], ids=["synchronized", "ghost"])
def test_config_round_trip_with_every_argument_changed(rng, arguments):
    assert set(GHOST_ARGUMENTS) >= _constructor_arguments(BatchNorm)  # every argument, across the two sets
    layer = BatchNorm(**arguments)
    config = layer.get_config()
    json.dumps(config)  # plain JSON, as a .keras file stores it
    for name in ("axis", "momentum", "epsilon", "center", "renorm", "renorm_clipping", "renorm_momentum",
                 "synchronized", "sync_group_size", "virtual_batch_size", "fused", "name", "trainable"):
        assert config[name] == arguments.get(name), name
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


def test_axis_attribute_keeps_the_type_it_was_given_like_the_stock_layer():
    # Code written against keras.layers.BatchNormalization reads `layer.axis` as an int.
    assert BatchNorm().axis == -1 and BatchNorm(axis=1).get_config()["axis"] == 1
    assert BatchNorm(axis=(1, 3)).axis == [1, 3]
    assert BatchNorm.from_config(BatchNorm(axis=[1, 3]).get_config()).axis == [1, 3]

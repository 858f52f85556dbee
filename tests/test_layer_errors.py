"""Errors and warnings of `kerasbn.BatchNorm`: the argument named in backticks, the value received."""

import re

import numpy as np
import pytest
from conftest import BACKEND, np_batch_norm_train, to_numpy
from _layer_helpers import (
    STATS,
    TF_INSTALL,
    assert_stats_close,
    build,
    randomize_weights,
    sample,
    value,
)

import keras

import kerasbn
from kerasbn import BatchNorm


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

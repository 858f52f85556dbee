"""kerasbn.experimental.DecorrelatedBatchNorm: ZCA whitening against a float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

import keras
from conftest import needs_float64, tf_only, to_numpy
from kerasbn.experimental import DecorrelatedBatchNorm, covariance_moments, inverse_sqrt_psd, whitening_matrix


def correlated(rng, shape, axis=-1):
    """Data whose channels on `axis` are strongly correlated and off-centre."""
    channels = shape[axis]
    mixing = rng.normal(size=(channels, channels)) + 2 * np.eye(channels)
    x = rng.normal(size=shape)
    x = np.moveaxis(np.moveaxis(x, axis, -1) @ mixing + rng.normal(size=channels) * 3, -1, axis)
    return x.astype("float32")


def np_zca(x, axis, epsilon, mean=None, covariance=None):
    """Float64 ZCA whitening of the channels on `axis`; batch statistics unless given."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    if mean is None:
        mean = rows.mean(axis=0)
        covariance = np.cov(rows.T, bias=True)
    values, vectors = np.linalg.eigh(covariance + epsilon * np.eye(len(mean)))
    whitening = vectors @ np.diag(values**-0.5) @ vectors.T
    return np.moveaxis((x - mean) @ whitening, -1, axis), mean, covariance


@pytest.mark.parametrize("shape,axis", [((512, 6), -1), ((32, 5, 5, 4), -1), ((32, 4, 5, 5), 1)])
def test_training_output_matches_float64_zca(rng, shape, axis):
    x = correlated(rng, shape, axis)
    layer = DecorrelatedBatchNorm(axis=axis, epsilon=1e-3)
    y = to_numpy(layer(x, training=True))
    expected, _, _ = np_zca(x, axis, 1e-3)
    np.testing.assert_allclose(y, expected, atol=2e-4)


@pytest.mark.parametrize("shape,axis", [((1024, 8), -1), ((64, 6, 6, 5), -1), ((64, 5, 6, 6), 1)])
def test_whitened_output_has_zero_mean_and_identity_covariance(rng, shape, axis):
    x = correlated(rng, shape, axis)
    assert np.abs(np.cov(np.moveaxis(x, axis, -1).reshape(-1, shape[axis]).T) - np.eye(shape[axis])).max() > 0.5
    y = to_numpy(DecorrelatedBatchNorm(axis=axis, epsilon=1e-6)(x, training=True)).astype(np.float64)
    rows = np.moveaxis(y, axis, -1).reshape(-1, shape[axis])
    np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(rows.T, bias=True), np.eye(shape[axis]), atol=1e-3)


def test_moving_statistics_follow_the_keras_momentum_convention(rng):
    x = correlated(rng, (256, 5))
    momentum = 0.8
    layer = DecorrelatedBatchNorm(momentum=momentum)
    layer(x, training=True)
    _, mean, covariance = np_zca(x, -1, 1e-3)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), (1 - momentum) * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.moving_covariance), momentum * np.eye(5) + (1 - momentum) * covariance, rtol=1e-4, atol=1e-5
    )


def test_inference_uses_the_moving_statistics_and_the_affine(rng):
    x = correlated(rng, (64, 4))
    layer = DecorrelatedBatchNorm(epsilon=1e-2)
    layer.build(x.shape)
    mean = rng.normal(size=4)
    factor = rng.normal(size=(4, 4))
    covariance = factor @ factor.T + np.eye(4)
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    for variable, value in zip(
        (layer.moving_mean, layer.moving_covariance, layer.gamma, layer.beta), (mean, covariance, gamma, beta)
    ):
        variable.assign(value.astype("float32"))
    expected, _, _ = np_zca(x, -1, 1e-2, mean, covariance)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), expected * gamma + beta, atol=1e-4)


def test_a_frozen_layer_runs_in_inference_mode(rng):
    x = correlated(rng, (128, 3))
    layer = DecorrelatedBatchNorm()
    layer.build(x.shape)
    layer.trainable = False
    y = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(to_numpy(layer.moving_mean), 0.0)
    np.testing.assert_allclose(to_numpy(layer.moving_covariance), np.eye(3))
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-5, atol=1e-5)


def test_no_center_no_scale_has_no_affine_weights(rng):
    layer = DecorrelatedBatchNorm(center=False, scale=False)
    layer.build((None, 7))
    assert layer.gamma is None and layer.beta is None
    assert [v.name for v in layer.weights] == ["moving_mean", "moving_covariance"]
    assert layer.count_params() == 7 + 49


def _numeric_gradient(matrix, upstream, step=1e-6):
    def value(m):
        eigenvalues, eigenvectors = np.linalg.eigh(m)
        return np.sum((eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T * upstream)

    gradient = np.zeros_like(matrix)
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            delta = np.zeros_like(matrix)
            delta[i, j] += step / 2
            delta[j, i] += step / 2
            gradient[i, j] = (value(matrix + delta) - value(matrix - delta)) / (2 * step)
    return gradient


def _gradient(matrix, upstream):
    import tensorflow as tf

    matrix = tf.constant(matrix)
    with tf.GradientTape() as tape:
        tape.watch(matrix)
        loss = tf.reduce_sum(inverse_sqrt_psd(matrix) * upstream)
    return tape.gradient(loss, matrix).numpy()


@tf_only
@needs_float64
def test_inverse_sqrt_gradient_matches_finite_differences(rng):
    factor = rng.normal(size=(6, 6))
    matrix = factor @ factor.T + 0.5 * np.eye(6)
    upstream = rng.normal(size=(6, 6))
    np.testing.assert_allclose(_gradient(matrix, upstream), _numeric_gradient(matrix, upstream), rtol=1e-5, atol=1e-7)


@tf_only
def test_inverse_sqrt_gradient_is_finite_with_repeated_eigenvalues(rng):
    # Differentiating eigh's eigenvectors divides by eigenvalue gaps: at the
    # identity every gap is zero. The closed form gives -(G + G^T) / 4 there.
    upstream = rng.normal(size=(5, 5))
    gradient = _gradient(np.eye(5), upstream)
    np.testing.assert_allclose(gradient, -(upstream + upstream.T) / 4, atol=1e-12)


def test_covariance_moments_and_whitening_matrix(rng):
    x = correlated(rng, (300, 4))
    mean, covariance = covariance_moments(keras.ops.convert_to_tensor(x))
    np.testing.assert_allclose(to_numpy(mean), x.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(covariance), np.cov(x.T.astype(np.float64), bias=True), rtol=1e-4)
    whitening = to_numpy(whitening_matrix(covariance, 1e-3)).astype(np.float64)
    np.testing.assert_allclose(whitening, whitening.T, atol=1e-5)
    np.testing.assert_allclose(
        whitening @ (np.cov(x.T, bias=True) + 1e-3 * np.eye(4)) @ whitening, np.eye(4), atol=1e-3
    )


def test_mixed_float16_keeps_float16_outputs_and_float32_statistics(rng):
    x = correlated(rng, (256, 6)).astype("float16")
    layer = DecorrelatedBatchNorm(epsilon=1e-3, dtype="mixed_float16")
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert keras.backend.standardize_dtype(layer.moving_covariance.dtype) == "float32"
    expected, _, _ = np_zca(x.astype(np.float64), -1, 1e-3)
    np.testing.assert_allclose(to_numpy(y).astype(np.float64), expected, atol=2e-2)


def test_config_round_trip_save_and_fit(rng, tmp_path):
    layer = DecorrelatedBatchNorm(axis=-1, momentum=0.7, epsilon=1e-4, center=False, gamma_initializer="random_normal", name="dbn")
    config = layer.get_config()
    assert {k: config[k] for k in ("axis", "momentum", "epsilon", "center", "scale")} == {
        "axis": -1, "momentum": 0.7, "epsilon": 1e-4, "center": False, "scale": True,
    }
    assert DecorrelatedBatchNorm.from_config(config).get_config() == config

    model = keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.Conv2D(5, 3), DecorrelatedBatchNorm(momentum=0.5), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = rng.normal(size=(64, 6, 6, 2)).astype("float32")
    history = model.fit(x, rng.normal(size=(64, 3)).astype("float32"), epochs=2, batch_size=32, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.allclose(to_numpy(model.layers[1].moving_covariance), np.eye(5))
    path = tmp_path / "dbn.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], DecorrelatedBatchNorm)
    np.testing.assert_allclose(to_numpy(loaded(x, training=False)), to_numpy(model(x, training=False)), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"momentum": 1.0}, "`momentum` must be in [0, 1). Received: momentum=1.0"),
        ({"epsilon": 0}, "`epsilon` must be a positive float. Received: epsilon=0"),
        ({"axis": [1, 2]}, "`axis` must be one integer. Received: axis=[1, 2]"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError) as error:
        DecorrelatedBatchNorm(**kwargs)
    assert message in str(error.value)


def test_import_kerasbn_alone_loads_a_saved_decorrelated_batch_norm(tmp_path, run_python):
    # Two fresh processes: in this one kerasbn.experimental is already imported, which would hide a
    # `kerasbn` that does not register DecorrelatedBatchNorm by itself.
    path, inputs, expected = tmp_path / "dbn.keras", tmp_path / "x.npy", tmp_path / "y.npy"
    run_python(
        f"""
        import keras, numpy as np
        from kerasbn.experimental import DecorrelatedBatchNorm

        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 6, 6, 2)).astype("float32")
        model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3), DecorrelatedBatchNorm(momentum=0.5),
                                  keras.layers.Flatten(), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, rng.normal(size=(64, 3)).astype("float32"), epochs=1, batch_size=32, verbose=0)
        model.save({str(path)!r})
        np.save({str(inputs)!r}, x)
        np.save({str(expected)!r}, keras.ops.convert_to_numpy(model(x, training=False)))
        """
    )
    result = run_python(
        f"""
        import sys
        import keras, numpy as np
        import kerasbn

        model = keras.saving.load_model({str(path)!r})
        layer = model.layers[1]
        print(type(layer).__module__, type(layer).__name__)
        y = keras.ops.convert_to_numpy(model(np.load({str(inputs)!r}), training=False))
        np.testing.assert_allclose(y, np.load({str(expected)!r}), rtol=0, atol=1e-6)
        """
    )
    assert "kerasbn.experimental DecorrelatedBatchNorm" in result.stdout

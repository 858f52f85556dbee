"""`kerasbn.callbacks.PreciseBN` inside `model.fit`, on the TensorFlow and JAX backends.

The references are float64 NumPy: the BatchNorm's input features of each
batch, computed from the first Dense layer's weights as they stand when the
statistics are recomputed, their batch means and biased variances averaged
with equal weights; and the validation loss computed by hand from the
weights recorded when validation began.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from _procs import run_python
from conftest import np_moments, tf_only

import keras

import kerasbn
from kerasbn.callbacks import PreciseBN

EPSILON = 1e-3
FEATURES = 4
UNITS = 3
BATCH = 8

LINE = re.compile(
    r"^PreciseBN \((?P<when>epoch \d+|end of training)\): recomputed statistics of 1 layer "
    r"from (?P<batches>\d+) batches in \d+\.\d s$"
)


def _model():
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dense(UNITS, name="dense")(inputs)
    # Momentum 0.9 over a few steps leaves the moving averages far from the
    # population statistics of the (shifted) data the callback is given.
    h = kerasbn.BatchNorm(momentum=0.9, epsilon=EPSILON, name="bn")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def _data(rng, n, loc=0.0):
    x = (loc + rng.normal(size=(n, FEATURES)) * np.array([0.5, 1.0, 2.0, 3.0])).astype("float32")
    y = (x @ np.array([[1.0], [-1.0], [0.5], [0.2]]) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def _precise_batches(rng, count=3):
    # Shifted and widened: population statistics of these differ clearly from the training data's.
    return [(3.0 + 2.0 * rng.normal(size=(BATCH, FEATURES))).astype("float32") for _ in range(count)]


def _weights(model):
    """{variable path: float64 array} of every model weight, read now."""
    return {v.path: np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in model.weights}


def _w(weights, layer, name):
    return weights[f"{layer}/{name}"]


def _population_statistics(weights, batches):
    """Float64 average of the BatchNorm input's batch mean and biased variance."""
    kernel, bias = _w(weights, "dense", "kernel"), _w(weights, "dense", "bias")
    moments = [np_moments(np.asarray(x, np.float64) @ kernel + bias, -1) for x in batches]
    return np.mean([m for m, _ in moments], axis=0), np.mean([v for _, v in moments], axis=0)


def _inference_mse(weights, x, y):
    """Float64 mean squared error of the model in inference mode, from its recorded weights."""
    h = np.asarray(x, np.float64) @ _w(weights, "dense", "kernel") + _w(weights, "dense", "bias")
    mean, variance = _w(weights, "bn", "moving_mean"), _w(weights, "bn", "moving_variance")
    z = _w(weights, "bn", "gamma") * (h - mean) / np.sqrt(variance + EPSILON) + _w(weights, "bn", "beta")
    out = z @ _w(weights, "head", "kernel") + _w(weights, "head", "bias")
    return float(np.mean((out - np.asarray(y, np.float64)) ** 2))


class Recorder(keras.callbacks.Callback):
    """Every weight of the model at chosen hooks, tagged with the epoch (counted from 1)."""

    def __init__(self, hooks):
        super().__init__()
        self.hooks = set(hooks)
        self.records = []  # (hook, epoch, weights)
        self.epoch = None

    def _record(self, hook):
        if hook in self.hooks:
            self.records.append((hook, self.epoch, _weights(self.model)))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_test_begin(self, logs=None):
        self._record("test_begin")

    def on_epoch_end(self, epoch, logs=None):
        self._record("epoch_end")

    def on_train_end(self, logs=None):
        self._record("train_end")

    def at(self, hook, epoch=None):
        found = [w for h, e, w in self.records if h == hook and (epoch is None or e == epoch)]
        assert len(found) == 1, (hook, epoch, [(h, e) for h, e, _ in self.records])
        return found[0]


def _assert_population(weights, batches, err_msg=""):
    mean, variance = _population_statistics(weights, batches)
    np.testing.assert_allclose(_w(weights, "bn", "moving_mean"), mean, atol=1e-5, rtol=1e-5, err_msg=err_msg)
    np.testing.assert_allclose(_w(weights, "bn", "moving_variance"), variance, atol=1e-5, rtol=1e-5, err_msg=err_msg)


def _assert_not_population(weights, batches, err_msg=""):
    mean, _ = _population_statistics(weights, batches)
    assert np.max(np.abs(_w(weights, "bn", "moving_mean") - mean)) > 0.1, err_msg


def _lines(capsys):
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    for line in lines:
        assert LINE.match(line), line
    return [LINE.match(line)["when"] for line in lines]


# ------------------------------------------------------------------ tests


def test_end_of_training_sets_population_statistics(rng, capsys):
    keras.utils.set_random_seed(1)
    model = _model()
    x, y = _data(rng, 48)
    batches = _precise_batches(rng, count=4)
    # Callbacks run in list order: `before` sees what fit's moving averages left.
    before, after = Recorder(["train_end"]), Recorder(["train_end"])
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[before, PreciseBN(batches, 3), after])
    _assert_not_population(before.at("train_end"), batches[:3], "fit alone already gave the reference")
    _assert_population(after.at("train_end"), batches[:3])
    _assert_population(_weights(model), batches[:3])
    assert _lines(capsys) == ["end of training"]
    # Only the moving statistics changed at the end.
    changed = {k for k in _weights(model) if not np.array_equal(before.at("train_end")[k], _weights(model)[k])}
    assert changed == {"bn/moving_mean", "bn/moving_variance"}


def test_every_n_epochs_recomputes_before_validation(rng, capsys):
    keras.utils.set_random_seed(2)
    model = _model()
    x, y = _data(rng, 48)
    x_val, y_val = _data(rng, 16, loc=0.5)
    batches = _precise_batches(rng)
    recorder = Recorder(["test_begin", "train_end"])
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        validation_data=(x_val, y_val),
        validation_batch_size=16,
        verbose=0,
        callbacks=[PreciseBN(batches, num_batches=3, every_n_epochs=2), recorder],
    )
    assert _lines(capsys) == ["epoch 2", "end of training"]
    for epoch in (1, 3):
        _assert_not_population(recorder.at("test_begin", epoch), batches, f"epoch {epoch}")
    _assert_population(recorder.at("test_begin", 2), batches)
    _assert_population(recorder.at("train_end"), batches)
    # The validation loss was computed with the recomputed statistics.
    for epoch in (1, 2, 3):
        expected = _inference_mse(recorder.at("test_begin", epoch), x_val, y_val)
        np.testing.assert_allclose(history.history["val_loss"][epoch - 1], expected, rtol=1e-5, err_msg=f"epoch {epoch}")


def test_epoch_without_validation_recomputes_at_epoch_end(rng, capsys):
    """Epoch 1 has no validation (validation_freq=2): the recomputation moves to on_epoch_end."""
    keras.utils.set_random_seed(3)
    model = _model()
    x, y = _data(rng, 32)
    x_val, y_val = _data(rng, 16)
    batches = _precise_batches(rng)
    recorder = Recorder(["test_begin", "epoch_end"])
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        validation_data=(x_val, y_val),
        validation_freq=2,
        verbose=0,
        callbacks=[PreciseBN(batches, num_batches=3, every_n_epochs=1), recorder],
    )
    # The last epoch was recomputed already: nothing more at the end of training.
    assert _lines(capsys) == ["epoch 1", "epoch 2"]
    _assert_population(recorder.at("epoch_end", 1), batches, "epoch 1")
    _assert_population(recorder.at("test_begin", 2), batches, "epoch 2")
    _assert_population(_weights(model), batches, "after fit")


def test_stand_alone_evaluate_and_verbose_zero(rng, capsys):
    keras.utils.set_random_seed(4)
    model = _model()
    x, y = _data(rng, 16)
    batches = _precise_batches(rng)
    callback = PreciseBN(batches, num_batches=2, every_n_epochs=1, verbose=0)
    before = _weights(model)
    model.evaluate(x, y, verbose=0, callbacks=[callback])
    assert all(np.array_equal(before[k], v) for k, v in _weights(model).items()), "evaluate recomputed"
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
    assert capsys.readouterr().out == ""
    _assert_population(_weights(model), batches[:2])


def test_recomputes_for_weights_restored_by_early_stopping(rng, capsys):
    """EarlyStopping listed first restores epoch 1's weights in its on_train_end, after PreciseBN
    recomputed for epoch 2's: PreciseBN's on_train_end sees other weights and recomputes for them."""
    keras.utils.set_random_seed(6)
    model = _model()
    x, y = _data(rng, 48)
    batches = _precise_batches(rng)
    recorder = Recorder(["epoch_end"])
    # The training loss falls, so mode="max" makes epoch 1 the best, whose weights are restored.
    stopping = keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=5, restore_best_weights=True)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        callbacks=[stopping, PreciseBN(batches, num_batches=3, every_n_epochs=2), recorder],
    )
    assert stopping.best_epoch == 0
    assert _lines(capsys) == ["epoch 2", "end of training"]
    final, epoch_1 = _weights(model), recorder.at("epoch_end", 1)
    for name in ("dense/kernel", "dense/bias", "head/kernel"):
        np.testing.assert_array_equal(final[name], epoch_1[name], err_msg=name)
    _assert_not_population(epoch_1, batches, "epoch 1's own statistics were already the reference")
    _assert_population(recorder.at("epoch_end", 2), batches, "epoch 2")
    _assert_population(final, batches, "restored weights")


def test_checkpoint_listed_after_saves_recomputed_statistics(rng, tmp_path):
    """An epoch without validation recomputes in on_epoch_end: a ModelCheckpoint listed after sees the result."""
    keras.utils.set_random_seed(7)
    model = _model()
    x, y = _data(rng, 32)
    batches = _precise_batches(rng)
    path = tmp_path / "model.weights.h5"
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), save_weights_only=True)
    model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[PreciseBN(batches, 3, every_n_epochs=1, verbose=0), checkpoint]
    )
    saved = _model()
    saved.load_weights(str(path))
    _assert_population(_weights(saved), batches)


@tf_only
def test_tf_data_dataset(rng, capsys):
    import tensorflow as tf

    keras.utils.set_random_seed(5)
    model = _model()
    x, y = _data(rng, 32)
    batches = _precise_batches(rng, count=5)
    dataset = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), np.zeros((5 * BATCH, 1)))).batch(BATCH)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model.fit(train, epochs=2, verbose=0, callbacks=[PreciseBN(dataset, num_batches=4, every_n_epochs=1)])
    assert _lines(capsys) == ["epoch 1", "epoch 2"]
    _assert_population(_weights(model), batches[:4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_batches": 0}, "`num_batches` must be a positive integer. Received: num_batches=0"),
        ({"num_batches": -3}, "`num_batches` must be a positive integer. Received: num_batches=-3"),
        ({"num_batches": 2.0}, "`num_batches` must be a positive integer. Received: num_batches=2.0"),
        ({"num_batches": True}, "`num_batches` must be a positive integer. Received: num_batches=True"),
        ({"num_batches": None}, "`num_batches` must be a positive integer. Received: num_batches=None"),
        ({"num_batches": "5"}, "`num_batches` must be a positive integer. Received: num_batches='5'"),
        ({"num_batches": np.float64(2.0)}, "`num_batches` must be a positive integer. Received: num_batches=np.float64(2.0)"),
        ({"num_batches": np.int64(0)}, "`num_batches` must be a positive integer. Received: num_batches=np.int64(0)"),
        (
            {"num_batches": 2, "every_n_epochs": 0},
            "`every_n_epochs` must be a positive integer or None. Received: every_n_epochs=0",
        ),
        (
            {"num_batches": 2, "every_n_epochs": 1.5},
            "`every_n_epochs` must be a positive integer or None. Received: every_n_epochs=1.5",
        ),
        (
            {"num_batches": 2, "every_n_epochs": False},
            "`every_n_epochs` must be a positive integer or None. Received: every_n_epochs=False",
        ),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        PreciseBN([np.zeros((2, FEATURES), "float32")], **kwargs)


def test_accepts_numpy_integers():
    callback = PreciseBN([], num_batches=np.int64(3), every_n_epochs=np.int32(2))
    assert (callback.num_batches, callback.every_n_epochs) == (3, 2)
    assert type(callback.num_batches) is int and type(callback.every_n_epochs) is int


# ------------------------------------------------------------ MirroredStrategy

MIRRORED_SCRIPT = """
import json
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
import numpy as np
import keras
import kerasbn

rng = np.random.default_rng(7)
x = rng.normal(size=(32, 4)).astype("float32")
y = x[:, :1] - x[:, 1:2]
precise = (3.0 + 2.0 * rng.normal(size=(24, 4))).astype("float32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
keras.utils.set_random_seed(7)
with strategy.scope():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, name="dense")(inputs)
    h = kerasbn.BatchNorm(momentum=0.9, name="bn")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
seen = {}


def copies(variable):
    # Inside a replica a read is that replica's own copy: what inference there uses.
    views = tf.function(lambda: strategy.run(lambda: tf.identity(variable.value)))()
    return [np.asarray(c).tolist() for c in strategy.experimental_local_results(views)]


class AtTestBegin(keras.callbacks.Callback):
    def on_test_begin(self, logs=None):
        seen["copies"] = copies(model.get_layer("bn").moving_mean)
        seen["features"] = np.asarray(model.get_layer("dense")(precise)).tolist()

dataset = tf.data.Dataset.from_tensor_slices(precise).batch(8)
model.fit(
    x, y, batch_size=8, epochs=1, verbose=0, validation_data=(x, y),
    callbacks=[kerasbn.callbacks.PreciseBN(dataset, 3, every_n_epochs=1), AtTestBegin()],
)
bn = model.get_layer("bn")
print("RESULT " + json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "at_test_begin": seen,
    "copies": copies(bn.moving_mean),
    "variance_copies": copies(bn.moving_variance),
    "features": np.asarray(model.get_layer("dense")(precise)).tolist(),
}))
"""


@tf_only
@pytest.mark.slow
def test_precise_bn_under_mirrored_strategy():
    result = run_python(
        MIRRORED_SCRIPT, env={"KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": "-1"}, timeout=300
    )
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
    data = json.loads(line[len("RESULT ") :])
    assert data["replicas"] == 2
    assert "PreciseBN (epoch 1)" in result.stdout
    # Every replica's own copy holds the population statistics, before validation and after fit.
    for when in (data["at_test_begin"], data):
        batches = np.asarray(when["features"], np.float64).reshape(3, 8, -1)
        moments = [np_moments(b, -1) for b in batches]
        assert len(when["copies"]) == 2
        for copy in when["copies"]:
            np.testing.assert_allclose(copy, np.mean([m for m, _ in moments], axis=0), atol=1e-5)
    for copy in data["variance_copies"]:
        np.testing.assert_allclose(copy, np.mean([v for _, v in moments], axis=0), atol=1e-5)


def test_progress_goes_to_the_log_when_interactive_logging_is_off(rng, capsys, caplog):
    keras.utils.set_random_seed(6)
    model = _model()
    x, y = _data(rng, 16)
    keras.config.disable_interactive_logging()
    try:
        with caplog.at_level("INFO", logger="kerasbn.callbacks"):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[PreciseBN(_precise_batches(rng), 2)])
    finally:
        keras.config.enable_interactive_logging()
    assert capsys.readouterr().out == ""
    messages = [record.getMessage() for record in caplog.records if record.name == "kerasbn.callbacks"]
    assert [LINE.match(message)["when"] for message in messages] == ["end of training"], messages

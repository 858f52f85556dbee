"""Runs `kerasbn.BatchNorm` under `keras.distribution` on JAX host devices, for tests/test_jax_distribution.py.

JAX must see several CPU devices before it initialises
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), so the checks run in a
fresh process; each prints one JSON line of what it measured (errors against
float64 NumPy, collectives counted in the compiled HLO) and the test asserts:

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        PYTHONPATH=. python tests/_jax_dist_worker.py hlo local sync save
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import keras  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn.diagnostics import count_hlo_collectives  # noqa: E402
from conftest import np_batch_norm, np_batch_norm_grads, np_moments  # noqa: E402

MOMENTUM = 0.6  # far from 1, so a wrong batch statistic shows in the moving ones
EPSILON = 1e-3
SHAPE = (8, 2, 2, 3)  # global batch 8: 2 examples per device on 4 devices


def distribute(x):
    """`x` sharded along the batch axis, as `fit` feeds a `DataParallel` model."""
    distribution = keras.distribution.distribution()
    return keras.distribution.distribute_tensor(x, distribution.get_data_layout(x.shape))


def layer_step(layer, x, upstream, mask=None):
    """One jitted training call of `layer`: outputs, new moving statistics, d/dx and d/dgamma, d/dbeta of sum(upstream * y)."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        y, updated = layer.stateless_call(trainable, non_trainable, x, training=True, mask=mask)
        return jax.numpy.sum(y * upstream), (y, updated)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, updated)), (d_trainable, dx) = grad(trainable, distribute(x))
    names = [v.path.split("/")[-1] for v in layer.non_trainable_variables]
    moving = {name: np.asarray(value) for name, value in zip(names, updated)}
    return np.asarray(y), moving, np.asarray(dx), [np.asarray(g) for g in d_trainable]


def make_layer(rng, **kwargs):
    layer = kerasbn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, **kwargs)
    layer.build(SHAPE)
    layer.gamma.assign(rng.uniform(0.5, 1.5, SHAPE[-1]).astype("float32"))
    layer.beta.assign(rng.normal(size=SHAPE[-1]).astype("float32"))
    return layer


def inputs(rng):
    # Each device's slice gets its own offset, so its statistics differ from the global ones.
    offsets = np.repeat(np.arange(4.0) * 3.0, SHAPE[0] // 4)[:, None, None, None]
    return (rng.normal(size=SHAPE) + offsets).astype("float32"), rng.normal(size=SHAPE).astype("float32")


def errors(y, moving, dx, grads, x, upstream, gamma, beta, mask, slices):
    """Max errors against float64 NumPy, each slice (a device, a group, the whole batch) normalized on its own."""
    out = {"outputs": 0.0, "dx": 0.0, "dgamma": 0.0, "dbeta": 0.0}
    means, variances, dgamma, dbeta = [], [], 0.0, 0.0
    for part in slices:
        m = None if mask is None else mask[part]
        mean, variance = np_moments(x[part], -1, m)
        want = np_batch_norm(x[part], mean, variance, gamma, beta, EPSILON, -1)
        out["outputs"] = max(out["outputs"], float(np.max(np.abs(y[part] - want))))
        want_dx, g, b = np_batch_norm_grads(x[part], upstream[part], gamma, EPSILON, -1, m)
        out["dx"] = max(out["dx"], float(np.max(np.abs(dx[part] - want_dx))))
        dgamma, dbeta = dgamma + g, dbeta + b
        means.append(mean)
        variances.append(variance)
    out["dgamma"] = float(np.max(np.abs(grads[0] - dgamma)))
    out["dbeta"] = float(np.max(np.abs(grads[1] - dbeta)))
    # The moving averages take the mean over devices; each device holds its slice's statistics.
    weights = [part.stop - part.start for part in slices]
    for name, stats, init in (("moving_mean", means, 0.0), ("moving_variance", variances, 1.0)):
        want = MOMENTUM * init + (1 - MOMENTUM) * np.average(stats, axis=0, weights=weights)
        out[name] = float(np.max(np.abs(moving[name] - want)))
    return out


def check_local(rng):
    """synchronized=False: each device's own statistics, against float64 per device."""
    layer = make_layer(rng)
    x, upstream = inputs(rng)
    y, moving, dx, grads = layer_step(layer, x, upstream)
    gamma, beta = (np.asarray(v) for v in (layer.gamma, layer.beta))
    devices = [slice(i, i + 2) for i in range(0, SHAPE[0], 2)]
    return errors(y, moving, dx, grads, x, upstream, gamma, beta, None, devices)


def check_synchronized(rng):
    """synchronized=True: the global batch's statistics (uneven masked counts), and per group of 2 devices."""
    x, upstream = inputs(rng)
    # Kept positions per device: 7, 8, 1 and 0 of 8 (device 3 has none).
    mask = np.ones(SHAPE[:-1], bool)
    mask[0, 0, 0] = False
    mask[4:6] = False
    mask[4, 1, 1] = True
    mask[6:] = False
    results = {}
    for name, group_size, slices in (
        ("all", None, [slice(0, 8)]),
        ("groups", 2, [slice(0, 4), slice(4, 8)]),
    ):
        layer = make_layer(rng, synchronized=True, sync_group_size=group_size)
        y, moving, dx, grads = layer_step(layer, x, upstream, mask=mask)
        gamma, beta = (np.asarray(v) for v in (layer.gamma, layer.beta))
        results[name] = errors(y, moving, dx, grads, x, upstream, gamma, beta, mask, slices)
    return results


def conv_model(layers, kind):
    x = inputs_ = keras.Input((8, 8, 4))
    for _ in range(layers):
        x = keras.layers.Conv2D(4, 3, padding="same")(x)
        if kind == "stock":
            x = keras.layers.BatchNormalization()(x)
        else:
            x = kerasbn.BatchNorm(synchronized=kind == "synchronized")(x)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs_, outputs)
    model.compile(optimizer="sgd", loss="mse")
    return model


def train_step_collectives(model, x, y):
    """The collectives in the compiled HLO of the model's Keras training step (`train_step`) on (x, y)."""
    model.optimizer.build(model.trainable_variables)
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    return count_hlo_collectives(model.train_step, state, (distribute(x), distribute(y), None))


def check_hlo(rng):
    """Collectives per batch-norm layer in the compiled step: the difference between 6 and 2 layers, over 4."""
    x = rng.normal(size=(8, 8, 8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    out = {}
    for kind in ("stock", "local", "synchronized"):
        counts = {layers: train_step_collectives(conv_model(layers, kind), x, y) for layers in (2, 6)}
        out[kind] = {
            "per_layer": {op: (counts[6][op] - counts[2][op]) / 4 for op in counts[6]},
            "step_6_layers": counts[6],
        }
    return out


def check_save(rng):
    """fit under DataParallel, then reads, a .keras save and its reload, with and without the distribution."""
    model = conv_model(2, "local")
    x = rng.normal(size=(16, 8, 8, 4)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    layer = next(l for l in model.layers if isinstance(l, kerasbn.BatchNorm))
    moving = np.asarray(layer.moving_mean)
    predicted = model.predict(x, batch_size=8, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    reloaded_layer = next(l for l in reloaded.layers if isinstance(l, kerasbn.BatchNorm))
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        plain = keras.models.load_model(path).predict(x, batch_size=8, verbose=0)
    finally:
        keras.distribution.set_distribution(distribution)
    return {
        "moving_mean_moved": float(np.max(np.abs(moving))),
        "replicated": bool(layer.moving_mean.value.sharding.is_fully_replicated),
        "reloaded_moving_mean": float(np.max(np.abs(np.asarray(reloaded_layer.moving_mean) - moving))),
        "reloaded_predict": float(np.max(np.abs(reloaded.predict(x, batch_size=8, verbose=0) - predicted))),
        "plain_predict": float(np.max(np.abs(plain - predicted))),
        "sync_moving_statistics": kerasbn.sync_moving_statistics(model),
    }


def check_group_error(rng):
    """A `sync_group_size` that does not divide the devices along the batch axis: the message."""
    layer = make_layer(rng, synchronized=True, sync_group_size=3)
    try:
        layer_step(layer, *inputs(rng))
    except ValueError as error:
        return str(error)
    return None


CHECKS = {"hlo": check_hlo, "local": check_local, "sync": check_synchronized, "save": check_save, "group_error": check_group_error}


def main(names):
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    rng = np.random.default_rng(20)
    results = {"devices": jax.device_count()}
    for name in names:
        results[name] = CHECKS[name](rng)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])

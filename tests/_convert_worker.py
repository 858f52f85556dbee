"""A fresh process for tests/test_transforms.py: kerasbn.convert under MirroredStrategy on 2 logical CPUs.

    PYTHONPATH=. python tests/_convert_worker.py OUT.json

Splits the CPU into two logical devices before TensorFlow initialises, builds a
small residual network with stock batch norms, converts it to kerasbn inside
`strategy.scope()`, trains it a few steps in a custom loop with each replica
fed a different slice, and writes to OUT.json:

* `distributed`: whether the converted model's variables belong to the strategy;
* `replica_views`: the moving statistics each replica normalizes with in
  inference (read inside `strategy.run`), for every BN layer;
* `cross_replica`: the same statistics read outside the replicas (what
  `get_weights`, checkpoints and saved models hold), and `expected`: the
  float64 mean over replicas of each replica's own moving average;
* `reloaded`: the trained model saved to `.keras` next to OUT.json and
  loaded back outside the strategy: whether it has the same layer classes,
  the same weights as the cross-replica reads, and the same inference outputs;
* `reductions`: per-variable (`reduce_to`) and batched (`batch_reduce_to`)
  cross-device reductions made while tracing one training step, for networks
  of 2 and 8 residual blocks, stock and converted.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import kerasbn  # noqa: E402

MOMENTUM = 0.5
STEPS = 3


def residual_net(blocks: int) -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(momentum=MOMENTUM)(x)
    for _ in range(blocks - 1):
        y = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.ReLU()(x))
        x = keras.layers.Add()([x, keras.layers.BatchNormalization(momentum=MOMENTUM)(y)])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def batch_norms(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, kerasbn.BatchNorm)]


def count_reductions(strategy, model) -> dict:
    """Cross-device reductions issued while tracing one SGD step of `model`."""
    counts = {"reduce_to": 0, "batch_reduce_to": 0}
    extended = strategy.extended
    originals = {name: getattr(extended, name) for name in counts}

    def counting(name):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    with strategy.scope():
        optimizer = keras.optimizers.SGD(0.1)

    @tf.function
    def step(x, y):
        def replica(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica, (x, y))

    x, y = np.ones((4, 8, 8, 3), "float32"), np.ones((4, 3), "float32")
    for name in counts:
        setattr(extended, name, counting(name))
    try:
        step.get_concrete_function(tf.TensorSpec(x.shape), tf.TensorSpec(y.shape))
    finally:
        for name, original in originals.items():
            setattr(extended, name, original)
    return counts


def main(out_path: str) -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    stock = residual_net(3)
    with strategy.scope():
        model = kerasbn.convert(stock)
    layers = batch_norms(model)
    results = {
        "distributed": all(
            isinstance(v.value, tf.distribute.DistributedValues) for v in model.weights
        ),
        "num_batch_norms": len(layers),
    }

    rng = np.random.default_rng(0)
    # Different data on each replica: scaled and shifted differently, so
    # unsynchronized statistics differ between the replicas.
    slices = [
        [rng.normal(r * 2.0, 1.0 + r, (3, 8, 8, 3)).astype("float32") for r in range(2)] for _ in range(STEPS)
    ]

    @tf.function
    def train_forward(x):
        return strategy.run(lambda x: model(x, training=True), (x,))

    # Each replica's own moving average, in float64, from its own batch statistics
    # (the first layer sees the conv of the input: recompute that with the stock net).
    first_conv = keras.Model(stock.inputs, stock.layers[1].output)
    first = layers[0]
    expected = [
        [np.zeros(4), np.ones(4)] for _ in range(2)
    ]
    for step_slices in slices:
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(step_slices[ctx.replica_id_in_sync_group])
        )
        train_forward(values)
        for r in range(2):
            z = np.asarray(first_conv(step_slices[r]), np.float64)
            mean, variance = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
            expected[r][0] = MOMENTUM * expected[r][0] + (1 - MOMENTUM) * mean
            expected[r][1] = MOMENTUM * expected[r][1] + (1 - MOMENTUM) * variance

    # The handover (every replica's copies set to their mean), then what each replica reads: its own copy.
    results["handed_over"] = kerasbn.sync_moving_statistics(model)

    @tf.function
    def replica_views():
        def view(_):
            return [tf.stack([tf.identity(v.value) for v in (layer.moving_mean, layer.moving_variance)])
                    for layer in layers]

        return strategy.run(view, (tf.constant(0.0),))

    views = replica_views()
    results["replica_views"] = [
        [np.asarray(strategy.experimental_local_results(v)[r]).tolist() for v in views] for r in range(2)
    ]
    results["cross_replica"] = [
        [keras.ops.convert_to_numpy(layer.moving_mean).tolist(), keras.ops.convert_to_numpy(layer.moving_variance).tolist()]
        for layer in layers
    ]
    results["expected_first"] = [(expected[0][i] + expected[1][i]) / 2 for i in range(2)]
    results["expected_first"] = [v.tolist() for v in results["expected_first"]]
    results["first_get_weights"] = [w.tolist() for w in first.get_weights()[2:]]
    # Saved from the strategy's variables (the cross-replica reads), loaded as a plain model.
    path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "converted.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    probe = rng.normal(0.0, 1.0, (2, 8, 8, 3)).astype("float32")
    results["reloaded"] = {
        "same_classes": [type(layer).__name__ for layer in loaded._flatten_layers()]
        == [type(layer).__name__ for layer in model._flatten_layers()],
        "same_weights": all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights())),
        "max_output_difference": float(
            np.max(np.abs(np.asarray(loaded(probe, training=False)) - np.asarray(model(probe, training=False))))
        ),
    }
    results["reductions"] = {}
    for blocks in (2, 8):
        stock_net = residual_net(blocks)
        with strategy.scope():
            stock_copy = keras.models.clone_model(stock_net)
            converted = kerasbn.convert(stock_net)
        results["reductions"][f"stock_{blocks}"] = count_reductions(strategy, stock_copy)
        results["reductions"][f"kerasbn_{blocks}"] = count_reductions(strategy, converted)
    with open(out_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1])

"""A custom training loop under MirroredStrategy, with the moving-statistics handover.

With the default `synchronized=False`, each replica updates its own copy of
every kerasbn.BatchNorm's moving statistics (no cross-replica call per
step). Before evaluating, `kerasbn.sync_moving_statistics(model)` sets every
copy to the cross-replica mean in one batched all-reduce. The CPU is split
into two logical devices, so this runs on any machine:

    python examples/custom_loop_mirrored.py --steps 100
    python examples/custom_loop_mirrored.py --tiny
"""

import tensorflow as tf

# First thing: logical devices must be configured before TensorFlow initialises.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import argparse  # noqa: E402

import numpy as np  # noqa: E402

import keras  # noqa: E402
import kerasbn  # noqa: E402

GLOBAL_BATCH = 32


def replica_copies(strategy, variable):
    """Each replica's own copy of `variable` (a read outside the replicas gives their mean)."""

    views = tf.function(lambda: strategy.run(tf.identity, args=(variable.value,)))()
    return np.stack([np.asarray(view) for view in strategy.experimental_local_results(views)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--tiny", action="store_true", help="three steps, for a smoke test")
    args = parser.parse_args()
    steps = 3 if args.tiny else args.steps

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, scale=3.0, size=(GLOBAL_BATCH * steps, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        bn = kerasbn.BatchNorm(momentum=0.9)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), bn, keras.layers.ReLU(), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.01)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    batches = iter(strategy.experimental_distribute_dataset(dataset))

    def replica_step(inputs, targets):
        with tf.GradientTape() as tape:
            squared = tf.square(model(inputs, training=True) - targets)[:, 0]
            loss = tf.nn.compute_average_loss(squared, global_batch_size=GLOBAL_BATCH)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def train_step(inputs, targets):
        losses = strategy.run(replica_step, args=(inputs, targets))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    for _ in range(steps):
        loss = train_step(*next(batches))
    print(f"{steps} steps on {strategy.num_replicas_in_sync} replicas, last loss {float(loss):.4f}")

    copies = replica_copies(strategy, bn.moving_mean)
    print(f"before the handover: replica copies of moving_mean differ by up to {np.ptp(copies, axis=0).max():.2e}")
    # Outside strategy.run (cross-replica context), on every worker.
    kerasbn.sync_moving_statistics(model)
    synced = replica_copies(strategy, bn.moving_mean)
    off_mean = float(np.max(np.abs(synced - copies.mean(axis=0))))
    print(f"after the handover: every copy's max |difference| from the former mean {off_mean:.2e} < 1e-5")

    # Evaluation inside the replicas: each normalizes with its own (now equal) copy.
    @tf.function
    def predict(inputs):
        return strategy.gather(strategy.run(lambda batch: model(batch, training=False), args=(inputs,)), axis=0)

    inputs, _ = next(iter(strategy.experimental_distribute_dataset(dataset)))
    difference = np.max(np.abs(predict(inputs).numpy() - keras.ops.convert_to_numpy(model(x[:GLOBAL_BATCH], training=False))))
    print(f"replicas against one device: max |difference| of the predictions {difference:.2e} < 1e-5")
    if not (off_mean < 1e-5 and difference < 1e-5):
        raise SystemExit("after the handover the replicas do not all normalize with the mean statistics")


if __name__ == "__main__":
    main()

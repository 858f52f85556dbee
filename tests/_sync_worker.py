"""Synchronized `kerasbn.BatchNorm` (fused path, replica groups) under `tf.distribute`, for tests/test_sync_fused.py.

Like tests/_dist_worker.py, it runs in a fresh process (logical CPU devices
must be configured before TensorFlow initialises), computes, and saves every
array the test asserts on to one `.npz` file:

    # MirroredStrategy with 4 logical CPU replicas:
    PYTHONPATH=. python tests/_sync_worker.py mirrored --replicas 4 --out /tmp/sync4.npz

    # One of 2 MultiWorkerMirroredStrategy workers (TF_CONFIG set per worker):
    PYTHONPATH=. python tests/_sync_worker.py multi-worker --out /tmp/w0.npz

Keys are dotted: `exact.<case>.g<group size>.s<step>.r<global replica id>.<quantity>`,
`counts.<kind>.<layers>.<quantity>`, `errors.<name>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from _dist_worker import distribute, initial_weights, per_replica  # tests/ is this script's folder

MOMENTUM = 0.6
EPSILON = 1e-3
# name: (feature shape, axis, fused); every case runs with synchronized=True.
CASES = {
    "nhwc": ((3, 2, 4), -1, None),  # the plan's fused path (4-D NHWC)
    "view": ((5, 3), -1, True),  # rank 3 viewed as (-1, 1, 1, C)
    "generic": ((3, 2, 4), -1, False),
    "nchw": ((4, 3, 2), 1, None),  # the plan's generic path (synchronized NCHW)
}
# Examples per replica at each step: uneven, empty slices, and (in groups of
# 2 of 4 replicas; groups of 1 of 2) a group without any example.
SPLITS = {
    4: [[3, 1, 2, 2], [2, 0, 3, 1], [0, 0, 2, 3], [1, 0, 0, 0]],
    2: [[3, 1], [2, 0], [0, 3]],
}
GROUP_SIZES = {4: [None, 2], 2: [None, 1]}


def steps_for(replicas, feature_shape, seed):
    """Per step: per-replica input slices and upstream gradients (float32)."""
    rng = np.random.default_rng(seed)
    steps = []
    for sizes in SPLITS[replicas]:
        xs = [(rng.normal(size=(n,) + feature_shape) * (1.0 + r) + 2.0 * r - 1.0).astype("float32")
              for r, n in enumerate(sizes)]
        ups = [rng.normal(size=(n,) + feature_shape).astype("float32") for n in sizes]
        steps.append((xs, ups))
    return steps


def train_step(strategy, layer):
    """A traced step: per replica its id, outputs, dx, local dgamma and dbeta, and its copy of the moving statistics."""
    import tensorflow as tf

    @tf.function
    def step(x, upstream):
        def replica_fn(x, upstream):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
            dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
            context = tf.distribute.get_replica_context()
            return (context.replica_id_in_sync_group, outputs, dx, dgamma, dbeta,
                    tf.identity(layer.moving_mean.value), tf.identity(layer.moving_variance.value))

        return strategy.run(replica_fn, args=(x, upstream))

    return step


def run_exact(strategy, seed, results, dtype="float32", cases=CASES, prefix="exact"):
    """Each case and group size: the steps of SPLITS, everything each replica sees, and which kernels ran."""
    import kerasbn

    replicas = strategy.num_replicas_in_sync
    for case, (feature_shape, axis, fused) in cases.items():
        channels = ((None,) + feature_shape)[axis]
        for group_size in GROUP_SIZES[replicas]:
            key = f"{prefix}.{case}.g{group_size or replicas}"
            weights = initial_weights(seed, channels)
            with strategy.scope():
                layer = kerasbn.BatchNorm(axis=axis, momentum=MOMENTUM, epsilon=EPSILON, synchronized=True,
                                          fused=fused, sync_group_size=group_size, dtype=dtype)
                layer.build((None,) + feature_shape)
                layer.set_weights(weights)
            results[f"{key}.initial"] = np.stack(weights)
            step = train_step(strategy, layer)
            for index, (xs, ups) in enumerate(steps_for(replicas, feature_shape, seed)):
                x, upstream = distribute(strategy, xs), distribute(strategy, ups)
                if index == 0:
                    graph = step.get_concrete_function(x, upstream).graph.as_graph_def()
                    ops = [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]
                    results[f"{key}.fused_kernels"] = np.asarray(ops.count("FusedBatchNormV3"))
                ids, outputs, dx, dgamma, dbeta, mean, variance = (
                    per_replica(strategy, v) for v in step(x, upstream))
                for i, replica in enumerate(int(r) for r in ids):
                    row = f"{key}.s{index}.r{replica}"
                    results[f"{row}.inputs"], results[f"{row}.upstream"] = xs[replica], ups[replica]
                    results[f"{row}.outputs"] = outputs[i].astype("float32")
                    results[f"{row}.input_grad"] = dx[i].astype("float32")
                    results[f"{row}.gamma_grad"], results[f"{row}.beta_grad"] = dgamma[i], dbeta[i]
                    results[f"{row}.moving_mean"], results[f"{row}.moving_variance"] = mean[i], variance[i]


def counting_model(strategy, layers, fused, group_size):
    """Conv2D + synchronized batch norm, `layers` times, a dense head, and its built optimizer."""
    import keras

    import kerasbn

    with strategy.scope():
        stack = [keras.Input((3, 2, 4))]
        for _ in range(layers):
            stack += [keras.layers.Conv2D(4, 1),
                      kerasbn.BatchNorm(synchronized=True, fused=fused, sync_group_size=group_size)]
        model = keras.Sequential(stack + [keras.layers.Flatten(), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def run_counts(strategy, seed, results):
    """Cross-replica calls (at the API) and collective ops (in the graph) of a traced training step."""
    import tensorflow as tf

    import kerasbn
    from _collectives import count_collective_ops

    replicas = strategy.num_replicas_in_sync
    xs, _ = steps_for(replicas, (3, 2, 4), seed)[1]
    x = distribute(strategy, xs)
    target = distribute(strategy, [s[:, 0, 0, :1] for s in xs])
    for kind, fused in (("fused", True), ("generic", False)):
        for group_size in GROUP_SIZES[replicas]:
            for layers in (1, 3):
                model, optimizer = counting_model(strategy, layers, fused, group_size)

                def replica_train(x, target, model=model, optimizer=optimizer):
                    with tf.GradientTape() as tape:
                        loss = tf.reduce_sum(tf.square(model(x, training=True) - target))
                    gradients = tape.gradient(loss, model.trainable_variables)
                    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
                    return loss

                train = tf.function(lambda x, t, f=replica_train: strategy.run(f, args=(x, t)))
                with kerasbn.count_cross_replica_calls() as calls:
                    concrete = train.get_concrete_function(x, target)
                train(x, target)  # and it runs
                key = f"counts.{kind}.g{group_size or replicas}.{layers}"
                for name, count in calls.items():
                    results[f"{key}.{name}"] = np.asarray(count)
                ops = count_collective_ops(concrete)
                # Every replica launches its own in this process's graph.
                results[f"{key}.collective_ops"] = np.asarray(sum(ops.values()) / len(strategy.extended.worker_devices))
                results[f"{key}.all_gather_ops"] = np.asarray(ops.get("CollectiveGatherV2", 0))


def run_errors(strategy, seed, results):
    """The errors a user meets: a group size that does not divide the replicas, a synchronized RNN cell in `fit`."""
    import keras
    import tensorflow as tf

    import kerasbn
    from _dist_cell import NormalizedCell

    with strategy.scope():
        layer = kerasbn.BatchNorm(synchronized=True, sync_group_size=3)
        layer.build((None, 4))
    try:
        strategy.run(tf.function(lambda x: layer(x, training=True)), args=(tf.ones((2, 4)),))
        results["errors.group_size"] = np.asarray("")
    except ValueError as error:
        results["errors.group_size"] = np.asarray(str(error))

    rng = np.random.default_rng(seed)
    sequences = rng.normal(size=(16, 4, 3)).astype("float32")
    targets = rng.normal(size=(16, 5)).astype("float32")
    for unroll in (False, True):
        with strategy.scope():
            model = keras.Sequential([keras.Input((4, 3)),
                                      keras.layers.RNN(NormalizedCell(5, synchronized=True), unroll=unroll)])
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        try:
            loss = model.fit(sequences, targets, batch_size=8, epochs=1, verbose=0).history["loss"][-1]
            results[f"errors.rnn_unroll{int(unroll)}"] = np.asarray("")
            results[f"errors.rnn_unroll{int(unroll)}.loss"] = np.asarray(loss)
        except ValueError as error:
            results[f"errors.rnn_unroll{int(unroll)}"] = np.asarray(str(error))


def mirrored(args):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    results = {"num_replicas": np.asarray(strategy.num_replicas_in_sync)}
    run_exact(strategy, args.seed, results)
    run_exact(strategy, args.seed, results, dtype="mixed_float16", cases={"nhwc": CASES["nhwc"]}, prefix="mixed")
    run_counts(strategy, args.seed, results)
    run_errors(strategy, args.seed, results)
    return results


def multi_worker(args):
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TensorFlow op
    results = {"num_replicas": np.asarray(strategy.num_replicas_in_sync),
               "task_index": np.asarray(strategy.cluster_resolver.task_id)}
    run_exact(strategy, args.seed, results, cases={k: CASES[k] for k in ("nhwc", "generic")})
    run_counts(strategy, args.seed, results)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["mirrored", "multi-worker"])
    parser.add_argument("--replicas", type=int, default=4, help="logical CPU devices (mirrored mode)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=1919)
    args = parser.parse_args(argv)
    start = time.time()
    results = mirrored(args) if args.mode == "mirrored" else multi_worker(args)
    np.savez(args.out, **results)
    print(json.dumps({"ok": True, "arrays": len(results), "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs `kerasbn.BatchNorm` under `tf.distribute` in a fresh process, for tests/test_distributed.py.

Multi-replica runs on a CPU-only machine need the CPU split into logical
devices before TensorFlow initialises its runtime, so each scenario runs in a
process of its own. This script computes; the test asserts. It saves every
array the test needs (inputs, per-replica outputs, gradients and moving
statistics, single-device references) to one `.npz` file and prints a JSON
summary line. Two modes:

    # One MirroredStrategy process with 3 logical CPU replicas:
    PYTHONPATH=. python tests/_dist_worker.py mirrored --replicas 3 --out /tmp/r3.npz --workdir /tmp/r3

    # One worker of a MultiWorkerMirroredStrategy cluster (TF_CONFIG set per worker):
    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:p0", "127.0.0.1:p1"]}, "task": {"type": "worker", "index": 0}}' \
        PYTHONPATH=. python tests/_dist_worker.py multi-worker --out /tmp/w0.npz

Array keys are dotted paths, e.g. `sync.s1.r2.outputs` (scenario, step,
global replica id, quantity), `sync.s1.copy0.moving_mean` (the moving mean
held by this process's first replica copy), or `sync.ref.s1.outputs` for the
single-device reference fed the whole global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

# Small NHWC inputs: rank 4 so that synchronized=False takes the fused kernel
# (fused=None picks it) and synchronized=True the generic cross-replica path;
# the spatial axes make every statistic a count-weighted one.
FEATURE_SHAPE = (2, 2, 3)
CHANNELS = FEATURE_SHAPE[-1]
MOMENTUM = 0.6  # far from 1, so a wrong batch statistic shows in the moving ones
EPSILON = 1e-3
LEARNING_RATE = 0.02

# Examples per replica at each step. Later steps use global batches the
# replica count does not divide, and very unequal slices, so that a
# count-unweighted average of per-replica moments would be visibly wrong.
SPLITS = {
    2: [[4, 4], [4, 3], [1, 6]],
    3: [[3, 3, 3], [3, 3, 2], [1, 4, 3]],
}


# Edge cases of small, uneven global batches: a replica with one example
# (one value per channel for 2-D inputs) and a replica with none.
EDGE_SPLITS = {
    2: [[1, 0], [2, 1]],
    3: [[1, 1, 0], [2, 1, 0]],
}
# 2-D inputs (the generic path), and NHWC with 4 channels (the fused kernel, fused=None).
EDGE_FEATURE_SHAPES = {"flat": (CHANNELS,), "nhwc": (2, 2, 4)}


def make_steps(splits, seed):
    """Per step, a list of per-replica slices `(n_r, *FEATURE_SHAPE)` and the upstream weights.

    Each example gets its own offset, so different slices have clearly
    different means and variances.
    """
    rng = np.random.default_rng(seed)
    steps = []
    for sizes in splits:
        total = sum(sizes)
        offsets = np.linspace(-2.0, 3.0, total).reshape(total, 1, 1, 1)
        scales = np.array([0.5, 1.0, 2.0]).reshape(1, 1, 1, CHANNELS)
        x = (rng.normal(size=(total,) + FEATURE_SHAPE) * scales + offsets).astype("float32")
        upstream = rng.normal(size=x.shape).astype("float32")
        bounds = np.cumsum([0] + list(sizes))
        steps.append(
            (
                [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                [upstream[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            )
        )
    return steps


def initial_weights(seed, channels=CHANNELS):
    """Non-trivial gamma, beta, moving mean and moving variance."""
    rng = np.random.default_rng(seed)
    return [
        (1.0 + 0.5 * rng.uniform(size=channels)).astype("float32"),
        rng.normal(size=channels).astype("float32"),
        rng.normal(size=channels).astype("float32"),
        (0.5 + rng.uniform(size=channels)).astype("float32"),
    ]


def per_replica(strategy, value):
    """The local components of a distributed value, as NumPy arrays."""
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def statistics_views(strategy, layer, name):
    """The moving statistic `name` of a kerasbn.BatchNorm as each replica of this process reads it.

    Inside a replica a read is that replica's own copy (no cross-replica
    call): what inference there normalizes with.
    """
    import tensorflow as tf

    @tf.function
    def views():
        return strategy.run(lambda: tf.identity(getattr(layer, name).value))

    return per_replica(strategy, views())


def variable_replicas(variable):
    """Every replica's copy of a (Keras) variable held by this process."""
    tf_variable = getattr(variable, "value", variable)
    copies = getattr(tf_variable, "values", None)
    if copies is None:
        copies = (tf_variable,)
    return [np.asarray(c.numpy()) for c in copies]


def distribute(strategy, slices):
    import tensorflow as tf

    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(slices[ctx.replica_id_in_sync_group])
    )


def build_model(layer):
    """A model holding just `layer`, built for FEATURE_SHAPE inputs (so it can be saved)."""
    import keras

    return keras.Sequential([keras.Input(FEATURE_SHAPE), layer])


def run_synchronized(strategy, seed, results, prefix="sync"):
    """Steps of forward, backward and a gradient update with synchronized=True.

    Records per global replica id: outputs and input gradients, the
    SUM-all-reduced gamma/beta gradients, and each replica's moving statistics;
    and the same quantities of a single-device layer fed the global batch.
    Returns the distributed model (for saving).
    """
    import tensorflow as tf

    import kerasbn

    weights = initial_weights(seed)
    with strategy.scope():
        layer = kerasbn.BatchNorm(synchronized=True, momentum=MOMENTUM, epsilon=EPSILON)
        model = build_model(layer)
        layer.set_weights(weights)
    reference = kerasbn.BatchNorm(synchronized=True, momentum=MOMENTUM, epsilon=EPSILON)
    build_model(reference)
    reference.set_weights(weights)

    @tf.function
    def distributed_step(x, upstream):
        def replica_fn(x, upstream):
            context = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = layer(x, training=True)
                # Per-replica parts of the global loss sum(outputs * upstream).
                loss = tf.reduce_sum(outputs * upstream)
            dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
            dgamma, dbeta = context.all_reduce(tf.distribute.ReduceOp.SUM, [dgamma, dbeta])
            return context.replica_id_in_sync_group, outputs, dx, dgamma, dbeta

        return strategy.run(replica_fn, args=(x, upstream))

    @tf.function
    def reference_step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = reference(x, training=True)
            loss = tf.reduce_sum(outputs * upstream)
        dx, dgamma, dbeta = tape.gradient(loss, [x, reference.gamma, reference.beta])
        return outputs, dx, dgamma, dbeta

    for step, (slices, upstreams) in enumerate(make_steps(SPLITS[strategy.num_replicas_in_sync], seed)):
        key = f"{prefix}.s{step}"
        results[f"{key}.gamma_before"] = np.asarray(layer.gamma.numpy())
        results[f"{key}.beta_before"] = np.asarray(layer.beta.numpy())
        replica_ids, outputs, dx, dgamma, dbeta = (
            per_replica(strategy, v)
            for v in distributed_step(distribute(strategy, slices), distribute(strategy, upstreams))
        )
        for index, replica in enumerate(replica_ids):
            replica = int(replica)
            results[f"{key}.r{replica}.inputs"] = slices[replica]
            results[f"{key}.r{replica}.upstream"] = upstreams[replica]
            results[f"{key}.r{replica}.outputs"] = outputs[index]
            results[f"{key}.r{replica}.input_grad"] = dx[index]
            results[f"{key}.r{replica}.gamma_grad"] = dgamma[index]
            results[f"{key}.r{replica}.beta_grad"] = dbeta[index]
        for name in ("moving_mean", "moving_variance"):
            for copy, value in enumerate(statistics_views(strategy, layer, name)):
                results[f"{key}.copy{copy}.{name}"] = value
        # Gradient step in cross-replica context: every replica's gamma moves alike.
        layer.gamma.assign(layer.gamma - LEARNING_RATE * dgamma[0])
        layer.beta.assign(layer.beta - LEARNING_RATE * dbeta[0])

        global_x = np.concatenate(slices)
        global_upstream = np.concatenate(upstreams)
        ref_outputs, ref_dx, ref_dgamma, ref_dbeta = (
            np.asarray(v) for v in reference_step(tf.constant(global_x), tf.constant(global_upstream))
        )
        results[f"{prefix}.ref.s{step}.outputs"] = ref_outputs
        results[f"{prefix}.ref.s{step}.input_grad"] = ref_dx
        results[f"{prefix}.ref.s{step}.gamma_grad"] = ref_dgamma
        results[f"{prefix}.ref.s{step}.beta_grad"] = ref_dbeta
        results[f"{prefix}.ref.s{step}.moving_mean"] = np.asarray(reference.moving_mean.numpy())
        results[f"{prefix}.ref.s{step}.moving_variance"] = np.asarray(reference.moving_variance.numpy())
        reference.gamma.assign(reference.gamma - LEARNING_RATE * ref_dgamma)
        reference.beta.assign(reference.beta - LEARNING_RATE * ref_dbeta)
    return model


def run_unsynchronized(strategy, seed, results, prefix="unsync", with_stock=True, save_drifted=None):
    """Training-mode forward steps with synchronized=False, next to the stock layer.

    Records each replica's outputs, the moving statistics of every replica's
    copy (kerasbn and, if `with_stock`, keras.layers.BatchNormalization fed
    the same slices), and the outputs of a single-device kerasbn layer run on
    each replica's slice. With `save_drifted` (a path), also what the model
    saves before the handover, while the copies differ ("saved.drifted").
    Returns the distributed kerasbn model (for saving).
    """
    import keras
    import tensorflow as tf

    import kerasbn

    weights = initial_weights(seed)
    with strategy.scope():
        layer = kerasbn.BatchNorm(synchronized=False, momentum=MOMENTUM, epsilon=EPSILON)
        model = build_model(layer)
        layer.set_weights(weights)
        stock = None
        if with_stock:
            stock = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
            build_model(stock)
            stock.set_weights(weights)
    reference = kerasbn.BatchNorm(synchronized=False, momentum=MOMENTUM, epsilon=EPSILON)
    build_model(reference)
    reference.set_weights(weights)

    @tf.function
    def distributed_step(x):
        def replica_fn(x):
            context = tf.distribute.get_replica_context()
            outputs = layer(x, training=True)
            if stock is not None:
                stock(x, training=True)  # only its moving statistics are of interest
            return context.replica_id_in_sync_group, outputs

        return strategy.run(replica_fn, args=(x,))

    reference_step = tf.function(lambda x: reference(x, training=True))

    for step, (slices, _) in enumerate(make_steps(SPLITS[strategy.num_replicas_in_sync], seed + 1)):
        key = f"{prefix}.s{step}"
        replica_ids, outputs = (per_replica(strategy, v) for v in distributed_step(distribute(strategy, slices)))
        for index, replica in enumerate(replica_ids):
            replica = int(replica)
            results[f"{key}.r{replica}.inputs"] = slices[replica]
            results[f"{key}.r{replica}.outputs"] = outputs[index]
            results[f"{prefix}.ref.s{step}.r{replica}.outputs"] = np.asarray(
                reference_step(tf.constant(slices[replica]))
            )
        for name in ("moving_mean", "moving_variance"):
            for copy, value in enumerate(statistics_views(strategy, layer, name)):
                results[f"{key}.copy{copy}.{name}"] = value
            if stock is not None:
                for copy, value in enumerate(variable_replicas(getattr(stock, name))):
                    results[f"stock.s{step}.copy{copy}.{name}"] = value
    # A read outside replicas before the handover, then the handover itself.
    for name in ("moving_mean", "moving_variance"):
        results[f"{prefix}.read_before_handover.{name}"] = np.asarray(getattr(layer, name).numpy())
    if save_drifted:
        record_saved_model(model, save_drifted, results, "saved.drifted")
    results[f"{prefix}.handover_layers"] = np.asarray(kerasbn.sync_moving_statistics(model))
    for name in ("moving_mean", "moving_variance"):
        for copy, value in enumerate(statistics_views(strategy, layer, name)):
            results[f"{prefix}.handover.copy{copy}.{name}"] = value
    return model


def run_edges(strategy, seed, results):
    """Training-mode forward steps on EDGE_SPLITS (slices of one example and of none).

    For each feature shape in EDGE_FEATURE_SHAPES and synchronized False and
    True, records the inputs, each replica's outputs and every replica copy
    of the moving statistics, and for synchronized=False the outputs of the
    stock layer fed the same slices. Also records the error of `fused=True`
    with cross-replica statistics in NCHW (the fused synchronized path is NHWC-only).
    """
    import keras
    import tensorflow as tf

    import kerasbn

    rng = np.random.default_rng(seed)
    splits = EDGE_SPLITS[strategy.num_replicas_in_sync]
    for kind, feature_shape in EDGE_FEATURE_SHAPES.items():
        channels = feature_shape[-1]
        weights = [
            (1.0 + 0.5 * rng.uniform(size=channels)).astype("float32"),
            rng.normal(size=channels).astype("float32"),
            rng.normal(size=channels).astype("float32"),
            (0.5 + rng.uniform(size=channels)).astype("float32"),
        ]
        for synchronized in (False, True):
            prefix = f"edges.{kind}.sync{int(synchronized)}"
            results[f"{prefix}.initial"] = np.stack(weights)
            with strategy.scope():
                layer = kerasbn.BatchNorm(synchronized=synchronized, momentum=MOMENTUM, epsilon=EPSILON)
                layer.build((None,) + feature_shape)
                layer.set_weights(weights)
                stock = None
                if not synchronized:
                    stock = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
                    stock.build((None,) + feature_shape)
                    stock.set_weights(weights)

            @tf.function
            def distributed_step(x, layer=layer, stock=stock):
                def replica_fn(x):
                    context = tf.distribute.get_replica_context()
                    outputs = layer(x, training=True)
                    stock_outputs = outputs if stock is None else stock(x, training=True)
                    return context.replica_id_in_sync_group, outputs, stock_outputs

                return strategy.run(replica_fn, args=(x,))

            for step, sizes in enumerate(splits):
                key = f"{prefix}.s{step}"
                slices = [
                    (rng.normal(size=(n,) + feature_shape) * 2.0 + step + 1.0).astype("float32") for n in sizes
                ]
                replica_ids, outputs, stock_outputs = (
                    per_replica(strategy, v) for v in distributed_step(distribute(strategy, slices))
                )
                for index, replica in enumerate(replica_ids):
                    replica = int(replica)
                    results[f"{key}.r{replica}.inputs"] = slices[replica]
                    results[f"{key}.r{replica}.outputs"] = outputs[index]
                    if stock is not None:
                        results[f"{key}.r{replica}.stock_outputs"] = stock_outputs[index]
                for name in ("moving_mean", "moving_variance"):
                    for copy, value in enumerate(statistics_views(strategy, layer, name)):
                        results[f"{key}.copy{copy}.{name}"] = value

    with strategy.scope():
        fused = kerasbn.BatchNorm(axis=1, fused=True, synchronized=True)
        fused.build((None, 4, 2, 2))
    try:
        strategy.run(tf.function(lambda x: fused(x, training=True)), args=(tf.ones((2, 4, 2, 2)),))
        results["edges.fused_true_error"] = np.asarray("")
    except ValueError as error:
        results["edges.fused_true_error"] = np.asarray(str(error))


def record_saved_model(model, path, results, prefix):
    """What `get_weights()` and a saved-and-reloaded `.keras` file hold."""
    import keras

    layer = model.layers[-1]
    names = [w.path.split("/")[-1] for w in layer.weights]
    for name, value in zip(names, model.get_weights()):
        results[f"{prefix}.get_weights.{name}"] = np.asarray(value)
    model.save(path)
    reloaded = keras.saving.load_model(path)
    for name, value in zip(names, reloaded.get_weights()):
        results[f"{prefix}.reloaded.{name}"] = np.asarray(value)


def run_fit_and_recompute(strategy, seed, results):
    """`model.fit` under the strategy, then `kerasbn.recompute_statistics` on the same models."""
    import keras
    import tensorflow as tf

    import kerasbn

    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(24,) + FEATURE_SHAPE) + np.linspace(-1, 2, 24).reshape(24, 1, 1, 1)).astype("float32")
    y = rng.normal(size=(24, 1)).astype("float32")
    recompute_x = (rng.normal(size=(24,) + FEATURE_SHAPE) * 2.0 + 0.5).astype("float32")
    for synchronized in (True, False):
        prefix = f"fit.sync{int(synchronized)}"
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            model = keras.Sequential(
                [
                    keras.Input(FEATURE_SHAPE),
                    keras.layers.Conv2D(4, 1),
                    kerasbn.BatchNorm(synchronized=synchronized, momentum=0.8),
                    keras.layers.Flatten(),
                    keras.layers.Dense(1),
                ]
            )
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        bn = model.layers[1]
        for name in ("moving_mean", "moving_variance"):
            results[f"{prefix}.initial.{name}"] = statistics_views(strategy, bn, name)[0]
        # Keras 3.15's fit fails (AddN of unequal shapes, with any layer) when
        # the replica count does not divide the global batch, so split evenly.
        history = model.fit(
            x, y, batch_size=4 * strategy.num_replicas_in_sync, epochs=2, shuffle=False, verbose=0,
            callbacks=[kerasbn.callbacks.SyncMovingStatistics()],
        )
        results[f"{prefix}.loss"] = np.asarray(history.history["loss"])
        for name in ("moving_mean", "moving_variance"):
            results[f"{prefix}.copies.{name}"] = np.stack(statistics_views(strategy, bn, name))

        # recompute_statistics after fit: outside the strategy's scope for one
        # model, inside it for the other (users do both).
        dataset = tf.data.Dataset.from_tensor_slices(recompute_x).batch(8)
        with strategy.scope() if synchronized else contextlib.nullcontext():
            used = kerasbn.recompute_statistics(model, dataset)
        results[f"recompute.sync{int(synchronized)}.batches_used"] = np.asarray(used)
        # The BatchNorm's inputs per batch, for the reference average in the test.
        results[f"recompute.sync{int(synchronized)}.features"] = np.stack(
            [np.asarray(model.layers[0](recompute_x[i : i + 8])) for i in range(0, 24, 8)]
        )
        for name in ("moving_mean", "moving_variance"):
            results[f"recompute.sync{int(synchronized)}.copies.{name}"] = np.stack(
                statistics_views(strategy, bn, name)
            )


# Masked, mixed-precision synchronized statistics: (batch, time, channels) float16
# inputs with a (batch, time) mask, on uneven slices including an empty one.
MASKED_SHAPE = (5, 3)
MASKED_SPLITS = {2: [[3, 0], [1, 4]], 3: [[2, 0, 3], [1, 1, 4]]}


def contract_model(kind, layers, strategy):
    """Conv2D + batch norm, `layers` times, for counting cross-replica calls; with its optimizer."""
    import keras

    import kerasbn

    with strategy.scope():
        stack = [keras.Input(FEATURE_SHAPE)]
        for _ in range(layers):
            norm = (
                keras.layers.BatchNormalization(synchronized=True)
                if kind == "stock_sync"
                else kerasbn.BatchNorm(synchronized=kind == "kerasbn_sync")
            )
            stack += [keras.layers.Conv2D(CHANNELS, 1), norm]
        model = keras.Sequential(stack + [keras.layers.Flatten(), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def run_contract_counts(strategy, seed, results):
    """Cross-replica calls of a traced training step and inference step, for 1 and 3 batch-norm layers."""
    import tensorflow as tf

    import kerasbn

    slices, upstreams = make_steps(SPLITS[strategy.num_replicas_in_sync], seed)[1]
    x, target = distribute(strategy, slices), distribute(strategy, [u[:, 0, 0, :1] for u in upstreams])
    for kind in ("stock_sync", "kerasbn_sync", "kerasbn_unsync"):
        for layers in (1, 3):
            model, optimizer = contract_model(kind, layers, strategy)

            def replica_train(x, target, model=model, optimizer=optimizer):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(tf.square(model(x, training=True) - target))
                gradients = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(gradients, model.trainable_variables))
                return loss

            train = tf.function(lambda x, t, f=replica_train: strategy.run(f, args=(x, t)))
            infer = tf.function(lambda x, m=model: strategy.run(lambda v: m(v, training=False), args=(x,)))
            for step, function, args in (("train", train, (x, target)), ("infer", infer, (x,))):
                with kerasbn.count_cross_replica_calls() as counts:
                    function.get_concrete_function(*args)
                function(*args)  # and it runs
                for name, count in counts.items():
                    results[f"counts.{kind}.{layers}.{step}.{name}"] = np.asarray(count)


def run_inference_anywhere(strategy, seed, results):
    """Inference inside replicas where a collective cannot go: an RNN cell, a nested tf.function, predict."""
    import keras
    import tensorflow as tf

    import kerasbn
    from _dist_cell import NormalizedCell

    rng = np.random.default_rng(seed)
    replicas = strategy.num_replicas_in_sync
    sequences = rng.normal(size=(2 * replicas, 4, 3)).astype("float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4, 3)), keras.layers.RNN(NormalizedCell(5))])
        norm = model.layers[0].cell.norm
        norm.moving_mean.assign(rng.normal(size=5).astype("float32"))
        norm.moving_variance.assign((0.5 + rng.uniform(size=5)).astype("float32"))
    results["anywhere.inputs"] = sequences
    results["anywhere.reference"] = np.asarray(model(sequences, training=False))
    slices = np.split(sequences, replicas)

    @tf.function
    def rnn_step(x):
        return strategy.run(lambda v: model(v, training=False), args=(x,))

    results["anywhere.rnn"] = np.concatenate(per_replica(strategy, rnn_step(distribute(strategy, slices))))
    results["anywhere.predict"] = np.asarray(model.predict(sequences, batch_size=2 * replicas, verbose=0))

    with strategy.scope():
        layer = kerasbn.BatchNorm()
        layer.build((None, 5))
        layer.moving_mean.assign(rng.normal(size=5).astype("float32"))
    features = rng.normal(size=(2 * replicas, 5)).astype("float32")
    nested = strategy.run(tf.function(lambda v: layer.inference_function(v)),
                          args=(distribute(strategy, np.split(features, replicas)),))
    results["anywhere.inference_function"] = np.concatenate(per_replica(strategy, nested))
    results["anywhere.inference_reference"] = np.asarray(layer(features, training=False))


def run_masked_mixed(strategy, seed, results):
    """synchronized=True under mixed_float16 with a mask, on uneven slices (one of them empty)."""
    import keras
    import tensorflow as tf

    import kerasbn

    rng = np.random.default_rng(seed)
    channels = MASKED_SHAPE[-1]
    with strategy.scope():
        layer = kerasbn.BatchNorm(synchronized=True, momentum=MOMENTUM, epsilon=EPSILON, dtype="mixed_float16")
        layer.build((None,) + MASKED_SHAPE)
        layer.set_weights(initial_weights(seed))

    @tf.function
    def step(x, mask, upstream):
        def replica_fn(x, mask, upstream):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
            return tf.distribute.get_replica_context().replica_id_in_sync_group, outputs, tape.gradient(loss, x)

        return strategy.run(replica_fn, args=(x, mask, upstream))

    for index, sizes in enumerate(MASKED_SPLITS[strategy.num_replicas_in_sync]):
        total = sum(sizes)
        x = (rng.normal(size=(total,) + MASKED_SHAPE) * 3.0 + 50.0).astype("float16")
        mask = rng.uniform(size=(total, MASKED_SHAPE[0])) > 0.3
        mask[:, 0] = True
        x[~mask] = 1000.0  # padding far off: it must not leak into the statistics
        upstream = rng.normal(size=x.shape).astype("float32")
        bounds = np.cumsum([0] + sizes)
        pieces = [[a[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])] for a in (x, mask, upstream)]
        ids, outputs, grads = (per_replica(strategy, v) for v in step(*(distribute(strategy, p) for p in pieces)))
        order = np.argsort([int(i) for i in ids])
        key = f"masked.s{index}"
        results[f"{key}.inputs"], results[f"{key}.mask"], results[f"{key}.upstream"] = x, mask, upstream
        results[f"{key}.outputs"] = np.concatenate([outputs[i] for i in order]).astype("float32")
        results[f"{key}.input_grad"] = np.concatenate([grads[i] for i in order]).astype("float32")
        results[f"{key}.moving_mean"] = np.asarray(layer.moving_mean.numpy())
        results[f"{key}.moving_variance"] = np.asarray(layer.moving_variance.numpy())
        assert channels == len(results[f"{key}.moving_mean"])


def mirrored(args):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(args.replicas)]
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    import keras

    results = {
        "num_replicas": np.asarray(strategy.num_replicas_in_sync),
        "keras_version": np.asarray(keras.__version__),
    }
    os.makedirs(args.workdir, exist_ok=True)
    sync_model = run_synchronized(strategy, args.seed, results)
    unsync_model = run_unsynchronized(strategy, args.seed, results, save_drifted=os.path.join(args.workdir, "drifted.keras"))
    record_saved_model(sync_model, os.path.join(args.workdir, "sync.keras"), results, "saved.sync")
    record_saved_model(unsync_model, os.path.join(args.workdir, "unsync.keras"), results, "saved.unsync")
    run_edges(strategy, args.seed, results)
    run_contract_counts(strategy, args.seed, results)
    run_inference_anywhere(strategy, args.seed, results)
    run_masked_mixed(strategy, args.seed, results)
    if not args.skip_fit:
        run_fit_and_recompute(strategy, args.seed, results)
    return results


def multi_worker(args):
    import tensorflow as tf

    # The strategy must exist before any other TensorFlow op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = {
        "num_replicas": np.asarray(strategy.num_replicas_in_sync),
        "task_index": np.asarray(strategy.cluster_resolver.task_id),
    }
    run_synchronized(strategy, args.seed, results)
    model = run_unsynchronized(strategy, args.seed, results, with_stock=False)
    if args.chief_alone:
        run_chief_alone(strategy, model, results, args)
    return results


def run_chief_alone(strategy, model, results, args):
    """The chief reads, saves and hands over alone while the other worker stays alive but idle.

    Reads and saves must return at once (no collective); the handover, a
    collective, must raise within its timeout instead of waiting forever.
    """
    import kerasbn

    if strategy.cluster_resolver.task_id != 0:
        time.sleep(args.chief_alone)  # alive, joining nothing, until the chief is done
        return
    began = time.perf_counter()
    results["alone.weights"] = np.concatenate([np.ravel(w) for w in model.get_weights()])
    results["alone.read_seconds"] = np.asarray(time.perf_counter() - began)
    began = time.perf_counter()
    model.save(os.path.join(os.path.dirname(os.path.abspath(args.out)), "chief-alone.keras"))
    results["alone.save_seconds"] = np.asarray(time.perf_counter() - began)
    began = time.perf_counter()
    try:
        kerasbn.sync_moving_statistics(model, timeout_seconds=5)
        results["alone.sync_error"] = np.asarray("")
    except RuntimeError as error:
        results["alone.sync_error"] = np.asarray(str(error))
    results["alone.sync_seconds"] = np.asarray(time.perf_counter() - began)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["mirrored", "multi-worker"])
    parser.add_argument("--replicas", type=int, default=2, help="logical CPU devices (mirrored mode)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--workdir", default=None, help="where .keras files go (mirrored mode)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--skip-fit", action="store_true", help="skip the model.fit / recompute part")
    parser.add_argument("--chief-alone", type=float, default=0.0,
                        help="multi-worker: the chief reads, saves and syncs alone; the other worker idles this long")
    args = parser.parse_args(argv)
    if args.workdir is None:
        args.workdir = os.path.dirname(os.path.abspath(args.out))
    start = time.time()
    results = mirrored(args) if args.mode == "mirrored" else multi_worker(args)
    np.savez(args.out, **results)
    print(json.dumps({"ok": True, "mode": args.mode, "arrays": len(results), "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

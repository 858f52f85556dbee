"""The `distributed` suite's worker: synchronized batch norm under a strategy, timed and its collectives counted.

    python -m bench.distributed_worker --network resnet50 --json-out /tmp/mirrored.json
    python -m bench.distributed_worker --cluster 127.0.0.1:P0 127.0.0.1:P1 --task 0 --json-out /tmp/w0.json  # & task 1

Without `--cluster`: MirroredStrategy over 2 logical CPU devices; with it,
one worker of a MultiWorkerMirroredStrategy cluster (TF_CONFIG from the
addresses; the workers make the same calls in the same order, as their
collectives must pair up: one call per repetition). Times the training steps
of `VARIANTS` and the inference of stock and kerasbn interleaved, and counts
each step's cross-replica calls while it is traced (`kerasbn.count_cross_replica_calls`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SUITE = "distributed"
VARIANTS = {
    "stock_sync": "keras.layers.BatchNormalization(synchronized=True) in every batch norm (the reference)",
    "kerasbn_sync": "kerasbn.convert of stock_sync: kerasbn.BatchNorm(synchronized=True)",
    "kerasbn": "kerasbn.convert of the stock network: kerasbn.BatchNorm(synchronized=False)",
    "stock": "inference of stock_sync (synchronized does not apply in inference)",
}


def two_conv(input_shape, classes):
    """A tiny functional network with two conv + batch-norm blocks, for smoke runs."""
    import keras

    inputs = x = keras.Input(input_shape)
    for index in (1, 2):
        x = keras.layers.Conv2D(8, 3, use_bias=False, name=f"conv{index}")(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization(name=f"bn{index}")(x))
    outputs = keras.layers.Dense(classes)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def build(network: str, image_shape, strategy) -> dict:
    """The variants' models plus `no_bn` (a classifier head alone: the step's calls that are not batch norm's)."""
    import keras

    import kerasbn
    from bench.models_worker import rebuild_batch_norms

    def synchronized(layer):
        return type(layer).from_config({**layer.get_config(), "synchronized": True})

    with strategy.scope():
        stock = two_conv(image_shape, 10) if network == "two_conv" else keras.applications.ResNet50(
            weights=None, input_shape=image_shape, classes=10
        )  # fmt: skip
        stock_sync = rebuild_batch_norms(stock, synchronized)
        pooling = keras.layers.GlobalAveragePooling2D()
        head = keras.Sequential([keras.Input(image_shape), pooling, keras.layers.Dense(10)])
        models = {"no_bn": head, "stock_sync": stock_sync, "kerasbn_sync": kerasbn.convert(stock_sync),
                  "kerasbn": kerasbn.convert(stock)}  # fmt: skip
        for model in models.values():
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(),
                          jit_compile=False)  # fmt: skip
            # Built now, so that the first call traces the step once (no variables created in it).
            model.optimizer.build(model.trainable_variables)
    return models


def train_call(model, strategy, dataset):
    """One training step per call: `model.train_step` in `strategy.run` in a tf.function (fit's step).

    Not `model.train_function`: under MultiWorkerMirroredStrategy Keras 3.15's
    reduction of the logs calls strategy.reduce("MEAN", loss, axis=0) on the
    scalar loss, which fails; the logs are left per replica here, for both strategies.
    """
    import tensorflow as tf

    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    step = tf.function(lambda: strategy.run(model.train_step, args=(iterator.get_next(),)), autograph=False)
    return step


def measure(strategy, args) -> list:
    import numpy as np
    import tensorflow as tf

    import kerasbn
    from bench.models_worker import count_batch_norms, predict_call
    from bench.suites import timed_records
    from bench.timing import Candidate, time_interleaved
    from bench.training_worker import synthetic_dataset

    replicas, kind = strategy.num_replicas_in_sync, "multiworker" if args.cluster else "mirrored"
    image_shape = (args.image_size, args.image_size, 3)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = synthetic_dataset(args.batch, image_shape, batches=4).with_options(options)
    images = tf.constant(np.random.default_rng(1).standard_normal((args.batch // replicas, *image_shape), "float32"))
    models = build(args.network, image_shape, strategy)
    steps = {("train_step", v): train_call(m, strategy, dataset) for v, m in models.items()}
    for variant in ("no_bn", "stock", "kerasbn"):  # inference of stock: of stock_sync (no statistics to sync)
        steps["inference", variant] = predict_call(models.get(variant, models["stock_sync"]), images, strategy)
    counts, trace_s = {}, {}
    for key, call in steps.items():  # the first call traces: counted, and timed apart
        start = time.perf_counter()
        with kerasbn.count_cross_replica_calls() as counter:
            call()
        counts[key], trace_s[key] = sum(counter.values()), time.perf_counter() - start
    candidates = [Candidate(f"{kind}/{mode}/{variant}", call) for (mode, variant), call in steps.items()
                  if variant != "no_bn"]  # fmt: skip
    timings = time_interleaved(candidates, args.repeats, args.min_repetition_s)
    label = dict(shape=(args.batch, *image_shape), layout="NHWC", jit=False, replicas=replicas, network=args.network,
                 strategy="MultiWorkerMirroredStrategy" if args.cluster else type(strategy).__name__,
                 workers=len(args.cluster or [None]))  # fmt: skip

    def fields(name):
        mode, variant = name.split("/")[1:]
        layers = count_batch_norms(models.get(variant, models["stock_sync"]))
        calls, base = counts[mode, variant], counts[mode, "no_bn"]
        return dict(**label, mode=mode, variant=variant, reference=variant.startswith("stock"),
                    cross_replica_calls=calls, calls_without_batch_norm=base, batch_norm_layers=layers,
                    calls_per_batch_norm=(calls - base) / layers, first_call_s=trace_s[mode, variant])  # fmt: skip

    return timed_records(SUITE, timings, fields)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=("resnet50", "two_conv"), default="resnet50")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--min-repetition-s", type=float, default=0.5, help="0 with --cluster")
    parser.add_argument("--cluster", nargs="+", help="host:port of every worker: MultiWorkerMirroredStrategy")
    parser.add_argument("--task", type=int, default=0, help="this worker's index in --cluster")
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    if args.cluster:
        args.min_repetition_s = 0.0
        task = {"type": "worker", "index": args.task}
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": args.cluster}, "task": task})
        from training.distribute import get_strategy

        strategy = get_strategy("multi-worker")
    else:
        from bench.training_worker import configure_devices

        strategy = configure_devices(2)()
    records = measure(strategy, args)
    with open(args.json_out, "w", encoding="utf-8") as out:
        json.dump({"records": records}, out)
    return 0


if __name__ == "__main__":
    code = main()
    # The records are written; TensorFlow's native teardown after a MirroredStrategy run can hang for minutes.
    sys.stderr.flush()
    os._exit(code)

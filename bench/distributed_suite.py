"""Issue 14: synchronized batch norm under MirroredStrategy and MultiWorkerMirroredStrategy, and unknown batch sizes.

The suite runs this module as its worker (`bench.workers`): once with
MirroredStrategy over 2 logical CPU devices, then as two
MultiWorkerMirroredStrategy workers on 127.0.0.1 (the chief's records kept):

    python -m bench.distributed_suite --network resnet50 --json-out mirrored.json
    python -m bench.distributed_suite --cluster 127.0.0.1:P0 127.0.0.1:P1 --task 0 --json-out w0.json  # & task 1

A worker times the training steps of `VARIANTS` and inference interleaved (the
workers make the same calls in the same order, as their collectives must pair
up) and counts each step's cross-replica calls while it is traced. In the
suite's own process it then times the kerasbn layer's rank-2 train step with
the batch known and unknown. The goals are evaluated by
`bench.report.goal_distributed`; the suite's notes say how it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.suites import BenchConfig, SuiteResult, register_suite, timed_records
from bench.timing import Candidate, time_interleaved
from bench.workers import compile_models, configure_devices, free_ports, run_worker, run_workers, serve

SUITE = "distributed"
DYNAMIC_SHAPE = (256, 120)
VARIANTS = {
    "stock_sync": "keras.layers.BatchNormalization(synchronized=True) in every batch norm (the reference)",
    "kerasbn_sync": "kerasbn.convert of stock_sync: kerasbn.BatchNorm(synchronized=True)",
    "kerasbn": "kerasbn.convert of the stock network: kerasbn.BatchNorm(synchronized=False)",
    "stock": "inference of stock_sync (synchronized does not apply in inference)",
}


@register_suite(SUITE, "synchronized BN, ResNet50: MirroredStrategy and 2 MWMS workers; unknown batch")
def run_distributed(config: BenchConfig, previous) -> SuiteResult:
    del previous
    network, size, batch = ("two_conv", 32, 8) if config.quick else ("resnet50", 112, 32)
    repeats = config.repeats_or(full=8, quick=2)
    common = ["--network", network, "--image-size", size, "--batch", batch, "--repeats", repeats]
    timeout_s = 600 if config.quick else 1800
    records = run_worker(__name__, [*common, "--min-repetition-s", 0 if config.quick else 0.5], timeout_s)
    cluster = ["--cluster", *(f"127.0.0.1:{port}" for port in free_ports(2))]
    records += run_workers(__name__, [[*common, *cluster, "--task", task] for task in (0, 1)], timeout_s)[0]
    records += measure_dynamic_batch(config.repeats_or(full=15, quick=3), 0.05 if config.quick else 0.2)
    notes = [
        f"{network}, weights=None, input {size}x{size}x3, 10 classes, global batch {batch}, SGD(0.01), float32, "
        "jit_compile=False; synthetic images. Training step: model.train_step in strategy.run in a tf.function "
        "(fit's step without the logs' reduction, which fails under MWMS in Keras 3.15); inference: "
        "model(x, training=False) in strategy.run in a tf.function, each replica on batch / replicas images.",
        "MirroredStrategy: one process, 2 logical CPU devices. MultiWorkerMirroredStrategy: 2 worker processes "
        "on 127.0.0.1 sharing the CPU, one replica each; the chief's times. Within a process every variant is "
        f"timed interleaved: a first (traced) call, a warm-up call, then {repeats} rounds, order rotated.",
        "Cross-replica calls per step: counted while the step is traced (kerasbn.count_cross_replica_calls:"
        " outermost ReplicaContext.all_reduce/all_gather and StrategyExtended.reduce_to/"
        "batch_reduce_to, as one replica makes them, backward passes included). Per batch norm: (calls - the "
        "calls of the same step on GlobalAveragePooling + Dense, no batch norm) / batch-norm layers.",
        "What synchronizing adds: kerasbn_sync - kerasbn for kerasbn, stock_sync - kerasbn for stock.",
        f"Unknown batch: kerasbn.BatchNorm's train step (forward, gradients, moving averages) on {DYNAMIC_SHAPE}, "
        "one tf.function traced for TensorSpec batch 256 and for batch None, timed interleaved in this process.",
    ]
    return SuiteResult(records=records, notes=notes)


def measure_dynamic_batch(repeats: int, min_repetition_s: float) -> list:
    """kerasbn's rank-2 train step with the batch known and unknown, one tf.function traced for each."""
    import tensorflow as tf

    from bench.implementations import Case, build_step

    step = build_step("kerasbn", Case(DYNAMIC_SHAPE, "NC", "train_step", False))
    x, upstream = tf.random.normal(DYNAMIC_SHAPE, seed=1), tf.random.normal(DYNAMIC_SHAPE, seed=2)
    candidates = []
    for batch in (DYNAMIC_SHAPE[0], None):
        spec = tf.TensorSpec((batch, DYNAMIC_SHAPE[1]), tf.float32)
        concrete = step.get_concrete_function(spec, spec)
        candidates.append(Candidate(f"kerasbn/batch {batch}", lambda concrete=concrete: concrete(x, upstream)))
    timings = time_interleaved(candidates, repeats, min_repetition_s)
    return timed_records(SUITE, timings, lambda name: dict(
        shape=DYNAMIC_SHAPE, layout="NC", mode="train_step", jit=False, variant="dynamic_batch",
        reference=name.endswith(str(DYNAMIC_SHAPE[0])),
    ))  # fmt: skip


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
    from bench.models_suite import rebuild_batch_norms

    def synchronized(layer):
        return type(layer).from_config({**layer.get_config(), "synchronized": True})

    with strategy.scope():
        stock = two_conv(image_shape, 10) if network == "two_conv" else keras.applications.ResNet50(
            weights=None, input_shape=image_shape, classes=10
        )  # fmt: skip
        stock_sync = rebuild_batch_norms(stock, synchronized)
        layers = [keras.Input(image_shape), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
        head = keras.Sequential(layers)
        models = compile_models({"no_bn": head, "stock_sync": stock_sync, "kerasbn_sync": kerasbn.convert(stock_sync),
                                 "kerasbn": kerasbn.convert(stock)})  # fmt: skip
        for model in models.values():
            # Built now, so that the first call traces the step once (no variables created in it).
            model.optimizer.build(model.trainable_variables)
    return models


def train_call(model, strategy, dataset):
    """One training step per call: `model.train_step` in `strategy.run` in a tf.function (fit's step).

    Not `model.train_function`: under MultiWorkerMirroredStrategy Keras 3.15's reduction of the logs
    (strategy.reduce("MEAN", loss, axis=0) on the scalar loss) fails; the logs are left per replica here.
    """
    import tensorflow as tf

    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    return tf.function(lambda: strategy.run(model.train_step, args=(iterator.get_next(),)), autograph=False)


def measure(args: argparse.Namespace) -> list:
    """Times the variants' steps under the strategy of `args`, interleaved; counts their cross-replica calls."""
    if args.cluster:
        task = {"type": "worker", "index": args.task}
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": args.cluster}, "task": task})
        from training.distribute import get_strategy

        strategy, args.min_repetition_s = get_strategy("multi-worker"), 0.0
    else:
        strategy = configure_devices(2)
    import numpy as np
    import tensorflow as tf

    import kerasbn
    from bench.models_suite import count_batch_norms, predict_call
    from bench.workers import synthetic_dataset

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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=("resnet50", "two_conv"), default="resnet50")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--min-repetition-s", type=float, default=0.5, help="0 with --cluster")
    parser.add_argument("--cluster", nargs="+", help="host:port of every worker: MultiWorkerMirroredStrategy")
    parser.add_argument("--task", type=int, default=0, help="this worker's index in --cluster")
    return parser


if __name__ == "__main__":
    serve(parser(), measure)

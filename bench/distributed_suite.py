"""Issues 14, 19 and 20: synchronized batch norm across replicas (TensorFlow and JAX), and unknown batch sizes.

The suite runs this module as its worker (`bench.workers`) under each strategy:

    python -m bench.distributed_suite --network resnet50 --json-out mirrored.json  # --replicas 4
    python -m bench.distributed_suite --cluster 127.0.0.1:P0 127.0.0.1:P1 --task 0 --json-out w0.json  # & task 1
    # --profile: also a TF profile of kerasbn's, kerasbn_sync's and stock_sync's steps, into w0.profile.json
    KERAS_BACKEND=jax python -m bench.distributed_suite --backend jax ...  # --cluster: 2 processes

A worker times the training steps of `VARIANTS` (and on TensorFlow inference)
interleaved, and counts each step's collectives (workers make the same calls
in the same order, as their collectives must pair up). The suite's own process
then times kerasbn's rank-2 train step with the batch known and unknown. The
suite's notes say how; `bench.report.goal_distributed` evaluates the goals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import time

from bench.suites import BenchConfig, SuiteResult, register_suite, timed_records
from bench.timing import Candidate, time_interleaved
from bench.workers import compile_models, configure_devices, free_ports, run_worker, run_workers, serve

SUITE = "distributed"
DYNAMIC_SHAPE = (256, 120)
# kerasbn_sync_group's sync_group_size: 2 replicas, all in one group (the row times the group path's bookkeeping);
# training.sync_study times groups of 2 on 4 replicas (ResNet50 on 4 replicas here took over 30 minutes to trace).
GROUP_SIZE = 2
HOST_DEVICES = "--xla_force_host_platform_device_count"  # XLA_FLAGS: JAX's CPU as several devices
VARIANTS = {
    "stock_sync": "keras.layers.BatchNormalization(synchronized=True) in every batch norm (the reference)",
    "kerasbn_sync": "kerasbn.BatchNorm(synchronized=True, fused=None) in every batch norm: on TensorFlow the fused "
    "synchronized path where the plan takes it (NHWC)",
    "kerasbn_sync_generic": "kerasbn_sync with fused=False: the generic synchronized path",
    "kerasbn_sync_group": f"kerasbn_sync with sync_group_size={GROUP_SIZE}",
    "kerasbn": "kerasbn.convert of the stock network: kerasbn.BatchNorm(synchronized=False)",
    "stock": "the stock network (TensorFlow: inference of stock_sync, where synchronized does not apply)",
}
TF_VARIANTS = ("no_bn", "stock_sync", "kerasbn_sync", "kerasbn_sync_generic", "kerasbn_sync_group", "kerasbn")
JAX_VARIANTS = ("no_bn", "stock", "kerasbn", "kerasbn_sync")


@register_suite(SUITE, "synchronized BN, ResNet50: MirroredStrategy, 2 MWMS workers, JAX; unknown batch")
def run_distributed(config: BenchConfig, previous) -> SuiteResult:
    del previous
    network, size, batch = ("two_conv", 32, 8) if config.quick else ("resnet50", 112, 32)
    jax_size, jax_batch = (32, 8) if config.quick else (64, 16)  # issue 20: ResNet50 at 64x64, global batch 16
    repeats, timeout_s = config.repeats_or(full=8, quick=2), 600 if config.quick else 1800
    tf_args = ["--network", network, "--repeats", repeats, "--image-size", size, "--batch", batch]
    mirrored = [*tf_args, "--min-repetition-s", 0 if config.quick else 0.5]
    jax_args = [*tf_args[:4], "--backend", "jax", "--image-size", jax_size, "--batch", jax_batch]
    jax_env = {"KERAS_BACKEND": "jax"}

    def cluster(arguments, env=None):
        addresses = ["--cluster", *(f"127.0.0.1:{port}" for port in free_ports(2))]
        return run_workers(__name__, [[*arguments, *addresses, "--task", task] for task in (0, 1)], timeout_s, env)[0]

    records = run_worker(__name__, mirrored, timeout_s) + cluster(tf_args)
    records += run_worker(__name__, jax_args, timeout_s, {**jax_env, "XLA_FLAGS": f"{HOST_DEVICES}=2"})
    dynamic = measure_dynamic_batch(config.repeats_or(full=15, quick=3), 0.05 if config.quick else 0.2)
    records += cluster(jax_args, jax_env) + dynamic
    notes = [
        f"TensorFlow: {network}, {size}x{size}x3, global batch {batch}; JAX: {jax_size}x{jax_size}x3, global batch "
        f"{jax_batch}; weights=None, 10 classes, SGD(0.01), float32, synthetic images. TensorFlow training step: "
        "model.train_step in strategy.run in a tf.function, jit_compile=False (fit's step without the logs' "
        "reduction, which fails under MWMS in Keras 3.15); inference: model(x, training=False) in strategy.run, each "
        "replica on batch / replicas images. MirroredStrategy: one process, 2 logical CPU devices; "
        "MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1, the chief's times.",
        "JAX: keras.distribution.DataParallel, model.train_on_batch (jit) per call; 2 host devices in one process "
        f"({HOST_DEVICES}=2), and 2 processes of one device each (jax.distributed, gloo), each feeding half the batch.",
        f"Within a process the variants are timed interleaved: a first call (traced), a warm-up, {repeats} rounds.",
        "Cross-replica calls: counted while the step is traced (kerasbn.count_cross_replica_calls). Collectives: "
        "TensorFlow's Collective* ops in the step's graph per replica (none under MirroredStrategy's default "
        "ReductionToOneDevice: '-'), JAX's in the compiled HLO (kerasbn.diagnostics.count_hlo_collectives). Per "
        "batch norm: (count - the count of the same step on GlobalAveragePooling + Dense) / batch-norm layers.",
        "What synchronizing adds: kerasbn_sync - kerasbn for kerasbn, stock_sync - kerasbn for stock. Unknown batch: "
        f"kerasbn's train step on {DYNAMIC_SHAPE} traced for batch 256 and for None, timed interleaved.",
    ]
    return SuiteResult(records=records, notes=notes)


def measure_dynamic_batch(repeats: int, min_repetition_s: float) -> list:
    """kerasbn's rank-2 train step with the batch known and unknown, one tf.function traced for each."""
    import tensorflow as tf

    from bench.implementations import Case, build_step

    step = build_step("kerasbn", Case(DYNAMIC_SHAPE, "NC", "train_step", False))
    x, upstream = tf.random.normal(DYNAMIC_SHAPE, seed=1), tf.random.normal(DYNAMIC_SHAPE, seed=2)
    specs = {batch: tf.TensorSpec((batch, DYNAMIC_SHAPE[1]), tf.float32) for batch in (DYNAMIC_SHAPE[0], None)}
    traced = {batch: step.get_concrete_function(spec, spec) for batch, spec in specs.items()}
    candidates = [Candidate(f"kerasbn/batch {batch}", lambda f=f: f(x, upstream)) for batch, f in traced.items()]
    timings = time_interleaved(candidates, repeats, min_repetition_s)
    return timed_records(SUITE, timings, lambda name: dict(
        shape=DYNAMIC_SHAPE, layout="NC", mode="train_step", jit=False, variant="dynamic_batch",
        reference=name.endswith(str(DYNAMIC_SHAPE[0])),
    ))  # fmt: skip


def two_conv(input_shape, classes):
    """A tiny network with two conv + batch-norm blocks, for smoke runs."""
    from keras import Input, Sequential, layers

    blocks = [(layers.Conv2D(8, 3, use_bias=False), layers.BatchNormalization(), layers.ReLU()) for _ in "12"]
    return Sequential([Input(input_shape), *sum(blocks, ()), layers.GlobalAveragePooling2D(), layers.Dense(classes)])


def build(network: str, image_shape, variants, scope=None, jit_compile=False) -> dict:
    """`variants`' models (`no_bn`: a classifier head alone, the step's collectives that are not batch norm's)."""
    import keras

    import kerasbn
    from bench.models_suite import rebuild_batch_norms

    def rebuilt(model, **config):
        return rebuild_batch_norms(model, lambda layer: type(layer).from_config({**layer.get_config(), **config}))

    with scope or contextlib.nullcontext():
        stock = two_conv(image_shape, 10) if network == "two_conv" else keras.applications.ResNet50(
            weights=None, input_shape=image_shape, classes=10
        )  # fmt: skip
        layers = [keras.Input(image_shape), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
        models = {"no_bn": keras.Sequential(layers), "stock": stock, "kerasbn": kerasbn.convert(stock)}
        models["kerasbn_sync"] = sync = rebuilt(models["kerasbn"], synchronized=True)
        if "stock_sync" in variants:  # TensorFlow's (the stock layer synchronizes there only)
            models.update(stock_sync=rebuilt(stock, synchronized=True), kerasbn_sync_generic=rebuilt(sync, fused=False),
                          kerasbn_sync_group=rebuilt(sync, sync_group_size=GROUP_SIZE))  # fmt: skip
        models = compile_models({name: models[name] for name in variants}, jit_compile=jit_compile)
        for model in models.values():
            # Built now, so that the first call traces the step once (no variables created in it).
            model.optimizer.build(model.trainable_variables)
    return models


def train_call(model, strategy, dataset):
    """One training step per call: `model.train_step` in `strategy.run` in a tf.function (fit's step; not
    `model.train_function`, whose reduction of the logs fails under MultiWorkerMirroredStrategy in Keras 3.15)."""
    import tensorflow as tf

    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    return tf.function(lambda: strategy.run(model.train_step, args=(iterator.get_next(),)), autograph=False)


def collective_ops(function) -> int:
    """The collective ops in a traced tf.function's graph and in the functions it calls."""
    graph = function.get_concrete_function().graph.as_graph_def()
    nodes = [*graph.node, *(node for called in graph.library.function for node in called.node_def)]
    return sum(node.op.startswith(("Collective", "Nccl")) for node in nodes)


def measure(args: argparse.Namespace) -> list:
    """Times the variants' steps under the strategy of `args`, interleaved; counts their collectives."""
    if args.backend == "jax":
        return measure_jax(args)
    if args.cluster:
        task = {"type": "worker", "index": args.task}
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": args.cluster}, "task": task})
        from training.distribute import get_strategy

        strategy, args.min_repetition_s = get_strategy("multi-worker"), 0.0
    else:
        strategy = configure_devices(args.replicas)
    import numpy as np
    import tensorflow as tf

    import kerasbn
    from bench.models_suite import predict_call
    from bench.workers import synthetic_dataset

    replicas, local = strategy.num_replicas_in_sync, len(strategy.extended.worker_devices)
    kind = "multiworker" if args.cluster else "mirrored" + (str(replicas) if replicas != 2 else "")
    image_shape = (args.image_size, args.image_size, 3)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = synthetic_dataset(args.batch, image_shape, batches=4).with_options(options)
    images = tf.constant(np.random.default_rng(1).standard_normal((args.batch // replicas, *image_shape), "float32"))
    models = build(args.network, image_shape, TF_VARIANTS, strategy.scope())
    models["stock"] = models["stock_sync"]  # inference: synchronized does not apply
    steps = {("train_step", v): train_call(m, strategy, dataset) for v, m in models.items() if v != "stock"}
    for variant in ("no_bn", "stock", "kerasbn"):
        steps["inference", variant] = predict_call(models[variant], images, strategy)
    counts = {}
    for key, step in steps.items():  # the first call traces: counted, and timed apart
        start = time.perf_counter()
        with kerasbn.count_cross_replica_calls() as calls:
            step()
        ops = collective_ops(step) // local  # no collective op where ReductionToOneDevice reduces (None)
        counts[key] = dict(cross_replica_calls=sum(calls.values()), first_call_s=time.perf_counter() - start,
                           collectives=None if sum(calls.values()) and not ops else ops)  # fmt: skip
    strategy_name = "MultiWorkerMirroredStrategy" if args.cluster else type(strategy).__name__
    records = _records(models, steps, counts, args, f"{kind}/", strategy_name, replicas, len(args.cluster or [None]))
    if args.profile:  # where the time goes, on the chief (the profiler on both workers crashed one: 2026-12-04)
        from bench.profile import profile_step
        run = profile_step if args.task == 0 else lambda model, call, steps: [call() for _ in range(steps)]
        profiles = {v: run(models[v], steps["train_step", v], 4) for v in ("kerasbn", "kerasbn_sync", "stock_sync")}
        if args.task == 0:  # the other worker only ran the steps its collectives pair with
            pathlib.Path(args.json_out).with_suffix(".profile.json").write_text(json.dumps(profiles))
    return records


def measure_jax(args: argparse.Namespace) -> list:
    """The JAX variants' training steps under `keras.distribution.DataParallel`, timed; their HLO collectives."""
    import jax

    if args.cluster:
        jax.distributed.initialize(args.cluster[0], num_processes=len(args.cluster), process_id=args.task)
        args.min_repetition_s = 0.0
    import keras
    import numpy as np

    from kerasbn.diagnostics import count_hlo_collectives

    keras.utils.set_random_seed(0)  # the processes' weights must agree
    distribution = keras.distribution.DataParallel()
    keras.distribution.set_distribution(distribution)
    rng, local = np.random.default_rng(args.task), args.batch // jax.process_count()
    image_shape = (args.image_size, args.image_size, 3)
    x, y = rng.standard_normal((local, *image_shape), "float32"), rng.integers(0, 10, local)
    # The global batch, each process's part on its devices, as fit feeds a DataParallel model.
    data = [jax.make_array_from_process_local_data(distribution.get_data_layout(a.shape).backend_layout, a)
            for a in (x, y)]  # fmt: skip
    models = build(args.network, image_shape, JAX_VARIANTS, jit_compile=True)
    steps, counts = {}, {}
    for variant, model in models.items():
        start = time.perf_counter()
        model.train_on_batch(x, y)  # builds the optimizer and compiles the step
        first_call_s = time.perf_counter() - start
        state = tuple([v.value for v in variables] for variables in (model.trainable_variables,
                      model.non_trainable_variables, model.optimizer.variables, model.metrics_variables))  # fmt: skip
        collectives = count_hlo_collectives(model.train_step, state, (*data, None))["total"]
        counts["train_step", variant] = dict(first_call_s=first_call_s, cross_replica_calls=None,
                                             collectives=collectives)  # fmt: skip
        steps["train_step", variant] = lambda model=model: model.train_on_batch(x, y)
    kind, strategy = ("jax_processes", "processes") if args.cluster else ("jax", "host devices")
    return _records(models, steps, counts, args, f"{kind}/", f"JAX DataParallel on {jax.device_count()} {strategy}",
                    jax.device_count(), jax.process_count(), jit=True)


def _records(models, steps, counts, args, prefix, strategy, replicas, workers, jit=False) -> list:
    """Times `steps` (`{(mode, variant): call}`) interleaved but `no_bn`'s; their records, collectives per layer."""
    from bench.models_suite import count_batch_norms

    candidates = [Candidate(f"{prefix}{mode}/{variant}", call) for (mode, variant), call in steps.items()
                  if variant != "no_bn"]  # fmt: skip
    timings = time_interleaved(candidates, args.repeats, args.min_repetition_s)
    label = dict(shape=(args.batch, *models["no_bn"].input_shape[1:]), layout="NHWC", jit=jit, replicas=replicas,
                 network=args.network, strategy=strategy, workers=workers)  # fmt: skip

    def fields(name):
        mode, variant = name.split("/")[-2:]
        count, base, layers = counts[mode, variant], counts[mode, "no_bn"], count_batch_norms(models[variant])
        per_layer = {field: None if None in (count[field], base[field]) else (count[field] - base[field]) / layers
                     for field in ("cross_replica_calls", "collectives")}  # fmt: skip
        return dict(**label, mode=mode, variant=variant, reference=variant.startswith("stock"), **count,
                    calls_without_batch_norm=base["cross_replica_calls"], batch_norm_layers=layers,
                    collectives_without_batch_norm=base["collectives"],
                    calls_per_batch_norm=per_layer["cross_replica_calls"],
                    collectives_per_batch_norm=per_layer["collectives"])  # fmt: skip

    return timed_records(SUITE, timings, fields)


if __name__ == "__main__":  # --cluster: host:port of every worker (MWMS or JAX processes); --task: this one's index
    serve(measure, backend="tensorflow", network="resnet50", image_size=112, batch=32, repeats=8, min_repetition_s=0.5,
          replicas=2, cluster=[], task=0, profile=False)  # fmt: skip

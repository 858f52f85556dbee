"""Issue 14: synchronized batch norm under MirroredStrategy and MultiWorkerMirroredStrategy, and unknown batch sizes.

Runs `bench.distributed_worker` once with MirroredStrategy over 2 logical CPU
devices, then as two MultiWorkerMirroredStrategy workers on 127.0.0.1 (free
ports; both killed if either fails or the time runs out); reports the chief's
records. Then, in this process, the kerasbn layer's train step on a rank-2
(256, 120) input (LeNet's dense batch norm) traced with the batch known and
unknown (a dataset without drop_remainder), timed interleaved. The goals are
evaluated by `bench.report.goal_distributed`.
"""

from __future__ import annotations

import socket

from bench.suites import BenchConfig, SuiteResult, register_suite, timed_records
from bench.training_worker import run_worker, run_workers

WORKER = "bench.distributed_worker"
DYNAMIC_SHAPE = (256, 120)


def free_ports(count: int) -> list:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def measure_dynamic_batch(repeats: int, min_repetition_s: float) -> list:
    """kerasbn's rank-2 train step with the batch known and unknown, one tf.function traced for each."""
    import tensorflow as tf

    from bench.implementations import Case, build_step
    from bench.timing import Candidate, time_interleaved

    step = build_step("kerasbn", Case(DYNAMIC_SHAPE, "NC", "train_step", False))
    x, upstream = tf.random.normal(DYNAMIC_SHAPE, seed=1), tf.random.normal(DYNAMIC_SHAPE, seed=2)
    candidates = []
    for batch in (DYNAMIC_SHAPE[0], None):
        spec = tf.TensorSpec((batch, DYNAMIC_SHAPE[1]), tf.float32)
        concrete = step.get_concrete_function(spec, spec)
        candidates.append(Candidate(f"kerasbn/batch {batch}", lambda concrete=concrete: concrete(x, upstream)))
    timings = time_interleaved(candidates, repeats, min_repetition_s)
    return timed_records("distributed", timings, lambda name: dict(
        shape=DYNAMIC_SHAPE, layout="NC", mode="train_step", jit=False, variant="dynamic_batch",
        reference=name.endswith(str(DYNAMIC_SHAPE[0])),
    ))  # fmt: skip


@register_suite("distributed", "synchronized BN, ResNet50: MirroredStrategy and 2 MWMS workers; unknown batch")
def run_distributed(config: BenchConfig, previous) -> SuiteResult:
    del previous
    network, size, batch = ("two_conv", 32, 8) if config.quick else ("resnet50", 112, 32)
    repeats = config.repeats_or(full=8, quick=2)
    common = ["--network", network, "--image-size", size, "--batch", batch, "--repeats", repeats]
    timeout_s = 600 if config.quick else 1800
    records = run_worker(WORKER, [*common, "--min-repetition-s", 0 if config.quick else 0.5], timeout_s)
    cluster = ["--cluster", *(f"127.0.0.1:{port}" for port in free_ports(2))]
    arguments = [[*common, *cluster, "--task", task] for task in (0, 1)]
    records += run_workers(WORKER, arguments, timeout_s)[0]
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

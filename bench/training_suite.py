"""Part 3: LeNet-BN training throughput with kerasbn, keras and no batch norm, 1 and 2 replicas.

The suite runs this module as its worker (`bench.workers`), once per replica count:

    python -m bench.training_suite --replicas 2 --norms kerasbn keras none --steps 30 --repeats 5 --json-out t.json

The worker builds `training.models.build_lenet(norm=...)` for every norm inside
the strategy for that many replicas and fits them on synthetic
Fashion-MNIST-sized batches (random images and labels: the speed does not
depend on the values), one epoch of `--steps` steps per call, interleaved
across the norms. The time is the epoch's, from a callback, so fit's per-call
set-up is not counted.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List

from bench.suites import BenchConfig, SuiteResult, register_suite, skipped, timed_records
from bench.workers import compile_models, configure_devices, run_worker, serve, synthetic_dataset

SUITE = "training"
REPLICAS = (1, 2)
# Names the norms of the records; the value is build_lenet's keyword arguments.
NORMS: Dict[str, dict] = {
    "kerasbn": {"norm": "kerasbn"}, "keras": {"norm": "keras"}, "none": {"norm": "none"},
    "kerasbn_sync": {"norm": "kerasbn", "sync_bn": True},
}  # fmt: skip
IMAGE_SHAPE = (28, 28, 1)
EPOCH_EXAMPLES = 60000  # Fashion-MNIST's training set


@register_suite(SUITE, "LeNet-BN training throughput (fit), --norm kerasbn/keras/none, 1 and 2 replicas")
def run_training(config: BenchConfig, previous) -> SuiteResult:
    del previous
    steps, repeats = 4 if config.quick else 40, config.repeats_or(full=5, quick=2)
    # A full run also times synchronized (global-batch) statistics at 2 replicas.
    norms = ["kerasbn", "keras", "none"] + ([] if config.quick else ["kerasbn_sync"])
    records = []
    for replicas in REPLICAS:
        arguments = ["--replicas", replicas, "--norms", *norms, "--steps", steps, "--repeats", repeats]
        records += run_worker(__name__, arguments, timeout_s=600 if config.quick else 1800)
    notes = [
        f"model.fit, one epoch of {steps} steps of global batch 256 per call, on synthetic 28x28x1 images "
        f"(10 classes), SGD, jit_compile=False; the epoch's own time (a callback), {repeats} repetitions "
        "interleaved across norms after two warm-up fits. One process per replica count: one device, or "
        "MirroredStrategy over 2 logical CPU devices. epoch s (est.) = s per step x ceil(60000 / 256).",
    ]
    return SuiteResult(records=records, notes=notes)


def measure(args: argparse.Namespace) -> List[dict]:
    """Times an epoch of `--steps` steps in `fit` for each norm, interleaved; returns the records."""
    strategy = configure_devices(args.replicas)  # before keras starts TensorFlow's runtime
    import keras

    from bench.timing import Candidate, describe_error, time_interleaved
    from training.models import build_lenet

    batch, replicas = args.batch_size, args.replicas
    label = dict(shape=(batch, *IMAGE_SHAPE), layout="NHWC", mode="fit", jit=False, replicas=replicas)
    # kerasbn_sync only means something with several replicas.
    norms = [n for n in args.norms if replicas > 1 or n != "kerasbn_sync"]
    if strategy.num_replicas_in_sync != replicas:
        reason = f"asked for {replicas} replicas, the strategy has {strategy.num_replicas_in_sync}"
        return [skipped(SUITE, norm, reason=reason, **label) for norm in norms]
    dataset = synthetic_dataset(batch)
    records, candidates = [], []
    for norm in norms:
        try:
            with strategy.scope():
                model = compile_models({norm: build_lenet(**NORMS[norm])}, from_logits=True)[norm]
        except Exception as error:  # noqa: BLE001 - recorded as a result
            records.append(skipped(SUITE, norm, reason=describe_error(error), **label))
            continue
        marks: List[float] = []  # the epoch's start and end: fit's set-up is not timed

        def stamp(*_, marks=marks):
            marks.append(time.perf_counter())

        timer = keras.callbacks.LambdaCallback(on_epoch_begin=stamp, on_epoch_end=stamp)

        def fit(model=model, timer=timer, marks=marks):
            marks.clear()
            model.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=[timer])
            return marks[1] - marks[0]

        candidates.append(Candidate(norm, fit, self_timed=True))

    timings = time_interleaved(candidates, repeats=args.repeats, min_repetition_s=0.0)
    devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    records += timed_records(SUITE, timings, lambda norm: dict(
        **label, steps=args.steps, strategy=type(strategy).__name__, devices=devices, build_lenet_kwargs=NORMS[norm]
    ))  # fmt: skip
    for record in records:
        if record["record"] == "measurement":
            step_s = record["median_s"] / args.steps
            record.update(examples_per_s=batch / step_s, seconds_per_step=step_s,
                          epoch_s_estimate=step_s * math.ceil(EPOCH_EXAMPLES / batch))  # fmt: skip
    return records


if __name__ == "__main__":
    serve(measure, replicas=1, norms=list(NORMS), steps=40, repeats=5, batch_size=256)

"""Part 3: LeNet-BN training throughput with kerasbn, keras and no batch norm, 1 and 2 replicas.

Runs `bench.training_worker` in a subprocess per replica count (two
replicas on a CPU need logical devices configured before TensorFlow
starts), the norms interleaved inside each. The model comes
from `training.models.build_lenet`.
"""

from __future__ import annotations

from bench.suites import BenchConfig, SuiteResult, register_suite
from bench.training_worker import run_worker

REPLICAS = (1, 2)
NORMS = ("kerasbn", "keras", "none")


@register_suite("training", "LeNet-BN training throughput (fit), --norm kerasbn/keras/none, 1 and 2 replicas")
def run_training(config: BenchConfig, previous) -> SuiteResult:
    del previous
    steps = 4 if config.quick else 40
    repeats = config.repeats_or(full=5, quick=2)
    # A full run also times synchronized (global-batch) statistics at 2 replicas.
    norms = list(NORMS) if config.quick else [*NORMS, "kerasbn_sync"]
    records = []
    for replicas in REPLICAS:
        arguments = ["--replicas", replicas, "--norms", *norms, "--steps", steps, "--repeats", repeats]
        records += run_worker("bench.training_worker", arguments, timeout_s=600 if config.quick else 1800)
    notes = [
        f"model.fit, one epoch of {steps} steps of global batch 256 per call, on synthetic 28x28x1 images "
        f"(10 classes), SGD, jit_compile=False; the epoch's own time (a callback), {repeats} repetitions "
        "interleaved across norms after two warm-up fits (the first traces).",
        "One process per replica count; strategy from training.distribute.get_strategy('auto'): one device "
        "for 1 replica, MirroredStrategy over 2 logical CPU devices (GPUs where present) for 2.",
        "epoch s (est.) = seconds per step x ceil(60000 / 256), Fashion-MNIST's training set.",
    ]
    return SuiteResult(records=records, notes=notes)

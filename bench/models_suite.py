"""Issue 9: ResNet50, MobileNetV2 and EfficientNetB0 with keras BN, kerasbn.convert, kerasbn.fold and no BN.

Runs `bench.models_worker` in a fresh process per replica count (1 device,
then MirroredStrategy over 2 logical CPU devices, which must be configured
before TensorFlow starts; `bench.training_suite.run_worker`): training steps
of stock, `kerasbn.convert` and no-BN networks on both, inference of stock,
`kerasbn.fold` and no BN on one device. The goals are evaluated by
`bench.report.goal_models`.
"""

from __future__ import annotations

from bench.models_worker import NETWORKS
from bench.suites import BenchConfig, SuiteResult, register_suite
from bench.training_worker import run_worker


@register_suite("models", "keras.applications ResNet50/MobileNetV2/EfficientNetB0: stock vs kerasbn vs no BN")
def run_models(config: BenchConfig, previous) -> SuiteResult:
    del previous
    # Quick: one small network at 32x32, enough to check the records.
    networks = ("mobilenetv2",) if config.quick else tuple(NETWORKS)
    size, batch = (32, 8) if config.quick else (112, 32)
    repeats = config.repeats_or(full=8, quick=1)
    warmup = 1 if config.quick else 2
    # A repetition averages calls over >= 0.5 s: inference calls are short and noisy alone.
    min_repetition_s = 0.0 if config.quick else 0.5
    records = []
    for replicas in (1, 2):
        arguments = [
            "--replicas", replicas, "--networks", *networks, "--image-size", size, "--batch", batch,
            "--repeats", repeats, "--warmup", warmup, "--min-repetition-s", min_repetition_s,
        ]  # fmt: skip
        if replicas == 1:
            arguments.append("--inference")
        records += run_worker("bench.models_worker", arguments, timeout_s=600 if config.quick else 1800)
    notes = [
        f"keras.applications networks, weights=None, input {size}x{size}x3, 10 classes, global batch {batch}, "
        "float32, SGD(0.01), sparse categorical cross-entropy, jit_compile=False; synthetic images.",
        "Training step: model.train_function on an iterator of strategy.experimental_distribute_dataset (what fit "
        "runs per step: forward, loss, gradients, update). Inference: tf.function(model(x, training=False)).",
        f"Per network, every variant interleaved in one process: {warmup} warm-up calls (the first traces), one "
        f"calibrating call, then {repeats} rounds, order rotated each round, each repetition averaging calls over "
        f">= {min_repetition_s:g} s; median of the repetitions. One process per replica "
        "count: OneDeviceStrategy for 1, MirroredStrategy over 2 logical CPU devices for 2.",
        "BN share = (t - t_no_bn) / (t_stock - t_no_bn): the part of stock's batch-norm time a variant still pays.",
    ]
    return SuiteResult(records=records, notes=notes)

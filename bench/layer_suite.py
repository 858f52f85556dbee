"""Part 1: the batch-norm layer alone, every implementation side by side.

For each case (shape, layout, mode, jit) every implementation in
`bench.implementations` is built, warmed up and then timed interleaved with
the others (`bench.timing`). Before timing, each implementation's outputs
are compared with the stock Keras layer's on the same inputs (train step:
dx, dgamma, dbeta; inference: y), so that the table never compares
implementations that compute different things.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from bench import floor
from bench.implementations import IMPLEMENTATIONS, MODES, Case, build_step
from bench.suites import REFERENCE_IMPLEMENTATION, BenchConfig, SuiteResult, register_suite, skipped, timed_records
from bench.timing import Candidate, describe_error, time_interleaved

SUITE = "layer"

# (shape, family): LeNet's two conv outputs, two ResNet-sized activations,
# and LeNet's first dense output.
SHAPES: Tuple[Tuple[Tuple[int, ...], str], ...] = (
    ((256, 24, 24, 6), "lenet"),
    ((256, 8, 8, 16), "lenet"),
    ((128, 56, 56, 64), "resnet"),
    ((64, 28, 28, 256), "resnet"),
    ((1024, 120), "dense"),
)
QUICK_SHAPES = (((256, 8, 8, 16), "lenet"), ((1024, 120), "dense"))
JIT = (False, True)


def layouts(shape: Sequence[int]) -> Tuple[str, ...]:
    """NHWC and NCHW for 4-D shapes; the one layout of a 2-D shape."""
    return ("NHWC", "NCHW") if len(shape) == 4 else ("NC",)


def cases(shapes) -> List[Tuple[Case, str]]:
    """Every (case, family) of the shapes, in the order they are run."""
    return [
        (Case(tuple(shape), layout, mode, jit), family)
        for shape, family in shapes
        for layout in layouts(shape)
        for mode in MODES
        for jit in JIT
    ]


def _device() -> str:
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def _block_until_done(result) -> None:
    """On GPUs the call returns before the kernels finish; wait for them."""
    if tf.config.list_logical_devices("GPU"):
        tf.test.experimental.sync_devices()


def _max_relative_difference(outputs, reference) -> float:
    """Largest |a - b| over each output pair, relative to that reference output's largest |b|.

    Relative, because dgamma and dbeta are sums over the whole batch: their
    float32 rounding grows with the batch, not with the error of the method.
    """
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    reference = reference if isinstance(reference, (list, tuple)) else [reference]
    worst = 0.0
    for a, b in zip(outputs, reference):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)))
    return worst


def run_case(case: Case, family: str, repeats: int, min_repetition_s: float) -> List[dict]:
    """Measures every implementation on one case; returns its records."""
    label = dict(shape=case.shape, layout=case.layout, mode=case.mode, jit=case.jit)
    records: List[dict] = []
    generator = tf.random.Generator.from_seed(0)
    x = generator.normal(case.tensor_shape)
    upstream = generator.normal(case.tensor_shape)

    steps: Dict[str, object] = {}
    for name in IMPLEMENTATIONS:
        try:
            steps[name] = build_step(name, case)
        except Exception as error:  # noqa: BLE001 - an unsupported case is a result
            records.append(skipped(SUITE, name, reason=describe_error(error), **label))

    # The first call of each traces and compiles (timed apart), and its
    # outputs are checked against Keras's: all must compute the same thing.
    outputs: Dict[str, object] = {}
    first_call_s: Dict[str, float] = {}
    for name, step in list(steps.items()):
        try:
            start = time.perf_counter()
            outputs[name] = step(x, upstream)
            _block_until_done(outputs[name])
            first_call_s[name] = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001
            records.append(skipped(SUITE, name, reason=describe_error(error), **label))
            del steps[name]
    reference = outputs.get(REFERENCE_IMPLEMENTATION)
    differences = {
        name: (_max_relative_difference(out, reference) if reference is not None else None)
        for name, out in outputs.items()
    }
    del outputs

    timings = time_interleaved(
        [Candidate(name, lambda step=step: step(x, upstream)) for name, step in steps.items()],
        repeats=repeats,
        min_repetition_s=min_repetition_s,
        block_until_done=_block_until_done,
        warmup_calls=0,  # the checked call above traced and compiled them
    )
    records += timed_records(SUITE, timings, lambda name: dict(
        **label, family=family, tensor_shape=list(case.tensor_shape), device=_device(),
        first_call_s=first_call_s[name], max_rel_diff_to_keras=differences.get(name),
        bytes_moved=floor.bytes_moved(case.shape, case.mode),
    ))  # fmt: skip
    del steps, timings
    gc.collect()
    return records


@register_suite(
    SUITE,
    "the BN layer alone: kerasbn (auto/fused/generic), keras, from-scratch, raw fused kernel; train step and inference",
    requires=("floor",),
)
def run_layer(config: BenchConfig, previous) -> SuiteResult:
    del previous  # the floor's bandwidth is applied to all records at the end
    repeats = config.repeats_or(full=7, quick=3)
    min_repetition_s = 0.01 if config.quick else 0.1
    records: List[dict] = []
    # Every case makes new tf.functions of the same Python step; TensorFlow
    # warns about "retracing" for that, which is expected here.
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        for case, family in cases(QUICK_SHAPES if config.quick else SHAPES):
            records += run_case(case, family, repeats, min_repetition_s)
    finally:
        tf_logger.setLevel(level)
    notes = [
        "Each implementation in a tf.function, with jit_compile=False and =True; float32; momentum 0.9, epsilon 1e-3.",
        "Shapes are named (N, H, W, C) as in the issue; NCHW rows run the same tensor as (N, C, H, W) with axis=1.",
        "train_step: forward (training=True) + gradients w.r.t. x, gamma, beta from a fixed upstream gradient "
        "+ moving-average update. inference: forward with the moving statistics.",
        f"Warm-up (trace/compile, checked against keras; then 1 call), then {repeats} repetitions interleaved "
        "across implementations (order rotated each round); each repetition averages enough calls to last "
        f">= {min_repetition_s * 1e3:.0f} ms.",
        "Every implementation's outputs (dx, dgamma, dbeta; or y) are compared with keras's on the same inputs: "
        "max_rel_diff_to_keras in the JSON (largest difference / largest |keras value|).",
    ]
    return SuiteResult(records=records, notes=notes)

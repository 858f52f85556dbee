"""Part 1: the batch-norm layer alone, every implementation of `bench.implementations` side by side.

Per case (shape, layout, mode, jit) each implementation is built, its outputs
compared with the stock Keras layer's on the same inputs (train step: dx,
dgamma, dbeta; inference: y), so that the table never compares things that
compute different functions, then all are timed interleaved (`bench.timing`).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import List, Tuple

import numpy as np
import tensorflow as tf

from bench import floor
from bench.implementations import IMPLEMENTATIONS, MODES, Case, build_step
from bench.suites import REFERENCE_IMPLEMENTATION, BenchConfig, SuiteResult, register_suite, skipped, timed_records
from bench.timing import Candidate, describe_error, time_interleaved

SUITE = "layer"

# (shape, family): LeNet's two conv outputs, two ResNet-sized activations, LeNet's first dense output.
SHAPES: Tuple[Tuple[Tuple[int, ...], str], ...] = (
    ((256, 24, 24, 6), "lenet"), ((256, 8, 8, 16), "lenet"), ((128, 56, 56, 64), "resnet"),
    ((64, 28, 28, 256), "resnet"), ((1024, 120), "dense"),
)  # fmt: skip
QUICK_SHAPES = (((256, 8, 8, 16), "lenet"), ((1024, 120), "dense"))
JIT = (False, True)


def cases(shapes) -> List[Tuple[Case, str]]:
    """Every (case, family) of the shapes, in the order they are run: NHWC and NCHW of 4-D shapes."""
    return [(Case(tuple(shape), layout, mode, jit), family) for shape, family in shapes
            for layout in (("NHWC", "NCHW") if len(shape) == 4 else ("NC",))
            for mode in MODES for jit in JIT]  # fmt: skip


def _device() -> str:
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def _block_until_done(result) -> None:
    if _device() == "GPU:0":  # the call returns before the kernels finish
        tf.test.experimental.sync_devices()


def _max_relative_difference(outputs, reference) -> float:
    """Largest |a - b| over each output pair, relative to that reference output's largest |b| (dgamma and dbeta
    sum over the batch: their float32 rounding grows with the batch, not with the error of the method)."""
    worst = 0.0
    for a, b in zip(tf.nest.flatten(outputs), tf.nest.flatten(reference)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)))
    return worst


def run_case(case: Case, family: str, repeats: int, min_repetition_s: float) -> List[dict]:
    """Measures every implementation on one case; returns its records."""
    label = dict(shape=case.shape, layout=case.layout, mode=case.mode, jit=case.jit)
    records: List[dict] = []
    generator = tf.random.Generator.from_seed(0)
    x, upstream = generator.normal(case.tensor_shape), generator.normal(case.tensor_shape)

    # The first call of each traces and compiles (timed apart), and its outputs are checked against
    # Keras's: all must compute the same thing. An unsupported case is a result: a skip.
    steps, outputs, first_call_s = {}, {}, {}
    for name in IMPLEMENTATIONS:
        try:
            step = build_step(name, case)
            start = time.perf_counter()
            outputs[name] = step(x, upstream)
            _block_until_done(outputs[name])
            first_call_s[name], steps[name] = time.perf_counter() - start, step
        except Exception as error:  # noqa: BLE001
            records.append(skipped(SUITE, name, reason=describe_error(error), **label))
    reference = outputs.get(REFERENCE_IMPLEMENTATION)
    differences = {name: None if reference is None else _max_relative_difference(out, reference)
                   for name, out in outputs.items()}  # fmt: skip
    del outputs
    # warmup_calls=0: the checked call above traced and compiled them.
    timings = time_interleaved([Candidate(name, lambda step=step: step(x, upstream)) for name, step in steps.items()],
                               repeats, min_repetition_s, block_until_done=_block_until_done, warmup_calls=0)
    records += timed_records(SUITE, timings, lambda name: dict(
        **label, family=family, tensor_shape=list(case.tensor_shape), device=_device(),
        first_call_s=first_call_s[name], max_rel_diff_to_keras=differences.get(name),
        bytes_moved=floor.bytes_moved(case.shape, case.mode),
    ))  # fmt: skip
    del steps, timings
    gc.collect()
    return records


@register_suite(SUITE, "the BN layer alone: kerasbn (auto/fused/generic), keras, from-scratch, raw fused kernel; "
                "train step and inference", requires=("floor",))  # fmt: skip
def run_layer(config: BenchConfig, previous) -> SuiteResult:
    del previous  # the floor's bandwidth is applied to all records at the end
    repeats = config.repeats_or(full=7, quick=3)
    min_repetition_s = 0.01 if config.quick else 0.1
    records: List[dict] = []
    # Every case makes new tf.functions of the same Python step: TensorFlow's "retracing" warning is expected.
    tf_logger, level = tf.get_logger(), tf.get_logger().level
    tf_logger.setLevel(logging.ERROR)
    try:
        for case, family in cases(QUICK_SHAPES if config.quick else SHAPES):
            records += run_case(case, family, repeats, min_repetition_s)
    finally:
        tf_logger.setLevel(level)
    notes = [
        "Each implementation in a tf.function, jit_compile=False and =True; float32; momentum 0.9, epsilon 1e-3. "
        "Shapes are named (N, H, W, C) as in the issue; NCHW rows run the same tensor as (N, C, H, W) with axis=1.",
        "train_step: forward (training=True) + gradients w.r.t. x, gamma, beta from a fixed upstream gradient "
        "+ moving-average update. inference: forward with the moving statistics.",
        f"A first call (traced, its outputs compared with keras's: max_rel_diff_to_keras, largest difference / "
        f"largest |keras value|), then {repeats} repetitions interleaved, each averaging calls over "
        f">= {min_repetition_s * 1e3:.0f} ms.",
    ]
    return SuiteResult(records=records, notes=notes)

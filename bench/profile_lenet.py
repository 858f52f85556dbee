"""Where LeNet-BN's training step spends its time: a profile of the four batch norms against the rest.

    python -m bench.profile_lenet             # about 4 minutes on a 2-core CPU
    python -m bench.profile_lenet --quick     # under a minute, for a look (do not quote it)

Writes `bench/results/lenet_profile.md` and `.json` (`--out` picks the
folder; `--from-json PATH` rebuilds the Markdown from a saved JSON). Four
measurements, each in this one process:

1. **Whole step.** One training step at batch 256 (`model.train_step` of a
   compiled LeNet-BN, SGD, in a `tf.function`; what `fit` runs per step,
   without fit's own per-step Python) for `--norm` none, kerasbn, kerasbn
   with `fused=False`, keras, and a what-if (`WhatIfBatchNorm`, below),
   jit off and on, timed interleaved: how much slower than no BN each is.
2. **Op profile.** `tf.profiler.experimental` traces a few steps of each
   model; every op the executor ran is attributed to its layer (from the op's
   name scope) and to forward or backward (`gradient_tape/` scope). Where two
   ops ran at once on the executor's two threads, the overlap is split
   between them, so the per-layer times add up to the traced wall time.
3. **The layer alone** at LeNet's four BN shapes (256, 24, 24, 6),
   (256, 8, 8, 16), (256, 120) and (256, 84): a train step (forward,
   backward for x, gamma and beta, moving averages) of kerasbn auto /
   `fused=True` / `fused=False`, keras and the raw fused kernel, interleaved
   with outputs checked against keras's, in several independent rounds.
   Against two floors for the bytes a train step must move (8 passes over
   the tensor, `bench.floor`): memory bandwidth from a large copy, and the
   faster copy rate of a buffer as small as the tensor (it fits in cache).
4. **Where the fused kernel pays** (full run only): fused, generic and
   widened train steps on `SCAN_SHAPES`, NHWC inputs of 2 to 32 channels and
   2-D inputs of 2e4 to 2e6 elements; checks the suggested rule below.

The what-ifs, `WhatIfBatchNorm` (benchmark only, not part of kerasbn), change
only how the training path is chosen or computed:

* `training_path="rule"`: the auto rule this profile's numbers suggest
  (`suggested_path`): the fused kernel for 4-D inputs whose channel count
  is a multiple of `FUSED_CHANNEL_MULTIPLE_4D` and for other ranks with at
  least `FUSED_MIN_ELEMENTS_2D` elements, else the generic keras.ops path.
* `training_path="widened"`: the statistics computed on a *widened view*:
  `(rows, C)` reshaped to `(rows / k, k * C)` with `k * C` a multiple of 16
  floats (one AVX-512 register), reduced over rows, then the k groups summed;
  `x * a + b` runs on the same view with `a`, `b` tiled k times. Same math
  (two-pass variance), another memory layout: the per-channel reductions and
  broadcasts of a 6-channel tensor are what TensorFlow's kernels do badly.
* `training_path="shape_aware"`: the rule, with the widened view where the
  rule says generic for a 4-D input.

Load averages (1, 5, 15 minutes) are recorded next to every measurement:
the machine is shared, and absolute times move with the load.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import math
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results"
BATCH = 256
IMAGE_SHAPE = (28, 28, 1)
# LeNet-BN's four batch norms, by layer name, and the shape each normalizes at batch 256.
BN_SHAPES: Dict[str, Tuple[int, ...]] = {
    "bn1": (BATCH, 24, 24, 6),
    "bn2": (BATCH, 8, 8, 16),
    "bn3": (BATCH, 120),
    "bn4": (BATCH, 84),
}
# Whole-step variants: name -> (build_lenet norm, how kerasbn's BN layers run, jit_compile).
# The BN mode is None (as built), "generic" (fused=False) or a WhatIfBatchNorm path.
VARIANTS: Dict[str, Tuple[str, Optional[str], bool]] = {
    "none": ("none", None, False),
    "kerasbn": ("kerasbn", None, False),
    "kerasbn_generic": ("kerasbn", "generic", False),
    "keras": ("keras", None, False),
    "whatif_rule": ("kerasbn", "rule", False),
    "whatif_shape_aware": ("kerasbn", "shape_aware", False),
    "none_jit": ("none", None, True),
    "kerasbn_jit": ("kerasbn", None, True),
    "keras_jit": ("keras", None, True),
}
QUICK_VARIANTS = ("none", "kerasbn", "kerasbn_generic", "keras", "whatif_rule", "whatif_shape_aware")
PROFILED_VARIANTS = ("none", "kerasbn", "keras", "whatif_shape_aware")
LAYER_IMPLEMENTATIONS = ("kerasbn", "kerasbn_fused", "kerasbn_generic", "keras", "tf_fused_kernel", "whatif_widened")
SIMD_FLOATS = 16  # float32 lanes of an AVX-512 register
# The suggested auto rule for the training path on this CPU (see section 4 of
# the report): oneDNN's fused kernel (TensorFlow's x86 default) is 1.5-2.4x
# slower than the generic path on NHWC inputs whose channel count is not a
# multiple of 4 (1, 2, 3, 5, 6, 7, 10 measured) and 2.5-3.3x faster on those
# that are (4 to 32); on 2-D inputs (viewed as N x 1 x 1 x C) it carries a
# fixed cost of about 0.3 ms per call each way that pays from ~1e5 elements
# (fused/generic 1.3-1.7x at 2e4-6.6e4 elements, 0.5-0.9x from 1.2e5).
FUSED_CHANNEL_MULTIPLE_4D = 4
FUSED_MIN_ELEMENTS_2D = 100_000
# Section 4, where the fused kernel starts to pay: 4-D NHWC inputs with few
# channels (LeNet's first conv output, other channel counts), and 2-D inputs of
# more rows (the layer suite's (1024, 120), where fused was faster).
SCAN_SHAPES: Tuple[Tuple[int, ...], ...] = (
    (256, 24, 24, 2), (256, 24, 24, 3), (256, 24, 24, 4), (256, 24, 24, 5), (256, 24, 24, 6), (256, 24, 24, 8),
    (256, 24, 24, 10), (256, 24, 24, 12), (256, 24, 24, 16), (256, 24, 24, 20), (256, 24, 24, 32),
    (256, 84), (256, 120), (512, 120), (256, 256), (1024, 120), (4096, 120), (16384, 120), (256, 1024),
)  # fmt: skip
SCAN_IMPLEMENTATIONS = ("kerasbn_fused", "kerasbn_generic", "whatif_widened")


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _load_text(load: Optional[Sequence[float]]) -> str:
    return "/".join(f"{v:.1f}" for v in load) if load else "-"


# ------------------------------------------------------------------ models


def suggested_path(shape: Sequence[Optional[int]]) -> str:
    """The training path ("fused" or "generic") the suggested auto rule picks for an input of `shape`.

    For inputs normalized over their last axis only (where the fused kernel
    is exact). Unknown sizes count as large.
    """
    channels = shape[-1]
    if len(shape) == 4:
        return "fused" if channels is None or channels % FUSED_CHANNEL_MULTIPLE_4D == 0 else "generic"
    if any(size is None for size in shape):
        return "fused"
    return "fused" if math.prod(shape) >= FUSED_MIN_ELEMENTS_2D else "generic"


def widen_factor(rows: int, channels: int, lanes: int = SIMD_FLOATS) -> int:
    """The k of the widened view `(rows / k, k * channels)`: `k * channels` a multiple of `lanes`, k divides rows."""
    k = lanes // math.gcd(channels, lanes)
    while k > 1 and rows % k:
        k //= 2
    return k


def widened_batch_norm(x, gamma, beta, epsilon: float):
    """Training-mode batch norm over every axis but the last, on the widened view; `(y, mean, variance)`.

    The same math as `kerasbn.ops.moments` + `normalize` (two-pass, biased
    variance; the mean's gradient through the variance is zero, hence the
    stop_gradient), with every per-channel reduction and broadcast done on
    `(rows / k, k * C)` instead of `(rows, C)`.
    """
    import tensorflow as tf

    channels = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    k = widen_factor(rows, channels)
    wide = tf.reshape(x, [-1, k * channels])

    def channel_mean(t):  # (rows / k, k * C) -> (C,)
        return tf.reduce_mean(tf.reshape(tf.reduce_mean(t, axis=0), [k, channels]), axis=0)

    mean = channel_mean(wide)
    variance = channel_mean(tf.square(wide - tf.tile(tf.stop_gradient(mean), [k])))
    a = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        a = a * tf.cast(gamma, a.dtype)
    b = -mean * a
    if beta is not None:
        b = b + tf.cast(beta, b.dtype)
    y = wide * tf.tile(a, [k]) + tf.tile(b, [k])
    return tf.reshape(y, tf.shape(x)), mean, variance


@functools.lru_cache(maxsize=None)
def _whatif_class():
    import kerasbn

    class WhatIfBatchNorm(kerasbn.BatchNorm):
        """kerasbn.BatchNorm with another training path (benchmark what-if, see the module docstring).

        Args:
            training_path: "rule" (`suggested_path`), "widened" (always the
                widened view) or "shape_aware" (the rule, widened where it
                says generic for a 4-D input).
            **kwargs: kerasbn.BatchNorm's.
        """

        def __init__(self, training_path: str = "shape_aware", **kwargs):
            if training_path not in ("rule", "widened", "shape_aware"):
                raise ValueError(
                    "`training_path` must be 'rule', 'widened' or 'shape_aware'. "
                    f"Received: training_path={training_path!r}"
                )
            super().__init__(**kwargs)
            self.training_path = training_path

        def _train_forward(self, inputs, mask):
            rank = len(inputs.shape)
            plain = (
                mask is None and self._feature_axes == (rank - 1,) and not self.renorm
                and self.virtual_batch_size is None and not self.synchronized
            )  # fmt: skip
            if not plain:
                return super()._train_forward(inputs, mask)
            choice = "widened"
            if self.training_path != "widened":
                choice = suggested_path(tuple(inputs.shape))
                if choice == "generic" and rank == 4 and self.training_path == "shape_aware":
                    choice = "widened"
            if choice != "widened":
                # `fused` is read while tracing only: False forces the generic path.
                saved, self.fused = self.fused, (None if choice == "fused" else False)
                try:
                    return super()._train_forward(inputs, mask)
                finally:
                    self.fused = saved
            self._check_batch_size(tuple(inputs.shape))
            from keras import ops

            from kerasbn.ops import statistics_dtype

            x = ops.cast(inputs, statistics_dtype(inputs.dtype))
            y, mean, variance = widened_batch_norm(x, self.gamma, self.beta, self.epsilon)
            self._update_moving_statistics(mean, variance)
            return ops.cast(y, self.compute_dtype)

    return WhatIfBatchNorm


def whatif_batch_norm(training_path: str, **kwargs):
    """A `WhatIfBatchNorm(training_path, **kwargs)` (the class is made on first use: it needs TensorFlow)."""
    return _whatif_class()(training_path=training_path, **kwargs)


def build_variant(variant: str):
    """A compiled LeNet-BN for `variant` (see `VARIANTS`), its compiled train step and one batch."""
    import keras
    import tensorflow as tf

    from training.models import build_lenet

    norm, bn_mode, jit = VARIANTS[variant]
    # The same layers, rebuilt from their configs with the activations named
    # after the layer they follow: Keras's automatic names ("activation_3")
    # collide with the "_1" suffixes TensorFlow adds to op name scopes, and
    # the profile finds each op's layer from its scope.
    layers, previous = [], None
    for layer in build_lenet(norm).layers:
        config = layer.get_config()
        if isinstance(layer, keras.layers.Activation):
            config["name"] = f"sigmoid_after_{previous}"
        if hasattr(layer, "moving_variance") and bn_mode == "generic":
            config["fused"] = False
        if hasattr(layer, "moving_variance") and bn_mode not in (None, "generic"):
            layers.append(whatif_batch_norm(bn_mode, **config))
        else:
            layers.append(layer.__class__.from_config(config))
        previous = config["name"]
    model = keras.Sequential([keras.Input(IMAGE_SHAPE, name="images")] + layers, name=f"lenet_{variant}")
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    generator = tf.random.Generator.from_seed(0)
    x = generator.uniform((BATCH, *IMAGE_SHAPE))
    y = generator.uniform((BATCH,), 0, 10, dtype=tf.int32)

    def train_step(data):
        return model.train_step(data)

    step = tf.function(train_step, autograph=False, jit_compile=jit)
    return model, step, (x, y)


def layer_groups(model) -> Dict[str, Tuple[str, str]]:
    """Layer name -> (label, kind) for the profile: conv, bn, sigmoid, pool, dense, flatten."""
    import keras

    kinds = (
        (keras.layers.Conv2D, "conv"), (keras.layers.Dense, "dense"), (keras.layers.MaxPooling2D, "pool"),
        (keras.layers.Activation, "sigmoid"), (keras.layers.Flatten, "flatten"),
    )  # fmt: skip
    groups = {}
    for layer in model.layers:
        kind = next((k for cls, k in kinds if isinstance(layer, cls)), None)
        if kind is None:
            kind = "bn" if hasattr(layer, "moving_variance") else type(layer).__name__.lower()
        groups[layer.name] = (layer.name, kind)
    return groups


# ------------------------------------------------------------------ whole step


def time_steps(variants: Sequence[str], repeats: int, min_repetition_s: float) -> Dict[str, dict]:
    """Median, min and max seconds per train step of each variant, interleaved."""
    from bench.timing import Candidate, summarize, time_interleaved

    candidates, keep = [], []
    for variant in variants:
        model, step, data = build_variant(variant)
        keep.append(model)
        candidates.append(Candidate(variant, lambda step=step, data=data: step(data)))
    timings = time_interleaved(candidates, repeats=repeats, min_repetition_s=min_repetition_s, warmup_calls=3)
    load = load_average()
    results = {}
    for variant, timing in timings.items():
        if timing.error:
            raise RuntimeError(f"train step of {variant!r} failed: {timing.error}")
        results[variant] = {**summarize(timing.seconds), "seconds": timing.seconds, "load_average": load}
    return results


# ------------------------------------------------------------------ op profile


def _read_xspace(logdir: str):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise RuntimeError(f"The profiler wrote no .xplane.pb under {logdir!r}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as handle:
        space.ParseFromString(handle.read())
    return space


def trace_events(space) -> Tuple[List[Tuple[int, int, str]], List[Tuple[int, int]]]:
    """Op intervals `(start_ps, end_ps, "name:Type")` from the executor threads, and step intervals.

    TensorFlow names an op's event `<op name>:<op type>` on the `tf_Compute`
    threads (the executor's); a `KernelAndDeviceFunc::Run` event on the
    Python thread spans each call of the traced `tf.function`, from launch
    to its last op's end.
    """
    ops, steps = [], []
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        metadata = plane.event_metadata
        for line in plane.lines:
            base = line.timestamp_ns * 1000
            for event in line.events:
                name = metadata[event.metadata_id].name
                start = base + event.offset_ps
                if name == "KernelAndDeviceFunc::Run":
                    steps.append((start, start + event.duration_ps))
                elif line.name.startswith("tf_Compute") and ":" in name and "::" not in name:
                    ops.append((start, start + event.duration_ps, name))
    return ops, steps


def attribute(ops, windows) -> Tuple[Dict[str, float], float, float]:
    """Splits the wall time of `windows` among the ops running in it.

    Each elementary interval between consecutive op boundaries is divided
    equally among the ops active in it; time inside a window with no op
    running goes to the key "(no op running)".

    Returns:
        `(seconds per op name, wall seconds of the windows, seconds summed over op durations)`.
    """
    shares: Dict[str, float] = collections.defaultdict(float)
    wall = 0.0
    summed = 0.0
    for window_start, window_end in windows:
        wall += (window_end - window_start) * 1e-12
        inside = [
            (max(s, window_start), min(e, window_end), n) for s, e, n in ops if s < window_end and e > window_start
        ]
        summed += sum(e - s for s, e, _ in inside) * 1e-12
        points = sorted({window_start, window_end, *(s for s, _, _ in inside), *(e for _, e, _ in inside)})
        boundaries = collections.defaultdict(list)
        for index, (s, e, n) in enumerate(inside):
            boundaries[s].append(("start", index))
            boundaries[e].append(("end", index))
        active = set()
        for left, right in zip(points[:-1], points[1:]):
            for kind, index in boundaries.get(left, ()):
                if kind == "start":
                    active.add(index)
                else:
                    active.discard(index)
            width = (right - left) * 1e-12
            if not active:
                shares["(no op running)"] += width
                continue
            for index in active:
                shares[inside[index][2]] += width / len(active)
    return dict(shares), wall, summed


def classify(op: str, groups: Dict[str, Tuple[str, str]]) -> Tuple[str, str, str]:
    """`(label, kind, direction)` of an op event name: its layer (or loss/optimizer/other) and pass."""
    if op == "(no op running)":
        return op, "gaps", "-"
    name = op.rsplit(":", 1)[0]
    direction = "backward" if name.startswith("gradient_tape/") else "forward"
    segments = name.split("/")
    for segment in segments[:4]:
        # A layer's ops sit in its name scope, which TensorFlow may suffix ("bn1_1").
        if segment in groups:
            return (*groups[segment], direction)
        for layer, (label, kind) in groups.items():
            if re.fullmatch(re.escape(layer) + r"_\d+", segment):
                return label, kind, direction
    head = segments[1] if segments[0] == "gradient_tape" and len(segments) > 1 else segments[0]
    if head.startswith("compile_loss"):
        return "loss", "loss", direction
    if head.lower().startswith("sgd"):
        return "optimizer (SGD update)", "optimizer", "update"
    return "other (metrics, variable reads, step counter)", "other", direction


def profile_variant(variant: str, steps: int) -> dict:
    """Traces `steps` train steps of `variant`; returns time per layer and kind, per step."""
    import tensorflow as tf

    model, step, data = build_variant(variant)
    for _ in range(5):
        step(data)
    groups = layer_groups(model)
    with tempfile.TemporaryDirectory(prefix="kerasbn-profile-") as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(steps):
                step(data)
        finally:
            tf.profiler.experimental.stop()
        space = _read_xspace(logdir)
    ops, windows = trace_events(space)
    if not windows:
        windows = [(min(s for s, _, _ in ops), max(e for _, e, _ in ops))]
    shares, wall, summed = attribute(ops, windows)
    by_layer: Dict[Tuple[str, str, str], float] = collections.defaultdict(float)
    by_kind: Dict[str, float] = collections.defaultdict(float)
    by_op_type: Dict[Tuple[str, str], float] = collections.defaultdict(float)
    op_counts: Dict[str, int] = collections.defaultdict(int)
    for _, _, op in ops:
        label, kind, _ = classify(op, groups)
        op_counts[kind] += 1
    for op, seconds in shares.items():
        label, kind, direction = classify(op, groups)
        by_layer[(label, kind, direction)] += seconds / len(windows)
        by_kind[kind] += seconds / len(windows)
        if kind == "bn":
            by_op_type[(direction, op.rsplit(":", 1)[-1])] += seconds / len(windows)
    return {
        "variant": variant,
        "steps": len(windows),
        "step_s": wall / len(windows),
        "op_seconds_summed_per_step": summed / len(windows),
        "by_layer": [[label, kind, direction, s] for (label, kind, direction), s in by_layer.items()],
        "by_kind": dict(by_kind),
        "bn_by_op_type": [[direction, op_type, s] for (direction, op_type), s in by_op_type.items()],
        "ops_per_step_by_kind": {k: v / len(windows) for k, v in op_counts.items()},
        "load_average": load_average(),
    }


# ------------------------------------------------------------------ the layer alone


def copy_bandwidth(nbytes: int, seconds: float = 0.2) -> float:
    """Best single-thread copy rate (GB/s, read + written) of a buffer of `nbytes`, repeated in place.

    For a buffer that fits in cache this is the cache's rate, the floor for
    a tensor that stays there between passes.
    """
    elements = max(nbytes // 4, 1)
    source = np.ones(elements, np.float32)
    target = np.zeros(elements, np.float32)
    np.copyto(target, source)
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(8):
            np.copyto(target, source)
        best = min(best, (time.perf_counter() - start) / 8)
    return 2 * elements * 4 / best / 1e9


def _layer_step(name: str, case):
    """The compiled step of one implementation (`bench.implementations`, or the what-if) for `case`."""
    from bench.implementations import EPSILON, MOMENTUM, _keras_layer_step, build_step

    if name == "whatif_widened":
        if case.mode != "train_step":
            raise ValueError("the what-if changes the training path only; its inference is kerasbn's")
        return _keras_layer_step(
            case, whatif_batch_norm("widened", axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON)
        )
    return build_step(name, case)


def layer_round(
    case, round_index: int, bn_layer: str, repeats: int, min_repetition_s: float,
    implementations: Sequence[str] = LAYER_IMPLEMENTATIONS,
) -> List[dict]:  # fmt: skip
    """Times `implementations` on `case`, interleaved; outputs checked against keras's (computed if not timed)."""
    import tensorflow as tf

    from bench.layer_suite import _max_relative_difference
    from bench.suites import measurement, skipped
    from bench.timing import Candidate, time_interleaved

    label = dict(shape=case.shape, layout=case.layout, mode=case.mode, jit=case.jit)
    generator = tf.random.Generator.from_seed(round_index)
    x = generator.normal(case.tensor_shape)
    upstream = generator.normal(case.tensor_shape)
    steps, outputs, records = {}, {}, []
    for name in implementations:
        try:
            steps[name] = _layer_step(name, case)
            outputs[name] = steps[name](x, upstream)
        except Exception as error:  # noqa: BLE001 - an unsupported case is a result
            steps.pop(name, None)
            records.append(skipped("profile", name, reason=f"{type(error).__name__}: {error}", **label))
    reference = outputs.get("keras")
    if reference is None:
        reference = _layer_step("keras", case)(x, upstream)
    timings = time_interleaved(
        [Candidate(name, lambda step=step: step(x, upstream)) for name, step in steps.items()],
        repeats=repeats,
        min_repetition_s=min_repetition_s,
        warmup_calls=1,
    )
    load = load_average()
    for name, timing in timings.items():
        if timing.error:
            records.append(skipped("profile", name, reason=timing.error, **label))
            continue
        record = measurement("profile", name, seconds=timing.seconds, **label)
        record.update(
            round=round_index,
            bn_layer=bn_layer,
            load_average=load,
            max_rel_diff_to_keras=None if reference is None else _max_relative_difference(outputs[name], reference),
        )
        records.append(record)
    return records


def layer_rounds(rounds: int, repeats: int, min_repetition_s: float, modes: Sequence[str]) -> List[dict]:
    """`rounds` independent interleaved measurements of every implementation at every BN shape."""
    import logging

    import tensorflow as tf

    from bench.implementations import Case

    tf.get_logger().setLevel(logging.ERROR)  # every case re-traces the same Python step
    records = []
    for round_index in range(rounds):
        for layer, shape in BN_SHAPES.items():
            layout = "NHWC" if len(shape) == 4 else "NC"
            for mode in modes:
                case = Case(shape, layout, mode, False)
                records += layer_round(case, round_index, layer, repeats, min_repetition_s)
            print(f"[profile] layer round {round_index + 1}/{rounds} {layer} {shape} done", file=sys.stderr, flush=True)
    return records


def crossover_scan(rounds: int, repeats: int, min_repetition_s: float) -> List[dict]:
    """Train step of fused, generic and widened at `SCAN_SHAPES`, each shape interleaved on its own, `rounds` times."""
    import logging

    import tensorflow as tf

    from bench.implementations import Case

    tf.get_logger().setLevel(logging.ERROR)  # every case re-traces the same Python step
    records = []
    for round_index in range(rounds):
        for shape in SCAN_SHAPES:
            case = Case(shape, "NHWC" if len(shape) == 4 else "NC", "train_step", False)
            records += layer_round(case, round_index, "scan", repeats, min_repetition_s, SCAN_IMPLEMENTATIONS)
    print("[profile] crossover scan done", file=sys.stderr, flush=True)
    return records


# ------------------------------------------------------------------ report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def summarize_layers(records: List[dict]) -> Dict[Tuple[str, str, str], dict]:
    """(bn layer, mode, implementation) -> median over rounds of the per-round medians, and their range."""
    table: Dict[Tuple[str, str, str], List[float]] = collections.defaultdict(list)
    ratios: Dict[Tuple[str, str, str], List[float]] = collections.defaultdict(list)
    loads: Dict[Tuple[str, str], List[float]] = collections.defaultdict(list)
    for record in records:
        if record.get("record") != "measurement":
            continue
        key = (record["bn_layer"], record["mode"], record["implementation"])
        table[key].append(record["median_s"])
        same_round = [
            r for r in records
            if r.get("record") == "measurement" and r["round"] == record["round"]
            and r["bn_layer"] == record["bn_layer"] and r["mode"] == record["mode"] and r["implementation"] == "keras"
        ]  # fmt: skip
        if same_round:
            ratios[key].append(record["median_s"] / same_round[0]["median_s"])
        if record.get("load_average"):
            loads[(record["bn_layer"], record["mode"])].append(record["load_average"][0])
    return {
        key: {
            "median_s": statistics.median(values),
            "round_medians_s": values,
            "ratio_to_keras": statistics.median(ratios[key]) if ratios[key] else None,
            "ratios_to_keras": ratios[key],
            "load_1min": loads[(key[0], key[1])],
        }
        for key, values in table.items()
    }


def _table(header: Sequence[str], rows) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _per_layer(profile: dict) -> Dict[str, Dict[str, float]]:
    """label -> {"forward": s, "backward": s, ...} per step, in the order first seen."""
    rows: Dict[str, Dict[str, float]] = {}
    for label, _, direction, seconds in profile["by_layer"]:
        rows.setdefault(label, collections.defaultdict(float))[direction] += seconds
    return rows


def render(result: dict) -> str:
    """The Markdown summary `lenet_profile.md`."""
    header = result["header"]
    steps = result["steps"]
    lines = [
        "# LeNet-BN training step: where the time goes",
        "",
        f"- Machine: {header['cpu_model']}, {header['cores']} cores; TensorFlow {header['tensorflow']}, "
        f"Keras {header['keras']}; {header['date']}; `{header['command']}`, {header['elapsed_s']:.0f} s"
        + (" (**quick run: do not quote**)" if header["quick"] else ""),
        f"- Batch {BATCH}, float32, SGD, `model.train_step` in a `tf.function`. The machine is shared: load "
        "averages (1/5/15 min) stand next to each figure; read the ratios of interleaved runs, not the "
        "absolute times.",
        "",
    ]
    lines += ["## Findings", ""] + findings(result)
    lines += [
        "",
        "Why: TensorFlow's x86 build runs `FusedBatchNormV3` and its gradient through oneDNN "
        "(`_MklNativeFusedBatchNormV3` in the profile). On NHWC inputs whose channel count is not a multiple of 4 "
        "that kernel is slow (section 4), and LeNet's first conv has 6 channels: bn1 is most of the BN time. On "
        "small 2-D inputs (bn3, bn4, viewed as N x 1 x 1 x C) the fused op has a fixed cost per call that the "
        "generic path (a few small element-wise ops) does not. The generic path at 6 channels reduces "
        "(rows, 6) matrices, which vectorize poorly; the widened view (rows / 8, 48) computes the same sums on "
        "full SIMD registers, hence its 2-3x.",
    ]

    lines += ["", "## 1. Whole training step (all variants interleaved in one process)", ""]
    rows = []
    for variant, stats in steps.items():
        jit = VARIANTS[variant][2]
        base = steps.get("none_jit" if jit else "none")
        rows.append([
            variant, "yes" if jit else "no", _ms(stats["median_s"]), f"{_ms(stats['min_s'])}-{_ms(stats['max_s'])}",
            f"{stats['median_s'] / base['median_s']:.2f}x" if base else "-",
            f"{stats['min_s'] / base['min_s']:.2f}x" if base else "-", _load_text(stats["load_average"]),
        ])  # fmt: skip
    lines += _table(
        [
            "model", "jit", "ms/step median", "min-max", "vs no BN (same jit), medians", "same, fastest repetitions",
            "load",
        ],
        rows,
    )

    profiles = result["profiles"]
    variants = list(profiles)
    lines += ["", "## 2. Op profile per step (TF profiler; ops overlapping in time share it)", ""]
    kinds = ["conv", "bn", "sigmoid", "pool", "dense", "flatten", "loss", "optimizer", "other", "gaps"]
    def kind_cell(variant: str, kind: str) -> str:
        seconds = profiles[variant]["by_kind"].get(kind, 0.0)
        return f"{_ms(seconds)} ({_pct(seconds, profiles[variant]['step_s'])})"

    rows = [[kind] + [kind_cell(v, kind) for v in variants] for kind in kinds]
    rows.append(["**traced step**"] + [f"**{_ms(profiles[v]['step_s'])}**" for v in variants])
    rows.append(["load"] + [_load_text(profiles[v]["load_average"]) for v in variants])
    lines += _table(["kind"] + [f"{v} ms (share)" for v in variants], rows)
    lines += [
        "",
        "Traced steps are slower than the timed ones above (the profiler's own cost). `gaps`: time in the step "
        "with no op running on the executor's threads (launch, scheduling). Ops per step in the BN layers' "
        "scopes: "
        + ", ".join(f"{v} {profiles[v]['ops_per_step_by_kind'].get('bn', 0):.0f}" for v in variants if v != "none")
        + ".",
        "",
        "### The four BN layers, forward and backward, per variant (ms per step)",
        "",
    ]  # fmt: skip
    rows = []
    for layer, shape in BN_SHAPES.items():
        row = [layer, "x".join(map(str, shape))]
        for v in variants:
            if v == "none":
                continue
            parts = _per_layer(profiles[v]).get(layer, {})
            row.append(f"{_ms(parts.get('forward', 0.0))} + {_ms(parts.get('backward', 0.0))}")
        rows.append(row)
    lines += _table(["layer", "shape"] + [f"{v} fwd + bwd" for v in variants if v != "none"], rows)
    detail = profiles.get("kerasbn")
    if detail:
        lines += ["", "### Every layer of the kerasbn model (ms per step)", ""]
        rows = []
        for label, parts in _per_layer(detail).items():
            total = sum(parts.values())
            rows.append([
                label, _ms(parts.get("forward", 0.0)), _ms(parts.get("backward", 0.0)),
                _ms(parts.get("update", 0.0) + parts.get("-", 0.0)), _ms(total), _pct(total, detail["step_s"]),
            ])  # fmt: skip
        rows.sort(key=lambda row: -float(row[4]))
        lines += _table(["layer", "forward", "backward", "update/other", "total", "share of step"], rows)
        bn_ops = sorted(detail["bn_by_op_type"], key=lambda t: -t[2])
        lines += [
            "",
            "kerasbn's BN time by op type: "
            + ", ".join(f"{op_type} ({direction}) {_ms(seconds)} ms" for direction, op_type, seconds in bn_ops[:6])
            + ".",
        ]

    layers = result["layer_summary"]
    lines += [
        "",
        "## 3. The BN layer alone at LeNet's four shapes",
        "",
        f"ms per call, median over {result['rounds']} round(s) of each round's median (each round: all "
        "implementations interleaved, outputs checked against keras); in brackets the time / "
        "keras.layers.BatchNormalization's, per round, median. Floors: the bytes the call must move (train "
        "step 8 passes x 4 bytes x elements, inference 2) over the DRAM copy bandwidth "
        f"({result['dram_gbps']:.1f} GB/s, large copy) and over the copy rate of a buffer the size of the "
        "tensor (in cache, GB/s in brackets).",
    ]
    for mode in result["modes"]:
        rows = []
        for layer, shape in BN_SHAPES.items():
            cells = []
            for name in LAYER_IMPLEMENTATIONS:
                entry = layers.get(f"{layer}|{mode}|{name}")
                if entry is None:
                    cells.append("-")
                    continue
                ratio = entry["ratio_to_keras"]
                cells.append(f"{_ms(entry['median_s'])} ({ratio:.2f}x)" if ratio else _ms(entry["median_s"]))
            floors = result["floors"][f"{layer}|{mode}"]
            loads = layers.get(f"{layer}|{mode}|keras", {}).get("load_1min", [])
            rows.append(
                [layer, "x".join(map(str, shape))] + cells
                + [_ms(floors["dram_s"]), f"{_ms(floors['cache_s'])} ({floors['cache_gbps']:.0f})",
                   f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"]
            )  # fmt: skip
        what = " (forward + backward for x, gamma, beta + moving averages)" if mode == "train_step" else ""
        lines += ["", f"**{mode}**{what}", ""]
        lines += _table(
            ["layer", "shape", *LAYER_IMPLEMENTATIONS, "floor DRAM", "floor in cache", "load (1 min)"], rows
        )
    scan = [r for r in result.get("scan_records", []) if r.get("record") == "measurement"]
    if scan:
        rounds = 1 + max(r.get("round", 0) for r in scan)
        lines += [
            "",
            "## 4. Where the fused kernel pays: train step of other shapes",
            "",
            f"ms per call, median over {rounds} round(s) of each round's median (each round: the three interleaved, "
            f"{scan[0]['repeats']} repetitions); fused / generic is the median of the per-round ratios.",
            "",
        ]
        rows = []
        for shape in SCAN_SHAPES:
            found: Dict[str, Dict[int, float]] = collections.defaultdict(dict)
            loads = []
            for r in scan:
                if tuple(r["shape"]) == shape:
                    found[r["implementation"]][r.get("round", 0)] = r["median_s"]
                    loads.append(r["load_average"][0] if r.get("load_average") else float("nan"))
            if not found:
                continue
            medians = {n: statistics.median(v.values()) for n, v in found.items()}
            fastest = min(medians, key=medians.get)
            cells = [
                (_ms(medians[n]) + (" **best**" if n == fastest else "")) if n in medians else "-"
                for n in SCAN_IMPLEMENTATIONS
            ]
            fused, generic = found.get("kerasbn_fused", {}), found.get("kerasbn_generic", {})
            per_round = [fused[i] / generic[i] for i in fused if i in generic]
            ratio = f"{statistics.median(per_round):.2f}x" if per_round else "-"
            rows.append(
                ["x".join(map(str, shape)), f"{math.prod(shape) / 1e6:.2f}M", *cells, ratio, suggested_path(shape),
                 f"{min(loads):.1f}-{max(loads):.1f}"]
            )  # fmt: skip
        lines += _table(
            ["shape", "elements", *SCAN_IMPLEMENTATIONS, "fused / generic", "suggested rule", "load (1 min)"], rows
        )
    worst = {}
    for record in result["layer_records"] + result.get("scan_records", []):
        if record.get("record") == "measurement" and record.get("max_rel_diff_to_keras") is not None:
            name = record["implementation"]
            worst[name] = max(worst.get(name, 0.0), record["max_rel_diff_to_keras"])
    lines += [
        "",
        "Largest relative difference from keras's outputs (dx, dgamma, dbeta; or y): "
        + ", ".join(f"{name} {value:.1e}" for name, value in worst.items()) + ".",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def rule_check(result: dict) -> List[str]:
    """How often `suggested_path` picks the faster of fused and generic, over every train-step shape measured."""
    measured: Dict[Tuple[int, ...], Dict[str, List[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for record in result["layer_records"] + result.get("scan_records", []):
        if record.get("record") == "measurement" and record["mode"] == "train_step":
            measured[tuple(record["shape"])][record["implementation"]].append(record["median_s"])
    hits, misses = 0, []
    for shape, found in measured.items():
        if "kerasbn_fused" not in found or "kerasbn_generic" not in found:
            continue
        ratio = statistics.median(found["kerasbn_fused"]) / statistics.median(found["kerasbn_generic"])
        if suggested_path(shape) == ("fused" if ratio < 1 else "generic"):
            hits += 1
        else:
            misses.append(f"{'x'.join(map(str, shape))} (fused/generic {ratio:.2f}x)")
    if not hits and not misses:
        return []
    line = (
        f"- **Rule check**: over the {hits + len(misses)} train-step shapes measured here (sections 3 and 4), "
        f"the suggested rule picks the faster of fused and generic in {hits}"
    )
    return [line + (f"; it misses {', '.join(misses)}." if misses else ".")]


def verdict(result: dict) -> List[str]:
    """Whether 1.15x of no BN is within reach: the floor, the best kernels measured, the best whole step."""
    steps, layers = result["steps"], result["layer_summary"]
    none = steps["none"]["median_s"]
    floors = [result["floors"][f"{layer}|train_step"] for layer in BN_SHAPES]
    dram = sum(f["dram_s"] for f in floors)
    best = 0.0
    for layer in BN_SHAPES:
        keys = [f"{layer}|train_step|{name}" for name in LAYER_IMPLEMENTATIONS]
        times = [layers[key]["median_s"] for key in keys if key in layers]
        if not times:
            return []
        best += min(times)
    budget = 0.15 * none
    reachable = best <= budget
    whatif = min(
        (steps[v]["median_s"] / none, v) for v in ("kerasbn", "whatif_rule", "whatif_shape_aware") if v in steps
    )  # fmt: skip
    text = (
        f"- **Verdict**: at the DRAM floor the four BN layers would cost {_ms(dram)} ms, a step of "
        f"{(none + dram) / none:.2f}x of no BN, so the bytes allow 1.15x. The fastest implementation measured for "
        f"each shape sums to {_ms(best)} ms alone ({best / dram:.1f}x the floor) against a budget of {_ms(budget)} ms; "
        f"the best whole step measured is {whatif[1]} at {whatif[0]:.2f}x. "
    )
    if reachable:
        text += "The goal is within reach of the kernels measured here."
    else:
        text += (
            "**1.15x is not reachable with TensorFlow's CPU kernels on this machine**: every BN pass is a separate "
            "op that reads and writes the whole tensor (the generic and widened paths run about ten of them per "
            "train step, the fused kernel two but slowly for these shapes), so even the best path is several times "
            "the byte floor. Getting there needs a fused single-pass kernel that is fast for 6 channels (a custom "
            "op), not a different choice among the existing ones."
        )
    return [text]


def findings(result: dict) -> List[str]:
    """The numbers the explanation rests on, computed from the measurements."""
    steps, profiles, layers = result["steps"], result["profiles"], result["layer_summary"]
    none, kerasbn = steps["none"]["median_s"], steps["kerasbn"]["median_s"]
    budget = 0.15 * none
    lines = [
        f"- **Step**: kerasbn {_ms(kerasbn)} ms vs no BN {_ms(none)} ms = {kerasbn / none:.2f}x "
        f"(fastest repetitions: {steps['kerasbn']['min_s'] / steps['none']['min_s']:.2f}x) "
        f"(keras BN {steps['keras']['median_s'] / none:.2f}x, kerasbn fused=False "
        f"{steps['kerasbn_generic']['median_s'] / none:.2f}x; load {_load_text(steps['none']['load_average'])}). "
        f"The 1.15x goal allows the four BN layers {_ms(budget)} ms per step; they add {_ms(kerasbn - none)} ms.",
    ]
    if "kerasbn" in profiles:
        p = profiles["kerasbn"]
        bn = p["by_kind"].get("bn", 0.0)
        per_layer = _per_layer(p)
        bn1 = sum(per_layer.get("bn1", {}).values())
        share = {kind: _pct(p["by_kind"].get(kind, 0.0), p["step_s"]) for kind in ("conv", "sigmoid", "pool", "dense")}
        lines.append(
            f"- **Profile**: the four BN layers take {_ms(bn)} ms of the traced {_ms(p['step_s'])} ms kerasbn step "
            f"({_pct(bn, p['step_s'])}); bn1 alone, the (256, 24, 24, 6) conv output, {_ms(bn1)} ms "
            f"({_pct(bn1, bn)} of BN). Conv {share['conv']}, sigmoid {share['sigmoid']}, pool {share['pool']}, "
            f"dense {share['dense']}."
        )
    auto = [layers.get(f"{layer}|train_step|kerasbn") for layer in BN_SHAPES]
    floors = [result["floors"][f"{layer}|train_step"] for layer in BN_SHAPES]
    if all(auto):
        alone = sum(a["median_s"] for a in auto)
        dram = sum(f["dram_s"] for f in floors)
        cache = sum(f["cache_s"] for f in floors)
        best = []
        for layer in BN_SHAPES:
            candidates = [(layers[f"{layer}|train_step|{n}"]["median_s"], n) for n in LAYER_IMPLEMENTATIONS
                          if f"{layer}|train_step|{n}" in layers]  # fmt: skip
            best.append(min(candidates))
        lines.append(
            f"- **Floor**: alone, the four layers' train steps take {_ms(alone)} ms (kerasbn auto); the fastest "
            f"implementation per shape sums to {_ms(sum(t for t, _ in best))} ms "
            f"({', '.join(f'{layer} {n}' for layer, (_, n) in zip(BN_SHAPES, best))}). The bytes they must move "
            f"({sum(f['bytes'] for f in floors) / 1e6:.1f} MB) take {_ms(dram)} ms at DRAM bandwidth and "
            f"{_ms(cache)} ms at in-cache copy speed: kerasbn runs {alone / dram:.1f}x over the DRAM floor, "
            f"{alone / cache:.0f}x over the cache floor. The 1.15x budget ({_ms(budget)} ms) is "
            f"{budget / dram:.1f}x the DRAM floor: the bytes alone do not rule the goal out; the kernels' distance "
            "from the floor does."
        )
    for variant, text in (
        ("whatif_rule", f"the suggested auto rule (fused for 4-D with a multiple of {FUSED_CHANNEL_MULTIPLE_4D} "
                        f"channels and for 2-D with >= {FUSED_MIN_ELEMENTS_2D} elements, generic otherwise)"),
        ("whatif_shape_aware", "the rule plus the widened view where it says generic for 4-D (bn1)"),
    ):  # fmt: skip
        if variant in steps:
            whatif = steps[variant]["median_s"]
            lines.append(
                f"- **What-if, {text}**: {_ms(whatif)} ms = {whatif / none:.2f}x of no BN "
                f"(fastest repetitions {steps[variant]['min_s'] / steps['none']['min_s']:.2f}x), "
                f"{whatif / kerasbn:.2f}x of today's kerasbn, {whatif / steps['keras']['median_s']:.2f}x of keras BN."
            )
    lines += rule_check(result)
    lines += verdict(result)
    if "kerasbn_jit" in steps and "none_jit" in steps:
        none_jit = steps["none_jit"]["median_s"]
        lines.append(
            f"- **XLA** (jit_compile=True on the whole step): no BN {_ms(none_jit)} ms, kerasbn "
            f"{_ms(steps['kerasbn_jit']['median_s'])} ms = {steps['kerasbn_jit']['median_s'] / none_jit:.2f}x, "
            f"keras BN {steps['keras_jit']['median_s'] / none_jit:.2f}x; but the jit step without BN is "
            f"{none_jit / none:.1f}x slower than without jit (XLA's CPU convolutions), so XLA is no way to the "
            "goal here."
        )
    return lines


# ------------------------------------------------------------------ main


def run(quick: bool, out: pathlib.Path) -> dict:
    import keras
    import tensorflow as tf

    from bench import floor
    from bench.machine import cpu_model, usable_cores

    started = time.perf_counter()
    repeats = 3 if quick else 9
    rounds = 1 if quick else 3
    modes = ("train_step",) if quick else ("train_step", "inference")
    header = {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "-m", "bench.profile_lenet", *sys.argv[1:]]),
        "quick": quick,
        "load_average_at_start": load_average(),
    }
    print("[profile] whole train step, interleaved", file=sys.stderr, flush=True)
    variants = QUICK_VARIANTS if quick else tuple(VARIANTS)
    # Many short repetitions: on a shared machine the load swings within
    # seconds, and short rounds spread it evenly over the variants.
    steps = time_steps(variants, repeats=repeats if quick else 41, min_repetition_s=0.1 if quick else 0.06)
    print(
        "[profile] " + ", ".join(f"{v} {_ms(s['median_s'])} ms" for v, s in steps.items()), file=sys.stderr, flush=True
    )
    profiles = {}
    for variant in PROFILED_VARIANTS:
        print(f"[profile] tracing {variant}", file=sys.stderr, flush=True)
        profiles[variant] = profile_variant(variant, steps=5 if quick else 20)
    print("[profile] the BN layer alone", file=sys.stderr, flush=True)
    layer_records = layer_rounds(rounds, repeats, 0.02 if quick else 0.1, modes)
    summary = summarize_layers(layer_records)
    scan_records = [] if quick else crossover_scan(rounds=3, repeats=5, min_repetition_s=0.05)
    dram = floor.measure_bandwidth(64 * 2**20 if quick else 256 * 2**20, repeats=3)["bandwidth_gbps"]
    floors = {}
    for layer, shape in BN_SHAPES.items():
        cache_gbps = copy_bandwidth(4 * math.prod(shape))
        for mode in modes:
            moved = floor.bytes_moved(shape, mode)
            floors[f"{layer}|{mode}"] = {
                "bytes": moved,
                "dram_s": moved / (dram * 1e9),
                "cache_s": moved / (cache_gbps * 1e9),
                "cache_gbps": cache_gbps,
            }
    result = {
        "header": header,
        "steps": {
            v: {k: s[k] for k in ("median_s", "min_s", "max_s", "seconds", "load_average")} for v, s in steps.items()
        },
        "profiles": profiles,
        "rounds": rounds,
        "modes": list(modes),
        "layer_summary": {"|".join(key): value for key, value in summary.items()},
        "layer_records": layer_records,
        "scan_records": scan_records,
        "dram_gbps": dram,
        "floors": floors,
    }
    result["findings"] = findings(result)  # also in the JSON; render() recomputes them
    result["header"]["elapsed_s"] = time.perf_counter() - started
    result["header"]["load_average_at_end"] = load_average()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_lenet", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one round, train step only")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: bench/results)")
    parser.add_argument(
        "--from-json", default=None, metavar="PATH",
        help="measure nothing: rebuild the Markdown from a lenet_profile.json written earlier",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.from_json is not None:
        with open(args.from_json, encoding="utf-8") as handle:
            result = json.load(handle)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lenet_profile.md").write_text(render(result), encoding="utf-8")
        print(f"Wrote {out / 'lenet_profile.md'} from {args.from_json}", file=sys.stderr)
        return 0
    result = run(args.quick, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lenet_profile.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    text = render(result)
    (out / "lenet_profile.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"Wrote {out / 'lenet_profile.md'} and .json in {result['header']['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

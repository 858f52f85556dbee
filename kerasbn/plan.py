"""The path plan: how one call of `kerasbn.BatchNorm` computes, and why.

`plan()` is a pure function of what the layer knows at call time: the
inputs' static shape and dtype, training or inference, whether a mask comes
along, whether the statistics are synchronized across replicas, the type of
the device the op runs on, and the layer's settings. It returns a `Plan`.
The numbers it decides by sit below, beside the measurements that set them.

The paths compute the same formulas (tests/test_layer_*.py check each against
float64 NumPy and keras.layers.BatchNormalization); they differ in speed only:

* "fused": TensorFlow's fused batch-norm kernel (`kerasbn/fused.py`), 4-D
  NHWC or NCHW, other ranks normalized over their last axis viewed as
  (-1, 1, 1, C).
* "widened": the `keras.ops` math on a `(rows / k, k * C)` view of a
  last-axis normalization with few channels (`kerasbn.ops.widen_factor`).
* "generic": the `keras.ops` math on the inputs as they are; every backend,
  every option.
* "fused_affine" (inference): `x * a + b` in one pass of the fused kernel.

On a CPU the plan takes whichever path measured fastest. On any other device
it takes only the paths TensorFlow's own Keras 2 layer took there, the 4-D
fused kernel in training and the generic path otherwise, until a run on that
device measures the others. Synchronized statistics across replicas take the
fused kernels too (`kerasbn.replicas.synchronized_fused_batch_norm`), except
in NCHW; masks, renorm and ghost batches keep the generic path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import keras

from kerasbn.ops import reduction_axes, statistics_dtype, widen_factor

# Input dtypes TensorFlow's fused batch-norm kernel takes.
FUSED_DTYPES = ("float16", "bfloat16", "float32")
# The smallest epsilon the layer hands the fused kernel: cuDNN's batch norm
# long required epsilon >= 1e-5 and older TensorFlow clamped it to this, so
# below it the fused path is not taken and every device gives the same numbers
# (kerasbn/fused.py).
FUSED_MIN_EPSILON = 1.001e-5

# The CPU thresholds. Measured on this project's 2-core AMD EPYC (oneDNN) by
# `python -m bench`, time relative to keras.layers.BatchNormalization, in
# bench/results/latest.md ("Layer" table) and bench/results/lenet_profile.md
# (section 4, the scan):
#
# Training, NHWC: the fused kernel was 2.5-3.3x faster than the generic path
# where the channel count is a multiple of 4 (4 to 32 measured) and 1.5-2.4x
# slower otherwise (1, 2, 3, 5, 6, 7, 10; 256x24x24x6: fused 1.93x of keras,
# widened 0.41x). NCHW: the kernel won at every count measured (256x24x24x6
# 0.87x, generic 0.96x), so NCHW has no threshold, where TensorFlow runs its
# CPU kernels on oneDNN. Without oneDNN (TensorFlow's default on CPUs without
# AVX-512, such as this project's machine in the 2026-12-04 run of
# `python -m bench`, commit 9b860eb) the NCHW kernel lost at 3 of the 4 shapes:
# train step relative to keras, fused / generic, 256x24x24x6 3.35x / 1.10x,
# 128x56x56x64 1.25x / 1.07x, 64x28x28x256 1.11x / 1.05x, 256x8x8x16 1.10x /
# 1.25x; there NCHW takes the generic path.
FUSED_NHWC_CHANNEL_MULTIPLE = 4
# Training, other ranks viewed as (-1, 1, 1, C): the kernel carries a fixed
# cost of about 0.3 ms per call that pays from ~1e5 elements (256x120 1.7x
# slower than generic; 1024x120 0.84x of keras, generic 1.06x).
FUSED_MIN_ELEMENTS = 100_000
# Training, an unknown batch size: Keras traces `fit` with batch None unless
# the dataset drops its remainder, so the element count is estimated with
# this batch (the benchmark's and the training kit's). The fused kernel, which
# an unknown batch took before this rule, was slower than the generic path on
# LeNet's (None, 84) and (None, 120); the widened view needs a static batch
# (`(-1, k * C)` needs rows that k divides), so the generic path is the best
# an unknown rank-2 batch gets. Its cost against the known batch is one
# figure: the benchmark's distributed suite times it (`python -m bench
# --suite distributed`, rows `kerasbn/batch None` and `kerasbn/batch 256` in
# bench/results/latest.md; goal: at most 1.05x). What remains is the graph's
# dynamic-shape bookkeeping (Shape, Prod, BroadcastTo in the mean's
# gradient; the empty-batch guard), which the stock layer pays too.
TYPICAL_BATCH = 256
# Training with synchronized statistics (CPU): the fused path runs the
# inference-mode kernels (kerasbn.replicas.synchronized_fused_batch_norm), which
# have no channel-count penalty, so it is taken wherever the NHWC layout (4-D
# or the (-1, 1, 1, C) view) allows. One train step of the layer (forward,
# backward, moving update) under MirroredStrategy on 2 logical CPUs, global
# batch as shown, medians of 15-30 interleaved rounds in one process (load
# 8-10 on the 2 cores), relative to keras.layers.BatchNormalization(synchronized=True):
#
#   shape (global)     generic   fused        shape (global)   generic   fused
#   32x28x28x64        0.94x     0.73x        64x24x24x6       1.12x     1.06x
#   32x56x56x64        1.04x     0.82x        64x24x24x8       0.98x     1.10x
#   64x14x14x256       0.96x     0.58x        64x12x12x3       0.84x     0.81x
#   32x7x7x512         1.01x     0.85x        256x120          0.80x     0.74x
#   32x8x8x16          1.15x     0.91x        64x120           0.63x     0.63x
#
# Where the step is small the collectives dominate and the two paths are level
# within the noise (64x24x24x8 read 0.98x/1.10x in one run, 1.05x/1.08x in
# another). NCHW stays generic: TensorFlow's inference-mode gradient kernel
# takes NHWC only (its own gradient transposes NCHW inputs).
# Inference, NHWC: `x * a + b` through the fused kernel (`fused_affine_nhwc`,
# epsilon 0) in one pass beat two element-wise ops from 16 channels
# (256x8x8x16 0.70x of keras vs 1.08x) and lost below (256x24x24x6 1.11x vs
# the widened view's 0.52x).
FUSED_INFERENCE_MIN_CHANNELS = 16


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call of `BatchNorm` computes, and why.

    Attributes:
        path: In training "fused", "widened" or "generic"; in inference
            "fused_affine", "widened" or "generic" (see the module docstring).
        reason: The rule that decided, in words.
        layout: The fused kernel's data format, "NHWC" or "NCHW" (fused only).
        widen: k of the widened view (widened only; else 1).
    """

    path: str
    reason: str
    layout: Optional[str] = None
    widen: int = 1


def fused_layout(
    rank: int, feature_axes: Sequence[int], renorm: bool, virtual_batch_size: Optional[int], epsilon: float
) -> Optional[str]:
    """How the fused 4-D kernel can take inputs of this rank, or None.

    NHWC 4-D inputs go in as they are, NCHW ones with data_format NCHW;
    any other rank normalized over its last axis only is viewed as
    (-1, 1, 1, channels), which leaves the per-channel statistics unchanged.
    """
    if renorm or virtual_batch_size is not None or epsilon < FUSED_MIN_EPSILON:
        return None
    if tuple(feature_axes) == (rank - 1,):
        return "NHWC"
    if rank == 4 and tuple(feature_axes) == (1,):
        return "NCHW"
    return None


def widen(shape: Sequence[Optional[int]], feature_axes: Sequence[int]) -> int:
    """k > 1 where a last-axis-only normalization can run on a (rows / k, k * C) view.

    The view needs rows that k divides, known statically: rows are the batch
    times the other non-feature sizes, so with an unknown batch only those
    other sizes count (k dividing them divides the rows); a rank-2 input with
    an unknown batch gets k = 1.
    """
    if tuple(feature_axes) != (len(shape) - 1,) or None in shape[1:]:
        return 1
    rows = math.prod(shape[1:-1]) * (shape[0] or 1)
    return widen_factor(rows, shape[-1])


def _fused_pays_on_cpu(shape: Tuple[Optional[int], ...]) -> bool:
    """Whether a non-4-D input is large enough for the fused kernel's fixed cost (CPU)."""
    if None in shape[1:]:
        return True  # unmeasured: sequences of unknown length are usually long
    batch = TYPICAL_BATCH if shape[0] is None else shape[0]
    return batch * math.prod(shape[1:]) >= FUSED_MIN_ELEMENTS


def plan(
    shape: Sequence[Optional[int]],
    dtype,
    *,
    training: bool,
    feature_axes: Sequence[int],
    fused: Optional[bool] = None,
    renorm: bool = False,
    virtual_batch_size: Optional[int] = None,
    epsilon: float = 1e-3,
    masked: bool = False,
    cross_replica: bool = False,
    device: str = "CPU",
    backend: str = "tensorflow",
    onednn: bool = True,
) -> Plan:
    """The path one call takes.

    Args:
        shape: The inputs' static shape (None for unknown sizes).
        dtype: The inputs' dtype.
        training: True for a training-mode call (batch statistics).
        feature_axes: The layer's feature axes, non-negative and sorted.
        fused, renorm, virtual_batch_size, epsilon: The layer's settings.
        masked: Whether a mask comes with the inputs (training only).
        cross_replica: Whether the statistics are synchronized across
            several replicas (the fused path then runs the inference-mode
            kernels around two all-reduces; NHWC only).
        device: The type of the device the op runs on, "CPU", "GPU", ...
        backend: The Keras backend; all but "tensorflow" take the generic path.
        onednn: Whether TensorFlow's CPU kernels run on oneDNN
            (`kerasbn.backend.onednn_enabled`); without it the NCHW kernel is
            not taken on CPU.

    Returns:
        A `Plan`.

    Raises:
        ValueError: for `fused=True` where the fused kernel cannot be taken
            (a mask, float64 inputs, synchronized NCHW, ...).
    """
    shape, feature_axes = tuple(shape), tuple(feature_axes)
    dtype = keras.backend.standardize_dtype(dtype)
    rank = len(shape)
    if backend != "tensorflow":
        return Plan("generic", f"backend {backend!r}: keras.ops only")
    cpu = device == "CPU"
    k = widen(shape, feature_axes) if cpu else 1
    widened = Plan("widened", f"{shape[-1]} channels on the last axis: a view {k} times wider", widen=k)
    if not training:
        if (
            fused is not False
            and cpu
            and rank == 4
            and feature_axes == (3,)
            and shape[3] >= FUSED_INFERENCE_MIN_CHANNELS
            and dtype in FUSED_DTYPES
        ):
            return Plan("fused_affine", f"CPU, NHWC with >= {FUSED_INFERENCE_MIN_CHANNELS} channels", layout="NHWC")
        if k > 1 and not fused:
            return widened
        return Plan("generic", "x * a + b as it is")

    layout = fused_layout(rank, feature_axes, renorm, virtual_batch_size, epsilon)
    blocker = None
    if layout is None:
        blocker = "no fused layout (axis, renorm, virtual_batch_size or epsilon)"
    elif masked:
        blocker = "a mask"
    elif cross_replica and layout == "NCHW":
        blocker = "synchronized NCHW (the inference-mode gradient kernel takes NHWC only)"
    elif statistics_dtype(dtype) != "float32":
        blocker = f"{dtype} inputs"  # float64: the kernel computes in float32
    if fused and blocker is not None:
        raise ValueError(
            f"`fused=True` cannot take the fused kernel here: {blocker}. Use fused=None to let "
            f"the layer choose. Received: fused=True, inputs.shape={shape}, dtype={dtype}, "
            f"mask={'given' if masked else None}, statistics across replicas: {cross_replica}"
        )
    if fused:
        return Plan("fused", "fused=True", layout=layout)
    reduced = [shape[a] for a in reduction_axes(rank, feature_axes)]
    # Synchronized statistics are the global batch's, whatever this slice holds.
    if blocker is None and not cross_replica and None not in reduced and math.prod(reduced) <= 1:
        # No statistics to speak of (the batch variance is 0, or there
        # is no example): the generic path, whose numbers are tested.
        blocker = "at most one value per channel"
    if fused is None and blocker is None:
        if cpu and cross_replica:
            return Plan("fused", f"CPU, synchronized, {layout}: the inference-mode kernels were faster or level", layout=layout)
        if not cpu and rank == 4:
            return Plan("fused", f"{device}, 4-D {layout}: the fused kernel, as TensorFlow's own layer", layout=layout)
        if cpu and layout == "NCHW" and onednn:
            return Plan("fused", "CPU (oneDNN), NCHW: the kernel was faster at every channel count measured", layout=layout)
        if cpu and rank == 4 and shape[3] is not None and shape[3] % FUSED_NHWC_CHANNEL_MULTIPLE == 0:
            return Plan("fused", f"CPU, NHWC, channels a multiple of {FUSED_NHWC_CHANNEL_MULTIPLE}", layout=layout)
        if cpu and rank != 4 and _fused_pays_on_cpu(shape):
            return Plan(
                "fused",
                f"CPU, viewed as (-1, 1, 1, C), >= {FUSED_MIN_ELEMENTS} elements "
                f"(an unknown batch counted as {TYPICAL_BATCH})",
                layout=layout,
            )
    if k > 1 and not (masked or renorm or virtual_batch_size is not None or cross_replica):
        return widened
    if blocker is None:
        if fused is False:
            blocker = "fused=False"
        elif cpu and layout == "NCHW":
            blocker = "CPU without oneDNN, NCHW: the fused kernel measured slower"
        elif cpu:
            blocker = "the fused kernel measured slower on CPU here"
        else:
            blocker = f"{device}: only the 4-D fused kernel until a run on {device} measures the others"
    return Plan("generic", blocker)

"""The batch-normalization math, as pure functions of tensors.

Nothing here owns a variable or knows about training: the layer in
`kerasbn/layer.py` decides which statistics to use and updates its moving
averages; these functions only compute. They use `keras.ops`, so they run on
every Keras backend (TensorFlow, JAX, torch).

The one normalization formula used everywhere (training, inference, the
compiled inference path, the exported SavedModel) is the folded affine form

    a = gamma * rsqrt(variance + epsilon)
    b = beta - mean * a
    y = x * a + b

which equals `gamma * (x - mean) / sqrt(variance + epsilon) + beta`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
from keras import ops


def statistics_dtype(dtype) -> str:
    """The dtype statistics are computed in: the result type of `dtype` and float32.

    float32 for 16-bit floats: sums of squares over a large batch overflow
    float16 (max 65504) and lose most of their digits in bfloat16. float32
    for integer inputs, as keras.layers.BatchNormalization does; float64 stays.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    if dtype in ("float32", "float64"):
        return dtype
    # What keras.backend.result_type(dtype, "float32") gives for 16-bit
    # floats, integers and bool, spelled out so that it is the same on every
    # backend (JAX without x64 would also turn float64 into float32).
    return "float32"


class Deviations(NamedTuple):
    """Inputs as deviations from a per-channel pivot, with their statistics (reduced axes kept).

    The batch mean is `pivot + mean`; `mean` is small, what rounding left of
    the pivot. `normalize(deviations, mean, variance, ...)` equals
    `normalize(x, pivot + mean, variance, ...)` and keeps the digits that
    formula loses for inputs far from zero.
    """

    pivot: object
    deviations: object
    mean: object
    variance: object


def deviations(x, axes: Sequence[int], mask=None) -> Deviations:
    """Batch statistics of `x` over `axes`, about a pivot: a first estimate of the mean.

    float32 keeps about 7 significant digits: inputs whose mean is 1e5 times
    their spread keep 2 digits of the spread in the rounded mean, and so in
    `x - mean` or `x * a + b` with `b = -mean * a`. So the mean is computed
    twice: the pivot is the plain mean (without gradient), the deviations
    `x - pivot` are exact where the inputs are far from zero (two floats
    within a factor 2 of each other subtract without rounding), and their
    mean recovers what the pivot's rounding lost. The variance is
    `E[d^2] - E[d]^2` of the deviations `d`, free of cancellation since
    `E[d]` is tiny beside their spread. The cost over a plain two-pass
    variance is one reduction.

    Args:
        x: Input tensor, in the statistics dtype (`statistics_dtype`).
        axes: The axes to reduce.
        mask: Optional Keras mask (see `moments`).

    Returns:
        A `Deviations`.
    """
    axes = tuple(axes)
    if mask is None:

        def mean_of(t):
            return ops.mean(t, axis=axes, keepdims=True)

    else:
        keep = ops.broadcast_to(ops.expand_dims(ops.cast(mask, "bool"), axis=-1), ops.shape(x))
        # An all-masked batch gives mean 0 and variance 0 rather than NaN.
        count = ops.maximum(ops.sum(ops.cast(keep, x.dtype), axis=axes, keepdims=True), ops.cast(1.0, x.dtype))

        def mean_of(t):
            # Select, not multiply: padding may hold inf or NaN, and 0 * inf is NaN.
            return ops.sum(ops.where(keep, t, 0.0), axis=axes, keepdims=True) / count

    pivot = ops.stop_gradient(mean_of(x))
    d = x - pivot
    mean = mean_of(d)
    # relu: rounding must not make the variance of equal values negative.
    variance = ops.relu(mean_of(ops.square(d)) - ops.square(mean))
    return Deviations(pivot, d, mean, variance)


def first_values(x, axes: Sequence[int]):
    """The values at the first position along `axes` (kept with length 1), without gradient.

    A pivot for a kernel that computes its own statistics: `x - first_values(x, axes)`
    costs one pass and no reduction. 0 for an empty batch.
    """
    axes = tuple(axes)
    first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(len(x.shape)))
    # A sum over the one value (or none): the shape stays right for an empty batch.
    return ops.stop_gradient(ops.sum(x[first], axis=axes, keepdims=True))


def moments(
    x,
    axes: Sequence[int],
    mask=None,
    keepdims: bool = False,
) -> Tuple[object, object]:
    """Mean and (biased) variance of `x` over `axes`.

    Computed about a pivot (`deviations`), so that inputs far from zero keep
    their digits.

    Args:
        x: Input tensor.
        axes: The axes to reduce (the batch axis and every non-feature axis).
        mask: Optional boolean (or 0/1) tensor of rank `rank(x) - 1`, as
            Keras passes masks: one entry per position, shared by all
            features at that position. Masked-out positions do not count,
            whatever they hold (inf and NaN included).
        keepdims: Keep the reduced axes with length 1.

    Returns:
        `(mean, variance)` in float32 for float16/bfloat16 inputs, else in the
        dtype of `x`. The variance divides by the count (not count - 1).
    """
    axes = tuple(axes)
    stats = deviations(ops.cast(x, statistics_dtype(x.dtype)), axes, mask)
    mean, variance = stats.pivot + stats.mean, stats.variance
    if not keepdims:
        mean = ops.squeeze(mean, axis=axes)
        variance = ops.squeeze(variance, axis=axes)
    return mean, variance


def fold_affine(
    mean,
    variance,
    gamma=None,
    beta=None,
    epsilon: float = 1e-3,
) -> Tuple[object, object]:
    """Folds normalization and the learned affine map into `y = x * a + b`.

    Args:
        mean: Mean to subtract (batch or moving statistic).
        variance: Variance to divide by (batch or moving statistic).
        gamma: Optional scale; `None` means 1.
        beta: Optional offset; `None` means 0.
        epsilon: Added to the variance before the square root.

    Returns:
        `(a, b)` with `a = gamma * rsqrt(variance + epsilon)` and
        `b = beta - mean * a`, broadcastable like `mean`. NumPy inputs give
        NumPy results in their own precision (float64 stays float64 on every
        backend, which is how `kerasbn.fold` folds).
    """
    a = _rsqrt(variance + epsilon)
    if gamma is not None:
        a = a * gamma
    b = -mean * a
    if beta is not None:
        b = b + beta
    return a, b


def normalize(x, mean, variance, gamma=None, beta=None, epsilon: float = 1e-3):
    """Batch-normalizes `x`: `gamma * (x - mean) / sqrt(variance + epsilon) + beta`.

    Computed as `x * a + b` with `(a, b) = fold_affine(...)`: one multiply and
    one add per element. `mean`, `variance`, `gamma` and `beta` must
    broadcast against `x`.
    """
    a, b = fold_affine(mean, variance, gamma, beta, epsilon)
    return apply_affine(x, a, b)


def renorm_affine(mean, variance, renorm_mean, renorm_stddev, gamma, beta, epsilon: float, clipping=None):
    """Batch Renormalization's scale and offset: `(x_hat * r + d) * gamma + beta` as `x_hat * g + b`.

    `r = sqrt(variance + epsilon) / renorm_stddev` and
    `d = (mean - renorm_mean) / renorm_stddev` pull the batch statistics
    towards the renorm moving ones; they are constants for the gradient
    (Ioffe, 2017, eq. 2). The renorm standard deviation is floored at
    `sqrt(epsilon)`.

    Args:
        mean, variance: Batch statistics, broadcastable against the inputs.
        renorm_mean, renorm_stddev: The renorm moving statistics, likewise.
        gamma, beta: Scale and offset, or None for ones and zeros.
        epsilon: Added to the variance.
        clipping: Optional dict with keys among "rmin", "rmax" (clip `r`) and
            "dmax" (clip `d` to [-dmax, dmax]).

    Returns:
        `(g, b)`, the scale and offset to `normalize` with.
    """
    stddev = ops.sqrt(variance + epsilon)
    renorm_stddev = ops.maximum(renorm_stddev, math.sqrt(epsilon))
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    clipping = clipping or {}
    if clipping.get("rmin") is not None:
        r = ops.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = ops.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
    r = ops.stop_gradient(r)
    d = ops.stop_gradient(d)
    new_gamma = r if gamma is None else r * gamma
    new_beta = d if gamma is None else d * gamma
    if beta is not None:
        new_beta = new_beta + beta
    return new_gamma, new_beta


def apply_affine(x, a, b):
    """`x * a + b`: the folded normalization, `a` and `b` broadcast against `x`."""
    return x * a + b


def fold_into_kernel(
    kernel,
    bias,
    mean,
    variance,
    gamma=None,
    beta=None,
    epsilon: float = 1e-3,
    channel_axes: Sequence[int] = (-1,),
):
    """Folds a batch normalization that follows a linear layer into it.

    For `z = x @ kernel + bias` (or a convolution with that kernel) followed by
    normalization over the output channels: `kernel' = kernel * a` along the
    kernel's output-channel axes and `bias' = bias * a + b`, with
    `(a, b) = fold_affine(...)`, so that `x @ kernel' + bias'` equals the
    normalized output.

    Args:
        kernel: The linear layer's kernel.
        bias: Bias of shape `(channels,)`, or `None` for a layer without one.
        mean: As for `fold_affine`, of shape `(channels,)`.
        variance: As for `fold_affine`, of shape `(channels,)`.
        gamma: As for `fold_affine`, of shape `(channels,)`, or `None`.
        beta: As for `fold_affine`, of shape `(channels,)`, or `None`.
        epsilon: As for `fold_affine`.
        channel_axes: The kernel axes that index the output channels, in
            row-major order: `(-1,)` for Dense and Conv (the default), `(-2,)`
            for transposed convolutions (kernel `(*size, out, in)`), `(-2, -1)`
            for depthwise ones (kernel `(*size, in, multiplier)`, output channel
            `i * multiplier + m`).

    Returns:
        `(kernel', bias')`, NumPy arrays for NumPy inputs.
    """
    a, b = fold_affine(mean, variance, gamma, beta, epsilon)
    rank = len(kernel.shape)
    axes = sorted(axis % rank for axis in channel_axes)
    shape = [1] * rank
    for axis in axes:
        shape[axis] = kernel.shape[axis]
    new_kernel = kernel * _reshape(a, shape)
    new_bias = b if bias is None else bias * a + b
    return new_kernel, new_bias


def _is_numpy(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def _rsqrt(x):
    return 1.0 / np.sqrt(x) if _is_numpy(x) else ops.rsqrt(x)


def _reshape(x, shape):
    return np.reshape(x, shape) if _is_numpy(x) else ops.reshape(x, shape)


def widen_factor(rows: int, channels: int, lanes: int = 16) -> int:
    """The k of a widened view `(rows / k, k * channels)` of a `(rows, channels)` matrix.

    The smallest k making `k * channels` a multiple of `lanes` (floats per
    SIMD register pair), halved until it divides `rows`; 1 when no widening
    helps. Reductions over few channels vectorize poorly; the widened view
    computes the same per-channel sums on full registers.
    """
    k = lanes // math.gcd(channels, lanes)
    while k > 1 and rows % k:
        k //= 2
    return k


def widened_deviations(x_wide, channels: int) -> Deviations:
    """`deviations` of a widened view, per channel.

    Args:
        x_wide: `(rows / k, k * channels)`, column `j` holding channel
            `j % channels` (a row-major reshape of `(rows, channels)`).
        channels: The number of channels.

    Returns:
        A `Deviations` whose `deviations` have the shape of `x_wide` and
        whose statistics have shape `(channels,)`, equal to those of the
        `(rows, channels)` matrix over axis 0: each of the k column groups
        holds the same number of rows, so the mean of their means is exact.
    """
    k = x_wide.shape[-1] // channels

    def channel_mean(t):
        return ops.mean(ops.reshape(ops.mean(t, axis=0), (k, channels)), axis=0)

    pivot = ops.stop_gradient(channel_mean(x_wide))
    d = x_wide - ops.tile(pivot, (k,))
    mean = channel_mean(d)
    variance = ops.relu(channel_mean(ops.square(d)) - ops.square(mean))
    return Deviations(pivot, d, mean, variance)


def apply_affine_widened(x_wide, a, b):
    """`x * a + b` on a widened view: `a` and `b` of shape `(channels,)`, tiled k times."""
    k = x_wide.shape[-1] // a.shape[0]
    return apply_affine(x_wide, ops.tile(a, (k,)), ops.tile(b, (k,)))


def broadcast_shape(rank: int, axes: Sequence[int], param_shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape that makes a parameter of `param_shape` broadcast on `axes`."""
    shape = [1] * rank
    for axis, size in zip(sorted(axes), param_shape):
        shape[axis] = size
    return tuple(shape)


def reduction_axes(rank: int, feature_axes: Sequence[int]) -> Tuple[int, ...]:
    """Every axis of a rank-`rank` tensor that is not a feature axis."""
    return tuple(i for i in range(rank) if i not in set(feature_axes))


def cast_optional(value, dtype) -> Optional[object]:
    return None if value is None else ops.cast(value, dtype)


def combine_moments(counts, means, m2s, axis: int = 0) -> Tuple[object, object, object]:
    """Chan et al.'s parallel formula: the (count, mean, M2) of several parts, combined along `axis`.

    Each part holds `count` values with mean `mean` and sum of squared
    deviations from that mean `M2`; the whole has

        N = sum n_i,  mean = sum n_i mean_i / N,
        M2 = sum M2_i + sum n_i (mean_i - mean)^2

    exactly, with no `E[x^2] - E[x]^2` cancellation. Parts without values
    (count 0) contribute nothing; a whole without values gets mean 0 and M2 0.

    Returns:
        `(N, mean, M2)`, reduced over `axis`.
    """
    total = ops.sum(counts, axis=axis)
    safe_total = ops.maximum(total, ops.cast(1.0, total.dtype))
    mean = ops.sum(counts * means, axis=axis) / safe_total
    m2 = ops.sum(m2s, axis=axis) + ops.sum(counts * ops.square(means - ops.expand_dims(mean, axis)), axis=axis)
    return total, mean, m2

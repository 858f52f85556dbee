"""TensorFlow's fused batch-norm kernel, wrapped to match `kerasbn.ops` exactly.

`tf.compat.v1.nn.fused_batch_norm` (FusedBatchNormV3) normalizes a 4-D
NHWC or NCHW tensor in one kernel. Two conventions of its own:

* In training mode its third output is the *unbiased* batch variance
  (divided by n - 1), although it normalizes with the biased one (divided by
  n). Keras and `kerasbn.ops.moments` use the biased variance for the moving
  average, so `fused_batch_norm_training` rescales by (n - 1) / n.
* On GPUs it goes through cuDNN, whose batch norm long required
  epsilon >= 1e-5 (CUDNN_BN_MIN_EPSILON), and TensorFlow 1.x's wrapper
  clamped epsilon to 1.001e-5. TensorFlow 2.21's wrapper passes epsilon as
  given, and its CPU kernel normalizes with it: with epsilon 1e-7 its output
  matches `(x - mean) / sqrt(variance + 1e-7)` to 1e-7, and is off by 1.6 from
  the clamped formula, for a variance of 1e-6 (tests/test_layer_plan.py checks
  the layer). The layer still takes the fused path only for
  `epsilon >= kerasbn.plan.FUSED_MIN_EPSILON`, so `fused=None` gives the same
  numbers on every device and TensorFlow version.

TensorFlow is imported on first call (`kerasbn.backend.tensorflow`), so the
layer imports this module on every backend and calls it only on TensorFlow.
"""

from __future__ import annotations

from kerasbn.backend import tensorflow


def fused_batch_norm_training(x, gamma, beta, epsilon: float, data_format: str):
    """Normalizes `x` with its own batch statistics in one fused kernel.

    Args:
        x: 4-D tensor, float16, bfloat16 or float32.
        gamma: Scale of shape `(channels,)` (float32), or None for ones.
        beta: Offset of shape `(channels,)` (float32), or None for zeros.
        epsilon: At least `kerasbn.plan.FUSED_MIN_EPSILON`.
        data_format: "NHWC" or "NCHW".

    Returns:
        `(y, mean, variance)`: `y` in the dtype of `x`; `mean` and the biased
        `variance` of shape `(channels,)` in float32.
    """
    tf = tensorflow()
    channel_axis = 3 if data_format == "NHWC" else 1
    channels = tf.shape(x)[channel_axis]
    if gamma is None:
        gamma = tf.ones([channels], tf.float32)
    if beta is None:
        beta = tf.zeros([channels], tf.float32)
    y, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
        x,
        tf.cast(gamma, tf.float32),
        tf.cast(beta, tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=True,
    )
    count = tf.cast(tf.size(x, out_type=tf.int64) // tf.cast(channels, tf.int64), tf.float32)
    variance = unbiased_variance * ((count - 1.0) / tf.maximum(count, 1.0))
    return y, mean, variance


def fused_affine_nhwc(x, a, b):
    """`x * a + b` per channel of a 4-D NHWC tensor, in one pass of the fused kernel.

    TensorFlow runs `x * a + b` as two element-wise ops, two passes over
    memory; the inference kernel with mean 0, variance 1 and epsilon 0
    computes `(x - 0) * rsqrt(1 + 0) * a + b`, the same affine map, in one.
    On this project's 2-core CPU that halved the time for (128, 56, 56, 64)
    and (64, 28, 28, 256), but was slower below 16 channels (see
    `kerasbn.plan.FUSED_INFERENCE_MIN_CHANNELS`). The layer calls it on CPUs
    only: cuDNN has long required epsilon >= 1e-5, and no GPU has run it.

    Args:
        x: 4-D NHWC tensor (float16, bfloat16 or float32).
        a, b: float32 scale and offset of shape `(channels,)`.

    Returns:
        `x * a + b` in the dtype of `x`.
    """
    tf = tensorflow()
    channels = tf.shape(a)
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
        x,
        tf.cast(a, tf.float32),
        tf.cast(b, tf.float32),
        mean=tf.zeros(channels, tf.float32),
        variance=tf.ones(channels, tf.float32),
        epsilon=0.0,
        data_format="NHWC",
        is_training=False,
    )
    return y


# The inference kernel with these statistics computes (x - mean) * 1 * a + b:
# 0.5 + 0.5 is exactly 1 (so is its rsqrt), and cuDNN accepts epsilon 0.5
# where it rejects the 0 that `fused_affine_nhwc` passes on CPUs.
_UNIT_VARIANCE_SPLIT = 0.5


def fused_batch_norm_inference(x, gamma, beta, mean, variance, epsilon: float, data_format: str):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta` with given statistics, in one pass.

    The inference-mode kernel: the statistics are inputs, not the batch's.
    Synchronized batch norm hands it the global batch's
    (`kerasbn.replicas.synchronized_fused_batch_norm`).

    Args:
        x: 4-D tensor, float16, bfloat16 or float32.
        gamma, beta, mean, variance: float32 tensors of shape `(channels,)`.
        epsilon: Added to the variance.
        data_format: "NHWC" or "NCHW".

    Returns:
        `(y, reserve)`: `y` in the dtype of `x`, and the kernel's reserve
        space, which `fused_batch_norm_inference_grad` takes.
    """
    tf = tensorflow()
    outputs = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format=data_format, is_training=False,
    )
    return outputs.y, outputs.reserve_space_3


def fused_batch_norm_inference_grad(dy, x, gamma, mean, variance, reserve, epsilon: float, data_format: str):
    """The gradients of `fused_batch_norm_inference` with the statistics held fixed, in one pass.

    Returns:
        `(dx, dgamma, dbeta)`: `dx = dy * gamma / sqrt(variance + epsilon)` in
        the dtype of `x`, and per channel `sum(dy * x_hat)` and `sum(dy)`
        (float32), with `x_hat = (x - mean) / sqrt(variance + epsilon)`.
    """
    tf = tensorflow()
    grads = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy, x=x, scale=gamma, reserve_space_1=mean, reserve_space_2=variance,
        reserve_space_3=reserve, epsilon=epsilon, data_format=data_format, is_training=False,
    )
    return grads.x_backprop, grads.scale_backprop, grads.offset_backprop


def fused_shifted_affine(x, a, b, center, data_format: str):
    """`(x - center) * a + b` per channel in one pass of the inference kernel.

    Args:
        x: 4-D tensor (float16, bfloat16 or float32).
        a, b, center: float32 tensors of shape `(channels,)`.
        data_format: "NHWC" or "NCHW".

    Returns:
        A tensor in the dtype of `x`.
    """
    tf = tensorflow()
    variance = tf.fill(tf.shape(a), _UNIT_VARIANCE_SPLIT)
    y, _ = fused_batch_norm_inference(x, a, b, center, variance, _UNIT_VARIANCE_SPLIT, data_format)
    return y

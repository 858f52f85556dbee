"""Cross-replica statistics for `tf.distribute` strategies (TensorFlow backend only).

Under `MirroredStrategy` or `MultiWorkerMirroredStrategy` each replica runs the
layer on its own slice of the global batch. These functions let the replicas
agree on statistics of the whole global batch.

TensorFlow is imported inside the functions, so `kerasbn` imports this module
on every backend; on another backend `cross_replica_moments` raises a clear
error instead of an ImportError.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from kerasbn import ops as bn_ops
from kerasbn.backend import is_tensorflow, require_tensorflow


def replica_context():
    """The replica context when more than one replica runs in sync, else None.

    In cross-replica context (a model called outside `strategy.run`) the whole
    batch is on one device, so local statistics already are global ones. On
    backends other than TensorFlow there is no `tf.distribute`: always None.
    """
    if not is_tensorflow():
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def cross_replica_moments(
    x,
    axes: Sequence[int],
    mask=None,
    keepdims: bool = False,
) -> Tuple[object, object]:
    """Mean and variance of the global batch, from inside a replica.

    Two passes, each one all-reduce: first the count and the sum (giving the
    global mean), then the sum of squared deviations from that mean. This is
    exact where the one-pass `E[x^2] - E[x]^2` loses digits to cancellation,
    and the result equals `moments` on the concatenated global batch, also
    when replicas hold different numbers of examples (a global batch the
    replica count does not divide).

    Falls back to local `moments` outside a multi-replica context.
    Gradients flow through the all-reduces, so each replica receives the
    gradient of the global-batch normalization.

    Args:
        x: This replica's slice of the batch.
        axes: Axes to reduce.
        mask: Optional Keras mask of rank `rank(x) - 1`.
        keepdims: Keep the reduced axes with length 1.

    Returns:
        `(mean, variance)`, float32 for half-precision inputs.

    Raises:
        ValueError: on a Keras backend other than TensorFlow.
    """
    require_tensorflow("`cross_replica_moments` (tf.distribute)")
    import tensorflow as tf

    context = replica_context()
    if context is None:
        return bn_ops.moments(x, axes, mask=mask, keepdims=keepdims)
    axes = tuple(axes)
    x = tf.cast(x, bn_ops.statistics_dtype(x.dtype))
    if mask is None:
        keep = None
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
        count = tf.fill(tf.shape(local_sum), count)
    else:
        keep = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x))
        count = tf.reduce_sum(tf.cast(keep, x.dtype), axis=axes, keepdims=True)
        # Select, not multiply: padding may hold inf or NaN, and 0 * inf is NaN.
        local_sum = tf.reduce_sum(tf.where(keep, x, tf.zeros_like(x)), axis=axes, keepdims=True)
    # One all-reduce for count and sum together; the count carries no gradient.
    total_sum, total_count = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [local_sum, tf.stop_gradient(count)]
    )
    total_count = tf.maximum(total_count, 1.0)
    mean = total_sum / total_count
    # The mean's gradient through the second pass is exactly zero (the
    # deviations sum to zero), so stop it and save a backward all-reduce.
    deviation = tf.square(x - tf.stop_gradient(mean))
    if keep is not None:
        deviation = tf.where(keep, deviation, tf.zeros_like(deviation))
    local_squares = tf.reduce_sum(deviation, axis=axes, keepdims=True)
    total_squares = context.all_reduce(tf.distribute.ReduceOp.SUM, local_squares)
    variance = total_squares / total_count
    if not keepdims:
        mean = tf.squeeze(mean, axis=axes)
        variance = tf.squeeze(variance, axis=axes)
    return mean, variance

"""Cross-replica statistics for `tf.distribute` strategies (TensorFlow backend only).

Under `MirroredStrategy` or `MultiWorkerMirroredStrategy` each replica runs the
layer on its own slice of the global batch. These functions let the replicas
agree on statistics of the whole global batch.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import tensorflow as tf

from kerasbn import ops as bn_ops


def replica_context():
    """The replica context when more than one replica runs in sync, else None.

    In cross-replica context (a model called outside `strategy.run`) the whole
    batch is on one device, so local statistics already are global ones.
    """
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
) -> Tuple[tf.Tensor, tf.Tensor]:
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
    """
    context = replica_context()
    if context is None:
        return bn_ops.moments(x, axes, mask=mask, keepdims=keepdims)
    axes = tuple(axes)
    x = tf.cast(x, bn_ops.statistics_dtype(x.dtype))
    if mask is None:
        weights = None
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
        count = tf.fill(tf.shape(local_sum), count)
    else:
        weights = tf.broadcast_to(tf.cast(tf.expand_dims(mask, -1), x.dtype), tf.shape(x))
        count = tf.reduce_sum(weights, axis=axes, keepdims=True)
        local_sum = tf.reduce_sum(weights * x, axis=axes, keepdims=True)
    # One all-reduce for count and sum together; the count carries no gradient.
    total_sum, total_count = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [local_sum, tf.stop_gradient(count)]
    )
    total_count = tf.maximum(total_count, 1.0)
    mean = total_sum / total_count
    # The mean's gradient through the second pass is exactly zero (the
    # deviations sum to zero), so stop it and save a backward all-reduce.
    deviation = tf.square(x - tf.stop_gradient(mean))
    if weights is not None:
        deviation = weights * deviation
    local_squares = tf.reduce_sum(deviation, axis=axes, keepdims=True)
    total_squares = context.all_reduce(tf.distribute.ReduceOp.SUM, local_squares)
    variance = total_squares / total_count
    if not keepdims:
        mean = tf.squeeze(mean, axis=axes)
        variance = tf.squeeze(variance, axis=axes)
    return mean, variance

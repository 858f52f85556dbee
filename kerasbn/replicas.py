"""Per-layer `tf.distribute` primitives: what one `kerasbn.BatchNorm` call asks of the other replicas.

The layer calls these from inside a replica (TensorFlow backend only):
`replica_context` (is there anyone to talk to?), `moving_statistics_aggregation`
(how a read outside replicas combines the per-replica moving statistics) and
`cross_replica_moments` (synchronized batch norm's statistics of the global
batch). They sit below the layer and import nothing of kerasbn above
`kerasbn.ops`; the model-level tools (the handover) are in
`kerasbn/distributed.py`, which states the whole contract.

TensorFlow is imported lazily (`kerasbn.backend.tensorflow`), so the layer
imports this module on every backend; elsewhere `replica_context` is None and
the aggregation is "mean".
"""

from __future__ import annotations

from typing import Sequence, Tuple

from kerasbn import ops as bn_ops
from kerasbn.backend import is_tensorflow, require_tensorflow, tensorflow


def replica_context():
    """The replica context when more than one replica runs in sync, else None.

    In cross-replica context (a model called outside `strategy.run`) the whole
    batch is on one device, so local statistics already are global ones. On
    backends other than TensorFlow there is no `tf.distribute`: always None.
    """
    if not is_tensorflow():
        return None
    tf = tensorflow()
    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def check_distributed(variable, layer_name: str) -> None:
    """Raises where a replica is about to update a variable that every replica shares.

    A model built outside `strategy.scope()` and run in `strategy.run` has
    plain variables: every replica would assign the same moving statistic in
    turn, a race whose result depends on the order the replicas ran.
    """
    context = replica_context()
    if context is None:
        return
    if not isinstance(getattr(variable, "value", variable), tensorflow().distribute.DistributedValues):
        raise ValueError(
            f"Layer {layer_name!r} runs in a replica of {context.strategy!r} "
            f"({context.num_replicas_in_sync} replicas), but its variables were made outside "
            "`strategy.scope()`: every replica would write the same moving statistics in turn. "
            "Build (or load) the model inside `with strategy.scope():`. "
            f"Received: variable {getattr(variable, 'path', getattr(variable, 'name', variable))!r}"
        )


def moving_statistics_aggregation() -> str:
    """How a read outside replicas combines the per-replica copies of a moving statistic.

    "mean" (the mean of the copies) where every replica is in this process;
    "only_first_replica" under a strategy whose replicas span several workers,
    where a mean would be a collective that hangs when one worker reads alone.
    There the copies are made equal by `sync_moving_statistics`, so this
    worker's first copy is the mean as of the last handover.
    """
    if not is_tensorflow():
        return "mean"
    tf = tensorflow()
    if not tf.distribute.has_strategy():
        return "mean"
    strategy = tf.distribute.get_strategy()
    local_replicas = len(strategy.extended.worker_devices)
    if strategy.num_replicas_in_sync > local_replicas:
        return "only_first_replica"
    return "mean"


# ----------------------------------------------------------- synchronized BN


def cross_replica_moments(
    x,
    axes: Sequence[int],
    mask=None,
    keepdims: bool = False,
) -> Tuple[object, object]:
    """Mean and variance of the global batch, from inside a replica: one all-gather, one all-reduce backward.

    Each replica computes its `(count, mean, M2)` per channel (M2, the sum of
    squared deviations from its own mean); one all-gather brings every
    replica's triple to all, and Chan et al.'s parallel formula combines them:

        N = sum n_i,  mean = sum n_i mean_i / N,
        M2 = sum M2_i + sum n_i (mean_i - mean)^2,  variance = M2 / N

    exactly, with no `E[x^2] - E[x]^2` cancellation, and equal to `moments` on
    the concatenated global batch also when replicas hold different numbers
    of examples, or none. The gradient is exact too, at the cost of one
    all-reduce of the upstream gradients `[g_mean, g_variance]` (summed over
    replicas, since every replica's loss depends on every example through the
    global statistics):

        dx = (G_mean + 2 G_variance (x - mean)) / N

    at the positions the mask keeps (0 elsewhere).

    Falls back to local `moments` outside a multi-replica context.

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
    context = replica_context()
    if context is None:
        return bn_ops.moments(x, axes, mask=mask, keepdims=keepdims)
    tf = tensorflow()
    axes = tuple(axes)
    x = tf.cast(x, bn_ops.statistics_dtype(x.dtype))
    keep = None
    if mask is not None:
        keep = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x))
    mean, variance = _global_moments(context, axes, keep)(x)
    if not keepdims:
        mean = tf.squeeze(mean, axis=axes)
        variance = tf.squeeze(variance, axis=axes)
    return mean, variance


def _global_moments(context, axes, keep):
    """`x -> (mean, variance)` over the global batch (keepdims), with the one-collective gradient."""
    tf = tensorflow()

    def local_sum(values):
        if keep is not None:
            # Select, not multiply: padding may hold inf or NaN, and 0 * inf is NaN.
            values = tf.where(keep, values, tf.zeros_like(values))
        return tf.reduce_sum(values, axis=axes, keepdims=True)

    @tf.custom_gradient
    def moments(x):
        if keep is None:
            size = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
            count = tf.fill(tf.shape(local_sum(x)), size)
        else:
            count = local_sum(tf.ones_like(x))
        local_mean = local_sum(x) / tf.maximum(count, 1.0)  # an empty slice: count 0, mean 0
        local_m2 = local_sum(tf.square(x - local_mean))
        gathered = context.all_gather(tf.stack([count, local_mean, local_m2])[tf.newaxis], axis=0)
        # Each (replicas, *statistic shape); all_gather keeps no static shape.
        counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        total = tf.reduce_sum(counts, axis=0)
        safe_total = tf.maximum(total, 1.0)
        mean = tf.reduce_sum(counts * means, axis=0) / safe_total
        m2 = tf.reduce_sum(m2s, axis=0) + tf.reduce_sum(counts * tf.square(means - mean), axis=0)
        variance = m2 / safe_total
        mean, variance = (tf.ensure_shape(v, local_mean.shape) for v in (mean, variance))

        def grad(grad_mean, grad_variance):
            upstream = [tf.zeros_like(mean) if g is None else g for g in (grad_mean, grad_variance)]
            summed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack(upstream))
            dx = (summed[0] + 2.0 * summed[1] * (x - mean)) / safe_total
            if keep is not None:
                dx = tf.where(keep, dx, tf.zeros_like(dx))
            return dx

        return (mean, variance), grad

    return moments

"""Per-layer `tf.distribute` primitives: what one `kerasbn.BatchNorm` call asks of the other replicas.

The layer calls these from inside a replica (TensorFlow backend only):
`replica_context` (is there anyone to talk to?), `moving_statistics_aggregation`
(how a read outside replicas combines the per-replica moving statistics),
`cross_replica_moments` (synchronized batch norm's statistics of the global
batch, or of a group of replicas) and `synchronized_fused_batch_norm` (the
same on TensorFlow's fused kernels, forward and backward). They sit below the
layer and import nothing of kerasbn above `kerasbn.ops` and `kerasbn.fused`;
the model-level tools (the handover) are in `kerasbn/distributed.py`, which
states the whole contract.

TensorFlow is imported lazily (`kerasbn.backend.tensorflow`), so the layer
imports this module on every backend; elsewhere `replica_context` is None and
the aggregation is "mean".
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from kerasbn import ops as bn_ops
from kerasbn.backend import is_tensorflow, require_tensorflow, tensorflow
from kerasbn.fused import fused_batch_norm_inference, fused_batch_norm_inference_grad, fused_shifted_affine


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
#
# Every cross-replica call below is one `ReplicaContext.all_reduce` of a
# tensor of static shape: one collective op in the traced graph. (An
# all-gather launches two: TensorFlow gathers the shapes first, then the
# padded data.) A layer makes two per training step: the per-replica
# statistics forward, the two gradient sums backward.


def group_size_in(context, group_size: Optional[int]) -> int:
    """The replicas that share statistics: all of them for None, else `group_size`, which must divide their number."""
    replicas = context.num_replicas_in_sync
    if group_size is None:
        return replicas
    if replicas % group_size:
        raise ValueError(
            f"`sync_group_size` must divide the number of replicas in sync ({replicas}). "
            f"Received: sync_group_size={group_size} with {replicas} replicas"
        )
    return group_size


def _all_reduce_sum(context, value):
    """`context.all_reduce(SUM, value)`, with TensorFlow's control-flow error made a clear one.

    Under `MirroredStrategy` and `MultiWorkerMirroredStrategy` on CPUs an
    all-reduce is a `merge_call`, which TensorFlow refuses inside control flow
    (a `tf.while_loop`, such as an RNN's over its cell, a `tf.cond`) or a
    nested `tf.function`.
    """
    tf = tensorflow()
    try:
        return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
    except RuntimeError as error:
        if "merge_call" not in str(error):
            raise
        raise ValueError(
            "`synchronized=True` batch norm cannot compute its statistics here: its cross-replica "
            "all-reduce is a `merge_call`, which TensorFlow's strategy does not allow inside control flow "
            "(a tf.while_loop such as an RNN's loop over its cell, a tf.cond) or a nested tf.function. "
            "Use `synchronized=False` for this layer (its statistics are then the replica's own), or take "
            "it out of the loop (e.g. keras.layers.RNN(..., unroll=True)). "
            f"Received: synchronized=True at {tf.get_current_name_scope()!r}"
        ) from error


def _replica_id(context):
    tf = tensorflow()
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def _rows_of_group(context, rows, group_size: int):
    """Every replica's `rows` in this replica's group, stacked: `(group_size, *rows.shape)`, one all-reduce.

    Each replica writes its rows into its own slot of a zero tensor of static
    shape `(replicas, *rows.shape)`; the sum over replicas is every replica's
    rows, exactly (`x + 0 == x`, also for inf and NaN).
    """
    tf = tensorflow()
    replicas = context.num_replicas_in_sync
    replica = _replica_id(context)
    shape = tuple(rows.shape)
    slots = tf.scatter_nd(tf.reshape(replica, (1, 1)), rows[tf.newaxis], (replicas,) + shape)
    everyone = _all_reduce_sum(context, slots)
    return tf.gather(tf.reshape(everyone, (replicas // group_size, group_size) + shape), replica // group_size)


def _sum_in_group(context, value, group_size: int):
    """The sum of `value` over this replica's group, in one all-reduce (of slots, one per group)."""
    tf = tensorflow()
    replicas = context.num_replicas_in_sync
    if group_size == replicas:
        return _all_reduce_sum(context, value)
    group = _replica_id(context) // group_size
    slots = tf.scatter_nd(tf.reshape(group, (1, 1)), value[tf.newaxis], (replicas // group_size,) + tuple(value.shape))
    return tf.gather(_all_reduce_sum(context, slots), group)


def _local_rows(x, axes, keep=None):
    """This replica's `(count, mean, M2)` per statistic, stacked on a new first axis (keepdims shapes).

    M2 is the sum of squared deviations from this replica's own mean; an
    empty slice gives count 0, mean 0, M2 0.
    """
    tf = tensorflow()

    def local_sum(values):
        if keep is not None:
            # Select, not multiply: padding may hold inf or NaN, and 0 * inf is NaN.
            values = tf.where(keep, values, tf.zeros_like(values))
        return tf.reduce_sum(values, axis=axes, keepdims=True)

    total = local_sum(x)
    if keep is None:
        size = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        count = tf.fill(tf.shape(total), size)
    else:
        count = local_sum(tf.ones_like(x))
    mean = total / tf.maximum(count, 1.0)
    return tf.stack([count, mean, local_sum(tf.square(x - mean))])


def _combine(rows):
    """`(count, mean, variance)` of the union of the replicas whose rows `(replicas, 3, ...)` these are.

    Chan et al.'s parallel formula (`kerasbn.ops.combine_moments`); a group
    without examples gets mean 0 and variance 0.
    """
    total, mean, m2 = bn_ops.combine_moments(rows[:, 0], rows[:, 1], rows[:, 2], axis=0)
    return total, mean, m2 / tensorflow().maximum(total, 1.0)


def cross_replica_moments(
    x,
    axes: Sequence[int],
    mask=None,
    keepdims: bool = False,
    group_size: Optional[int] = None,
) -> Tuple[object, object]:
    """Mean and variance of the global batch, from inside a replica: one all-reduce forward, one backward.

    Each replica computes its `(count, mean, M2)` per channel (M2, the sum of
    squared deviations from its own mean) and writes them into its own slot
    of a zero tensor of shape `(replicas, 3, ...)`; one all-reduce brings
    every replica's triple to all (an all-gather in one collective op), and
    Chan et al.'s parallel formula combines them:

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

    With `group_size` k, consecutive replicas in groups of k (replicas 0 to
    k - 1, then k to 2k - 1, ...) share statistics: the "global batch" is the
    group's, at the same two calls.

    Falls back to local `moments` outside a multi-replica context.

    Args:
        x: This replica's slice of the batch.
        axes: Axes to reduce.
        mask: Optional Keras mask of rank `rank(x) - 1`.
        keepdims: Keep the reduced axes with length 1.
        group_size: Replicas per group (must divide the replica count); None
            for all replicas.

    Returns:
        `(mean, variance)`, float32 for half-precision inputs.

    Raises:
        ValueError: on a Keras backend other than TensorFlow; for a
            `group_size` that does not divide the replica count; inside
            control flow (see `synchronized_moments`).
    """
    mean, variance, _ = synchronized_moments(x, axes, mask=mask, keepdims=keepdims, group_size=group_size)
    return mean, variance


def synchronized_moments(x, axes, mask=None, keepdims=False, group_size=None):
    """`cross_replica_moments` and the group's example count per statistic (0: no statistics, a group without examples).

    Outside a multi-replica context the count is None.
    """
    require_tensorflow("`cross_replica_moments` (tf.distribute)")
    context = replica_context()
    if context is None:
        return (*bn_ops.moments(x, axes, mask=mask, keepdims=keepdims), None)
    tf = tensorflow()
    group_size = group_size_in(context, group_size)
    axes = tuple(axes)
    x = tf.cast(x, bn_ops.statistics_dtype(x.dtype))
    keep = None
    if mask is not None:
        keep = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x))
    mean, variance, count = _global_moments(context, axes, keep, group_size)(x)
    if not keepdims:
        mean, variance, count = (tf.squeeze(v, axis=axes) for v in (mean, variance, count))
    return mean, variance, count


def _global_moments(context, axes, keep, group_size):
    """`x -> (mean, variance, count)` over the group's batch (keepdims), with the one-collective gradient."""
    tf = tensorflow()

    @tf.custom_gradient
    def moments(x):
        rows = _local_rows(x, axes, keep)
        total, mean, variance = _combine(_rows_of_group(context, rows, group_size))
        safe_total = tf.maximum(total, 1.0)

        def grad(grad_mean, grad_variance, _):
            upstream = [tf.zeros_like(mean) if g is None else g for g in (grad_mean, grad_variance)]
            summed = _sum_in_group(context, tf.stack(upstream), group_size)
            dx = (summed[0] + 2.0 * summed[1] * (x - mean)) / safe_total
            if keep is not None:
                dx = tf.where(keep, dx, tf.zeros_like(dx))
            return dx

        return (mean, variance, tf.stop_gradient(total)), grad

    return moments


def synchronized_fused_batch_norm(x, gamma, beta, epsilon: float, data_format: str, group_size=None):
    """Training-mode batch norm over the global batch (or this replica's group) on TensorFlow's fused kernels.

    Forward: this replica's `(count, mean, M2)` per channel, the one
    all-reduce of every replica's triple (as `cross_replica_moments`), Chan's
    combination of the group's, then the fused kernel in inference mode with
    the group's mean and variance. Backward: the inference-mode gradient
    kernel gives `dx_direct = dy * gamma * inv_std` and this replica's
    `sum(dy)` and `sum(dy * x_hat)` (its dbeta and dgamma); one all-reduce
    sums those two over the group (S1, S2), and

        dx = dx_direct - gamma * inv_std * (S1 + x_hat * S2) / N

    with `(x - mean)` formed in the kernel (no cancellation). dgamma and dbeta
    stay this replica's: the optimizer's gradient aggregation sums them.

    Must run inside a replica of a multi-replica strategy (`replica_context`).

    Args:
        x: 4-D tensor (float16, bfloat16 or float32) in `data_format`.
        gamma: Scale of shape `(channels,)`, or None for ones.
        beta: Offset of shape `(channels,)`, or None for zeros.
        epsilon: Added to the variance (at least `kerasbn.plan.FUSED_MIN_EPSILON`).
        data_format: "NHWC" or "NCHW".
        group_size: Replicas per group; None for all.

    Returns:
        `(y, mean, variance, count)`: `y` in the dtype of `x`; the group's
        mean, biased variance and example count per channel, float32 `(channels,)`.
    """
    tf = tensorflow()
    context = replica_context()
    group_size = group_size_in(context, group_size)
    channel_axis = 3 if data_format == "NHWC" else 1
    axes = tuple(a for a in range(4) if a != channel_axis)
    channels = x.shape[channel_axis]
    rows = tf.reshape(_local_rows(tf.cast(x, tf.float32), axes), (3, channels))
    total, mean, variance = (tf.stop_gradient(v) for v in _combine(_rows_of_group(context, rows, group_size)))
    gamma = tf.ones([channels], tf.float32) if gamma is None else tf.cast(gamma, tf.float32)
    beta = tf.zeros([channels], tf.float32) if beta is None else tf.cast(beta, tf.float32)
    inv_std = tf.math.rsqrt(variance + epsilon)
    safe_total = tf.maximum(total, 1.0)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        y, reserve = fused_batch_norm_inference(x, gamma, beta, mean, variance, epsilon, data_format)

        def grad(dy):
            dx_direct, dgamma, dbeta = fused_batch_norm_inference_grad(
                dy, x, gamma, mean, variance, reserve, epsilon, data_format
            )
            sum_dy, sum_dy_x_hat = tf.unstack(_sum_in_group(context, tf.stack([dbeta, dgamma]), group_size))
            scale = -gamma * inv_std / safe_total
            correction = fused_shifted_affine(x, scale * inv_std * sum_dy_x_hat, scale * sum_dy, mean, data_format)
            return dx_direct + correction, dgamma, dbeta

        return y, grad

    return normalize(x, gamma, beta), mean, variance, total

"""kerasbn under `tf.distribute`: the contract, in one module (TensorFlow backend only).

Under `MirroredStrategy` or `MultiWorkerMirroredStrategy` each replica runs
the layer on its own slice of the global batch. What each call costs in
cross-replica calls (an all-reduce or all-gather that every replica must join)
and what every replica sees:

| call | cross-replica calls | what every replica sees |
|---|---|---|
| training step, `synchronized=False` | 0 per layer | its own batch statistics; it updates its own copy of the moving statistics |
| training step, `synchronized=True` | 2 per layer: one all-gather forward, one all-reduce backward | the global batch's statistics, exact on uneven and empty slices |
| training step, `renorm=True` | 1 per moving variable (averaged as written) | its own batch statistics, corrected towards the shared renorm ones |
| inference step (inside a replica) | 0 | its own copy of the moving statistics |
| `sync_moving_statistics(model)` (the handover) | 1 for the whole model | afterwards, every copy holds the cross-replica mean |
| a read outside replicas (`.numpy()`, `get_weights`, checkpoints, `.keras`, SavedModel) | 0 across workers | MirroredStrategy: the mean of the copies; MultiWorkerMirroredStrategy: this worker's first copy, the cross-replica mean as of the last handover |

So the moving statistics are per-replica ("on_read") variables: each replica
updates and reads its own copy with no traffic, which keeps inference a local
computation wherever a layer can run (RNN cells, control flow, nested
`tf.function`s, `inference_function`). The copies drift apart during training,
as the stock layer's do; `sync_moving_statistics` sets them all to their mean,
which, the moving average being linear, is exactly the moving average of the
replicas' mean statistics. `kerasbn.callbacks.SyncMovingStatistics` makes that
handover at epoch end, test begin, predict begin and train end.

Which calls every worker must make: under `MultiWorkerMirroredStrategy` a
collective needs every worker, so `sync_moving_statistics` (and anything that
steps the model under `strategy.run`) must run on every worker; a worker left
alone raises within `timeout_seconds` instead of waiting forever. Reads and
saves never are collectives here, so `if chief: model.save(...)` returns at
once.

TensorFlow is imported lazily (`kerasbn.backend.tensorflow`), so `kerasbn`
imports this module on every backend; on JAX there is no `tf.distribute`,
arrays sharded by `keras.distribution` are global, and every function here is
a no-op or raises a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Dict, Iterator, Optional, Sequence, Tuple

from kerasbn import ops as bn_ops
from kerasbn.backend import is_tensorflow, require_tensorflow, tensorflow

DEFAULT_TIMEOUT_SECONDS = 30.0


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


# --------------------------------------------------------------- the handover

# One compiled handover per model and strategy, rebuilt when its layers change.
_HANDOVERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def per_replica_statistics(model) -> list:
    """The moving-statistics variables of `model` that each replica keeps its own copy of.

    Every built `kerasbn.BatchNorm` without renorm (nested models included)
    contributes its `moving_mean` and `moving_variance`; renorm's statistics
    are averaged as they are written and need no handover.
    """
    from kerasbn.statistics import batch_norm_layers

    return [
        variable
        for layer in batch_norm_layers(model)
        if layer.built and not layer.renorm
        for variable in (layer.moving_mean, layer.moving_variance)
    ]


def _variable_strategy(variables):
    """The strategy that distributes these (Keras) variables, or None for plain ones."""
    for variable in variables:
        strategy = getattr(getattr(variable, "value", variable), "distribute_strategy", None)
        if strategy is not None and strategy.num_replicas_in_sync > 1:
            return strategy
    return None


def sync_moving_statistics(model, strategy=None, timeout_seconds: Optional[float] = DEFAULT_TIMEOUT_SECONDS) -> int:
    """Sets every replica's copy of the moving statistics to the cross-replica mean: the handover.

    During training each replica updates its own copy of every
    `kerasbn.BatchNorm`'s moving mean and variance (no cross-replica traffic),
    so the copies drift apart. Call this before inference (evaluation,
    prediction, export) so that every replica normalizes with the same
    statistics; `kerasbn.callbacks.SyncMovingStatistics` calls it for `fit`.
    All statistics of the whole model travel in one batched all-reduce (one
    per variable dtype, usually one). The moving average being linear, the
    mean of the copies is exactly the moving average of the replicas' mean
    batch statistics.

    Call it outside `strategy.run`, on every worker: it is a collective. Under
    `MultiWorkerMirroredStrategy` a worker that calls it alone raises a
    RuntimeError after `timeout_seconds` instead of waiting forever. (After
    such a timeout TensorFlow's collectives of this process stay aborted: the
    process must restart.)

    Args:
        model: A Keras model or layer holding `kerasbn.BatchNorm` layers.
        strategy: The strategy the model's variables were made under; None
            takes it from the variables.
        timeout_seconds: How long a worker waits for the others under
            `MultiWorkerMirroredStrategy`; None or 0 waits forever.

    Returns:
        The number of layers whose copies were averaged (0 where there is
        nothing to do: no multi-replica strategy, another backend, or no
        kerasbn.BatchNorm without renorm).

    Raises:
        ValueError: for a negative `timeout_seconds`.
        RuntimeError: inside `strategy.run`, or when the other workers did not
            join within `timeout_seconds`.
    """
    if timeout_seconds is not None and (isinstance(timeout_seconds, bool) or not timeout_seconds >= 0):
        raise ValueError(
            "`timeout_seconds` must be a non-negative number or None. "
            f"Received: timeout_seconds={timeout_seconds!r}"
        )
    if not is_tensorflow():
        return 0
    variables = per_replica_statistics(model)
    strategy = strategy or _variable_strategy(variables)
    if not variables or strategy is None or strategy.num_replicas_in_sync <= 1:
        return 0
    tf = tensorflow()
    if replica_context() is not None:
        raise RuntimeError(
            "`sync_moving_statistics` must be called outside `strategy.run` (in cross-replica "
            f"context): it is itself a collective. Received: a call inside a replica of {strategy!r}"
        )
    key = (id(strategy), tuple(id(v) for v in variables), timeout_seconds)
    cached = _HANDOVERS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _compile_handover(strategy, variables, timeout_seconds))
        _HANDOVERS[model] = cached
    try:
        cached[1]()
    except tf.errors.DeadlineExceededError as error:  # a lost peer stays UnavailableError (restart)
        raise RuntimeError(
            "`sync_moving_statistics` is a collective call: every worker must call it. The other "
            f"workers did not join within timeout_seconds={timeout_seconds} ({type(error).__name__}). "
            "Call it on every worker (as SyncMovingStatistics and fit do), not on the chief alone."
        ) from error
    return len(variables) // 2  # each layer's moving mean and moving variance


def _compile_handover(strategy, variables, timeout_seconds):
    """A `tf.function` that replaces each replica's copies of `variables` by their cross-replica mean."""
    tf = tensorflow()
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds or None)
    by_dtype: Dict[object, list] = {}
    for variable in variables:
        by_dtype.setdefault(variable.value.dtype, []).append(variable)
    groups = list(by_dtype.values())

    def replica_fn():
        context = tf.distribute.get_replica_context()
        flat = []
        for group in groups:
            parts = []
            for variable in group:
                tf_variable = variable.value
                # Placed on this replica's copy: MultiWorkerMirroredStrategy's
                # collectives need tensors that name their device.
                with tf.device(tf_variable.device):
                    parts.append(tf.reshape(tf.identity(tf_variable), [-1]))
            flat.append(tf.concat(parts, axis=0))
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, flat, options=options)
        for group, mean in zip(groups, means):
            sizes = [int(v.value.shape.num_elements()) for v in group]
            for variable, part in zip(group, tf.split(mean, sizes)):
                variable.value.assign(tf.reshape(part, variable.value.shape))

    @tf.function(autograph=False)
    def handover():
        strategy.run(replica_fn)

    return handover


# ------------------------------------------------------- counting the contract

_REPLICA_CALLS = ("all_reduce", "all_gather")  # ReplicaContext: one replica asking the others
_STRATEGY_CALLS = ("reduce_to", "batch_reduce_to")  # StrategyExtended: aggregated writes, cross-replica reads


class _CallCounter:
    """The bookkeeping of `count_cross_replica_calls`: outermost calls, per replica thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.replica_calls_in_flight = 0
        self.per_thread: Dict[int, Dict[str, int]] = {}
        self.strategy_calls = {name: 0 for name in _STRATEGY_CALLS}

    def wrap(self, name, method, replica_level):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            depth = getattr(self.local, "depth", 0)
            with self.lock:
                if depth == 0 and replica_level:
                    calls = self.per_thread.setdefault(threading.get_ident(), {})
                    calls[name] = calls.get(name, 0) + 1
                    self.replica_calls_in_flight += 1
                elif depth == 0 and not self.replica_calls_in_flight:
                    # Not the merge step of a replica's all-reduce (MirroredStrategy
                    # runs that on another thread while the replicas wait).
                    self.strategy_calls[name] += 1
            self.local.depth = depth + 1
            try:
                return method(*args, **kwargs)
            finally:
                self.local.depth = depth
                if depth == 0 and replica_level:
                    with self.lock:
                        self.replica_calls_in_flight -= 1

        return wrapper

    def totals(self) -> Dict[str, int]:
        totals = {name: max((calls.get(name, 0) for calls in self.per_thread.values()), default=0)
                  for name in _REPLICA_CALLS}
        totals.update(self.strategy_calls)
        return totals


@contextlib.contextmanager
def count_cross_replica_calls() -> Iterator[Dict[str, int]]:
    """Counts the cross-replica calls one replica makes while the block runs (or traces).

    Counts, per replica, the outermost calls of `ReplicaContext.all_reduce`
    and `all_gather` (a replica asking the others; the most any one replica
    made), and the strategy's `reduce_to` / `batch_reduce_to` made outside
    those (an aggregated variable write, a cross-replica read or reduction).
    A call made inside another counted one is part of it. Count a
    `tf.function` step by tracing it inside the block (e.g.
    `step.get_concrete_function(...)`): tracing runs the Python once per
    replica, and backward calls are made while the gradient is traced.

    Yields:
        A dict `{"all_reduce": n, "all_gather": n, "reduce_to": n,
        "batch_reduce_to": n}`, filled when the block exits.

    Raises:
        ValueError: on a Keras backend other than TensorFlow.
    """
    require_tensorflow("`count_cross_replica_calls` (tf.distribute)")
    tf = tensorflow()
    counter = _CallCounter()
    patched = [(tf.distribute.ReplicaContext, name, True) for name in _REPLICA_CALLS]
    patched += [(tf.distribute.StrategyExtended, name, False) for name in _STRATEGY_CALLS]
    originals = []
    counts: Dict[str, int] = {}
    try:
        for owner, name, replica_level in patched:
            method = getattr(owner, name)
            originals.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, counter.wrap(name, method, replica_level))
        yield counts
    finally:
        for owner, name, original in originals:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        counts.update(counter.totals())

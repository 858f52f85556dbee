"""kerasbn under `tf.distribute` and `keras.distribution`: the contract, in one module.

On TensorFlow, under `MirroredStrategy` or `MultiWorkerMirroredStrategy`,
each replica runs the layer on its own slice of the global batch. On JAX,
under `keras.distribution.DataParallel`, the batch is one global array
sharded along the mesh's batch axis, and the layer runs its statistics on
each device's slice (`jax.shard_map`, `kerasbn/sharding.py`). What each call
costs in collectives (an all-reduce or all-gather that every replica or
device must join; on JAX counted in the compiled HLO) and what every replica
or device sees:

| call | TensorFlow (`tf.distribute`) | JAX (`keras.distribution`) |
|---|---|---|
| training step, `synchronized=False` | 0 per layer; each replica uses its own batch statistics and updates its own copy of the moving statistics | 0 per layer, forward and backward; each device uses its own batch statistics; the moving statistics are averaged as written, and XLA combines every layer's average with the gradients' all-reduce (measured: 1 collective for the whole step) |
| training step, `synchronized=True` (generic path: masks, renorm, NCHW, other axes) | 2 per layer, both all-reduces: forward, every replica's `(count, mean, M2)` in its own slot of a zero `(replicas, 3, C)` tensor (an all-gather in one collective op); backward, the two gradient sums. 2 collective ops in the traced graph (TensorFlow's all-gather alone would launch 2) | 2 per layer: one all-gather of every device's `(count, mean, M2)` forward, one all-reduce of the two gradient sums backward |
| training step, `synchronized=True`, NHWC (4-D or viewed as (-1, 1, 1, C)): the fused path | the same 2 calls and 2 collective ops, around TensorFlow's fused kernels in inference mode with the global mean and variance, forward and backward (`dgamma`, `dbeta` stay each replica's; the optimizer's aggregation sums them) | (no fused kernel: the row above) |
| what synchronized statistics are | the global batch's, exact on uneven and empty slices | the same, uneven masked counts included |
| training step, `synchronized=True, sync_group_size=k` | the same 2 calls and 2 collective ops (every replica's rows travel; each combines its group's; backward sums go to its group's slot): the statistics of its group of k consecutive replicas; each copy of the moving statistics follows its group's, the handover's mean is over all replicas | the same 2 collectives (backward an all-gather, summed within the group) |
| training step, `synchronized=True` inside control flow (an RNN cell's `tf.while_loop`, `tf.cond`) | none: a ValueError naming the way out (TensorFlow refuses the all-reduce's `merge_call` there: use `synchronized=False` for that layer, or unroll the loop) | (traced as one program: no such limit) |
| training step, `renorm=True` | 1 per moving variable (averaged as written) | 0 per layer (measured), each device's own batch statistics corrected towards the shared renorm ones; every moving variable averaged as written, in the step's one combined all-reduce |
| inference step | 0 (inside a replica: its own copy) | 0 (the moving statistics are replicated) |
| `sync_moving_statistics(model)` (the handover) | 1 for the whole model; afterwards every copy holds the cross-replica mean | not needed, returns 0: every device holds the same moving statistics after every step |
| a read outside the step (`.numpy()`, `get_weights`, checkpoints, `.keras`, SavedModel / `export`) | 0 across workers; MirroredStrategy: the mean of the copies; MultiWorkerMirroredStrategy: this worker's first copy, the cross-replica mean as of the last handover | 0: the cross-device mean as of the last step, on every process |

Keras has no distribution API on the torch backend: there the layer
normalizes the batch it is given, with no collective and nothing to hand over
(on several GPUs under torch's own DDP, each process's batch statistics).

So on TensorFlow the moving statistics are per-replica ("on_read")
variables: each replica updates and reads its own copy with no traffic, which
keeps inference a local computation wherever a layer can run (RNN cells,
control flow, nested `tf.function`s, `inference_function`). The copies drift
apart during training, as the stock layer's do; `sync_moving_statistics` sets
them all to their mean, which, the moving average being linear, is exactly
the moving average of the replicas' mean statistics.
`kerasbn.callbacks.SyncMovingStatistics` makes that handover at epoch end,
test begin, predict begin and train end. On JAX the variables stay
replicated, as `keras.distribution` makes them: the step writes the mean of
the devices' statistics (the same value the handover would give), off the
forward and backward path, so the handover and the callback have nothing to
do there.

Which calls every worker must make: under `MultiWorkerMirroredStrategy` a
collective needs every worker, so `sync_moving_statistics` (and anything that
steps the model under `strategy.run`) must run on every worker; a worker left
alone raises within `timeout_seconds`, when one is given, instead of waiting
forever. On JAX with several processes every process runs every training
step. Reads and saves never are kerasbn collectives, so
`if chief: model.save(...)` returns at once on TensorFlow; on JAX, Keras
3.15's `.keras` saving itself creates a variable (a throwaway optimizer),
which under a multi-process distribution is a cross-process check that waits
for the other processes: the chief saves outside the distribution
(`keras.distribution.set_distribution(None)` around `model.save`, then
restore it).

Where the code lives, each module importing only those below it:
`kerasbn/replicas.py` (TensorFlow) and `kerasbn/sharding.py` (JAX) hold the
per-layer primitives the layer calls (`cross_replica_moments`; `per_device`,
`synchronized_moments`); this module, above the layer, the model-level
handover; `kerasbn/diagnostics.py` the counters that check this table
(`count_cross_replica_calls`, `count_hlo_collectives`).

TensorFlow is imported lazily (`kerasbn.backend.tensorflow`) and JAX only in
`kerasbn/sharding.py`'s functions, so `kerasbn` imports this module on every
backend; off TensorFlow every function here is a no-op.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

from kerasbn.backend import is_tensorflow, tensorflow
from kerasbn.replicas import replica_context
from kerasbn.statistics import batch_norm_layers

# --------------------------------------------------------------- the handover

# One compiled handover per model and strategy, rebuilt when its layers change.
_HANDOVERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def per_replica_statistics(model) -> list:
    """The moving-statistics variables of `model` that each replica keeps its own copy of.

    Every built `kerasbn.BatchNorm` without renorm (nested models included)
    contributes its `moving_mean` and `moving_variance`; renorm's statistics
    are averaged as they are written and need no handover.
    """
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


def sync_moving_statistics(model, strategy=None, timeout_seconds: Optional[float] = None) -> int:
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
    `MultiWorkerMirroredStrategy` a worker that calls it alone waits for the
    others; with `timeout_seconds` it raises a RuntimeError after that long
    instead. The timeout is opt-in because a healthy worker may be late (a
    chief writing a large checkpoint first), and after a timeout TensorFlow's
    collectives of this process stay aborted: the process must restart.

    Args:
        model: A Keras model or layer holding `kerasbn.BatchNorm` layers.
        strategy: The strategy the model's variables were made under; None
            takes it from the variables.
        timeout_seconds: How long a worker waits for the others under
            `MultiWorkerMirroredStrategy`; None (the default) or 0 waits as
            long as they take.

    Returns:
        The number of layers whose copies were averaged (0 where there is
        nothing to do: no multi-replica strategy, or no kerasbn.BatchNorm
        without renorm; always 0 on JAX, where `keras.distribution` keeps
        one replicated copy that every step writes the devices' mean to, and
        on torch, which has no distribution API in Keras).

    Raises:
        ValueError: for a negative `timeout_seconds`, or a model built outside
            the scope of the multi-replica strategy it is synchronized under.
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
    tf = tensorflow()
    owner = _variable_strategy(variables)
    if strategy is None and owner is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()  # the scope the call is made in
    if variables and owner is None and strategy is not None and strategy.num_replicas_in_sync > 1:
        # Each replica would update the one shared variable in turn: a race, not a moving average.
        raise ValueError(
            "`model` was built outside `strategy.scope()`: its moving statistics are plain variables "
            "that every replica of the strategy would write in turn. Build (or load) the model inside "
            f"`with strategy.scope():`. Received: model={getattr(model, 'name', model)!r}, {strategy!r} "
            f"with {strategy.num_replicas_in_sync} replicas"
        )
    strategy = strategy or owner
    if not variables or strategy is None or strategy.num_replicas_in_sync <= 1:
        return 0
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
            "Call it on every worker, at the same point of the loop they all run, not on the chief alone."
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

"""Per-layer JAX primitives under `keras.distribution`: what one `kerasbn.BatchNorm` call asks of the other devices.

Under `keras.distribution.DataParallel` (or a `ModelParallel` whose mesh has
a batch axis) on JAX the batch is one global array sharded along the mesh's
batch axis: `keras.ops` on it compute global statistics, and XLA inserts a
collective for every reduction (the stock layer: 4 all-reduces per layer per
training step). The layer calls these instead, in the training step:

* `data_axis` (is the batch sharded over several devices?), then
* `per_device`, which runs the layer's own batch-statistics code on each
  device's slice of the batch (`jax.shard_map` over the batch axis): with
  `synchronized=False` that code makes no collective, forward or backward;
* inside it, with `synchronized=True`, `synchronized_moments`: the global
  batch's statistics from one all-gather of per-device (count, mean, M2)
  forward and one all-reduce of `[g_mean, g_variance]` backward, per layer.

They sit below the layer and import nothing of kerasbn above `kerasbn.ops`;
`kerasbn/distributed.py` states the contract. JAX is imported on first use, so
the layer imports this module on every backend; elsewhere `data_axis` is None.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple

import keras

from kerasbn import ops as bn_ops


@dataclasses.dataclass(frozen=True)
class DataAxis:
    """The mesh axis `keras.distribution` shards the batch along.

    Attributes:
        mesh: The `jax.sharding.Mesh` of the distribution.
        name: The batch axis' name in that mesh (`batch_dim_name`).
        size: The number of devices along it.
    """

    mesh: object
    name: str
    size: int


def data_axis(batch_size: Optional[int] = None) -> Optional[DataAxis]:
    """The batch axis when `keras.distribution` shards a batch of `batch_size` over several JAX devices, else None.

    None on other backends, without a distribution, with one device along the
    batch axis, and for a batch the device count does not divide (Keras's
    own shape inference traces such batches; real data under `DataParallel`
    always divides).
    """
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    name = getattr(distribution, "batch_dim_name", None)
    if distribution is None or name is None:
        return None
    mesh = distribution.device_mesh.backend_mesh
    size = int(mesh.shape.get(name, 1))
    if size <= 1 or (batch_size is not None and batch_size % size):
        return None
    return DataAxis(mesh, name, size)


def per_device(fn: Callable, axis: DataAxis, batch: Sequence, replicated: Sequence):
    """Runs `fn(*batch, *replicated)` on each device's slice of the batch, without collectives of its own.

    `fn` returns `(outputs, mean, variance, ...)`: the normalized slice and
    the statistics it used, one value per feature (what follows is ignored). The statistics come back
    stacked, one row per device along a new leading axis (sharded like the
    batch), so that nothing needs to travel unless `fn` asks for it (as
    `synchronized_moments` does).

    Args:
        fn: The per-device computation; inside it, `axis.name` names the
            devices for `jax.lax` collectives.
        axis: The batch axis (`data_axis()`).
        batch: Arrays (or None) sharded along their first axis: each device
            sees its own slice.
        replicated: Arrays (or None) every device sees whole (gamma, beta).

    Returns:
        `(outputs, means, variances)`: `outputs` of the global batch's shape,
        `means` and `variances` of shape `(axis.size, features)`.
    """
    import jax
    from jax.sharding import PartitionSpec

    sharded, whole = PartitionSpec(axis.name), PartitionSpec()

    def body(*args):
        outputs, mean, variance = fn(*args)[:3]
        return outputs, jax.numpy.reshape(mean, (1, -1)), jax.numpy.reshape(variance, (1, -1))

    mapped = jax.shard_map(
        body,
        mesh=axis.mesh,
        in_specs=tuple(sharded for _ in batch) + tuple(whole for _ in replicated),
        out_specs=(sharded, sharded, sharded),
        axis_names={axis.name},
    )
    return mapped(*batch, *replicated)


def replica_groups(axis: DataAxis, group_size: Optional[int]) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """Consecutive groups of `group_size` devices along the batch axis (None: one group of all).

    Raises:
        ValueError: where `group_size` does not divide the number of devices.
    """
    if group_size is None or group_size == axis.size:
        return None
    if axis.size % group_size:
        raise ValueError(
            "`sync_group_size` must divide the number of devices along the batch axis "
            f"{axis.name!r} ({axis.size}). Received: sync_group_size={group_size}"
        )
    return tuple(tuple(range(start, start + group_size)) for start in range(0, axis.size, group_size))


def synchronized_moments(x, axes: Sequence[int], mask=None, *, axis_name: str, groups=None):
    """Mean and variance of the global batch (keepdims), from inside `per_device`: one collective each way.

    Each device computes its `(count, mean, M2)` per feature; one all-gather
    brings every device's triple to all and `kerasbn.ops.combine_moments`
    (Chan et al.) combines them exactly, on uneven (masked) counts too. The
    gradient is exact at the cost of one all-reduce of the upstream
    `[g_mean, g_variance]`, summed over devices because every device's loss
    depends on every example through the global statistics:

        dx = (G_mean + 2 G_variance (x - mean)) / N

    at the positions the mask keeps (0 elsewhere). With `groups` (tuples of
    device indices along the axis) the statistics are each group's: the
    collectives run within groups (`axis_index_groups`), the backward one as
    an all-gather and a sum, as `jax.shard_map` implements no grouped psum.

    Args:
        x: This device's slice, in the statistics dtype.
        axes: Axes to reduce.
        mask: Optional Keras mask of rank `rank(x) - 1`.
        axis_name: The batch axis' name (`DataAxis.name`).
        groups: Optional replica groups (`replica_groups`).

    Returns:
        `(mean, variance)` with the reduced axes kept as length 1.
    """
    import jax
    import jax.numpy as jnp

    axes = tuple(axes)
    index_groups = None if groups is None else [list(g) for g in groups]
    masked = mask is not None
    # The mask travels as an argument (0/1 weights) and residual: a custom
    # VJP must not close over the tracers of the enclosing shard_map.
    weights = jnp.zeros((), x.dtype)  # no mask: a placeholder
    if masked:
        weights = jnp.broadcast_to(jnp.expand_dims(mask.astype(x.dtype), -1), x.shape)

    def local_sum(values, weights):
        if masked:
            # Select, not multiply: padding may hold inf or NaN, and 0 * inf is NaN.
            values = jnp.where(weights > 0, values, 0.0)
        return jnp.sum(values, axis=axes, keepdims=True)

    def group_sum(values):
        """Sums `values` over this device's group: one collective."""
        if index_groups is None:
            return jax.lax.psum(values, axis_name)
        return jnp.sum(jax.lax.all_gather(values, axis_name, axis_index_groups=index_groups), axis=0)

    @jax.custom_vjp
    def moments(x, weights):
        return forward(x, weights)[0]

    def forward(x, weights):
        if masked:
            count = local_sum(weights, weights)
        else:
            size = math.prod(x.shape[a] for a in axes)
            count = jnp.full(local_sum(x, weights).shape, size, x.dtype)
        local_mean = local_sum(x, weights) / jnp.maximum(count, 1.0)  # an empty slice: count 0, mean 0
        local_m2 = local_sum(jnp.square(x - local_mean), weights)
        triples = jax.lax.all_gather(jnp.stack([count, local_mean, local_m2]), axis_name, axis_index_groups=index_groups)
        total, mean, m2 = bn_ops.combine_moments(triples[:, 0], triples[:, 1], triples[:, 2])
        safe_total = jnp.maximum(total, 1.0)
        return (mean, m2 / safe_total), (x, weights, mean, safe_total)

    def backward(saved, upstream):
        x, weights, mean, safe_total = saved
        summed = group_sum(jnp.stack(upstream))
        dx = (summed[0] + 2.0 * summed[1] * (x - mean)) / safe_total
        if masked:
            dx = jnp.where(weights > 0, dx, 0.0)
        return dx, jnp.zeros_like(weights)

    moments.defvjp(forward, backward)
    return moments(x, weights)

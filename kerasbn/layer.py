"""`kerasbn.BatchNorm`: the layer's bookkeeping around the math in `kerasbn.ops`.

The layer creates the weights, picks which statistics to normalize with
(batch or moving), and updates the moving averages. The formulas live in
`kerasbn/ops.py`, the choice of path (fused kernel, widened view, generic
math) in `kerasbn/plan.py`; the TensorFlow-only pieces (fused kernel,
cross-replica statistics) in `kerasbn/fused.py` and `kerasbn/replicas.py`,
reached only on the TensorFlow backend.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional, Sequence, Union

import keras
from keras import constraints, initializers, ops, regularizers

from kerasbn import ops as bn_ops
from kerasbn import plan as path_plan
from kerasbn.backend import device_type, is_tensorflow, onednn_enabled, require_tensorflow, tensorflow
from kerasbn.replicas import (
    check_distributed,
    moving_statistics_aggregation,
    replica_context,
    synchronized_fused_batch_norm,
    synchronized_moments,
)
from kerasbn import sharding
from kerasbn.fused import fused_affine_nhwc, fused_batch_norm_training
from kerasbn.plan import FUSED_DTYPES, Plan
from kerasbn.validation import (
    validate_axis,
    validate_epsilon,
    validate_momentum,
    validate_positive_int,
    validate_renorm_clipping,
)


def _clone_initializer(initializer):
    """A fresh copy, so two variables do not share a seeded random stream."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNorm(keras.layers.Layer):
    """Batch normalization: a drop-in for `keras.layers.BatchNormalization`.

    In training mode (`training=True` and `trainable=True`) the layer
    normalizes each feature with the mean and variance of the current batch,
    `y = gamma * (x - mean) / sqrt(variance + epsilon) + beta`, and folds
    those statistics into its moving averages:

        moving = momentum * moving + (1 - momentum) * batch_statistic

    so `momentum` weighs the *old* value, as in Keras (default 0.99, i.e. 1%
    of each new batch). PyTorch's `momentum` weighs the *new* value: PyTorch
    `momentum=0.1` is `momentum=0.9` here. In inference mode (the default, and
    always when `trainable=False`), it normalizes with the moving statistics.

    Beyond the stock layer:

    * **A distribution contract.** Under a `tf.distribute` strategy a
      training step with `synchronized=False` makes no cross-replica call, and
      inference inside a replica makes none either (it reads that replica's
      copy of the moving statistics, so it runs in RNN cells, control flow and
      nested `tf.function`s); `kerasbn.sync_moving_statistics` hands the copies
      over to their cross-replica mean in one collective for the whole model,
      and reads outside replicas never hang a worker. `synchronized=True`
      computes the global batch's statistics (or a group's of
      `sync_group_size` replicas) with one all-reduce forward and one
      backward, exact also when replicas hold different numbers of examples,
      on TensorFlow's fused kernels where the plan takes them. On JAX under
      `keras.distribution` each device normalizes its own slice with no
      collective per layer, or the global batch with one all-gather forward
      and one all-reduce backward (`synchronized=True`).
      `kerasbn/distributed.py` states the contract.
    * **Several feature axes**: `axis` may be a list, e.g. `[1, 3]`.
    * **Ghost batch norm**: `virtual_batch_size` normalizes sub-batches of
      that size independently.
    * **A fused kernel** on the TensorFlow backend for 4-D NHWC/NCHW inputs
      and, viewed as (-1, 1, 1, C), any input normalized over its last axis
      (`fused=None` picks it where it is exact and measured faster; only
      CPUs are measured, other devices get TensorFlow's own choices;
      `kerasbn/plan.py` holds the rule).
    * **A compiled inference path**, `inference_function`: a `tf.function`
      with a fixed input signature that computes the same folded formula as
      `call(training=False)`, and is what a SavedModel of the layer serves.

    Args:
        axis: Integer or list of integers, the feature axis or axes; the
            statistics are computed over all other axes. Default -1.
        momentum: Weight of the old value in the moving averages, in [0, 1).
        epsilon: Positive float added to the variance.
        center: If True, add the learned offset `beta`.
        scale: If True, multiply by the learned scale `gamma`.
        beta_initializer: Initializer of `beta` (zeros).
        gamma_initializer: Initializer of `gamma` (ones).
        moving_mean_initializer: Initializer of the moving mean (zeros).
        moving_variance_initializer: Initializer of the moving variance (ones).
        beta_regularizer: Optional regularizer of `beta`.
        gamma_regularizer: Optional regularizer of `gamma`.
        beta_constraint: Optional constraint on `beta`.
        gamma_constraint: Optional constraint on `gamma`.
        renorm: Use Batch Renormalization (Ioffe, 2017): train with the batch
            statistics corrected towards the moving ones by `(r, d)`.
        renorm_clipping: Dict with optional keys "rmax", "rmin", "dmax"
            clipping `r` to [rmin, rmax] and `d` to [-dmax, dmax].
        renorm_momentum: Momentum of the renorm statistics.
        synchronized: If True, compute batch statistics over the global batch
            of all replicas (TensorFlow `tf.distribute`: one all-reduce
            forward, one backward per layer; JAX under `keras.distribution`:
            one all-gather forward, one all-reduce backward). If False, each
            replica or device uses its own batch statistics, with no
            collective. On TensorFlow not inside control flow under a
            strategy (an RNN cell's loop, a `tf.cond`): the all-reduce raises
            a ValueError there; use False for such layers.
        virtual_batch_size: Optional positive integer; the batch is split into
            sub-batches of this size, each normalized with its own statistics
            (the moving averages take their mean). Must divide the batch.
            Not with `synchronized=True` (a ValueError).
        fused: None (use the fused kernel where exact and measured faster,
            see `kerasbn/plan.py`), True (require it: an error where it cannot run, e.g.
            with a mask) or False (never use it).
        sync_group_size: Optional positive integer, with `synchronized=True`
            only: consecutive replicas (on JAX, devices along the batch axis
            of the distribution's mesh) in groups of this size
            share statistics (replicas 0 to k - 1, k to 2k - 1, ...), as
            PyTorch's `SyncBatchNorm(process_group=...)` and apex's
            `group_size`; at the same 2 cross-replica calls per step. It must
            divide the number of replicas (a ValueError at the first
            training call otherwise). None: all replicas.
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: Tensor of rank at least 2.
        training: Python bool; True normalizes with batch statistics and
            updates the moving averages.
        mask: Optional boolean mask of shape `inputs.shape[:-1]`; masked-out
            positions do not count towards the batch statistics, whatever
            they hold (inf and NaN padding included).

    Example:

    >>> layer = BatchNorm(momentum=0.9)
    >>> y = layer(np.random.rand(8, 4).astype("float32"), training=True)
    >>> tuple(layer.moving_mean.shape)
    (4,)
    """

    def __init__(
        self,
        axis: Union[int, Sequence[int]] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm: bool = False,
        renorm_clipping: Optional[dict] = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        virtual_batch_size: Optional[int] = None,
        fused: Optional[bool] = None,
        sync_group_size: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # `axis` stays as given (an int, like the stock layer's, or a list).
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        self._axis_list = validate_axis(axis)
        self.momentum = validate_momentum("momentum", momentum)
        self.epsilon = validate_epsilon(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        # Checked only with renorm, as keras.layers.BatchNormalization does.
        self.renorm_clipping = validate_renorm_clipping(renorm_clipping) if self.renorm else renorm_clipping
        self.renorm_momentum = validate_momentum("renorm_momentum", renorm_momentum)
        self.synchronized = bool(synchronized)
        self.virtual_batch_size = validate_positive_int("virtual_batch_size", virtual_batch_size, allow_none=True)
        if self.synchronized and self.virtual_batch_size is not None:
            # Ghost batch g of every replica would share statistics: sub-batches of
            # virtual_batch_size x replicas, not of virtual_batch_size, and no
            # common shape where the replicas' slices differ in size.
            raise ValueError(
                "`virtual_batch_size` cannot be combined with `synchronized=True`: ghost batches are "
                "normalized with their own statistics, synchronized ones with the global batch's. "
                f"Received: synchronized=True, virtual_batch_size={virtual_batch_size!r}"
            )
        self.sync_group_size = _validate_sync_group_size(sync_group_size, self.synchronized)
        if fused not in (None, True, False):
            raise ValueError(f"`fused` must be None, True or False. Received: fused={fused!r}")
        if fused:
            require_tensorflow("`fused=True`", received=f"fused={fused!r}")
        self.fused = fused
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self._feature_axes = None  # non-negative, sorted; set in build()
        self._built_shape = None
        self._inference_fn = None
        self.inference_trace_count = 0

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                "`inputs` must have rank >= 2 (a batch axis and a feature axis). "
                f"Received: inputs.shape={input_shape}"
            )
        axes = []
        for axis in self._axis_list:
            if not -rank <= axis < rank:
                # keras.layers.BatchNormalization's wording.
                raise ValueError(
                    f"Axis {axis} is out of bounds for input shape {input_shape}. "
                    f"Received: axis={self.axis!r}"
                )
            axes.append(axis % rank)
        if len(set(axes)) != len(axes):
            raise ValueError(
                "`axis` names the same input axis twice. "
                f"Received: axis={self.axis!r} for inputs of rank {rank}"
            )
        if 0 in axes:
            raise ValueError(
                "`axis` cannot include the batch axis 0: there would be nothing "
                f"to compute batch statistics over. Received: axis={self.axis!r}"
            )
        param_shape = tuple(input_shape[a] for a in sorted(axes))
        if any(size is None for size in param_shape):
            raise ValueError(
                "The feature dimension(s) of the input must be known when the layer "
                f"is built. Received: inputs.shape={input_shape} with axis={self.axis!r}"
            )
        self._feature_axes = tuple(sorted(axes))
        self._built_shape = input_shape
        weight = dict(shape=param_shape, autocast=False)
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                **weight,
            )
        if self.center:
            self.beta = self.add_weight(
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                **weight,
            )
        # Moving statistics under a tf.distribute strategy: per-replica
        # ("on_read") variables, so a training step updates and inference
        # reads each replica's own copy with no cross-replica call; the
        # handover (`kerasbn.sync_moving_statistics`) sets the copies to their
        # mean. kerasbn/distributed.py states the whole contract. Renorm uses
        # its statistics in training, so there every write is averaged
        # ("on_write", one reduction per variable).
        if self.renorm:
            sync, aggregation = "on_write", "mean"
        else:
            sync, aggregation = "on_read", moving_statistics_aggregation()
        self.moving_mean = self._add_statistic(
            "moving_mean", self.moving_mean_initializer, param_shape, sync, aggregation
        )
        self.moving_variance = self._add_statistic(
            "moving_variance", self.moving_variance_initializer, param_shape, sync, aggregation
        )
        stat = dict(trainable=False, aggregation="mean", **weight)
        if self.renorm:
            # As in Keras: renorm tracks standard deviations, initialised to
            # the square root of the variance initializer.
            def stddev_initializer(shape, dtype=None):
                return ops.sqrt(_clone_initializer(self.moving_variance_initializer)(shape, dtype=dtype))

            self.moving_stddev = self.add_weight(
                name="moving_stddev", initializer=stddev_initializer, **stat
            )
            self.renorm_mean = self.add_weight(
                name="renorm_mean",
                initializer=_clone_initializer(self.moving_mean_initializer),
                **stat,
            )
            self.renorm_stddev = self.add_weight(
                name="renorm_stddev", initializer=stddev_initializer, **stat
            )
        # What the shape and arguments rule out is known now; a mask, the
        # dtype and cross-replica statistics only at call time (`_plan`).
        if self.fused and path_plan.fused_layout(
            rank, self._feature_axes, self.renorm, self.virtual_batch_size, self.epsilon
        ) is None:
            raise ValueError(
                "`fused=True` needs inputs normalized over their last axis only (or axis 1 of "
                "4-D NCHW inputs), without renorm or virtual_batch_size, and epsilon >= 1.001e-5. "
                f"Received: fused=True, inputs.shape={input_shape}, axis={self.axis!r}, "
                f"renorm={self.renorm}, virtual_batch_size={self.virtual_batch_size}, epsilon={self.epsilon}"
            )

    def _add_statistic(self, name, initializer, shape, synchronization, aggregation):
        """A non-trainable statistic in the variable dtype, with its tf.distribute synchronization.

        `add_weight` takes no `synchronization`, so the variable is made and
        tracked here, in the same order and name scope as `add_weight` would.
        """
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                initializer=initializer,
                shape=shape,
                dtype=self.variable_dtype,
                trainable=False,
                autocast=False,
                aggregation=aggregation,
                synchronization=synchronization,
                name=name,
            )
        self._track_variable(variable)
        return variable

    def compute_output_shape(self, input_shape):
        return input_shape

    # ------------------------------------------------------------------- call

    def call(self, inputs, training=None, mask=None):
        self._check_inputs(inputs, mask)
        if training and self.trainable:
            return self._train_forward(inputs, mask)
        return self._inference(inputs)

    def _inference(self, inputs):
        """`call(training=False)`: the folded formula with the moving statistics.

        `(a, b) = fold_affine(moving statistics, gamma, beta)`, then `x * a + b`
        on the path `_plan` picks; the compiled `inference_function` runs this
        very method.
        """
        dtype = bn_ops.statistics_dtype(inputs.dtype)
        a, b = bn_ops.fold_affine(
            *(bn_ops.cast_optional(p, dtype) for p in (
                self.moving_mean, self.moving_variance, self.gamma, self.beta
            )),
            epsilon=self.epsilon,
        )
        plan = self._plan(inputs, training=False)
        if plan.path == "fused_affine":
            return ops.cast(fused_affine_nhwc(inputs, a, b), self.compute_dtype)
        x = ops.cast(inputs, dtype)
        if plan.path == "widened":
            wide = ops.reshape(x, (-1, plan.widen * inputs.shape[-1]))
            outputs = bn_ops.apply_affine_widened(wide, a, b)
            return ops.cast(ops.reshape(outputs, ops.shape(inputs)), self.compute_dtype)
        a, b = self._broadcast(len(inputs.shape), a, b, dtype=dtype)
        return ops.cast(bn_ops.apply_affine(x, a, b), self.compute_dtype)

    def _train_forward(self, inputs, mask):
        self._check_batch_size(tuple(inputs.shape))
        plan = self._plan(inputs, training=True, masked=mask is not None)
        dtype = bn_ops.statistics_dtype(inputs.dtype)
        if plan.path == "fused":
            # The kernel takes half-precision inputs as they are (its
            # statistics are float32); integers go in as float32.
            x = inputs if keras.backend.standardize_dtype(inputs.dtype) in FUSED_DTYPES else ops.cast(inputs, dtype)
            if len(inputs.shape) != 4:
                x = ops.reshape(x, (-1, 1, 1, inputs.shape[-1]))
            if self._cross_replica():
                outputs, mean, variance, count = synchronized_fused_batch_norm(
                    x, self.gamma, self.beta, self.epsilon, plan.layout, self.sync_group_size
                )
                return self._finish_training(inputs, outputs, mean, variance, fresh=count[0] > 0)
            # The kernel's sums lose digits for float32 inputs far from zero as any others
            # (kerasbn.ops.deviations): it takes deviations from the first example's values.
            # 16-bit inputs go as they are: the kernel accumulates them in float32, and a
            # 16-bit subtraction would round what it is given.
            pivot = None
            if keras.backend.standardize_dtype(x.dtype) == "float32":
                pivot = bn_ops.first_values(x, (0, 2, 3) if plan.layout == "NCHW" else (0, 1, 2))
                x = x - pivot
            outputs, mean, variance = fused_batch_norm_training(x, self.gamma, self.beta, self.epsilon, plan.layout)
            if pivot is not None:
                mean = ops.reshape(pivot, (-1,)) + mean
            return self._finish_training(inputs, outputs, mean, variance)

        if plan.path == "widened":
            # Few channels: the same statistics and formula on a
            # (rows / k, k * channels) view, which vectorizes (see ops.widen_factor).
            channels = inputs.shape[-1]
            wide = ops.reshape(ops.cast(inputs, dtype), (-1, plan.widen * channels))
            stats = bn_ops.widened_deviations(wide, channels)
            gamma, beta = (bn_ops.cast_optional(p, dtype) for p in (self.gamma, self.beta))
            a, b = bn_ops.fold_affine(stats.mean, stats.variance, gamma, beta, self.epsilon)
            outputs = bn_ops.apply_affine_widened(stats.deviations, a, b)
            return self._finish_training(inputs, outputs, stats.pivot + stats.mean, stats.variance)

        x = ops.cast(inputs, dtype)
        params = [self.gamma, self.beta] + ([self.renorm_mean, self.renorm_stddev] if self.renorm else [None, None])
        devices = sharding.data_axis(inputs.shape[0])
        if devices is None:
            outputs, mean, variance, count = self._normalize_batch(x, mask, *params)
            fresh = None if count is None else ops.all(count > 0)
            return self._finish_training(inputs, outputs, mean, variance, fresh=fresh)
        # JAX under keras.distribution: each device normalizes its own slice of
        # the global batch (kerasbn/sharding.py); the moving averages take the
        # mean of the devices' statistics.
        outputs, means, variances = sharding.per_device(
            functools.partial(self._normalize_batch, devices=devices),
            devices,
            batch=[x, mask],
            replicated=[None if p is None else ops.convert_to_tensor(p) for p in params],
        )
        mean, variance = ops.mean(means, axis=0), ops.mean(variances, axis=0)
        return self._finish_training(inputs, outputs, mean, variance)

    def _normalize_batch(self, x, mask, gamma, beta, renorm_mean, renorm_stddev, devices=None):
        """The generic training path on `x` (the statistics dtype): `(outputs, mean, variance, count)`.

        `count` is None, or for TensorFlow's synchronized statistics the
        group's example count per statistic (see `_finish_training`).

        `devices` (a `kerasbn.sharding.DataAxis`) is set where this runs on one
        device's slice of a global batch (`kerasbn.sharding.per_device`).
        """
        dtype = keras.backend.standardize_dtype(x.dtype)
        rank = len(x.shape)
        axes = bn_ops.reduction_axes(rank, self._feature_axes)
        shift = 0
        if self.virtual_batch_size is not None:
            # (batch, ...) -> (groups, virtual_batch_size, ...): every axis
            # moves one to the right; statistics keep the group axis.
            x, mask = self._split_virtual_batches(x, mask)
            axes = tuple(a + 1 for a in axes)
            rank, shift = rank + 1, 1
        stats, count = self._batch_moments(x, axes, mask, devices)
        mean, variance = stats.pivot + stats.mean, stats.variance
        gamma, beta = self._broadcast(rank, gamma, beta, dtype=dtype, shift=shift)
        if self.renorm:
            renorm_mean, renorm_stddev = self._broadcast(rank, renorm_mean, renorm_stddev, dtype=dtype, shift=shift)
            gamma, beta = bn_ops.renorm_affine(
                mean, variance, renorm_mean, renorm_stddev, gamma, beta, self.epsilon, self.renorm_clipping
            )
        # The deviations from the pivot: the normalized outputs keep their digits too.
        outputs = bn_ops.normalize(stats.deviations, stats.mean, variance, gamma, beta, self.epsilon)
        if shift:
            # The moving averages take the mean over the virtual batches.
            mean = ops.mean(mean, axis=0)
            variance = ops.mean(variance, axis=0)
        return outputs, mean, variance, count

    def _finish_training(self, inputs, outputs, mean, variance, fresh=None):
        """The tail every training path shares: the moving-average update, then the outputs
        in the inputs' shape and the compute dtype.

        `mean` and `variance` hold one value per feature, in any shape of that size.
        `fresh` says whether they are statistics of any example (None: whether
        `inputs` hold one). Synchronized statistics are the group's, whatever
        this slice holds: a boolean tensor, False only where the whole group
        is empty.
        """
        if fresh is None:
            fresh = _has_examples(inputs)
        param_shape = tuple(self.moving_mean.shape)
        self._update_moving_statistics(ops.reshape(mean, param_shape), ops.reshape(variance, param_shape), fresh)
        if tuple(outputs.shape) != tuple(inputs.shape):
            outputs = ops.reshape(outputs, ops.shape(inputs))
        return ops.cast(outputs, self.compute_dtype)

    def _batch_moments(self, x, axes, mask, devices=None):
        """`(stats, count)`: the batch statistics (reduced axes kept) as `kerasbn.ops.deviations`
        from a pivot, and for TensorFlow's synchronized ones the group's example count per
        statistic (see `_finish_training`), else None.

        Across replicas or devices the pivot is 0: the global statistics come
        from one collective of each replica's own (count, mean, M2), and a
        shared pivot would cost another.
        """
        if self.synchronized and devices is not None:
            groups = sharding.replica_groups(devices, self.sync_group_size)
            mean, variance = sharding.synchronized_moments(x, axes, mask, axis_name=devices.name, groups=groups)
            return bn_ops.Deviations(0.0, x, mean, variance), None
        if self.synchronized and is_tensorflow():
            mean, variance, count = synchronized_moments(
                x, axes, mask=mask, keepdims=True, group_size=self.sync_group_size
            )
            return bn_ops.Deviations(0.0, x, mean, variance), count
        return bn_ops.deviations(x, axes, mask), None

    def _split_virtual_batches(self, x, mask):
        size = self.virtual_batch_size
        batch = x.shape[0]
        if batch is not None and batch % size:
            raise ValueError(
                "`virtual_batch_size` must divide the batch size. "
                f"Received: virtual_batch_size={size}, batch size {batch}"
            )
        if batch is None and is_tensorflow():
            tf = tensorflow()
            tf.debugging.assert_equal(
                tf.shape(x)[0] % size,
                0,
                message=f"`virtual_batch_size` must divide the batch size. Received: virtual_batch_size={size}",
            )
        shape = ops.shape(x)
        x = ops.reshape(x, (-1, size) + tuple(shape[1:]))
        if mask is not None:
            mask = ops.reshape(mask, (-1, size) + tuple(ops.shape(mask)[1:]))
        return x, mask

    def _update_moving_statistics(self, mean, variance, fresh=True):
        """Folds batch statistics (of the moving variables' shape) into the moving averages.

        `fresh` is False, or a boolean tensor, for a batch without examples (a
        replica's empty slice of a global batch smaller than the replica
        count). Its statistics are NaN, so each variable is assigned its own
        value instead, selected rather than multiplied away: that replica's
        copy stays as it was, and the mean the replicas read holds the other
        replicas' updates. (With renorm, whose statistics are averaged as they
        are written, every replica still assigns, so the collective matches.)
        """

        check_distributed(self.moving_mean, self.name)

        def update(variable, value, momentum=None):
            if fresh is not True:
                old = ops.cast(variable, value.dtype)
                value = old if fresh is False else ops.where(fresh, value, old)
            self.assign_moving_average(variable, value, momentum=momentum)

        if not self.renorm:
            update(self.moving_mean, mean)
            update(self.moving_variance, variance)
            return
        stddev = ops.sqrt(variance + self.epsilon)
        update(self.renorm_mean, mean, momentum=self.renorm_momentum)
        update(self.renorm_stddev, stddev, momentum=self.renorm_momentum)
        update(self.moving_mean, mean)
        update(self.moving_stddev, stddev)
        moving_stddev = ops.cast(self.moving_stddev, "float32")
        # relu: rounding must not make the variance negative.
        self.moving_variance.assign(ops.relu(moving_stddev * moving_stddev - self.epsilon))

    def assign_moving_average(self, variable, value, momentum=None):
        """Updates `variable <- momentum * variable + (1 - momentum) * value`.

        `momentum` (default: the layer's) weighs the old value, as in Keras:
        0.99 keeps 99% of the running estimate and takes 1% of `value`.
        PyTorch's `momentum` weighs the new value instead (its 0.1 is 0.9 here).

        Inside a replica of a `tf.distribute` strategy this updates that
        replica's own copy of a moving statistic (no cross-device traffic);
        `kerasbn.sync_moving_statistics` later sets every copy to their mean,
        which, the update being linear, is the update with the cross-replica
        mean of `value`. (Renorm statistics are averaged as they are written.)

        Args:
            variable: A moving-statistics variable of this layer.
            value: New observation, of the variable's shape.
            momentum: Optional override (a float or scalar tensor).

        Returns:
            The assigned variable.
        """
        momentum = self.momentum if momentum is None else momentum
        value = ops.cast(value, variable.dtype)
        old = ops.convert_to_tensor(variable)
        variable.assign(old * momentum + value * (1.0 - momentum))
        return variable

    # ---------------------------------------------------- compiled inference

    @property
    def inference_function(self):
        """The compiled inference path (TensorFlow backend).

        A `tf.function` with input signature `[None, *built_shape[1:]]` in the
        layer's compute dtype; it runs `call(training=False)`'s own code (the
        folded affine form `x * a + b`) and traces once per signature
        (`inference_trace_count` counts the traces).
        """
        require_tensorflow("`inference_function`", error=RuntimeError)
        if not self.built:
            raise RuntimeError(f"Layer {self.name!r} must be built before its inference_function is used.")
        if self._inference_fn is None:
            tf = tensorflow()
            spec = tf.TensorSpec((None,) + tuple(self._built_shape[1:]), dtype=self.compute_dtype, name="inputs")

            def traced(x):
                self.inference_trace_count += 1
                return self._inference(x)

            self._inference_fn = tf.function(traced, input_signature=[spec], autograph=False)
        return self._inference_fn

    # ------------------------------------------------------------ validation

    def _check_inputs(self, inputs, mask):
        shape = tuple(inputs.shape)
        if len(shape) != len(self._built_shape):
            raise ValueError(
                f"Layer {self.name!r} was built for inputs of rank {len(self._built_shape)}. "
                f"Received: inputs.shape={shape}"
            )
        for axis in self._feature_axes:
            if shape[axis] is not None and shape[axis] != self._built_shape[axis]:
                raise ValueError(
                    f"Layer {self.name!r} was built for {self._built_shape[axis]} channels on "
                    f"axis {axis}. Received: inputs.shape={shape} ({shape[axis]} channels)"
                )
        if mask is not None and len(mask.shape) != len(shape) - 1:
            # keras.layers.BatchNormalization's wording, with tuples.
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. "
                f"Received: mask.shape={tuple(mask.shape)}, inputs.shape={shape}"
            )

    def _check_batch_size(self, shape):
        """Warns (once per trace) for one value per channel; raises where no batch could have more.

        With one value per channel the batch variance is 0 and the output is
        `beta`. The stock layer computes that without a word, and a batch of
        one arrives in runs that must not stop: the last batch of a dataset
        (JAX traces its concrete shape), a replica's slice of an uneven global
        batch. So this only warns, except for `virtual_batch_size=1` with one
        value per example per channel, which makes every batch degenerate.
        """
        reduced = [shape[a] for a in bn_ops.reduction_axes(len(shape), self._feature_axes)]
        if self.virtual_batch_size == 1 and all(size == 1 for size in reduced[1:]):
            raise ValueError(
                "`virtual_batch_size=1` leaves one value per channel in every sub-batch "
                "(the output would be all zeros, i.e. beta). "
                f"Received: virtual_batch_size=1, inputs.shape={tuple(shape)} with axis={self.axis!r}"
            )
        if self.synchronized and self._cross_replica():
            return  # the statistics are over the global batch, not this slice
        if all(size is not None for size in reduced) and math.prod(reduced) == 1:
            warnings.warn(
                "Training-mode batch normalization received one value per channel: the batch "
                "variance is 0 and the output is beta, as with keras.layers.BatchNormalization. "
                f"Received: inputs.shape={tuple(shape)} with axis={self.axis!r}",
                stacklevel=2,
            )

    def _plan(
        self, inputs, training: bool, masked: bool = False, device: Optional[str] = None, onednn: Optional[bool] = None
    ) -> Plan:
        """The path this call takes: `kerasbn.plan.plan` with what the layer knows.

        Args:
            inputs: The inputs (or a `keras.KerasTensor`/`tf.TensorSpec`: their
                static shape and dtype decide, and on TensorFlow their device).
            training: True for a training-mode call (batch statistics).
            masked: Whether a mask comes with the inputs.
            device: The device type the op runs on ("CPU", "GPU", ...); None
                asks TensorFlow (`kerasbn.backend.device_type`). Tests pin it
                to check a device's rule on any machine.
            onednn: Whether TensorFlow's CPU kernels run on oneDNN; None asks
                TensorFlow (`kerasbn.backend.onednn_enabled`). Tests pin it too.
        """
        if device is None:
            device = device_type(inputs) if is_tensorflow() else "CPU"
        if onednn is None:
            onednn = is_tensorflow() and onednn_enabled()  # the plan reads it for CPUs only
        return path_plan.plan(
            inputs.shape,
            inputs.dtype,
            training=training,
            feature_axes=self._feature_axes,
            fused=self.fused,
            renorm=self.renorm,
            virtual_batch_size=self.virtual_batch_size,
            epsilon=self.epsilon,
            masked=masked,
            cross_replica=training and self._cross_replica(),
            device=device.upper(),
            backend=keras.backend.backend(),
            onednn=onednn,
        )

    def _cross_replica(self) -> bool:
        """Whether this call computes synchronized statistics across several replicas."""
        return self.synchronized and is_tensorflow() and replica_context() is not None

    def _broadcast(self, rank, *params, dtype, shift=0):
        """Casts parameters and reshapes them to broadcast along the feature axes."""
        axes = tuple(a + shift for a in self._feature_axes)
        shape = bn_ops.broadcast_shape(rank, axes, self.moving_mean.shape)
        return tuple(None if p is None else ops.reshape(ops.cast(p, dtype), shape) for p in params)

    # --------------------------------------------------------- serialization

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "synchronized": self.synchronized,
            "virtual_batch_size": self.virtual_batch_size,
            "fused": self.fused,
            "sync_group_size": self.sync_group_size,
        }
        return {**super().get_config(), **config}


def _validate_sync_group_size(size, synchronized: bool) -> Optional[int]:
    """`sync_group_size` as a positive int or None; only with `synchronized=True`."""
    size = validate_positive_int("sync_group_size", size, allow_none=True)
    if size is not None and not synchronized:
        raise ValueError(
            "`sync_group_size` groups the replicas that share synchronized statistics: it needs "
            f"`synchronized=True`. Received: sync_group_size={size}, synchronized=False"
        )
    return size


def _has_examples(inputs):
    """Whether the batch holds any example: a Python bool where the size is static, else a boolean tensor."""
    batch = inputs.shape[0]
    if batch is not None:
        return batch > 0
    return ops.shape(inputs)[0] > 0

"""`kerasbn.Affine`: a constant per-channel `x * scale + offset`.

What a batch normalization becomes in inference when `kerasbn.fold` cannot
merge it into the layer before it (it follows an addition, a concatenation,
an activation, ...): the same folded formula as `BatchNorm(training=False)`,
`kerasbn.ops.apply_affine`, with `(scale, offset) = fold_affine(moving
statistics, gamma, beta, epsilon)` frozen into two non-trainable weights.
"""

from __future__ import annotations

from typing import Sequence, Union

import keras
from keras import ops

from kerasbn import ops as bn_ops
from kerasbn.validation import validate_axis


@keras.saving.register_keras_serializable(package="kerasbn")
class Affine(keras.layers.Layer):
    """`y = x * scale + offset`, with one `scale` and `offset` per feature.

    The weights are not trainable: the layer is a frozen batch normalization.
    For 16-bit inputs (mixed precision) it computes in float32 and casts back,
    as `kerasbn.BatchNorm` does, so a folded model rounds like the original.

    Args:
        axis: Integer or list of integers, the feature axis or axes (as the
            batch normalization it replaces). Default -1.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> layer = Affine(axis=-1)
    >>> layer.build((None, 3))
    >>> layer.set_weights([np.full(3, 2.0), np.ones(3)])
    >>> layer(np.zeros((1, 3), "float32")).tolist()
    [[1.0, 1.0, 1.0]]
    """

    def __init__(self, axis: Union[int, Sequence[int]] = -1, **kwargs):
        super().__init__(**kwargs)
        self._axes = validate_axis(axis)
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        self.supports_masking = True
        self._feature_axes = None

    def build(self, input_shape):
        rank = len(input_shape)
        for axis in self._axes:
            if not -rank <= axis < rank or axis % rank == 0:
                raise ValueError(
                    f"`axis` must name non-batch axes of the input. Received: axis={self.axis!r}, "
                    f"inputs.shape={tuple(input_shape)}"
                )
        self._feature_axes = tuple(sorted(a % rank for a in self._axes))
        shape = tuple(input_shape[a] for a in self._feature_axes)
        if None in shape:
            raise ValueError(
                f"The feature dimension(s) must be known. Received: inputs.shape={tuple(input_shape)}, "
                f"axis={self.axis!r}"
            )
        weight = dict(shape=shape, trainable=False, autocast=False)
        self.scale = self.add_weight(name="scale", initializer="ones", **weight)
        self.offset = self.add_weight(name="offset", initializer="zeros", **weight)

    def call(self, inputs, training=None, mask=None):
        # `training` and `mask` are accepted, and change nothing, so the layer
        # takes the place of a batch norm in a graph that passed them.
        dtype = bn_ops.statistics_dtype(self.compute_dtype)
        shape = bn_ops.broadcast_shape(len(inputs.shape), self._feature_axes, self.scale.shape)
        scale, offset = (ops.reshape(ops.cast(w, dtype), shape) for w in (self.scale, self.offset))
        outputs = bn_ops.apply_affine(ops.cast(inputs, dtype), scale, offset)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}

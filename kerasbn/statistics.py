"""Population statistics after training ("precise BN").

The moving averages a BatchNorm layer keeps during training mix statistics
from many versions of the weights, the oldest weighted least but the recent
ones noisy. Once training is over, the weights are fixed and the statistics
can be estimated exactly: average each layer's batch statistics over many
batches run through the final network.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import keras
from keras import ops

from kerasbn.backend import is_tensorflow, tensorflow
from kerasbn.layer import BatchNorm
from kerasbn.validation import validate_positive_int


def batch_norm_layers(model: keras.layers.Layer) -> List[BatchNorm]:
    """Every `kerasbn.BatchNorm` inside `model`, nested models included, in order."""
    found = [model] if isinstance(model, BatchNorm) else []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, BatchNorm):
            found.append(layer)
    return found


def recompute_statistics(
    model: keras.layers.Layer,
    dataset: Iterable,
    num_batches: Optional[int] = None,
) -> int:
    """Replaces every BatchNorm's moving statistics by their population estimate.

    Runs `num_batches` batches of `dataset` forward through `model` in
    training mode, with every weight frozen (no gradient is taken), and sets
    each `kerasbn.BatchNorm`'s moving mean and variance to the equally
    weighted average of the batch means and variances it saw. That is the
    moving average with momentum `(k - 1) / k` at batch k; each layer's own
    `momentum` is restored afterwards, and no other variable changes. All
    layers are updated in the same forward pass of each batch, so a layer
    sees the outputs of the already-final layers before it.

    A layer with `renorm=True` runs these batches as plain batch norm, so
    its moving variance too is the average of the batch variances; its
    `moving_stddev` is then set to `sqrt(moving_variance + epsilon)` (renorm
    keeps the two in step), and `renorm_mean` and `renorm_stddev` keep their
    values.

    The batches run in cross-replica context: a model built under a
    `tf.distribute` strategy works, each batch whole on one device.

    Args:
        model: A built Keras model (or layer) containing `kerasbn.BatchNorm`s.
        dataset: An iterable of batches: `x`, or tuples `(x, y, ...)` whose
            first element is the model input (a `tf.data.Dataset` works).
        num_batches: How many batches to use; None uses the whole dataset.

    Returns:
        The number of batches used.

    Raises:
        ValueError: for a `num_batches` that is neither a positive integer
            nor None, a model without kerasbn.BatchNorm layers, or an empty
            dataset.
    """
    num_batches = validate_positive_int("num_batches", num_batches, allow_none=True)
    layers = [layer for layer in batch_norm_layers(model) if layer.trainable]
    if not layers:
        raise ValueError(
            "`model` has no trainable kerasbn.BatchNorm layer whose statistics could be recomputed. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    saved_momentum = [layer.momentum for layer in layers]
    # Training-mode calls would also move other layers' state (a stock
    # keras BatchNormalization, say): snapshot it and put it back.
    ours = {id(v) for layer in layers for v in layer.non_trainable_variables}
    others = [v for v in model.non_trainable_variables if id(v) not in ours]
    # A copy, not convert_to_tensor: on the TensorFlow backend that returns
    # the variable itself, which the forward passes would then overwrite.
    others_before = [ops.convert_to_numpy(v) for v in others]
    saved_renorm = [layer.renorm for layer in layers]

    def forward(x, momentum):
        for layer in layers:
            layer.momentum = momentum
        try:
            model(x, training=True)
        finally:
            for layer, value in zip(layers, saved_momentum):
                layer.momentum = value
        return momentum

    if is_tensorflow():
        forward = tensorflow().function(forward, reduce_retracing=True)

    used = 0
    try:
        for layer in layers:
            layer.renorm = False  # read while tracing: the plain batch-norm update
        for batch in dataset:
            if num_batches is not None and used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            used += 1
            # Batch k enters with weight 1/k: a running mean of the statistics.
            forward(x, ops.convert_to_tensor((used - 1) / used, "float32"))
    finally:
        for layer, value, renorm in zip(layers, saved_momentum, saved_renorm):
            layer.momentum = value
            layer.renorm = renorm
        for variable, value in zip(others, others_before):
            variable.assign(value)
    for layer in layers:
        if layer.renorm and used:
            variance = ops.cast(layer.moving_variance, "float32")
            layer.moving_stddev.assign(ops.sqrt(variance + layer.epsilon))
    if used == 0:
        raise ValueError("`dataset` yielded no batch: nothing to recompute the statistics from.")
    return used

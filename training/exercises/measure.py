"""What the exercises measure beyond a run's own report: bias gradients, inference-mode train accuracy, step times."""

from __future__ import annotations

import os
import statistics
import time
from typing import Dict, List, Tuple

from training.config import TrainConfig
from training.runs import load_run_model


# Training examples evaluated in inference mode for the train accuracy of the records.
TRAIN_EVAL_EXAMPLES = 10000


def is_normalization(layer) -> bool:
    """Whether `layer` normalizes its input with statistics (any kind the exercises use)."""
    import keras

    import kerasbn
    from kerasbn.experimental import DecorrelatedBatchNorm

    kinds = (
        kerasbn.BatchNorm, DecorrelatedBatchNorm, keras.layers.BatchNormalization,
        keras.layers.LayerNormalization, keras.layers.GroupNormalization,
    )
    return isinstance(layer, kinds)


def biases_before_norm(model) -> List[Tuple[object, bool]]:
    """(layer, feeds a normalization) for every layer with a bias in a Sequential model."""
    layers = model.layers
    return [
        (layer, index + 1 < len(layers) and is_normalization(layers[index + 1]))
        for index, layer in enumerate(layers)
        if getattr(layer, "bias", None) is not None
    ]


def bias_gradients(model, images, labels) -> List[Dict]:
    """Gradient of the training-mode loss with respect to each bias, against its kernel's.

    Returns one row per conv/dense layer with a bias: its name, whether a
    normalization takes its output (`before_norm`), and the root mean square
    of the gradient of the mean cross-entropy with respect to its bias and
    to its kernel. Batch norm subtracts each channel's batch mean, so a bias
    right before it cancels and its gradient is zero up to rounding. (Layer
    and group norm subtract a mean over several channels: only the mean of
    the biases cancels there.)
    """
    import keras
    import numpy as np
    import tensorflow as tf

    layers = biases_before_norm(model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = [layer.bias for layer, _ in layers] + [layer.kernel for layer, _ in layers]
    # The forward pass in training mode moves the moving statistics: keep them.
    saved = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    gradients = tape.gradient(loss, variables)
    for variable, value in zip(model.non_trainable_variables, saved):
        variable.assign(value)

    def rms(tensor) -> float:
        return float(np.sqrt(np.mean(np.square(np.asarray(tensor, np.float64)))))

    rows = []
    for index, (layer, before_norm) in enumerate(layers):
        rows.append(
            {
                "layer": layer.name,
                "before_norm": before_norm,
                "bias_grad_rms": rms(gradients[index]),
                "kernel_grad_rms": rms(gradients[len(layers) + index]),
            }
        )
    return rows


def measure_biases(config: TrainConfig, run_dir: str) -> Dict:
    """The bias exercise's 'why': gradients reaching each bias at the start and the end, and how far it moved.

    The start is a model built as the run built it (same seed); the end is
    the run's saved model. Both see the run's first training batch.
    """
    import keras
    import numpy as np

    from training import data, models

    keras.utils.set_random_seed(config.seed)
    initial = models.build_lenet(
        config.norm, config.bn_momentum, config.sync_bn,
        norm_places=config.norm_places, bias=config.bias, dropout=config.dropout, affine=config.affine,
    )
    final = load_run_model(run_dir)
    batch = next(iter(data.make_dataset(
        "train", config.batch_size, training=True, data_dir=config.data_dir, limit=config.limit_train,
        seed=config.seed * 1000 + 1, drop_remainder=True,
    )))
    start = bias_gradients(initial, *batch)
    end = bias_gradients(final, *batch)
    layers = {layer.name: layer for layer, _ in biases_before_norm(final)}
    initial_layers = {layer.name: layer for layer, _ in biases_before_norm(initial)}
    rows = []
    for before, after in zip(start, end):
        moved = np.abs(np.asarray(layers[after["layer"]].bias) - np.asarray(initial_layers[after["layer"]].bias))
        rows.append(
            {
                "layer": after["layer"],
                "before_norm": after["before_norm"],
                "bias_grad_rms_start": before["bias_grad_rms"],
                "kernel_grad_rms_start": before["kernel_grad_rms"],
                "bias_grad_rms_end": after["bias_grad_rms"],
                "kernel_grad_rms_end": after["kernel_grad_rms"],
                "bias_max_abs_change": float(moved.max()),
            }
        )
    return {"layers": rows}


def evaluate_saved_model(config: TrainConfig, run_dir: str) -> Tuple[float, int]:
    """Inference-mode accuracy of the run's saved model on the first training examples, and its parameter count.

    The training accuracy a run logs is the running average of training
    mode (dropout on, batch statistics); this one is comparable with the
    test accuracy.
    """
    import keras
    import numpy as np

    from training import data

    model = load_run_model(run_dir)
    limit = min(config.limit_train or TRAIN_EVAL_EXAMPLES, TRAIN_EVAL_EXAMPLES)
    images, labels = data.load_arrays("train", data_dir=config.data_dir, limit=limit)
    correct = 0
    for start in range(0, len(labels), 2000):
        batch = images[start:start + 2000, ..., None].astype("float32") / 255.0
        logits = keras.ops.convert_to_numpy(model(batch, training=False))
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels[start:start + 2000]))
    accuracy = correct / len(labels)
    return accuracy, int(model.count_params())


def step_times(configs: Dict[str, TrainConfig], rounds: int, steps: int, data_dir) -> Dict[str, float]:
    """Milliseconds per training step of each configuration's model, timed interleaved.

    Each configuration trains on one batch of its own `batch_size` (global,
    split across the replicas of the `auto` strategy). Each round times
    `steps` steps of every model in turn, so that load from other processes
    falls on all of them alike; the result is the median over rounds. The
    steps are the training loop's own (`Loop.train_on_batch`).
    """
    import tempfile

    import keras

    from training import data, distribute, models
    from training.loop import Loop

    strategy = distribute.get_strategy("auto")
    loops, batches = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in configs.items():
            dataset = data.make_dataset("train", config.batch_size, training=True, data_dir=data_dir, seed=0)
            batches[name] = next(iter(strategy.experimental_distribute_dataset(dataset)))
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = models.build_lenet(
                    config.norm, config.bn_momentum, config.sync_bn, norm_places=config.norm_places,
                    bias=config.bias, dropout=config.dropout, affine=config.affine,
                    sync_group_size=config.sync_group_size, virtual_batch_size=config.virtual_batch_size,
                )
                optimizer = keras.optimizers.SGD(learning_rate=config.lr)
            loops[name] = Loop(model, optimizer, strategy, os.path.join(scratch, name), config.batch_size, verbose=False)
            for _ in range(3):  # trace and warm up
                loops[name].train_on_batch(batches[name])
        samples: Dict[str, List[float]] = {name: [] for name in loops}
        for _ in range(rounds):
            for name, loop in loops.items():
                began = time.perf_counter()
                for _ in range(steps):
                    loop.train_on_batch(batches[name])
                samples[name].append((time.perf_counter() - began) / steps * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}

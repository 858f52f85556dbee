"""LeNet with batch normalization, as in the source text's experiment.

Conv2D(6, 5) -> BN -> sigmoid -> MaxPool(2) -> Conv2D(16, 5) -> BN -> sigmoid
-> MaxPool(2) -> Flatten -> Dense(120) -> BN -> sigmoid -> Dense(84) -> BN
-> sigmoid -> Dense(10) logits, for 28x28x1 inputs in [0, 1].
"""

from __future__ import annotations

import keras

import kerasbn

NORMS = ("kerasbn", "keras", "none")


def _norm_layer(norm: str, momentum: float, synchronized: bool, name: str):
    if norm == "kerasbn":
        return kerasbn.BatchNorm(momentum=momentum, synchronized=synchronized, name=name)
    if norm == "keras":
        return keras.layers.BatchNormalization(momentum=momentum, synchronized=synchronized, name=name)
    return None


def build_lenet(norm: str = "kerasbn", bn_momentum: float = 0.9, sync_bn: bool = False) -> keras.Model:
    """Builds LeNet-BN (10 logits) for (28, 28, 1) float32 images.

    Args:
        norm: "kerasbn" (kerasbn.BatchNorm), "keras" (keras.layers.BatchNormalization)
            or "none" (plain LeNet).
        bn_momentum: Momentum of every BN layer, Keras convention (weight of
            the old value). 0.9 as in the source text; the layer's own default
            is Keras's 0.99.
        sync_bn: Global-batch statistics across replicas (synchronized=True).

    Build it inside `strategy.scope()` to distribute it.
    """
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}. Received: norm={norm!r}")
    blocks = [
        keras.layers.Conv2D(6, 5, name="conv1"), "bn1", "sigmoid", keras.layers.MaxPooling2D(2, 2, name="pool1"),
        keras.layers.Conv2D(16, 5, name="conv2"), "bn2", "sigmoid", keras.layers.MaxPooling2D(2, 2, name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(120, name="dense1"), "bn3", "sigmoid",
        keras.layers.Dense(84, name="dense2"), "bn4", "sigmoid",
        keras.layers.Dense(10, name="logits"),
    ]
    layers = []
    for block in blocks:
        if block == "sigmoid":
            layers.append(keras.layers.Activation("sigmoid"))
        elif isinstance(block, str):
            bn = _norm_layer(norm, bn_momentum, sync_bn, block)
            if bn is not None:
                layers.append(bn)
        else:
            layers.append(block)
    return keras.Sequential([keras.Input((28, 28, 1), name="images")] + layers, name=f"lenet_{norm}")

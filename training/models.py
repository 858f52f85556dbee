"""LeNet with batch normalization, as in the source text's experiment, and its variants.

Conv2D(6, 5) -> BN -> sigmoid -> MaxPool(2) -> Conv2D(16, 5) -> BN -> sigmoid
-> MaxPool(2) -> Flatten -> Dense(120) -> BN -> sigmoid -> Dense(84) -> BN
-> sigmoid -> Dense(10) logits, for 28x28x1 inputs in [0, 1].

The variants the source chapter's exercises ask about (`training.exercises`)
are arguments of the same builder: which normalization, in which of the four
places, biases before it or not, dropout after the hidden dense layers, and
a learned or a fixed (gamma = 1, beta = 0) affine transform.
"""

from __future__ import annotations

from typing import Optional

import keras

import kerasbn
from kerasbn.experimental import DecorrelatedBatchNorm

# kerasbn.BatchNorm, keras.layers.BatchNormalization, no normalization, and
# the other normalizations the exercises compare in the same places.
NORMS = ("kerasbn", "keras", "none", "layer", "group", "decorrelated")
BATCH_NORMS = ("kerasbn", "keras", "decorrelated")
# The four places a normalization can go: after conv1, conv2, dense1, dense2.
NORM_PLACES = {
    "all": ("bn1", "bn2", "bn3", "bn4"),
    "conv": ("bn1", "bn2"),
    "dense": ("bn3", "bn4"),
    "first": ("bn1",),
}
# Output channels of the layer before each place (GroupNormalization needs them).
_CHANNELS = {"bn1": 6, "bn2": 16, "bn3": 120, "bn4": 84}


def _groups(channels: int) -> int:
    """The largest of 4, 3, 2 groups that divides `channels` (6 -> 3, 16, 84 and 120 -> 4)."""
    return next(groups for groups in (4, 3, 2) if channels % groups == 0)


def _norm_layer(norm: str, momentum: float, synchronized: bool, affine: bool, name: str, **kerasbn_only):
    is_conv = name in ("bn1", "bn2")
    if norm == "kerasbn":
        return kerasbn.BatchNorm(
            momentum=momentum, synchronized=synchronized, center=affine, scale=affine, name=name, **kerasbn_only
        )
    if norm == "keras":
        return keras.layers.BatchNormalization(
            momentum=momentum, synchronized=synchronized, center=affine, scale=affine, name=name
        )
    if norm == "layer":
        # Per example over every feature of the layer: (H, W, C) after a convolution.
        axis = (-3, -2, -1) if is_conv else -1
        return keras.layers.LayerNormalization(axis=axis, center=affine, scale=affine, name=name)
    if norm == "group":
        return keras.layers.GroupNormalization(_groups(_CHANNELS[name]), center=affine, scale=affine, name=name)
    if norm == "decorrelated":
        return DecorrelatedBatchNorm(momentum=momentum, center=affine, scale=affine, name=name)
    return None


def build_lenet(
    norm: str = "kerasbn",
    bn_momentum: float = 0.9,
    sync_bn: bool = False,
    *,
    norm_places: str = "all",
    bias: bool = True,
    dropout: float = 0.0,
    affine: bool = True,
    sync_group_size: Optional[int] = None,
    virtual_batch_size: Optional[int] = None,
) -> keras.Model:
    """Builds LeNet-BN (10 logits) for (28, 28, 1) float32 images.

    Args:
        norm: "kerasbn" (kerasbn.BatchNorm), "keras" (keras.layers.BatchNormalization),
            "none" (plain LeNet), "layer" (keras.layers.LayerNormalization, over
            (H, W, C) after a convolution), "group" (keras.layers.GroupNormalization,
            3 or 4 groups) or "decorrelated" (kerasbn.experimental.DecorrelatedBatchNorm).
        bn_momentum: Momentum of every BN layer, Keras convention (weight of
            the old value). 0.9 as in the source text; the layer's own default
            is Keras's 0.99.
        sync_bn: Global-batch statistics across replicas (synchronized=True).
        norm_places: Where the normalization goes: "all" four places, the
            "conv" layers, the "dense" hidden layers, or the "first" conv only.
        bias: False drops the bias of each conv/dense layer that a
            normalization follows (its beta does the same job).
        dropout: Rate of a Dropout after each hidden dense layer's sigmoid (0 = none).
        affine: False fixes gamma = 1 and beta = 0 (`center=False, scale=False`).
        sync_group_size: With `sync_bn`, synchronize within groups of this
            many consecutive replicas (kerasbn only; None: all replicas).
        virtual_batch_size: Ghost batch norm: statistics over sub-batches of
            this many examples of each replica's batch (kerasbn only).

    Build it inside `strategy.scope()` to distribute it.
    """
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}. Received: norm={norm!r}")
    if norm_places not in NORM_PLACES:
        raise ValueError(f"`norm_places` must be one of {tuple(NORM_PLACES)}. Received: norm_places={norm_places!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    # Passed only when set, so the builder works with a layer that lacks an argument.
    kerasbn_only = {
        key: value
        for key, value in (("sync_group_size", sync_group_size), ("virtual_batch_size", virtual_batch_size))
        if value is not None
    }
    if kerasbn_only and norm != "kerasbn":
        raise ValueError(f"`{next(iter(kerasbn_only))}` needs norm='kerasbn'. Received: norm={norm!r}")
    places = NORM_PLACES[norm_places] if norm != "none" else ()

    def biased(place: str) -> bool:
        return bias or place not in places

    blocks = [
        keras.layers.Conv2D(6, 5, use_bias=biased("bn1"), name="conv1"), "bn1", "sigmoid",
        keras.layers.MaxPooling2D(2, 2, name="pool1"),
        keras.layers.Conv2D(16, 5, use_bias=biased("bn2"), name="conv2"), "bn2", "sigmoid",
        keras.layers.MaxPooling2D(2, 2, name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(120, use_bias=biased("bn3"), name="dense1"), "bn3", "sigmoid", "dropout1",
        keras.layers.Dense(84, use_bias=biased("bn4"), name="dense2"), "bn4", "sigmoid", "dropout2",
        keras.layers.Dense(10, name="logits"),
    ]
    layers = []
    for block in blocks:
        if block == "sigmoid":
            layers.append(keras.layers.Activation("sigmoid"))
        elif isinstance(block, str) and block.startswith("dropout"):
            if dropout:
                layers.append(keras.layers.Dropout(dropout, name=block))
        elif isinstance(block, str):
            if block in places:
                layers.append(_norm_layer(norm, bn_momentum, sync_bn, affine, block, **kerasbn_only))
        else:
            layers.append(block)
    return keras.Sequential([keras.Input((28, 28, 1), name="images")] + layers, name=f"lenet_{norm}")

"""The batch-norm implementations the layer suite puts side by side.

Each is built for one `Case` (shape, layout, mode, jit) as a compiled step of
fixed inputs: `train_step` is the forward pass in training mode, the backward
pass for the input, gamma and beta (from a fixed upstream gradient, so no loss
is timed) and the moving-average update; `inference` the forward pass with the
moving statistics. All use momentum 0.9 and epsilon 1e-3: they compute the
same function, only how they compute it differs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Tuple

import keras
import tensorflow as tf

import kerasbn
from bench.scratch import ScratchBatchNorm

MOMENTUM = 0.9
EPSILON = 1e-3

MODES = ("train_step", "inference")


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration every implementation is timed on: the `shape` as the issue names it, channels last
    ((N, H, W, C) or (N, C)), the `layout` ("NHWC", "NCHW" or "NC"), the `mode` and `jit_compile`."""

    shape: Tuple[int, ...]
    layout: str
    mode: str
    jit: bool

    @property
    def tensor_shape(self) -> Tuple[int, ...]:
        """The input tensor's actual shape: channels moved to axis 1 for NCHW."""
        shape = tuple(self.shape)
        return (shape[0], shape[3], *shape[1:3]) if self.layout == "NCHW" else shape

    @property
    def axis(self) -> int:
        return 1 if self.layout == "NCHW" else -1


def _compiled_step(case: Case, forward: Callable, trainable: Callable[[], list]):
    """Wraps `forward(x, training)` into the case's mode as a `tf.function(x, upstream)`; `trainable()` gives the
    gamma and beta variables to differentiate."""
    if case.mode == "train_step":

        def step(x, upstream):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = forward(x, True)
            # output_gradients: the upstream gradient arrives as it would from
            # the next layer, and nothing but the batch norm is differentiated.
            return tape.gradient(y, [x, *trainable()], output_gradients=upstream)

    else:

        def step(x, upstream):
            del upstream
            return forward(x, False)

    return tf.function(step, jit_compile=case.jit)


def _layer(make: Callable[..., keras.layers.Layer]):
    """The builder of a Keras layer's step: `make(axis=..., momentum=..., epsilon=...)` gives the layer."""

    def build(case: Case):
        layer = make(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON)
        layer.build(case.tensor_shape)
        return _compiled_step(case, lambda x, training: layer(x, training=training), lambda: [layer.gamma, layer.beta])

    return build


def _tf_fused_kernel(case: Case):
    """FusedBatchNormV3 with nothing around it; 2-D inputs viewed as (N, 1, 1, C).

    In training mode the kernel updates the running statistics itself
    (`exponential_avg_factor`): the least work TensorFlow offers for a step.
    """
    channels = case.shape[-1]
    gamma, beta = tf.Variable(tf.ones([channels])), tf.Variable(tf.zeros([channels]))
    moving_mean, moving_variance = tf.Variable(tf.zeros([channels])), tf.Variable(tf.ones([channels]))
    data_format = "NCHW" if case.layout == "NCHW" else "NHWC"

    def forward(x, training):
        x4 = tf.reshape(x, [-1, 1, 1, channels]) if case.layout == "NC" else x
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x4, gamma, beta, mean=moving_mean, variance=moving_variance, epsilon=EPSILON, data_format=data_format,
            is_training=training, exponential_avg_factor=1.0 - MOMENTUM if training else 1.0,
        )  # fmt: skip
        if training:
            moving_mean.assign(mean)
            moving_variance.assign(variance)
        return tf.reshape(y, tf.shape(x)) if case.layout == "NC" else y

    return _compiled_step(case, forward, lambda: [gamma, beta])


# name -> (one line for the report, builder), in the order of the report's columns.
IMPLEMENTATIONS: Dict[str, Tuple[str, Callable[[Case], Callable]]] = {
    "kerasbn": ("kerasbn.BatchNorm(fused=None): picks the fused kernel where exact",
                _layer(functools.partial(kerasbn.BatchNorm, fused=None))),
    "kerasbn_fused": ("kerasbn.BatchNorm(fused=True): fused kernel required",
                      _layer(functools.partial(kerasbn.BatchNorm, fused=True))),
    "kerasbn_generic": ("kerasbn.BatchNorm(fused=False): keras.ops moments and folded x*a+b",
                        _layer(functools.partial(kerasbn.BatchNorm, fused=False))),
    "keras": ("keras.layers.BatchNormalization: the stock layer (the reference, ratio 1)",
              _layer(keras.layers.BatchNormalization)),
    "scratch": ("from-scratch layer as in the source text: tf.reduce_mean moments, variable.assign",
                _layer(ScratchBatchNorm)),
    "tf_fused_kernel": ("tf.compat.v1.nn.fused_batch_norm called directly (moving averages in the kernel)",
                        _tf_fused_kernel),
}  # fmt: skip


def build_step(name: str, case: Case) -> Callable[[tf.Tensor, tf.Tensor], object]:
    """The compiled step of implementation `name` for `case`; call it as `step(x, upstream)`.

    Raises a ValueError (or a TensorFlow error) where the implementation cannot handle the case (e.g.
    `fused=True` on a 2-D input): the suite records it as skipped, with the message.
    """
    if name not in IMPLEMENTATIONS:
        raise KeyError(f"Unknown implementation {name!r}; known: {list(IMPLEMENTATIONS)}. Received: name={name!r}")
    return IMPLEMENTATIONS[name][1](case)

"""The batch-norm implementations the layer suite puts side by side.

Each is built for one `Case` (shape, layout, mode, jit) and returns a
zero-argument callable running one compiled step on fixed inputs:

* `train_step`: forward in training mode, the backward pass for the input
  and for gamma and beta (given a fixed upstream gradient, so no loss
  computation is timed), and the moving-average update.
* `inference`: forward with the moving statistics.

Every implementation uses momentum 0.9 and epsilon 1e-3, so they compute
the same function; only how they compute it differs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import keras
import tensorflow as tf

import kerasbn
from bench.scratch import ScratchBatchNorm

MOMENTUM = 0.9
EPSILON = 1e-3

# name -> one line for the report, in the order of the report's columns.
IMPLEMENTATIONS: Dict[str, str] = {
    "kerasbn": "kerasbn.BatchNorm(fused=None): picks the fused kernel where exact",
    "kerasbn_fused": "kerasbn.BatchNorm(fused=True): fused kernel required",
    "kerasbn_generic": "kerasbn.BatchNorm(fused=False): keras.ops moments and folded x*a+b",
    "keras": "keras.layers.BatchNormalization: the stock layer (the reference, ratio 1)",
    "scratch": "from-scratch layer as in the source text: tf.reduce_mean moments, variable.assign",
    "tf_fused_kernel": "tf.compat.v1.nn.fused_batch_norm called directly (moving averages in the kernel)",
}

MODES = ("train_step", "inference")


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration every implementation is timed on.

    Attributes:
        shape: The shape as the issue names it, channels last: (N, H, W, C) or (N, C).
        layout: "NHWC", "NCHW" (channels on axis 1) or "NC" (2-D).
        mode: "train_step" or "inference".
        jit: Whether the `tf.function` uses `jit_compile=True` (XLA).
    """

    shape: Tuple[int, ...]
    layout: str
    mode: str
    jit: bool

    @property
    def tensor_shape(self) -> Tuple[int, ...]:
        """The input tensor's actual shape: channels moved to axis 1 for NCHW."""
        if self.layout == "NCHW":
            n, h, w, c = self.shape
            return (n, c, h, w)
        return tuple(self.shape)

    @property
    def axis(self) -> int:
        return 1 if self.layout == "NCHW" else -1

    @property
    def channels(self) -> int:
        return self.shape[-1]


def _compiled_step(
    case: Case, forward: Callable, trainable: Callable[[], list]
) -> Callable[[tf.Tensor, tf.Tensor], object]:
    """Wraps `forward(x, training)` into the case's mode as a `tf.function`.

    `trainable()` returns the gamma and beta variables to differentiate.
    """
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


def _keras_layer_step(case: Case, layer: keras.layers.Layer):
    layer.build(case.tensor_shape)
    return _compiled_step(case, lambda x, training: layer(x, training=training), lambda: [layer.gamma, layer.beta])


def _kerasbn(fused):
    def build(case: Case):
        return _keras_layer_step(
            case, kerasbn.BatchNorm(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON, fused=fused)
        )

    return build


def _keras(case: Case):
    return _keras_layer_step(case, keras.layers.BatchNormalization(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON))


def _scratch(case: Case):
    return _keras_layer_step(case, ScratchBatchNorm(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON))


def _tf_fused_kernel(case: Case):
    """FusedBatchNormV3 with nothing around it; 2-D inputs viewed as (N, 1, 1, C).

    In training mode the kernel updates the running statistics itself
    (`exponential_avg_factor`), the least work TensorFlow offers for a
    training step.
    """
    channels = case.channels
    gamma = tf.Variable(tf.ones([channels]), name="gamma")
    beta = tf.Variable(tf.zeros([channels]), name="beta")
    moving_mean = tf.Variable(tf.zeros([channels]), trainable=False, name="moving_mean")
    moving_variance = tf.Variable(tf.ones([channels]), trainable=False, name="moving_variance")
    data_format = "NCHW" if case.layout == "NCHW" else "NHWC"

    def forward(x, training):
        x4 = tf.reshape(x, [-1, 1, 1, channels]) if case.layout == "NC" else x
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x4,
            gamma,
            beta,
            mean=moving_mean,
            variance=moving_variance,
            epsilon=EPSILON,
            data_format=data_format,
            is_training=training,
            exponential_avg_factor=1.0 - MOMENTUM if training else 1.0,
        )
        if training:
            moving_mean.assign(mean)
            moving_variance.assign(variance)
        return tf.reshape(y, tf.shape(x)) if case.layout == "NC" else y

    return _compiled_step(case, forward, lambda: [gamma, beta])


BUILDERS: Dict[str, Callable[[Case], Callable]] = {
    "kerasbn": _kerasbn(None),
    "kerasbn_fused": _kerasbn(True),
    "kerasbn_generic": _kerasbn(False),
    "keras": _keras,
    "scratch": _scratch,
    "tf_fused_kernel": _tf_fused_kernel,
}
assert tuple(BUILDERS) == tuple(IMPLEMENTATIONS)


def build_step(name: str, case: Case) -> Callable[[tf.Tensor, tf.Tensor], object]:
    """The compiled step of implementation `name` for `case`; call it as `step(x, upstream)`.

    Raises:
        KeyError: for an unknown implementation name.
        ValueError (or a TensorFlow error): where the implementation cannot
            handle the case (e.g. `fused=True` on a 2-D input); the suite
            records those as skipped with the message.
    """
    if name not in BUILDERS:
        raise KeyError(f"Unknown implementation {name!r}; known: {list(BUILDERS)}. Received: name={name!r}")
    return BUILDERS[name](case)

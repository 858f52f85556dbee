"""A from-scratch batch norm, the way a reader of the source text first writes one: the benchmark's baseline.

The text's TensorFlow version computes the batch moments with `tf.reduce_mean`,
keeps moving averages by assigning to the variables, and normalizes with a
separate function. This is that design in Keras 3, with an `axis` argument so
that it also runs on NCHW inputs. It is not part of the `kerasbn` package.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def scratch_batch_norm(x, gamma, beta, mean, variance, epsilon):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta`, as one multiply-add per element."""
    scale = tf.math.rsqrt(variance + epsilon) * gamma
    return x * scale + (beta - mean * scale)


class ScratchBatchNorm(keras.layers.Layer):
    """Batch normalization over every axis but `axis` (-1 for NHWC and dense inputs, 1 for NCHW), in TensorFlow ops.

    Training mode normalizes with the batch mean and (biased) variance and
    updates `moving = momentum * moving + (1 - momentum) * batch_value`.
    """

    def __init__(self, axis: int = -1, momentum: float = 0.9, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon

    def build(self, input_shape):
        rank = len(input_shape)
        self._feature_axis = self.axis % rank
        self._reduce_axes = [a for a in range(rank) if a != self._feature_axis]
        # Parameters broadcast against the input: (1, C, 1, 1) for NCHW.
        self._param_shape = [1] * rank
        self._param_shape[self._feature_axis] = input_shape[self._feature_axis]
        channels = (input_shape[self._feature_axis],)
        self.gamma = self.add_weight(name="gamma", shape=channels, initializer="ones")
        self.beta = self.add_weight(name="beta", shape=channels, initializer="zeros")
        self.moving_mean = self.add_weight(name="moving_mean", shape=channels, initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight(name="moving_variance", shape=channels, initializer="ones",
                                               trainable=False)  # fmt: skip

    def assign_moving_average(self, variable, value):
        variable.assign(variable * self.momentum + value * (1.0 - self.momentum))

    def call(self, inputs, training=False):
        if training:
            mean = tf.reduce_mean(inputs, self._reduce_axes, keepdims=True)
            deviation = tf.math.squared_difference(inputs, tf.stop_gradient(mean))
            variance = tf.reduce_mean(deviation, self._reduce_axes, keepdims=True)
            self.assign_moving_average(self.moving_mean, tf.reshape(mean, [-1]))
            self.assign_moving_average(self.moving_variance, tf.reshape(variance, [-1]))
        else:
            mean, variance = (tf.reshape(v, self._param_shape) for v in (self.moving_mean, self.moving_variance))
        gamma, beta = (tf.reshape(v, self._param_shape) for v in (self.gamma, self.beta))
        return scratch_batch_norm(inputs, gamma, beta, mean, variance, self.epsilon)

"""A recurrent cell holding a `kerasbn.BatchNorm`, for tests/_dist_worker.py.

Its own module so that the worker imports Keras (and TensorFlow) only after
it has split the CPU into logical devices.
"""

import keras

import kerasbn


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class NormalizedCell(keras.layers.Layer):
    """`h' = tanh(BatchNorm(Dense([x, h])))`: inference normalizes inside the RNN's while loop."""

    def __init__(self, units, synchronized=False, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.synchronized = synchronized
        self.state_size = units
        self.dense = keras.layers.Dense(units)
        self.norm = kerasbn.BatchNorm(synchronized=synchronized)

    def build(self, input_shape):
        self.dense.build((input_shape[0], input_shape[-1] + self.units))
        self.norm.build((input_shape[0], self.units))

    def call(self, inputs, states, training=None):
        hidden = self.dense(keras.ops.concatenate([inputs, states[0]], axis=-1))
        hidden = keras.ops.tanh(self.norm(hidden, training=training))
        return hidden, [hidden]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "synchronized": self.synchronized}

"""Helpers shared by the single-device layer tests (tests/test_layer_*.py)."""

import numpy as np
import pytest
from conftest import BACKEND, to_numpy

import keras

STATS = ("moving_mean", "moving_variance")
TF_INSTALL = "(`pip install 'kerasbn[tensorflow]'`, KERAS_BACKEND=tensorflow). "
RENORM_STATS = STATS + ("moving_stddev", "renorm_mean", "renorm_stddev")

# (shape, axis): ranks 2 to 5, channels on the last axis and on axis 1.
RANK_AXIS_CASES = [
    ((6, 3), -1),
    ((6, 3), 1),
    ((4, 3, 5), -1),
    ((4, 5, 3), 1),
    ((3, 4, 2, 5), -1),
    ((3, 5, 4, 2), 1),
    ((2, 3, 2, 2, 4), -1),
    ((2, 4, 3, 2, 2), 1),
]
MULTI_AXIS_CASES = [
    ((4, 3, 2, 5), [1, 3]),
    ((4, 3, 5), [1, 2]),
    ((2, 3, 2, 2, 4), [-1, 1]),
    ((4, 3, 2, 5), [3, 1]),
]


# ----------------------------------------------------------------- helpers


def sample(rng, shape, loc=0.0, scale=1.0):
    """Random float32 inputs whose features have different means and spreads."""
    offsets = rng.uniform(-1.0, 1.0, size=shape[1:])
    spread = rng.uniform(0.5, 1.5, size=shape[1:])
    return (loc + offsets + scale * spread * rng.normal(size=shape)).astype("float32")


def build(layer, shape):
    layer.build(shape)
    return layer


def randomize_weights(rng, *layers, moving=True):
    """Draws gamma, beta (and the moving statistics) once and assigns them to every layer."""
    shape = tuple(layers[0].moving_mean.shape)
    values = {
        "gamma": rng.uniform(0.5, 1.5, size=shape),
        "beta": rng.normal(size=shape),
    }
    if moving:
        values["moving_mean"] = 0.5 * rng.normal(size=shape)
        values["moving_variance"] = rng.uniform(0.5, 2.0, size=shape)
    for layer in layers:
        for name, value in values.items():
            variable = getattr(layer, name)
            if variable is not None:
                variable.assign(value.astype("float32"))
    return {name: value.astype("float32") for name, value in values.items()}


def value(layer, name):
    return to_numpy(getattr(layer, name))


def assert_stats_close(ours, reference, names=STATS, **tolerance):
    for name in names:
        np.testing.assert_allclose(value(ours, name), value(reference, name), err_msg=name, **tolerance)


def layer_gradients(layer, x, upstream, mask=None):
    """Gradients of `sum(upstream * layer(x, training=True))` w.r.t. (x, gamma, beta), as NumPy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
        grads = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, inputs):
            outputs, _ = layer.stateless_call(trainable, non_trainable, inputs, training=True, mask=mask)
            return jnp.sum(outputs.astype("float32") * upstream)

        grad_trainable, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, jnp.asarray(x))
        by_name = dict(zip([v.name for v in layer.trainable_variables], grad_trainable))
        grads = [grad_x, by_name["gamma"], by_name["beta"]]
    else:
        pytest.skip(f"no gradient helper for backend {BACKEND!r}")
    return [to_numpy(g) for g in grads]


MASK_CASES = [((4, 5, 3), -1), ((3, 4, 2, 5), -1), ((4, 3, 5), 1)]


def random_mask(rng, shape):
    mask = rng.random(shape[:-1]) < 0.6
    mask.flat[0] = mask.flat[-1] = True
    return mask


def traced_op_types(layer, x, mask=None):
    import tensorflow as tf

    specs = [tf.TensorSpec(x.shape, tf.as_dtype(x.dtype))]
    if mask is None:
        function = tf.function(lambda t: layer(t, training=True))
    else:
        specs.append(tf.TensorSpec(mask.shape, tf.bool))
        function = tf.function(lambda t, m: layer(t, training=True, mask=m))
    graph = function.get_concrete_function(*specs).graph
    return {op.type for op in graph.get_operations()}


FUSED_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}


def plan_of(layer, shape, dtype, training, masked=False, device=None, onednn=None):
    """The layer's path plan for inputs of this static shape and dtype (device, onednn None: this machine's)."""
    tensor = keras.KerasTensor(shape, dtype=dtype)
    return layer._plan(tensor, training=training, masked=masked, device=device, onednn=onednn)

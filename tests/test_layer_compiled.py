"""TensorFlow-only: XLA training steps and the compiled inference function (`inference_function`)."""

import re

import numpy as np
import pytest
from conftest import BACKEND, tf_only, to_numpy
from _layer_helpers import TF_INSTALL, assert_stats_close, build, randomize_weights, sample

import keras
from keras import ops

from kerasbn import BatchNorm


# ------------------------------------------------------- TensorFlow: XLA


XLA_CASES = [
    ((3, 4, 2, 5), {"axis": -1}),
    ((3, 5, 4, 2), {"axis": 1}),
    ((4, 3, 5), {"axis": -1}),
    ((4, 3, 2, 5), {"axis": [1, 3]}),
    ((8, 3), {"virtual_batch_size": 4}),
    ((8, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}}),
]


@tf_only
@pytest.mark.parametrize("shape, kwargs", XLA_CASES)
def test_xla_training_step_matches_non_xla(rng, shape, kwargs):
    import tensorflow as tf

    xla_layer = build(BatchNorm(momentum=0.8, **kwargs), shape)
    plain_layer = build(BatchNorm(momentum=0.8, **kwargs), shape)
    randomize_weights(rng, xla_layer, plain_layer, moving=not kwargs.get("renorm"))
    xla_step = tf.function(lambda t: xla_layer(t, training=True), jit_compile=True)
    plain_step = tf.function(lambda t: plain_layer(t, training=True), jit_compile=False)
    for step in range(3):
        x = tf.constant(sample(rng, shape, loc=step - 1.0, scale=1.0 + step))
        np.testing.assert_allclose(to_numpy(xla_step(x)), to_numpy(plain_step(x)), rtol=1e-5, atol=1e-5)
    names = [v.name for v in plain_layer.non_trainable_variables]
    assert_stats_close(xla_layer, plain_layer, names=names, rtol=1e-5, atol=1e-5)
    # It really was compiled by XLA (this raises for graphs XLA cannot compile).
    assert "HloModule" in xla_step.experimental_get_compiler_ir(x)(stage="hlo")
    x = tf.constant(sample(rng, shape))
    xla_inference = tf.function(lambda t: xla_layer(t, training=False), jit_compile=True)
    np.testing.assert_allclose(to_numpy(xla_inference(x)), to_numpy(plain_layer(x, training=False)), rtol=1e-5, atol=1e-5)


# ------------------------------------- TensorFlow: the compiled inference path


def _trained_layer(rng, shape, axis):
    layer = build(BatchNorm(axis=axis, momentum=0.5), shape)
    randomize_weights(rng, layer)
    for step in range(2):
        layer(sample(rng, shape, loc=step, scale=2.0), training=True)
    return layer


@tf_only
@pytest.mark.parametrize("shape, axis", [((6, 3), -1), ((3, 5, 4, 2), 1), ((4, 3, 2, 5), [1, 3])])
def test_inference_function_equals_call_and_traces_once(rng, shape, axis):
    layer = _trained_layer(rng, shape, axis)
    function = layer.inference_function
    assert layer.inference_function is function
    for batch in (1, 3, 7):
        x = sample(rng, (batch,) + shape[1:], loc=1.0)
        np.testing.assert_allclose(to_numpy(function(x)), to_numpy(layer(x, training=False)), rtol=1e-5, atol=1e-6)
    assert layer.inference_trace_count == 1
    # It reads the variables, not a snapshot taken at trace time.
    layer(sample(rng, shape, loc=-2.0, scale=3.0), training=True)
    x = sample(rng, (2,) + shape[1:])
    np.testing.assert_allclose(to_numpy(function(x)), to_numpy(layer(x, training=False)), rtol=1e-5, atol=1e-6)
    assert layer.inference_trace_count == 1


@tf_only
@pytest.mark.parametrize("dtype_policy", ["mixed_float16"], indirect=True)
def test_inference_function_under_mixed_precision(rng, dtype_policy):
    shape = (4, 3, 3, 2)
    layer = _trained_layer(rng, shape, -1)
    x = sample(rng, (3,) + shape[1:])
    half = ops.cast(x, "float16")
    y = layer.inference_function(half)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    np.testing.assert_array_equal(to_numpy(y), to_numpy(layer(half, training=False)))
    assert layer.inference_trace_count == 1


@tf_only
def test_inference_function_saved_model_round_trip(rng, tmp_path):
    import tensorflow as tf

    shape = (3, 4, 2, 5)
    layer = _trained_layer(rng, shape, -1)
    module = tf.Module()
    module.layer = layer
    module.serve = layer.inference_function
    path = str(tmp_path / "saved_model")
    tf.saved_model.save(module, path, signatures={"serving_default": layer.inference_function})
    reloaded = tf.saved_model.load(path)
    for batch in (1, 4):
        x = sample(rng, (batch,) + shape[1:], loc=0.5)
        expected = to_numpy(layer(x, training=False))
        np.testing.assert_allclose(reloaded.serve(x).numpy(), expected, rtol=1e-5, atol=1e-6)
        served = reloaded.signatures["serving_default"](inputs=tf.constant(x))
        np.testing.assert_allclose(next(iter(served.values())).numpy(), expected, rtol=1e-5, atol=1e-6)


@tf_only
def test_inference_function_needs_a_built_layer():
    with pytest.raises(RuntimeError, match=re.escape("Layer 'unbuilt_bn' must be built before its inference_function is used.")):
        BatchNorm(name="unbuilt_bn").inference_function


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the error on non-TensorFlow backends")
def test_inference_function_needs_tensorflow():
    layer = build(BatchNorm(), (None, 3))
    with pytest.raises(
        RuntimeError,
        match=re.escape(f"`inference_function` needs the TensorFlow backend {TF_INSTALL}Received: backend {BACKEND!r}"),
    ):
        layer.inference_function

"""The path plan (TensorFlow): where the fused kernel, the widened view and the generic path run, and why.

Each path is checked against float64 NumPy or the generic path; the plan
itself against literal expectations per device (`kerasbn/plan.py` holds the
measurements behind them).
"""

import re

import numpy as np
import pytest
from conftest import np_batch_norm, np_batch_norm_grads, np_batch_norm_train, tf_only, to_numpy
from _procs import run_python
from _layer_helpers import (
    FUSED_OPS,
    assert_stats_close,
    build,
    layer_gradients,
    plan_of,
    random_mask,
    randomize_weights,
    sample,
    traced_op_types,
    value,
)

from kerasbn import BatchNorm


# ----------------------------------------------------- TensorFlow: fused


@tf_only
@pytest.mark.parametrize(
    "shape, kwargs, dtype, masked, on_cpu, on_gpu",
    [
        ((2, 3, 3, 4), {}, "float32", False, True, True),
        ((2, 4, 3, 3), {"axis": 1}, "float32", False, True, True),
        ((2, 3, 3, 4), {"fused": True}, "float32", False, True, True),
        ((2, 3, 3, 4), {"epsilon": 1.001e-5}, "float32", False, True, True),
        ((2, 3, 3, 4), {"fused": False}, "float32", False, False, False),
        ((2, 4, 3, 3), {"axis": 1, "fused": False}, "float32", False, False, False),
        ((2, 3, 3, 4), {"epsilon": 1e-5}, "float32", False, False, False),
        ((2, 3, 3, 4), {"epsilon": 1e-6}, "float32", False, False, False),
        ((2, 3, 3, 4), {}, "float64", False, False, False),
        ((2, 3, 3, 4), {}, "float32", True, False, False),
        ((2, 3, 3, 4), {"renorm": True}, "float32", False, False, False),
        ((2, 3, 3, 4), {"virtual_batch_size": 1}, "float32", False, False, False),
        ((2, 3, 3, 4), {"axis": 2}, "float32", False, False, False),
        ((2, 3, 3, 4), {"axis": [1, 3]}, "float32", False, False, False),
        # Other ranks normalized over the last axis only can go in as (-1, 1, 1, channels);
        # fused=None does so where that was faster on CPU (>= 100,000 elements), on a GPU only on request.
        ((6, 3), {"fused": True}, "float32", False, True, True),
        ((2, 3, 4), {"fused": True}, "float32", False, True, True),
        ((2, 3, 2, 2, 4), {"fused": True}, "float32", False, True, True),
        ((6, 3), {}, "float32", False, False, False),
        ((2, 3, 2, 2, 4), {}, "float32", False, False, False),
        ((1024, 120), {}, "float32", False, True, False),
        # 4-D NHWC on CPU: fused where the channel count is a multiple of 4; on a GPU at any count.
        ((2, 3, 3, 6), {}, "float32", False, False, True),
        ((2, 3, 3, 6), {"fused": True}, "float32", False, True, True),
        ((2, 6, 3, 3), {"axis": 1}, "float32", False, True, True),  # NCHW: the kernel was faster at any count
        ((2, 3, 4), {"axis": 1}, "float32", False, False, False),
        ((2, 3, 2, 2, 4), {"axis": 1}, "float32", False, False, False),
        # Without a strategy, synchronized statistics are local ones: fused is exact.
        ((2, 3, 3, 4), {"synchronized": True}, "float32", False, True, True),
    ],
)
def test_fused_is_used_exactly_where_exact(rng, shape, kwargs, dtype, masked, on_cpu, on_gpu):
    layer = build(BatchNorm(dtype=dtype, **kwargs), shape)
    # The CPU rule (oneDNN on, TensorFlow's default on AVX-512 CPUs), pinned, so the expectation holds on
    # any machine; without oneDNN the NCHW kernel is not taken (the plan's figures), the rest is the same.
    plan = plan_of(layer, shape, dtype, training=True, masked=masked, device="CPU", onednn=True)
    assert (plan.path == "fused") == on_cpu, plan
    plain = plan_of(layer, shape, dtype, training=True, masked=masked, device="CPU", onednn=False)
    nchw_by_choice = len(shape) == 4 and kwargs.get("axis") == 1 and kwargs.get("fused") is None
    assert (plain.path == "fused") == (on_cpu and not nchw_by_choice), plain
    # On a GPU the rule takes the fused kernel where TensorFlow's own layer did
    # (4-D inputs the kernel can take), and anything else only on request.
    gpu_plan = plan_of(layer, shape, dtype, training=True, masked=masked, device="GPU")
    assert (gpu_plan.path == "fused") == on_gpu, gpu_plan
    assert gpu_plan.path != "widened"
    # The traced graph runs the plan this machine gets.
    x = rng.normal(size=shape).astype(dtype)
    mask = random_mask(rng, shape) if masked else None
    ops_seen = traced_op_types(layer, x, mask)
    here = plan_of(layer, shape, dtype, training=True, masked=masked)
    assert bool(ops_seen & FUSED_OPS) == (here.path == "fused"), sorted(t for t in ops_seen if "Batch" in t or "Mean" in t)


@tf_only
@pytest.mark.parametrize(
    "shape, axis",
    [((3, 4, 3, 5), -1), ((3, 4, 3, 5), 3), ((3, 5, 4, 3), 1), ((6, 3), -1), ((4, 3, 5), -1), ((2, 3, 2, 2, 4), -1)],
)
def test_fused_true_false_none_agree(rng, shape, axis):
    layers = {fused: build(BatchNorm(axis=axis, momentum=0.8, fused=fused), shape) for fused in (True, False, None)}
    randomize_weights(rng, *layers.values())
    for step in range(3):
        x = sample(rng, shape, loc=step - 1.0, scale=1.0 + step)
        outputs = {fused: to_numpy(layer(x, training=True)) for fused, layer in layers.items()}
        for fused in (True, None):
            np.testing.assert_allclose(outputs[fused], outputs[False], rtol=1e-5, atol=1e-5, err_msg=f"fused={fused}")
    for fused in (True, None):
        assert_stats_close(layers[fused], layers[False], rtol=1e-5, atol=1e-5)
    x = sample(rng, shape, loc=0.5)
    for fused in (True, None):
        np.testing.assert_allclose(
            to_numpy(layers[fused](x, training=False)), to_numpy(layers[False](x, training=False)), atol=1e-5
        )
    # Gradients through the fused kernel equal those of the generic path.
    upstream = rng.normal(size=shape).astype("float32")
    reference = layer_gradients(layers[False], x, upstream)
    for fused in (True, None):
        for name, got, want in zip(("inputs", "gamma", "beta"), layer_gradients(layers[fused], x, upstream), reference):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"fused={fused} d/d{name}")


@tf_only
@pytest.mark.parametrize("epsilon", [1e-5, 1e-6])
def test_small_epsilon_is_exact(rng, epsilon):
    """Below 1.001e-5 (cuDNN's historical minimum) the layer avoids the fused kernel; the result is exact."""
    shape = (4, 3, 3, 2)
    # A variance of about 1e-6, so that epsilon matters (a clamp to 1.001e-5 would show at rtol 1e-5).
    x = (1e-3 * rng.normal(size=shape)).astype("float32")
    layer = build(BatchNorm(epsilon=epsilon, center=False, scale=False, momentum=0.0), shape)
    expected, mean, variance = np_batch_norm_train(x, np.ones(2), np.zeros(2), epsilon, -1)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(value(layer, "moving_variance"), variance, rtol=1e-5)
    clamped = np_batch_norm(x, mean, variance, np.ones(2), np.zeros(2), 1.001e-5, -1)
    assert not np.allclose(clamped, expected, rtol=1e-5, atol=1e-7)


@tf_only
@pytest.mark.parametrize(
    "kwargs, shape, received",
    [
        (
            {"axis": 1},
            (2, 3, 4),
            "inputs.shape=(2, 3, 4), axis=1, renorm=False, virtual_batch_size=None, epsilon=0.001",
        ),
        (
            {"axis": [1, 3]},
            (2, 3, 3, 4),
            "inputs.shape=(2, 3, 3, 4), axis=[1, 3], renorm=False, virtual_batch_size=None, "
            "epsilon=0.001",
        ),
        (
            {"epsilon": 1e-5},
            (2, 3, 3, 4),
            "inputs.shape=(2, 3, 3, 4), axis=-1, renorm=False, virtual_batch_size=None, "
            "epsilon=1e-05",
        ),
        (
            {"renorm": True},
            (2, 3, 3, 4),
            "inputs.shape=(2, 3, 3, 4), axis=-1, renorm=True, virtual_batch_size=None, "
            "epsilon=0.001",
        ),
        (
            {"virtual_batch_size": 2},
            (4, 3),
            "inputs.shape=(4, 3), axis=-1, renorm=False, virtual_batch_size=2, epsilon=0.001",
        ),
    ],
)
def test_error_for_impossible_fused_true(kwargs, shape, received):
    with pytest.raises(ValueError, match=re.escape("`fused=True` needs") + ".*" + re.escape("Received: fused=True, " + received)):
        BatchNorm(fused=True, **kwargs).build(shape)


@tf_only
@pytest.mark.parametrize(
    "dtype, masked, blocker",
    [("float32", True, "a mask"), ("float64", False, "float64 inputs")],
)
def test_fused_true_raises_where_the_kernel_cannot_run(rng, dtype, masked, blocker):
    shape = (4, 3, 3, 4)
    layer = build(BatchNorm(fused=True, dtype=dtype), shape)
    x = rng.normal(size=shape).astype(dtype)
    mask = random_mask(rng, shape) if masked else None
    with pytest.raises(
        ValueError,
        match=re.escape(f"`fused=True` cannot take the fused kernel here: {blocker}. Use fused=None to let the layer choose. ")
        + ".*"
        + re.escape(f"Received: fused=True, inputs.shape={shape}, dtype={dtype}"),
    ):
        layer(x, training=True, mask=mask)
    layer(x, training=False, mask=mask)  # inference needs no batch statistics


@tf_only
@pytest.mark.parametrize(
    "shape, kwargs, dtype, fused_expected",
    [
        ((2, 3, 3, 16), {}, "float32", True),
        ((2, 3, 3, 32), {}, "float16", True),
        ((2, 3, 3, 16), {"fused": False}, "float32", False),
        ((2, 3, 3, 15), {}, "float32", False),  # below FUSED_INFERENCE_MIN_CHANNELS
        ((2, 16, 3, 3), {"axis": 1}, "float32", False),  # NCHW: the kernel was slower than x * a + b
        ((4, 16), {}, "float32", False),
        ((2, 3, 3, 16), {}, "float64", False),
    ],
)
def test_inference_applies_the_affine_map_with_the_fused_kernel_where_faster(rng, shape, kwargs, dtype, fused_expected):
    import tensorflow as tf

    layer = build(BatchNorm(dtype=dtype, **kwargs), shape)
    randomize_weights(rng, layer)
    plan = plan_of(layer, shape, dtype, training=False, device="CPU")  # the CPU rule, pinned
    assert (plan.path == "fused_affine") == fused_expected, plan
    # Measured on CPUs only: a GPU gets x * a + b as it is.
    assert plan_of(layer, shape, dtype, training=False, device="GPU").path == "generic"
    graph = layer.inference_function.get_concrete_function().graph
    here = plan_of(layer, shape, dtype, training=False)
    assert bool({op.type for op in graph.get_operations()} & FUSED_OPS) == (here.path == "fused_affine")
    x = sample(rng, shape, loc=0.5, scale=2.0).astype(dtype)
    mean, variance, gamma, beta = (value(layer, n) for n in ("moving_mean", "moving_variance", "gamma", "beta"))
    axis = kwargs.get("axis", -1)
    expected = np_batch_norm(x.astype("float64"), mean, variance, gamma, beta, layer.epsilon, axis)
    tolerance = 1e-2 if dtype == "float16" else 1e-5
    got = to_numpy(layer(x, training=False))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(to_numpy(layer.inference_function(tf.constant(x))), got)


@tf_only
@pytest.mark.parametrize(
    "shape, kwargs, widened",
    [
        ((4, 6, 6, 6), {}, True),  # LeNet's first BN: 6 channels, k = 8
        ((4, 6, 6, 6), {"fused": False}, True),
        ((4, 4, 2), {}, True),
        ((3, 5, 2), {}, False),  # no k > 1 divides the 15 rows
        ((4, 6, 6, 16), {"fused": False}, False),  # 16 channels fill the registers already
        ((4, 6, 6, 6), {"fused": True}, False),
        ((4, 6, 6, 6), {"axis": 2}, False),
        ((5, 3), {}, False),  # 2-D: k must divide the (unknown at inference) batch
    ],
)
def test_few_channels_run_on_a_widened_view_with_the_same_numbers(rng, shape, kwargs, widened):
    """(rows, C) viewed as (rows / k, k * C): same statistics, outputs, gradients and moving averages."""
    import tensorflow as tf

    layer = build(BatchNorm(momentum=0.7, **kwargs), shape)
    randomize_weights(rng, layer)
    assert (plan_of(layer, shape, "float32", training=True, device="CPU").path == "widened") == widened
    assert plan_of(layer, shape, "float32", training=True, device="GPU").path != "widened"
    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(tf.TensorSpec(shape)).graph
    here = plan_of(layer, shape, "float32", training=True)
    assert ("Tile" in {op.type for op in graph.get_operations()}) == (here.path == "widened")
    axis = kwargs.get("axis", -1)
    gamma, beta = value(layer, "gamma"), value(layer, "beta")
    mean0, variance0 = value(layer, "moving_mean"), value(layer, "moving_variance")
    x = sample(rng, shape, loc=1.5, scale=2.0)
    expected, mean, variance = np_batch_norm_train(x.astype("float64"), gamma, beta, layer.epsilon, axis)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value(layer, "moving_mean"), 0.7 * mean0 + 0.3 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value(layer, "moving_variance"), 0.7 * variance0 + 0.3 * variance, rtol=1e-5, atol=1e-6)
    upstream = rng.normal(size=shape)
    want = np_batch_norm_grads(x.astype("float64"), upstream, gamma, layer.epsilon, axis)
    got = layer_gradients(layer, x, upstream.astype("float32"))
    for name, g, w in zip(("inputs", "gamma", "beta"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
    inference = np_batch_norm(
        x.astype("float64"), *(value(layer, n) for n in ("moving_mean", "moving_variance")), gamma, beta, layer.epsilon, axis
    )
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), inference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.inference_function(tf.constant(x))), inference, rtol=1e-5, atol=1e-5)


@tf_only
@pytest.mark.parametrize(
    "shape, path",
    [
        # LeNet's dense layers, as `fit` traces them without drop_remainder: the
        # widened view needs a static batch, and the fused kernel measured ~1.9x
        # slower than the generic path there (kerasbn/plan.py).
        ((None, 120), "generic"),
        ((None, 84), "generic"),
        ((None, 1000), "fused"),  # TYPICAL_BATCH x 1000 >= FUSED_MIN_ELEMENTS
        ((None, None, 64), "fused"),  # an unknown length: as before, unmeasured
        ((None, 6, 6, 6), "widened"),  # k divides the 36 positions of every example
    ],
)
def test_an_unknown_batch_is_planned_as_a_typical_one(shape, path):
    import tensorflow as tf

    from kerasbn.plan import FUSED_MIN_ELEMENTS, TYPICAL_BATCH

    assert TYPICAL_BATCH * 120 < FUSED_MIN_ELEMENTS <= TYPICAL_BATCH * 1000
    layer = build(BatchNorm(), shape)
    assert plan_of(layer, shape, "float32", training=True, device="CPU").path == path
    if None not in shape[1:]:
        known = (TYPICAL_BATCH,) + shape[1:]
        assert plan_of(layer, known, "float32", training=True, device="CPU").path in (path, "widened")
    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(tf.TensorSpec(shape)).graph
    here = plan_of(layer, shape, "float32", training=True)
    assert bool({op.type for op in graph.get_operations()} & FUSED_OPS) == (here.path == "fused")


@tf_only
@pytest.mark.parametrize("device, fused", [("/GPU:0", True), ("/CPU:0", False)])
def test_the_plan_follows_the_device_the_op_is_placed_on(device, fused):
    """Traced (not run) under a device scope: a GPU placement gets the GPU rule on any machine."""
    import tensorflow as tf

    from kerasbn.backend import device_type, has_gpu

    # 6 channels NHWC: widened on a CPU, the fused kernel on a GPU (as TensorFlow's own layer).
    layer = build(BatchNorm(), (8, 4, 4, 6))

    def step(x):
        with tf.device(device):
            return layer(x, training=True), layer(x, training=False)

    graph = tf.function(step).get_concrete_function(tf.TensorSpec((8, 4, 4, 6))).graph
    types = {op.type for op in graph.get_operations()}
    assert bool(types & FUSED_OPS) == fused
    assert ("Tile" in types) == (not fused)  # the widened view, CPU only (inference too)

    def placed(x):
        with tf.device(device):
            y = tf.identity(x)
        return device_type(y)  # no scope here: the device the input was placed on decides

    kinds = []
    tf.function(lambda x: kinds.append(placed(x)) or x).get_concrete_function(tf.TensorSpec((2,)))
    assert kinds == [device[1:4]]
    with tf.device(device):
        # Eagerly, where TensorFlow really puts the op: soft placement runs a
        # GPU scope's ops on the CPU of a machine without a GPU.
        assert device_type() == ("GPU" if device == "/GPU:0" and has_gpu() else "CPU")


@pytest.mark.parametrize(
    "device, shape, training, path",
    [
        ("CPU", (256, 24, 24, 6), True, "widened"),
        ("GPU", (256, 24, 24, 6), True, "fused"),
        ("TPU", (256, 24, 24, 6), True, "fused"),  # any device but the CPU: TensorFlow's own rule
        ("CPU", (1024, 120), True, "fused"),
        ("GPU", (1024, 120), True, "generic"),
        ("CPU", (256, 24, 24, 16), False, "fused_affine"),
        ("GPU", (256, 24, 24, 16), False, "generic"),
        ("GPU", (256, 24, 24, 6), False, "generic"),
    ],
)
def test_the_plan_is_a_pure_function_of_what_the_layer_knows(device, shape, training, path):
    """`kerasbn.plan.plan` runs on any backend: no tensor, no TensorFlow."""
    from kerasbn.plan import plan

    got = plan(shape, "float32", training=training, feature_axes=(len(shape) - 1,), device=device)
    assert got.path == path, got
    assert got.reason
    assert plan(shape, "float32", training=training, feature_axes=(len(shape) - 1,), backend="jax").path == "generic"
    with pytest.raises(ValueError, match=re.escape("`fused=True` cannot take the fused kernel here: a mask.")):
        plan(shape, "float32", training=True, feature_axes=(len(shape) - 1,), fused=True, masked=True)


@tf_only
@pytest.mark.parametrize("onednn, nchw_path", [("0", "generic"), ("1", "fused")])
def test_the_nchw_rule_follows_onednn(onednn, nchw_path):
    # TF_ENABLE_ONEDNN_OPTS is read once, when TensorFlow starts: a fresh process each.
    code = """
        import keras, kerasbn
        from kerasbn.backend import onednn_enabled
        layer = kerasbn.BatchNorm(axis=1)
        layer.build((8, 6, 5, 5))
        plan = layer._plan(keras.KerasTensor((8, 6, 5, 5)), training=True, device="CPU")
        print(onednn_enabled(), plan.path, plan.reason)
    """
    printed = run_python(code, env={"TF_ENABLE_ONEDNN_OPTS": onednn, "KERAS_BACKEND": "tensorflow"}).stdout.split()
    assert printed[:2] == [str(onednn == "1"), nchw_path], printed

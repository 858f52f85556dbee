"""kerasbn.convert and kerasbn.fold on real networks and on small graphs that hit each rule.

Every check compares the transformed model with the original on the same
inputs: convert there and back must give the identical weights and outputs,
fold must leave no batch-norm layer, fold exactly the pairs that can be folded
and match the original's inference outputs.

Tolerances: folding multiplies the kernel by `a` in float64 and rounds once to
float32, so the folded network computes the same sums in another order.
Measured on the networks below (random weights, batch-norm statistics of unit
scale): the largest difference relative to the largest output was 1.3e-6
(ResNet50V2) to 2.5e-6 (EfficientNetB0); RTOL = 1e-5 of the output scale keeps
a 4x margin.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

import keras

import kerasbn
from kerasbn.transforms import is_batch_norm
from _procs import REPO_ROOT, run_python
from conftest import BACKEND, tf_only, to_numpy

FOLD_RTOL = 1e-5  # of the largest |output|; see the module docstring
SAVE_TOL = 1e-6  # a reloaded model computes the same ops on the same weights


def _randomize_batch_norms(model, rng):
    """Statistics and affine parameters of unit scale, different per channel."""
    for layer in model._flatten_layers():
        if is_batch_norm(layer):
            shape = layer.moving_mean.shape
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.2, shape))
            layer.moving_mean.assign(rng.normal(0.0, 0.2, shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))


def _randomize(model, rng):
    """Every weight random (biases too, so folding into an existing bias is exercised)."""
    for weight in model.weights:
        weight.assign(rng.normal(0.0, 0.3, weight.shape).astype(weight.dtype))
    _randomize_batch_norms(model, rng)


def _batch_norms(model):
    return [layer for layer in model._flatten_layers() if is_batch_norm(layer)]


def _assert_close_to_scale(actual, expected, rtol=FOLD_RTOL):
    actual, expected = to_numpy(actual), to_numpy(expected)
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def assert_round_trips(model, x, tmp_path, export=False, safe_mode=True):
    """`model` saves to `.keras` and loads back with the same layer classes and outputs.

    With `export` (TensorFlow only) it also exports a SavedModel
    (`format="tf_saved_model"`) and serves `x` through it. Returns the
    loaded model.
    """

    def assert_same_outputs(actual, expected):
        actual, expected = keras.tree.flatten(actual), keras.tree.flatten(expected)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            np.testing.assert_allclose(to_numpy(a), to_numpy(e), rtol=SAVE_TOL, atol=SAVE_TOL)

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    expected = model(x, training=False)
    model.save(folder / "model.keras")
    loaded = keras.models.load_model(folder / "model.keras", safe_mode=safe_mode)
    assert [type(layer) for layer in loaded._flatten_layers()] == [type(layer) for layer in model._flatten_layers()]
    assert_same_outputs(loaded(x, training=False), expected)
    if export and BACKEND == "tensorflow":
        import tensorflow as tf

        model.export(str(folder / "saved"), format="tf_saved_model", verbose=False)
        # Held in a name: the served function needs the loaded object's variables alive.
        saved = tf.saved_model.load(str(folder / "saved"))
        # Against the model's own graph: under mixed_bfloat16 TensorFlow's graph mode rounds
        # otherwise than eager (measured 8e-3 on a stock model), and a SavedModel is a graph.
        graph = tf.function(lambda t: model(t, training=False))(tf.constant(x))
        assert_same_outputs(saved.serve(tf.constant(x)), graph)
    return loaded


def _assert_same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------ keras.applications


APPLICATIONS = {
    # name: (constructor kwargs, has dropout, rule for the batch norms that cannot fold)
    "MobileNetV2": (dict(alpha=0.35), False, lambda name: False),  # depthwise convs; every BN folds
    "ResNet50V2": ({}, False, lambda name: name.endswith("preact_bn") or name == "post_bn"),  # pre-activation
    "DenseNet121": ({}, False, lambda name: name.endswith("_0_bn") or name in ("bn", "pool2_bn", "pool3_bn", "pool4_bn")),  # BN after concatenation
    "EfficientNetB0": ({}, True, lambda name: False),  # dropout, squeeze-and-excitation
}


@pytest.fixture(scope="module")
def application_models():
    cache = {}

    def get(name):
        if name not in cache:
            kwargs, _, _ = APPLICATIONS[name]
            model = getattr(keras.applications, name)(
                weights=None, input_shape=(32, 32, 3), classes=5, classifier_activation=None, **kwargs
            )
            _randomize_batch_norms(model, np.random.default_rng(len(name)))
            cache[name] = model
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_applications_convert_there_and_back(name, application_models, rng, tmp_path):
    model = application_models(name)
    _, has_dropout, _ = APPLICATIONS[name]
    x = rng.normal(0.0, 1.0, (4, 32, 32, 3)).astype("float32")
    expected = to_numpy(model(x, training=False))

    fast = kerasbn.convert(model, to="kerasbn")
    stock_norms = _batch_norms(model)
    ours = _batch_norms(fast)
    assert len(ours) == len(stock_norms) > 10
    assert all(isinstance(layer, kerasbn.BatchNorm) for layer in ours)
    assert [layer.name for layer in ours] == [layer.name for layer in stock_norms]
    assert [layer.name for layer in fast.layers] == [layer.name for layer in model.layers]
    for ours_bn, stock_bn in zip(ours, stock_norms):
        assert (ours_bn.momentum, ours_bn.epsilon, ours_bn.axis) == (stock_bn.momentum, stock_bn.epsilon, stock_bn.axis)
    _assert_same_weights(fast, model)
    _assert_close_to_scale(fast(x, training=False), expected)  # x * a + b against (x - mean) * rsqrt(...)
    assert_round_trips(fast, x, tmp_path)

    back = kerasbn.convert(fast, to="keras")
    assert all(type(layer) is keras.layers.BatchNormalization for layer in _batch_norms(back))
    _assert_same_weights(back, model)
    np.testing.assert_array_equal(to_numpy(back(x, training=False)), expected)
    assert_round_trips(back, x, tmp_path)

    if not has_dropout:
        # Training mode: the fused kernel and Keras's ops round differently.
        stock_copy = kerasbn.convert(fast, to="keras")
        # Batch statistics of 4 examples, through 50 layers: measured up to 2.7e-4 of the scale.
        _assert_close_to_scale(fast(x, training=True), stock_copy(x, training=True), rtol=1e-3)
        for ours_bn, stock_bn in zip(_batch_norms(fast), _batch_norms(stock_copy)):
            np.testing.assert_allclose(
                to_numpy(ours_bn.moving_variance), to_numpy(stock_bn.moving_variance), rtol=1e-3, atol=1e-4
            )
    # The input model is untouched.
    np.testing.assert_array_equal(to_numpy(model(x, training=False)), expected)


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_applications_fold(name, application_models, rng, tmp_path):
    model = application_models(name)
    _, _, stays_affine = APPLICATIONS[name]
    x = rng.normal(0.0, 1.0, (4, 32, 32, 3)).astype("float32")
    folded = kerasbn.fold(kerasbn.convert(model))
    assert _batch_norms(folded) == []
    report = folded.fold_report
    names = [layer.name for layer in _batch_norms(model)]
    assert sorted(report.affine) == sorted(n for n in names if stays_affine(n))
    assert sorted(bn for _, bn in report.folded) == sorted(n for n in names if not stays_affine(n))
    for producer, _ in report.folded:
        assert type(model.get_layer(producer)).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense")
    _assert_close_to_scale(folded(x, training=False), model(x, training=False))
    assert_round_trips(folded, x, tmp_path, export=name == "MobileNetV2")


# ------------------------------------------------------------ small graphs


def _fold_and_compare(model, rng, x, expected_folded, expected_affine, tmp_path, **round_trip):
    """Folds `model` (randomized), checks the report and the outputs, and that the result saves and loads."""
    _randomize(model, rng)
    folded = kerasbn.fold(model)
    assert _batch_norms(folded) == []
    assert sorted(folded.fold_report.folded) == sorted(tuple(pair) for pair in expected_folded)
    assert sorted(folded.fold_report.affine) == sorted(expected_affine)
    _assert_close_to_scale(folded(x, training=False), model(x, training=False))
    assert_round_trips(folded, x, tmp_path, **round_trip)
    return folded


def _chain(producer, bn, input_shape, **kwargs):
    inputs = keras.Input(input_shape)
    outputs = bn(producer(inputs))
    return keras.Model(inputs, outputs, **kwargs)


PRODUCERS = [
    # (producer, input shape, BN axis): one per foldable layer kind and layout
    (lambda: keras.layers.Conv1D(5, 3, name="p"), (9, 3), -1),
    (lambda: keras.layers.Conv2D(5, 3, name="p"), (7, 7, 3), -1),
    (lambda: keras.layers.Conv3D(5, 2, name="p"), (4, 4, 4, 3), -1),
    # Not (3, 7, 7): Keras 3.15 (TF backend) adds a channels_first Conv2D's bias on the wrong axis when its
    # output is (5, 5, 5) (see docs/guides/real-networks.md); the original and the folded layer would then disagree.
    (lambda: keras.layers.Conv2D(5, 3, data_format="channels_first", name="p"), (3, 8, 6), 1),
    (lambda: keras.layers.Conv2D(6, 3, groups=3, use_bias=False, name="p"), (7, 7, 3), -1),
    (lambda: keras.layers.Conv1DTranspose(5, 3, name="p"), (6, 3), -1),
    (lambda: keras.layers.Conv2DTranspose(5, 3, strides=2, name="p"), (4, 4, 3), -1),
    (lambda: keras.layers.Conv3DTranspose(5, 2, name="p"), (3, 3, 3, 2), -1),
    (lambda: keras.layers.Conv2DTranspose(5, 3, data_format="channels_first", name="p"), (3, 4, 4), 1),
    (lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2, name="p"), (9, 3), -1),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="p"), (7, 7, 3), -1),
    (lambda: keras.layers.DepthwiseConv2D(3, data_format="channels_first", name="p"), (3, 7, 7), 1),
    (lambda: keras.layers.SeparableConv1D(5, 3, depth_multiplier=2, name="p"), (9, 3), -1),
    (lambda: keras.layers.SeparableConv2D(5, 3, use_bias=False, name="p"), (7, 7, 3), -1),
    (lambda: keras.layers.Dense(5, name="p"), (4,), -1),
    (lambda: keras.layers.Dense(5, name="p"), (6, 4), -1),  # Dense on 3-D input
]


@functools.lru_cache(maxsize=None)
def _nchw_conv_runs() -> bool:
    """Whether a channels_first Conv2D runs here (always off TensorFlow; on TensorFlow's CPU only with oneDNN)."""
    try:
        keras.layers.Conv2D(1, 1, data_format="channels_first")(np.zeros((1, 1, 2, 2), "float32"))
    except Exception as error:  # noqa: BLE001 - TensorFlow's UnimplementedError
        if "only supports the NHWC tensor format" in str(error):
            return False
        raise
    return True


PRODUCER_IDS = [
    "conv1d", "conv2d", "conv3d", "conv2d_nchw", "grouped_no_bias", "conv1d_t", "conv2d_t_stride", "conv3d_t",
    "conv2d_t_nchw", "depthwise1d", "depthwise2d_no_bias", "depthwise2d_nchw", "separable1d",
    "separable2d_no_bias", "dense", "dense_3d",
]


@pytest.mark.parametrize("bn_class", [kerasbn.BatchNorm, keras.layers.BatchNormalization], ids=["kerasbn", "keras"])
@pytest.mark.parametrize("make, input_shape, axis", PRODUCERS, ids=PRODUCER_IDS)
def test_each_foldable_layer_kind(make, input_shape, axis, bn_class, rng, tmp_path):
    producer = make()
    conv2d = (keras.layers.Conv2D, keras.layers.Conv2DTranspose)
    if isinstance(producer, conv2d) and producer.data_format == "channels_first" and not _nchw_conv_runs():
        pytest.skip("TensorFlow's CPU Conv2D without oneDNN takes NHWC only (oneDNN is off by default on CPUs "
                    "without AVX-512, as here; TF_ENABLE_ONEDNN_OPTS=1 turns it on)")
    model = _chain(producer, bn_class(axis=axis, name="bn"), input_shape)
    x = rng.normal(0.0, 1.0, (3, *input_shape)).astype("float32")
    folded = _fold_and_compare(model, rng, x, [("p", "bn")], [], tmp_path)
    # A bias is added where the layer had none; the layer keeps its name and kind.
    assert type(folded.get_layer("p")) is type(model.get_layer("p"))
    assert folded.get_layer("p").use_bias
    # The batch norm was the model's output: an Identity keeps its name (and must save).
    assert type(folded.get_layer("bn")) is keras.layers.Identity


def test_fold_matches_the_float64_closed_form_for_depthwise(rng, tmp_path):
    """Output channel i * multiplier + m of a depthwise conv scales kernel[..., i, m]."""
    model = _chain(keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="p"), kerasbn.BatchNorm(epsilon=0.1, name="bn"), (5, 5, 3))
    _randomize(model, rng)
    folded = kerasbn.fold(model)
    assert_round_trips(folded, rng.normal(0.0, 1.0, (2, 5, 5, 3)).astype("float32"), tmp_path)
    bn = model.get_layer("bn")
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("p").get_weights())
    gamma, beta, mean, variance = (w.astype(np.float64) for w in bn.get_weights())
    a = gamma / np.sqrt(variance + 0.1)
    new_kernel, new_bias = folded.get_layer("p").get_weights()
    np.testing.assert_allclose(new_kernel, kernel * a.reshape(3, 2), rtol=1e-6)
    np.testing.assert_allclose(new_bias, (bias - mean) * a + beta, rtol=1e-6, atol=1e-7)


def test_what_cannot_fold_becomes_affine(rng, tmp_path):
    inputs = keras.Input((6, 6, 3))
    shared = keras.layers.Conv2D(4, 3, name="shared_conv")(inputs)
    a = keras.layers.BatchNormalization(name="bn_of_shared")(shared)  # the conv also feeds `side`
    side = keras.layers.ReLU(name="side")(shared)
    relu_conv = keras.layers.Conv2D(4, 1, activation="relu", name="relu_conv")(a)
    b = kerasbn.BatchNorm(name="bn_after_activation")(relu_conv)
    added = keras.layers.Add(name="add")([b, side])
    c = kerasbn.BatchNorm(name="bn_after_add")(added)
    d = kerasbn.BatchNorm(axis=1, name="bn_other_axis")(keras.layers.Conv2D(4, 1, name="conv_other_axis")(c))
    left = kerasbn.BatchNorm(name="bn_left")(keras.layers.Conv2D(2, 1, name="left")(d))
    right = keras.layers.BatchNormalization(name="bn_right")(keras.layers.Conv2D(2, 1, name="right")(d))
    merged = keras.layers.Concatenate(name="concat")([left, right])
    pooled = keras.layers.MaxPooling2D(name="pool")(merged)
    e = kerasbn.BatchNorm(name="bn_after_pool")(pooled)
    model = keras.Model(inputs, e)
    x = rng.normal(0.0, 1.0, (3, 6, 6, 3)).astype("float32")
    _fold_and_compare(
        model, rng, x,
        expected_folded=[("left", "bn_left"), ("right", "bn_right")],
        expected_affine=["bn_of_shared", "bn_after_activation", "bn_after_add", "bn_other_axis", "bn_after_pool"],
        tmp_path=tmp_path,
        export=True,
    )


def test_a_shared_batch_norm_becomes_affine(rng, tmp_path):
    inputs = keras.Input((4,))
    bn = kerasbn.BatchNorm(name="bn")
    outputs = keras.layers.Add()([bn(keras.layers.Dense(4, name="d1")(inputs)), bn(keras.layers.Dense(4, name="d2")(inputs))])
    model = keras.Model(inputs, outputs)
    x = rng.normal(0.0, 1.0, (3, 4)).astype("float32")
    _fold_and_compare(model, rng, x, [], ["bn"], tmp_path)


def test_masked_sequences_and_bare_ops_in_the_graph(rng, tmp_path):
    """An Embedding's mask (a NotEqual op in the graph, passed as `mask=`) and a bare keras.ops call.

    The mask is a second input tensor of the batch norm's node: the Dense before
    it still feeds nothing else, so the pair folds.
    """
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(10, 4, mask_zero=True, name="embed")(inputs)
    x = kerasbn.BatchNorm(name="bn")(keras.layers.Dense(3, name="dense")(x))
    x = keras.layers.BatchNormalization(name="bn_relu")(keras.ops.relu(x))
    model = keras.Model(inputs, keras.layers.LSTM(2, name="lstm")(x))
    data = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 0], [8, 0, 0, 0, 0]], "int32")
    _fold_and_compare(model, rng, data, [("dense", "bn")], ["bn_relu"], tmp_path, export=True)
    fast = kerasbn.convert(model)
    assert_round_trips(fast, data, tmp_path)
    back = kerasbn.convert(fast, to="keras")
    _assert_same_weights(back, model)
    np.testing.assert_array_equal(to_numpy(back(data)), to_numpy(model(data)))
    assert_round_trips(back, data, tmp_path)


def test_a_lambda_layer_is_kept(rng, tmp_path):
    """A Python lambda cannot be rebuilt from its config (Keras refuses it): the stateless layer is reused."""
    inputs = keras.Input((4,))
    x = keras.layers.Lambda(lambda t: t * t - 1.0, name="lam")(keras.layers.Dense(4, name="d")(inputs))
    model = keras.Model(inputs, kerasbn.BatchNorm(name="bn")(keras.layers.Dense(3, name="d2")(x)))
    x = rng.normal(0.0, 1.0, (3, 4)).astype("float32")
    # Loading a Python lambda back needs safe_mode=False, and a body without globals (`keras` is
    # not in the reloaded function's): Keras's rules for any model with a lambda, not ours.
    _fold_and_compare(model, rng, x, [("d2", "bn")], [], tmp_path, safe_mode=False)
    back = kerasbn.convert(model, to="keras")
    np.testing.assert_array_equal(to_numpy(back(x)), to_numpy(model(x)))
    assert_round_trips(back, x, tmp_path, safe_mode=False)


def test_frozen_layers_stay_frozen(rng, tmp_path):
    """Per-layer `trainable=False` survives (setting the model's flag would reset it on JAX)."""
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization(trainable=False, name="bn")(keras.layers.Dense(4, trainable=False, name="d")(inputs))
    x = keras.layers.BatchNormalization(name="bn_top")(keras.layers.Dense(2, name="top")(keras.layers.ReLU()(x)))
    model = keras.Model(inputs, x)
    converted, folded = kerasbn.convert(model), kerasbn.fold(model)
    assert [(layer.name, layer.trainable) for layer in converted.layers if layer.weights] == [
        ("d", False), ("bn", False), ("top", True), ("bn_top", True)
    ]
    assert len(converted.trainable_weights) == 4  # top's kernel and bias, bn_top's gamma and beta
    assert [(layer.name, layer.trainable) for layer in folded.layers if layer.weights] == [("d", False), ("top", True)]
    assert len(folded.trainable_weights) == 2
    x = rng.normal(0.0, 1.0, (3, 4)).astype("float32")
    for copy in (converted, folded):
        loaded = assert_round_trips(copy, x, tmp_path)
        assert [layer.trainable for layer in loaded.layers] == [layer.trainable for layer in copy.layers]
    model.trainable = False
    frozen = kerasbn.convert(model)
    assert frozen.trainable_weights == []
    assert assert_round_trips(frozen, x, tmp_path).trainable_weights == []


def test_folded_outputs_keep_their_names(rng, tmp_path):
    """A batch norm that is a model output folds away, and the output keeps its name (a compiled model's loss keys)."""
    inputs = keras.Input((4,))
    left = keras.layers.BatchNormalization(name="left_bn")(keras.layers.Dense(3, name="left")(inputs))
    right = kerasbn.BatchNorm(name="right_bn")(keras.layers.Dense(2, name="right")(inputs))
    model = keras.Model(inputs, [left, right])
    _randomize(model, rng)
    model.compile(loss={"left_bn": "mse", "right_bn": "mae"})
    folded = kerasbn.fold(model)
    assert sorted(folded.fold_report.folded) == [("left", "left_bn"), ("right", "right_bn")]
    assert _batch_norms(folded) == [] and folded.output_names == ["left_bn", "right_bn"]
    x = rng.normal(0.0, 1.0, (6, 4)).astype("float32")
    y = {"left_bn": np.zeros((6, 3), "float32"), "right_bn": np.ones((6, 2), "float32")}
    np.testing.assert_allclose(folded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-5)
    assert all(type(folded.get_layer(name)) is keras.layers.Identity for name in ("left_bn", "right_bn"))
    loaded = assert_round_trips(folded, x, tmp_path, export=True)
    assert loaded.output_names == ["left_bn", "right_bn"]
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-5)


def test_nested_models(rng, tmp_path):
    inner_seq = keras.Sequential(
        [keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 1, name="c"), keras.layers.BatchNormalization(name="bn")],
        name="inner_seq",
    )
    inner_in = keras.Input((6, 6, 4))
    deepest = keras.Sequential([keras.Input((6, 6, 4)), kerasbn.BatchNorm(name="bn")], name="deepest")
    inner_func = keras.Model(inner_in, deepest(keras.layers.Conv2D(4, 1, name="c")(inner_in)), name="inner_func")
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = kerasbn.BatchNorm(name="stem_bn")(x)
    x = inner_seq(x)
    x = inner_func(x)
    model = keras.Model(inputs, kerasbn.BatchNorm(name="after_nested")(x), name="outer")
    data = rng.normal(0.0, 1.0, (2, 6, 6, 3)).astype("float32")
    folded = _fold_and_compare(
        model, rng, data,
        expected_folded=[("stem", "stem_bn"), ("inner_seq/c", "inner_seq/bn")],
        expected_affine=["inner_func/deepest/bn", "after_nested"],
        tmp_path=tmp_path,
    )
    assert isinstance(folded.get_layer("inner_func").get_layer("deepest").get_layer("bn"), kerasbn.Affine)

    fast = kerasbn.convert(model, to="kerasbn")
    assert isinstance(fast.get_layer("inner_seq").get_layer("bn"), kerasbn.BatchNorm)
    assert_round_trips(fast, data, tmp_path)
    back = kerasbn.convert(fast, to="keras")
    assert type(back.get_layer("inner_func").get_layer("deepest").get_layer("bn")) is keras.layers.BatchNormalization
    _assert_same_weights(back, model)
    np.testing.assert_array_equal(to_numpy(back(data)), to_numpy(model(data)))
    assert_round_trips(back, data, tmp_path)


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class _Doubled(keras.layers.Wrapper):
    """A wrapper of the plain kind: `layer` in its config, Wrapper's own from_config, no weights of its own."""

    def call(self, inputs, training=None):
        return 2.0 * self.layer(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def _time_distributed_models():
    """Batch norms inside TimeDistributed (and a plain Wrapper), in a Sequential and a Functional model."""
    td = keras.layers.TimeDistributed
    sequential = keras.Sequential(
        [
            keras.Input((4, 6, 6, 3)),
            td(keras.layers.Conv2D(4, 3, name="conv"), name="td_conv"),
            td(keras.layers.BatchNormalization(name="bn"), name="td_bn"),  # folds into td_conv
            keras.layers.ReLU(),
            td(kerasbn.BatchNorm(name="bn"), name="td_bn_relu"),  # becomes TimeDistributed(Affine)
        ],
        name="seq",
    )
    inputs = keras.Input((4, 6, 6, 3))
    x = td(keras.layers.Conv2D(4, 3, use_bias=False, name="conv"), name="td_conv")(inputs)
    x = td(kerasbn.BatchNorm(name="bn"), name="td_bn")(x)  # folds into td_conv
    x = td(td(keras.layers.BatchNormalization(name="bn"), name="td_inner"), name="td_twice")(keras.layers.ReLU()(x))
    block = keras.Sequential(
        [keras.Input((4, 4, 4)), keras.layers.Conv2D(3, 1, name="c"), keras.layers.BatchNormalization(name="bn")], name="block"
    )
    x = td(block, name="td_block")(x)  # a model inside the wrapper: rebuilt like a nested model
    x = _Doubled(keras.layers.BatchNormalization(name="bn"), name="doubled")(x)
    functional = keras.Model(inputs, td(keras.layers.Dense(2, name="d"), name="td_dense")(x), name="func")
    return sequential, functional


def test_batch_norm_inside_time_distributed_and_wrappers(rng, tmp_path):
    sequential, functional = _time_distributed_models()
    x = rng.normal(0.0, 1.0, (2, 4, 6, 6, 3)).astype("float32")

    folded = _fold_and_compare(
        sequential, rng, x, [("td_conv", "td_bn")], ["td_bn_relu/bn"], tmp_path, export=True
    )
    assert [type(layer).__name__ for layer in folded.layers] == ["TimeDistributed", "ReLU", "TimeDistributed"]
    assert isinstance(folded.get_layer("td_bn_relu").layer, kerasbn.Affine)
    assert folded.get_layer("td_conv").layer.use_bias

    folded = _fold_and_compare(
        functional, rng, x,
        expected_folded=[("td_conv", "td_bn"), ("td_block/block/c", "td_block/block/bn")],
        expected_affine=["td_twice/td_inner/bn", "doubled/bn"],
        tmp_path=tmp_path,
        export=True,
    )
    assert isinstance(folded.get_layer("doubled"), _Doubled)
    assert isinstance(folded.get_layer("doubled").layer, kerasbn.Affine)
    assert isinstance(folded.get_layer("td_twice").layer.layer, kerasbn.Affine)

    for model in (sequential, functional):
        expected = to_numpy(model(x))
        fast = kerasbn.convert(model)
        ours = _batch_norms(fast)
        assert len(ours) == len(_batch_norms(model)) and all(isinstance(layer, kerasbn.BatchNorm) for layer in ours)
        assert [type(layer) for layer in fast.layers] == [type(layer) for layer in model.layers]
        _assert_same_weights(fast, model)
        _assert_close_to_scale(fast(x), expected, rtol=SAVE_TOL)  # x * a + b against (x - mean) * rsqrt(...)
        assert_round_trips(fast, x, tmp_path)
        back = kerasbn.convert(fast, to="keras")
        assert all(type(layer) is keras.layers.BatchNormalization for layer in _batch_norms(back))
        _assert_same_weights(back, model)
        np.testing.assert_array_equal(to_numpy(back(x)), expected)
        assert_round_trips(back, x, tmp_path)
        # Training mode reaches the batch norm through the wrapper: the same batch statistics.
        _assert_close_to_scale(fast(x, training=True), model(x, training=True), rtol=1e-4)


def test_sequential(rng, tmp_path):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.Activation("relu"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, name="dense"),
            kerasbn.BatchNorm(name="bn3"),
        ]
    )
    x = rng.normal(0.0, 1.0, (3, 8, 8, 1)).astype("float32")
    folded = _fold_and_compare(model, rng, x, [("conv", "bn1"), ("dense", "bn3")], ["bn2"], tmp_path, export=True)
    assert isinstance(folded, keras.Sequential)
    fast = kerasbn.convert(model)
    assert isinstance(fast, keras.Sequential) and len(_batch_norms(fast)) == 3
    np.testing.assert_array_equal(to_numpy(fast(x)), to_numpy(model(x)))
    assert_round_trips(fast, x, tmp_path)
    # A compiled model gives a compiled copy, as keras.models.clone_model (and the Functional path) does.
    model.compile(optimizer="sgd", loss="mse")
    fast = kerasbn.convert(model)
    assert fast.compiled
    y = rng.normal(0.0, 1.0, (3, 4)).astype("float32")
    np.testing.assert_allclose(fast.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-5)
    assert assert_round_trips(fast, x, tmp_path).compiled


def test_the_converted_model_owns_its_weights(rng, tmp_path):
    """Training the copy leaves the original working and unchanged (JAX donates the arrays a step updates)."""
    model = _chain(keras.layers.Dense(3, name="d"), keras.layers.BatchNormalization(name="bn"), (4,))
    _randomize(model, rng)
    x, y = rng.normal(0.0, 1.0, (8, 4)).astype("float32"), rng.normal(0.0, 1.0, (8, 3)).astype("float32")
    expected = to_numpy(model(x))
    for to in ("kerasbn", "keras"):
        copy = kerasbn.convert(model if to == "kerasbn" else kerasbn.convert(model), to=to)
        copy.compile(optimizer="sgd", loss="mse")
        copy.fit(x, y, epochs=2, batch_size=4, verbose=0)
        np.testing.assert_array_equal(to_numpy(model(x)), expected)
        assert_round_trips(copy, x, tmp_path)  # trained, compiled, with an optimizer's state


@pytest.mark.parametrize("dtype_policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_policies_are_kept(dtype_policy, rng, tmp_path):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    x = keras.layers.BatchNormalization(name="bn_relu")(keras.layers.ReLU()(x))
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32", name="out")(keras.layers.Flatten()(x)))
    _randomize(model, rng)
    data = rng.normal(0.0, 1.0, (4, 6, 6, 3)).astype("float32")
    fast = kerasbn.convert(model)
    for layer in _batch_norms(fast):
        assert layer.dtype_policy.name == dtype_policy and layer.compute_dtype != "float32"
    assert fast.get_layer("out").dtype_policy.name == "float32"
    np.testing.assert_array_equal(to_numpy(fast(data)), to_numpy(model(data)))
    assert_round_trips(fast, data, tmp_path)
    folded = kerasbn.fold(fast)
    assert folded.get_layer("bn_relu").dtype_policy.name == dtype_policy
    # 16-bit activations: the folded net rounds at other places (1e-2 of the scale: ~8 bits of bfloat16).
    _assert_close_to_scale(folded(data), model(data), rtol=2e-2)
    loaded = assert_round_trips(folded, data, tmp_path, export=True)
    assert loaded.get_layer("bn_relu").dtype_policy.name == dtype_policy


@pytest.mark.parametrize("dtype_policy", ["mixed_float16"], indirect=True)
def test_a_float32_batch_norm_folded_into_a_16_bit_layer_keeps_float32_outputs(dtype_policy, rng, tmp_path):
    """The last batch norm in float32 (as mixed-precision models end): folding it keeps that cast."""
    functional_in = keras.Input((4,))
    functional = keras.Model(
        functional_in, keras.layers.BatchNormalization(dtype="float32", name="bn")(keras.layers.Dense(3, name="d")(functional_in))
    )
    sequential = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="d"), kerasbn.BatchNorm(dtype="float32", name="bn")]
    )
    x = rng.normal(0.0, 1.0, (2, 4)).astype("float32")
    for model in (functional, sequential):
        _randomize(model, rng)
        folded = kerasbn.fold(model)
        assert folded.fold_report.folded == (("d", "bn"),) and _batch_norms(folded) == []
        assert keras.backend.standardize_dtype(folded(x).dtype) == "float32"
        # The folded Dense rounds its float16 output once more than the original (float16: 11 bits).
        _assert_close_to_scale(folded(x), model(x), rtol=2e-3)
        assert keras.backend.standardize_dtype(folded.outputs[0].dtype) == "float32"
        # The cast is an Identity in float32 after the float16 Dense; it saves, loads and exports.
        assert type(folded.get_layer("bn")) is keras.layers.Identity
        assert folded.get_layer("bn").dtype_policy.name == "float32"
        loaded = assert_round_trips(folded, x, tmp_path, export=True)
        assert keras.backend.standardize_dtype(loaded(x).dtype) == "float32"


# ------------------------------------------------------------ saving


@tf_only
def test_folded_model_saves_to_keras_and_exports_a_saved_model(rng, tmp_path):
    import tensorflow as tf

    from training.export import BATCH_NORM_OP_TYPES, graph_op_types

    inputs = keras.Input((6, 6, 3))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    x = kerasbn.BatchNorm(name="bn_relu")(keras.layers.ReLU()(x))
    model = keras.Model(inputs, x)
    _randomize(model, rng)
    folded = kerasbn.fold(model)
    data = rng.normal(0.0, 1.0, (2, 6, 6, 3)).astype("float32")
    expected = to_numpy(folded(data))

    path = tmp_path / "folded.keras"
    folded.save(path)
    np.testing.assert_array_equal(to_numpy(keras.models.load_model(path)(data)), expected)

    folded.export(str(tmp_path / "saved"))
    assert not set(graph_op_types(str(tmp_path / "saved"))) & BATCH_NORM_OP_TYPES
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    served = loaded.serve(tf.constant(data))
    np.testing.assert_allclose(served.numpy(), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------- recompute_statistics


def test_recompute_statistics_on_functional_and_nested_models(rng, tmp_path):
    """The first BN of a converted network gets the plain average of its batch statistics."""
    inner = keras.Sequential(
        [keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 1, name="c"), keras.layers.BatchNormalization(name="inner_bn")],
        name="inner",
    )
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    model = keras.Model(inputs, inner(keras.layers.ReLU()(x)))
    fast = kerasbn.convert(model)
    batches = [rng.normal(i, 1.0 + i, (8, 6, 6, 3)).astype("float32") for i in range(3)]
    before = to_numpy(fast.get_layer("inner").get_layer("inner_bn").moving_mean).copy()
    assert kerasbn.recompute_statistics(fast, batches) == 3
    stem = keras.Model(fast.inputs, fast.get_layer("stem").output)
    stats = [to_numpy(stem(b)).astype(np.float64) for b in batches]
    bn = fast.get_layer("stem_bn")
    np.testing.assert_allclose(to_numpy(bn.moving_mean), np.mean([s.mean(axis=(0, 1, 2)) for s in stats], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(bn.moving_variance), np.mean([s.var(axis=(0, 1, 2)) for s in stats], 0), rtol=1e-5, atol=1e-6)
    after = to_numpy(fast.get_layer("inner").get_layer("inner_bn").moving_mean)
    assert np.max(np.abs(after - before)) > 1e-2  # the nested model's BN was recomputed too
    assert_round_trips(fast, batches[0], tmp_path)


def test_recompute_statistics_on_a_converted_application(application_models, rng, tmp_path):
    fast = kerasbn.convert(application_models("MobileNetV2"))
    batches = [rng.normal(0.0, 1.0, (4, 32, 32, 3)).astype("float32") for _ in range(2)]
    assert kerasbn.recompute_statistics(fast, batches) == 2
    stem = keras.Model(fast.inputs, fast.get_layer("Conv1").output)
    means = [to_numpy(stem(b)).astype(np.float64).mean(axis=(0, 1, 2)) for b in batches]
    np.testing.assert_allclose(to_numpy(fast.get_layer("bn_Conv1").moving_mean), np.mean(means, 0), rtol=1e-5, atol=1e-6)
    assert_round_trips(fast, batches[0], tmp_path)


# ------------------------------------------------------------------ errors


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn = keras.layers.BatchNormalization()

    def call(self, x):
        return self.bn(x)


class _HoldsBatchNorm(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x):
        return self.bn(x)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class _CellWithBatchNorm(keras.layers.Layer):
    """An RNN cell that normalizes its input: a batch norm in a layer's own code."""

    state_size = 3

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, states):
        return self.bn(x), states


def test_errors(tmp_path):
    model = _chain(keras.layers.Dense(3), kerasbn.BatchNorm(name="bn"), (4,))
    with pytest.raises(ValueError, match=r"`to` must be one of \('kerasbn', 'keras'\)\. Received: to='torch'"):
        kerasbn.convert(model, to="torch")

    subclassed = _Subclassed()
    subclassed(np.zeros((2, 3), "float32"))
    for transform in (kerasbn.convert, kerasbn.fold):
        with pytest.raises(ValueError, match=r"Sequential or Functional.*of type _Subclassed"):
            transform(subclassed)

    inputs = keras.Input((3,))
    custom = keras.Model(inputs, _HoldsBatchNorm(name="custom_block")(inputs))
    for transform in (kerasbn.convert, kerasbn.fold):
        with pytest.raises(ValueError, match=r"Layer 'custom_block' \(_HoldsBatchNorm\) holds batch norm"):
            transform(custom)

    ghost = _chain(keras.layers.Dense(3), kerasbn.BatchNorm(virtual_batch_size=2, name="ghost_bn"), (4,))
    with pytest.raises(ValueError, match=r"'ghost_bn'.*virtual_batch_size=2"):
        kerasbn.convert(ghost, to="keras")
    grouped = _chain(keras.layers.Dense(3), kerasbn.BatchNorm(synchronized=True, sync_group_size=2, name="groups"), (4,))
    with pytest.raises(ValueError, match=r"'groups'.*sync_group_size=2"):
        kerasbn.convert(grouped, to="keras")
    if keras.backend.backend() == "tensorflow":  # the stock layer takes synchronized=True on TensorFlow only
        synchronized = kerasbn.convert(
            _chain(keras.layers.Dense(3), kerasbn.BatchNorm(synchronized=True, name="s"), (4,)), to="keras"
        )
        assert synchronized.get_layer("s").synchronized
    two_axes = _chain(keras.layers.Conv2D(3, 1), kerasbn.BatchNorm(axis=[1, 3], name="two_axes"), (4, 4, 2))
    with pytest.raises(ValueError, match=r"'two_axes'.*axis=\[1, 3\]"):
        kerasbn.convert(two_axes, to="keras")
    one_axis = kerasbn.convert(_chain(keras.layers.Dense(3), kerasbn.BatchNorm(axis=[-1], name="b"), (4,)), to="keras")
    assert one_axis.get_layer("b").axis == -1
    assert_round_trips(one_axis, np.ones((2, 4), "float32"), tmp_path)

    # Inside a wrapper the same rule holds, with the wrapper in the path.
    inputs = keras.Input((2, 3))
    wrapped = keras.Model(inputs, keras.layers.TimeDistributed(_HoldsBatchNorm(name="custom_block"), name="td")(inputs))
    for transform in (kerasbn.convert, kerasbn.fold):
        with pytest.raises(ValueError, match=r"Layer 'td/custom_block' \(_HoldsBatchNorm\) holds batch norm"):
            transform(wrapped)
    # A wrapper Keras rebuilds its own way (a second, backward layer): not taken apart.
    inputs = keras.Input((2, 3))
    bidirectional = keras.layers.Bidirectional(keras.layers.RNN(_CellWithBatchNorm()), name="bidi")
    wrapped = keras.Model(inputs, bidirectional(inputs))
    for transform in (kerasbn.convert, kerasbn.fold):
        with pytest.raises(ValueError, match=r"Layer 'bidi' \(Bidirectional\) holds batch norm"):
            transform(wrapped)

    with pytest.raises(ValueError, match=r"must be built"):
        kerasbn.fold(keras.Sequential([keras.layers.Dense(2)]))


# ---------------------------------------------------------- MirroredStrategy


@tf_only
@pytest.mark.slow
def test_convert_inside_mirrored_strategy_scope(tmp_path):
    """Converted in scope, trained on 2 replicas with different data: every replica and every read agree.

    Also counts the cross-device reductions of one traced training step: the
    stock layer and kerasbn make one batched reduction (the gradients) and no
    per-variable one, whatever the depth.
    """
    out = tmp_path / "out.json"
    run_python([str(REPO_ROOT / "tests" / "_convert_worker.py"), str(out)], timeout=600)
    results = json.loads(out.read_text())
    assert results["distributed"]
    views = results["replica_views"]
    assert len(views[0]) == results["num_batch_norms"] == 3
    assert results["handed_over"] == 3  # sync_moving_statistics: every layer's copies set to their mean
    np.testing.assert_array_equal(np.asarray(views[0]), np.asarray(views[1]))  # replicas normalize alike
    np.testing.assert_allclose(np.asarray(views[0]), np.asarray(results["cross_replica"]), rtol=1e-6)
    # The first layer: the mean over replicas of each replica's own moving average.
    np.testing.assert_allclose(np.asarray(results["cross_replica"][0]), np.asarray(results["expected_first"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(results["first_get_weights"]), np.asarray(results["expected_first"]), rtol=1e-5, atol=1e-6)
    spread = np.abs(np.asarray(results["expected_first"]) - np.asarray(views[0][0]))
    assert spread.max() < 1e-4
    # Saved from the strategy and loaded without it: what the cross-replica reads hold.
    reloaded = results["reloaded"]
    assert reloaded["same_classes"] and reloaded["same_weights"], reloaded
    assert reloaded["max_output_difference"] <= SAVE_TOL, reloaded
    reductions = results["reductions"]
    for blocks in (2, 8):
        assert reductions[f"kerasbn_{blocks}"] == {"reduce_to": 0, "batch_reduce_to": 1}, reductions
        assert reductions[f"stock_{blocks}"]["reduce_to"] == 0, reductions

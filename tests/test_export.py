"""Tests for training/export.py: the servable SavedModel of a trained LeNet-BN.

A module-scoped fixture trains LeNet-BN for 32 steps on the first 1,024
Fashion-MNIST training images, recomputes its BN statistics, and writes a run folder as the driver does
(model.keras, config.json, history.json). It is exported twice, folded (the
default, through `export_run`) and unfolded (each kerasbn.BatchNorm as its
`inference_function`). Checked:

* a fresh Python process, started in a temporary folder with PYTHONPATH
  cleared and the repository's packages refused at import, loads both and
  reproduces the in-memory model on the whole test set (identical class
  ids; logits within 1e-5 unfolded, 1e-4 folded);
* TensorFlow's own `saved_model_cli show --all` and `run`, as subprocesses;
* folding on random weights (kerasbn, stock Keras and no BN; BNs that cannot
  be folded), against the model and a float64 closed form, and the graph's
  op types (no batch-normalization op once folded);
* version numbering, the no-overwrite rule, and a crash leaving nothing;
* wrong dtype/shape at the signatures, a run folder without a trained model;
* `python -m training.export --run` on a `--norm decorrelated` run, in a fresh process;
* the run's .keras file restoring the BatchNorm layers with their statistics;
* TFLite accuracy equal to the SavedModel's within 0.1 percentage point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason=f"SavedModel export needs the TensorFlow backend; backend is {keras.backend.backend()!r}",
    ),
    # Keras 3.15's own model.save() and load_model() call np.array on variables (NumPy 2 warns).
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from training import data, export, models  # noqa: E402

SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")
BATCH = 2000


def _test_split():
    try:
        return data.load_arrays("test")
    except data.DataError as error:
        pytest.skip(f"Fashion-MNIST is not available: {error}")


def _keras_logits(model, images_uint8: np.ndarray) -> np.ndarray:
    """The in-memory model on raw uint8 images, scaled as training/data.py scales them."""
    outputs = []
    for start in range(0, len(images_uint8), BATCH):
        x = tf.cast(images_uint8[start : start + BATCH, ..., None], tf.float32) / 255.0
        outputs.append(_np(model(x, training=False)))
    return np.concatenate(outputs)


def _randomize(model, rng) -> None:
    """Random moving statistics, gammas (either sign), betas and biases: folding must not lean on defaults."""
    for layer in model.layers:
        if isinstance(layer, (kerasbn.BatchNorm, keras.layers.BatchNormalization)):
            n = tuple(layer.moving_mean.shape)
            layer.moving_mean.assign(rng.normal(0.0, 1.0, n))
            layer.moving_variance.assign(rng.uniform(0.1, 3.0, n))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0.0, 1.0, n))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.5, tuple(layer.bias.shape)))


def _np(x, dtype=None) -> np.ndarray:
    """A tensor or Keras variable as a NumPy array (np.asarray on a Keras variable warns under NumPy 2)."""
    array = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    return array if dtype is None else array.astype(dtype)


def _has_batch_norm(model) -> bool:
    return any(isinstance(l, (kerasbn.BatchNorm, keras.layers.BatchNormalization)) for l in model.layers)


# --------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def test_split():
    return _test_split()


def _train_run(run_dir: Path, norm: str):
    """Trains LeNet with `norm` for 32 steps and writes `run_dir` as `python -m training.train` leaves it."""
    try:
        images, labels = data.load_arrays("train", limit=1024)
    except data.DataError as error:
        pytest.skip(f"Fashion-MNIST is not available: {error}")
    keras.utils.set_random_seed(1)
    model = models.build_lenet(norm, bn_momentum=0.9)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = images[..., None].astype("float32") / 255.0
    history = model.fit(x, labels, batch_size=32, epochs=1, verbose=0)
    if norm == "kerasbn":
        # As the driver does: population statistics for the final weights (test accuracy ~0.7 instead of ~0.4).
        kerasbn.recompute_statistics(model, tf.data.Dataset.from_tensor_slices(x).batch(128))
    model.save(run_dir / "model.keras")
    (run_dir / "config.json").write_text(json.dumps({"settings": {"norm": norm, "epochs": 1}}))
    (run_dir / "history.json").write_text(json.dumps([{"epoch": 1, "loss": history.history["loss"][-1]}]))
    return model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder as `python -m training.train` leaves it, and the trained model in memory."""
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, _train_run(run_dir, "kerasbn")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """Version 1: folded, through export_run (as the driver calls it); version 2: unfolded."""
    run_dir, model = trained_run
    base = tmp_path_factory.mktemp("saved_models")
    folded = export.export_run(str(run_dir), str(base), verbose=False)
    unfolded = export.export_model(model, str(base), fold_bn=False, source_run=str(run_dir))
    return {"base": base, "folded": Path(folded), "unfolded": Path(unfolded), "model": model, "run": run_dir}


# --------------------------------------------------------------- round trip without kerasbn

_FRESH_PROCESS = r"""
import importlib.abc, json, os, sys

REFUSED = ("kerasbn", "training", "bench")

class Refuse(importlib.abc.MetaPathFinder):
    # Whatever is installed (pip install -e . or not), the repository's packages cannot be imported here.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"refused in this test: {name}")
        return None

sys.meta_path.insert(0, Refuse())
import numpy as np
import tensorflow as tf

report = {"cwd": os.getcwd(), "sys_path": sys.path}
try:
    import kerasbn  # noqa: F401
    report["kerasbn_import"] = "succeeded"
except ImportError as error:
    report["kerasbn_import"] = f"failed: {error}"

images = np.load(sys.argv[1])
arrays = {}
for tag, path in (("folded", sys.argv[2]), ("unfolded", sys.argv[3])):
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    parts = [serve(images=tf.constant(images[i:i + 2000])) for i in range(0, len(images), 2000)]
    for key in ("logits", "probabilities", "class_ids"):
        arrays[f"{tag}_{key}"] = np.concatenate([p[key].numpy() for p in parts])
    arrays[f"{tag}_nhwc_logits"] = serve(images=tf.constant(images[:500, ..., None]))["logits"].numpy()
    scaled = images[:500, ..., None].astype(np.float32) / np.float32(255)
    arrays[f"{tag}_float_logits"] = loaded.signatures["serving_float"](images=tf.constant(scaled))["logits"].numpy()
    report[f"{tag}_class_names"] = [n.decode() for n in loaded.signatures["class_names"]()["class_names"].numpy()]
    with open(os.path.join(path, "assets", "class_names.txt")) as handle:
        report[f"{tag}_asset"] = handle.read().splitlines()
report["modules"] = sorted({m.split(".")[0] for m in sys.modules} & set(REFUSED))
np.savez(sys.argv[4], **arrays)
with open(sys.argv[5], "w") as handle:
    json.dump(report, handle)
"""


def test_round_trip_in_a_fresh_process_without_kerasbn(exported, test_split, tmp_path, run_python):
    images, labels = test_split
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "load_and_predict.py"
    script.write_text(_FRESH_PROCESS)
    # No PYTHONPATH: nothing but site-packages could provide kerasbn.
    result = run_python([script, "images.npy", exported["folded"], exported["unfolded"], "out.npz", "report.json"],
                        env={"PYTHONPATH": None}, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kerasbn_import"].startswith("failed"), report["kerasbn_import"]
    assert str(REPO_ROOT) not in report["sys_path"] and report["cwd"] == str(tmp_path)
    assert report["modules"] == []  # (`import tensorflow` itself imports Keras 3 when installed, so Keras is not checked)
    outputs = np.load(tmp_path / "out.npz")

    expected = _keras_logits(exported["model"], images)
    expected_ids = expected.argmax(-1)
    assert len(expected) == 10000
    for tag, tolerance in (("unfolded", 1e-5), ("folded", 1e-4)):
        logits = outputs[f"{tag}_logits"]
        np.testing.assert_array_equal(outputs[f"{tag}_class_ids"], expected_ids)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance, err_msg=tag)
        softmax = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(outputs[f"{tag}_probabilities"], softmax / softmax.sum(-1, keepdims=True), atol=1e-6)
        # [batch, 28, 28, 1] and the float signature give the numbers of [batch, 28, 28] (up to the
        # last bits: a batch of 500 is not blocked like one of 2000).
        np.testing.assert_allclose(outputs[f"{tag}_nhwc_logits"], logits[:500], rtol=0, atol=1e-5)
        np.testing.assert_allclose(outputs[f"{tag}_float_logits"], logits[:500], rtol=0, atol=1e-5)
        assert report[f"{tag}_class_names"] == data.CLASS_NAMES
        assert report[f"{tag}_asset"] == data.CLASS_NAMES
    # The trained model is better than chance, so identical ids mean something.
    assert (expected_ids == labels).mean() > 0.6


# --------------------------------------------------------------- TensorFlow's own tool


def _saved_model_cli(*args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [str(SAVED_MODEL_CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_saved_model_cli_show_all(exported):
    out = _saved_model_cli("show", "--dir", exported["folded"], "--all")
    default = out[out.index("signature_def['serving_default']") :]
    default = default[: default.index("Method name is")]
    assert re.search(r"inputs\['images'\] tensor_info:\s+dtype: DT_UINT8\s+shape: unknown_rank", default)
    assert re.search(r"outputs\['class_ids'\] tensor_info:\s+dtype: DT_INT64\s+shape: \(-1\)", default)
    assert re.search(r"outputs\['logits'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 10\)", default)
    assert re.search(r"outputs\['probabilities'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 10\)", default)
    floats = out[out.index("signature_def['serving_float']") :]
    assert re.search(r"inputs\['images'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 28, 28, 1\)", floats)
    assert re.search(r"outputs\['class_names'\] tensor_info:\s+dtype: DT_STRING\s+shape: \(10\)", out)
    ops = set(re.findall(r"'(\w+)'", re.search(r"contains the following ops: \{(.*)\}", out).group(1)))
    assert {"Conv2D", "MatMul", "Sigmoid", "EnsureShape"} <= ops
    assert not ops & export.BATCH_NORM_OP_TYPES


def _parse_cli_result(out: str, key: str) -> np.ndarray:
    block = out.split(f"Result for output key {key}:\n", 1)[1].split("Result for output key", 1)[0]
    return np.array([float(v) for v in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", block)])


def test_saved_model_cli_run(exported, test_split, tmp_path):
    # TF 2.21's saved_model_cli reads --input_exprs with ast.literal_eval, so
    # 'images=np.zeros((2,28,28),np.uint8)' is refused as "not a valid python
    # literal"; the same zeros are given as a literal list here, and as a
    # .npy file (--inputs) in saved_models/README.md.
    literal = str(np.zeros((2, 28, 28), np.uint8).tolist()).replace(" ", "")
    out = _saved_model_cli(
        "run", "--dir", exported["folded"], "--tag_set", "serve", "--signature_def", "serving_default",
        "--input_exprs", f"images={literal}",
    )
    expected = _np(exported["model"](np.zeros((2, 28, 28, 1), np.float32), training=False))
    np.testing.assert_array_equal(_parse_cli_result(out, "class_ids"), expected.argmax(-1))
    np.testing.assert_allclose(_parse_cli_result(out, "logits").reshape(2, 10), expected, rtol=0, atol=1e-4)
    probabilities = _parse_cli_result(out, "probabilities").reshape(2, 10)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)

    # docs/guides/export.md's form: a .npy file, here real test images with a channel axis, on the unfolded export.
    images = data.load_arrays("test", limit=3)[0][..., None]
    np.save(tmp_path / "images.npy", images)
    out = _saved_model_cli(
        "run", "--dir", exported["unfolded"], "--tag_set", "serve", "--signature_def", "serving_default",
        "--inputs", f"images={tmp_path / 'images.npy'}",
    )
    expected = _keras_logits(exported["model"], images[..., 0])
    np.testing.assert_array_equal(_parse_cli_result(out, "class_ids"), expected.argmax(-1))
    np.testing.assert_allclose(_parse_cli_result(out, "logits").reshape(3, 10), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------- folding


@pytest.mark.parametrize("norm", ["kerasbn", "keras", "none"])
def test_fold_matches_the_model_on_random_weights(norm, rng, tmp_path):
    model = models.build_lenet(norm)
    _randomize(model, rng)
    folded, report = export.fold_batch_norms(model)
    assert not _has_batch_norm(folded)
    expected_pairs = [] if norm == "none" else [["conv1", "bn1"], ["conv2", "bn2"], ["dense1", "bn3"], ["dense2", "bn4"]]
    assert report == {"folded": expected_pairs, "affine": []}
    assert len(folded.weights) == 10  # 5 kernels and 5 biases: no BN variable is left
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    expected = _keras_logits(model, images)
    np.testing.assert_allclose(_keras_logits(folded, images), expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(_keras_logits(folded, images).argmax(-1), expected.argmax(-1))

    version = export.export_model(model, str(tmp_path))
    assert not set(export.graph_op_types(version)) & export.BATCH_NORM_OP_TYPES
    served = tf.saved_model.load(version).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["logits"].numpy(), expected, rtol=0, atol=1e-4)


def test_fold_matches_the_float64_closed_form(rng):
    """`kernel' = kernel * a`, `bias' = (bias - mean) * a + beta`, a = gamma / sqrt(var + eps), per output channel."""
    bn = kerasbn.BatchNorm(epsilon=1e-2)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="dense"), bn])
    _randomize(model, rng)
    folded, report = export.fold_batch_norms(model)
    assert report == {"folded": [["dense", bn.name]], "affine": []}
    kernel, bias = (w.astype(np.float64) for w in model.layers[0].get_weights())
    mean, variance = _np(bn.moving_mean, np.float64), _np(bn.moving_variance, np.float64)
    gamma, beta = _np(bn.gamma, np.float64), _np(bn.beta, np.float64)
    a = gamma / np.sqrt(variance + 1e-2)
    new_kernel, new_bias = folded.layers[0].get_weights()
    np.testing.assert_allclose(new_kernel, kernel * a, rtol=1e-6)
    np.testing.assert_allclose(new_bias, (bias - mean) * a + beta, rtol=1e-6, atol=1e-7)


def _mixed_model():
    """BNs of every kind: foldable or not (first layer, after an activation, over two axes, no bias)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 3), name="images"),
            kerasbn.BatchNorm(name="bn_input"),  # nothing to fold into
            keras.layers.Conv2D(4, 3, activation="relu", name="conv_relu"),
            keras.layers.BatchNormalization(name="bn_after_relu"),  # an activation in between
            keras.layers.Conv2D(5, 3, name="conv_two_axes"),
            kerasbn.BatchNorm(axis=[1, 3], name="bn_two_axes"),  # normalizes more than the channels
            keras.layers.Conv2D(6, 1, use_bias=False, name="conv_no_bias"),
            kerasbn.BatchNorm(center=False, scale=False, name="bn_plain"),  # folds, creating a bias
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(7, name="dense"),
            keras.layers.BatchNormalization(name="bn_keras"),
            keras.layers.Activation("sigmoid", name="sigmoid"),
            keras.layers.Dense(3, name="logits"),
        ],
        name="mixed",
    )


def test_batch_norms_that_cannot_fold_become_affine_and_the_graph_has_no_batch_norm_op(rng, tmp_path):
    model = _mixed_model()
    _randomize(model, rng)
    folded, report = export.fold_batch_norms(model)
    assert report == {
        "folded": [["conv_no_bias", "bn_plain"], ["dense", "bn_keras"]],
        "affine": ["bn_input", "bn_after_relu", "bn_two_axes"],
    }
    assert not _has_batch_norm(folded)
    x = rng.uniform(0.0, 1.0, (16, 8, 8, 3)).astype("float32")
    expected = _np(model(x, training=False))
    np.testing.assert_allclose(_np(folded(x)), expected, rtol=0, atol=1e-5)

    version = export.export_model(model, str(tmp_path), "mixed", class_names=["a", "b", "c"])
    ops = export.graph_op_types(version)
    assert not set(ops) & export.BATCH_NORM_OP_TYPES, sorted(ops)
    loaded = tf.saved_model.load(version)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(
        served["logits"].numpy(), _np(model(images.astype("float32") / 255.0)), rtol=0, atol=1e-5
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,8,8,3\]"):
        loaded.signatures["serving_default"](images=tf.constant(images[..., 0]))  # 3 channels: rank 3 is refused


def test_fold_on_the_trained_model_over_the_test_set(trained_run, test_split):
    _, model = trained_run
    images, _ = test_split
    folded, _ = export.fold_batch_norms(model)
    expected = _keras_logits(model, images)
    got = _keras_logits(folded, images)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_graph_op_types_folded_against_unfolded(exported):
    folded, unfolded = export.graph_op_types(exported["folded"]), export.graph_op_types(exported["unfolded"])
    assert not set(folded) & export.BATCH_NORM_OP_TYPES
    # The check can fail: the unfolded graph computes 1/sqrt(var + eps) at run time, once per BN.
    assert unfolded.get("Rsqrt", 0) >= 4
    variables = {
        tag: [name for name, _ in tf.train.list_variables(str(exported[tag] / "variables" / "variables"))
              if name.startswith("model_variables/")]
        for tag in ("folded", "unfolded")
    }
    assert len(variables["folded"]) == 10  # 5 kernels + 5 biases
    assert len(variables["unfolded"]) == 26  # + gamma, beta, moving mean and variance of 4 BNs


def test_unfolded_export_runs_the_layers_compiled_inference_path(tmp_path):
    model = models.build_lenet("kerasbn")
    layers = [layer for layer in model.layers if isinstance(layer, kerasbn.BatchNorm)]
    assert [layer.inference_trace_count for layer in layers] == [0, 0, 0, 0]
    version = export.export_model(model, str(tmp_path), fold_bn=False)
    assert all(layer.inference_trace_count >= 1 for layer in layers)
    # Each BN's tf.function (named after its Python function, `traced`) is a function of the saved graph.
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(version) / "saved_model.pb").read_bytes())
    names = [f.signature.name for f in proto.meta_graphs[0].graph_def.library.function]
    assert sum("_traced_" in name for name in names) >= 4, names


# --------------------------------------------------------------- versions


def test_versions_count_up_and_never_overwrite(exported, monkeypatch, capsys):
    base, model_dir = exported["base"], exported["base"] / "lenet_bn"
    assert export.existing_versions(str(model_dir)) == [1, 2]
    info = json.loads((model_dir / "1" / "assets.extra" / "export.json").read_text())
    assert info["fold_bn"] is True and len(info["folded"]) == 4 and info["source_run"] == str(exported["run"])
    assert json.loads((model_dir / "2" / "assets.extra" / "export.json").read_text())["fold_bn"] is False

    # A version someone else wrote, a stray name and a leftover temporary folder.
    (model_dir / "5").mkdir()
    (model_dir / "5" / "keep.txt").write_text("version 5")
    (model_dir / "latest").mkdir()
    (model_dir / ".tmp-export-crashed").mkdir()
    before = {p: p.stat().st_mtime_ns for p in (model_dir / "1").rglob("*")}

    assert export.main(["--run", str(exported["run"]), "--base-dir", str(base), "--no-fold-bn"]) == 0
    assert f"to {model_dir / '6'} (batch norm unfolded" in capsys.readouterr().out
    assert export.existing_versions(str(model_dir)) == [1, 2, 5, 6]
    assert (model_dir / "5" / "keep.txt").read_text() == "version 5"
    # Readable like any folder made under the umask (a serving user may differ from the exporter).
    assert (model_dir / "6").stat().st_mode & 0o777 == (model_dir / "latest").stat().st_mode & 0o777
    assert before == {p: p.stat().st_mtime_ns for p in (model_dir / "1").rglob("*")}

    # A crash after the SavedModel was written leaves no version and no temporary folder.
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(export, "_self_check", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.export_model(exported["model"], str(base))
    assert export.existing_versions(str(model_dir)) == [1, 2, 5, 6]
    assert sorted(p.name for p in model_dir.glob(".tmp-export-*")) == [".tmp-export-crashed"]


# --------------------------------------------------------------- bad inputs


def test_wrong_dtype_or_shape_at_the_signatures_is_a_tensorflow_error(exported):
    loaded = tf.saved_model.load(str(exported["folded"]))
    serve, serve_float = loaded.signatures["serving_default"], loaded.signatures["serving_float"]
    zeros = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor but is a float tensor"):
        serve(images=tf.constant(zeros, tf.float32))
    for shape in [(2, 32, 32), (2, 28, 28, 3), (28, 28), (2, 784)]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"is not compatible with expected shape \[\?,28,28,1\]"):
            serve(images=tf.zeros(shape, tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a uint8 tensor"):
        serve_float(images=tf.constant(zeros[..., None]))
    for shape in [(2, 28, 28), (2, 32, 32, 1)]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"is not compatible with expected shape \[\?,28,28,1\]"):
            serve_float(images=tf.zeros(shape, tf.float32))
    with pytest.raises((TypeError, ValueError)):  # the restored function checks its input signature
        loaded.logits(tf.zeros((2, 28, 28), tf.float32))


def test_export_without_a_trained_model_fails_clearly(tmp_path, run_python):
    run_dir = tmp_path / "runs" / "unfinished"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    result = run_python(["-m", "training.export", "--run", str(run_dir), "--base-dir", str(tmp_path / "sm")], check=False)
    assert result.returncode == 1
    assert f"Run folder {run_dir} has no trained model (model.keras)" in result.stderr
    assert "Found: ['checkpoints', 'config.json']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sm").exists()

    missing = tmp_path / "runs" / "missing"
    result = run_python(["-m", "training.export", "--run", str(missing)], check=False)
    assert result.returncode == 1
    assert f"Received: run={str(missing)!r}, which does not exist" in result.stderr

    result = run_python(["-m", "training.export", "--help"], check=False)
    assert result.returncode == 0 and "--fold-bn, --no-fold-bn" in result.stdout and "--tflite" in result.stdout


def test_export_of_a_decorrelated_run_in_a_fresh_process(tmp_path, test_split, run_python):
    # A fresh process imports only what `training.export` imports: the saved DecorrelatedBatchNorm
    # must be registered by `import kerasbn` itself.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = _train_run(run_dir, "decorrelated")
    result = run_python(["-m", "training.export", "--run", str(run_dir), "--base-dir", str(tmp_path / "sm")], check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    version = tmp_path / "sm" / export.DEFAULT_MODEL_NAME / "1"
    assert f"Exported {run_dir} to {version} (batch norm folded into nothing)" in result.stdout
    images = test_split[0][:BATCH]
    logits = tf.saved_model.load(str(version)).signatures["serving_default"](images=tf.constant(images))["logits"]
    np.testing.assert_allclose(logits.numpy(), _keras_logits(model, images), rtol=0, atol=1e-4)


def test_bad_model_file_and_options_fail_clearly(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.keras").write_bytes(b"not a zip file")
    assert export.main(["--run", str(run_dir), "--base-dir", str(tmp_path / "sm")]) == 1
    assert f"Cannot load the trained model {run_dir / 'model.keras'}" in capsys.readouterr().err
    assert export.main(["--run", str(run_dir), "--model-name", "../escape"]) == 1
    assert "`--model-name` must be a folder name" in capsys.readouterr().err
    assert export.main(["--run", str(run_dir), "--no-fold-bn", "--tflite"]) == 1
    assert "Received: fold_bn=False, tflite=True" in capsys.readouterr().err
    assert not (tmp_path / "sm").exists()


# --------------------------------------------------------------- the .keras file


def test_keras_file_restores_batch_norm_layers_with_their_statistics(exported):
    model = exported["model"]
    for path in (exported["run"] / "model.keras", exported["folded"] / "assets.extra" / "model.keras"):
        restored = keras.saving.load_model(path, compile=False)
        pairs = [(a, b) for a, b in zip(model.layers, restored.layers) if isinstance(a, kerasbn.BatchNorm)]
        assert len(pairs) == 4
        for original, loaded in pairs:
            assert isinstance(loaded, kerasbn.BatchNorm) and loaded.momentum == original.momentum
            for name in ("moving_mean", "moving_variance", "gamma", "beta"):
                np.testing.assert_array_equal(_np(getattr(loaded, name)), _np(getattr(original, name)))
            # Trained statistics, not the initial zeros and ones.
            assert np.abs(_np(loaded.moving_mean)).max() > 1e-2
            assert np.abs(_np(loaded.moving_variance) - 1.0).max() > 1e-2


# --------------------------------------------------------------- TFLite


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_accuracy_equals_the_saved_model(trained_run, test_split, tmp_path):
    run_dir, model = trained_run
    images, labels = test_split
    version = Path(export.export_run(str(run_dir), str(tmp_path), tflite=True, verbose=False))
    interpreter = tf.lite.Interpreter(model_path=str(version / export.TFLITE_FILE))
    runner = interpreter.get_signature_runner("serving_default")
    tflite = runner(images=images)
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    saved = np.concatenate([serve(images=tf.constant(images[i : i + BATCH]))["class_ids"].numpy()
                            for i in range(0, len(images), BATCH)])
    tflite_acc, saved_acc = (np.mean(ids == labels) for ids in (tflite["class_ids"], saved))
    assert abs(tflite_acc - saved_acc) <= 0.001, (tflite_acc, saved_acc)
    np.testing.assert_allclose(tflite["logits"], _keras_logits(model, images), rtol=0, atol=1e-3)


# --------------------------------------------------------------- the driver


@pytest.mark.slow
def test_training_driver_ends_with_a_folded_export(tmp_path, run_python):
    result = run_python(
        ["-m", "training.train", "--limit-train", "256", "--batch-size", "64", "--epochs", "1",
         "--recompute-stats-batches", "2", "--out", "runs/smoke", "--quiet"],
        cwd=tmp_path, timeout=600,
    )
    assert "Exported runs/smoke to saved_models/lenet_bn/1 (batch norm folded into conv1, conv2, dense1, dense2)" in result.stdout
    version = tmp_path / "saved_models" / "lenet_bn" / "1"
    assert (version / "saved_model.pb").is_file() and (tmp_path / "runs" / "smoke" / "model.keras").is_file()
    assert not set(export.graph_op_types(version)) & export.BATCH_NORM_OP_TYPES

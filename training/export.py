"""Export a trained LeNet-BN run as a servable SavedModel that needs only TensorFlow.

    python -m training.export --run runs/<run-name>                # BN folded away, next free version
    python -m training.export --run runs/<run-name> --no-fold-bn   # BN kept, as its compiled inference path
    python -m training.export --run runs/<run-name> --tflite       # also <version>/model.tflite
    saved_model_cli show --dir saved_models/lenet_bn/1 --all

The SavedModel goes to `saved_models/<model-name>/<version>/` (the layout
TensorFlow Serving watches): integer versions, each export the next one,
written to a temporary folder and renamed into place, so an existing version
is never overwritten and a crash leaves no half-written one.

Signatures (batch dimension None everywhere):

* `serving_default`: `images`, uint8 `[batch, 28, 28]` or `[batch, 28, 28, 1]`,
  raw pixel values; the scaling to [0, 1] (`x / 255`, as in training) is
  inside the graph.
* `serving_float`: `images`, float32 `[batch, 28, 28, 1]` already in [0, 1].
* `class_names`: no input; the ten class names.

Both image signatures return `logits` (float32 `[batch, 10]`), `probabilities`
(their softmax) and `class_ids` (int64 `[batch]`). The class names are also
the asset `assets/class_names.txt`, one per line in class-id order.

With `--fold-bn` (the default) the model goes through `kerasbn.fold`: every
batch normalization that follows a Conv/Dense layer (no activation in between)
is folded into that layer's kernel and bias, `kernel' = kernel * a`,
`bias' = (bias - mean) * a + beta` per output channel with
`a = gamma / sqrt(moving_variance + epsilon)` (computed in float64); any other
batch normalization becomes the constant `x * a + b` of a `kerasbn.Affine`
layer. The folded graph holds no batch-normalization op at all. With `--no-fold-bn` each
`kerasbn.BatchNorm` runs as its compiled inference path
(`BatchNorm.inference_function`, the code of `call(training=False)`).

TensorFlow and Keras are imported only when a model is exported: `--help` and
the check of the run folder answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.runs import MODEL_FILE, RunError, check_run_dir, load_run_model

DEFAULT_BASE_DIR = "saved_models"
DEFAULT_MODEL_NAME = "lenet_bn"
TFLITE_FILE = "model.tflite"
EXPORT_INFO_FILE = os.path.join("assets.extra", "export.json")
KERAS_COPY_FILE = os.path.join("assets.extra", MODEL_FILE)
CLASS_NAMES_FILE = "class_names.txt"
SIGNATURES = ("serving_default", "serving_float", "class_names")

# Op types that compute a batch normalization: none of them may appear in a
# folded graph. Rsqrt is how `kerasbn.ops.fold_affine` and Keras' own
# `batch_normalization` take 1 / sqrt(variance + epsilon) at run time; the
# folded graph has that factor baked into its constants.
BATCH_NORM_OP_TYPES = frozenset(
    {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "BatchNormWithGlobalNormalization", "Rsqrt"}
)

_MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The check of a fresh export against the Keras model: loose, since it only
# guards against a broken graph; the tests hold it to 1e-5 / 1e-4.
_SELF_CHECK_TOLERANCE = 1e-3


class ExportError(RunError):
    """The model cannot be exported; the message says why and what to do."""


# ------------------------------------------------------------ folding


def _layer_chain(model) -> List:
    """The layers of a Sequential model in call order, nested Sequentials flattened."""
    import keras

    if not isinstance(model, keras.Sequential):
        raise ExportError(
            "The unfolded export runs each layer in turn and needs a keras.Sequential model; export it "
            f"folded instead. Received: model {model.name!r} of type {type(model).__name__}"
        )
    chain = []
    for layer in model.layers:
        chain.extend(_layer_chain(layer) if isinstance(layer, keras.Sequential) else [layer])
    return chain


def fold_batch_norms(model) -> Tuple[object, Dict[str, List]]:
    """`kerasbn.fold(model)` and its report as JSON-ready lists (see `kerasbn.fold`).

    Returns:
        `(folded_model, {"folded": [[producer, bn], ...], "affine": [bn, ...]})`.

    Raises:
        ExportError: the model cannot be folded (say, a subclassed model).
    """
    import kerasbn

    try:
        folded = kerasbn.fold(model)
    except ValueError as error:
        raise ExportError(f"Cannot fold batch normalization: {error} Export with --no-fold-bn.") from error
    report = folded.fold_report
    return folded, {"folded": [list(pair) for pair in report.folded], "affine": list(report.affine)}


# ------------------------------------------------------------ the serving graph


def _inference_forward(model) -> Callable:
    """`model`'s inference pass, each kerasbn.BatchNorm run as its compiled `inference_function`."""
    import keras

    import kerasbn

    if not isinstance(model, keras.Sequential):
        # call(training=False) runs BatchNorm._inference, the code inference_function compiles.
        return lambda x: model(x, training=False)
    chain = _layer_chain(model)

    def forward(x):
        for layer in chain:
            if isinstance(layer, kerasbn.BatchNorm):
                x = layer.inference_function(x)
            else:
                x = layer(x, training=False)
        return x

    return forward


def _image_shape(model) -> Tuple[int, int, int]:
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(size is None for size in shape):
        raise ExportError(
            "The serving signatures need a model of fixed-size (height, width, channels) image inputs. "
            f"Received: model {model.name!r} with input shape {tuple(model.inputs[0].shape)}"
        )
    return shape


def _serving_module(forward: Callable, image_shape: Tuple[int, int, int], class_names: Sequence[str], asset_path: str):
    """A tf.Module with the serving functions; its variables are exactly those the graph reads."""
    import tensorflow as tf

    height, width, channels = image_shape
    float_shape = [None, height, width, channels]
    module = tf.Module(name="serving")
    names = list(class_names)

    def outputs(logits):
        logits = tf.cast(logits, tf.float32)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "class_ids": tf.argmax(logits, axis=-1, output_type=tf.int64),
        }

    # Restored tf.functions check their input shapes; restored signatures only
    # check dtypes, so the signatures below check shapes with tf.ensure_shape.
    module.logits = tf.function(
        forward, input_signature=[tf.TensorSpec(float_shape, tf.float32, name="images")], autograph=False
    )

    def to_nhwc(images):
        # [b, h, w] gets its channel axis; [b, h, w, c] stays. No tf.cond: the
        # rank is only known at run time, and EnsureShape then checks the result.
        shape = tf.shape(images)
        x = tf.reshape(images, tf.concat([shape[:3], shape[3:4], tf.ones([1], tf.int32)], axis=0)[:4])
        return tf.ensure_shape(x, float_shape)

    def serve(images):
        # The same scaling as training/data.py: cast to float32, divide by 255.
        return outputs(module.logits(tf.cast(to_nhwc(images), tf.float32) / 255.0))

    def serve_float(images):
        return outputs(module.logits(tf.ensure_shape(images, float_shape)))

    def class_names_fn():
        return {"class_names": tf.constant(names, dtype=tf.string)}

    module.serve = tf.function(
        serve, input_signature=[tf.TensorSpec(None, tf.uint8, name="images")], autograph=False
    )
    module.serve_float = tf.function(
        serve_float, input_signature=[tf.TensorSpec(float_shape, tf.float32, name="images")], autograph=False
    )
    module.class_names = tf.function(class_names_fn, input_signature=[], autograph=False)
    module.class_names_file = tf.saved_model.Asset(asset_path)
    concrete = [fn.get_concrete_function() for fn in (module.logits, module.serve, module.serve_float)]
    seen, variables = set(), []
    for function in concrete:
        for variable in function.variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    module.model_variables = variables
    return module


def graph_op_types(saved_model_dir: str) -> Dict[str, int]:
    """Counts the op types in a SavedModel's graph and all its functions (read from saved_model.pb)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as handle:
        proto.ParseFromString(handle.read())
    counts: Dict[str, int] = {}
    for meta_graph in proto.meta_graphs:
        nodes = list(meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            nodes.extend(function.node_def)
        for node in nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


# ------------------------------------------------------------ versions


def _check_options(model_name: str, fold_bn: bool, tflite: bool) -> None:
    if not isinstance(model_name, str) or not _MODEL_NAME_PATTERN.match(model_name):
        raise ExportError(
            "`--model-name` must be a folder name of letters, digits, '_', '-' and '.', not starting with "
            f"'.' or '-'. Received: model_name={model_name!r}"
        )
    if tflite and not fold_bn:
        raise ExportError(
            "`--tflite` converts the folded SavedModel; drop --no-fold-bn. Received: fold_bn=False, tflite=True"
        )


def existing_versions(model_dir: str) -> List[int]:
    """The integer versions under `model_dir`, ascending (other names are ignored)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir) if name.isdigit())


@contextlib.contextmanager
def _version_lock(model_dir: str):
    """Serialises choosing and claiming a version between concurrent exports."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the exists-check before the rename still never overwrites
        yield
        return
    with open(os.path.join(model_dir, ".export.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _claim_version(tmp_dir: str, model_dir: str) -> str:
    """Renames the finished `tmp_dir` to the next free version; never replaces an existing one."""
    with _version_lock(model_dir):
        version = max(existing_versions(model_dir), default=0) + 1
        final = os.path.join(model_dir, str(version))
        if os.path.exists(final):  # only a racing exporter without the lock could get here
            raise ExportError(f"Version folder {final} appeared during the export; not overwriting it.")
        os.rename(tmp_dir, final)
    return final


# ------------------------------------------------------------ export


def _self_check(saved_model_dir: str, model, tolerance: float) -> float:
    """Loads the fresh SavedModel and compares it with the Keras model on fixed pseudo-random images."""
    import tensorflow as tf

    height, width, channels = _image_shape(model)
    images = np.random.default_rng(0).integers(0, 256, size=(32, height, width, channels), dtype=np.uint8)
    serving = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    exported = serving(images=tf.constant(images))["logits"].numpy()
    expected = model(tf.cast(images, tf.float32) / 255.0, training=False).numpy()
    error = float(np.max(np.abs(exported - expected)))
    if not error <= tolerance:
        raise ExportError(
            f"The exported SavedModel disagrees with the Keras model: max |logit difference| {error:.3g} "
            f"> {tolerance:g} on 32 test images. Nothing was written."
        )
    return error


def convert_to_tflite(saved_model_dir: str) -> bytes:
    """Converts a SavedModel from this module to TFLite: uint8 `[batch, 28, 28]` in, the three outputs out.

    The TFLite model's signature `serving_default` wraps the SavedModel's
    `logits` function (loaded from disk) with the same scaling as the
    SavedModel's `serving_default`. TFLite checks input shapes itself, so the
    graph needs no `EnsureShape` (which TFLite's builtin ops lack).
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    float_spec = loaded.logits.concrete_functions[0].structured_input_signature[0][0]
    height, width, channels = float_spec.shape[1:]
    shape = [None, height, width] if channels == 1 else [None, height, width, channels]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")], autograph=False)
    def serve(images):
        x = tf.cast(images, tf.float32) / 255.0
        if channels == 1:
            x = tf.expand_dims(x, -1)
        logits = loaded.logits(x)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "class_ids": tf.argmax(logits, axis=-1, output_type=tf.int64),
        }

    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], loaded)
    return converter.convert()


def export_model(
    model,
    base_dir: str = DEFAULT_BASE_DIR,
    model_name: str = DEFAULT_MODEL_NAME,
    *,
    fold_bn: bool = True,
    tflite: bool = False,
    class_names: Optional[Sequence[str]] = None,
    source_run: Optional[str] = None,
) -> str:
    """Exports a built Keras model as the next version under `base_dir/model_name/`.

    Args:
        model: A built Keras model of images `[batch, H, W, C]` in [0, 1] to logits.
        base_dir: The folder of exported models (`saved_models`).
        model_name: The model's folder under `base_dir`.
        fold_bn: Fold batch normalization away (see `fold_batch_norms`);
            False serves each kerasbn.BatchNorm as its `inference_function`.
        tflite: Also write `model.tflite`, converted from the folded SavedModel.
        class_names: One name per logit (default: Fashion-MNIST's).
        source_run: The run folder, recorded in `assets.extra/export.json`;
            its `model.keras` is copied to `assets.extra/model.keras`.

    Returns:
        The new version folder, e.g. `saved_models/lenet_bn/3`.

    Raises:
        ExportError: a bad argument, a model that cannot be exported, or an
            export that disagrees with the model. Nothing is left behind.
    """
    import keras
    import tensorflow as tf

    import kerasbn

    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"Exporting a SavedModel needs the TensorFlow backend (KERAS_BACKEND=tensorflow). "
            f"Received backend {keras.backend.backend()!r}"
        )
    _check_options(model_name, fold_bn, tflite)
    if class_names is None:
        from training.data import CLASS_NAMES

        class_names = CLASS_NAMES
    class_names = [str(name) for name in class_names]
    image_shape = _image_shape(model)
    num_outputs = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    if num_outputs is not None and num_outputs != len(class_names):
        raise ExportError(
            f"`class_names` must name each of the model's {num_outputs} outputs. "
            f"Received: {len(class_names)} class names"
        )

    if fold_bn:
        serving_model, report = fold_batch_norms(model)
        forward = lambda x: serving_model(x, training=False)  # noqa: E731
    else:
        serving_model, report = model, {"folded": [], "affine": []}
        forward = _inference_forward(model)

    model_dir = os.path.join(base_dir, model_name)
    os.makedirs(model_dir, exist_ok=True)
    # os.mkdir, not tempfile.mkdtemp: the version folder keeps the umask's
    # permissions (mkdtemp's 0700 would hide it from a serving user).
    tmp_dir = os.path.join(model_dir, f".tmp-export-{uuid.uuid4().hex}")
    os.mkdir(tmp_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="kerasbn-export-") as scratch:
            asset_path = os.path.join(scratch, CLASS_NAMES_FILE)
            with open(asset_path, "w") as handle:
                handle.write("\n".join(class_names) + "\n")
            module = _serving_module(forward, image_shape, class_names, asset_path)
            tf.saved_model.save(
                module,
                tmp_dir,
                signatures={
                    "serving_default": module.serve,
                    "serving_float": module.serve_float,
                    "class_names": module.class_names,
                },
            )
        max_error = _self_check(tmp_dir, model, _SELF_CHECK_TOLERANCE)
        if fold_bn:
            found = sorted(set(graph_op_types(tmp_dir)) & BATCH_NORM_OP_TYPES)
            if found:
                raise ExportError(f"The folded graph still holds batch-normalization ops {found}; nothing was written.")
        if tflite:
            with open(os.path.join(tmp_dir, TFLITE_FILE), "wb") as handle:
                handle.write(convert_to_tflite(tmp_dir))
        os.makedirs(os.path.join(tmp_dir, "assets.extra"), exist_ok=True)
        if source_run is not None and os.path.isfile(os.path.join(source_run, MODEL_FILE)):
            shutil.copy2(os.path.join(source_run, MODEL_FILE), os.path.join(tmp_dir, KERAS_COPY_FILE))
        info = {
            "model_name": model_name,
            "source_run": None if source_run is None else os.path.abspath(source_run),
            "keras_model": model.name,
            "fold_bn": bool(fold_bn),
            "folded": report["folded"],
            "affine": report["affine"],
            "signatures": list(SIGNATURES),
            "image_shape": list(image_shape),
            "class_names": class_names,
            "self_check_max_abs_logit_error": max_error,
            "tflite": TFLITE_FILE if tflite else None,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "kerasbn": kerasbn.__version__},
        }
        with open(os.path.join(tmp_dir, EXPORT_INFO_FILE), "w") as handle:
            json.dump(info, handle, indent=2)
            handle.write("\n")
        return _claim_version(tmp_dir, model_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def export_run(
    run_dir: str,
    base_dir: str = DEFAULT_BASE_DIR,
    model_name: str = DEFAULT_MODEL_NAME,
    *,
    fold_bn: bool = True,
    tflite: bool = False,
    verbose: bool = True,
) -> str:
    """Exports the trained model of a run folder (`runs/<run-name>`) as the next SavedModel version.

    Called by `python -m training.train` at the end of a run. The run's
    `model.keras` stays where it is (and a copy goes into the version's
    `assets.extra/`).

    Args:
        run_dir: A run folder with `model.keras`.
        base_dir, model_name, fold_bn, tflite: As for `export_model`.
        verbose: Print one line saying what was written.

    Returns:
        The new version folder.

    Raises:
        RunError: the run folder has no loadable model (`training.runs.load_run_model`).
        ExportError: see `export_model`.
    """
    check_run_dir(run_dir)
    _check_options(model_name, fold_bn, tflite)
    model = load_run_model(run_dir)
    version_dir = export_model(
        model, base_dir, model_name, fold_bn=fold_bn, tflite=tflite, source_run=run_dir
    )
    if verbose:
        with open(os.path.join(version_dir, EXPORT_INFO_FILE)) as handle:
            info = json.load(handle)
        if fold_bn:
            how = f"batch norm folded into {', '.join(linear for linear, _ in info['folded']) or 'nothing'}"
            if info["affine"]:
                how += f"; affine: {', '.join(info['affine'])}"
        else:
            how = "batch norm unfolded (compiled inference path)"
        extra = f", {TFLITE_FILE}" if tflite else ""
        print(f"Exported {run_dir} to {version_dir} ({how}{extra})")
    return version_dir


# ------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description=(
            "Export a trained run as a SavedModel (saved_models/<model-name>/<version>/) that loads with "
            "TensorFlow alone. Signatures: serving_default (uint8 [batch,28,28] or [batch,28,28,1]), "
            "serving_float (float32 [batch,28,28,1] in [0,1]), class_names."
        ),
    )
    parser.add_argument("--run", required=True, help="Run folder written by python -m training.train (holds model.keras).")
    parser.add_argument(
        "--fold-bn", action=argparse.BooleanOptionalAction, default=True,
        help="Fold batch normalization into the preceding Conv2D/Dense (default: on). "
        "--no-fold-bn keeps each kerasbn.BatchNorm as its compiled inference path.",
    )
    parser.add_argument("--tflite", action="store_true", help="Also write model.tflite (from the folded SavedModel).")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help=f"Folder under --base-dir (default: {DEFAULT_MODEL_NAME}).")
    parser.add_argument("--base-dir", default=DEFAULT_BASE_DIR, help=f"Folder of exported models (default: {DEFAULT_BASE_DIR}).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m training.export`. Returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        export_run(args.run, args.base_dir, args.model_name, fold_bn=args.fold_bn, tflite=args.tflite)
    except RunError as error:  # ExportError included
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

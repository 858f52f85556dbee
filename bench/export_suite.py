"""Part 4: inference of the exported LeNet-BN SavedModel, batch norm folded against unfolded.

A LeNet-BN with seeded random moving statistics, gammas and betas (folding
then has real work to do, and the outputs are checked against the Keras
model's) is exported with `training.export.export_model` twice:
`savedmodel_folded` (`fold_bn=True`: no batch-norm op left in the graph) and
`savedmodel_unfolded` (`fold_bn=False`: each `kerasbn.BatchNorm` as its
compiled inference path, `x * a + b`). Both are loaded back and their
`serving_float` signature is timed, interleaved with the Keras model's own
predict step (`keras`, the reference of `ratio_to_keras` in this suite).
Batch 1 measures latency (Python dispatch of the signature included, as a
Python server pays it), batch 256 throughput. The goal is evaluated by
`bench.report.goal_export`; the suite's notes say how it measured.
"""

from __future__ import annotations

import tempfile
import time
from typing import Dict, List

import numpy as np

from bench.suites import BenchConfig, SuiteResult, register_suite, skipped, timed_records
from bench.timing import Candidate, time_interleaved

SUITE = "export"
BATCHES = (1, 256)
IMAGE_SHAPE = (28, 28, 1)
FOLDED, UNFOLDED, KERAS = "savedmodel_folded", "savedmodel_unfolded", "keras"
IMPLEMENTATIONS: Dict[str, str] = {
    FOLDED: "SavedModel exported with fold_bn=True (BN folded into the kernels), serving_float signature",
    UNFOLDED: "SavedModel exported with fold_bn=False (each BatchNorm's inference_function), serving_float signature",
    KERAS: "the Keras model's predict step, tf.function(model(x, training=False)): the reference, ratio 1",
}
SIGNATURE = "serving_float"
# Folded and unfolded compute the same logits up to float32 rounding.
LOGIT_TOLERANCE = 1e-3


def randomize_batch_norms(model, seed: int = 0) -> int:
    """Gives every batch norm of `model` random moving statistics, gamma and beta; returns how many.

    Fresh statistics (0, 1, 1, 0) fold into almost nothing; random ones make the output check mean something.
    """
    rng = np.random.default_rng(seed)
    layers = [layer for layer in model.layers if hasattr(layer, "moving_variance")]
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        draws = {"moving_mean": rng.normal(0.0, 0.5, shape), "moving_variance": rng.uniform(0.5, 2.0, shape),
                 "gamma": rng.uniform(0.5, 1.5, shape), "beta": rng.normal(0.0, 0.2, shape)}
        for name, values in draws.items():
            if getattr(layer, name) is not None:
                getattr(layer, name).assign(values.astype("float32"))
    return len(layers)


def run_batch(batch: int, signatures: dict, predict, repeats: int, min_repetition_s: float, extra: dict) -> List[dict]:
    """Times the two SavedModels and the Keras predict step on one batch size; returns its records."""
    import tensorflow as tf

    label = dict(shape=(batch, *IMAGE_SHAPE), layout="NHWC", mode="inference", jit=False)
    x = tf.constant(np.random.default_rng(batch).uniform(0.0, 1.0, (batch, *IMAGE_SHAPE)).astype("float32"))
    expected = predict(x).numpy()
    records: List[dict] = []
    candidates = [Candidate(KERAS, lambda: predict(x))]
    differences = {KERAS: 0.0}
    for name, signature in signatures.items():
        logits = signature(images=x)["logits"].numpy()  # also the first (warm-up) call
        differences[name] = float(np.max(np.abs(logits - expected)))
        if differences[name] <= LOGIT_TOLERANCE:
            candidates.append(Candidate(name, lambda signature=signature: signature(images=x)))
        else:
            reason = f"logits differ from the Keras model's by {differences[name]:.3g} > {LOGIT_TOLERANCE:g}"
            records.append(skipped(SUITE, name, reason=reason, **label))
    timings = time_interleaved(candidates, repeats=repeats, min_repetition_s=min_repetition_s, warmup_calls=2)
    label.update(batch=batch)
    records += timed_records(SUITE, timings, lambda name: dict(**label, max_abs_logit_diff_to_keras=differences[name],
                                                             **extra.get(name, {})))  # fmt: skip
    for record in records:
        if record["record"] == "measurement":
            record["examples_per_s"] = batch / record["median_s"]
    return records


@register_suite(SUITE, "exported LeNet-BN SavedModel inference, BN folded vs unfolded, batch 1 and 256")
def run_export(config: BenchConfig, previous) -> SuiteResult:
    del previous
    import tensorflow as tf

    from training.export import BATCH_NORM_OP_TYPES, export_model, graph_op_types
    from training.models import build_lenet

    repeats = config.repeats_or(full=15, quick=3)
    min_repetition_s = 0.02 if config.quick else 0.2
    model = build_lenet("kerasbn")
    randomized = randomize_batch_norms(model)
    signature = [tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32)]
    predict = tf.function(lambda x: model(x, training=False), input_signature=signature, autograph=False)
    records: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="kerasbn-bench-export-") as folder:
        signatures, extra, loaded_models = {}, {}, []
        for name, fold_bn in ((FOLDED, True), (UNFOLDED, False)):
            start = time.perf_counter()
            version_dir = export_model(model, folder, name, fold_bn=fold_bn)
            exported = time.perf_counter()
            loaded = tf.saved_model.load(version_dir)
            # The signature holds its variables weakly: keep the loaded object alive.
            loaded_models.append(loaded)
            signatures[name] = loaded.signatures[SIGNATURE]
            op_types = graph_op_types(version_dir)
            # Op counts over all the SavedModel's functions (logits, serve, serve_float).
            extra[name] = dict(signature=SIGNATURE, fold_bn=fold_bn, export_s=exported - start,
                               load_s=time.perf_counter() - exported,
                               batch_norm_ops={op: op_types[op] for op in sorted(BATCH_NORM_OP_TYPES & set(op_types))})
        for batch in BATCHES:
            records += run_batch(batch, signatures, predict, repeats, min_repetition_s, extra)
    notes = [
        f"LeNet-BN with {randomized} batch norms given seeded random moving statistics, gamma and beta, exported "
        "with training.export.export_model(fold_bn=True / False) and loaded back with tf.saved_model.load.",
        f"Timed: the `{SIGNATURE}` signature (float32 [batch, 28, 28, 1] in), called from Python, against `keras`, "
        "the Keras model's own predict step tf.function(model(x, training=False)): ratio_to_keras's reference here.",
        f"One checked call (logits within {LOGIT_TOLERANCE:g} of the Keras model's), two warm-up calls, then "
        f"{repeats} repetitions interleaved, each averaging calls over >= {min_repetition_s * 1e3:.0f} ms.",
    ]
    return SuiteResult(records=records, notes=notes)

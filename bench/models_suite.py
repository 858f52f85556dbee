"""Issue 9: ResNet50, MobileNetV2 and EfficientNetB0 with keras BN, kerasbn.convert, kerasbn.fold and no BN.

The suite runs this module as its worker (`bench.workers`), one process per
replica count (1 device, then MirroredStrategy over 2 logical CPU devices):

    python -m bench.models_suite --replicas 2 --networks resnet50 --image-size 112 --batch 32 --json-out m.json

Per network it times the training step of the `VARIANTS` (Keras's own train
function on the strategy's distributed synthetic dataset: what `fit` runs per
step) and, with `--inference`, inference in a `tf.function`, all interleaved.
The goals are evaluated by `bench.report.goal_models`.
"""

from __future__ import annotations

import argparse
from typing import Dict, List

from bench.suites import BenchConfig, SuiteResult, register_suite, timed_records
from bench.timing import Candidate, time_interleaved
from bench.workers import compile_models, configure_devices, run_worker, serve, synthetic_dataset

SUITE = "models"
NETWORKS: Dict[str, str] = {"resnet50": "ResNet50", "mobilenetv2": "MobileNetV2", "efficientnetb0": "EfficientNetB0"}
STOCK, CONVERTED, FOLDED, BOUND = "stock", "kerasbn.convert", "kerasbn.fold", "no_bn"
VARIANTS: Dict[str, str] = {
    STOCK: "the keras.applications network as shipped, keras.layers.BatchNormalization (the reference, ratio 1)",
    CONVERTED: "kerasbn.convert(stock, to='kerasbn'): every BatchNormalization replaced by kerasbn.BatchNorm",
    FOLDED: "kerasbn.fold(stock): the inference model with no batch-norm layer (folded into kernels, or x*a+b)",
    BOUND: "every batch norm replaced by an identity layer (without_batch_norm): the no-BN bound",
}


@register_suite(SUITE, "keras.applications ResNet50/MobileNetV2/EfficientNetB0: stock vs kerasbn vs no BN")
def run_models(config: BenchConfig, previous) -> SuiteResult:
    del previous
    # Quick: one small network at 32x32, enough to check the records.
    networks = ("mobilenetv2",) if config.quick else tuple(NETWORKS)
    size, batch = (32, 8) if config.quick else (112, 32)
    repeats = config.repeats_or(full=8, quick=1)
    warmup = 1 if config.quick else 2
    # A repetition averages calls over >= 0.5 s: inference calls are short and noisy alone.
    min_repetition_s = 0.0 if config.quick else 0.5
    records = []
    for replicas in (1, 2):
        arguments = [
            "--replicas", replicas, "--networks", *networks, "--image-size", size, "--batch", batch,
            "--repeats", repeats, "--warmup", warmup, "--min-repetition-s", min_repetition_s,
        ]  # fmt: skip
        records += run_worker(__name__, arguments + ["--inference"] * (replicas == 1), 600 if config.quick else 1800)
    notes = [
        f"keras.applications networks, weights=None, input {size}x{size}x3, 10 classes, global batch {batch}, "
        "float32, SGD(0.01), jit_compile=False; synthetic images. Training step: model.train_function on the "
        "strategy's distributed dataset (fit's step). Inference: tf.function(model(x, training=False)).",
        f"Per network, every variant interleaved in one process per replica count (1 device; MirroredStrategy over 2 "
        f"logical CPU devices): {warmup} warm-up calls, {repeats} rounds, each averaging calls over "
        f">= {min_repetition_s:g} s. BN share = (t - t_no_bn) / (t_stock - t_no_bn).",
    ]
    return SuiteResult(records=records, notes=notes)


def rebuild_batch_norms(model, replace):
    """A copy of `model` (fresh weights) with every batch norm, in nested models too, replaced by `replace(layer)`."""
    import keras

    from kerasbn.transforms import is_batch_norm

    def clone(layer):
        return replace(layer) if is_batch_norm(layer) else layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def without_batch_norm(model):
    """A copy of `model` with every batch norm replaced by an identity layer: a speed bound, not a trained model.

    A `Lambda`: the graph replays the batch norm's call with `training` and `mask`, which `Identity` does not take.
    """
    import keras

    return rebuild_batch_norms(model, lambda layer: keras.layers.Lambda(lambda x: x, name=layer.name))


def count_batch_norms(model) -> int:
    from kerasbn.transforms import is_batch_norm

    return sum(is_batch_norm(layer) for layer in model._flatten_layers(include_self=False))


def build_variants(network: str, image_shape, strategy) -> Dict[str, object]:
    """`stock`, `kerasbn.convert` and `no_bn` of `network`, built and compiled in `strategy`'s scope."""
    import keras

    import kerasbn

    with strategy.scope():
        stock = getattr(keras.applications, NETWORKS[network])(weights=None, input_shape=image_shape, classes=10)
        models = {STOCK: stock, CONVERTED: kerasbn.convert(stock, to="kerasbn"), BOUND: without_batch_norm(stock)}
        return compile_models(models)


def train_call(model, strategy, dataset):
    """One training step per call: Keras's own train function on the distributed dataset, as in `fit`."""
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    return lambda: model.train_function(iterator)


def predict_call(model, images, strategy=None):
    """Inference of `images` per call, a tf.function; in `strategy.run` (every replica on them) given a strategy."""
    import tensorflow as tf

    def infer():
        return model(images, training=False)

    return tf.function(infer if strategy is None else lambda: strategy.run(infer), autograph=False)


def add_shares(records: List[dict]) -> None:
    """Adds `ratio_to_bound` and `bn_share` = (t - t_bound) / (t_stock - t_bound) to the models records: the part
    of stock's batch-norm cost a variant still pays (stock 1, no BN 0), same network, mode and replicas."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for record in records:
        if record.get("record") == "measurement" and record["suite"] == SUITE:
            key = (record["network"], record["mode"], record["replicas"])
            groups.setdefault(key, {})[record["variant"]] = record
    for group in groups.values():
        stock, bound = group.get(STOCK), group.get(BOUND)
        for record in group.values():
            record["ratio_to_bound"] = record["median_s"] / bound["median_s"] if bound else None
            paid = stock["median_s"] - bound["median_s"] if stock and bound else 0
            record["bn_share"] = (record["median_s"] - bound["median_s"]) / paid if paid else None


def measure_network(network: str, strategy, args) -> List[dict]:
    """Times every variant of `network` interleaved; returns its records."""
    import numpy as np
    import tensorflow as tf

    import kerasbn

    replicas = strategy.num_replicas_in_sync
    image_shape = (args.image_size, args.image_size, 3)
    models = build_variants(network, image_shape, strategy)
    dataset = synthetic_dataset(args.batch, image_shape, batches=4)
    candidates, labels = [], {}

    def add(mode: str, variant: str, model, call, **extra):
        name = f"{network}/{'train' if mode == 'train_step' else 'infer'}/{replicas}dev/{variant}"
        labels[name] = dict(mode=mode, variant=variant, network=network, reference=variant == STOCK,
                            batch_norm_layers=count_batch_norms(model), parameters=model.count_params(), **extra)
        candidates.append(Candidate(name, call))

    for variant, model in models.items():
        add("train_step", variant, model, train_call(model, strategy, dataset))
    if args.inference:
        images = tf.constant(np.random.default_rng(1).standard_normal((args.batch, *image_shape), dtype=np.float32))
        folded = kerasbn.fold(models[STOCK])
        report = folded.fold_report
        for variant, model in ((STOCK, models[STOCK]), (FOLDED, folded), (BOUND, models[BOUND])):
            extra = dict(folded_pairs=len(report.folded), affine_layers=len(report.affine)) if model is folded else {}
            add("inference", variant, model, predict_call(model, images), **extra)
    timings = time_interleaved(candidates, args.repeats, args.min_repetition_s, warmup_calls=args.warmup)
    label = dict(shape=(args.batch, *image_shape), layout="NHWC", jit=False, replicas=replicas,
                 strategy=type(strategy).__name__)  # fmt: skip
    records = timed_records(SUITE, timings, lambda name: dict(**label, **labels[name]))
    add_shares(records)
    return records


def measure(args: argparse.Namespace) -> List[dict]:
    strategy = configure_devices(args.replicas)
    return [record for network in args.networks for record in measure_network(network, strategy, args)]


if __name__ == "__main__":  # --batch: global; --warmup: untimed calls before the calibrating one
    serve(measure, replicas=1, networks=list(NETWORKS), image_size=112, batch=32, repeats=10, warmup=2,
          min_repetition_s=0.3, inference=False)  # fmt: skip

"""The `models` suite's worker: keras.applications networks with keras BN, kerasbn and no BN, in its own process.

    python -m bench.models_worker --replicas 2 --networks resnet50 --image-size 112 --batch 32 \
        --repeats 10 --json-out /tmp/models.json

For each network (keras.applications, weights=None, 10 classes) it builds,
inside the strategy for `--replicas` (`bench.training_worker.configure_devices`):

* `stock`: the network as Keras ships it (keras.layers.BatchNormalization);
* `kerasbn.convert`: `kerasbn.convert(stock, to="kerasbn")`;
* `no_bn`: the network with every batch norm replaced by an identity layer
  (`without_batch_norm`), the bound any batch norm can approach;

and times one training step of each (`model.train_function` on an iterator
of the strategy's distributed synthetic dataset: what `fit` runs per step,
forward, loss, gradients and the SGD update, without fit's callbacks). With
`--inference` it also times `model(x, training=False)` in a `tf.function` for
`stock`, `kerasbn.fold(stock)` and `no_bn`. Everything of one network is
timed interleaved (`bench.timing`); records go to `--json-out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

SUITE = "models"
NETWORKS: Dict[str, str] = {"resnet50": "ResNet50", "mobilenetv2": "MobileNetV2", "efficientnetb0": "EfficientNetB0"}
STOCK, CONVERTED, FOLDED, BOUND = "stock", "kerasbn.convert", "kerasbn.fold", "no_bn"
VARIANTS: Dict[str, str] = {
    STOCK: "the keras.applications network as shipped, keras.layers.BatchNormalization (the reference, ratio 1)",
    CONVERTED: "kerasbn.convert(stock, to='kerasbn'): every BatchNormalization replaced by kerasbn.BatchNorm",
    FOLDED: "kerasbn.fold(stock): the inference model with no batch-norm layer (folded into kernels, or x*a+b)",
    BOUND: "every batch norm replaced by an identity layer (without_batch_norm): the no-BN bound",
}


def rebuild_batch_norms(model, replace):
    """A copy of `model` (fresh weights) with every batch norm, in nested models too, replaced by `replace(layer)`."""
    import keras

    from kerasbn.transforms import is_batch_norm

    def clone(layer):
        return replace(layer) if is_batch_norm(layer) else layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def without_batch_norm(model):
    """A copy of `model` with every batch norm replaced by an identity layer: a speed bound, not a trained model.

    The identity is a `Lambda` because the graph replays the batch norm's call
    with its `training` and `mask` arguments, which `keras.layers.Identity`
    does not take.
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
        for model in models.values():
            model.compile(
                optimizer=keras.optimizers.SGD(learning_rate=0.01),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                jit_compile=False,
            )
    return models


def train_call(model, strategy, dataset):
    """One training step per call: Keras's own train function on the distributed dataset, as in `fit`."""
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    return lambda: model.train_function(iterator)


def predict_call(model, images, strategy=None):
    """Inference per call, in a tf.function; in `strategy.run` (every replica on `images`) when given a strategy."""
    import tensorflow as tf

    def infer(x):
        return model(x, training=False)

    predict = tf.function(infer if strategy is None else lambda x: strategy.run(infer, args=(x,)), autograph=False)
    return lambda: predict(images)


def add_shares(records: List[dict]) -> None:
    """Adds `ratio_to_bound` and `bn_share` = (t - t_bound) / (t_stock - t_bound) to the models records.

    `bn_share` is the part of stock's batch-norm cost a variant still pays:
    1 for stock, 0 for no BN. Medians of the same network, mode and replicas.
    """
    groups: Dict[tuple, Dict[str, dict]] = {}
    for record in records:
        if record.get("record") == "measurement" and record["suite"] == SUITE:
            key = (record["network"], record["mode"], record["replicas"])
            groups.setdefault(key, {})[record["variant"]] = record
    for group in groups.values():
        stock, bound = group.get(STOCK), group.get(BOUND)
        for record in group.values():
            record["ratio_to_bound"] = record["median_s"] / bound["median_s"] if bound else None
            record["bn_share"] = None
            if stock and bound and stock["median_s"] != bound["median_s"]:
                record["bn_share"] = (record["median_s"] - bound["median_s"]) / (stock["median_s"] - bound["median_s"])


def measure_network(network: str, strategy, args) -> List[dict]:
    """Times every variant of `network` interleaved; returns its records."""
    import numpy as np
    import tensorflow as tf

    import kerasbn
    from bench.suites import timed_records
    from bench.timing import Candidate, time_interleaved
    from bench.training_worker import synthetic_dataset

    replicas = strategy.num_replicas_in_sync
    image_shape = (args.image_size, args.image_size, 3)
    dataset = synthetic_dataset(args.batch, image_shape, batches=4)
    models = build_variants(network, image_shape, strategy)
    candidates, labels = [], {}

    def add(mode: str, variant: str, model, call):
        task = "train" if mode == "train_step" else "infer"
        name = f"{network}/{task}/{replicas}dev/{variant}"
        labels[name] = dict(
            mode=mode, variant=variant, network=network, reference=variant == STOCK,
            batch_norm_layers=count_batch_norms(model), parameters=model.count_params(),
        )  # fmt: skip
        candidates.append(Candidate(name, call))

    for variant, model in models.items():
        add("train_step", variant, model, train_call(model, strategy, dataset))
    if args.inference:
        images = tf.constant(np.random.default_rng(1).standard_normal((args.batch, *image_shape), dtype=np.float32))
        folded = kerasbn.fold(models[STOCK])
        report = getattr(folded, "fold_report", None)
        inference = {STOCK: models[STOCK], FOLDED: folded, BOUND: models[BOUND]}
        for variant, model in inference.items():
            add("inference", variant, model, predict_call(model, images))
        if report is not None:
            labels[f"{network}/infer/{replicas}dev/{FOLDED}"].update(
                folded_pairs=len(report.folded), affine_layers=len(report.affine)
            )
    timings = time_interleaved(
        candidates, repeats=args.repeats, min_repetition_s=args.min_repetition_s, warmup_calls=args.warmup
    )
    label = dict(shape=(args.batch, *image_shape), layout="NHWC", jit=False, replicas=replicas)
    label.update(strategy=type(strategy).__name__)
    records = timed_records(SUITE, timings, lambda name: dict(**label, **labels[name]))
    add_shares(records)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), required=True)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the calibrating one")
    parser.add_argument("--min-repetition-s", type=float, default=0.3)
    parser.add_argument("--inference", action="store_true", help="also time inference (stock, fold, no BN)")
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    from bench.training_worker import configure_devices

    strategy = configure_devices(args.replicas)()
    records = []
    for network in args.networks:
        records += measure_network(network, strategy, args)
    with open(args.json_out, "w", encoding="utf-8") as out:
        json.dump({"records": records}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

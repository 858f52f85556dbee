"""The source chapter's exercises on batch norm, answered by training runs.

    python -m training.exercises                        # every exercise, 3 seeds, the default recipe
    python -m training.exercises --exercise dropout     # one exercise (comma-separate several)
    python -m training.exercises --quick --out DIR      # 1 epoch, 1 seed, a small slice: minutes

Every run is `training.train.run` with the recipe's settings (data, loop,
seeds, BN statistics recomputed after training) and one exercise's
changes on top (`EXERCISES`). A configuration that several exercises share
(the default LeNet-BN appears in five) is trained once: its run folder
is named by a hash of its settings and reused. Results go to
`runs/exercises-<name>/` (or `--out`):

* `results.json`: one record per (exercise, variant, seed), written as each
  finishes, so a repeated command trains nothing that already finished
  (`--overwrite` starts afresh);
* `results.md`: per variant the mean and min-max over seeds;
* `<exercise>.png` (train and test accuracy per epoch) and `summary.png`;
* `train/<run>/`: the training runs themselves (what `training.train` writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from training import artifacts
from training.runs import load_run_model
from training.config import ConfigError, TrainConfig, add_flags, config_from_args, run_cli

# The tuning search's best learning rate without BN (README, "Tuning the learning rate").
NO_BN_BEST_LR = 1.43
LEARNING_RATES = (0.1, 1.0, 10.0)
# TrainConfig fields that do not change what a run computes: left out of its identity.
NOT_IDENTITY = ("out", "run_name", "quiet", "export", "data_dir")
# Training examples evaluated in inference mode for the train accuracy of the records.
TRAIN_EVAL_EXAMPLES = 10000


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of an exercise.

    Args:
        name: Its label in tables and plots.
        settings: TrainConfig fields changed from the recipe.
        moving: Report the test accuracy with the moving averages, not with
            the recomputed statistics (the same training run either way).
    """

    name: str
    settings: Tuple[Tuple[str, object], ...] = ()
    moving: bool = False


def _variant(name: str, moving: bool = False, **settings) -> Variant:
    return Variant(name, tuple(sorted(settings.items())), moving)


@dataclasses.dataclass(frozen=True)
class Exercise:
    key: str
    question: str
    variants: Tuple[Variant, ...]


EXERCISES: Dict[str, Exercise] = {
    exercise.key: exercise
    for exercise in (
        Exercise(
            "bias",
            "Can the bias of a conv or dense layer right before batch norm be removed, and why?",
            (
                _variant("biases before BN (recipe)"),
                _variant("no bias before BN", bias=False),
            ),
        ),
        Exercise(
            "learning-rate",
            "How do training and test accuracy improve per epoch at several learning rates, with and without BN?",
            tuple(_variant(f"BN, lr {lr:g}", lr=lr) for lr in LEARNING_RATES)
            + tuple(_variant(f"no BN, lr {lr:g}", norm="none", lr=lr) for lr in LEARNING_RATES),
        ),
        Exercise(
            "placement",
            "Do we need batch norm in every layer?",
            (
                _variant("all four (recipe)"),
                _variant("convolutions only", norm_places="conv"),
                _variant("dense layers only", norm_places="dense"),
                _variant("first layer only", norm_places="first"),
                _variant("none, lr 1.0", norm="none"),
                _variant(f"none, lr {NO_BN_BEST_LR:g} (best)", norm="none", lr=NO_BN_BEST_LR),
            ),
        ),
        Exercise(
            "dropout",
            "Can batch norm replace dropout?",
            (
                _variant("BN only (recipe)"),
                _variant("dropout 0.2, no BN", norm="none", dropout=0.2),
                _variant("dropout 0.5, no BN", norm="none", dropout=0.5),
                _variant("BN + dropout 0.2", dropout=0.2),
                _variant("neither", norm="none"),
            ),
        ),
        Exercise(
            "frozen-affine",
            "What if gamma and beta are fixed (gamma = 1, beta = 0, not trained)?",
            (
                _variant("learned gamma, beta (recipe)"),
                _variant("fixed gamma = 1, beta = 0", affine=False),
            ),
        ),
        Exercise(
            "other-norms",
            "Other normalizations in the same places, and a BN that whitens with the full covariance.",
            (
                _variant("BatchNorm, recomputed statistics (recipe)"),
                _variant("BatchNorm, moving averages", moving=True),
                _variant("LayerNormalization", norm="layer"),
                _variant("GroupNormalization", norm="group"),
                _variant("DecorrelatedBatchNorm (ZCA)", norm="decorrelated"),
            ),
        ),
    )
}


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ExercisesConfig:
    """Which exercises, how many seeds, and the recipe they share."""

    exercise: str = _field("all", f"Exercises to run, comma-separated: all, or of {', '.join(EXERCISES)}.")
    seeds: int = _field(3, "Seeds per variant (0, 1, ... seeds-1).")
    epochs: int = _field(10, "Epochs per run (the recipe's 10).")
    quick: bool = _field(False, "1 epoch, 1 seed, 1024 training and 1000 test examples: every exercise in minutes.")
    out: Optional[str] = _field(None, "Results folder (default: runs/exercises-<name>).")
    overwrite: bool = _field(False, "Delete earlier results in the folder and start afresh (default: resume).")
    data_dir: Optional[str] = _field(None, "Folder with the Fashion-MNIST IDX files (as for training.train).")
    time_steps: bool = _field(True, "other-norms: time a training step of each normalization, interleaved.")

    def validate(self) -> "ExercisesConfig":
        for key in self.exercise_keys():
            if key not in EXERCISES:
                raise ConfigError(
                    f"`--exercise` must be 'all' or among {', '.join(EXERCISES)}. Received: exercise={self.exercise!r}"
                )
        if self.seeds < 1:
            raise ConfigError(f"`--seeds` must be a positive integer. Received: seeds={self.seeds}")
        if self.epochs < 1:
            raise ConfigError(f"`--epochs` must be a positive integer. Received: epochs={self.epochs}")
        return self

    def exercise_keys(self) -> List[str]:
        keys = [key.strip() for key in self.exercise.split(",") if key.strip()]
        return list(EXERCISES) if keys in ([], ["all"]) else keys

    def seed_list(self) -> List[int]:
        return [0] if self.quick else list(range(self.seeds))

    def out_dir(self) -> str:
        keys = self.exercise_keys()
        name = "all" if keys == list(EXERCISES) else "-".join(keys)
        return self.out or os.path.join("runs", f"exercises-{name}{'-quick' if self.quick else ''}")

    def train_config(self, variant: Variant, seed: int) -> TrainConfig:
        """The recipe with the variant's changes, for one seed (the run folder is set later)."""
        recipe = dict(epochs=self.epochs, seed=seed, data_dir=self.data_dir, quiet=True, export=False)
        if self.quick:
            recipe.update(epochs=1, limit_train=1024, limit_test=1000, recompute_stats_batches=4)
        config = TrainConfig(**{**recipe, **dict(variant.settings)})
        config.validate()
        return config


# ------------------------------------------------------------ run identity


def identity(config: TrainConfig) -> Dict:
    """The settings that decide what a training run computes."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IDENTITY}


def config_hash(config: TrainConfig) -> str:
    return hashlib.sha1(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()[:10]


def run_folder(out: str, config: TrainConfig) -> str:
    """`<out>/train/<changes>-seed<S>-<hash>`: one folder per distinct configuration."""
    defaults = identity(TrainConfig())
    changes = [
        f"{key.replace('_', '')}{value:g}" if isinstance(value, float) else f"{key.replace('_', '')}-{value}"
        for key, value in sorted(identity(config).items())
        if key not in ("seed", "epochs", "limit_train", "limit_test", "recompute_stats_batches") and value != defaults[key]
    ]
    name = "_".join(changes) or "recipe"
    return os.path.join(out, "train", f"{name}-seed{config.seed}-{config_hash(config)}")


def has_batch_norm(config: TrainConfig) -> bool:
    from training.models import BATCH_NORMS

    return config.norm in BATCH_NORMS


# ------------------------------------------------------------- measuring


def is_normalization(layer) -> bool:
    """Whether `layer` normalizes its input with statistics (any kind the exercises use)."""
    import keras

    import kerasbn
    from kerasbn.experimental import DecorrelatedBatchNorm

    kinds = (
        kerasbn.BatchNorm, DecorrelatedBatchNorm, keras.layers.BatchNormalization,
        keras.layers.LayerNormalization, keras.layers.GroupNormalization,
    )
    return isinstance(layer, kinds)


def biases_before_norm(model) -> List[Tuple[object, bool]]:
    """(layer, feeds a normalization) for every layer with a bias in a Sequential model."""
    layers = model.layers
    return [
        (layer, index + 1 < len(layers) and is_normalization(layers[index + 1]))
        for index, layer in enumerate(layers)
        if getattr(layer, "bias", None) is not None
    ]


def bias_gradients(model, images, labels) -> List[Dict]:
    """Gradient of the training-mode loss with respect to each bias, against its kernel's.

    Returns one row per conv/dense layer with a bias: its name, whether a
    normalization takes its output (`before_norm`), and the root mean square
    of the gradient of the mean cross-entropy with respect to its bias and
    to its kernel. Batch norm subtracts each channel's batch mean, so a bias
    right before it cancels and its gradient is zero up to rounding. (Layer
    and group norm subtract a mean over several channels: only the mean of
    the biases cancels there.)
    """
    import keras
    import numpy as np
    import tensorflow as tf

    layers = biases_before_norm(model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = [layer.bias for layer, _ in layers] + [layer.kernel for layer, _ in layers]
    # The forward pass in training mode moves the moving statistics: keep them.
    saved = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    gradients = tape.gradient(loss, variables)
    for variable, value in zip(model.non_trainable_variables, saved):
        variable.assign(value)

    def rms(tensor) -> float:
        return float(np.sqrt(np.mean(np.square(np.asarray(tensor, np.float64)))))

    rows = []
    for index, (layer, before_norm) in enumerate(layers):
        rows.append(
            {
                "layer": layer.name,
                "before_norm": before_norm,
                "bias_grad_rms": rms(gradients[index]),
                "kernel_grad_rms": rms(gradients[len(layers) + index]),
            }
        )
    return rows


def measure_biases(config: TrainConfig, run_dir: str) -> Dict:
    """The bias exercise's 'why': gradients reaching each bias at the start and the end, and how far it moved.

    The start is a model built as the run built it (same seed); the end is
    the run's saved model. Both see the run's first training batch.
    """
    import keras
    import numpy as np

    from training import data, models

    keras.utils.set_random_seed(config.seed)
    initial = models.build_lenet(
        config.norm, config.bn_momentum, config.sync_bn,
        norm_places=config.norm_places, bias=config.bias, dropout=config.dropout, affine=config.affine,
    )
    final = load_run_model(run_dir)
    batch = next(iter(data.make_dataset(
        "train", config.batch_size, training=True, data_dir=config.data_dir, limit=config.limit_train,
        seed=config.seed * 1000 + 1, drop_remainder=True,
    )))
    start = bias_gradients(initial, *batch)
    end = bias_gradients(final, *batch)
    layers = {layer.name: layer for layer, _ in biases_before_norm(final)}
    initial_layers = {layer.name: layer for layer, _ in biases_before_norm(initial)}
    rows = []
    for before, after in zip(start, end):
        moved = np.abs(np.asarray(layers[after["layer"]].bias) - np.asarray(initial_layers[after["layer"]].bias))
        rows.append(
            {
                "layer": after["layer"],
                "before_norm": after["before_norm"],
                "bias_grad_rms_start": before["bias_grad_rms"],
                "kernel_grad_rms_start": before["kernel_grad_rms"],
                "bias_grad_rms_end": after["bias_grad_rms"],
                "kernel_grad_rms_end": after["kernel_grad_rms"],
                "bias_max_abs_change": float(moved.max()),
            }
        )
    return {"layers": rows}


def evaluate_saved_model(config: TrainConfig, run_dir: str) -> Tuple[float, int]:
    """Inference-mode accuracy of the run's saved model on the first training examples, and its parameter count.

    The training accuracy a run logs is the running average of training
    mode (dropout on, batch statistics); this one is comparable with the
    test accuracy.
    """
    import keras
    import numpy as np

    from training import data

    model = load_run_model(run_dir)
    limit = min(config.limit_train or TRAIN_EVAL_EXAMPLES, TRAIN_EVAL_EXAMPLES)
    images, labels = data.load_arrays("train", data_dir=config.data_dir, limit=limit)
    correct = 0
    for start in range(0, len(labels), 2000):
        batch = images[start:start + 2000, ..., None].astype("float32") / 255.0
        logits = keras.ops.convert_to_numpy(model(batch, training=False))
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels[start:start + 2000]))
    accuracy = correct / len(labels)
    return accuracy, int(model.count_params())


def step_times(configs: Dict[str, TrainConfig], batch_size: int, rounds: int, steps: int, data_dir) -> Dict[str, float]:
    """Milliseconds per training step of each configuration's model, timed interleaved.

    Each round times `steps` steps of every model in turn, so that load from
    other processes falls on all of them alike; the result is the median
    over rounds. The steps are the training loop's own (`Loop.train_on_batch`).
    """
    import tempfile

    import keras

    from training import data, distribute, models
    from training.loop import Loop

    strategy = distribute.get_strategy("auto")
    batch = next(iter(data.make_dataset("train", batch_size, training=True, data_dir=data_dir, seed=0)))
    loops = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in configs.items():
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = models.build_lenet(
                    config.norm, config.bn_momentum, norm_places=config.norm_places,
                    bias=config.bias, dropout=config.dropout, affine=config.affine,
                )
                optimizer = keras.optimizers.SGD(learning_rate=config.lr)
            loops[name] = Loop(model, optimizer, strategy, os.path.join(scratch, name), batch_size, verbose=False)
            for _ in range(3):  # trace and warm up
                loops[name].train_on_batch(batch)
        samples: Dict[str, List[float]] = {name: [] for name in loops}
        for _ in range(rounds):
            for name, loop in loops.items():
                began = time.perf_counter()
                for _ in range(steps):
                    loop.train_on_batch(batch)
                samples[name].append((time.perf_counter() - began) / steps * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


# -------------------------------------------------------------- running


@dataclasses.dataclass
class Counts:
    trained: int = 0  # training runs done by this command
    reused: int = 0  # finished runs another record (or an earlier command) had trained
    kept: int = 0  # records already in results.json


def _train_once(config: TrainConfig, counts: Counts) -> Tuple[Dict, List[Dict]]:
    """The run's summary and history: trained now, or read from its finished folder."""
    import keras

    from training import train

    summary_path = os.path.join(config.out, "summary.json")
    if os.path.exists(summary_path):
        counts.reused += 1
    else:
        print(f"training {config.out}", flush=True)
        train.run(config)  # resumes from the folder's checkpoint if a run there was killed
        keras.backend.clear_session()
        counts.trained += 1
    return artifacts.read_json(summary_path), artifacts.read_json(os.path.join(config.out, "history.json"))


def _median_step_ms(history: List[Dict], batch_size: int) -> float:
    # The first epoch includes tracing; leave it out when there are others.
    rows = history[1:] or history
    return statistics.median(batch_size / row["examples_per_sec"] * 1000 for row in rows)


def make_record(exercise: Exercise, variant: Variant, config: TrainConfig, counts: Counts) -> Dict:
    summary, history = _train_once(config, counts)
    moving = summary["test_acc_moving_averages"]
    train_acc_eval, params = evaluate_saved_model(config, config.out)
    record = {
        "exercise": exercise.key,
        "variant": variant.name,
        "seed": config.seed,
        "config_hash": config_hash(config),
        "settings": dict(variant.settings),
        "run_dir": config.out,
        "test_acc": moving if variant.moving else summary["test_acc"],
        "test_acc_moving": moving if has_batch_norm(config) else None,
        "train_acc": summary["train_acc"],
        "train_acc_eval": train_acc_eval,
        "params": params,
        "seconds": summary["wall_seconds"],
        "step_ms": _median_step_ms(history, config.batch_size),
        "history": history,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if exercise.key == "bias" and config.bias:
        record["bias_gradients"] = measure_biases(config, config.out)
    return record


def _record_key(record: Dict) -> Tuple:
    return (record["exercise"], record["variant"], record["seed"], record["config_hash"])


def run(config: ExercisesConfig) -> Dict:
    """Runs the chosen exercises (resuming), then writes results.md and the plots; returns the counts."""
    out = config.out_dir()
    results_path = os.path.join(out, "results.json")
    if config.overwrite:
        _clear(out)
    records = artifacts.read_json(results_path, default=[])
    done = {_record_key(record) for record in records}
    counts = Counts()
    began = time.perf_counter()
    for key in config.exercise_keys():
        exercise = EXERCISES[key]
        for variant in exercise.variants:
            for seed in config.seed_list():
                train_config = config.train_config(variant, seed)
                train_config.out = run_folder(out, train_config)
                wanted = (exercise.key, variant.name, seed, config_hash(train_config))
                if wanted in done:
                    counts.kept += 1
                    continue
                record = make_record(exercise, variant, train_config, counts)
                records = [r for r in records if _record_key(r)[:3] != wanted[:3]] + [record]
                done.add(wanted)
                artifacts.write_json(results_path, records)
                print(
                    f"{exercise.key} | {variant.name} | seed {seed}: test acc {record['test_acc']:.4f}, "
                    f"train acc {record['train_acc_eval']:.4f}",
                    flush=True,
                )
        if key == "other-norms" and config.time_steps:
            _time_other_norms(config, out)
        write_report(out, records)
    print(
        f"{counts.trained} runs trained, {counts.reused} reused from finished runs, "
        f"{counts.kept} records kept from earlier; {time.perf_counter() - began:.0f} s. "
        f"Results: {os.path.join(out, 'results.md')}"
    )
    return dataclasses.asdict(counts)


def _time_other_norms(config: ExercisesConfig, out: str) -> None:
    path = os.path.join(out, "step_times.json")
    configs = {
        variant.name: config.train_config(variant, 0)
        for variant in EXERCISES["other-norms"].variants
        if not variant.moving
    }
    configs["no normalization"] = config.train_config(_variant("none", norm="none"), 0)
    wanted = {name: config_hash(c) for name, c in configs.items()}
    previous = artifacts.read_json(path)
    if previous and previous.get("configs") == wanted:
        return
    rounds, steps = (1, 2) if config.quick else (7, 20)
    batch_size = next(iter(configs.values())).batch_size
    times = step_times(configs, batch_size, rounds, steps, config.data_dir)
    artifacts.write_json(
        path, {"configs": wanted, "ms_per_step": times, "rounds": rounds, "steps": steps, "batch_size": batch_size}
    )


def _clear(out: str) -> None:
    import shutil

    for name in ("results.json", "results.md", "step_times.json", "summary.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for key in EXERCISES:
        if os.path.exists(os.path.join(out, f"{key}.png")):
            os.remove(os.path.join(out, f"{key}.png"))
    shutil.rmtree(os.path.join(out, "train"), ignore_errors=True)


# --------------------------------------------------------------- report


def group(records: List[Dict]) -> Dict[str, Dict[str, List[Dict]]]:
    """exercise -> variant -> records, in the order of EXERCISES."""
    grouped: Dict[str, Dict[str, List[Dict]]] = {}
    for exercise in EXERCISES.values():
        for variant in exercise.variants:
            rows = [r for r in records if r["exercise"] == exercise.key and r["variant"] == variant.name]
            if rows:
                grouped.setdefault(exercise.key, {})[variant.name] = sorted(rows, key=lambda r: r["seed"])
    return grouped


def spread(values: Sequence[Optional[float]], fmt: str = "{:.4f}") -> str:
    """'mean (min-max)' over seeds, or the single value; '-' when there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def exercise_table(rows_by_variant: Dict[str, List[Dict]]) -> List[str]:
    lines = [
        "| variant | test acc | test acc, moving averages | train acc (inference) | train - test | params | ms/step | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in rows_by_variant.items():
        lines.append(
            f"| {name} | {spread([r['test_acc'] for r in rows])} | {spread([r['test_acc_moving'] for r in rows])} "
            f"| {spread([r['train_acc_eval'] for r in rows])} "
            f"| {spread([r['train_acc_eval'] - r['test_acc'] for r in rows], '{:+.4f}')} "
            f"| {rows[0]['params']:,} | {statistics.median(r['step_ms'] for r in rows):.1f} | {len(rows)} |"
        )
    return lines


def bias_table(rows: List[Dict]) -> List[str]:
    lines = [
        "| layer | before a norm | bias grad RMS, start | kernel grad RMS, start | bias grad RMS, end "
        "| kernel grad RMS, end | largest change of the bias |",
        "|---|---|---|---|---|---|---|",
    ]
    layers = [row["layer"] for row in rows[0]["bias_gradients"]["layers"]]
    for index, layer in enumerate(layers):
        cells = [r["bias_gradients"]["layers"][index] for r in rows]

        def worst(key):
            return f"{max(c[key] for c in cells):.2e}"

        lines.append(
            f"| {layer} | {'yes' if cells[0]['before_norm'] else 'no'} | {worst('bias_grad_rms_start')} "
            f"| {worst('kernel_grad_rms_start')} | {worst('bias_grad_rms_end')} | {worst('kernel_grad_rms_end')} "
            f"| {worst('bias_max_abs_change')} |"
        )
    return lines


def write_report(out: str, records: List[Dict]) -> None:
    """results.md, one accuracy plot per exercise and summary.png, from the records."""
    grouped = group(records)
    lines = [
        "# The chapter's exercises, measured",
        "",
        "Test accuracy after training (BN statistics recomputed over training batches unless the variant says",
        "moving averages); train accuracy in inference mode on the first 10,000 training examples; mean",
        "(min-max) over seeds. ms/step: median of the epochs' time per training step (noisy on a shared machine).",
    ]
    step_file = artifacts.read_json(os.path.join(out, "step_times.json"))
    for key, rows_by_variant in grouped.items():
        exercise = EXERCISES[key]
        lines += ["", f"## {key}", "", exercise.question, ""] + exercise_table(rows_by_variant)
        if key == "bias":
            with_bias = [r for rows in rows_by_variant.values() for r in rows if "bias_gradients" in r]
            if with_bias:
                lines += ["", "Gradients reaching each bias (largest over seeds), on the first training batch:", ""]
                lines += bias_table(with_bias)
        if key == "learning-rate":
            lines += ["", "The largest usable rate: `python -m training.tune --compare-norms` (README, Tuning)."]
        if key == "other-norms" and step_file:
            times = step_file["ms_per_step"]
            reference = times.get("BatchNorm, recomputed statistics (recipe)")
            lines += [
                "",
                f"Training step, batch {step_file['batch_size']}, timed interleaved "
                f"({step_file['rounds']} rounds of {step_file['steps']} steps, median):",
                "",
                "| model | ms/step | vs kerasbn.BatchNorm |",
                "|---|---|---|",
            ]
            for name, ms in times.items():
                lines.append(f"| {name} | {ms:.2f} | {ms / reference:.2f}x |" if reference else f"| {name} | {ms:.2f} | - |")
        plot_exercise(os.path.join(out, f"{key}.png"), key, rows_by_variant)
    if grouped:
        plot_summary(os.path.join(out, "summary.png"), grouped)
    artifacts.atomic_write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp-" + os.path.basename(path))
    fig.savefig(tmp, dpi=90, format="png")
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot_exercise(path: str, key: str, rows_by_variant: Dict[str, List[Dict]]) -> None:
    """Train and test accuracy per epoch: the mean over seeds, the min-max as a band."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, rows in rows_by_variant.items():
        for ax, column in zip(axes, ("train_acc", "test_acc")):
            epochs = [row["epoch"] for row in rows[0]["history"]]
            values = np.array([[row[column] for row in r["history"]] for r in rows])
            line, = ax.plot(epochs, values.mean(axis=0), "o-", markersize=3, label=name)
            if len(rows) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    axes[0].set_title("train accuracy (training mode, running average)", fontsize=9)
    axes[1].set_title("test accuracy (moving averages)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{key}: {EXERCISES[key].question}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_summary(path: str, grouped: Dict[str, Dict[str, List[Dict]]]) -> None:
    """Final test accuracy of every variant, one panel per exercise (mean, min-max as error bars)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(grouped), 1, figsize=(8, 1.2 + 0.32 * sum(len(v) for v in grouped.values()) + 0.5 * len(grouped)),
                             squeeze=False, gridspec_kw={"height_ratios": [len(v) for v in grouped.values()]})
    for ax, (key, rows_by_variant) in zip(axes[:, 0], grouped.items()):
        names = list(rows_by_variant)
        means, low, high = [], [], []
        for name in names:
            values = [r["test_acc"] for r in rows_by_variant[name]]
            mean = statistics.fmean(values)
            means.append(mean)
            # max(0, .): the mean of equal values can differ from them in the last bit.
            low.append(max(0.0, mean - min(values)))
            high.append(max(0.0, max(values) - mean))
        positions = list(range(len(names)))[::-1]
        ax.errorbar(means, positions, xerr=[low, high], fmt="o", capsize=3)
        ax.set_yticks(positions)
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(key, fontsize=9, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("test accuracy (mean, min-max over seeds)")
    fig.tight_layout()
    _save(fig, path)


# ------------------------------------------------------------------ CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> ExercisesConfig:
    parser = argparse.ArgumentParser(
        prog="python -m training.exercises",
        description="The batch-norm chapter's exercises, answered by LeNet runs on Fashion-MNIST.",
    )
    add_flags(parser, ExercisesConfig)
    return config_from_args(parser.parse_args(argv), ExercisesConfig).validate()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())

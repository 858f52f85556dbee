"""Learning-rate search for LeNet-BN with keras-tuner, under `training.distribute`'s strategy.

    python -m training.tune                                          # the default search (`make tune`)
    python -m training.tune --tuner hyperband --max-trials 20 --norm kerasbn
    python -m training.tune --tuner bayesian --lr-min 1e-3 --lr-max 10 --norm none
    python -m training.tune --compare-norms    # how large a learning rate can you use with and without BN?
    python -m training.tune --cpu-replicas 2   # every trial under MirroredStrategy on 2 logical CPUs

The recipe: flags -> a held-out slice of the training set -> keras-tuner
search (each trial builds LeNet inside the strategy's scope, trains it with
SGD at a learning rate drawn log-uniformly from [--lr-min, --lr-max] and is
scored by its best validation accuracy on the held-out slice) -> results.csv,
results.md (all trials, sorted by score), lr_vs_accuracy.png,
best_hyperparameters.json -> the best configuration retrained on the full
training set by `training.train` -> exported by `training.export`. The test
set is never seen by the search: only the retraining of the chosen
configuration evaluates on it (training.train's report).

Everything goes to `runs/tune-<name>/`: the tuner's own project folder
(`keras_tuner/`, one `trial_<id>/` per trial, each with our
`kerasbn_trial.json`: hyperparameters, status, reason, history), the results
files, `tune_config.json`, `summary.json`, and the retrained run `best/`.

Defaults (`make tune` runs them): random search, 20 trials of 4 epochs on
48,000 training examples, scored on the other 12,000, then 10 epochs of
retraining on all 60,000. Measured on this 2-core machine with other jobs
beside it (load ~4.5): 42 s per trial (750 SGD steps at batch 256, four
validation passes, graph tracing), 14 minutes of search, 2 of retraining:
16 minutes in all; an idle machine needs less.

Why so many examples per trial: without BN, LeNet's sigmoids hold the loss
at chance level for the first few hundred steps. On 10,000 examples x 2
epochs (80 steps) the no-BN net stayed at chance for lr 0.9, 3 and 10
alike, so --compare-norms could not tell usable from unusable rates; on
48,000 examples x 4 epochs, lr 0.9 without BN reaches 0.66 validation
accuracy while lr 3 stays at 0.10. 20 random trials give ~5 per decade of
[1e-3, 10], enough to see the plateau and the cliff. The learning rate is
the one hyperparameter searched by default; batch size (--tune-batch-size)
and BN momentum (--tune-bn-momentum) are opt-in, since each multiplies the
trials needed for the same coverage. Smaller searches: --search-examples N
(search on the first N examples; retraining still uses all), --epochs,
--max-trials, --retrain-epochs.

Divergence. LeNet's sigmoids saturate, so at lr 10 the loss does not become
NaN (measured: it stays finite up to lr 1e30 and turns inf/NaN at 1e36);
from about lr 30 it explodes far above chance (ln 10 = 2.3) while the
accuracy stays at 0.1. A trial is therefore stopped and recorded as FAILED,
with its reason, when its training loss becomes NaN or infinite at any step,
or when its mean over an epoch exceeds --divergence-loss (default
10 x ln 10 = 23.03; 0 checks only for NaN/inf). A diverged trial does not
count towards keras-tuner's limit of consecutive failures (3, kept for real
crashes), so the search goes on.

Resume. keras-tuner keeps its state in the project folder (overwrite=False):
a search killed at any point and started again with the same command skips
the finished trials, reruns the interrupted one and continues; the
retraining resumes from its last epoch checkpoint. Changing a setting that
defines the search (tuner, learning-rate range, norms, epochs per trial, the
data) for the same --name is refused; --max-trials may grow. --overwrite
deletes runs/tune-<name>/ and starts afresh.

Distributed tuning (keras-tuner's chief/worker mode). Start the same command
on every machine with a shared runs/ folder (e.g. NFS), keras-tuner's
environment variables, and no --overwrite on workers:

    KERASTUNER_TUNER_ID=chief   KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 python -m training.tune ...
    KERASTUNER_TUNER_ID=tuner0  KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 python -m training.tune ...
    KERASTUNER_TUNER_ID=tuner1  ...

The chief runs the oracle (no trials) until every trial is done, then writes
the results, retrains and exports; workers only run trials and exit when the
oracle has none left. A worker that dies mid-trial keeps its trial assigned:
the chief waits until a worker with the same KERASTUNER_TUNER_ID starts again
and finishes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from training.config import ConfigError, TrainConfig, add_flags, config_from_args, flag_field, flag_name, run_cli

from training.tune_config import (  # noqa: F401 (tests read some of them here)
    TUNERS,
    BATCH_SIZES,
    BN_MOMENTA,
    CHANCE_LOSS,
    OBJECTIVE,
    PROJECT_NAME,
    RECORD_FILE,
    BEST_RUN,
    MAX_CONSECUTIVE_CRASHES,
    SKIPPED_TRAIN_FLAGS,
    SEARCH_SETTINGS,
    TRAIN_SEARCH_SETTINGS,
    RESULT_COLUMNS,
    TuneConfig,
)


# ------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.tune",
        description=(
            "Search LeNet-BN's learning rate on Fashion-MNIST with keras-tuner (each trial under the "
            "chosen tf.distribute strategy), write a results table and plot, then retrain and export the best."
        ),
    )
    add_flags(parser, TuneConfig)
    add_flags(parser, TrainConfig, skip=SKIPPED_TRAIN_FLAGS)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[TuneConfig, TrainConfig]:
    namespace = build_parser().parse_args(argv)
    tune = config_from_args(namespace, TuneConfig).validate()
    train = config_from_args(namespace, TrainConfig).validate()
    if train.strategy == "multi-worker":
        raise ConfigError(
            "`--strategy multi-worker` is not supported for tuning: trials train with model.fit, which Keras 3.15 "
            "cannot run under MultiWorkerMirroredStrategy; spread a search over machines with keras-tuner's "
            "chief/worker mode instead (see the module docstring). Received: strategy='multi-worker'"
        )
    if train.seed < 0:
        raise ConfigError(f"`--seed` must be >= 0. Received: seed={train.seed}")
    return tune, train


def distributed_role() -> str:
    """'chief', 'worker' or 'single', from keras-tuner's environment variables (its own rule)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [name for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"Distributed tuning needs {', '.join(missing)} as well as KERASTUNER_ORACLE_IP. "
            f"Received: KERASTUNER_ORACLE_IP={os.environ['KERASTUNER_ORACLE_IP']!r}"
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _check_resumable(tune_dir: str, tune: TuneConfig, train: TrainConfig) -> None:
    from training import artifacts

    previous = artifacts.read_json(os.path.join(tune_dir, "tune_config.json"))
    if not previous:
        return
    now = {"search": dataclasses.asdict(tune), "train": dataclasses.asdict(train)}
    changed = [
        (f"{part}.{key}", previous.get(part, {}).get(key), now[part][key])
        for part, keys in (("search", SEARCH_SETTINGS), ("train", TRAIN_SEARCH_SETTINGS))
        for key in keys
        if previous.get(part, {}).get(key) != now[part][key]
    ]
    if changed:
        detail = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        raise ConfigError(
            f"{tune_dir} holds a search with other settings ({detail}); resume it with its own settings, "
            "choose another --name, or pass --overwrite to start afresh."
        )


# ------------------------------------------------------------ data


def search_split(tune: TuneConfig, train: TrainConfig):
    """The search's training and held-out validation arrays, from the training split only.

    The first `min(--limit-train, --search-examples)` training examples, split
    by a permutation seeded with --seed: `val_fraction` of them score the
    trials, the rest train them. Images are scaled as `training.data`'s
    pipeline does (float32, x / 255, NHWC with one channel).

    Returns:
        `((x_train, y_train), (x_val, y_val))`.
    """
    import numpy as np

    from training import data

    limits = [n for n in (train.limit_train, tune.search_examples or None) if n]
    images, labels = data.load_arrays("train", data_dir=train.data_dir, limit=min(limits) if limits else None)
    count = len(labels)
    val_count = int(round(tune.val_fraction * count))
    if val_count < 1 or count - val_count < 1:
        raise ConfigError(
            f"{count} search examples cannot be split into training and validation with --val-fraction "
            f"{tune.val_fraction}. Received: limit_train={train.limit_train}, search_examples={tune.search_examples}"
        )
    order = np.random.default_rng(train.seed).permutation(count)
    x = images.astype("float32")[..., np.newaxis] / 255.0
    val, fit = order[:val_count], order[val_count:]
    return (x[fit], labels[fit]), (x[val], labels[val])


# ------------------------------------------------------------ the tuner


def make_tuner(tune: TuneConfig, train: TrainConfig, strategy, tune_dir: str):
    """The keras-tuner tuner of this search, resuming its project folder if there is one."""
    import keras_tuner as kt

    # Imported here, after run() has split the CPU: it starts TensorFlow.
    from training import tuner_classes

    common = dict(
        objective=kt.Objective(OBJECTIVE, direction="max"),
        # keras-tuner treats seed 0 as "no seed" (a random one): shift by one.
        seed=train.seed + 1,
        max_consecutive_failed_trials=MAX_CONSECUTIVE_CRASHES,
    )
    oracle_class = tuner_classes.ORACLE_CLASSES[tune.tuner]
    if tune.tuner == "hyperband":
        # Brackets repeat until --max-trials trials have run (hyperband_iterations=None: no other limit).
        oracle = oracle_class(max_epochs=tune.epochs, factor=3, hyperband_iterations=None, **common)
        oracle.max_trials = tune.max_trials
    else:
        oracle = oracle_class(max_trials=tune.max_trials, **common)
    return tuner_classes.TUNER_CLASSES[tune.tuner](
        oracle=oracle,
        hypermodel=tuner_classes.LeNetHyperModel(tune, train),
        distribution_strategy=strategy,
        directory=tune_dir,
        project_name=PROJECT_NAME,
        overwrite=False,
    )


# ------------------------------------------------------------ results


def _last_line(text: Optional[str]) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def collect_results(oracle, project_dir: str) -> List[Dict]:
    """One row per trial of the oracle, merged with its `kerasbn_trial.json`, sorted by `sort_results`."""
    from training import artifacts

    rows = []
    for trial_id, trial in oracle.trials.items():
        values = trial.hyperparameters.values
        record = artifacts.read_json(os.path.join(project_dir, f"trial_{trial_id}", RECORD_FILE)) or {}
        completed = trial.status == "COMPLETED"
        note = record.get("reason") or ("" if completed else _last_line(trial.message))
        if not completed and record.get("status") == "running":
            note = note or "interrupted"
        rows.append(
            {
                "trial_id": trial_id,
                "status": (trial.status or "unknown").lower(),
                "norm": values.get("norm"),
                "lr": float(values["lr"]) if "lr" in values else None,
                "batch_size": values.get("batch_size"),
                # Without BN layers the momentum is moot: shown as "-".
                "bn_momentum": values.get("bn_momentum") if values.get("norm") != "none" else None,
                "best_val_accuracy": float(trial.score) if completed and trial.score is not None else None,
                "epochs": record.get("epochs", values.get("tuner/epochs")),
                "best_epoch": record.get("best_epoch"),
                "seconds": round(record["seconds"], 1) if "seconds" in record else None,
                "tuner_id": record.get("tuner_id"),
                "note": note,
            }
        )
    return sort_results(rows)


def sort_results(rows: List[Dict]) -> List[Dict]:
    """Completed trials by best validation accuracy (highest first), then the others by learning rate.

    Ties go to the smaller learning rate, then the trial id. Sets `rank` (1-based).
    """

    def key(row):
        completed = row["best_val_accuracy"] is not None
        score = -row["best_val_accuracy"] if completed else 0.0
        lr = row["lr"] if row["lr"] is not None else math.inf
        return (not completed, score, lr, row["trial_id"])

    ordered = sorted(rows, key=key)
    return [{**row, "rank": index} for index, row in enumerate(ordered, start=1)]


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None or value == "" else fmt.format(value)


def results_markdown(rows: List[Dict], title: str, footer: Sequence[str] = ()) -> str:
    """The results table in Markdown, in the order of `rows`."""
    header = "| Rank | Trial | Norm | Learning rate | Batch size | BN momentum | Best val acc | Epochs | Status | Note |"
    lines = [f"# {title}", "", header, "|" + "---|" * 10]
    for row in rows:
        cells = [
            _cell(row["rank"]), _cell(row["trial_id"]), _cell(row["norm"]), _cell(row["lr"], "{:.4g}"),
            _cell(row["batch_size"]), _cell(row["bn_momentum"], "{:g}"), _cell(row["best_val_accuracy"], "{:.4f}"),
            _cell(row["epochs"]), _cell(row["status"]), _cell(str(row["note"]).replace("|", "/") if row["note"] else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.extend([""] + list(footer))
    return "\n".join(lines).rstrip() + "\n"


def plot_lr_vs_accuracy(path: str, rows: List[Dict], title: str, lr_range: Optional[Tuple[float, float]] = None) -> None:
    """Best validation accuracy against learning rate (log x), one series per norm; failed trials as x at 0.

    Args:
        path: The PNG file (written through a temporary file and a rename).
        rows: Result rows (`collect_results`).
        title: Figure title (wrapped).
        lr_range: The searched `(lr_min, lr_max)`, shown as the x range.
    """
    import textwrap

    from training import artifacts

    fig, ax = artifacts.pyplot().subplots(figsize=(6.5, 4.2))
    norms = sorted({row["norm"] for row in rows if row["lr"] is not None}, key=str)
    for index, norm in enumerate(norms):
        color = f"C{index}"
        best_by_lr: Dict[float, float] = {}
        for row in rows:
            if row["norm"] == norm and row["lr"] is not None and row["best_val_accuracy"] is not None:
                best_by_lr[row["lr"]] = max(best_by_lr.get(row["lr"], 0.0), row["best_val_accuracy"])
        if best_by_lr:
            lrs = sorted(best_by_lr)
            ax.plot(lrs, [best_by_lr[lr] for lr in lrs], "o-", color=color, label=f"{norm}")
        failed = [row["lr"] for row in rows if row["norm"] == norm and row["lr"] is not None and row["best_val_accuracy"] is None]
        if failed:
            ax.plot(failed, [0.0] * len(failed), "x", color=color, markersize=9, label=f"{norm}: failed/diverged")
    ax.axhline(0.1, color="gray", linestyle=":", linewidth=1, label="chance (0.1)")
    ax.set_xscale("log")
    if lr_range is not None:
        ax.set_xlim(lr_range[0] / 1.5, lr_range[1] * 1.5)
    ax.set_ylim(-0.03, 1.0)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("best validation accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    fig.tight_layout()
    artifacts.save_figure(fig, path, dpi=120)


def best_hyperparameters(rows: List[Dict], tune: TuneConfig) -> Optional[Dict]:
    """The best completed trial's configuration, or None when no trial completed."""
    if not rows or rows[0]["best_val_accuracy"] is None:
        return None
    best = rows[0]
    return {
        "trial_id": best["trial_id"],
        "lr": best["lr"],
        "batch_size": int(best["batch_size"]),
        "bn_momentum": float(best["bn_momentum"]) if best["bn_momentum"] is not None else None,
        "norm": best["norm"],
        "best_val_accuracy": best["best_val_accuracy"],
        "epochs": best["epochs"],
        "objective": OBJECTIVE,
        "tuner": tune.tuner,
    }


def write_results(tune_dir: str, rows: List[Dict], tune: TuneConfig, title: str, footer: Sequence[str] = ()) -> Optional[Dict]:
    """results.csv, results.md, lr_vs_accuracy.png and best_hyperparameters.json; returns the best configuration."""
    from training import artifacts

    artifacts.write_csv(os.path.join(tune_dir, "results.csv"), rows, RESULT_COLUMNS)
    artifacts.atomic_write_text(os.path.join(tune_dir, "results.md"), results_markdown(rows, title, footer))
    plot_lr_vs_accuracy(os.path.join(tune_dir, "lr_vs_accuracy.png"), rows, title, (tune.lr_min, tune.lr_max))
    best = best_hyperparameters(rows, tune)
    if best is not None:
        artifacts.write_json(os.path.join(tune_dir, "best_hyperparameters.json"), best)
    return best


# ------------------------------------------------------------ retrain and export


def retrain(best: Dict, tune: TuneConfig, train: TrainConfig, tune_dir: str) -> Tuple[TrainConfig, Dict]:
    """Trains the best configuration on the full training set with `training.train` (resumable)."""
    from training import artifacts
    from training import train as train_module

    config = dataclasses.replace(
        train,
        lr=best["lr"],
        batch_size=best["batch_size"],
        bn_momentum=best["bn_momentum"] if best["bn_momentum"] is not None else train.bn_momentum,
        norm=best["norm"],
        sync_bn=train.sync_bn and best["norm"] != "none",
        epochs=tune.retrain_epochs,
        out=os.path.join(tune_dir, BEST_RUN),
        run_name=None,
        export=False,
    ).validate()
    # A search that went on (more trials) may have a new winner: its old retraining is stale.
    previous = artifacts.read_json(os.path.join(config.out, "config.json"))
    if previous:
        kept = train_module.RESUMABLE_CHANGES
        now = dataclasses.asdict(config)
        if any(previous["settings"].get(k) != v for k, v in now.items() if k not in kept):
            print(f"The best configuration changed; retraining it afresh in {config.out}")
            shutil.rmtree(config.out)
    return config, train_module.run(config)


def export_best(run_dir: str, tune: TuneConfig) -> str:
    """Exports the retrained model through `training.export`; returns the new version folder."""
    from training import export

    return export.export_run(run_dir, tune.export_dir, tune.export_name)


# ------------------------------------------------------------ the driver


def _prepare_folder(tune_dir: str, role: str, tune: TuneConfig, train: TrainConfig) -> None:
    """--overwrite and the resume check; the chief (or a single process) owns the folder, workers never touch it."""
    if role == "worker":
        if tune.overwrite:
            print("note: --overwrite is ignored on a worker: the chief owns the search folder", file=sys.stderr)
        return
    if tune.overwrite and os.path.isdir(tune_dir):
        print(f"--overwrite: deleting {tune_dir}")
        shutil.rmtree(tune_dir)
    _check_resumable(tune_dir, tune, train)


def _search(tuner, role: str, tune: TuneConfig, train: TrainConfig, strategy) -> Optional[RuntimeError]:
    """Runs this process's part of the search; returns keras-tuner's too-many-crashes error, if raised."""
    from training import distribute

    verbose = 0 if train.quiet else 2
    try:
        if role == "chief":
            address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
            print(f"Chief oracle serving on {address} until the workers have run all {tune.max_trials} trials")
            tuner.search(verbose=verbose)  # serves the oracle; the chief runs no trial
            return None
        (x_train, y_train), validation = search_split(tune, train)
        print(
            f"Searching on {len(y_train)} training examples, scored on {len(validation[1])} held-out ones, "
            f"{distribute.describe(strategy)}"
        )
        tuner.search(x_train, y_train, validation_data=validation, epochs=tune.epochs, verbose=verbose)
    except RuntimeError as error:
        if "consecutive failures" not in str(error):
            raise
        return error
    return None


def _report(tuner, tune: TuneConfig, train: TrainConfig, tune_dir: str, search_error: Optional[RuntimeError]) -> int:
    """Results files, then the retraining and export of the best configuration; returns the exit status."""
    from training import artifacts

    rows = collect_results(tuner.oracle, tuner.project_dir)
    completed = sum(row["best_val_accuracy"] is not None for row in rows)
    title = (
        f"LeNet {' vs '.join(tune.norms(train))}: {tune.tuner} search, lr in [{tune.lr_min:g}, {tune.lr_max:g}], "
        f"{len(rows)} trials ({completed} completed), {tune.epochs} epoch(s) per trial"
    )
    best = write_results(tune_dir, rows, tune, title)
    summary = {"tune_dir": tune_dir, "trials": len(rows), "completed": completed, "failed": len(rows) - completed, "best": best}
    artifacts.write_json(os.path.join(tune_dir, "summary.json"), summary)
    print(f"Results: {tune_dir}/results.md ({len(rows)} trials, {completed} completed)")
    if search_error is not None:
        print(f"error: the search stopped: {search_error}", file=sys.stderr)
        return 1
    if best is None:
        print(f"error: no trial completed, so there is nothing to retrain; see {tune_dir}/results.md", file=sys.stderr)
        return 1
    print(
        f"Best: trial {best['trial_id']}, {best['norm']}, lr {best['lr']:.4g}, batch {best['batch_size']}, "
        f"val accuracy {best['best_val_accuracy']:.4f}"
    )
    if tune.retrain_epochs == 0:
        return 0

    config, retrained = retrain(best, tune, train, tune_dir)
    summary["retrain"] = {"run_dir": config.out, "epochs": config.epochs, **retrained}
    footer = [
        f"Best: trial {best['trial_id']} ({best['norm']}, lr {best['lr']:.4g}, batch size {best['batch_size']}). "
        f"Retrained on {config.limit_train or 60000} training examples for {config.epochs} epoch(s): "
        f"test accuracy {retrained['test_acc']:.4f} ({config.out})."
    ]
    write_results(tune_dir, rows, tune, title, footer)
    if train.export:
        summary["export"] = export_best(config.out, tune)
    artifacts.write_json(os.path.join(tune_dir, "summary.json"), summary)
    return 0


def run(tune: TuneConfig, train: TrainConfig) -> int:
    """Runs the search (or this process's part of a distributed one); returns the exit status."""
    role = distributed_role()
    tune_dir = tune.tune_dir(train)
    _prepare_folder(tune_dir, role, tune, train)

    from training import distribute

    # Logical CPU devices must exist before TensorFlow touches a device.
    distribute.configure_cpu_replicas(train.cpu_replicas)

    import keras
    import tensorflow as tf

    import kerasbn
    from training import artifacts

    strategy = distribute.get_strategy(train.strategy)
    if role != "worker":
        versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "kerasbn": kerasbn.__version__}
        artifacts.write_json(
            os.path.join(tune_dir, "tune_config.json"),
            {
                "search": dataclasses.asdict(tune),
                "train": dataclasses.asdict(train),
                "strategy": distribute.describe(strategy),
                "versions": versions,
            },
        )
    tuner = make_tuner(tune, train, strategy, tune_dir)
    search_error = _search(tuner, role, tune, train, strategy)
    if role == "worker":
        print(f"Worker {os.environ['KERASTUNER_TUNER_ID']}: no trials left, done.")
        return 0
    return _report(tuner, tune, train, tune_dir, search_error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m training.tune`. Returns the exit status: 0, 1 (a failed search; a data or export error) or 2 (a bad flag)."""
    return run_cli(parse_args, lambda configs: run(*configs), argv)


if __name__ == "__main__":
    sys.exit(main())

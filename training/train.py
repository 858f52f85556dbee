"""Train LeNet-BN on Fashion-MNIST under a tf.distribute strategy.

    python -m training.train --epochs 10 --lr 1.0 --batch-size 256 --strategy mirrored
    python -m training.train --norm keras            # same net, keras.layers.BatchNormalization
    python -m training.train --norm none --lr 0.9    # no batch norm
    python -m training.train --cpu-replicas 2 --limit-train 2048 --epochs 2   # 2 replicas on a CPU-only machine

The recipe: config -> strategy -> data -> model -> fit (resumable) ->
recompute BN statistics -> save, plot, export. Artifacts go to runs/<run-name>/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

from training.config import PEER_LOST_EXIT_CODE, ConfigError, TrainConfig, parse_args, run_cli

HISTORY_COLUMNS = ("epoch", "loss", "train_acc", "test_loss", "test_acc", "examples_per_sec", "seconds")
# Settings that may change when a run folder is resumed; any other change is refused.
RESUMABLE_CHANGES = {"epochs", "quiet", "export", "out", "run_name", "recompute_stats_batches", "data_dir", "limit_test"}


def _check_resumable(run_dir: str, config: TrainConfig) -> None:
    from training import artifacts

    previous = artifacts.read_json(os.path.join(run_dir, "config.json"))
    if not previous:
        return
    changed = {
        key: (previous["settings"].get(key), value)
        for key, value in dataclasses.asdict(config).items()
        if key not in RESUMABLE_CHANGES and previous["settings"].get(key) != value
    }
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ConfigError(
            f"`--out` {run_dir} holds a run with other settings ({detail}); "
            "choose another --out/--run-name, or delete the folder to start afresh."
        )


def run(config: TrainConfig) -> dict:
    """Runs the whole recipe; returns the summary written to summary.json."""
    from training import distribute

    # Logical CPU devices must exist before TensorFlow touches a device.
    distribute.configure_cpu_replicas(config.cpu_replicas)

    import keras
    import tensorflow as tf

    import kerasbn
    from training import artifacts, data, models
    from training.loop import Loop

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    if config.strategy == "multi-worker":
        # Checked before the strategy is built: building it waits for every peer.
        workers = distribute.num_workers_from_tf_config()
        if workers and config.batch_size % workers:
            raise ConfigError(
                f"`--batch-size` must be divisible by the {workers} workers of multi-worker training "
                f"(each worker takes an equal share). Received: batch_size={config.batch_size}"
            )
    strategy = distribute.get_strategy(config.strategy)
    replicas = strategy.num_replicas_in_sync
    if config.strategy == "multi-worker" and config.batch_size % replicas:
        raise ConfigError(
            f"`--batch-size` must be divisible by the {replicas} replicas of multi-worker training "
            f"(each worker takes an equal share). Received: batch_size={config.batch_size}"
        )
    chief = distribute.is_chief(strategy)
    run_dir = config.run_dir()
    _check_resumable(run_dir, config)
    verbose = chief and not config.quiet
    if chief:
        versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "kerasbn": kerasbn.__version__}
        artifacts.write_json(
            os.path.join(run_dir, "config.json"),
            {"settings": dataclasses.asdict(config), "versions": versions, "strategy": distribute.describe(strategy)},
        )

    # Data: the global batch is split across replicas by the strategy.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

    def train_dataset(epoch: int, seed_offset: int = 0):
        dataset = data.make_dataset(
            "train", config.batch_size, training=True, data_dir=config.data_dir,
            limit=config.limit_train, seed=config.seed * 1000 + epoch + seed_offset, drop_remainder=True,
        )
        return dataset.with_options(options)

    test = data.make_dataset(
        "test", config.batch_size, training=False, data_dir=config.data_dir, limit=config.limit_test
    ).with_options(options)
    train_examples = config.limit_train or 60000
    steps_per_epoch = min(train_examples, 60000) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"`--batch-size` {config.batch_size} is larger than the {train_examples} training examples. "
            f"Received: batch_size={config.batch_size}, limit_train={config.limit_train}"
        )

    with strategy.scope():
        model = models.build_lenet(
            config.norm, config.bn_momentum, config.sync_bn,
            norm_places=config.norm_places, bias=config.bias, dropout=config.dropout, affine=config.affine,
            sync_group_size=config.sync_group_size, virtual_batch_size=config.virtual_batch_size,
        )
        optimizer = keras.optimizers.SGD(learning_rate=config.lr)
    loop = Loop(
        model, optimizer, strategy, run_dir, config.batch_size, chief=chief, verbose=verbose,
        worker_index=_worker_index(),
    )
    title = f"LeNet-{config.norm} lr={config.lr:g} batch={config.batch_size} ({distribute.describe(strategy)})"

    writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard")) if chief else None
    logged = 0  # history rows this process has written to TensorBoard

    def on_epoch_end(history):
        # After a resume the first call logs the restored epochs again, so a
        # kill between checkpoint and logging loses no epoch's scalars.
        nonlocal logged
        artifacts.write_csv(os.path.join(run_dir, "history.csv"), history, HISTORY_COLUMNS)
        artifacts.plot_curves(os.path.join(run_dir, "curves.png"), history, title)
        with writer.as_default():
            for row in history[logged:]:
                for key in HISTORY_COLUMNS[1:]:
                    tf.summary.scalar(key, row[key], step=row["epoch"])
        writer.flush()
        logged = len(history)

    began = time.perf_counter()
    history = loop.fit(
        lambda epoch: strategy.experimental_distribute_dataset(train_dataset(epoch)),
        strategy.experimental_distribute_dataset(test),
        config.epochs,
        steps_per_epoch,
        on_epoch_end,
    )
    if chief:
        on_epoch_end(history)  # a run resumed after its last checkpoint trained nothing new
    last = history[-1]
    summary = {
        "epochs": last["epoch"],
        "loss": last["loss"],
        "train_acc": last["train_acc"],
        "test_acc_moving_averages": last["test_acc"],
        "test_acc": last["test_acc"],
        "examples_per_sec": last["examples_per_sec"],
        "devices": distribute.describe(strategy),
        "wall_seconds": time.perf_counter() - began,
    }
    if config.norm == "kerasbn" and config.recompute_stats_batches > 0:
        batches = kerasbn.recompute_statistics(model, train_dataset(0, seed_offset=999), config.recompute_stats_batches)
        summary["recomputed_batches"] = batches
        summary["test_acc"] = loop.evaluate(strategy.experimental_distribute_dataset(test))["acc"]

    # Reads are never collectives (kerasbn/distributed.py): the chief saves
    # alone, atomically, the statistics handed over by the loop's last epoch.
    if chief:
        tmp_path = os.path.join(run_dir, f".tmp-model-{os.getpid()}.keras")
        model.save(tmp_path)
        os.replace(tmp_path, os.path.join(run_dir, "model.keras"))
        artifacts.write_json(os.path.join(run_dir, "summary.json"), summary)

    recompute = (
        f" (moving averages {summary['test_acc_moving_averages']:.3f}, recomputed over {summary['recomputed_batches']} batches)"
        if "recomputed_batches" in summary
        else ""
    )
    if chief:
        print(
            f"loss {summary['loss']:.3f}, train acc {summary['train_acc']:.3f}, test acc {summary['test_acc']:.3f}{recompute}, "
            f"{summary['examples_per_sec']:.1f} examples/sec on {summary['devices']}"
        )
    if chief and config.export:
        _export(run_dir)
    return summary


def _export(run_dir: str) -> None:
    from training import export

    export.export_run(run_dir)


def _worker_index() -> int:
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    return int(task.get("index", 0))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    status = main()
    if status == PEER_LOST_EXIT_CODE:
        # TensorFlow's teardown can wait on the lost peer (up to ~35 s seen on a busy
        # machine); the last checkpoint is on disk already, so nothing is left to save.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)

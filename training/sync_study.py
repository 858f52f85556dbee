"""When to synchronize batch norm: LeNet-BN on Fashion-MNIST on 4 replicas, measured.

    python -m training.sync_study                        # the full study (about an hour on 2 quiet cores)
    python -m training.sync_study --quick --out DIR      # batch 2, 1 seed, a small slice: every mode in minutes
    python -m training.sync_study --modes local,ghost --seeds 1

Four replicas on logical CPU devices (MirroredStrategy, as `training.train
--cpu-replicas 4`), per-replica batch 2, 4, 8, 16, 32, and four ways to get
the BN statistics (`MODES`): each replica's own batch (local), the global
batch (synchronized), groups of 2 replicas (`sync_group_size=2`), and ghost
batch norm (a batch of 32 per replica whose statistics come from
sub-batches of the x-axis size). Every run sees the same number of training
examples, with the learning rate scaled linearly with the global batch
(the recipe's 1.0 at 256), as Wu & He 2018 did; so smaller batches take
more, smaller steps over the same data.

Every run is `training.train.run`, trained once per distinct configuration
and reused through the exercises' run cache (`training.exercises.runner`):
a killed study resumes without redoing a finished run, and a killed run
resumes from its checkpoint. Results in `runs/sync-study/` (or `--out`):

* `results.json`: one record per (mode, batch, seed), written as each finishes;
* `step_times.json`: ms per training step of each mode, timed interleaved per batch size;
* `sync_study.md`, `sync_study.json`: the table (mean and min-max over seeds);
* `sync_study.png`: test accuracy against the per-replica batch, one line per mode;
* `train/<run>/`: the training runs themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

from training import artifacts
from training.config import ConfigError, TrainConfig, add_flags, config_from_args, flag_field, run_cli
from training.exercises.runner import Counts, config_hash, run_folder, train_once

REPLICAS = 4
# The recipe's learning rate per example of the global batch (1.0 at 256), scaled linearly.
LR_PER_EXAMPLE = 1.0 / 256
# Training examples the recomputed statistics are averaged over (in batches of the run's global batch).
RECOMPUTE_EXAMPLES = 2048


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way of computing the BN statistics during training.

    Args:
        key: Its name for `--modes`.
        label: Its label in tables and plots.
        synchronized: Statistics across replicas (`synchronized=True`).
        group_size: With `synchronized`, replicas per group (`sync_group_size`).
        ghost: Train at the largest per-replica batch; the x-axis batch is
            the `virtual_batch_size` the statistics come from.
    """

    key: str
    label: str
    synchronized: bool = False
    group_size: Optional[int] = None
    ghost: bool = False


MODES: Tuple[Mode, ...] = (
    Mode("local", "local (per replica)"),
    Mode("synchronized", f"synchronized ({REPLICAS} replicas)", synchronized=True),
    Mode("groups", "synchronized in groups of 2", synchronized=True, group_size=2),
    Mode("ghost", "ghost BN (virtual batch)", ghost=True),
)
MODE_KEYS = tuple(mode.key for mode in MODES)


def groups_available() -> bool:
    """Whether this kerasbn.BatchNorm takes `sync_group_size` (the groups mode needs it)."""
    import inspect

    import kerasbn

    return "sync_group_size" in inspect.signature(kerasbn.BatchNorm.__init__).parameters


@dataclasses.dataclass
class SyncStudyConfig:
    """Which batches, modes and seeds, and how much data each run sees."""

    batches: str = flag_field("2,4,8,16,32", "Per-replica batch sizes, comma-separated.")
    modes: str = flag_field("all", f"Modes, comma-separated: all, or of {', '.join(MODE_KEYS)}.")
    seeds: int = flag_field(3, "Seeds per (mode, batch): 0, 1, ... seeds-1.")
    examples: int = flag_field(8000, "Training examples every run sees (one pass over the first N).")
    test_examples: int = flag_field(5000, "Test examples evaluated (the first N).")
    quick: bool = flag_field(False, "Per-replica batch 2 only, 1 seed, 64 training and 64 test examples: a smoke run of every mode for the tests.")
    out: Optional[str] = flag_field(None, "Results folder (default: runs/sync-study, or runs/sync-study-quick).")
    overwrite: bool = flag_field(False, "Delete earlier results in the folder and start afresh (default: resume).")
    data_dir: Optional[str] = flag_field(None, "Folder with the Fashion-MNIST IDX files (as for training.train).")
    time_steps: bool = flag_field(True, "Time a training step of each mode, interleaved per batch size.")

    def __post_init__(self):
        if self.quick:
            self.batches, self.seeds, self.examples, self.test_examples = "2", 1, 64, 64

    def validate(self) -> "SyncStudyConfig":
        try:
            batches = self.batch_list()
        except ValueError:
            batches = []
        if not batches or any(b < 1 for b in batches):
            raise ConfigError(f"`--batches` must be positive integers, comma-separated. Received: batches={self.batches!r}")
        for key in self.mode_keys():
            if key not in MODE_KEYS:
                raise ConfigError(f"`--modes` must be 'all' or among {', '.join(MODE_KEYS)}. Received: modes={self.modes!r}")
        if self.seeds < 1:
            raise ConfigError(f"`--seeds` must be a positive integer. Received: seeds={self.seeds}")
        largest = REPLICAS * max(batches)
        if self.examples < largest:
            raise ConfigError(
                f"`--examples` must be at least one global batch ({REPLICAS} x {max(batches)} = {largest}). "
                f"Received: examples={self.examples}"
            )
        if "ghost" in self.mode_keys() and any(max(batches) % b for b in batches):
            raise ConfigError(
                f"`--batches` must each divide the largest (ghost batch norm's virtual batches). Received: batches={self.batches!r}"
            )
        if "groups" in self.modes.split(",") and not groups_available():
            raise ConfigError(
                "`--modes` groups needs kerasbn.BatchNorm's `sync_group_size` argument, which this kerasbn lacks. "
                f"Received: modes={self.modes!r}"
            )
        return self

    def batch_list(self) -> List[int]:
        return sorted(int(b) for b in self.batches.split(",") if b.strip())

    def mode_keys(self) -> List[str]:
        keys = [key.strip() for key in self.modes.split(",") if key.strip()]
        return list(MODE_KEYS) if keys in ([], ["all"]) else keys

    def out_dir(self) -> str:
        return self.out or os.path.join("runs", "sync-study-quick" if self.quick else "sync-study")

    def train_config(self, mode: Mode, batch: int, seed: int) -> TrainConfig:
        """The training run of `mode` at per-replica batch `batch` (the run folder is set later)."""
        per_replica = max(self.batch_list()) if mode.ghost else batch
        global_batch = REPLICAS * per_replica
        config = TrainConfig(
            epochs=1,
            lr=LR_PER_EXAMPLE * global_batch,
            batch_size=global_batch,
            cpu_replicas=REPLICAS,
            sync_bn=mode.synchronized,
            sync_group_size=mode.group_size,
            # At the largest batch ghost BN is plain BN: the same run as local, trained once.
            virtual_batch_size=batch if mode.ghost and batch < per_replica else None,
            seed=seed,
            limit_train=self.examples,
            limit_test=self.test_examples,
            recompute_stats_batches=max(1, min(RECOMPUTE_EXAMPLES, self.examples) // global_batch),
            data_dir=self.data_dir,
            quiet=True,
            export=False,
        )
        return config.validate()


# -------------------------------------------------------------- running


def _record(mode: Mode, batch: int, config: TrainConfig, summary: Dict) -> Dict:
    return {
        "mode": mode.key,
        "batch": batch,
        "seed": config.seed,
        "config_hash": config_hash(config),
        "run_dir": config.out,
        "global_batch": config.batch_size,
        "virtual_batch_size": config.virtual_batch_size,
        "lr": config.lr,
        "steps": config.limit_train // config.batch_size,
        "test_acc_recomputed": summary["test_acc"],
        "test_acc_moving": summary["test_acc_moving_averages"],
        "train_acc": summary["train_acc"],
        "seconds": summary["wall_seconds"],
    }


def _key(record: Dict) -> Tuple:
    return record["mode"], record["batch"], record["seed"], record["config_hash"]


def _time_steps(config: SyncStudyConfig, modes: Sequence[Mode], out: str) -> Dict:
    """ms per training step of every mode, interleaved per batch size; kept while the configurations match."""
    from training.exercises.measure import step_times

    path = os.path.join(out, "step_times.json")
    times = artifacts.read_json(path, default={})
    rounds, steps = (1, 2) if config.quick else (5, 10)
    for batch in config.batch_list():
        configs = {mode.key: config.train_config(mode, batch, 0) for mode in modes}
        wanted = {key: config_hash(c) for key, c in configs.items()}
        if times.get(str(batch), {}).get("configs") == wanted:
            continue
        print(f"timing a training step of each mode at per-replica batch {batch}", flush=True)
        # A mode whose run is another's (ghost BN at the largest batch is local BN) is timed once.
        distinct = {wanted[key]: train_config for key, train_config in configs.items()}
        ms = step_times(distinct, rounds, steps, config.data_dir)
        times[str(batch)] = {"configs": wanted, "ms_per_step": {key: ms[wanted[key]] for key in configs},
                             "rounds": rounds, "steps": steps}
        artifacts.write_json(path, times)
    return times


def run(config: SyncStudyConfig) -> Dict:
    """Trains every (mode, batch, seed) not yet done, times the steps, writes the table and the plot."""
    from training import distribute

    # Logical CPU devices must exist before TensorFlow touches a device.
    distribute.configure_cpu_replicas(REPLICAS)
    out = config.out_dir()
    if config.overwrite:
        _clear(out)
    modes = [mode for mode in MODES if mode.key in config.mode_keys()]
    notes = []
    if any(mode.group_size for mode in modes) and not groups_available():
        modes = [mode for mode in modes if not mode.group_size]
        notes.append(
            "The groups mode was skipped: this kerasbn.BatchNorm has no `sync_group_size` argument yet."
        )
        print(f"note: {notes[-1]}", flush=True)
    results_path = os.path.join(out, "results.json")
    records = artifacts.read_json(results_path, default=[])
    done = {_key(record) for record in records}
    plan = [(mode, batch, seed) for seed in range(config.seeds) for batch in config.batch_list() for mode in modes]
    counts = Counts()
    began = time.perf_counter()
    for index, (mode, batch, seed) in enumerate(plan, start=1):
        train_config = config.train_config(mode, batch, seed)
        train_config.out = run_folder(out, train_config)
        wanted = (mode.key, batch, seed, config_hash(train_config))
        if wanted in done:
            counts.kept += 1
            continue
        summary, _ = train_once(train_config, counts)
        record = _record(mode, batch, train_config, summary)
        records = [r for r in records if _key(r)[:3] != wanted[:3]] + [record]
        done.add(wanted)
        artifacts.write_json(results_path, records)
        elapsed = time.perf_counter() - began
        print(
            f"[{index}/{len(plan)}] {mode.key}, batch {batch} per replica, seed {seed}: test acc "
            f"{record['test_acc_recomputed']:.4f} recomputed, {record['test_acc_moving']:.4f} moving "
            f"({elapsed / 60:.1f} min so far)",
            flush=True,
        )
    times = _time_steps(config, modes, out) if config.time_steps else {}
    wanted_records = [r for r in records if (r["mode"], r["batch"], r["seed"]) in {(m.key, b, s) for m, b, s in plan}]
    write_results(out, config, modes, wanted_records, times, notes)
    print(
        f"{counts.trained} runs trained, {counts.reused} reused from finished runs, {counts.kept} records kept "
        f"from earlier; {time.perf_counter() - began:.0f} s. Results: {os.path.join(out, 'sync_study.md')}"
    )
    return dataclasses.asdict(counts)


def _clear(out: str) -> None:
    import shutil

    for name in ("results.json", "step_times.json", "sync_study.md", "sync_study.json", "sync_study.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, "train"), ignore_errors=True)


# -------------------------------------------------------------- results


def _spread(values: List[float]) -> Dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def summarize(config: SyncStudyConfig, modes: Sequence[Mode], records: List[Dict], times: Dict) -> List[Dict]:
    """One row per (mode, batch) with records: accuracies over seeds, the step time, the run's shape."""
    rows = []
    for mode in modes:
        for batch in config.batch_list():
            cell = sorted((r for r in records if r["mode"] == mode.key and r["batch"] == batch), key=lambda r: r["seed"])
            if not cell:
                continue
            step_ms = times.get(str(batch), {}).get("ms_per_step", {}).get(mode.key)
            rows.append(
                {
                    "mode": mode.key,
                    "label": mode.label,
                    "batch": batch,
                    "global_batch": cell[0]["global_batch"],
                    "virtual_batch_size": cell[0]["virtual_batch_size"],
                    "lr": cell[0]["lr"],
                    "steps": cell[0]["steps"],
                    "seeds": [r["seed"] for r in cell],
                    "test_acc_recomputed": _spread([r["test_acc_recomputed"] for r in cell]),
                    "test_acc_moving": _spread([r["test_acc_moving"] for r in cell]),
                    "step_ms": step_ms,
                    "us_per_example": None if step_ms is None else 1000 * step_ms / cell[0]["global_batch"],
                }
            )
    return rows


def _cell(spread: Dict) -> str:
    if len(spread["values"]) == 1:
        return f"{spread['mean']:.4f}"
    return f"{spread['mean']:.4f} ({spread['min']:.4f}-{spread['max']:.4f})"


def write_results(out: str, config: SyncStudyConfig, modes: Sequence[Mode], records: List[Dict], times: Dict,
                  notes: List[str]) -> None:
    """sync_study.json, sync_study.md and sync_study.png, each written atomically."""
    rows = summarize(config, modes, records, times)
    settings = {
        "replicas": REPLICAS,
        "examples_per_run": config.examples,
        "test_examples": config.test_examples,
        "lr_per_example": LR_PER_EXAMPLE,
        "recompute_examples": min(RECOMPUTE_EXAMPLES, config.examples),
        "ghost_batch_per_replica": max(config.batch_list()),
        "seeds": config.seeds,
    }
    artifacts.write_json(os.path.join(out, "sync_study.json"), {"settings": settings, "rows": rows, "notes": notes})
    lines = [
        "# When to synchronize: LeNet-BN on Fashion-MNIST, 4 replicas",
        "",
        f"`python -m training.sync_study` ({config.seeds} seed(s); {config.examples:,} training examples per run, "
        f"one pass; test accuracy on {config.test_examples:,} test examples, mean (min-max) over seeds). "
        f"Learning rate {LR_PER_EXAMPLE * 256:g} x global batch / 256. Ghost BN trains at "
        f"{max(config.batch_list())} per replica with `virtual_batch_size` = the batch column. Recomputed: BN "
        f"statistics averaged over {min(RECOMPUTE_EXAMPLES, config.examples):,} training examples after training. ms/step: one training "
        "step, timed interleaved with the other modes at the same batch (median of rounds).",
        "",
        "| mode | batch per replica | global batch | steps | lr | test acc, recomputed | test acc, moving averages "
        "| ms/step | us/example |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        step = "-" if row["step_ms"] is None else f"{row['step_ms']:.1f}"
        per_example = "-" if row["us_per_example"] is None else f"{row['us_per_example']:.0f}"
        lines.append(
            f"| {row['label']} | {row['batch']} | {row['global_batch']} | {row['steps']} | {row['lr']:g} "
            f"| {_cell(row['test_acc_recomputed'])} | {_cell(row['test_acc_moving'])} | {step} | {per_example} |"
        )
    lines += [""] + [f"Note: {note}" for note in notes]
    artifacts.atomic_write_text(os.path.join(out, "sync_study.md"), "\n".join(lines).rstrip() + "\n")
    plot(os.path.join(out, "sync_study.png"), modes, rows)


def plot(path: str, modes: Sequence[Mode], rows: List[Dict]) -> None:
    """Test accuracy (recomputed, moving averages) and step time against the per-replica batch, one line per mode."""
    plt = artifacts.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("test_acc_recomputed", "test accuracy, recomputed statistics"),
              ("test_acc_moving", "test accuracy, moving averages"))
    for mode_index, mode in enumerate(modes):
        mode_rows = [row for row in rows if row["mode"] == mode.key]
        if not mode_rows:
            continue
        batches = [row["batch"] for row in mode_rows]
        # Modes share batch sizes: shift each a little so the error bars do not hide each other.
        shifted = [b * 2 ** (0.04 * (mode_index - 1.5)) for b in batches]
        for ax, (column, title) in zip(axes, panels):
            means = [row[column]["mean"] for row in mode_rows]
            # max(0, .): the mean of equal values can differ from them in the last bit.
            low = [max(0.0, row[column]["mean"] - row[column]["min"]) for row in mode_rows]
            high = [max(0.0, row[column]["max"] - row[column]["mean"]) for row in mode_rows]
            ax.errorbar(shifted, means, yerr=[low, high], fmt="o-", capsize=3, markersize=4, label=mode.label)
            ax.set_title(title, fontsize=9)
        timed = [(b, row["step_ms"]) for b, row in zip(batches, mode_rows) if row["step_ms"] is not None]
        if timed:
            axes[2].plot([b for b, _ in timed], [ms for _, ms in timed], "o-", markersize=4, label=mode.label)
    axes[2].set_title("training step (ms, interleaved)", fontsize=9)
    from matplotlib.ticker import ScalarFormatter

    batches = sorted({row["batch"] for row in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(f"batch per replica (ghost BN: its virtual batch, at {batches[-1]} per replica)", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[2].set_ylim(bottom=0)
    axes[0].set_ylabel("test accuracy (mean, min-max over seeds)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("LeNet-BN on Fashion-MNIST, 4 replicas, the same training examples per run", fontsize=10)
    fig.tight_layout()
    artifacts.save_figure(fig, path, dpi=90)


# ------------------------------------------------------------------ CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> SyncStudyConfig:
    parser = argparse.ArgumentParser(
        prog="python -m training.sync_study",
        description="When to synchronize batch norm: accuracy and step time against the per-replica batch.",
    )
    add_flags(parser, SyncStudyConfig)
    return config_from_args(parser.parse_args(argv), SyncStudyConfig).validate()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Running the exercises: one training run per distinct configuration, one record per (exercise, variant, seed)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

from training import artifacts
from training.config import TrainConfig, add_flags, config_from_args, run_cli
from training.exercises.catalog import EXERCISES, Exercise, ExercisesConfig, Variant, make_variant
from training.exercises.measure import evaluate_saved_model, measure_biases, step_times
from training.exercises.report import write_report


# TrainConfig fields that do not change what a run computes: left out of its identity.
NOT_IDENTITY = ("out", "run_name", "quiet", "export", "data_dir")


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


# -------------------------------------------------------------- running


@dataclasses.dataclass
class Counts:
    trained: int = 0  # training runs done by this command
    reused: int = 0  # finished runs another record (or an earlier command) had trained
    kept: int = 0  # records already in results.json


def train_once(config: TrainConfig, counts: Counts) -> Tuple[Dict, List[Dict]]:
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
    summary, history = train_once(config, counts)
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
    configs["no normalization"] = config.train_config(make_variant("none", norm="none"), 0)
    wanted = {name: config_hash(c) for name, c in configs.items()}
    previous = artifacts.read_json(path)
    if previous and previous.get("configs") == wanted:
        return
    rounds, steps = (1, 2) if config.quick else (7, 20)
    batch_size = next(iter(configs.values())).batch_size
    times = step_times(configs, rounds, steps, config.data_dir)
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

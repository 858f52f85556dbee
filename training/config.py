"""Typed configuration for the training run, with command-line flags on top.

Every field of `TrainConfig` is a flag (`--batch-size` for `batch_size`);
its help text is the field's `help` metadata. The resolved config is written
as `config.json` beside the run's artifacts. The other drivers (tune,
exercises) declare their own settings with `flag_field` and share `add_flags`
and `run_cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Optional, Sequence

NORMS = ("kerasbn", "keras", "none", "layer", "group", "decorrelated")
NORM_PLACES = ("all", "conv", "dense", "first")
STRATEGIES = ("auto", "mirrored", "multi-worker", "one-device", "default")


class ConfigError(ValueError):
    """A flag or config value that cannot work; the message names it and its value."""


def flag_field(default, help: str, **kwargs):
    """A config field that `add_flags` makes a flag: `help` is its help text; `choices=` limits its values."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass
class TrainConfig:
    """Settings of one LeNet-BN training run on Fashion-MNIST."""

    epochs: int = flag_field(10, "Number of passes over the training set.")
    lr: float = flag_field(1.0, "SGD learning rate (the source text uses 1.0 with BN, 0.9 without).")
    batch_size: int = flag_field(256, "GLOBAL batch size, split across all replicas.")
    norm: str = flag_field(
        "kerasbn",
        "Normalization layer: kerasbn.BatchNorm, keras.layers.BatchNormalization, none, LayerNormalization, "
        "GroupNormalization, or kerasbn.experimental.DecorrelatedBatchNorm.",
        choices=NORMS,
    )
    norm_places: str = flag_field("all", "Where the normalization goes: all four places, the conv layers, the dense hidden layers, or the first conv only.", choices=NORM_PLACES)
    bias: bool = flag_field(True, "Biases in the conv/dense layers that a normalization follows (--no-bias drops them).")
    dropout: float = flag_field(0.0, "Rate of a Dropout after each hidden dense layer (0 = none).")
    affine: bool = flag_field(True, "Learn the normalization's gamma and beta (--no-affine fixes gamma = 1, beta = 0).")
    bn_momentum: float = flag_field(0.9, "Moving-average momentum of the BN layers (Keras convention: weight of the OLD value).")
    sync_bn: bool = flag_field(False, "Batch statistics over the global batch of all replicas (synchronized=True).")
    sync_group_size: Optional[int] = flag_field(None, "With --sync-bn: synchronize within groups of this many consecutive replicas (kerasbn only; default: all replicas).")
    virtual_batch_size: Optional[int] = flag_field(None, "Ghost batch norm: BN statistics over sub-batches of this many examples of each replica's batch (kerasbn only).")
    strategy: str = flag_field("auto", "tf.distribute strategy: auto = MirroredStrategy over several GPUs (or --cpu-replicas), else one device.", choices=STRATEGIES)
    cpu_replicas: int = flag_field(0, "Split the CPU into N logical devices so MirroredStrategy runs N replicas without GPUs (0 = off).")
    seed: int = flag_field(0, "Random seed: same seed and strategy give the same history.")
    limit_train: Optional[int] = flag_field(None, "Train on the first N training examples only (smoke runs).")
    limit_test: Optional[int] = flag_field(None, "Evaluate on the first N test examples only (smoke runs).")
    data_dir: Optional[str] = flag_field(None, "Folder with the Fashion-MNIST IDX .gz files (default: $KERASBN_DATA_DIR or /usr/share/datasets/fashion-mnist).")
    out: Optional[str] = flag_field(None, "Run folder (default: runs/<run-name>). An existing folder with a checkpoint is resumed.")
    run_name: Optional[str] = flag_field(None, "Name of the run folder under runs/ (default: derived from the settings).")
    recompute_stats_batches: int = flag_field(200, "After training, recompute BN statistics over this many training batches (0 = off; kerasbn only).")
    quiet: bool = flag_field(False, "No progress bars.")
    export: bool = flag_field(True, "Export a SavedModel to saved_models/ at the end (chief only).")

    def validate(self) -> "TrainConfig":
        """Raises ConfigError for values that cannot work."""
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive_ints.items():
            if value < 1:
                raise ConfigError(f"`--{flag_name(name)}` must be a positive integer. Received: {name}={value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"`--lr` must be a positive finite number. Received: lr={self.lr}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"`--bn-momentum` must be in [0, 1). Received: bn_momentum={self.bn_momentum}")
        if self.norm not in NORMS:
            raise ConfigError(f"`--norm` must be one of {NORMS}. Received: norm={self.norm!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"`--strategy` must be one of {STRATEGIES}. Received: strategy={self.strategy!r}")
        if self.cpu_replicas < 0:
            raise ConfigError(f"`--cpu-replicas` must be >= 0. Received: cpu_replicas={self.cpu_replicas}")
        for name in ("limit_train", "limit_test", "sync_group_size", "virtual_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"`--{flag_name(name)}` must be a positive integer. Received: {name}={value}")
        if self.norm_places not in NORM_PLACES:
            raise ConfigError(f"`--norm-places` must be one of {NORM_PLACES}. Received: norm_places={self.norm_places!r}")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"`--dropout` must be in [0, 1). Received: dropout={self.dropout}")
        if self.recompute_stats_batches < 0:
            raise ConfigError(
                f"`--recompute-stats-batches` must be >= 0. Received: recompute_stats_batches={self.recompute_stats_batches}"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"`--seed` must be in [0, 2**32). Received: seed={self.seed}")
        from training.data import TFDS_SOURCE  # NumPy only: no TensorFlow before the flags are checked

        if self.data_dir not in (None, TFDS_SOURCE) and not os.path.isdir(os.path.expanduser(self.data_dir)):
            raise ConfigError(
                f"`--data-dir` must be an existing folder (or {TFDS_SOURCE!r}). Received: data_dir={self.data_dir!r}"
            )
        if self.out is not None and (not self.out.strip() or os.path.isfile(self.out)):
            raise ConfigError(f"`--out` must name a folder (new or existing). Received: out={self.out!r}")
        if self.run_name is not None and (
            not self.run_name.strip() or self.run_name in (".", "..") or "/" in self.run_name or os.sep in self.run_name
        ):
            raise ConfigError(
                f"`--run-name` must be a folder name (not empty, without '/'). Received: run_name={self.run_name!r}"
            )
        if self.sync_bn and self.norm not in ("kerasbn", "keras"):
            raise ConfigError(f"`--sync-bn` needs a kerasbn or keras BN layer. Received: sync_bn=True with norm={self.norm!r}")
        if self.sync_group_size is not None and not (self.sync_bn and self.norm == "kerasbn"):
            raise ConfigError(
                "`--sync-group-size` needs --sync-bn and --norm kerasbn. "
                f"Received: sync_group_size={self.sync_group_size} with sync_bn={self.sync_bn}, norm={self.norm!r}"
            )
        if self.virtual_batch_size is not None and self.norm != "kerasbn":
            raise ConfigError(
                f"`--virtual-batch-size` needs --norm kerasbn. Received: virtual_batch_size={self.virtual_batch_size} with norm={self.norm!r}"
            )
        return self

    def default_run_name(self) -> str:
        name = f"lenet-{self.norm}-lr{self.lr:g}-bs{self.batch_size}-{self.strategy}"
        if self.cpu_replicas:
            name += f"-cpu{self.cpu_replicas}"
        if self.sync_bn:
            name += "-syncbn"
        if self.sync_group_size:
            name += f"-groups{self.sync_group_size}"
        if self.virtual_batch_size:
            name += f"-vbs{self.virtual_batch_size}"
        if self.norm_places != "all":
            name += f"-{self.norm_places}"
        if not self.bias:
            name += "-nobias"
        if self.dropout:
            name += f"-dropout{self.dropout:g}"
        if not self.affine:
            name += "-noaffine"
        if self.limit_train:
            name += f"-n{self.limit_train}"
        return name + f"-seed{self.seed}"

    def run_dir(self) -> str:
        return self.out or os.path.join("runs", self.run_name or self.default_run_name())


def flag_name(name: str) -> str:
    """The flag of a config field, without its dashes: `batch_size` -> `batch-size`."""
    return name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, config_cls=TrainConfig, skip: Sequence[str] = ()) -> None:
    """Adds one flag per dataclass field, typed and documented from the field."""
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        flag = "--" + flag_name(field.name)
        help_text = field.metadata.get("help", "") + f" (default: {field.default})"
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[str]": str}[str(field.type)]
        parser.add_argument(
            flag, type=kind, default=field.default, help=help_text, choices=field.metadata.get("choices")
        )


def config_from_args(namespace: argparse.Namespace, config_cls=TrainConfig):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(namespace).items() if k in names})


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "python -m training.train") -> TrainConfig:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train LeNet with batch normalization on Fashion-MNIST under a tf.distribute strategy.",
    )
    add_flags(parser)
    return config_from_args(parser.parse_args(argv)).validate()


# sysexits.h's EX_TEMPFAIL: the same command, started again, can succeed.
PEER_LOST_EXIT_CODE = 75


def _lost_peer_reason(error: BaseException) -> Optional[str]:
    """Why a multi-worker collective failed, when `error` says a peer is gone; else None."""
    import re
    import sys

    # TensorFlow raises it, so it is imported already whenever the check matters.
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(error, tf.errors.UnavailableError):
        return None
    message = str(getattr(error, "message", error))
    aborted = re.search(r"aborted by: *(.+)", message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return aborted[1].strip().rstrip(":") if aborted else (lines[0] if lines else type(error).__name__)


def run_cli(parse_args, run, argv=None) -> int:
    """A driver's `main`: parse the flags, run, and turn the expected failures into one line.

    Returns `run`'s own exit status when it returns an int (tune's does), else
    0 on success; 2 for a bad flag (`ConfigError`), 1 for a data, run-folder or
    export error (`DataError`, `RunError` and its `ExportError`),
    `PEER_LOST_EXIT_CODE` (75) when a multi-worker run lost a worker
    (TensorFlow's UnavailableError: its collectives are aborted, and every
    worker must start again, resuming from the last checkpoint); any other
    exception keeps its traceback.
    """
    import sys

    try:
        status = run(parse_args(argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # data, run-folder and export errors, a lost worker: one clear line
        from training.data import DataError
        from training.runs import RunError

        if isinstance(error, (DataError, RunError)):
            print(f"error: {error}", file=sys.stderr)
            return 1
        reason = _lost_peer_reason(error)
        if reason is not None:
            print(
                f"error: a worker of the multi-worker cluster is gone ({reason}). Start every worker again "
                "with the same command: training resumes from the last checkpoint in the run folder.",
                file=sys.stderr,
            )
            return PEER_LOST_EXIT_CODE
        raise
    return status if isinstance(status, int) else 0

"""The learning-rate search's settings: `TuneConfig` and the constants both the driver
(`training/tune.py`) and its keras-tuner classes (`training/tuner_classes.py`) read.

Its own module so that each of those imports it from below, and neither imports the other back.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Optional

from training.config import ConfigError, TrainConfig, flag_field, flag_name

TUNERS = ("random", "hyperband", "bayesian")
BATCH_SIZES = (64, 128, 256, 512)
BN_MOMENTA = (0.5, 0.8, 0.9, 0.95, 0.99)
CHANCE_LOSS = math.log(10.0)  # cross-entropy of a uniform guess over the ten classes
OBJECTIVE = "val_accuracy"
PROJECT_NAME = "keras_tuner"
RECORD_FILE = "kerasbn_trial.json"
BEST_RUN = "best"
# keras-tuner stops a search after this many consecutive crashed trials (diverged ones do not count).
MAX_CONSECUTIVE_CRASHES = 3
# Shared training flags that make no sense for a search (the search sets or replaces them).
SKIPPED_TRAIN_FLAGS = (
    "epochs", "lr", "out", "run_name", "norm_places", "bias", "dropout", "affine", "limit_test",
)
# Settings that define the search: a folder holding a search with other values is not resumed.
SEARCH_SETTINGS = (
    "tuner", "epochs", "lr_min", "lr_max", "tune_batch_size", "tune_bn_momentum", "compare_norms",
    "search_examples", "val_fraction", "divergence_loss",
)
TRAIN_SEARCH_SETTINGS = ("batch_size", "norm", "bn_momentum", "sync_bn", "seed", "limit_train", "data_dir")
RESULT_COLUMNS = (
    "rank", "trial_id", "status", "norm", "lr", "batch_size", "bn_momentum", "best_val_accuracy",
    "epochs", "best_epoch", "seconds", "tuner_id", "note",
)


@dataclasses.dataclass
class TuneConfig:
    """Settings of one learning-rate search; the shared training flags live in `TrainConfig`."""

    tuner: str = flag_field("random", "keras-tuner algorithm: RandomSearch, Hyperband or BayesianOptimization.", choices=TUNERS)
    max_trials: int = flag_field(20, "Number of trials (Hyperband: an upper bound on its brackets' trials).")
    epochs: int = flag_field(4, "Training epochs per trial (Hyperband: the most epochs one trial reaches).")
    lr_min: float = flag_field(1e-3, "Smallest learning rate; sampled log-uniformly in [lr-min, lr-max].")
    lr_max: float = flag_field(10.0, "Largest learning rate.")
    tune_batch_size: bool = flag_field(False, f"Also search the global batch size over {BATCH_SIZES} (else --batch-size).")
    tune_bn_momentum: bool = flag_field(False, f"Also search the BN momentum over {BN_MOMENTA} (else --bn-momentum).")
    compare_norms: bool = flag_field(False, "Search the norm too: --norm's BN layer against no BN (one plot series each).")
    overwrite: bool = flag_field(False, "Delete runs/tune-<name>/ and start afresh (else an existing search is resumed).")
    name: Optional[str] = flag_field(None, "The search folder is runs/tune-<name> (default: derived from the settings).")
    search_examples: int = flag_field(0, "Search on the first N training examples only, 0 = all (retraining uses all).")
    val_fraction: float = flag_field(0.2, "Fraction of the search examples held out to score trials (never the test set).")
    retrain_epochs: int = flag_field(10, "Epochs to retrain the best configuration on the full training set (0 = skip).")
    divergence_loss: float = flag_field(
        round(10 * CHANCE_LOSS, 2),
        "A trial diverged when its mean training loss over an epoch exceeds this, or the loss turns NaN/inf (0 = NaN/inf only).",
    )
    export_dir: str = flag_field("saved_models", "Where the retrained best model is exported (with --export).")
    export_name: str = flag_field("lenet_bn_tuned", "Model folder under --export-dir.")

    def validate(self) -> "TuneConfig":
        """Raises ConfigError naming the flag and the value that cannot work."""
        if self.tuner not in TUNERS:
            raise ConfigError(f"`--tuner` must be one of {TUNERS}. Received: tuner={self.tuner!r}")
        for name in ("max_trials", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`--{flag_name(name)}` must be a positive integer. Received: {name}={value!r}")
        for name in ("lr_min", "lr_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"`--{flag_name(name)}` must be a positive finite number. Received: {name}={value!r}")
        if not self.lr_min < self.lr_max:
            raise ConfigError(
                f"`--lr-min` must be smaller than `--lr-max`. Received: lr_min={self.lr_min!r}, lr_max={self.lr_max!r}"
            )
        if self.search_examples < 0:
            raise ConfigError(f"`--search-examples` must be >= 0. Received: search_examples={self.search_examples!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"`--val-fraction` must be in (0, 1). Received: val_fraction={self.val_fraction!r}")
        if self.retrain_epochs < 0:
            raise ConfigError(f"`--retrain-epochs` must be >= 0. Received: retrain_epochs={self.retrain_epochs!r}")
        if not (math.isfinite(self.divergence_loss) and self.divergence_loss >= 0):
            raise ConfigError(
                f"`--divergence-loss` must be a finite number >= 0. Received: divergence_loss={self.divergence_loss!r}"
            )
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name or os.sep in self.name):
            raise ConfigError(f"`--name` must be a plain folder name (no '/'). Received: name={self.name!r}")
        return self

    def norms(self, train: TrainConfig) -> List[str]:
        """The norms searched: --norm alone, or with --compare-norms its BN layer and no BN."""
        if not self.compare_norms:
            return [train.norm]
        return [train.norm if train.norm != "none" else "kerasbn", "none"]

    def default_name(self, train: TrainConfig) -> str:
        return f"{self.tuner}-{'-vs-'.join(self.norms(train))}-lr{self.lr_min:g}-{self.lr_max:g}"

    def tune_dir(self, train: TrainConfig) -> str:
        return os.path.join("runs", f"tune-{self.name or self.default_name(train)}")

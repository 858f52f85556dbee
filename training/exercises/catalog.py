"""The exercises: each question, its variants, and the command's settings that turn them into training runs."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

from training.config import ConfigError, TrainConfig, flag_field


# The tuning search's best learning rate without BN (docs/guides/tuning.md).
NO_BN_BEST_LR = 1.43
LEARNING_RATES = (0.1, 1.0, 10.0)


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


def make_variant(name: str, moving: bool = False, **settings) -> Variant:
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
                make_variant("biases before BN (recipe)"),
                make_variant("no bias before BN", bias=False),
            ),
        ),
        Exercise(
            "learning-rate",
            "How do training and test accuracy improve per epoch at several learning rates, with and without BN?",
            tuple(make_variant(f"BN, lr {lr:g}", lr=lr) for lr in LEARNING_RATES)
            + tuple(make_variant(f"no BN, lr {lr:g}", norm="none", lr=lr) for lr in LEARNING_RATES),
        ),
        Exercise(
            "placement",
            "Do we need batch norm in every layer?",
            (
                make_variant("all four (recipe)"),
                make_variant("convolutions only", norm_places="conv"),
                make_variant("dense layers only", norm_places="dense"),
                make_variant("first layer only", norm_places="first"),
                make_variant("none, lr 1.0", norm="none"),
                make_variant(f"none, lr {NO_BN_BEST_LR:g} (best)", norm="none", lr=NO_BN_BEST_LR),
            ),
        ),
        Exercise(
            "dropout",
            "Can batch norm replace dropout?",
            (
                make_variant("BN only (recipe)"),
                make_variant("dropout 0.2, no BN", norm="none", dropout=0.2),
                make_variant("dropout 0.5, no BN", norm="none", dropout=0.5),
                make_variant("BN + dropout 0.2", dropout=0.2),
                make_variant("neither", norm="none"),
            ),
        ),
        Exercise(
            "frozen-affine",
            "What if gamma and beta are fixed (gamma = 1, beta = 0, not trained)?",
            (
                make_variant("learned gamma, beta (recipe)"),
                make_variant("fixed gamma = 1, beta = 0", affine=False),
            ),
        ),
        Exercise(
            "other-norms",
            "Other normalizations in the same places, and a BN that whitens with the full covariance.",
            (
                make_variant("BatchNorm, recomputed statistics (recipe)"),
                make_variant("BatchNorm, moving averages", moving=True),
                make_variant("LayerNormalization", norm="layer"),
                make_variant("GroupNormalization", norm="group"),
                make_variant("DecorrelatedBatchNorm (ZCA)", norm="decorrelated"),
            ),
        ),
    )
}


@dataclasses.dataclass
class ExercisesConfig:
    """Which exercises, how many seeds, and the recipe they share."""

    exercise: str = flag_field("all", f"Exercises to run, comma-separated: all, or of {', '.join(EXERCISES)}.")
    seeds: int = flag_field(3, "Seeds per variant (0, 1, ... seeds-1).")
    epochs: int = flag_field(10, "Epochs per run (the recipe's 10).")
    quick: bool = flag_field(False, "1 epoch, 1 seed, 1024 training and 1000 test examples: every exercise in minutes.")
    out: Optional[str] = flag_field(None, "Results folder (default: runs/exercises-<name>).")
    overwrite: bool = flag_field(False, "Delete earlier results in the folder and start afresh (default: resume).")
    data_dir: Optional[str] = flag_field(None, "Folder with the Fashion-MNIST IDX files (as for training.train).")
    time_steps: bool = flag_field(True, "other-norms: time a training step of each normalization, interleaved.")

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

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

The package, by job: `catalog` (the exercises and the command's settings),
`measure` (what a record adds to a run's own report), `runner` (run identity,
training, records, the command line), `report` (results.md) and `plots`.
"""

from training.exercises.catalog import EXERCISES, Exercise, ExercisesConfig, Variant
from training.exercises.runner import main, parse_args, run

__all__ = ["EXERCISES", "Exercise", "ExercisesConfig", "Variant", "main", "parse_args", "run"]

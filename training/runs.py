"""A run folder written by `python -m training.train`: finding its trained model and loading it.

The one loader of a run's model, for `training.export` and `training.exercises`.
Keras is imported only when a model is loaded: checking the folder is instant.
"""

from __future__ import annotations

import os

MODEL_FILE = "model.keras"


class RunError(RuntimeError):
    """A run folder lacks its trained model, or the model cannot be loaded; the message says what to do."""


def check_run_dir(run_dir: str) -> str:
    """Returns the path of the run's trained model, or raises RunError saying what is missing.

    Needs no TensorFlow, so a wrong `--run` is reported at once.
    """
    if not os.path.isdir(run_dir):
        raise RunError(
            f"`--run` must be a run folder written by `python -m training.train`. "
            f"Received: run={run_dir!r}, which does not exist or is not a folder."
        )
    model_path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.isfile(model_path):
        found = sorted(name for name in os.listdir(run_dir) if not name.startswith("."))
        raise RunError(
            f"Run folder {run_dir} has no trained model ({MODEL_FILE}); the driver writes it only when "
            f"training has finished. Found: {found or 'nothing'}. Finish the run with "
            f"`python -m training.train --out {run_dir} ...` (it resumes from the latest checkpoint) "
            f"and try again. Received: run={run_dir!r}"
        )
    return model_path


def load_run_model(run_dir: str):
    """Loads the run's `model.keras` (uncompiled), with `kerasbn` imported so its layers deserialise.

    Raises:
        RunError: the run folder has no model, or the file cannot be loaded.
    """
    model_path = check_run_dir(run_dir)
    import keras

    import kerasbn  # noqa: F401  registers kerasbn>BatchNorm and kerasbn>DecorrelatedBatchNorm with Keras

    try:
        return keras.saving.load_model(model_path, compile=False)
    except Exception as error:  # a truncated zip, an unknown layer, ...
        raise RunError(
            f"Cannot load the trained model {model_path}: {type(error).__name__}: {error}. "
            f"Received: run={run_dir!r}"
        ) from error

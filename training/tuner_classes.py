"""The keras-tuner classes of `training.tune`: a divergence guard, the LeNet hypermodel, recording tuners, oracles.

Importing this module imports keras and keras-tuner, and so TensorFlow, which
must not start before `--cpu-replicas` has split the CPU: `training.tune`
imports it only after that, and answers flag errors without TensorFlow.
"""

from __future__ import annotations

import math
import os
import time
import traceback

import keras
import keras_tuner as kt
from keras_tuner.src import config as kt_config

from training import artifacts, models
from training.config import TrainConfig
from training.tune_config import BATCH_SIZES, BN_MOMENTA, OBJECTIVE, RECORD_FILE, TuneConfig

# keras-tuner 1.4 prints the traceback of every failed trial while this is
# True; RecordingTuner prints crashes' tracebacks itself and divergence as one line.
kt_config.DEBUG = False


class TrialDiverged(kt.errors.FailedTrialError):
    """The trial's loss went non-finite or past the divergence bound: FAILED, not retried."""

    def __init__(self, reason: str, epoch: int):
        super().__init__(reason)
        self.epoch = epoch


class DivergenceGuard(keras.callbacks.Callback):
    """Stops a trial whose training loss turns NaN/inf (checked every step) or whose
    mean loss over an epoch exceeds `max_loss` (checked at the epoch's end; 0: no bound).

    The bound applies to whole epochs because a large learning rate can
    spike the loss for a few steps and recover (BN at lr ~30 does).
    """

    def __init__(self, max_loss: float):
        super().__init__()
        self.max_loss = max_loss
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
            raise TrialDiverged(
                f"diverged: training loss became {float(logs['loss'])} at epoch {self.epoch + 1}, step {batch + 1}",
                self.epoch + 1,
            )

    def on_epoch_end(self, epoch, logs=None):
        loss = float(logs["loss"]) if logs and "loss" in logs else None
        if self.max_loss and loss is not None and loss > self.max_loss:
            raise TrialDiverged(
                f"diverged: mean training loss {loss:.4g} over epoch {epoch + 1} > {self.max_loss:g} (--divergence-loss)",
                epoch + 1,
            )


class LeNetHyperModel(kt.HyperModel):
    """LeNet from `training.models`, SGD at the trial's learning rate; `fit` at the trial's batch size."""

    def __init__(self, tune: TuneConfig, train: TrainConfig):
        super().__init__(name="lenet")
        self.tune, self.train = tune, train

    def build(self, hp):
        lr = hp.Float("lr", self.tune.lr_min, self.tune.lr_max, sampling="log")
        norms = self.tune.norms(self.train)
        norm = hp.Choice("norm", norms) if len(norms) > 1 else hp.Fixed("norm", norms[0])
        if self.tune.tune_batch_size:
            hp.Choice("batch_size", list(BATCH_SIZES))
        else:
            hp.Fixed("batch_size", self.train.batch_size)
        if self.tune.tune_bn_momentum:
            momentum = hp.Choice("bn_momentum", list(BN_MOMENTA))
        else:
            momentum = hp.Fixed("bn_momentum", self.train.bn_momentum)
        # The same initial weights in every trial: trials differ only by their hyperparameters.
        keras.utils.set_random_seed(self.train.seed)
        model = models.build_lenet(norm, momentum, self.train.sync_bn and norm != "none")
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=float(lr)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        # How many devices hold the weights: the strategy's replica count when the
        # tuner built the model in its scope (recorded per trial).
        weight = getattr(model.weights[0], "value", model.weights[0])
        self.replicas = len(getattr(weight, "values", (weight,)))
        callbacks = [DivergenceGuard(self.tune.divergence_loss)] + list(callbacks or [])
        return model.fit(*args, batch_size=hp.get("batch_size"), callbacks=callbacks, **kwargs)


class RecordingTuner:
    """Mixin: writes `kerasbn_trial.json` (status, reason, history) into the trial's folder.

    keras-tuner keeps a failure's message only in the process that ran the
    trial (its gRPC trial message has no such field), so the chief of a
    distributed search reads reasons and histories from these files.
    """

    def run_trial(self, trial, *args, **kwargs):
        path = os.path.join(self.get_trial_dir(trial.trial_id), RECORD_FILE)
        values = dict(trial.hyperparameters.values)
        began = time.time()
        base = {
            "trial_id": trial.trial_id,
            "tuner_id": self.tuner_id,
            "hyperparameters": values,
            "initial_epoch": int(values.get("tuner/initial_epoch", 0)),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "pid": os.getpid(),
        }
        artifacts.write_json(path, {**base, "status": "running"})
        try:
            histories = super().run_trial(trial, *args, **kwargs)
        except TrialDiverged as error:
            print(f"Trial {trial.trial_id} {error}")
            artifacts.write_json(
                path,
                {**base, "status": "diverged", "reason": str(error), "epochs": error.epoch, "seconds": time.time() - began},
            )
            raise
        except Exception as error:
            traceback.print_exc()
            reason = f"crashed: {type(error).__name__}: {error}"
            artifacts.write_json(path, {**base, "status": "crashed", "reason": reason, "seconds": time.time() - began})
            raise
        history = histories[0]
        epochs = [epoch + 1 for epoch in history.epoch]
        scores = [float(v) for v in history.history[OBJECTIVE]]
        best = max(range(len(scores)), key=scores.__getitem__)
        artifacts.write_json(
            path,
            {
                **base,
                "status": "completed",
                "epochs": epochs[-1],
                "best_epoch": epochs[best],
                "best_val_accuracy": scores[best],
                "replicas": getattr(self.hypermodel, "replicas", None),
                "history": {"epoch": epochs, **{k: [float(v) for v in vs] for k, vs in history.history.items()}},
                "seconds": time.time() - began,
            },
        )
        return histories


class CrashLimit:
    """Oracle mixin: only crashed trials count towards `max_consecutive_failed_trials`.

    Overrides keras-tuner 1.4's `Oracle._check_consecutive_failures`
    (pinned <1.5): a diverged trial is a result of the search, not a sign
    that the search itself is broken.
    """

    def _check_consecutive_failures(self):
        crashes = 0
        for trial_id in self.end_order:
            trial = self.trials[trial_id]
            if trial.status != "FAILED":
                crashes = 0
                continue
            record_path = os.path.join(self._project_dir, f"trial_{trial_id}", RECORD_FILE)
            if (artifacts.read_json(record_path) or {}).get("status") == "diverged":
                continue
            crashes += 1
            if crashes >= self.max_consecutive_failed_trials:
                raise RuntimeError(
                    f"Number of consecutive failures exceeded the limit of {self.max_consecutive_failed_trials} "
                    f"(crashed trials; diverged ones do not count).\n{trial.message or ''}"
                )


class RandomOracle(CrashLimit, kt.oracles.RandomSearchOracle):
    pass


class BayesianOracle(CrashLimit, kt.oracles.BayesianOptimizationOracle):
    pass


class HyperbandOracle(CrashLimit, kt.oracles.HyperbandOracle):
    pass


class SearchTuner(RecordingTuner, kt.Tuner):
    """RandomSearch and BayesianOptimization: a plain Tuner around their oracle."""


class HyperbandTuner(RecordingTuner, kt.Hyperband):
    """Hyperband's tuner (epochs per round, weights carried between rounds) around our oracle."""

    def __init__(self, oracle, **kwargs):
        # kt.Hyperband.__init__ only builds its own oracle; skip it for ours.
        kt.Tuner.__init__(self, oracle=oracle, **kwargs)


# By `--tuner`.
ORACLE_CLASSES = {"random": RandomOracle, "bayesian": BayesianOracle, "hyperband": HyperbandOracle}
TUNER_CLASSES = {"random": SearchTuner, "bayesian": SearchTuner, "hyperband": HyperbandTuner}

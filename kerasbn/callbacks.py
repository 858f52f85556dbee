"""Keras callbacks for `fit`: the moving statistics of kerasbn.BatchNorm layers.

* `SyncMovingStatistics`: the handover under `tf.distribute`, every
  replica's moving statistics set to their mean before inference and saves.
* `PreciseBN`: population statistics (`kerasbn.recompute_statistics`) at the
  end of training and, optionally, every few epochs before validation.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Iterable, Optional

import keras
import numpy as np

from kerasbn.distributed import sync_moving_statistics
from kerasbn.statistics import batch_norm_layers, recompute_statistics
from kerasbn.validation import validate_positive_int


class SyncMovingStatistics(keras.callbacks.Callback):
    """Hands training over to inference: every replica's moving statistics set to their mean.

    Under a `tf.distribute` strategy each replica updates its own copy of a
    `kerasbn.BatchNorm`'s moving statistics while training (no cross-replica
    call in the step). This callback calls `kerasbn.sync_moving_statistics`
    on the model at every epoch end (before checkpoints, when it comes first
    in the callback list), when evaluation or prediction begins and when
    training ends, so every replica normalizes with the same statistics and
    every save holds their mean. One batched all-reduce for the whole model
    each time; without a multi-replica strategy it does nothing, and on JAX
    too (`keras.distribution` keeps one replicated copy that every step
    writes the devices' mean to).

    This serves `fit` in one process (`MirroredStrategy`, one device).
    Under `MultiWorkerMirroredStrategy` Keras 3.15's `fit` fails on every
    worker, so a custom loop that every worker runs calls
    `kerasbn.sync_moving_statistics(model)` itself, outside `strategy.run`,
    after each epoch's steps (the distribution guide shows one;
    `training/loop.py` is the kit's).

    Args:
        timeout_seconds: Passed to `sync_moving_statistics`; None (the default)
            waits for the other workers as long as they take.

    Example:

    ```python
    with strategy.scope():
        model = build_model()  # holding kerasbn.BatchNorm layers
    model.fit(dataset, epochs=3, callbacks=[kerasbn.callbacks.SyncMovingStatistics(), checkpoint])
    ```
    """

    def __init__(self, timeout_seconds: Optional[float] = None):
        super().__init__()
        self.timeout_seconds = timeout_seconds

    def _sync(self):
        sync_moving_statistics(self.model, timeout_seconds=self.timeout_seconds)

    def on_epoch_end(self, epoch, logs=None):
        self._sync()

    def on_test_begin(self, logs=None):
        self._sync()

    def on_predict_begin(self, logs=None):
        self._sync()

    def on_train_end(self, logs=None):
        self._sync()


class PreciseBN(keras.callbacks.Callback):
    """Recomputes the population statistics of every `kerasbn.BatchNorm` during `fit`.

    The moving averages a BatchNorm keeps while training mix statistics of
    many past versions of the weights. This callback runs
    `kerasbn.recompute_statistics(model, dataset, num_batches)`: the weights
    are frozen, `num_batches` batches of `dataset` go forward in training
    mode, and each layer's moving mean and variance become the plain average
    of the batch statistics it saw (Detectron2's "precise BN"; the trainable
    weights, the optimizer and other layers' state do not change).

    When it runs:

    * At the end of training (`on_train_end`), unless the statistics were
      already recomputed with the trainable weights the model holds then
      (as when the last epoch is one of the `every_n_epochs` and nothing
      changed the weights since). A fingerprint of the trainable weights
      taken at each recomputation tells: weights restored by an earlier
      callback (`EarlyStopping(restore_best_weights=True)` sets them in its
      own `on_train_end`) get statistics of their own.
    * If `every_n_epochs` is given, after the training steps of every N-th
      epoch (epochs N, 2N, ... counting from 1, the convention of `fit`'s
      `validation_freq`) and before that epoch's validation, so that the
      `val_` metrics, and every callback that reads them (checkpoints, early
      stopping), see the recomputed statistics. `fit` runs validation
      through `evaluate` between the last `on_train_batch_end` and
      `on_epoch_end`; the first hook inside it is `on_test_begin`, called
      before the first validation batch. The recomputation happens there;
      an epoch without validation (no `validation_data`, or a
      `validation_freq` that skips it) recomputes in `on_epoch_end`
      instead. `on_train_batch_end` of the last step would be a poorer
      hook: the number of steps is unknown for a dataset without a
      length, a callback can stop the epoch early, and on the JAX backend
      the model's variables are only written back after the epoch's last
      step. A stand-alone `evaluate` (outside `fit`) is left alone.

    Callback order: Keras calls callbacks in list order, hook by hook. List
    `PreciseBN` after the callbacks that set weights when training ends
    (`EarlyStopping(restore_best_weights=True)`), whose restored weights it
    then recomputes for, and before those that save at the end of an epoch
    (`ModelCheckpoint`, `BackupAndRestore`): in an epoch without validation
    the recomputation happens in `on_epoch_end`, and a checkpoint listed
    first would save the statistics from before it.

    Both backends work: on JAX, `fit` has synced its state back into the
    model's variables before each of these hooks, and `evaluate` reads them
    after `on_test_begin`. Under a `tf.distribute` strategy the hooks run in
    cross-replica context, where `recompute_statistics` runs each batch
    whole on one device and writes the result to every replica's copy.
    Under `MultiWorkerMirroredStrategy` each worker recomputes from the
    `dataset` it was given: give every worker the same batches, or list
    `SyncMovingStatistics` after this callback so that the workers' results
    are averaged (the average over all workers' batches).

    Args:
        dataset: The batches to estimate the statistics from: an iterable
            of `x` or of tuples `(x, y, ...)` whose first element is the
            model input, typically training data without augmentation
            (a `tf.data.Dataset` works). It is iterated afresh at each
            recomputation, so a one-shot iterator or generator would give
            later recomputations only what it has left.
        num_batches: How many batches of `dataset` each recomputation uses
            (a few hundred images per layer are usually enough; Detectron2
            uses 200 batches).
        every_n_epochs: Also recompute after every N-th epoch, before its
            validation; None (the default) only at the end of training.
        verbose: 1 prints one line per recomputation (through Keras's
            `print_msg`, so it respects
            `keras.config.disable_interactive_logging()`), 0 prints nothing.

    Raises:
        ValueError: for a `num_batches` or `every_n_epochs` that is not a
            positive integer (None allowed for `every_n_epochs`).

    Example:

    ```python
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(10_000).batch(64)
    precise = tf.data.Dataset.from_tensor_slices(x).shuffle(10_000).batch(64)
    model.fit(
        train,
        epochs=20,
        validation_data=(x_val, y_val),
        callbacks=[
            keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True),
            kerasbn.callbacks.PreciseBN(precise, num_batches=50, every_n_epochs=5),
            keras.callbacks.ModelCheckpoint("model.keras"),
        ],
    )
    ```
    """

    def __init__(
        self,
        dataset: Iterable,
        num_batches: int,
        every_n_epochs: Optional[int] = None,
        verbose: int = 1,
    ):
        super().__init__()
        self.dataset = dataset
        self.num_batches = validate_positive_int("num_batches", num_batches)
        self.every_n_epochs = validate_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        self.verbose = verbose
        self._in_fit = False
        self._epoch = None
        self._due = False  # this epoch is one of the every_n_epochs, not yet recomputed
        self._fingerprint = None  # of the trainable weights at the last recomputation

    def recompute(self, when: str) -> int:
        """Recomputes the statistics now and prints the progress line; returns the batches used."""
        start = time.perf_counter()
        used = recompute_statistics(self.model, self.dataset, self.num_batches)
        elapsed = time.perf_counter() - start
        self._fingerprint = self._weights_fingerprint()
        if self.verbose:
            count = sum(layer.trainable for layer in batch_norm_layers(self.model))
            layers = "layer" if count == 1 else "layers"
            batches = "batch" if used == 1 else "batches"
            message = (
                f"PreciseBN ({when}): recomputed statistics of {count} {layers} "
                f"from {used} {batches} in {elapsed:.1f} s"
            )
            # Where Keras's own callbacks print: stdout, or the log once interactive logging is off.
            if keras.config.is_interactive_logging_enabled():
                print(message, flush=True)
            else:
                logging.getLogger(__name__).info(message)
        return used

    def _weights_fingerprint(self) -> bytes:
        """A digest of the trainable weights' values: equal digests, the same weights."""
        digest = hashlib.blake2b(digest_size=16)
        for variable in self.model.trainable_weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
        return digest.digest()

    def on_train_begin(self, logs=None):
        self._in_fit = True
        self._due = False
        self._fingerprint = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._due = self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def on_test_begin(self, logs=None):
        if self._in_fit and self._due:
            self._due = False
            self.recompute(f"epoch {self._epoch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        if self._due:
            self._due = False
            self.recompute(f"epoch {epoch + 1}")

    def on_train_end(self, logs=None):
        self._in_fit = False
        self._due = False
        if self._fingerprint != self._weights_fingerprint():
            self.recompute("end of training")

"""Keras callbacks for `fit`: the moving-statistics handover under `tf.distribute`."""

from __future__ import annotations

from typing import Optional

import keras

from kerasbn.distributed import DEFAULT_TIMEOUT_SECONDS, sync_moving_statistics


class SyncMovingStatistics(keras.callbacks.Callback):
    """Hands training over to inference: every replica's moving statistics set to their mean.

    Under a `tf.distribute` strategy each replica updates its own copy of a
    `kerasbn.BatchNorm`'s moving statistics while training (no cross-replica
    call in the step). This callback calls `kerasbn.sync_moving_statistics`
    on the model at every epoch end (before checkpoints, when it comes first
    in the callback list), when evaluation or prediction begins and when
    training ends, so every replica normalizes with the same statistics and
    every save holds their mean. One batched all-reduce for the whole model
    each time; without a multi-replica strategy it does nothing.

    Under `MultiWorkerMirroredStrategy` every worker runs `fit` and so every
    worker makes the call, as a collective needs.

    Args:
        timeout_seconds: Passed to `sync_moving_statistics`.

    Example:

    ```python
    with strategy.scope():
        model = build_model()  # holding kerasbn.BatchNorm layers
    model.fit(dataset, epochs=3, callbacks=[kerasbn.callbacks.SyncMovingStatistics(), checkpoint])
    ```
    """

    def __init__(self, timeout_seconds: Optional[float] = DEFAULT_TIMEOUT_SECONDS):
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

"""A distributed training loop with checkpoints, resume and progress bars.

One loop for every strategy: each step runs under `strategy.run`, the
optimizer sums the replicas' gradients, and the loss is averaged over the
global batch. This also covers MultiWorkerMirroredStrategy, where Keras
3.15's `model.fit` crashes on every worker (keras-team/keras#20585, #20329).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

import kerasbn
from training import artifacts


@dataclass
class EpochResult:
    epoch: int
    loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    examples_per_sec: float
    seconds: float

    def as_row(self) -> Dict:
        return dict(self.__dict__)


@dataclass
class Loop:
    """Trains `model` on `strategy`; artifacts (checkpoints, history) in `run_dir`.

    Args:
        model, optimizer: Built inside `strategy.scope()`.
        strategy: The tf.distribute strategy.
        run_dir: The run folder; a checkpoint there is resumed.
        global_batch_size: Examples per step over all replicas.
        chief: Whether this process writes artifacts (False on non-chief workers).
        verbose: Show a progress bar per epoch.
    """

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    strategy: tf.distribute.Strategy
    run_dir: str
    global_batch_size: int
    chief: bool = True
    verbose: bool = True
    worker_index: int = 0
    history: List[Dict] = field(default_factory=list)

    def __post_init__(self):
        with self.strategy.scope():
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, epoch=self.epoch)
        self.checkpoint_dir = os.path.join(self.run_dir, "checkpoints")
        # Under MultiWorkerMirroredStrategy every worker takes part in saving;
        # only the chief's copy is kept, the others write to a scratch folder.
        directory = self.checkpoint_dir if self.chief else os.path.join(self.checkpoint_dir, f".worker-{self.worker_index}")
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=2)
        self._train_step = tf.function(self._distributed_step(training=True))
        self._eval_step = tf.function(self._distributed_step(training=False))

    # ------------------------------------------------------------- steps

    def _replica_step(self, training: bool) -> Callable:
        def step(images, labels):
            with tf.GradientTape() as tape:
                logits = self.model(images, training=training)
                per_example = self.loss_fn(labels, logits)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            if training:
                variables = self.model.trainable_variables
                gradients = tape.gradient(loss, variables)
                self.optimizer.apply_gradients(zip(gradients, variables))
            correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels), tf.float32)
            count = tf.cast(tf.shape(labels)[0], tf.float32)
            return tf.reduce_sum(per_example), tf.reduce_sum(correct), count

        return step

    def _distributed_step(self, training: bool) -> Callable:
        replica_step = self._replica_step(training)

        def run(batch):
            images, labels = batch
            sums = self.strategy.run(replica_step, args=(images, labels))
            return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None) for s in sums]

        return run

    def train_on_batch(self, batch) -> np.ndarray:
        """One optimizer step on a (distributed) batch; returns [loss sum, correct, count]."""
        return np.array([float(v) for v in self._train_step(batch)])

    # --------------------------------------------------------- checkpoints

    def restore(self) -> int:
        """Restores the latest checkpoint of the run, if any; returns the epoch to start from."""
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if latest is None:
            return 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        start = int(self.epoch.numpy())
        history = artifacts.read_json(os.path.join(self.run_dir, "history.json"), default=[])
        self.history = [row for row in history if row["epoch"] <= start]
        return start

    def _save(self, epoch: int) -> None:
        self.epoch.assign(epoch)
        self.manager.save(checkpoint_number=epoch)
        if not self.chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)

    # --------------------------------------------------------------- epochs

    def evaluate(self, dataset) -> Dict[str, float]:
        """Loss and accuracy of the model (inference mode) on a distributed dataset."""
        totals = np.zeros(3)
        for batch in dataset:
            totals += [float(v) for v in self._eval_step(batch)]
        loss_sum, correct, count = totals
        return {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)}

    def fit(
        self,
        make_train_dataset: Callable[[int], tf.data.Dataset],
        test_dataset,
        epochs: int,
        steps_per_epoch: int,
        on_epoch_end: Optional[Callable[[List[Dict]], None]] = None,
    ) -> List[Dict]:
        """Trains from the last checkpoint to `epochs`.

        Args:
            make_train_dataset: epoch -> distributed dataset of that epoch
                (seeded per epoch, so a resumed run sees the same batches).
            test_dataset: Distributed test dataset.
            epochs: Total epochs of the run.
            steps_per_epoch: For the progress bar.
            on_epoch_end: Called with the history after each epoch (chief only).
        """
        start = self.restore()
        if start and self.verbose:
            print(f"Resuming from the checkpoint of epoch {start} in {self.checkpoint_dir}")
        for epoch in range(start + 1, epochs + 1):
            if self.verbose:
                print(f"Epoch {epoch}/{epochs}")
            bar = keras.utils.Progbar(steps_per_epoch, verbose=1 if self.verbose else 0, stateful_metrics=["loss", "acc"])
            totals = np.zeros(3)
            began = time.perf_counter()
            for step, batch in enumerate(make_train_dataset(epoch), start=1):
                totals += self.train_on_batch(batch)
                bar.update(step, [("loss", totals[0] / totals[2]), ("acc", totals[1] / totals[2])])
            seconds = time.perf_counter() - began
            # The handover: every replica's moving statistics set to their mean
            # before evaluation and the checkpoint (one all-reduce, every worker).
            kerasbn.sync_moving_statistics(self.model)
            test = self.evaluate(test_dataset)
            result = EpochResult(
                epoch=epoch,
                loss=totals[0] / totals[2],
                train_acc=totals[1] / totals[2],
                test_loss=test["loss"],
                test_acc=test["acc"],
                examples_per_sec=totals[2] / seconds,
                seconds=seconds,
            )
            self.history.append(result.as_row())
            if self.verbose:
                print(
                    f"  loss {result.loss:.3f}, train acc {result.train_acc:.3f}, test acc {result.test_acc:.3f}, "
                    f"{result.examples_per_sec:.0f} examples/sec"
                )
            if self.chief:
                artifacts.write_json(os.path.join(self.run_dir, "history.json"), self.history)
            self._save(epoch)
            if self.chief and on_epoch_end is not None:
                on_epoch_end(self.history)
        return self.history

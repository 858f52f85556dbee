"""Part 3's worker: LeNet-BN training throughput, run in its own process; and the worker pattern.

Two replicas on a CPU-only machine need two logical CPU devices, and those
can only be configured before TensorFlow initialises its runtime; so a suite
starts its worker in a fresh interpreter (`run_worker`), and the worker calls
`configure_devices` first (the `models` suite's worker does too). The
`training` suite starts this module:

    python -m bench.training_worker --replicas 2 --norms kerasbn keras none \
        --steps 30 --repeats 5 --json-out /tmp/training.json

It builds `training.models.build_lenet(norm=...)` for every norm inside the
strategy for that many replicas, fits them on synthetic Fashion-MNIST-sized
batches (random 28x28x1 images, random labels: the speed does not depend on
the values), one epoch of `--steps` steps per call, interleaved across the
norms, and writes measurement records as JSON. The time is the epoch's, from
a callback, so fit's per-call set-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

# Names the norms of the records; the value is build_lenet's keyword arguments.
NORMS: Dict[str, dict] = {
    "kerasbn": {"norm": "kerasbn"},
    "keras": {"norm": "keras"},
    "none": {"norm": "none"},
    "kerasbn_sync": {"norm": "kerasbn", "sync_bn": True},
}
IMAGE_SHAPE = (28, 28, 1)
EPOCH_EXAMPLES = 60000  # Fashion-MNIST's training set
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_worker(module: str, arguments, timeout_s: float) -> list:
    """Runs `python -m <module> <arguments> --json-out FILE` in a fresh interpreter; returns its records.

    A fresh process, because logical CPU devices (two replicas on a CPU) can
    only be configured before TensorFlow initialises its runtime.
    """
    return run_workers(module, [arguments], timeout_s)[0]


def run_workers(module: str, argument_lists, timeout_s: float) -> List[list]:
    """Like `run_worker`, one process per argument list, all at once (a cluster); returns each one's records.

    Every process still running when one fails or the time is up is killed.
    """
    with tempfile.TemporaryDirectory() as folder:
        outs = [os.path.join(folder, f"records{index}.json") for index in range(len(argument_lists))]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        processes = []
        try:
            for arguments, out in zip(argument_lists, outs):
                command = [sys.executable, "-m", module, *map(str, arguments), "--json-out", out]
                processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL))
            deadline = time.monotonic() + timeout_s
            for process in processes:
                process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                if process.returncode != 0:
                    raise RuntimeError(
                        f"worker {process.args[2:-2]} exited with {process.returncode} (its stderr is above)"
                    )
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        records = []
        for out in outs:
            with open(out, encoding="utf-8") as f:
                records.append(json.load(f)["records"])
        return records


def configure_devices(replicas: int):
    """Makes `replicas` devices available and returns a function giving the strategy.

    `training.distribute` (the project's one strategy factory) splits the CPU
    into logical devices, and `get_strategy("auto")` mirrors over them (or
    over the GPUs), or uses one device for one replica. Must run before
    TensorFlow initialises its runtime.
    """
    import tensorflow as tf

    from training.distribute import configure_cpu_replicas, get_strategy

    if not tf.config.list_physical_devices("GPU"):
        configure_cpu_replicas(replicas)
    return lambda: get_strategy("auto")


def synthetic_dataset(batch_size: int, image_shape=IMAGE_SHAPE, batches: int = 8):
    """Random images and labels of 10 classes, batched and repeated forever (speed does not depend on values)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batches * batch_size, *image_shape), dtype=np.float32)
    labels = rng.integers(0, 10, size=batches * batch_size).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True).cache().repeat()


def _epoch_timer():
    """A Keras callback whose `seconds` is the wall time of the last epoch (fit's set-up excluded).

    Built on demand: keras is imported only after the devices are configured.
    """
    import keras

    class EpochTimer(keras.callbacks.Callback):
        seconds = float("nan")

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self._start

    return EpochTimer()


def measure(replicas: int, strategy, norms: List[str], steps: int, repeats: int, batch_size: int) -> List[dict]:
    """Times an epoch of `steps` steps in `fit` for each norm, interleaved; returns the records."""
    import keras

    from bench.suites import skipped, timed_records
    from bench.timing import Candidate, describe_error, time_interleaved
    from training.models import build_lenet

    label = dict(shape=(batch_size, *IMAGE_SHAPE), layout="NHWC", mode="fit", jit=False, replicas=replicas)
    if strategy.num_replicas_in_sync != replicas:
        reason = f"asked for {replicas} replicas, the strategy has {strategy.num_replicas_in_sync}"
        return [skipped("training", norm, reason=reason, **label) for norm in norms]
    dataset = synthetic_dataset(batch_size)
    records = []
    candidates = []
    for norm in norms:
        try:
            with strategy.scope():
                model = build_lenet(**NORMS[norm])
                model.compile(
                    optimizer=keras.optimizers.SGD(learning_rate=0.01),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=False,
                )
        except Exception as error:  # noqa: BLE001 - recorded as a result
            records.append(skipped("training", norm, reason=describe_error(error), **label))
            continue
        timer = _epoch_timer()

        def fit(model=model, timer=timer):
            model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
            return timer.seconds

        candidates.append(Candidate(norm, fit, self_timed=True))

    timings = time_interleaved(candidates, repeats=repeats, min_repetition_s=0.0)
    devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    records += timed_records("training", timings, lambda norm: dict(
        **label, steps=steps, strategy=type(strategy).__name__, devices=devices, build_lenet_kwargs=NORMS[norm]
    ))  # fmt: skip
    for record in records:
        if record["record"] == "measurement":
            step_s = record["median_s"] / steps
            record.update(examples_per_s=batch_size / step_s, seconds_per_step=step_s,
                          epoch_s_estimate=step_s * math.ceil(EPOCH_EXAMPLES / batch_size))  # fmt: skip
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--norms", nargs="+", choices=list(NORMS), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    strategy = configure_devices(args.replicas)()
    # kerasbn_sync only means something with several replicas.
    norms = [n for n in args.norms if args.replicas > 1 or n != "kerasbn_sync"]
    records = measure(args.replicas, strategy, norms, args.steps, args.repeats, args.batch_size)
    with open(args.json_out, "w", encoding="utf-8") as out:
        json.dump({"records": records}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trains a small kerasbn model under `keras.distribution.DataParallel` on JAX, for tests/test_jax_multiprocess.py.

One process of a 2-process run on 127.0.0.1 (gloo CPU collectives, one CPU
device each), or the single-process reference on 2 host devices fed the same
global batches. Writes the moving statistics (and, on the chief alone, a
`.keras` save) and prints one JSON line:

    KERAS_BACKEND=jax PYTHONPATH=. python tests/_jax_multiprocess_worker.py \
        --process-id 0 --processes 2 --port 12345 --out /tmp/p0
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. \
        python tests/_jax_multiprocess_worker.py --processes 1 --out /tmp/ref
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import jax

GLOBAL_BATCH = 8
STEPS = 6
SHAPE = (6, 6, 3)


def global_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(STEPS * GLOBAL_BATCH,) + SHAPE).astype("float32")
    # Each half of every global batch gets its own offset, so per-device and global statistics differ.
    x += np.tile(np.repeat([0.0, 2.0], GLOBAL_BATCH // 2), STEPS)[:, None, None, None].astype("float32")
    y = rng.normal(size=(STEPS * GLOBAL_BATCH, 1)).astype("float32")
    return x, y


def build_model(keras, kerasbn):
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = kerasbn.BatchNorm(momentum=0.5, name="bn1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.ReLU()(x))
    x = kerasbn.BatchNorm(momentum=0.5, synchronized=True, name="bn2")(x)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(4)  # the same weights on every process, whatever Keras's seeding does
    model.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32") if w.ndim > 1 else w for w in model.get_weights()])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )
    import keras
    import kerasbn

    keras.utils.set_random_seed(1)  # Keras checks that every process initialises the same weights
    keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
    model = build_model(keras, kerasbn)
    x, y = global_data()
    # Each process feeds its own slice of every global batch (DataParallel joins them, process by process).
    share = GLOBAL_BATCH // args.processes
    rows = np.concatenate(
        [np.arange(step * GLOBAL_BATCH + args.process_id * share, step * GLOBAL_BATCH + (args.process_id + 1) * share)
         for step in range(STEPS)]
    )
    model.fit(x[rows], y[rows], batch_size=share, epochs=1, shuffle=False, verbose=0)
    os.makedirs(args.out, exist_ok=True)
    statistics = {
        f"{layer.name}.{name}": np.asarray(getattr(layer, name))
        for layer in model.layers
        if isinstance(layer, kerasbn.BatchNorm)
        for name in ("moving_mean", "moving_variance")
    }
    np.savez(os.path.join(args.out, "statistics.npz"), **statistics)
    saved = None
    if args.process_id == 0:  # the chief saves alone
        start = time.monotonic()
        # Outside the distribution: Keras's saving makes a throwaway optimizer, whose variable under a
        # multi-process distribution is a collective (jax's cross-process equality check) and would
        # wait for the other process. kerasbn's own reads are no collectives (replicated variables).
        distribution = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            model.save(os.path.join(args.out, "model.keras"))
        finally:
            keras.distribution.set_distribution(distribution)
        saved = time.monotonic() - start
    print(json.dumps({"process": args.process_id, "devices": jax.device_count(), "save_seconds": saved}), flush=True)


if __name__ == "__main__":
    main()

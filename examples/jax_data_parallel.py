"""kerasbn.BatchNorm on the JAX backend under keras.distribution.DataParallel.

Each batch is sharded across the devices. With `synchronized=False` each
device normalizes its own slice with its own statistics, with no collective
per layer: on one device that is ghost batch norm with `virtual_batch_size`
= the slice (the moving averages take the mean of the slices' statistics).
With `synchronized=True` the statistics are the global batch's, as one
device fed the whole batch computes them. The script checks both against
the same model fitted on one device. On a CPU, XLA is asked for two host
devices:

    python examples/jax_data_parallel.py --steps 50
    python examples/jax_data_parallel.py --tiny
"""

import os

# Before JAX is imported: the backend, and two CPU devices to shard over.
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import keras  # noqa: E402
import kerasbn  # noqa: E402


BATCH = 32


def fit(x, y, steps, **batch_norm):
    keras.utils.set_random_seed(0)
    bn = kerasbn.BatchNorm(momentum=0.9, **batch_norm)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), bn, keras.layers.ReLU(), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return keras.ops.convert_to_numpy(bn.moving_mean), keras.ops.convert_to_numpy(bn.moving_variance)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps")
    parser.add_argument("--tiny", action="store_true", help="three steps, for a smoke test")
    args = parser.parse_args()
    steps = 3 if args.tiny else args.steps

    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, scale=3.0, size=(BATCH * steps, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")

    devices = jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    local = fit(x, y, steps)
    synchronized = fit(x, y, steps, synchronized=True)
    keras.distribution.set_distribution(None)
    # One device: ghost batches of one device's slice, and the whole batch.
    references = (fit(x, y, steps, virtual_batch_size=BATCH // len(devices)), fit(x, y, steps))

    np.set_printoptions(precision=4, suppress=True)
    print(f"DataParallel over {len(devices)} devices ({devices[0].platform}), {steps} steps")
    print(f"moving_mean, each device's statistics:  {local[0]}")
    print(f"moving_mean, the global batch's:         {synchronized[0]}")
    differences = [
        max(np.max(np.abs(a - b)) for a, b in zip(ours, reference))
        for ours, reference in zip((local, synchronized), references)
    ]
    print(f"each device's statistics against one device with virtual_batch_size={BATCH // len(devices)}: "
          f"max |difference| of the moving statistics {differences[0]:.2e} < 1e-5")
    print(f"the global batch's against one device: max |difference| of the moving statistics {differences[1]:.2e} < 1e-5")
    if len(devices) < 2 or not max(differences) < 1e-5:
        raise SystemExit("expected two devices, and the single-device moving statistics within 1e-5")

if __name__ == "__main__":
    main()

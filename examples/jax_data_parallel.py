"""kerasbn.BatchNorm on the JAX backend under keras.distribution.DataParallel.

Each batch is sharded across the devices; JAX compiles one program for the
global batch, so the batch statistics (and the moving statistics) are those
of the whole global batch. The script checks that against the same model
fitted on one device. On a CPU, XLA is asked for two host devices:

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


def fit(x, y, steps):
    keras.utils.set_random_seed(0)
    bn = kerasbn.BatchNorm(momentum=0.9)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), bn, keras.layers.ReLU(), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, batch_size=32, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return keras.ops.convert_to_numpy(bn.moving_mean), keras.ops.convert_to_numpy(bn.moving_variance)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps")
    parser.add_argument("--tiny", action="store_true", help="three steps, for a smoke test")
    args = parser.parse_args()
    steps = 3 if args.tiny else args.steps

    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, scale=3.0, size=(32 * steps, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")

    devices = jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    mean, variance = fit(x, y, steps)
    keras.distribution.set_distribution(None)
    single_mean, single_variance = fit(x, y, steps)

    np.set_printoptions(precision=4, suppress=True)
    print(f"DataParallel over {len(devices)} devices ({devices[0].platform}), {steps} steps")
    print(f"moving_mean     {mean}")
    print(f"moving_variance {variance}")
    difference = max(np.max(np.abs(mean - single_mean)), np.max(np.abs(variance - single_variance)))
    print(f"against one device: max |difference| of the moving statistics {difference:.2e} < 1e-5")
    if len(devices) < 2 or not difference < 1e-5:
        raise SystemExit("expected two devices and the single-device moving statistics")


if __name__ == "__main__":
    main()

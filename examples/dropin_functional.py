"""kerasbn.BatchNorm as a drop-in for keras.layers.BatchNormalization in a Functional model.

Fits a small convolutional classifier on random data, saves it as .keras,
loads it back and checks that the reloaded model predicts the same:

    python examples/dropin_functional.py            # TensorFlow backend
    KERAS_BACKEND=jax python examples/dropin_functional.py --tiny
"""

import argparse
import os
import tempfile

import numpy as np

import keras
import kerasbn


def build_model(num_classes=10):
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = kerasbn.BatchNorm()(x)  # was: keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, use_bias=False)(x)
    x = kerasbn.BatchNorm()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="dropin")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps")
    parser.add_argument("--tiny", action="store_true", help="two steps, for a smoke test")
    args = parser.parse_args()
    steps = 2 if args.tiny else args.steps

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * steps, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=len(x))

    model = build_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=1, verbose=0 if args.tiny else "auto")

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "dropin.keras")
        model.save(path)
        # kerasbn.BatchNorm is registered as "kerasbn>BatchNorm": importing kerasbn is all load_model needs.
        reloaded = keras.saving.load_model(path)

    probe = x[:16]
    before = keras.ops.convert_to_numpy(model(probe, training=False))
    difference = np.max(np.abs(before - keras.ops.convert_to_numpy(reloaded(probe, training=False))))
    print(f"{keras.backend.backend()}: saved and reloaded {os.path.basename(path)}")
    print(f"max |difference| between the predictions: {difference:.2e} < 1e-5")
    if not difference < 1e-5:
        raise SystemExit("the reloaded model predicts differently")


if __name__ == "__main__":
    main()

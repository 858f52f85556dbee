"""From a stock Keras application to a folded, exported inference model.

MobileNetV2 (random weights, small inputs) is converted to kerasbn.BatchNorm
with kerasbn.convert, trained briefly, given population statistics with
kerasbn.recompute_statistics, and folded with kerasbn.fold (each batch norm
merged into the convolution before it). The folded model is saved as .keras
and, on TensorFlow, exported as a SavedModel; every copy's outputs are
compared with the trained model's:

    python examples/convert_fold_export.py --steps 20
    python examples/convert_fold_export.py --tiny
"""

import argparse
import os
import tempfile

import numpy as np

import keras
import kerasbn


def predict(model, x):
    # A direct inference call: predict() would trace a function for every model here.
    return keras.ops.convert_to_numpy(model(x, training=False))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--tiny", action="store_true", help="two steps, for a smoke test")
    args = parser.parse_args()
    steps = 2 if args.tiny else args.steps

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=(16 * steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=len(x))

    stock = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    model = kerasbn.convert(stock)  # a copy: every BatchNormalization is now a kerasbn.BatchNorm
    converted = sum(isinstance(layer, kerasbn.BatchNorm) for layer in model.layers)
    probe = x[:8]
    same = np.max(np.abs(predict(stock, probe) - predict(model, probe)))
    print(f"converted {converted} batch norms; max |difference| from the stock model: {same:.2e}")

    # Tracing (let alone XLA-compiling) this training step takes longer than
    # a few steps; a smoke test's two steps run eagerly.
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=False, run_eagerly=args.tiny)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    kerasbn.recompute_statistics(model, [x[i : i + 16] for i in range(0, len(x), 16)])

    folded = kerasbn.fold(model)
    report = str(folded.fold_report).splitlines()
    print("\n".join(report[:4] + (["  ..."] if len(report) > 4 else [])))
    expected = predict(model, probe)
    outputs = {"folded": predict(folded, probe)}
    with tempfile.TemporaryDirectory() as folder:
        folded.save(os.path.join(folder, "folded.keras"))
        outputs["folded .keras"] = predict(keras.saving.load_model(os.path.join(folder, "folded.keras")), probe)
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            folded.export(os.path.join(folder, "saved_model"), verbose=False)
            exported = tf.saved_model.load(os.path.join(folder, "saved_model"))
            outputs["SavedModel"] = exported.serve(tf.constant(probe)).numpy()

    worst = 0.0
    for name, output in outputs.items():
        difference = float(np.max(np.abs(output - expected)))
        worst = max(worst, difference)
        print(f"{name:>14}: max |difference| from the trained model {difference:.2e}")
    print(f"max |difference| {worst:.2e} < 1e-4")
    if not worst < 1e-4:
        raise SystemExit("a folded copy predicts differently")


if __name__ == "__main__":
    main()

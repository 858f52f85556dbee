"""Which Keras backend runs, and a clear error where a feature needs TensorFlow.

kerasbn's math is `keras.ops` and runs on every backend; the fused kernel,
`tf.distribute` all-reduces and the `tf.function` inference path are
TensorFlow's. Nothing here imports TensorFlow unless Keras already runs on it,
so `import kerasbn` on the JAX backend never loads TensorFlow.
"""

from __future__ import annotations

import keras


def is_tensorflow() -> bool:
    """Whether Keras runs on the TensorFlow backend."""
    return keras.backend.backend() == "tensorflow"


def require_tensorflow(feature: str, received: str = "", error: type = ValueError) -> None:
    """Raises `error` naming `feature` and the backend, unless Keras runs on TensorFlow.

    Args:
        feature: What needs TensorFlow, e.g. "`fused=True`".
        received: The argument as the user gave it (e.g. "fused=True"), put
            before the backend in the message.
        error: The exception class to raise.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    given = f"{received} with " if received else ""
    raise error(
        f"{feature} needs the TensorFlow backend (`pip install 'kerasbn[tensorflow]'`, "
        f"KERAS_BACKEND=tensorflow). Received: {given}backend {backend!r}"
    )


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU (call only on the TensorFlow backend)."""
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))

"""Which Keras backend runs, TensorFlow on first use, and where an op runs.

kerasbn's math is `keras.ops` and runs on every backend; the fused kernel,
`tf.distribute` all-reduces and the `tf.function` inference path are
TensorFlow's. TensorFlow is imported only through `tensorflow()`, called only
on the TensorFlow backend, so `import kerasbn` on JAX never loads it.
"""

from __future__ import annotations

import functools
import os

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


def tensorflow():
    """The `tensorflow` module, imported on first use (call only on the TensorFlow backend)."""
    import tensorflow as tf

    return tf


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU (call only on the TensorFlow backend)."""
    return bool(tensorflow().config.list_logical_devices("GPU"))


def device_type(inputs=None) -> str:
    """The type of the device ("CPU", "GPU", "TPU", ...) an op on `inputs` created here runs on.

    What TensorFlow says before running the op, in this order: the device
    scope around the call (a `tf.device` block, the replica device of a
    `tf.distribute` strategy; eagerly, the device TensorFlow places a new op
    on), else the device `inputs` were placed on (`inputs.device`), else a GPU
    wherever TensorFlow sees one, as its placer prefers one. Call only on the
    TensorFlow backend.
    """
    tf = tensorflow()
    # A constant made here carries the device scope in a graph ("" without
    # one) and, eagerly, the device TensorFlow actually placed it on.
    names = (tf.constant(0.0).device, getattr(inputs, "device", None) or "")
    for name in names:
        kind = tf.DeviceSpec.from_string(name).device_type if name else None
        if kind:
            return kind.upper()
    return "GPU" if has_gpu() else "CPU"


@functools.lru_cache(maxsize=None)
def onednn_enabled() -> bool:
    """Whether TensorFlow's CPU kernels run on oneDNN in this process (TensorFlow backend only).

    TensorFlow turns oneDNN on by default on some x86 CPUs only (those with
    AVX-512, in TensorFlow 2.21), and `TF_ENABLE_ONEDNN_OPTS` overrides the
    default; it is read once, when TensorFlow starts. The fused batch-norm
    kernel's CPU speed in NCHW depends on it (`kerasbn.plan`). Where the
    private probe is missing, the environment variable is read, and oneDNN is
    taken as on unless it says "0".
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"
    return bool(_pywrap_util_port.IsMklEnabled())

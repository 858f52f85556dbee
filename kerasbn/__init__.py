"""kerasbn: a drop-in, distribution-correct, fused batch normalization layer for Keras 3.

    import keras, kerasbn
    model = keras.Sequential([keras.layers.Conv2D(6, 5), kerasbn.BatchNorm(), ...])
"""

from kerasbn.affine import Affine
from kerasbn.transforms import FoldReport, convert, fold
from kerasbn.layer import BatchNorm
from kerasbn.ops import fold_affine, fold_into_kernel, moments, normalize
from kerasbn.statistics import recompute_statistics

__version__ = "0.1.0"


def cross_replica_moments(x, axes, mask=None, keepdims=False):
    """Global-batch moments inside a `tf.distribute` replica (TensorFlow backend).

    See `kerasbn.distributed.cross_replica_moments`.
    """
    from kerasbn.distributed import cross_replica_moments as impl

    return impl(x, axes, mask=mask, keepdims=keepdims)


__all__ = [
    "Affine",
    "BatchNorm",
    "FoldReport",
    "convert",
    "cross_replica_moments",
    "fold",
    "fold_affine",
    "fold_into_kernel",
    "moments",
    "normalize",
    "recompute_statistics",
    "__version__",
]

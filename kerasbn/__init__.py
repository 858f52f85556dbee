"""kerasbn: a drop-in, distribution-correct, fused batch normalization layer for Keras 3.

    import keras, kerasbn
    model = keras.Sequential([keras.layers.Conv2D(6, 5), kerasbn.BatchNorm(), ...])
"""

from kerasbn import experimental  # registers DecorrelatedBatchNorm, so a saved one loads after `import kerasbn`
from kerasbn.affine import Affine
from kerasbn import callbacks
from kerasbn.diagnostics import count_cross_replica_calls
from kerasbn.distributed import sync_moving_statistics
from kerasbn.replicas import cross_replica_moments
from kerasbn.transforms import FoldReport, convert, fold
from kerasbn.layer import BatchNorm
from kerasbn.ops import fold_affine, fold_into_kernel, moments, normalize
from kerasbn.statistics import recompute_statistics
from kerasbn.version import __version__


__all__ = [
    "Affine",
    "BatchNorm",
    "FoldReport",
    "callbacks",
    "convert",
    "count_cross_replica_calls",
    "cross_replica_moments",
    "fold",
    "fold_affine",
    "fold_into_kernel",
    "moments",
    "normalize",
    "recompute_statistics",
    "sync_moving_statistics",
    "__version__",
]

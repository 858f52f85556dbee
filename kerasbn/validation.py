"""Argument checks shared by kerasbn's layers, callbacks and functions.

Each returns the value normalized (a float, a list, an int) or raises a ValueError
that names the argument in backticks and ends with what it received.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def validate_axis(axis: Union[int, Sequence[int]]) -> List[int]:
    """`axis` as a non-empty list of distinct ints (an int becomes a list of one)."""
    values = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if not values or any(isinstance(a, bool) or not isinstance(a, int) for a in values):
        raise ValueError(f"`axis` must be an int or a non-empty list of ints. Received: axis={axis!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"`axis` must not repeat an axis. Received: axis={axis!r}")
    return values


def validate_epsilon(epsilon) -> float:
    """`epsilon` as a positive float."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    return float(epsilon)


def validate_momentum(name: str, value) -> float:
    """A momentum (the weight of the old value) in [0, 1), as a float; `name` is the argument's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={value!r}")
    return float(value)


def validate_positive_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    """A positive integer argument as a Python int (None passes where `allow_none`); `name` is the argument's.

    One rule for every count kerasbn takes: Python and NumPy integers; not
    bools (True batches is a bug, not a count), not floats (2.0 included,
    as `range` rejects it), not strings.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")
    return int(value)


def validate_renorm_clipping(clipping: Optional[dict]) -> Optional[dict]:
    """`renorm_clipping` as a dict with keys among "rmax", "rmin", "dmax", or None."""
    if clipping is None:
        return None
    if not isinstance(clipping, dict):
        raise ValueError(
            f"`renorm_clipping` must be a dict with keys among {list(RENORM_CLIPPING_KEYS)}. "
            f"Received: renorm_clipping={clipping!r}"
        )
    # The messages begin as keras.layers.BatchNormalization's do (code that
    # matches them keeps working) and end with the values received.
    unknown = sorted(set(clipping) - set(RENORM_CLIPPING_KEYS))
    if unknown:
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {clipping}. "
            f"Supported values: {list(RENORM_CLIPPING_KEYS)}. Unknown keys: {unknown}"
        )
    rmax, rmin, dmax = (clipping.get(k) for k in RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
        )
    return dict(clipping)

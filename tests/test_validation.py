"""The one positive-integer rule (`kerasbn.validation.validate_positive_int`) at every argument that uses it.

Python and NumPy integers pass (as Python ints); bools, floats (2.0 included),
strings and numbers below 1 raise a ValueError naming the argument and the
value. `PreciseBN`'s arguments are tested in tests/test_callbacks.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import keras

import kerasbn
from kerasbn.validation import validate_positive_int

BAD = [0, -2, 2.5, 2.0, np.float64(3.0), True, np.bool_(True), "4", np.int64(0), np.array([2])]


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(2), np.uint8(5)])
def test_accepts_python_and_numpy_integers(value):
    result = validate_positive_int("count", value)
    assert result == int(value) and type(result) is int


@pytest.mark.parametrize("value", BAD + [None])
def test_rejects_everything_else(value):
    message = f"`count` must be a positive integer. Received: count={value!r}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        validate_positive_int("count", value)


def test_none_where_allowed():
    assert validate_positive_int("count", None, allow_none=True) is None
    with pytest.raises(ValueError, match=re.escape("`count` must be a positive integer or None. Received: count=0") + "$"):
        validate_positive_int("count", 0, allow_none=True)


@pytest.mark.parametrize("value", BAD)
def test_virtual_batch_size(value):
    message = f"`virtual_batch_size` must be a positive integer or None. Received: virtual_batch_size={value!r}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        kerasbn.BatchNorm(virtual_batch_size=value)


def test_virtual_batch_size_numpy_integer_is_a_python_int():
    layer = kerasbn.BatchNorm(virtual_batch_size=np.int64(4))
    assert layer.virtual_batch_size == 4 and type(layer.virtual_batch_size) is int
    assert type(layer.get_config()["virtual_batch_size"]) is int
    assert kerasbn.BatchNorm(virtual_batch_size=None).virtual_batch_size is None


def _model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, kerasbn.BatchNorm()(inputs))


@pytest.mark.parametrize("value", BAD)
def test_recompute_statistics_num_batches(value):
    message = f"`num_batches` must be a positive integer or None. Received: num_batches={value!r}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        kerasbn.recompute_statistics(_model(), [np.ones((4, 3), "float32")], num_batches=value)


def test_recompute_statistics_numpy_num_batches():
    batches = [np.full((2, 3), float(i), "float32") for i in range(4)]
    model = _model()
    assert kerasbn.recompute_statistics(model, batches, num_batches=np.int64(2)) == 2
    # Batches 0 and 1: means 0 and 1, averaged.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.layers[-1].moving_mean), [0.5] * 3)

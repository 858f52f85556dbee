"""Property-based tests: kerasbn's numbers against float64, no worse than the stock layer's.

Hypothesis draws configurations: ranks 2-5, one feature axis or two, the
float32 and mixed float16/bfloat16 policies, center and scale on or off,
masks, ghost batches (`virtual_batch_size`), renorm, and inputs whose mean
is up to 1e5 times their spread (sums of such values lose the spread's
digits). For each, one training-mode call of `kerasbn.BatchNorm` (whichever
path the plan takes) gives the outputs, the gradient with respect to the
inputs and the moving statistics (momentum 0: the batch statistics). Each is
compared with a float64 NumPy closed form of the same inputs (rounded to
the policy's compute dtype first), and must be within tolerance of it or
within 2x of the error of `keras.layers.BatchNormalization` computing the
same thing in the same policy on the same backend.

The stock layer has no ghost batches and one feature axis only: it runs on
each ghost batch in turn, and on several feature axes merged into one
(transposed to the end and reshaped), which computes the same statistics.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Tuple

import numpy as np
import pytest
from conftest import BACKEND

import keras

import kerasbn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(BACKEND not in ("tensorflow", "jax"), reason="gradients taken on TF and JAX only")

EPSILON = 1e-3
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Within this relative error of float64 a result passes outright; above it,
# it must be within 2x of the stock layer's own error. A few hundred units
# of the compute dtype's rounding (float16: 2**-11, bfloat16: 2**-8).
TOLERANCE = {"float32": 3e-5, "float16": 2e-2, "bfloat16": 1e-1}
STOCK_FACTOR = 2.0
# Offsets up to 1e5 times the spread in float32; up to 1e2 in 16-bit policies, whose
# inputs beyond keep less than 4 bits of their spread (float16 rounds 2048 to a
# multiple of 2), and which TensorFlow's fused kernel takes as they are.
MAX_RATIO_EXPONENT = {"float32": 5, "16-bit": 2}
# Derandomized (the same cases on every run), sized to run in under a minute per backend
# (JAX dispatches each op of a fresh shape slowly: about 5 s a case, TensorFlow 0.1 s).
MAX_EXAMPLES = {"tensorflow": 200, "jax": 8}.get(BACKEND, 8)


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Tuple[int, ...]
    axis: Tuple[int, ...]  # feature axes, non-negative, sorted
    policy: str
    center: bool
    scale: bool
    masked: bool
    virtual_batch_size: Optional[int]
    renorm: bool
    ratio: float  # |mean| / spread of the inputs
    spread: float
    seed: int


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    batch = draw(st.integers(2, 10))
    shape = (batch,) + tuple(draw(st.lists(st.integers(1, 6), min_size=rank - 1, max_size=rank - 1)))
    axes = draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=min(2, rank - 1), unique=True))
    divisors = [d for d in range(1, batch) if batch % d == 0 and d * np.prod(shape[1:]) / np.prod([shape[a] for a in axes]) >= 2]
    virtual = draw(st.one_of(st.none(), st.sampled_from(divisors))) if divisors else None
    policy = draw(st.sampled_from(POLICIES))
    largest = MAX_RATIO_EXPONENT["float32" if policy == "float32" else "16-bit"]
    ratio = draw(st.one_of(st.just(0.0), st.floats(0, largest).map(lambda e: 10.0**e)))
    return Case(
        shape=shape,
        axis=tuple(sorted(axes)),
        policy=policy,
        center=draw(st.booleans()),
        scale=draw(st.booleans()),
        # Keras masks share the last axis: masks go with one feature axis.
        masked=len(axes) == 1 and draw(st.booleans()),
        virtual_batch_size=virtual,
        renorm=draw(st.booleans()),
        ratio=ratio,
        spread=draw(st.floats(-2, 2).map(lambda e: 10.0**e)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ------------------------------------------------------------- the inputs


def compute_dtype(policy: str) -> str:
    return keras.DTypePolicy(policy).compute_dtype


def make_inputs(case: Case):
    """x (rounded to the compute dtype, held as float64), mask, upstream gradient, gamma, beta."""
    rng = np.random.default_rng(case.seed)
    param_shape = tuple(case.shape[a] for a in case.axis)
    keep = [case.shape[i] if i in case.axis else 1 for i in range(len(case.shape))]
    offset = case.ratio * case.spread * rng.choice([-1.0, 1.0], size=param_shape) * rng.uniform(0.5, 1.0, param_shape)
    x = offset.reshape(keep) + case.spread * rng.normal(size=case.shape)
    dtype = compute_dtype(case.policy)
    if dtype == "float16":
        x = np.clip(x, -6e4, 6e4)
    x = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x.astype("float32"), dtype)), np.float64)
    mask = rng.uniform(size=case.shape[:-1]) < 0.75 if case.masked else None
    upstream = rng.normal(size=case.shape)
    gamma = rng.uniform(0.5, 2.0, param_shape) * rng.choice([-1.0, 1.0], size=param_shape)
    beta = rng.normal(size=param_shape)
    return x, mask, upstream, gamma, beta


# ------------------------------------------------------ float64 reference


def _groups(case: Case, *arrays):
    """Each array split into the ghost batches (one group without virtual_batch_size)."""
    size = case.virtual_batch_size or case.shape[0]
    count = case.shape[0] // size
    return [tuple(None if a is None else a[g * size : (g + 1) * size] for a in arrays) for g in range(count)]


def reference(case: Case, x, mask, upstream, gamma, beta):
    """Float64 outputs, dx, and the moving mean and variance after one step with momentum 0."""
    rank = len(case.shape)
    reduce = tuple(i for i in range(rank) if i not in case.axis)
    keep = [case.shape[i] if i in case.axis else 1 for i in range(rank)]
    gamma = gamma.reshape(keep) if case.scale else np.ones(keep)
    beta = beta.reshape(keep) if case.center else np.zeros(keep)
    outputs, grads, means, variances, grad_scale, unit = [], [], [], [], 0.0, 0.0
    for xg, mg, ug in _groups(case, x, mask, upstream):
        w = np.ones_like(xg) if mg is None else np.broadcast_to(mg[..., None], xg.shape).astype(np.float64)
        count = np.maximum(w.sum(axis=reduce, keepdims=True), 1.0)
        mean = (w * xg).sum(axis=reduce, keepdims=True) / count
        centered = xg - mean
        variance = (w * centered**2).sum(axis=reduce, keepdims=True) / count
        s = 1.0 / np.sqrt(variance + EPSILON)
        # Renorm from its initial statistics (mean 0, stddev 1): r = sqrt(variance + eps),
        # d = mean, constants for the gradient.
        r, d = (1.0 / s, mean) if case.renorm else (1.0, 0.0)
        outputs.append(gamma * (centered * s * r + d) + beta)
        gh = ug * gamma * r
        grads.append(
            s * gh
            - s * w / count * gh.sum(axis=reduce, keepdims=True)
            - s**3 * w * centered / count * (gh * centered).sum(axis=reduce, keepdims=True)
        )
        means.append(mean)
        variances.append(variance)
        grad_scale = max(grad_scale, np.max(np.abs(s * gh)))
        unit = max(unit, np.max(np.abs(gamma * r)))
    param_shape = tuple(case.shape[a] for a in case.axis)
    stat = lambda values: np.mean(values, axis=0).reshape(param_shape)  # noqa: E731
    results = np.concatenate(outputs), np.concatenate(grads), stat(means), stat(variances)
    # What each error is relative to: the size of the outputs, at least their unit gamma (all
    # zeros when the inputs are all equal); the size of the gradient's terms (they may cancel
    # to almost nothing); the mean's size and spread; the variance, or a thousandth of
    # epsilon when it is 0 (the normalization takes variance + epsilon).
    mean, variance = results[2:]
    scales = (
        max(np.max(np.abs(results[0])), unit),
        grad_scale,
        np.max(np.abs(mean) + np.sqrt(variance)),
        max(np.max(variance), 1e-3 * EPSILON),
    )
    return results, scales


# ------------------------------------------------------ running the layers


def _forward_and_grad(layer, x, mask, upstream):
    """Training-mode outputs and d(sum(upstream * outputs))/dx; the layer's variables are updated."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
        return y, tape.gradient(loss, x)
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(x):
        y, state = layer.stateless_call(trainable, non_trainable, x, training=True, mask=mask)
        return (y.astype("float32") * upstream).sum(), (y, state)

    (_, (y, state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
    for variable, value in zip(layer.non_trainable_variables, state):
        variable.assign(value)
    return y, dx


def _to64(x):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), np.float64)


def _run(layer_fn, case, x, mask, upstream, gamma, beta, merge_axes):
    """Runs fresh layers from `layer_fn(axis)` on each ghost batch; returns float64 (outputs, dx, mean, variance).

    `merge_axes` moves the feature axes to the end and merges them into one
    (for the stock layer's single `axis`).
    """
    dtype = compute_dtype(case.policy)
    rank = len(case.shape)
    order = [i for i in range(rank) if i not in case.axis] + list(case.axis)
    param_shape = tuple(case.shape[a] for a in case.axis)
    outputs, grads, means, variances = [], [], [], []
    for xg, mg, ug in _groups(case, x, mask, upstream):
        if merge_axes and len(case.axis) > 1:
            shape = xg.transpose(order).shape
            flat = lambda a: a.transpose(order).reshape(shape[: rank - len(case.axis)] + (-1,))  # noqa: E731
            xg, ug = flat(xg), flat(ug)
            axis = -1
        else:
            axis = list(case.axis) if len(case.axis) > 1 else case.axis[0]
        # The stock layer squeezes a masked one-channel mean to a scalar and then fails to
        # reshape it: it gets the channel twice (per-channel statistics, the same numbers).
        twice = merge_axes and mg is not None and np.prod(param_shape) == 1
        if twice:
            xg, ug = (np.concatenate([a, a], axis=case.axis[0]) for a in (xg, ug))
        layer = layer_fn(axis)
        layer.build(xg.shape)
        if case.scale:
            layer.gamma.assign(np.resize(gamma, layer.gamma.shape))
        if case.center:
            layer.beta.assign(np.resize(beta, layer.beta.shape))
        y, dx = _forward_and_grad(
            layer,
            keras.ops.cast(xg.astype("float32"), dtype),
            None if mg is None else keras.ops.convert_to_tensor(mg),
            keras.ops.convert_to_tensor(ug.astype("float32")),
        )
        y, dx = _to64(y), _to64(dx)
        if merge_axes and len(case.axis) > 1:
            inverse = np.argsort(order)
            unflat = lambda a: a.reshape(shape).transpose(inverse)  # noqa: E731
            y, dx = unflat(y), unflat(dx)
        if twice:
            y, dx = (np.split(a, 2, axis=case.axis[0])[0] for a in (y, dx))
        outputs.append(y)
        grads.append(dx)
        means.append(_to64(layer.moving_mean)[: np.prod(param_shape)].reshape(param_shape))
        variances.append(_to64(layer.moving_variance)[: np.prod(param_shape)].reshape(param_shape))
    return np.concatenate(outputs), np.concatenate(grads), np.mean(means, axis=0), np.mean(variances, axis=0)


def run_kerasbn(case, *inputs):
    def make(axis):
        return kerasbn.BatchNorm(
            axis=axis,
            momentum=0.0,
            epsilon=EPSILON,
            center=case.center,
            scale=case.scale,
            renorm=case.renorm,
            virtual_batch_size=case.virtual_batch_size,
            dtype=case.policy,
        )

    # The layer takes the whole batch (its ghost batches are its own business).
    whole = dataclasses.replace(case, virtual_batch_size=None)
    return _run(make, whole, *inputs, merge_axes=False)


def run_stock(case, *inputs):
    def make(axis):
        return keras.layers.BatchNormalization(
            axis=axis,
            momentum=0.0,
            epsilon=EPSILON,
            center=case.center,
            scale=case.scale,
            renorm=case.renorm,
            dtype=case.policy,
        )

    return _run(make, case, *inputs, merge_axes=True)


NAMES = ("outputs", "dx", "moving_mean", "moving_variance")


def relative_errors(results, expected, scales):
    """Max absolute error of each result over its scale."""
    return [float(np.max(np.abs(r - e)) / max(scale, 1e-30)) for r, e, scale in zip(results, expected, scales)]


def check(case: Case):
    """{name: (kerasbn error, stock error, passed)} for one case."""
    inputs = make_inputs(case)
    expected, scales = reference(case, *inputs)
    ours = relative_errors(run_kerasbn(case, *inputs), expected, scales)
    stock = relative_errors(run_stock(case, *inputs), expected, scales)
    tolerance = TOLERANCE[compute_dtype(case.policy)]
    return {
        name: (o, s, bool(o <= tolerance or o <= STOCK_FACTOR * s))
        for name, o, s in zip(NAMES, ours, stock)
    }


@pytest.mark.parametrize("masked", [False, True])
def test_moments_far_from_zero_keep_their_digits(masked):
    """`kerasbn.moments` of float32 inputs 1e5 times their spread from zero, against float64."""
    rng = np.random.default_rng(5)
    x = (1e5 + rng.normal(size=(210, 3))).astype("float32")
    mask = rng.uniform(size=(210,)) < 0.7 if masked else None
    # Masked-out padding may hold anything: a pivot taken from it would ruin the digits.
    padded = np.where(mask[:, None], x, np.float32(-3e38)) if masked else x
    mean, variance = kerasbn.moments(padded, (0,), mask=mask)
    kept = x[mask] if masked else x
    reference = kept.astype(np.float64)
    # The mean within a float32 rounding of 1e5; the variance (about 1) to 1e-6.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mean), reference.mean(0), rtol=0, atol=8e-3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variance), reference.var(0), rtol=1e-6)


# The two configurations issue 18 found worse than the stock layer (0.3.0: output error
# 4.2e-3 against 1.6e-3, on the widened path; dx 1.9e-4 against 8.3e-5, on the fused one).
KNOWN = [
    Case((10, 7, 3, 1), (3,), "float32", True, True, False, None, False, 1e5, 1.0, 0),
    Case((2, 2, 3, 4), (3,), "float32", False, True, False, None, False, 1e5, 1.0, 0),
]


@pytest.mark.parametrize("case", KNOWN, ids=["one-channel", "no-center"])
def test_known_cases_beat_the_stock_layer(case):
    for seed in range(3):
        for name, (ours, stock, _) in check(dataclasses.replace(case, seed=seed)).items():
            assert ours <= TOLERANCE["float32"], (seed, name, ours, stock)
            assert ours < stock or ours < 1e-6, (seed, name, ours, stock)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None)
@given(cases())
def test_as_accurate_as_the_stock_layer(case):
    with warnings.catch_warnings():
        # One value per channel in a ghost batch (variance 0) is a case too, not a warning.
        warnings.simplefilter("ignore", UserWarning)
        results = check(case)
    failed = {name: result for name, result in results.items() if not result[2]}
    assert not failed, f"{case}: (kerasbn error, stock error) {failed}"

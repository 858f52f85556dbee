"""Experimental normalization layers: decorrelated (ZCA-whitening) batch norm.

Batch norm standardizes each channel on its own; the channels stay
correlated. Decorrelated batch normalization (Huang et al., "Decorrelated
Batch Normalization", CVPR 2018) whitens them instead: with the batch mean
`mu` and the full channel covariance `Sigma` (C x C),

    y = (x - mu) @ W,    W = (Sigma + epsilon * I) ** -1/2    (ZCA whitening)

so the output's channels have zero mean and (up to epsilon) identity
covariance. Among all whitening matrices the symmetric one, ZCA, rotates the
data least, which keeps each output channel close to its input channel. A
per-channel `gamma` and `beta` follow, as in batch norm.

The math is in pure functions (`covariance_moments`, `inverse_sqrt_psd`,
`whiten`); `DecorrelatedBatchNorm` creates the weights, picks batch or moving
statistics and updates the moving averages.

The inverse square root comes from an eigendecomposition. Its gradient is
written in closed form (the Daleckii-Krein formula) rather than
differentiated through `eigh`: automatic differentiation of eigenvectors
divides by differences of eigenvalues and blows up when two are close, while
the derivative of `Sigma ** -1/2` itself is bounded.
"""

from __future__ import annotations

from typing import Optional

import keras
from keras import constraints, initializers, ops, regularizers

from kerasbn.ops import statistics_dtype
from kerasbn.validation import validate_epsilon, validate_momentum


def covariance_moments(x, axis: int = -1):
    """Mean and biased covariance of the channels on `axis`, over every other axis.

    Args:
        x: A tensor of rank >= 2.
        axis: The channel axis.

    Returns:
        `(mean, covariance)`: shapes `(C,)` and `(C, C)`, in `x`'s dtype.
    """
    rows = ops.reshape(ops.moveaxis(x, axis, -1), (-1, ops.shape(x)[axis]))
    mean = ops.mean(rows, axis=0)
    centered = rows - mean
    count = ops.cast(ops.shape(rows)[0], x.dtype)
    covariance = ops.matmul(ops.transpose(centered), centered) / count
    return mean, covariance


@ops.custom_gradient
def inverse_sqrt_psd(matrix):
    """`matrix ** -1/2` of a symmetric positive definite matrix, with a stable gradient.

    With `matrix = U diag(lam) U^T`, the result is `U diag(lam ** -1/2) U^T`.
    For an upstream gradient G (symmetrized), the gradient with respect to
    `matrix` is `U ((U^T G U) * K) U^T` with
    `K_ij = -1 / (s_i s_j (s_i + s_j))`, `s = sqrt(lam)`: the divided
    difference of `lam ** -1/2`, which needs no eigenvalue gap.

    Args:
        matrix: A `(C, C)` symmetric positive definite tensor (add
            `epsilon * I` to a covariance first).

    Returns:
        The `(C, C)` symmetric inverse square root.
    """
    eigenvalues, eigenvectors = ops.eigh(matrix)
    root = ops.sqrt(eigenvalues)
    result = ops.matmul(eigenvectors / root, ops.transpose(eigenvectors))

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        symmetric = (upstream + ops.transpose(upstream)) / 2
        rotated = ops.matmul(ops.matmul(ops.transpose(eigenvectors), symmetric), eigenvectors)
        kernel = -1.0 / (root[:, None] * root[None, :] * (root[:, None] + root[None, :]))
        return ops.matmul(ops.matmul(eigenvectors, rotated * kernel), ops.transpose(eigenvectors))

    return result, grad


def whitening_matrix(covariance, epsilon: float):
    """The ZCA whitening matrix `(covariance + epsilon * I) ** -1/2`."""
    channels = ops.shape(covariance)[0]
    return inverse_sqrt_psd(covariance + epsilon * ops.eye(channels, dtype=covariance.dtype))


def whiten(x, mean, whitening, axis: int = -1):
    """`(x - mean) @ whitening` along the channel `axis` (the matrix is symmetric)."""
    moved = ops.moveaxis(x, axis, -1)
    return ops.moveaxis(ops.matmul(moved - mean, whitening), -1, axis)


@keras.saving.register_keras_serializable(package="kerasbn")
class DecorrelatedBatchNorm(keras.layers.Layer):
    """Batch normalization that whitens the channels with their full covariance (ZCA).

    Training (`training=True`): batch mean `mu` and covariance `Sigma` of
    the channels over every other axis,
    `y = gamma * ((x - mu) @ (Sigma + epsilon I) ** -1/2) + beta`, and the
    moving averages move towards the batch statistics:

        moving_mean       = momentum * moving_mean       + (1 - momentum) * mu
        moving_covariance = momentum * moving_covariance + (1 - momentum) * Sigma

    `momentum` weighs the OLD value (the Keras convention; PyTorch's
    momentum is `1 - momentum`). Inference uses the moving statistics. As
    with Keras's BatchNormalization, a layer with `trainable=False` runs in
    inference mode and does not update its statistics.

    Each step costs an eigendecomposition of a C x C matrix, so the layer
    suits the tens to low hundreds of channels; the batch must hold clearly
    more rows (batch x positions) than C for the covariance to be full rank.

    Args:
        axis: The channel axis (one integer).
        momentum: Weight of the old value in the moving averages, in [0, 1).
        epsilon: Added to the covariance's diagonal, > 0.
        center: Learn `beta` (else beta = 0).
        scale: Learn `gamma` (else gamma = 1).
        beta_initializer: Initializer of beta.
        gamma_initializer: Initializer of gamma.
        beta_regularizer: Optional regularizer of beta.
        gamma_regularizer: Optional regularizer of gamma.
        beta_constraint: Optional constraint on beta.
        gamma_constraint: Optional constraint on gamma.
        **kwargs: Base layer arguments (name, dtype, ...).

    Call arguments:
        inputs: A tensor of rank >= 2.
        training: Batch statistics (and moving-average updates) when true.

    Returns:
        A tensor of the input's shape and dtype.

    Raises:
        ValueError: for a non-integer `axis`, `momentum` outside [0, 1) or
            `epsilon <= 0`.

    Example:

        import keras
        from kerasbn.experimental import DecorrelatedBatchNorm
        model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(16, 5),
                                  DecorrelatedBatchNorm(), keras.layers.Activation("relu")])
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"`axis` must be one integer. Received: axis={axis!r}")
        self.axis = axis
        self.momentum = validate_momentum("momentum", momentum)
        self.epsilon = validate_epsilon(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)

    def build(self, input_shape):
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(f"`axis` {self.axis} is out of range for inputs of rank {rank}. Received: input_shape={input_shape}")
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(f"The channel axis {self.axis} must have a known size. Received: input_shape={input_shape}")
        self.gamma = self.add_weight(
            shape=(channels,), name="gamma", initializer=self.gamma_initializer,
            regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
        ) if self.scale else None
        self.beta = self.add_weight(
            shape=(channels,), name="beta", initializer=self.beta_initializer,
            regularizer=self.beta_regularizer, constraint=self.beta_constraint,
        ) if self.center else None
        self.moving_mean = self.add_weight(
            shape=(channels,), name="moving_mean", initializer="zeros", trainable=False,
            autocast=False,
        )
        self.moving_covariance = self.add_weight(
            shape=(channels, channels), name="moving_covariance", initializer="identity", trainable=False,
            autocast=False,
        )
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={self.axis: channels})

    def call(self, inputs, training: Optional[bool] = None):
        training = bool(training) and self.trainable
        # Statistics in float32 for float16/bfloat16 inputs: the covariance's
        # sums of products overflow float16, and eigh needs the precision.
        compute_dtype = statistics_dtype(inputs.dtype)
        x = ops.cast(inputs, compute_dtype)
        if training:
            mean, covariance = covariance_moments(x, self.axis)
            self.moving_mean.assign(
                self.momentum * self.moving_mean + (1.0 - self.momentum) * ops.cast(mean, self.moving_mean.dtype)
            )
            self.moving_covariance.assign(
                self.momentum * self.moving_covariance
                + (1.0 - self.momentum) * ops.cast(covariance, self.moving_covariance.dtype)
            )
        else:
            mean = ops.cast(self.moving_mean, compute_dtype)
            covariance = ops.cast(self.moving_covariance, compute_dtype)
        outputs = whiten(x, mean, whitening_matrix(covariance, self.epsilon), self.axis)
        if self.scale or self.center:
            shape = [1] * len(inputs.shape)
            shape[self.axis] = inputs.shape[self.axis]
            if self.scale:
                outputs = outputs * ops.reshape(ops.cast(self.gamma, compute_dtype), shape)
            if self.center:
                outputs = outputs + ops.reshape(ops.cast(self.beta, compute_dtype), shape)
        return ops.cast(outputs, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        base_config = super().get_config()
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        return {**base_config, **config}

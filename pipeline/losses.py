"""Per-example losses and the factors S of their Hessians (H = S Sᵀ).

The factors are what makes the factored engine exact: the loss Hessian with
respect to the model output is S Sᵀ per example, so back-propagating the
columns of S gives the Gauss-Newton term, which is the whole Hessian when the
suffix is piecewise linear.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import tensorflow as tf

from pipeline.errors import BadInputError

LOSS_NAMES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "mse")


def _sparse_labels(y: tf.Tensor, classes: int) -> tf.Tensor:
    return tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), classes)


def _flatten(t: tf.Tensor) -> tf.Tensor:
    return tf.reshape(t, (tf.shape(t)[0], -1))


@dataclass(frozen=True)
class Loss:
    """A per-example loss ``l(output, y) -> (N,)`` and its Hessian factor."""

    name: str
    from_logits: bool

    @property
    def is_cross_entropy(self) -> bool:
        return self.name != "mse"

    def targets(self, y: tf.Tensor, output: tf.Tensor) -> tf.Tensor:
        """Labels as dense targets with the output's flattened shape."""
        classes = int(output.shape[-1])
        if self.name == "sparse_categorical_crossentropy":
            return tf.cast(_sparse_labels(y, classes), output.dtype)
        return tf.cast(_flatten(y), output.dtype)

    def per_example(self, output: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Loss of each example, shape (N,)."""
        output = _flatten(output)
        targets = self.targets(y, output)
        if self.name == "mse":
            return tf.reduce_mean(tf.square(output - targets), axis=1)
        log_probs = tf.nn.log_softmax(output) if self.from_logits else tf.math.log(output)
        return -tf.reduce_sum(targets * log_probs, axis=1)

    def factor_width(self, outputs: int) -> int:
        """Columns of ``hessian_factor`` for a model with ``outputs`` outputs: C - 1 for cross-entropy (rank C - 1)."""
        return outputs - 1 if self.is_cross_entropy and outputs > 1 else outputs

    def hessian_factor(self, logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """S with S Sᵀ = d²l/d(logits)², shape (N, C, ``factor_width(C)``).

        For cross-entropy the argument must be logits (the engine peels a final
        softmax first); for MSE it is the model output. The cross-entropy Hessian
        diag(p) - p pᵀ has rank C - 1: its symmetric factor D = diag(√p) - p √pᵀ
        has D √p = 0, so a Householder reflection R taking the last unit vector
        to -√p makes the last column of D R zero, and the other C - 1 columns,
        d_j - d_C √p_j / (1 + √p_C), are an exact factor: one back-propagated
        column fewer.
        """
        logits = _flatten(logits)
        classes = int(logits.shape[-1])
        if self.name == "mse":
            scale = tf.sqrt(tf.constant(2.0 / classes, logits.dtype))
            return scale * tf.eye(classes, batch_shape=[tf.shape(logits)[0]], dtype=logits.dtype)
        probs = tf.nn.softmax(logits)
        label_mass = tf.reduce_sum(self.targets(y, logits), axis=1)[:, None, None]
        root = tf.sqrt(probs)
        factor = tf.linalg.diag(root) - probs[:, :, None] * root[:, None, :]
        if classes > 1:
            last = factor[:, :, -1:]
            factor = factor[:, :, :-1] - last * (root[:, None, :-1] / (1 + root[:, None, -1:]))
        return tf.sqrt(label_mass) * factor

    def sampled_factor(self, logits: tf.Tensor, y: tf.Tensor, samples: int, seed: int) -> tf.Tensor:
        """Random R (N, C, samples) with E[R Rᵀ] = S Sᵀ: the Monte-Carlo factor of the loss Hessian.

        Cross-entropy: columns (onehot(ŷ) - p) / sqrt(samples) with ŷ ~ softmax(logits);
        MSE: sqrt(2 / C) ξ / sqrt(samples) with standard normal ξ.
        """
        logits = _flatten(logits)
        classes = int(logits.shape[-1])
        n = tf.shape(logits)[0]
        scale = tf.sqrt(tf.constant(float(samples), logits.dtype))
        if self.name == "mse":
            noise = tf.random.stateless_normal((n, classes, samples), seed=[seed, 1], dtype=logits.dtype)
            return tf.sqrt(tf.constant(2.0 / classes, logits.dtype)) * noise / scale
        probs = tf.nn.softmax(logits)
        drawn = tf.random.stateless_categorical(logits, samples, seed=[seed, 2])  # (N, samples)
        columns = tf.one_hot(drawn, classes, axis=1, dtype=logits.dtype) - probs[:, :, None]
        label_mass = tf.reduce_sum(self.targets(y, logits), axis=1)[:, None, None]
        return tf.sqrt(label_mass) * columns / scale


def get_loss(name: str, from_logits: bool = False) -> Loss:
    """The loss called ``name``; raises BadInputError listing the valid names."""
    if name not in LOSS_NAMES:
        raise BadInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return Loss(name=name, from_logits=bool(from_logits))


def check_labels(loss: Loss, y: np.ndarray, output_shape: tuple, examples: int) -> None:
    """Raise BadInputError when labels cannot pair with outputs of ``output_shape``."""
    if len(y) != examples:
        raise BadInputError(f"labels have {len(y)} rows but inputs have {examples} examples")
    classes = int(np.prod(output_shape[1:]))
    if loss.name == "sparse_categorical_crossentropy":
        flat = np.asarray(y).reshape(len(y), -1)
        if flat.shape[1] != 1:
            raise BadInputError(
                f"sparse_categorical_crossentropy needs integer class labels of shape (N,), got {np.shape(y)};"
                " use categorical_crossentropy for one-hot labels"
            )
        if flat.size and (flat.min() < 0 or flat.max() >= classes):
            raise BadInputError(f"class labels must lie in [0, {classes}), got range [{flat.min()}, {flat.max()}]")
        return
    label_size = int(np.prod(np.shape(y)[1:]))
    if label_size != classes:
        raise BadInputError(
            f"{loss.name} needs labels with {classes} values per example to match the model output"
            f" {tuple(output_shape[1:])}, got labels of shape {np.shape(y)}"
        )


"""Per-example losses, defined as ``keras.losses`` computes them, and the factors S of their Hessians (H = S Sᵀ).

The loss of an example is what the Keras loss of the same name gives for the model's output
tensor (``reduction=None``), averaged over the output's non-batch positions: the loss a Keras
user trains with, whose default reduction (``sum_over_batch_size``) averages over examples and
positions. Keras 3.15's TensorFlow backend (``keras/src/backend/tensorflow/nn.py``) computes:

* ``from_logits=True``: ``softmax_cross_entropy_with_logits`` (categorical; labels used as
  given, soft or not, never renormalized) or ``sparse_softmax_cross_entropy_with_logits``.
* ``from_logits=False`` on the output of a Keras softmax: the logits. ``keras.activations.softmax``
  and the backend's ``softmax`` attach them to their output as ``_keras_logits`` (eagerly and
  in graphs; a Dense or Activation layer with activation "softmax" and a Softmax layer all do),
  and ``_get_logits`` uses them in place of the probabilities; in a graph, so does an output
  made by a raw TensorFlow ``Softmax`` op (its input). The loss is then softmax cross-entropy
  of the logits, with no clipping: it stays exact where a probability underflows. Keras does
  the same when ``from_logits=True`` is given such an output (with a warning).
* ``from_logits=False`` on other probabilities (a NumPy array, ``model.predict``'s output, a
  normalization that is not a softmax), with ε = ``keras.config.epsilon()`` (1e-7):
  categorical ``-Σ_c t_c log clip(p_c / Σ_k p_k, ε, 1 - ε)`` (renormalized, then clipped);
  sparse ``-log clip(p_y, ε, 1 - ε) + log Σ_k clip(p_k, ε, 1 - ε)`` (clipped, then renormalized
  through the log-softmax of the clipped values).
* ``mse``: the mean of the squared differences over the last axis; there is no logits variant.

Cross-entropy takes one distribution per example over the output's last axis; outputs with
more than one position (``(N, T, C)`` where T > 1, for which Keras computes one loss per position)
are refused. MSE takes any output shape: the mean over every entry of an example equals the
mean of Keras' per-position means.

The factors are what makes the factored engine exact: the loss Hessian with respect to the
model output (the logits, for cross-entropy) is S Sᵀ per example, so back-propagating the
columns of S gives the Gauss-Newton term, which is the whole Hessian when the suffix is
piecewise linear. For cross-entropy, S is the Hessian factor of softmax cross-entropy of the
logits: the loss itself when ``from_logits=True``, and when the engine peels a final Keras
softmax, the loss Keras computes for that softmax's output (from its logits, as above), so the
peeled form is the Keras loss and not an approximation of it, also where p < ε. The clipped
form applies only to probabilities that do not come from a softmax; it is flat in p where a
clip is active, its Hessian there has no softmax factor, and the factored engine is never
used on it (``check_suffix`` refuses cross-entropy on probabilities without a final softmax):
the exact engine differentiates it as defined.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings

import keras
import numpy as np
import tensorflow as tf

from pipeline.errors import BadInputError

LOSS_NAMES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "mse")


def _sparse_labels(y: tf.Tensor, classes: int) -> tf.Tensor:
    return tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), classes)


def _flatten(t: tf.Tensor) -> tf.Tensor:
    return tf.reshape(t, (tf.shape(t)[0], -1))


def keras_logits(output) -> tf.Tensor | None:
    """The logits Keras' cross-entropy uses in place of ``output``, or None.

    As ``_get_logits`` in Keras' TensorFlow backend: those a Keras softmax attached to its output
    (``_keras_logits``), else, for a graph tensor made by a ``Softmax`` op, that op's input.
    """
    logits = getattr(output, "_keras_logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tf.__internal__.EagerTensor, tf.Variable)):
        return None
    op = getattr(output, "op", None)
    if op is not None and op.type == "Softmax" and len(op.inputs) == 1:
        return op.inputs[0]
    return None


def output_positions(output_shape) -> int | None:
    """Positions of an output of shape ``(N, ..., C)``: the product of the axes between batch and last (1 for
    rank 2); None when one of them is unknown."""
    middle = tuple(output_shape)[1:-1]
    if any(d is None for d in middle):
        return None
    return int(np.prod(middle, dtype=np.int64))


@dataclass(frozen=True)
class Loss:
    """A per-example loss ``l(output, y) -> (N,)``, as ``keras.losses`` defines it, and its Hessian factor."""

    name: str
    from_logits: bool

    def __post_init__(self):
        if self.name == "mse" and self.from_logits:
            raise BadInputError("loss 'mse' has no from_logits variant (Keras' MeanSquaredError compares the model output"
                                " with the labels as they are); set loss.from_logits to false")

    @property
    def is_cross_entropy(self) -> bool:
        return self.name != "mse"

    def targets(self, y: tf.Tensor, output: tf.Tensor) -> tf.Tensor:
        """Labels as dense targets with the output's flattened shape."""
        classes = int(output.shape[-1])
        if self.name == "sparse_categorical_crossentropy":
            return tf.cast(_sparse_labels(y, classes), output.dtype)
        return tf.cast(_flatten(y), output.dtype)

    def check_output_shape(self, output_shape) -> None:
        """Raise BadInputError when outputs of ``output_shape`` (batch axis first) do not hold one distribution per
        example for cross-entropy."""
        positions = output_positions(output_shape)
        if self.is_cross_entropy and positions is not None and positions > 1:
            raise BadInputError(
                f"{self.name} needs one distribution per example over the output's last axis, but the model output"
                f" {tuple(output_shape)[1:]} has {positions} positions: Keras computes one loss per position there,"
                " which hessdiag does not support; end the model in one (N, classes) output, or use mse"
            )

    def per_example(self, output: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Loss of each example, shape (N,): Keras' loss of the same name and ``from_logits`` (see the module notes)."""
        self.check_output_shape(output.shape)
        if self.name == "mse":
            output = _flatten(output)
            return tf.reduce_mean(tf.square(output - self.targets(y, output)), axis=1)
        logits = keras_logits(output)
        if logits is not None and self.from_logits:
            warnings.warn(f"{self.name} with from_logits=True got the output of a softmax; like Keras, the loss uses"
                          " that softmax's logits", stacklevel=2)
        if logits is not None or self.from_logits:
            logits = _flatten(output if logits is None else logits)
            return -tf.reduce_sum(self.targets(y, logits) * tf.nn.log_softmax(logits), axis=1)
        probs = _flatten(output)
        targets = self.targets(y, probs)
        epsilon = keras.config.epsilon()
        if self.name == "sparse_categorical_crossentropy":
            log_probs = tf.nn.log_softmax(tf.math.log(tf.clip_by_value(probs, epsilon, 1 - epsilon)))
        else:
            probs = probs / tf.reduce_sum(probs, axis=1, keepdims=True)
            log_probs = tf.math.log(tf.clip_by_value(probs, epsilon, 1 - epsilon))
        return -tf.reduce_sum(targets * log_probs, axis=1)

    def factor_width(self, outputs: int) -> int:
        """Columns of ``hessian_factor`` for a model with ``outputs`` outputs: C - 1 for cross-entropy (rank C - 1)."""
        return outputs - 1 if self.is_cross_entropy and outputs > 1 else outputs

    def hessian_factor(self, logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """S with S Sᵀ = d²l/d(logits)², shape (N, C, ``factor_width(C)``).

        For cross-entropy the argument must be logits, and S is the factor of softmax cross-entropy
        of them: ``per_example`` with ``from_logits=True``, and ``per_example`` of a Keras softmax's
        output, which Keras evaluates from its logits (the engine peels a final softmax first).
        It is not the Hessian of the clipped loss of other probabilities. For MSE the argument is
        the model output and C counts all its entries per example. With label mass m = Σ_c y_c,
        the cross-entropy Hessian m (diag(p) - p pᵀ) has rank C - 1: its symmetric factor
        D = diag(√p) - p √pᵀ has D √p = 0, so a Householder reflection R taking the last unit
        vector to -√p makes the last column of D R zero, and the other C - 1 columns,
        d_j - d_C √p_j / (1 + √p_C), are an exact factor: one back-propagated column fewer.
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

        Cross-entropy: columns √m (onehot(ŷ) - p) / sqrt(samples) with ŷ ~ softmax(logits) and label
        mass m; MSE: sqrt(2 / C) ξ / sqrt(samples) with standard normal ξ. The same ``seed`` draws
        the same columns.
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
    """The loss called ``name``; raises BadInputError listing the valid names, or for mse with ``from_logits``."""
    if name not in LOSS_NAMES:
        raise BadInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return Loss(name=name, from_logits=bool(from_logits))


def check_labels(loss: Loss, y: np.ndarray, output_shape: tuple, examples: int) -> None:
    """Raise BadInputError when labels cannot pair with outputs of ``output_shape``."""
    if len(y) != examples:
        raise BadInputError(f"labels have {len(y)} rows but inputs have {examples} examples")
    loss.check_output_shape(output_shape)
    classes = int(np.prod(output_shape[1:]))
    values = np.asarray(y)
    if np.issubdtype(values.dtype, np.number) and values.size and not np.all(np.isfinite(values)):
        row = int(np.argwhere(~np.isfinite(values.reshape(len(values), -1)))[0, 0])
        raise BadInputError(f"labels must be finite; row {row} is {values[row].tolist()}")
    if loss.name == "sparse_categorical_crossentropy":
        flat = values.reshape(len(y), -1)
        if flat.shape[1] != 1:
            raise BadInputError(
                f"sparse_categorical_crossentropy needs integer class labels of shape (N,), got {np.shape(y)};"
                " use categorical_crossentropy for one-hot labels"
            )
        fractional = np.issubdtype(flat.dtype, np.floating) and np.any(flat != np.round(flat))
        if fractional:
            row = int(np.argwhere(flat != np.round(flat))[0, 0])
            raise BadInputError(f"class labels must be integers, got {flat[row, 0]} at row {row}")
        if flat.size and (flat.min() < 0 or flat.max() >= classes):
            raise BadInputError(f"class labels must lie in [0, {classes}), got range [{flat.min()}, {flat.max()}]")
        return
    label_size = int(np.prod(np.shape(y)[1:]))
    if label_size != classes:
        raise BadInputError(
            f"{loss.name} needs labels with {classes} values per example to match the model output"
            f" {tuple(output_shape[1:])}, got labels of shape {np.shape(y)}"
        )
    if loss.name == "categorical_crossentropy" and values.size:
        mass = values.reshape(len(values), -1).sum(axis=1)
        if mass.min() < 0:
            row = int(mass.argmin())
            raise BadInputError(
                f"categorical_crossentropy labels must sum to a non-negative mass per example (the loss Hessian is"
                f" that mass times diag(p) - p pᵀ); row {row} sums to {mass[row]:.6g}"
            )

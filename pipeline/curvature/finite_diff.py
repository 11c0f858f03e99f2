"""Independent float64 finite-difference reference for layer derivatives.

The model is cloned in float64 and the loss is differentiated with respect to
the weight variable directly (no z-space trick), so it shares no engine code:
d²L/dW_i² ≈ (g_i(W + h e_i) - g_i(W - h e_i)) / 2h, and
dL/dW_i ≈ (L(W + h e_i) - L(W - h e_i)) / 2h.

Piecewise-linear networks (ReLU, max-pool) have kinks where the second
derivative does not exist; a difference quotient across one measures the
jump, not the curvature. Each entry is therefore also differenced with step
h/2: where the two disagree by more than 1%, the entry is flagged non-smooth.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature.layer import batches_of
from pipeline.curvature.target import resolve_target
from pipeline.losses import get_loss


class FiniteDifferences(NamedTuple):
    """Central-difference gradient and Hessian-diagonal entries at the sampled indices.

    ``smooth[k]`` is False where steps h and h/2 disagree: a kink lies within h
    of the point, and the diagonal reference there is not meaningful.
    """

    gradient: np.ndarray
    hessian_diagonal: np.ndarray
    smooth: np.ndarray


def float64_clone(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose layers compute in float64, with the same weights."""

    def clone_layer(layer):
        config = layer.get_config()
        config["dtype"] = "float64"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return clone


def finite_difference_derivatives(
    model: keras.Model,
    layer: str,
    x: np.ndarray,
    y: np.ndarray,
    indices: Sequence[tuple[int, ...]],
    *,
    loss: str,
    from_logits: bool = False,
    weight: str = "kernel",
    step: float = 1e-5,
    batch_size: int = 256,
    batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None,
) -> FiniteDifferences:
    """Float64 central differences of the mean loss at each multi-index of the weight.

    ``batches``, when given, returns the data's (x, y) batches afresh on each call (streamed data), in place of ``x``, ``y``.
    """
    model64 = float64_clone(model)
    variable = getattr(resolve_target(model64, layer, weight).layer, weight)
    loss_fn = get_loss(loss, from_logits)
    if batches is None:
        held = batches_of(np.asarray(x), np.asarray(y), batch_size)
        batches = lambda: held  # noqa: E731

    @tf.function
    def value_and_grad(bx, by):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(loss_fn.per_example(model64(bx, training=False), by))
        return total, tape.gradient(total, variable)

    def evaluate():
        total, grad, examples = 0.0, 0.0, 0
        for bx, by in batches():
            value, g = value_and_grad(tf.constant(bx, tf.float64), tf.constant(by))
            total += float(value)
            grad = grad + g.numpy()
            examples += len(bx)
        return total / examples, grad / examples

    base = variable.numpy().copy()

    def central(index, h):
        sides = []
        for sign in (1.0, -1.0):
            shifted = base.copy()
            shifted[index] += sign * h
            variable.assign(shifted)
            sides.append(evaluate())
        (loss_plus, grad_plus), (loss_minus, grad_minus) = sides
        return (loss_plus - loss_minus) / (2 * h), (grad_plus[index] - grad_minus[index]) / (2 * h)

    grad_fd, diag_fd, smooth = [], [], []
    for index in indices:
        index = tuple(int(i) for i in index)
        grad, diag = central(index, step)
        _, diag_half = central(index, step / 2)
        grad_fd.append(grad)
        diag_fd.append(diag)
        smooth.append(abs(diag - diag_half) <= 1e-2 * max(abs(diag), abs(diag_half)) + 1e-12)
    variable.assign(base)
    return FiniteDifferences(np.array(grad_fd), np.array(diag_fd), np.array(smooth))

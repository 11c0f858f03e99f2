"""Independent float64 finite-difference reference for layer derivatives.

The model is cloned in float64 and the loss is differentiated with respect to
the weight variable directly (no z-space trick), so it shares no engine code:
d²L/dW_i² ≈ (g_i(W + h e_i) - g_i(W - h e_i)) / 2h, and
dL/dW_i ≈ (L(W + h e_i) - L(W - h e_i)) / 2h.

Each entry is differenced with steps h and h/2 and Richardson-extrapolated; the two steps' gap
bounds the reference's truncation error, and a few ulps of the loss values (or gradient entries)
over the step bound its rounding. An entry counts as resolved once both together are within a
quarter of the tolerance validation holds it to (``rtol``, ``atol`` of the largest sampled entry),
for the gradient and the diagonal both. Three things keep entries from it at step h. Two are met by
steps 10, 100, ... times shorter: a kink (ReLU, ReLU6, hard-swish, max-pool) within h of the point,
where a difference quotient measures the jump and not the curvature (only steps longer than the
distance to it cross it; the float64 gradients keep such steps accurate); and a network whose
derivatives vary on a scale below h (a random EfficientNetV2's stem gradients swing by 100% over
1e-5). The third by steps up to 1000 times longer: a gradient entry so small against the loss that
its loss values differ in the last digits only (ConvNeXt's blocks, scaled by 1e-6). The best
attempt is kept; an entry none of them resolves is reported unresolved.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature.layer import batches_of
from pipeline.curvature.patches import patch_column
from pipeline.curvature.precision import float64_clone
from pipeline.curvature.problem import logits_output
from pipeline.curvature.target import located_target
from pipeline.losses import get_loss


REFINEMENTS = 4  # further steps, each 10 times shorter (or longer) than the last, for an entry not yet resolved
MAX_LONGER = 3  # steps at most 1000 times h
ROUNDING_ULPS = 4  # float64 ulps of a loss value (or gradient entry) its evaluation may be off by


class FiniteDifferences(NamedTuple):
    """Central-difference gradient and Hessian-diagonal entries at the sampled indices.

    ``smooth[k]`` is False where entry k is unresolved: even its smallest steps (h/2 against h) disagree by more
    than a quarter of the tolerance (a kink lies that close, or the derivatives vary faster still), and its
    reference is not meaningful.
    """

    gradient: np.ndarray
    hessian_diagonal: np.ndarray
    smooth: np.ndarray


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
    model64: keras.Model | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> FiniteDifferences:
    """Float64 central differences of the mean loss at each multi-index of the weight, resolved to a quarter of
    ``rtol`` of each entry plus ``atol`` of the largest sampled one (gradient and diagonal each).

    ``batches``, when given, returns the data's (x, y) batches afresh on each call (streamed data), in place of ``x``, ``y``.
    ``model64``: ``float64_clone(model)`` when the caller already made one (one per validation, not per tensor).
    """
    model64 = model64 or float64_clone(model)
    variable = located_target(model64, layer, weight).variable
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
        """(gradient, diagonal) central quotients at step h, and bounds on their float64 rounding errors."""
        sides = []
        for sign in (1.0, -1.0):
            shifted = base.copy()
            shifted[index] += sign * h
            variable.assign(shifted)
            sides.append(evaluate())
        (loss_plus, grad_plus), (loss_minus, grad_minus) = sides
        quotients = np.array([(loss_plus - loss_minus) / (2 * h), (grad_plus[index] - grad_minus[index]) / (2 * h)])
        magnitudes = np.array([max(abs(loss_plus), abs(loss_minus)),
                               max(abs(grad_plus[index]), abs(grad_minus[index]))])
        return quotients, ROUNDING_ULPS * np.finfo(np.float64).eps * magnitudes / h

    def extrapolated(index, h):
        """(gradient, diagonal) Richardson-extrapolated from steps h and h/2, the two steps' gaps (truncation), and
        the rounding of the result: without it a step so small that both sides round to one loss value would look
        resolved, with a gradient of 0."""
        (coarse, coarse_rounding), (fine, fine_rounding) = central(index, h), central(index, h / 2)
        return (4 * fine - coarse) / 3, np.abs(coarse - fine), (4 * fine_rounding + coarse_rounding) / 3

    indices = [tuple(int(i) for i in index) for index in indices]
    found = [extrapolated(index, step) for index in indices]
    scale = np.max([np.abs(value) for value, _, _ in found], axis=0, initial=0.0)

    def excesses(value, gap, rounding):
        """Gradient's and diagonal's error bounds over their tolerances (resolved at most 1). Where every sampled
        value is 0 at step h, no step moves the loss: there is no rounding to fear."""
        return (gap + rounding * (scale > 0)) / (0.25 * (rtol * np.abs(value) + atol * scale) + 1e-300)

    def excess(attempt):
        return float(np.max(excesses(*attempt)))

    grad_fd, diag_fd, smooth = [], [], []
    for index, attempt in zip(indices, found):
        best, power, seen = attempt, 0, {0}  # the step is h · 10**power
        while excess(best) > 1 and len(seen) <= REFINEMENTS:
            _, gap, rounding = attempt
            worst = int(np.argmax(excesses(*attempt)))
            # longer steps where rounding dominates (a gradient far below the loss), shorter where the steps disagree
            power += 1 if rounding[worst] > gap[worst] and power < MAX_LONGER else -1
            if power in seen:
                break
            seen.add(power)
            attempt = extrapolated(index, step * 10.0**power)
            best = min(best, attempt, key=excess)
        value = best[0]
        grad_fd.append(value[0])
        diag_fd.append(value[1])
        smooth.append(excess(best) <= 1)
    variable.assign(base)
    return FiniteDifferences(np.array(grad_fd), np.array(diag_fd), np.array(smooth))


FROZEN_STEP = 1e-3  # of the largest logit change along the direction: the frozen function is smooth, so big steps are safe


def frozen_decision_derivatives(
    model: keras.Model,
    layer: str,
    indices: Sequence[tuple[int, ...]],
    *,
    loss: str,
    from_logits: bool = False,
    weight: str = "kernel",
    peel_softmax: bool = False,
    batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    model64: keras.Model | None = None,
) -> FiniteDifferences:
    """Float64 derivatives of the mean loss at each multi-index of the weight, with the suffix's decisions frozen.

    For a piecewise-linear suffix (every op after the target's stage piecewise linear, a final softmax
    folded into the loss), the loss on the current linear piece is ℓ(out₀ + J u t) along entry i, with
    u the entry's z-direction (z is affine in W) and J the suffix's Jacobian at the unperturbed point:
    every ReLU mask and max-pool routing frozen there. That function is smooth, equals the loss on the
    piece, and its second derivative at t = 0 is the Hessian entry. J u comes from one float64
    forward-mode product per entry (first derivatives only); the derivatives in t come from float64
    loss VALUES, Richardson-extrapolated over steps h and h/2 with h·max|J u| = ``FROZEN_STEP``.
    Shares no engine code. ``model64`` as for ``finite_difference_derivatives``.
    """
    model64 = model64 or float64_clone(model)
    target = located_target(model64, layer, weight)
    loss_fn = get_loss(loss, from_logits or peel_softmax)
    positions = [target.weight.flat_position(index) for index in indices]
    per_group = target.z_channels // target.weight.groups
    grads, curvatures, gaps, examples = np.zeros(len(indices)), np.zeros(len(indices)), np.zeros(len(indices)), 0
    for bx, by in batches():
        x, labels = tf.constant(bx, tf.float64), tf.constant(by)
        u = target.input_stage(x)
        z0 = target.pre_activation(u)
        patches = target.patches(u)
        for k, (f, o) in enumerate(positions):
            column = patch_column(patches, o // per_group, f)
            direction = tf.reshape(column[:, :, None] * tf.one_hot(o, target.z_channels, dtype=tf.float64), tf.shape(z0))
            delta = tf.zeros_like(z0)
            with tf.autodiff.ForwardAccumulator(delta, direction) as accumulator:
                with target.perturbed(lambda z: delta), (logits_output(model64) if peel_softmax else contextlib.nullcontext()):
                    out = model64(x, training=False)
            out0 = tf.reshape(out, (tf.shape(x)[0], -1))
            moved = tf.reshape(accumulator.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO), tf.shape(out0))
            largest = float(tf.reduce_max(tf.abs(moved)))
            if largest == 0.0:
                continue
            h = FROZEN_STEP / largest
            f0 = float(tf.reduce_sum(loss_fn.per_example(out0, labels)))
            at = {t: float(tf.reduce_sum(loss_fn.per_example(out0 + t * moved, labels))) for t in (h, -h, h / 2, -h / 2)}
            second = [(at[s] - 2 * f0 + at[-s]) / s**2 for s in (h, h / 2)]
            first = [(at[s] - at[-s]) / (2 * s) for s in (h, h / 2)]
            curvatures[k] += (4 * second[1] - second[0]) / 3
            grads[k] += (4 * first[1] - first[0]) / 3
            gaps[k] = max(gaps[k], abs(second[0] - second[1]) / max(abs(second[1]), 1e-300))
        examples += len(bx)
    return FiniteDifferences(grads / examples, curvatures / examples, gaps <= 1e-3)

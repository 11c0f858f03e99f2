"""Optimal Brain Damage against magnitude pruning on a digits CNN, without retraining.

Trains the ``digits_vgg`` CNN on the first 1,437 of scikit-learn's digits (seeded, as
``scripts/train_digits_cnn.py``), computes the exact Hessian diagonal of every kernel and bias over
those training digits with hessdiag (one shared pass of the factored engine), then zeroes 50, 70
and 90 % of all weights (kernels and biases together), once by the smallest global saliency
½·h·w² and once by the smallest |w|, and reports the held-out accuracy of each.

    .venv/bin/python scripts/example_pruning.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from train_digits_cnn import TRAIN, digits, train  # noqa: E402

LEVELS = (0.5, 0.7, 0.9)


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))


def pruned(model, scores: dict, weights: dict, level: float):
    """A copy of ``model`` with the ``level`` share of all weights of lowest score set to zero."""
    import keras

    every = np.concatenate([s.ravel() for s in scores.values()])
    threshold = np.quantile(every, level)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for target, values in weights.items():
        target_copy = next(v for v in copy.weights if v.path == target)
        target_copy.assign(np.where(scores[target] <= threshold, 0.0, values).astype("float32"))
    return copy


def main() -> None:
    from pipeline.curvature import batches_of
    from pipeline.curvature.network import NetworkCurvature
    from pipeline.curvature.target import resolve_targets
    from pipeline.losses import get_loss

    model, base = train()
    x, y = digits()
    started = time.perf_counter()
    targets = resolve_targets(model, "all")
    curvature = NetworkCurvature(model, targets, get_loss("sparse_categorical_crossentropy"))
    sums = curvature.shared_sums(batches_of(x[:TRAIN], y[:TRAIN], 128))
    seconds = time.perf_counter() - started
    weights = {t.variable.path: t.variable.numpy().astype(np.float64) for t in targets}
    diagonal = {t.variable.path: sums[t.name].hessian_diagonal / TRAIN for t in targets}
    saliency = {path: 0.5 * diagonal[path] * weights[path] ** 2 for path in weights}
    magnitude = {path: np.abs(values) for path, values in weights.items()}
    total = sum(v.size for v in weights.values())
    print(f"digits_vgg: {len(targets)} tensors, {total:,} weights; held-out accuracy {base:.4f} on {len(y) - TRAIN} digits;"
          f" Hessian diagonal of every tensor over {TRAIN} training digits in {seconds:.1f} s"
          f" (engines: {sorted({c.name for c in curvature.choices.values()})})")
    print()
    print("| weights pruned | OBD saliency ½·h·w² | magnitude |w| |")
    print("|---|---|---|")
    for level in LEVELS:
        by_saliency = accuracy(pruned(model, saliency, weights, level), x[TRAIN:], y[TRAIN:])
        by_magnitude = accuracy(pruned(model, magnitude, weights, level), x[TRAIN:], y[TRAIN:])
        print(f"| {level:.0%} | {by_saliency:.4f} | {by_magnitude:.4f} |")


if __name__ == "__main__":
    main()

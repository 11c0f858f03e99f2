"""What one shared pass saves: ``targets: all`` against each tensor computed alone, summed.

On the CIFAR-size VGG with 100 classes (``cifar_vgg100``, seeded), the factored engine computes
every kernel and bias in one pass per example block, the factor columns going down once past
every tensor; alone, each tensor's pass goes down to that tensor only. Both are timed in this
process after a warm-up call (tracing excluded), best of ``--rounds``, and the script prints the
ratio and checks that both give the same values.

    .venv/bin/python scripts/bench_sharing.py [--examples 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def cifar_vgg100_all(examples: int) -> tuple:
    """(``cifar_vgg100`` seeded, ``examples`` normal-random images, random labels, its loss, every tensor), with
    TensorFlow on every CPU."""
    from pipeline.curvature.target import resolve_targets
    from pipeline.losses import get_loss
    from pipeline.model import build_model
    from pipeline.worker import configure_tensorflow

    configure_tensorflow(os.cpu_count())
    model = build_model("cifar_vgg100", seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, 100, size=examples)
    return model, x, y, get_loss("sparse_categorical_crossentropy", from_logits=True), resolve_targets(model, "all")


def timed(network, batches, rounds: int) -> tuple[float, dict]:
    """Best seconds of ``network.shared_sums`` over ``rounds`` calls after a warm-up call, and its sums."""
    sums = network.shared_sums(batches[:1])
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        sums = network.shared_sums(batches)
        best = min(best, time.perf_counter() - started)
    return best, sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import platform

    from pipeline.curvature.network import NetworkCurvature

    model, x, y, loss, targets = cifar_vgg100_all(args.examples)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.examples, args.batch)]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; cifar_vgg100, {len(targets)} tensors,"
          f" {args.examples} examples in batches of {args.batch}")
    shared_seconds, shared = timed(NetworkCurvature(model, targets, loss), batches, args.rounds)
    alone_seconds, worst = 0.0, 0.0
    for target in targets:
        seconds, alone = timed(NetworkCurvature(model, [target], loss), batches, args.rounds)
        alone_seconds += seconds
        for field in ("gradient", "hessian_diagonal"):
            mine, theirs = getattr(shared[target.name], field), getattr(alone[target.name], field)
            worst = max(worst, float(np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-30)))
        print(f"  {target.name:24s} alone {seconds:7.2f} s")
    print(f"targets: all {shared_seconds:.2f} s | each alone, summed {alone_seconds:.2f} s"
          f" | ratio {shared_seconds / alone_seconds:.2f} | largest difference {worst:.1e} of the largest entry")


if __name__ == "__main__":
    main()

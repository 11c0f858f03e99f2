"""What each fold form costs, per stage of ``cifar_vgg100`` (100 classes, seeded), on the columns of one real pass.

For every stage with a support (the factored pass finds it for losses of 64 or more classes) it times, on one
chunk of columns of ``--examples`` examples, the pieces of the three forms in ``pipeline.curvature.folds``:
products over all positions; the values on the support (compiled by XLA, against the graph's transpose and gather)
with the count of entries outside; the Gram update; the support products; and, once per example chunk, the Gram
products and the gathered patches. It prints each form's predicted seconds for a whole example chunk (every column
chunk, then the once-per-chunk work), the form ``stage_fold`` takes, and the cost constants measured against those
``folds`` uses: a gathered product in multiply-adds of the dense products, and a gathered column entry in the same
units.

    .venv/bin/python scripts/bench_folds.py [--examples 32] [--column-chunk 16]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sharing import cifar_vgg100_all  # noqa: E402


def best_seconds(fn, *args, calls: int = 5, rounds: int = 3) -> float:
    """Best mean seconds of ``calls`` calls over ``rounds``, after two warm-up calls (tracing, compiling)."""
    fn(*args)
    fn(*args)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            result = fn(*args)
        (result[0] if isinstance(result, tuple) else result).numpy()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--column-chunk", type=int, default=16)
    args = parser.parse_args()

    import platform

    import tensorflow as tf

    from pipeline.curvature import folds
    from pipeline.curvature.columns import support_positions
    from pipeline.curvature.network import NetworkCurvature

    model, x, y, loss, targets = cifar_vgg100_all(args.examples)
    shared = NetworkCurvature(model, targets, loss, column_chunk=args.column_chunk).shared
    forward = shared._forward(tf.constant(x), tf.constant(y))
    patches, reach = shared._patches(forward), shared._reach(forward)
    captured = shared._backward(forward, shared._column_chunks()[0])
    chosen = shared._folds(patches, reach, args.examples)
    chunks = len(shared._column_chunks())
    graph_values = tf.function(folds.support_values)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; cifar_vgg100, {args.examples} examples,"
          f" {chunks} chunks of {args.column_chunk} columns; ms per chunk, then s per example chunk by form")
    print(f"{'stage':14s} {'S':>5s} {'A':>4s} {'F':>4s} {'O':>3s} | {'dense':>6s} {'values':>6s} {'graph':>6s}"
          f" {'gram+':>6s} {'supp.':>6s} {'gather':>6s} {'gram=':>6s} | {'products':>8s} {'Gram':>6s} {'support':>7s}"
          f" | taken | gathered product, entry")
    for stage in shared.stages:
        if reach.get(stage.key) is None:
            continue
        kernel = stage.targets[0]
        columns, kernel_patches = stage.columns(captured), patches[kernel.name]
        active = tf.transpose(kernel.flat_columns(reach[stage.key])[0] > 0, (0, 2, 1))
        positions = support_positions(active)
        count, support = columns.shape, int(positions.shape[-1])
        values, _ = folds._on_support(columns, positions)
        gathered = folds._gathered_patches(kernel_patches, positions)
        gram = folds._gram_update(tf.zeros((*positions.shape, support)), values)
        ms = {
            "dense": best_seconds(folds._dense_products, kernel_patches, columns),
            "values": best_seconds(folds._on_support, columns, positions),
            "graph": best_seconds(graph_values, columns, positions),
            "gram+": best_seconds(folds._gram_update, gram, values),
            "supp.": best_seconds(folds._support_products, values, gathered),
            "gather": best_seconds(folds._gathered_patches, kernel_patches, positions, calls=2),
            "gram=": best_seconds(folds._gram_products, kernel_patches, positions, gram, calls=2),
        }
        forms = {
            "products": chunks * ms["dense"],
            "Gram": chunks * (ms["values"] + ms["gram+"]) + ms["gram="],
            "support": chunks * (ms["values"] + ms["supp."]) + ms["gather"],
        }
        dense_mac = ms["dense"] / (count[0] * count[1] * count[2] * count[3] * kernel.features)
        gathered_mac = ms["supp."] / (count[0] * count[1] * count[3] * support * kernel.features)
        entry = ms["values"] / math.prod(count)
        taken = type(chosen[stage.key]).__name__.replace("Fold", "")
        print(f"{stage.layer.name:14s} {count[2]:5d} {support:4d} {kernel.features:4d} {count[3]:3d} | "
              + " ".join(f"{1e3 * ms[k]:6.1f}" for k in ms)
              + " | " + f"{forms['products']:8.2f} {forms['Gram']:6.2f} {forms['support']:7.2f} | {taken:13s} |"
              f" {gathered_mac / dense_mac:4.1f}, {entry / dense_mac:4.0f}")
    print(f"folds uses: gathered product {folds.GATHERED_PRODUCT_COST}, entry {folds.GATHER_COST}"
          " (multiply-adds of the dense products)")


if __name__ == "__main__":
    main()

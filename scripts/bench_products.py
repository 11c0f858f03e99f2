"""The fold's two layouts of per-column weight gradients: one product per column and example, or per example.

For shared patches P (N, S, F) and a chunk of columns (C, N, S, O), ``column_square_sums`` needs
Σ_{c,n} (Pᵀ v_c)². Per column and example it is an F x S times S x O product, narrow for few channels;
per example, after transposing the columns, an F x S times S x (C·O) one. The script times both
over a grid of channels O, features F and positions S (N·S fixed), best of ``--rounds`` after a
warm-up, and prints the per-example layout's time over the per-column one, with the layout
``narrow_products`` picks.

    .venv/bin/python scripts/bench_products.py [--columns 16] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def best_seconds(function, arguments, rounds: int) -> float:
    function(*arguments).numpy()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        function(*arguments).numpy()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, default=16)
    parser.add_argument("--entries", type=int, default=32 * 1024, help="examples x positions, fixed over the grid")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import tensorflow as tf

    from pipeline.curvature.patches import column_gradients, narrow_products, per_example_square_sums
    from pipeline.worker import configure_tensorflow

    configure_tensorflow(os.cpu_count())
    tf.random.set_seed(0)  # the project's deterministic ops ask for one
    per_column = tf.function(lambda p, c: tf.reduce_sum(tf.square(column_gradients(p, c)), axis=(0, 1)))
    per_example = tf.function(per_example_square_sums)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {args.columns} columns, {args.entries} example positions")
    print("| positions | channels | features | per column (s) | per example (s) | ratio | narrow_products |")
    print("|---|---|---|---|---|---|---|")
    for positions in (256, 1024, 4096):
        examples = max(1, args.entries // positions)
        for channels in (16, 32, 64, 128):
            for features in (27, 144, 288, 576):
                patches = tf.random.normal((examples, positions, features))
                columns = tf.random.normal((args.columns, examples, positions, channels))
                a = best_seconds(per_column, (patches, columns), args.rounds)
                b = best_seconds(per_example, (patches, columns), args.rounds)
                print(f"| {positions} | {channels} | {features} | {a:.4f} | {b:.4f} | {b / a:.2f} |"
                      f" {narrow_products(channels, features)} |", flush=True)


if __name__ == "__main__":
    main()

"""An Embedding's patches held as token codes against the dense one-hot patches, same run: the factored fold of one
column chunk (Σ_c (Pᵀ v_c)²) and the gradient (Pᵀ g), per vocabulary size; then a whole factored run on a text
classifier with a large vocabulary.

    .venv/bin/python scripts/bench_embedding.py [--vocabularies 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import timeit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls after a warm-up one (which traces)."""
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabularies", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens per example")
    parser.add_argument("--channels", type=int, default=4, help="embedding channels per product call")
    parser.add_argument("--columns", type=int, default=16)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.curvature import layer_derivatives
    from pipeline.curvature.patches import OneHotPatches, column_square_sums, contract

    rng = np.random.default_rng(0)
    n, s, o, c = args.examples, args.length, args.channels, args.columns
    columns = tf.constant(rng.normal(size=(c, n, s, o)).astype("float32"))
    folds, gradients = tf.function(column_square_sums), tf.function(contract)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {n} examples of {s} tokens, {o} channels, {c} columns")
    print("| vocabulary | fold, dense one-hot | fold, codes | ratio | gradient, dense | gradient, codes | largest difference |")
    print("|---|---|---|---|---|---|---|")
    for vocabulary in args.vocabularies:
        codes = tf.constant(rng.integers(0, vocabulary, size=(n, s)).astype("int32"))
        coded = OneHotPatches(codes, vocabulary, tf.float32)
        dense = coded.dense()[:, :, 0]
        timed = {name: best_seconds(lambda: fn(p, arg).numpy())
                 for name, (fn, p, arg) in {"fold dense": (folds, dense, columns), "fold codes": (folds, coded, columns),
                                            "grad dense": (gradients, dense, columns[0]), "grad codes": (gradients, coded, columns[0])}.items()}
        a, b = folds(dense, columns).numpy(), folds(coded, columns).numpy()
        difference = np.abs(a - b).max() / np.abs(a).max()
        print(f"| {vocabulary:,} | {timed['fold dense'] * 1e3:.1f} ms | {timed['fold codes'] * 1e3:.2f} ms"
              f" | {timed['fold dense'] / timed['fold codes']:.0f}x | {timed['grad dense'] * 1e3:.1f} ms"
              f" | {timed['grad codes'] * 1e3:.2f} ms | {difference:.1e} |", flush=True)

    vocabulary, classes = max(args.vocabularies) * 10, 100
    keras.utils.set_random_seed(0)
    inp = keras.Input((s,), dtype="int32")
    h = keras.layers.Embedding(vocabulary, 32, name="embedding")(inp)
    h = keras.layers.Dense(64, activation="relu")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, keras.layers.Dense(classes)(h))
    x = rng.integers(0, vocabulary, size=(n, s)).astype("int32")
    y = rng.integers(0, classes, n)
    options = dict(loss="sparse_categorical_crossentropy", from_logits=True, weight="embeddings", engine="factored", batch_size=n)
    result = layer_derivatives(model, "embedding", x, y, **options)
    started = time.perf_counter()
    result = layer_derivatives(model, "embedding", x, y, **options)
    seconds = time.perf_counter() - started
    rows = int(np.count_nonzero(np.abs(result.hessian_diagonal).sum(axis=1)))
    print(f"text classifier: Embedding({vocabulary:,}, 32), {n} examples of {s} tokens, {classes} classes, factored engine"
          f" (warm): {seconds:.2f} s, {rows} nonzero rows of {vocabulary:,} ({len(np.unique(x))} distinct tokens)")


if __name__ == "__main__":
    main()

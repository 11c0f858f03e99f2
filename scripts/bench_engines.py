"""Per-entry cost of the Hessian-diagonal engines on a CIFAR-size VGG, against baselines from the same run.

Prints: one suffix gradient (dL/dz for the batch), the exact engine per
Hessian-diagonal entry, the naive per-parameter loop (grad of grad w.r.t. W,
one entry at a time) per entry, the factored engine per entry, and ratios.

    .venv/bin/python scripts/bench_engines.py [--batch 16] [--entries 1024] [--naive 24]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.curvature import LayerCurvature  # noqa: E402
from pipeline.curvature.exact import entry_curvatures  # noqa: E402
from pipeline.model import build_model  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--entries", type=int, default=1024, help="entries timed for the exact engine")
    parser.add_argument("--chunk", type=int, default=256, help="exact-engine entries vectorized per call")
    parser.add_argument("--naive", type=int, default=24, help="entries timed for the naive loop")
    parser.add_argument("--xla", action="store_true", help="also time both engines compiled with XLA (jit_compile)")
    args = parser.parse_args()

    model = build_model("cifar_vgg", seed=0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(args.batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, args.batch))
    exact = LayerCurvature(model, "block2_conv1", loss="sparse_categorical_crossentropy", from_logits=True, engine="exact", chunk_size=args.chunk)
    factored = LayerCurvature(model, "block2_conv1", loss="sparse_categorical_crossentropy", from_logits=True, engine="factored")
    kernel = model.get_layer("block2_conv1").kernel
    size = int(np.prod(kernel.shape))
    features = size // kernel.shape[-1]

    suffix_gradient = best_of(lambda: exact._gradient(x, y, tf.constant(0), tf.constant(kernel.shape[-1]))[0].numpy())

    ids = tf.range(args.chunk, dtype=tf.int32)
    p_ids, o_ids = ids % features, ids // features
    calls = max(1, args.entries // args.chunk)

    curvatures = tf.function(lambda x, y, p, o: entry_curvatures(exact.problem, x, y, p, o))

    def exact_entries():
        for _ in range(calls):
            curvatures(x, y, p_ids, o_ids).numpy()

    exact_per_entry = best_of(exact_entries, repeats=2) / (calls * args.chunk)

    @tf.function
    def naive_entry(flat_index):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = tf.reduce_sum(exact.loss.per_example(model(x, training=False), y))
            g = tf.reshape(inner.gradient(value, kernel), [-1])[flat_index]
        return tf.reshape(outer.gradient(g, kernel), [-1])[flat_index]

    def naive_entries():
        for j in range(args.naive):
            naive_entry(tf.constant(j)).numpy()

    def textbook_entries():
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                value = tf.reduce_sum(exact.loss.per_example(model(x, training=False), y))
            g = tf.reshape(inner.gradient(value, kernel), [-1])
            entries = [g[j] for j in range(args.naive)]
        for j in range(args.naive):
            tf.reshape(outer.gradient(entries[j], kernel), [-1])[j].numpy()

    naive_per_entry = best_of(naive_entries, repeats=2) / args.naive
    textbook_per_entry = best_of(textbook_entries, repeats=2) / args.naive
    factored_total = best_of(lambda: factored.engine.batch_diagonal(x, y, slice(0, kernel.shape[-1])), repeats=2)
    factored_per_entry = factored_total / size

    if args.xla:
        from pipeline.curvature.columns import factor_columns

        problem = exact.problem
        xla_entries = tf.function(lambda x, y, p, o: entry_curvatures(problem, x, y, p, o), jit_compile=True)
        xla_exact = best_of(lambda: [xla_entries(x, y, p_ids, o_ids).numpy() for _ in range(calls)], repeats=2)
        factored.engine._columns = tf.function(
            lambda x, y, ids, start, stop: factor_columns(problem, x, y, ids, start, stop, False), jit_compile=True
        )
        xla_factored = best_of(lambda: factored.engine.batch_diagonal(x, y, slice(0, kernel.shape[-1])), repeats=2)
        xla_lines = [
            f"XLA exact engine, per entry:               {xla_exact / (calls * args.chunk) * 1e3:9.3f} ms  ({exact_per_entry * calls * args.chunk / xla_exact:.2f}x the speed without XLA)",
            f"XLA factored engine, whole diagonal:       {xla_factored:9.3f} s   ({factored_total / xla_factored:.2f}x the speed without XLA)",
        ]

    # the naive entries double as a correctness check of the exact engine
    check = np.array([float(naive_entry(p_ids[j] * kernel.shape[-1] + o_ids[j])) for j in range(4)])
    engine_values = curvatures(x, y, p_ids[:4], o_ids[:4]).numpy()

    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, TensorFlow {tf.__version__}, devices {[d.device_type for d in tf.config.list_physical_devices()]}")
    print(f"model: cifar_vgg, target conv {tuple(kernel.shape)} ({size} entries), batch {args.batch}")
    print(f"one suffix gradient (dL/dz, whole batch):  {suffix_gradient * 1e3:9.3f} ms")
    print(f"exact engine, per entry:                   {exact_per_entry * 1e3:9.3f} ms  ({exact_per_entry / suffix_gradient:.2f}x one suffix gradient)")
    print(f"textbook eager loop (tape.gradient per entry): {textbook_per_entry * 1e3:9.3f} ms  ({textbook_per_entry / suffix_gradient:.2f}x one suffix gradient)")
    print(f"compiled grad-of-grad per entry (tf.function): {naive_per_entry * 1e3:9.3f} ms  ({naive_per_entry / suffix_gradient:.2f}x one suffix gradient)")
    print(f"factored engine, per entry:                {factored_per_entry * 1e6:9.3f} us  (whole diagonal {factored_total:.2f} s)")
    print(f"exact engine vs textbook eager loop:       {textbook_per_entry / exact_per_entry:9.1f}x faster")
    print(f"exact engine vs compiled grad-of-grad:     {naive_per_entry / exact_per_entry:9.1f}x faster")
    print(f"factored vs exact engine:                  {exact_per_entry / factored_per_entry:9.0f}x faster")
    print(f"exact engine vs naive on 4 entries, max rel diff: {np.max(np.abs(engine_values - check) / np.abs(check)):.1e}")
    if args.xla:
        print("\n".join(xla_lines))


if __name__ == "__main__":
    main()

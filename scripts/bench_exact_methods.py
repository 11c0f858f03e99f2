"""Exact engine: block method (one HVP per output position) against the entry method (one per entry),
and the cost of a repeated ``layer_derivatives`` call against the warm compute, measured in one run.

    .venv/bin/python scripts/bench_exact_methods.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench_engines import best_of  # noqa: E402  (scripts/ is on the path when run as a script)
from pipeline.curvature import LayerCurvature, batches_of, layer_derivatives  # noqa: E402
from pipeline.worker import configure_tensorflow  # noqa: E402

L = keras.layers


def tanh_mlp() -> keras.Model:
    """32 -> 128 tanh -> target 128x128 tanh -> 64 tanh -> 10."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((32,))
    h = L.Dense(128, activation="tanh")(inp)
    h = L.Dense(128, activation="tanh", name="target")(h)
    return keras.Model(inp, L.Dense(10)(L.Dense(64, activation="tanh")(h)))


def tanh_cnn() -> keras.Model:
    """8x8 inputs, target 3x3x16x32 (tanh)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(16, 3, padding="same", activation="tanh")(inp)
    h = L.Conv2D(32, 3, padding="same", activation="tanh", name="target")(h)
    return keras.Model(inp, L.Dense(10)(L.Flatten()(L.AveragePooling2D(2)(h))))


def cases():
    rng = np.random.default_rng(0)
    for name, build, shape, batch in (("tanh MLP, Dense target 128x128", tanh_mlp, (32,), 32),
                                      ("tanh CNN, Conv2D target 3x3x16x32", tanh_cnn, (8, 8, 3), 8)):
        x = rng.normal(size=(batch, *shape)).astype("float32")
        yield name, build(), x, rng.integers(0, 10, batch)


def repeated_call_cost() -> None:
    """A second ``layer_derivatives`` call with the same model against the warm compute."""
    configure_tensorflow(2)
    for name, model, x, y in cases():
        options = dict(loss="sparse_categorical_crossentropy", from_logits=True, engine="exact", chunk_size=256)
        curvature = LayerCurvature(model, "target", **options)
        warm = best_of(lambda: curvature.compute(batches_of(x, y, len(x))))
        again = best_of(lambda: layer_derivatives(model, "target", x, y, batch_size=len(x), **options))  # every call after the first
        print(f"{name}: repeated layer_derivatives call {again:.3f} s = {again / warm:.2f}x the warm compute {warm:.3f} s")


def main() -> None:
    configure_tensorflow(2)
    for name, model, x, y in cases():
        curvature = LayerCurvature(model, "target", loss="sparse_categorical_crossentropy", from_logits=True, engine="exact", chunk_size=256)
        batches = batches_of(x, y, len(x))
        chosen = curvature.engine.method
        seconds, results = {}, {}
        for method in ("block", "entry"):
            curvature.engine.method = method
            seconds[method] = best_of(lambda: curvature.compute(batches), repeats=1 if method == "entry" else 3)
            results[method] = curvature.compute(batches).hessian_diagonal
        curvature.engine.method = chosen
        agree = np.abs(results["block"] - results["entry"]).max() / np.abs(results["entry"]).max()
        print(f"{name}, batch {len(x)}: block {seconds['block']:.3f} s, entry {seconds['entry']:.3f} s,"
              f" entry / block {seconds['entry'] / seconds['block']:.1f}x; chosen: {chosen}; max difference {agree:.1e} of the largest entry")
    repeated_call_cost()


if __name__ == "__main__":
    main()

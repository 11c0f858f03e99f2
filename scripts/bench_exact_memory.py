"""Exact engine: how a call's peak memory grows with its examples and product directions, against the prediction
that `compute.memory_gb` plans by (``pipeline.curvature.exact.ProductMemory``).

Each (case, precision, examples, directions) runs in its own process, which builds the model, traces the products and
runs calls of that size; its peak resident memory is recorded. Differences between processes that differ only in the
directions (or only in the examples) cancel what does not grow with them (TensorFlow, the model, tracing):

    growth per direction and example = (peak(n, k1) - peak(n, k0)) / (n (k1 - k0))

printed as a multiple of 4 or 8 bytes times the floats of z and of the suffix's outputs per example, the unit in which
``DIRECTION_COPIES`` is set, with the prediction's bytes beside each peak.

    .venv/bin/python scripts/bench_exact_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXAMPLES = (4, 16)
DIRECTIONS = (8, 64)


def tanh_cnn():
    """32x32x3 inputs, target Conv2D 3x3x16x32 (tanh), then a tanh conv and a dense head: the entry method."""
    import keras

    L = keras.layers
    inp = keras.Input((32, 32, 3))
    h = L.Conv2D(16, 3, padding="same", activation="tanh")(inp)
    h = L.Conv2D(32, 3, padding="same", activation="tanh", name="target")(h)
    h = L.Conv2D(32, 3, padding="same", activation="tanh")(h)
    return keras.Model(inp, L.Dense(10)(L.Flatten()(L.AveragePooling2D(4)(h))))


def tanh_sequence():
    """Sequences of 64 positions x 256 features -> 256 tanh -> target Dense 256x256 (tanh) -> 64 tanh -> pooled -> 10:
    the block method (64 positions, fewer than its 256 features)."""
    import keras

    L = keras.layers
    inp = keras.Input((64, 256))
    h = L.Dense(256, activation="tanh")(inp)
    h = L.Dense(256, activation="tanh", name="target")(h)
    return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling1D()(L.Dense(64, activation="tanh")(h))))


def gelu_block():
    """A ConvNeXt-like block after the target: depthwise 7x7, LayerNorm, GELU, a sigmoid gate and a residual."""
    import keras

    L = keras.layers
    inp = keras.Input((16, 16, 3))
    z = L.Conv2D(32, 3, padding="same", name="target")(inp)
    h = L.DepthwiseConv2D(7, padding="same")(z)
    h = L.LayerNormalization()(h)
    h = L.Dense(64, activation="gelu")(h)
    h = L.Dense(32)(h)
    gate = L.Dense(32, activation="sigmoid")(L.GlobalAveragePooling2D(keepdims=True)(h))
    h = L.Add()([z, L.Multiply()([h, gate])])
    return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(h)))


def cifar_vgg():
    """The project's CIFAR-size VGG (ReLU, max-pooling): targets ``block1_conv2`` (entry method) and
    ``block2_conv1`` (block method, 256 positions against 288 features)."""
    from pipeline.model import build_model

    return build_model("cifar_vgg", seed=0)


CASES = {"tanh_cnn": (tanh_cnn, "target"), "tanh_sequence": (tanh_sequence, "target"),
         "gelu_block": (gelu_block, "target"), "vgg_block1_conv2": (cifar_vgg, "block1_conv2"),
         "vgg_block2_conv1": (cifar_vgg, "block2_conv1")}


def child(case: str, precision: str, examples: int, directions: int) -> None:
    """Run calls of ``directions`` products over ``examples`` examples; print the peak and the prediction as JSON."""
    import keras
    import numpy as np

    from pipeline.curvature import LayerCurvature
    from pipeline.worker import configure_tensorflow

    configure_tensorflow(2)
    keras.utils.set_random_seed(0)
    build, layer = CASES[case]
    model = build()
    curvature = LayerCurvature(model, layer, loss="sparse_categorical_crossentropy", from_logits=True, engine="exact",
                               chunk_size=directions, precision=precision, memory_budget=1 << 40)
    engine = curvature.engine
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, 10, examples)
    inner = engine.positions if engine.method == "block" else engine.features
    channels = slice(0, -(-2 * directions // inner))  # at least two full calls
    engine.batch_derivatives(x, y, channels)
    engine.batch_derivatives(x, y, channels)
    memory = engine.memory
    print(json.dumps({
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "predicted": memory.bytes(examples, directions),
        "unit": memory.bytes_per_float * memory.direction_floats // _copies(),
        "method": engine.method, "compiler": engine.compiler,
    }))


def _copies() -> int:
    from pipeline.curvature.exact import DIRECTION_COPIES

    return DIRECTION_COPIES


def measure(case: str, precision: str, examples: int, directions: int) -> dict:
    command = [sys.executable, __file__, "--child", case, precision, str(examples), str(directions)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    if args.child:
        case, precision, examples, directions = args.child
        child(case, precision, int(examples), int(directions))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; DIRECTION_COPIES {_copies()}")
    print("| case | precision | method, compiler | examples x directions | peak GiB | predicted GiB "
          "| growth per direction and example, in units of (z + suffix) floats |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        for precision in ("float32", "float64"):
            peaks = {(n, k): measure(case, precision, n, k) for n in EXAMPLES for k in DIRECTIONS}
            (_, n1), (k0, k1) = EXAMPLES, DIRECTIONS
            unit = peaks[(n1, k1)]["unit"]
            for (n, k), found in peaks.items():
                growth = ""
                if k == k1:
                    per = (found["peak"] - peaks[(n, k0)]["peak"]) / (n * (k1 - k0))
                    growth = f"{per / unit:.1f}"
                print(f"| {case} | {precision} | {found['method']}, {found['compiler']} | {n} x {k} |"
                      f" {found['peak'] / 2**30:.2f} | {found['predicted'] / 2**30:.2f} | {growth} |", flush=True)


if __name__ == "__main__":
    main()

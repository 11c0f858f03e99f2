"""Run hessdiag on the keras.applications families that build offline: early, middle and late targets of each kind.

For each architecture (``weights=None``, 1000 classes, the smallest input it accepts, seeded, its
BatchNormalization statistics set from 16 normal-random images as a trained network's would be), the
targets are the first, middle and last layer of each target kind it contains (Conv2D, grouped
Conv2D, DepthwiseConv2D, SeparableConv2D, Dense, BatchNormalization, LayerNormalization: their
kernels, or ``gamma`` for the normalizations). Each architecture is one ``hessdiag run`` (local
executor or ``--workers`` Ray actors, 2 synthetic examples by default, ``engine: auto``, validation with at least 2 samples per tensor)
of a saved ``.keras`` file; the script prints a Markdown table: architecture | target | kind |
engine | column method | seconds per example | validation.

    .venv/bin/python scripts/survey_applications.py [--only ResNet50 --only MobileNetV2] [--out survey/]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported

FAMILIES = {  # name -> smallest square input accepted with include_top=True
    "VGG16": 32, "ResNet50": 32, "ResNet50V2": 32, "MobileNet": 32, "MobileNetV2": 32, "MobileNetV3Small": 32,
    "MobileNetV3Large": 32, "DenseNet121": 32, "InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71,
    "EfficientNetB0": 32, "EfficientNetV2B0": 32, "ConvNeXtTiny": 32, "NASNetMobile": 32,
}


def kind_of(layer) -> str | None:
    import keras

    L = keras.layers
    if isinstance(layer, L.SeparableConv2D):
        return "SeparableConv2D"
    if isinstance(layer, L.DepthwiseConv2D):
        return "DepthwiseConv2D"
    if isinstance(layer, L.Conv2D):
        return "Conv2D (grouped)" if layer.groups > 1 else "Conv2D"
    if isinstance(layer, L.Dense):
        return "Dense"
    if isinstance(layer, L.BatchNormalization) and layer.scale:
        return "BatchNormalization"
    if isinstance(layer, L.LayerNormalization):
        return "LayerNormalization"
    return None


WEIGHT = {"SeparableConv2D": "depthwise_kernel", "BatchNormalization": "gamma", "LayerNormalization": "gamma"}


def targets_of(model) -> list[tuple[str, str, str]]:
    """(layer path, weight, kind): first, middle and last of each kind, in model order."""
    from pipeline.curvature.target import layer_paths

    by_kind: dict[str, list[str]] = {}
    for path, layer in layer_paths(model):
        kind = kind_of(layer)
        if kind:
            by_kind.setdefault(kind, []).append(path)
    chosen = []
    for kind, paths in by_kind.items():
        picks = sorted({0, len(paths) // 2, len(paths) - 1})
        chosen += [(paths[i], WEIGHT.get(kind, "kernel"), kind) for i in picks]
    order = {path: i for i, (path, _) in enumerate(layer_paths(model))}
    return sorted(chosen, key=lambda t: order[t[0]])


def set_batch_norm_statistics(model, size: int, images: int = 16) -> None:
    """Each BatchNormalization's moving mean and variance from a batch of normal-random images, as a trained
    network's would be. With Keras' initial statistics (mean 0, variance 1) the activations of a random MobileNet
    shrink layer after layer, until its Hessian diagonal (about 1e-42 at 32x32) is below float32's range."""
    import keras
    import numpy as np

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # one training-mode call sets the statistics to the batch's
    model(np.random.default_rng(1).normal(size=(images, size, size, 3)).astype("float32"), training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def survey(name: str, size: int, root: str, examples: int = 2, timeout: float = 1800, workers: int = 1,
           precision: str = "float32", chunk_size: int = 128, resume: bool = False) -> list[dict]:
    import keras

    from pipeline.model import build_model  # noqa: F401  (the project's Keras settings)

    path = os.path.join(root, f"{name}.keras")
    resume = resume and os.path.exists(path)
    if resume:  # the saved model, so the store's fingerprint matches and its finished units are kept
        model = keras.models.load_model(path, compile=False)
    else:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=1000)
        set_batch_norm_statistics(model, size)
        model.save(path)
    chosen = targets_of(model)
    config = {
        "output": os.path.join(root, f"{name}.zarr"),
        "model": {"source": "keras_file", "path": path},
        "targets": [{"layer": layer, "weight": weight} for layer, weight, _ in chosen],
        "data": {"source": "synthetic", "num_examples": examples, "batch_size": examples, "seed": 0},
        "loss": {"name": "sparse_categorical_crossentropy"},
        "compute": {"engine": "auto", "example_block": examples, "shard_size": 64, "column_chunk": 50, "memory_gb": 6,
                    "precision": precision, "chunk_size": chunk_size},
        "cluster": {"executor": "local"} if workers == 1 else {"executor": "ray", "num_workers": workers, "cpus_per_worker": 1},
        "validation": {"samples": 2 * len(chosen)},
    }
    config_path = os.path.join(root, f"{name}.yaml")
    with open(config_path, "w") as handle:
        yaml.safe_dump(config, handle)
    started = time.perf_counter()
    try:
        command = [sys.executable, "-m", "pipeline", "run", config_path, *([] if resume else ["--overwrite"])]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        code, error = done.returncode, (done.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        code, error = None, f"not done after {timeout:.0f} s"
    wall = time.perf_counter() - started
    rows = []
    if code not in (0, 3):
        return [{"architecture": name, "target": f"{layer}/{weight}", "kind": kind, "engine": "—", "column_method": "—",
                 "seconds_per_example": None, "validation": f"exit {code}: {error[:160]}", "wall_seconds": wall} for layer, weight, kind in chosen]
    import pipeline

    result = pipeline.load_result(config["output"])
    units = {}
    from pipeline.store import ResultStore

    for record in ResultStore.open(config["output"], mode="r").unit_records().values():
        units[record["chain"]] = units.get(record["chain"], 0.0) + record["seconds"]
    for (layer, weight, kind), (tensor_name, tensor) in zip(chosen, result.items()):
        check = tensor.attrs.get("validation", {})
        engine = tensor.attrs["engine"]
        index = result.attrs["targets"].index(tensor_name)
        seconds = units.get("s") if engine == "factored" else sum(v for k, v in units.items() if k.startswith(f"t{index:04d}-"))
        rows.append({"architecture": name, "target": tensor_name, "kind": kind, "engine": engine,
                     "column_method": result.attrs.get("column_method") if engine == "factored" else "—",
                     "seconds_per_example": None if seconds is None else seconds / examples,
                     "validation": f"{'passed' if check.get('passed') else 'FAILED'}, {check.get('samples')} samples,"
                                   f" {check.get('reference')}, max rel. error {check.get('max_rel_error', 0):.1e}",
                     "wall_seconds": wall})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="architectures to survey (default: all)")
    parser.add_argument("--out", default="survey")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per architecture")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors (1: the local executor); each traces the exact"
                        " engine's products of the tensors it runs")
    parser.add_argument("--precision", choices=["float32", "float64"], default="float32",
                        help="compute.precision: the exact engine's arithmetic")
    parser.add_argument("--chunk-size", type=int, default=128,
                        help="compute.chunk_size: Hessian-vector products vectorized per call (memory grows with it)")
    parser.add_argument("--resume", action="store_true", help="continue the stores a stopped survey left in --out"
                        " (their done units are kept; the seconds per example count every unit)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.only or list(FAMILIES):
        found = survey(name, FAMILIES[name], args.out, args.examples, args.timeout, args.workers, args.precision,
                       args.chunk_size, args.resume)
        rows += found
        with open(os.path.join(args.out, f"{name}.json"), "w") as handle:
            json.dump(found, handle, indent=1)
        print(f"{name}: done in {found[0].get('wall_seconds', 0):.0f} s", file=sys.stderr, flush=True)
    print("| architecture | target | kind | engine | column method | seconds per example | validation |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        seconds = "—" if row["seconds_per_example"] is None else f"{row['seconds_per_example']:.1f}"
        shared = " (shared)" if row["engine"] == "factored" else ""
        print(f"| {row['architecture']} | `{row['target']}` | {row['kind']} | {row['engine']} | {row['column_method']}"
              f" | {seconds}{shared} | {row['validation']} |")


if __name__ == "__main__":
    main()

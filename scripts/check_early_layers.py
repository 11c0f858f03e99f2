"""Validation on the early layers of real CNNs: correct results pass, results 1 % off fail.

Xception ``block1_conv2`` and MobileNetV2 ``Conv1`` (``keras.applications``, ``weights=None``,
seeded, 1000 classes, the smallest input each accepts) sit below thousands of ReLU/ReLU6 kinks,
where finite differences of the loss itself cannot resolve an entry. Each is run with
``hessdiag run`` (``engine: auto``) from a saved ``.keras`` file; then every stored diagonal is
scaled by 1.01 (checksums rewritten to match, so only the values are wrong) and ``hessdiag validate``
must fail it (exit 3).

    .venv/bin/python scripts/check_early_layers.py [--out early/]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import yaml

CASES = {"Xception": (71, "block1_conv2"), "MobileNetV2": (32, "Conv1")}


def scale_stored_diagonals(path: str, factor: float) -> None:
    from pipeline.store import ResultStore

    store = ResultStore.open(path)
    plan = store.plan
    for shard in plan.shards:
        values = store.read_shard(plan, shard)
        values["hessian_diagonal"] = values["hessian_diagonal"] * factor
        store.record_done(shard, store.write_shard(plan, shard, values))


def hessdiag(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def check(name: str, root: str) -> str:
    import keras

    size, layer = CASES[name]
    keras.utils.set_random_seed(0)
    path = os.path.join(root, f"{name}.keras")
    getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=1000).save(path)
    store = os.path.join(root, f"{name}.zarr")
    config = {
        "output": store,
        "model": {"source": "keras_file", "path": path},
        "target": {"layer": layer},
        "data": {"source": "synthetic", "num_examples": 2, "batch_size": 2, "seed": 0},
        "loss": {"name": "sparse_categorical_crossentropy"},
        "compute": {"engine": "auto", "example_block": 2, "shard_size": 16},
        "cluster": {"executor": "local"},
        "validation": {"samples": 16},
    }
    config_path = os.path.join(root, f"{name}.yaml")
    with open(config_path, "w") as handle:
        yaml.safe_dump(config, handle)
    started = time.perf_counter()
    code, output = hessdiag("run", config_path, "--overwrite")
    seconds = time.perf_counter() - started
    summary = next((line for line in output.splitlines() if "samples in all" in line), "")
    if code != 0:
        return f"{name} {layer}: run exit {code} after {seconds:.0f} s: {output.strip().splitlines()[-1]}"
    scale_stored_diagonals(store, 1.01)
    scaled_code, scaled_output = hessdiag("validate", store, "--samples", "16")
    scaled_summary = next((line for line in scaled_output.splitlines() if "samples in all" in line), "")
    return (f"{name} {layer}: run exit {code} in {seconds:.0f} s ({summary.strip()}); diagonal scaled by 1.01:"
            f" validate exit {scaled_code} ({scaled_summary.strip()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="early")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in CASES:
        print(check(name, args.out), flush=True)


if __name__ == "__main__":
    main()

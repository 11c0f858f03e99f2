"""Scaling of a run over workers: work amplification of channel shards and wall time on 1 vs 2 workers.

Runs the real pipeline (local Ray, Zarr store) several times on one config, changing only
`compute.shard_size` and `cluster.num_workers`, and prints compute seconds (summed over units,
from the store), wall seconds, and ratios against the first run, measured in the same process.

    .venv/bin/python scripts/bench_scaling.py                      # CIFAR-size VGG, 100 classes
    .venv/bin/python scripts/bench_scaling.py --vgg16 --examples 8 # VGG16 block4_conv3 (long)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pipeline.config import load_config, parse_config  # noqa: E402
from pipeline.coordinator import run  # noqa: E402
from pipeline.status import store_status  # noqa: E402
from pipeline.store import ResultStore  # noqa: E402

CIFAR = {
    "model": {"source": "builder", "builder": "cifar_vgg100", "seed": 0},
    "target": {"layer": "block2_conv1"},
    "data": {"source": "synthetic", "num_examples": 64, "batch_size": 16},
    "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
    "compute": {"engine": "factored", "example_block": 16},
    "cluster": {"cpus_per_worker": 1},
    "validation": {"samples": 0},
}


def one_run(raw: dict, shard_size: int, workers: int, root: str) -> dict:
    raw = {**raw, "output": os.path.join(root, f"s{shard_size}-w{workers}.zarr"),
           "compute": {**raw["compute"], "shard_size": shard_size}, "cluster": {**raw["cluster"], "num_workers": workers}}
    started = time.perf_counter()
    run(parse_config(raw), live=False, log=lambda message: None)
    wall = time.perf_counter() - started
    status = store_status(ResultStore.open(raw["output"], mode="r"))
    return {"shard_size": shard_size, "workers": workers, "units": status["units_total"],
            "compute": status["compute_seconds"], "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg16", action="store_true", help="VGG16 block4_conv3 from configs/vgg16_conv4_3.yaml")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--widths", default=None, help="comma-separated shard sizes (default 64,8 or 512,64)")
    args = parser.parse_args()
    if args.vgg16:
        raw = load_config("configs/vgg16_conv4_3.yaml").model_dump(mode="json")
        raw["data"]["num_examples"] = args.examples
        raw["compute"]["example_block"] = max(1, args.examples // 2)
        raw["validation"]["samples"] = 0
        widths = [int(w) for w in (args.widths or "512,64").split(",")]
        name = f"VGG16 block4_conv3, {args.examples} examples"
    else:
        raw = CIFAR
        widths = [int(w) for w in (args.widths or "64,8").split(",")]
        name = "CIFAR-size VGG (100 classes) block2_conv1 3x3x32x64, 64 examples"
    root = tempfile.mkdtemp(prefix="hessdiag-bench-")
    try:
        runs = [one_run(raw, widths[0], 1, root), one_run(raw, widths[1], 1, root), one_run(raw, widths[1], 2, root)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{name}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 CPU per worker")
    print("| shard_size | workers | units | compute s | wall s | compute / first | wall / first |")
    print("|---|---|---|---|---|---|---|")
    first = runs[0]
    for r in runs:
        print(f"| {r['shard_size']} | {r['workers']} | {r['units']} | {r['compute']:.1f} | {r['wall']:.1f} |"
              f" {r['compute'] / first['compute']:.2f} | {r['wall'] / first['wall']:.2f} |")


if __name__ == "__main__":
    main()

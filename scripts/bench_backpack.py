"""hessdiag against BackPACK's DiagHessian on the same weights, every comparison in one run.

Exact engine on a tanh MLP (Dense target) and a tanh CNN; factored engine on a CIFAR-size
VGG and on VGG16 ``block4_conv3`` (with its column back-propagation FLOPs against this
machine's GEMM rate); then the cost of a repeated ``layer_derivatives`` call. BackPACK gets
only the suffix from the target layer on (the fair comparison): the target layer's input
activations are computed once and handed to it. Each side runs in its own process so its
peak memory (max RSS) is its own. Both sides are timed alike: best of 15 calls after an
untimed one, the two sides alternating over 3 rounds (``--rounds``) with each side's fastest
kept, except VGG16 (``--cold``), where each side's first call is timed.

    pip install -e ".[bench]"      # torch 2.13.0 and backpack-for-pytorch
    .venv/bin/python scripts/bench_backpack.py                 # everything (VGG16 takes minutes, ~15 GB)
    .venv/bin/python scripts/bench_backpack.py --model cifar --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engines import best_of  # noqa: E402
from bench_exact_methods import repeated_call_cost, tanh_cnn, tanh_mlp  # noqa: E402


def cifar():
    from pipeline.model import build_model

    return build_model("cifar_vgg", seed=0)


def vgg16():
    from pipeline.model import build_model

    return build_model("vgg16", seed=0)


# key -> (model builder, target layer, logits model?, hessdiag engine, batch)
MODELS = {
    "mlp": (tanh_mlp, "target", True, "exact", 32),
    "cnn": (tanh_cnn, "target", True, "exact", 8),
    "cifar": (cifar, "block2_conv1", True, "factored", 16),
    "vgg16": (vgg16, "block4_conv3", False, "factored", 1),
}


def inputs(model_key: str, batch: int):
    model = MODELS[model_key][0]()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, int(model.outputs[0].shape[-1]), batch)
    return model, x, y


def gemm_rate() -> float:
    """This machine's float32 matrix-product rate in GFLOP/s (2048², best of 10), measured in this process.

    The rate of this shared machine varies by up to 2x over minutes, so callers take the best of a
    measurement before and one after the timed call."""
    import tensorflow as tf

    a, b = tf.random.normal((2048, 2048)), tf.random.normal((2048, 2048))
    product = tf.function(lambda a, b: a @ b)
    return 2 * 2048**3 / best_of(lambda: product(a, b).numpy(), repeats=10) / 1e9


def column_flops(curvature, batch: int) -> float:
    """FLOPs of back-propagating every factor column, and the loss gradient, through the suffix's convolutions and dense layers."""
    import keras

    from pipeline.curvature.suffix import suffix_layers

    total = 0
    for layer in suffix_layers(curvature.target):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            positions = int(np.prod(layer.output.shape[1:-1]))
            total += 2 * positions * int(np.prod(layer.kernel.shape))
    return total * (curvature.engine.factor_width + 1) * batch  # the factor's columns and the gradient column


def timed(fn, warm_up: bool) -> float:
    """Seconds of ``fn``: the best of 15 calls after an untimed one, or its first call."""
    if warm_up:
        return best_of(fn, repeats=15)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def role_ours(model_key: str, batch: int, out: str, warm_up: bool) -> dict:
    from pipeline.curvature import LayerCurvature

    _, layer, from_logits, engine, _ = MODELS[model_key]
    model, x, y = inputs(model_key, batch)
    options = {"column_chunk": 50} if engine == "factored" else {"chunk_size": 256}
    curvature = LayerCurvature(model, layer, loss="sparse_categorical_crossentropy", from_logits=from_logits, engine=engine, **options)
    rate_before = gemm_rate() if engine == "factored" else 0.0
    results = []
    seconds = timed(lambda: results.append(curvature.compute([(x, y)])), warm_up)
    np.save(out, results[-1].hessian_diagonal)
    chosen = curvature.engine
    method = getattr(chosen, "column_method", getattr(chosen, "method", ""))
    record = {"seconds": seconds, "method": f"{method}, {chosen.compiler}" if hasattr(chosen, "compiler") else method}
    if engine == "factored":
        record.update(flops=column_flops(curvature, batch), gemm=max(rate_before, gemm_rate()))
    return record


TORCH_ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh"}


def torch_suffix(model, layer_name):
    """The Keras suffix from ``layer_name`` on, as a torch Sequential with the same weights (a final softmax is
    left to the cross-entropy)."""
    import keras
    import torch

    layers, started, flatten_shape = [], False, None
    for layer in model.layers:
        started = started or layer.name == layer_name
        if not started:
            continue
        if isinstance(layer, keras.layers.Conv2D):
            conv = torch.nn.Conv2d(layer.kernel.shape[2], layer.kernel.shape[3], layer.kernel_size, padding=layer.kernel_size[0] // 2)
            conv.weight.data = torch.tensor(np.transpose(layer.kernel.numpy(), (3, 2, 0, 1)).copy())
            conv.bias.data = torch.tensor(layer.bias.numpy())
            layers.append(conv)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            layers.append(torch.nn.MaxPool2d(2))
        elif isinstance(layer, keras.layers.AveragePooling2D):
            layers.append(torch.nn.AvgPool2d(2))
        elif isinstance(layer, keras.layers.Flatten):
            flatten_shape = tuple(layer.input.shape[1:])
            layers.append(torch.nn.Flatten())
        elif isinstance(layer, keras.layers.Dense):
            kernel = layer.kernel.numpy()
            if flatten_shape and isinstance(layers[-1], torch.nn.Flatten):  # Keras flattens HWC, torch CHW
                h, w, c = flatten_shape
                kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
            linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
            linear.weight.data = torch.tensor(kernel.T.copy())
            linear.bias.data = torch.tensor(layer.bias.numpy())
            layers.append(linear)
        name = getattr(getattr(layer, "activation", None), "__name__", None)
        if name in TORCH_ACTIVATIONS:
            layers.append(getattr(torch.nn, TORCH_ACTIVATIONS[name])())
    return torch.nn.Sequential(*layers)


def role_backpack(model_key: str, batch: int, out: str, warm_up: bool) -> dict:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    from pipeline.curvature.target import resolve_target

    torch.set_num_threads(os.cpu_count())
    _, layer, _, _, _ = MODELS[model_key]
    model, x, y = inputs(model_key, batch)
    a = resolve_target(model, layer).layer_input(x).numpy()
    suffix = extend(torch_suffix(model, layer))
    del model
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    a_t = torch.tensor(np.transpose(a, (0, 3, 1, 2)).copy() if a.ndim == 4 else a)
    y_t = torch.tensor(y)

    def diag_hessian():
        loss = loss_fn(suffix(a_t), y_t)
        with backpack(DiagHessian()):
            loss.backward()

    seconds = timed(diag_hessian, warm_up)
    weight = suffix[0].weight.diag_h.detach().numpy()
    np.save(out, np.transpose(weight, (2, 3, 1, 0)) if weight.ndim == 4 else weight.T)
    return {"seconds": seconds}


def run_role(role: str, model_key: str, batch: int, workdir: str, warm_up: bool) -> dict:
    out = os.path.join(workdir, f"{role}-{model_key}-{batch}.npy")
    command = [sys.executable, __file__, "--role", role, "--model", model_key, "--batch", str(batch), "--out", out]
    command += ["--warm-up"] if warm_up else []
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1]}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["diagonal"] = np.load(out)
    return record


def fastest(records: list[dict]) -> dict:
    """The record with the fewest seconds; any error wins, so it is reported."""
    failed = [r for r in records if "error" in r]
    return failed[0] if failed else min(records, key=lambda r: r["seconds"])


def compare(model_key: str, batch: int, workdir: str, warm_up: bool, rounds: int) -> None:
    """Warm comparisons alternate the two sides over ``rounds`` (this shared machine's speed drifts
    over minutes) and keep each side's fastest; cold ones run once."""
    _, layer, _, engine, _ = MODELS[model_key]
    runs = [(run_role("ours", model_key, batch, workdir, warm_up), run_role("backpack", model_key, batch, workdir, warm_up))
            for _ in range(rounds if warm_up else 1)]
    ours, theirs = fastest([r[0] for r in runs]), fastest([r[1] for r in runs])
    label = f"{model_key} ({layer}), batch {batch}, {engine} [{ours.get('method', '')}]"
    if "error" in ours or "error" in theirs:
        print(f"{label}: hessdiag {ours.get('error', 'ok')} | BackPACK {theirs.get('error', 'ok')}")
        return
    diff = np.abs(ours["diagonal"] - theirs["diagonal"])
    scale = np.abs(theirs["diagonal"]).max()
    rate = ""
    if "flops" in ours:
        achieved = ours["flops"] / ours["seconds"] / 1e9
        rate = f" | column back-propagation {ours['flops'] / 1e9:.1f} GFLOP: {achieved:.0f} GFLOP/s = {achieved / ours['gemm']:.2f} of GEMM ({ours['gemm']:.0f})"
    cold = f" (best of {rounds} x 15 warm calls each)" if warm_up else " (first call each, tracing included)"
    print(
        f"{label}{cold}: hessdiag {ours['seconds']:.4f} s, peak {ours['peak_bytes'] / 2**30:.2f} GiB"
        f" | BackPACK {theirs['seconds']:.4f} s, peak {theirs['peak_bytes'] / 2**30:.2f} GiB"
        f" | speed-up {theirs['seconds'] / ours['seconds']:.2f}x, memory {ours['peak_bytes'] / theirs['peak_bytes']:.2f} of BackPACK's"
        f" | max |diff| / max|diag| {diff.max() / scale:.1e}{rate}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="default: all, in table order")
    parser.add_argument("--batch", type=int, help="default: each model's own")
    parser.add_argument("--cold", action="append", default=["vgg16"], help="models timed on their first call (default vgg16)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the warm comparisons (default 3)")
    parser.add_argument("--role", choices=["ours", "backpack"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        key = args.model[0]
        record = role_ours(key, args.batch, args.out, args.warm_up) if args.role == "ours" else role_backpack(key, args.batch, args.out, args.warm_up)
        record["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(record))
        return
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as workdir:
        for key in args.model or list(MODELS):
            compare(key, args.batch or MODELS[key][4], workdir, warm_up=key not in args.cold, rounds=args.rounds)
    repeated_call_cost()


if __name__ == "__main__":
    main()

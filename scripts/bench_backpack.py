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

    from pipeline.curvature.suffix import suffix_operations

    total = 0
    for layer in suffix_operations(curvature.target):
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


def peak_bytes() -> int:
    """This process's peak resident memory so far: taken right after the computation, before results are saved."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vgg16_at(size: int):
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(weights=None, input_shape=(size, size, 3), classes=1000)


def network_inputs(size: int):
    model = vgg16_at(size)
    rng = np.random.default_rng(1)
    return model, rng.normal(size=(1, size, size, 3)).astype("float32"), np.array([3])


def network_flops(model, factor_width: int) -> float:
    """FLOPs of back-propagating every factor column and the gradient column through VGG16's convolutions and dense
    layers, input-gradients (all but the first layer) and weight-gradient products alike."""
    import keras

    total = 0
    for index, layer in enumerate(l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))):
        positions = int(np.prod(layer.output.shape[1:-1]))
        per_column = 2 * positions * int(np.prod(layer.kernel.shape))
        total += per_column * (2 if index else 1)
    return total * (factor_width + 1)


def role_ours_network(size: int, out: str) -> dict:
    """Every kernel and bias of VGG16 from one shared pass, one example, first call (tracing included). The pass's
    budget is 0.5 GiB at 112x112, scaled with the positions (2 GiB at 224x224, as ``configs/vgg16_all.yaml``)."""
    from pipeline.curvature.network import NetworkCurvature
    from pipeline.curvature.target import resolve_targets
    from pipeline.losses import get_loss
    from pipeline.worker import configure_tensorflow

    configure_tensorflow(os.cpu_count())
    model, x, y = network_inputs(size)
    rate_before = gemm_rate()
    started = time.perf_counter()
    network = NetworkCurvature(model, resolve_targets(model, "all"), get_loss("sparse_categorical_crossentropy"),
                               column_chunk=16, memory_budget=int(2**29 * (size / 112) ** 2))
    sums, _ = network.shared.batch_sums(x, y)  # the gradient and diagonal of every tensor, in memory, as BackPACK leaves them
    seconds, peak = time.perf_counter() - started, peak_bytes()
    np.savez(out, **{name.replace("/", "__"): network.targets[name].weight.to_weight(diagonal, slice(0, network.targets[name].weight.channels))
                     for name, (_, diagonal) in sums.items()})
    return {"seconds": seconds, "peak_bytes": peak, "flops": network_flops(model, network.shared.factor_width),
            "gemm": max(rate_before, gemm_rate()), "method": network.shared.column_method, "tensors": len(sums)}


def role_backpack_network(size: int, out: str) -> dict:
    """BackPACK's DiagHessian of every parameter of the same VGG16 (a torch Sequential with its weights), one example."""
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    torch.set_num_threads(os.cpu_count())
    model, x, y = network_inputs(size)
    first = model.layers[1].name
    names = [layer.name for layer in model.layers if hasattr(layer, "kernel")]
    flatten_shape = tuple(next(l for l in model.layers if l.name == "flatten").input.shape[1:])
    network = extend(torch_suffix(model, first))
    del model
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    started = time.perf_counter()
    loss = loss_fn(network(torch.tensor(np.transpose(x, (0, 3, 1, 2)).copy())), torch.tensor(y))
    with backpack(DiagHessian()):
        loss.backward()
    seconds, peak = time.perf_counter() - started, peak_bytes()
    found, modules = {}, [m for m in network if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for index, (name, module) in enumerate(zip(names, modules)):
        weight = module.weight.diag_h.detach().numpy()
        if weight.ndim == 4:
            weight = np.transpose(weight, (2, 3, 1, 0))
        else:
            weight = weight.T
            if index == len([m for m in modules if isinstance(m, torch.nn.Conv2d)]):  # the first dense: torch CHW, Keras HWC
                h, w, c = flatten_shape
                weight = weight.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
        found[f"{name}__kernel"] = weight
        found[f"{name}__bias"] = module.bias.diag_h.detach().numpy()
    np.savez(out, **found)
    return {"seconds": seconds, "peak_bytes": peak}


def compare_network(size: int, workdir: str, backpack_limit_gb: float) -> None:
    """The whole of VGG16, every tensor, one example: both sides once (first call), each in its own process."""
    results = {}
    for role in ("ours_network", "backpack_network"):
        out = os.path.join(workdir, f"{role}-{size}.npz")
        command = [sys.executable, __file__, "--role", role, "--size", str(size), "--out", out]
        if role == "backpack_network":
            command += ["--limit-gb", str(backpack_limit_gb)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        wall = time.perf_counter() - started
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()
            results[role] = {"error": f"exit {done.returncode} after {wall:.0f} s: {tail[-1] if tail else ''}"[:300]}
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        record["diagonals"] = dict(np.load(out))
        results[role] = record
    ours, theirs = results["ours_network"], results["backpack_network"]
    label = f"vgg16 (every tensor), {size}x{size}, batch 1, factored [{ours.get('method', '')}] (first call each, tracing included)"
    if "error" in ours:
        print(f"{label}: hessdiag {ours['error']}")
        return
    rate = ours["flops"] / ours["seconds"] / 1e9
    mine = (f"hessdiag {ours['seconds']:.1f} s, peak {ours['peak_bytes'] / 2**30:.2f} GiB, {ours['tensors']} tensors"
            f" | column back-propagation {ours['flops'] / 1e12:.2f} TFLOP: {rate:.0f} GFLOP/s = {rate / ours['gemm']:.2f} of GEMM ({ours['gemm']:.0f})")
    if "error" in theirs:
        print(f"{label}: {mine} | BackPACK {theirs['error']} (address space limited to {backpack_limit_gb:g} GiB)", flush=True)
        return
    worst = max(np.abs(ours["diagonals"][k] - v).max() / np.abs(v).max() for k, v in theirs["diagonals"].items())
    print(f"{label}: {mine} | BackPACK {theirs['seconds']:.1f} s, peak {theirs['peak_bytes'] / 2**30:.2f} GiB"
          f" | speed-up {theirs['seconds'] / ours['seconds']:.2f}x, memory {ours['peak_bytes'] / theirs['peak_bytes']:.2f} of BackPACK's"
          f" | worst tensor max |diff| / max|diag| {worst:.1e}", flush=True)


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
    parser.add_argument("--network", type=int, action="append", metavar="SIZE",
                        help="also compare every tensor of VGG16 at SIZE x SIZE (repeatable, e.g. --network 112 --network 224)")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="BackPACK's address-space limit in the network comparison")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=["ours", "backpack", "ours_network", "backpack_network"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role in ("ours_network", "backpack_network"):
        if args.role == "backpack_network":
            limit = int(args.limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            record = role_backpack_network(args.size, args.out)
        else:
            record = role_ours_network(args.size, args.out)
        print(json.dumps(record))
        return
    if args.role:
        key = args.model[0]
        record = role_ours(key, args.batch, args.out, args.warm_up) if args.role == "ours" else role_backpack(key, args.batch, args.out, args.warm_up)
        record["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(record))
        return
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.network or []:
            compare_network(size, workdir, args.limit_gb)
        if args.network and not args.model:
            return
        for key in args.model or list(MODELS):
            compare(key, args.batch or MODELS[key][4], workdir, warm_up=key not in args.cold, rounds=args.rounds)
    repeated_call_cost()


if __name__ == "__main__":
    main()

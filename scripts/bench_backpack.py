"""hessdiag's factored engine against BackPACK's DiagHessian on the same weights, same run.

BackPACK gets only the suffix from the target layer on (the fair comparison): the
target layer's input activations are computed once and handed to it. Each side runs
in its own process so its peak memory (max RSS) is its own.

    pip install -e ".[bench]"      # torch 2.13.0 (CPU) and backpack-for-pytorch
    .venv/bin/python scripts/bench_backpack.py --model cifar --batch 16
    .venv/bin/python scripts/bench_backpack.py --model vgg16 --batch 1 --batch 8 --backpack-max-batch 1
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

MODELS = {"cifar": ("cifar_vgg", "block2_conv1", True), "vgg16": ("vgg16", "block4_conv3", False)}


def inputs(model_name: str, batch: int):
    from pipeline.model import build_model

    model = build_model(model_name, seed=0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, int(model.outputs[0].shape[-1]), batch)
    return model, x, y


def role_ours(model_key: str, batch: int, out: str, warm_up_limit: int) -> dict:
    from pipeline.curvature import LayerCurvature

    name, layer, from_logits = MODELS[model_key]
    model, x, y = inputs(name, batch)
    curvature = LayerCurvature(model, layer, loss="sparse_categorical_crossentropy", from_logits=from_logits, engine="factored", column_chunk=50)
    if batch <= warm_up_limit:
        curvature.compute([(x, y)])  # trace and optimize the graphs for this exact shape, outside the timing
    start = time.perf_counter()
    result = curvature.compute([(x, y)])
    seconds = time.perf_counter() - start
    np.save(out, result.hessian_diagonal)
    return {"seconds": seconds}


def torch_suffix(model, layer_name):
    """The Keras suffix from ``layer_name`` on, as a torch Sequential with the same weights."""
    import keras
    import torch

    layers, started = [], False
    for layer in model.layers:
        started = started or layer.name == layer_name
        if not started:
            continue
        if isinstance(layer, keras.layers.Conv2D):
            conv = torch.nn.Conv2d(layer.kernel.shape[2], layer.kernel.shape[3], layer.kernel_size, padding=layer.kernel_size[0] // 2)
            conv.weight.data = torch.tensor(np.transpose(layer.kernel.numpy(), (3, 2, 0, 1)).copy())
            conv.bias.data = torch.tensor(layer.bias.numpy())
            layers += [conv, torch.nn.ReLU()]
        elif isinstance(layer, keras.layers.MaxPooling2D):
            layers.append(torch.nn.MaxPool2d(2))
        elif isinstance(layer, keras.layers.Flatten):
            height, width, channels = layer.input.shape[1:]
            layers.append(torch.nn.Flatten())
            flatten_shape = (height, width, channels)
        elif isinstance(layer, keras.layers.Dense):
            kernel = layer.kernel.numpy()
            if layers and isinstance(layers[-1], torch.nn.Flatten):  # Keras flattens HWC, torch CHW
                h, w, c = flatten_shape
                kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
            linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
            linear.weight.data = torch.tensor(kernel.T.copy())
            linear.bias.data = torch.tensor(layer.bias.numpy())
            layers.append(linear)
            if layer.activation.__name__ == "relu":
                layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def role_backpack(model_key: str, batch: int, out: str) -> dict:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    from pipeline.curvature.target import resolve_target

    torch.set_num_threads(os.cpu_count())
    name, layer, _ = MODELS[model_key]
    model, x, y = inputs(name, batch)
    a = resolve_target(model, layer).layer_input(x).numpy()
    suffix = extend(torch_suffix(model, layer))
    del model
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    a_t = torch.tensor(np.transpose(a, (0, 3, 1, 2)).copy())
    y_t = torch.tensor(y)
    start = time.perf_counter()
    loss = loss_fn(suffix(a_t), y_t)
    with backpack(DiagHessian()):
        loss.backward()
    seconds = time.perf_counter() - start
    np.save(out, np.transpose(suffix[0].weight.diag_h.detach().numpy(), (2, 3, 1, 0)))
    return {"seconds": seconds}


def run_role(role: str, model_key: str, batch: int, workdir: str, warm_up_limit: int) -> dict:
    out = os.path.join(workdir, f"{role}-{model_key}-{batch}.npy")
    command = [sys.executable, __file__, "--role", role, "--model", model_key, "--batch", str(batch), "--out", out,
               "--warm-up-max-batch", str(warm_up_limit)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1]}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["diagonal"] = np.load(out)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cifar")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--backpack-max-batch", type=int, default=64, help="skip BackPACK above this batch (it cannot fit)")
    parser.add_argument("--warm-up-max-batch", type=int, default=64,
                        help="above this batch hessdiag is timed on its first call, graph building included")
    parser.add_argument("--role", choices=["ours", "backpack"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = args.batch or [16]
    if args.role:
        if args.role == "ours":
            record = role_ours(args.model, batches[0], args.out, args.warm_up_max_batch)
        else:
            record = role_backpack(args.model, batches[0], args.out)
        record["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(record))
        return
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; torch {torch.__version__}; model {args.model} ({MODELS[args.model][1]})")
    with tempfile.TemporaryDirectory() as workdir:
        for batch in batches:
            ours = run_role("ours", args.model, batch, workdir, args.warm_up_max_batch)
            theirs = run_role("backpack", args.model, batch, workdir, args.warm_up_max_batch) if batch <= args.backpack_max_batch else {"error": "skipped (does not fit)"}
            if "error" in ours:
                print(f"batch {batch:3d}: hessdiag failed: {ours['error']}")
                continue
            cold = " (first call)" if batch > args.warm_up_max_batch else ""
            line = f"batch {batch:3d}: hessdiag factored{cold} {ours['seconds']:8.2f} s ({ours['seconds'] / batch:7.2f} s/example), peak {ours['peak_bytes'] / 2**30:6.2f} GiB"
            if "error" in theirs:
                print(f"{line} | BackPACK: {theirs['error']}")
                continue
            diff = np.abs(ours["diagonal"] - theirs["diagonal"])
            scale = np.abs(theirs["diagonal"]).max()
            mask = np.abs(theirs["diagonal"]) > 1e-3 * scale
            elementwise = (diff[mask] / np.abs(theirs["diagonal"][mask])).max()
            print(
                f"{line} | BackPACK DiagHessian {theirs['seconds']:8.2f} s ({theirs['seconds'] / batch:7.2f} s/example), peak {theirs['peak_bytes'] / 2**30:6.2f} GiB"
                f" | speed-up {theirs['seconds'] / ours['seconds']:5.2f}x, memory {theirs['peak_bytes'] / ours['peak_bytes']:5.2f}x less"
                f" | max |diff| / max|diag| {diff.max() / scale:.1e}, max rel diff (|diag| > 1e-3 max) {elementwise:.1e}"
            )


if __name__ == "__main__":
    main()

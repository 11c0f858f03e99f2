"""Per-tensor summaries of finished results: what pruning, Laplace and quantization users act on.

Traces are sums of the Hessian diagonal (HAWQ allocates bits by trace / entries); the saliency
½·h·w² is Optimal Brain Damage's estimate of the loss increase from zeroing a weight.
"""

from __future__ import annotations

import numpy as np


def channel_sums(values: np.ndarray, shard_axis: int) -> np.ndarray:
    """Sums over every axis but the shard axis (NaN entries, never computed, are left out)."""
    moved = np.moveaxis(values, shard_axis, 0)
    return np.nansum(moved.reshape(moved.shape[0], -1), axis=1)


def tensor_summary(diagonal: np.ndarray, saliency: np.ndarray, shard_axis: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(attributes, per-channel arrays) of one tensor's diagonal and saliency."""
    attrs = {
        "entries": int(diagonal.size),
        "trace": float(np.sum(diagonal)),
        "mean": float(np.mean(diagonal)),
        "min": float(np.min(diagonal)),
        "max": float(np.max(diagonal)),
        "negative_entries": int(np.sum(diagonal < 0)),
        "saliency": float(np.sum(saliency)),
    }
    return attrs, {"channel_trace": channel_sums(diagonal, shard_axis), "channel_saliency": channel_sums(saliency, shard_axis)}

"""``hessdiag report``: PNG plots across the network and a Markdown summary of a finished store.

Per layer: entries, trace, average trace (trace / entries, HAWQ's sensitivity), negative entries
and the layer's share of the network's total saliency ½·h·w² (Optimal Brain Damage). Plots: the
per-layer average trace, the distribution of the global saliency, the fraction of each layer's
weights a global saliency threshold would prune at 50, 70 and 90 %, heat maps of the largest
tensors, and the validation.
"""

from __future__ import annotations

import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.results import read_result, validation_outcome  # noqa: E402
from pipeline.status import store_status  # noqa: E402
from pipeline.store import ResultStore  # noqa: E402

UNITS_DIAG = "d²L/dW² (loss / weight²)"
UNITS_GRAD = "dL/dW (loss / weight)"
PRUNE_LEVELS = (0.5, 0.7, 0.9)
HEATMAPS = 3  # per-tensor heat maps only for the few largest tensors
ERROR_FLOOR = 1e-17


def pruning_thresholds(saliencies: list[np.ndarray], levels=PRUNE_LEVELS) -> dict[float, float]:
    """The global saliency below which ``level`` of all weights lie, for each level."""
    every = np.concatenate([np.ravel(s) for s in saliencies])
    return {level: float(np.quantile(every, level)) for level in levels}


def pruned_fractions(saliency: np.ndarray, thresholds: dict[float, float]) -> dict[float, float]:
    """The fraction of one tensor's weights at or below each global threshold."""
    return {level: float(np.mean(saliency <= value)) for level, value in thresholds.items()}


def _short(name: str) -> str:
    layer, weight = name.rsplit("/", 1)
    return f"{layer.rsplit('/', 1)[-1]}/{'b' if weight in ('bias', 'beta') else weight[0]}"


def _per_layer_trace(names, averages, title) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * len(names) + 2), 4.5))
    values = np.array(averages)
    colors = ["tab:blue" if v > 0 else "tab:red" for v in values]
    ax.bar(np.arange(len(values)), np.abs(values), color=colors)
    if np.all(np.abs(values) > 0) and np.abs(values).max() / np.abs(values).min() > 100:
        ax.set_yscale("log")
    ax.set_xticks(np.arange(len(values)), [_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("|trace| / entries (loss / weight²)")
    ax.set_title(f"Average Hessian-diagonal trace per tensor (red: negative)\n{title}")
    fig.tight_layout()
    return fig


def _saliency_histogram(saliencies, thresholds, title) -> plt.Figure:
    every = np.concatenate([np.ravel(s) for s in saliencies])
    positive = every[every > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    if positive.size:
        ax.hist(np.log10(positive), bins=100, color="tab:purple")
        for level, value in thresholds.items():
            if value > 0:
                ax.axvline(np.log10(value), color="k", linestyle="--", linewidth=1)
                ax.text(np.log10(value), ax.get_ylim()[1] * 0.9, f" {level:.0%}", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("log10 saliency ½·h·w² (loss)")
    ax.set_ylabel("number of weights")
    ax.set_title(f"Global Optimal-Brain-Damage saliency, {every.size:,} weights"
                 f" ({int((every <= 0).sum()):,} at or below zero not shown)\n{title}")
    fig.tight_layout()
    return fig


def _pruning_bars(names, fractions, title) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(names) + 2), 4.5))
    width = 0.8 / len(PRUNE_LEVELS)
    for k, level in enumerate(PRUNE_LEVELS):
        ax.bar(np.arange(len(names)) + (k - 1) * width, [f[level] for f in fractions], width=width, label=f"global {level:.0%}")
    ax.set_xticks(np.arange(len(names)), [_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of the tensor's weights pruned")
    ax.set_title(f"What a global saliency threshold prunes, per tensor\n{title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _heatmap(name, diagonal, dims, title) -> plt.Figure:
    """The diagonal summed over every axis but the last two (per input and output channel for a kernel)."""
    pairs = diagonal if diagonal.ndim <= 2 else np.nansum(diagonal.reshape(-1, *diagonal.shape[-2:]), axis=0)
    pairs = pairs[None] if pairs.ndim == 1 else pairs
    fig, ax = plt.subplots(figsize=(7, 5.5))
    zero = pairs == 0
    magnitude = np.ma.masked_array(np.log10(np.where(zero, 1.0, np.abs(pairs))), mask=zero)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    image = ax.imshow(magnitude, aspect="auto", cmap=cmap, origin="lower", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 |summed d²L/dW²| (loss / weight²)")
    note = f"\ngray: exactly zero ({int(zero.sum())} entries, e.g. dead ReLU channels)" if zero.any() else ""
    ax.set_xlabel(f"{dims[-1]}{note}")
    ax.set_ylabel(dims[-2] if len(dims) > 1 else "")
    ax.set_title(f"Hessian diagonal of {name} {diagonal.shape}\n{title}")
    fig.tight_layout()
    return fig


def _validation_scatter(validation: dict, rtol: float, atol: float) -> plt.Figure:
    """Relative error of each sampled entry against the magnitude of its reference, every tensor, log axes, with the
    tolerance rtol as a band (entries far below their tensor's largest also pass within atol of that largest)."""
    entries = [e for tensor in validation.values() for e in tensor.get("entries", [])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, units in ((axes[0], "hessian_diagonal", UNITS_DIAG), (axes[1], "gradient", UNITS_GRAD)):
        fd = np.array([e[f"{key}_fd"] for e in entries], float)
        got = np.array([e[key] for e in entries], float)
        smooth = np.array([e.get("smooth", True) for e in entries], bool)
        magnitude = np.abs(fd[smooth])
        shown = magnitude > 0
        if shown.any():
            error = np.maximum(np.abs(got[smooth] - fd[smooth])[shown] / magnitude[shown], ERROR_FLOOR)
            lo, hi = magnitude[shown].min() / 3, magnitude[shown].max() * 3
            span = np.geomspace(lo, hi, 200)
            bottom = max(ERROR_FLOOR, error.min() / 10)
            ax.fill_between(span, bottom, np.full_like(span, rtol), color="tab:orange", alpha=0.3,
                            label=f"within rtol {rtol:g} (atol {atol:g} of each tensor's largest)")
            ax.scatter(magnitude[shown], error, s=18, zorder=3, label="sampled entry")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(matplotlib.ticker.LogLocator(numticks=5))
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlim(lo, hi)
            ax.set_ylim(bottom, max(10 * rtol, error.max() * 10))
            ax.legend(fontsize=8, loc="upper right")
        skipped = int((~smooth).sum()) + int((~shown).sum())
        if skipped:
            ax.text(0.02, 0.02, f"{skipped} entries unresolved or exactly zero not shown", transform=ax.transAxes, fontsize=8)
        ax.set_xlabel(f"|float64 reference|, {units}")
        ax.set_ylabel("relative error of the stored value")
        ax.set_title(key.replace("_", " "))
    fig.suptitle(f"Validation: {len(entries)} sampled entries over {len(validation)} tensor(s)")
    fig.tight_layout()
    return fig


def _fmt(value, spec=".3e"):
    return "—" if value is None else format(value, spec)


def _markdown(attrs, status, rows, plots) -> str:
    config = attrs.get("config", {})
    runs = attrs.get("runs", [])
    validation = attrs.get("validation") or {}
    engines = sorted({row["engine"] for row in rows})
    lines = [
        f"# hessdiag report: {attrs.get('model')}, {len(rows)} tensor(s)",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{status['store']}`.",
        "",
        "| | |", "|---|---|",
        f"| complete | {status['complete']} ({status['units_done']}/{status['units_total']} units, {status['shards_done']}/{status['shards_total']} shards) |",
        f"| model | {config.get('model', {}).get('source')} `{config.get('model', {}).get('builder') or config.get('model', {}).get('path')}`, fingerprint `{attrs.get('model_fingerprint', '')[:16]}` |",
        f"| data | {config.get('data', {}).get('source')}, {attrs.get('examples')} examples, batch size {attrs.get('batch_size')} |",
        f"| loss | {attrs.get('loss_name')} = {_fmt(attrs.get('loss'), '.6f')} (mean over the data set) |",
        f"| engines | {', '.join(engines)} (requested `{attrs.get('engine_requested')}`) |",
        f"| compute time | {status['compute_seconds']:.1f} s summed over units; {len(runs)} run(s), wall {sum(r.get('seconds', 0) for r in runs):.1f} s |",
        f"| validation | {validation.get('samples')} samples, max relative error {_fmt(validation.get('max_rel_error'))}, passed **{validation.get('passed')}**"
        + (f", unresolved: {', '.join(validation['unresolved'])}" if validation.get("unresolved") else "") + " |",
        "",
        "## Per tensor",
        "",
        "| tensor | shape | engine | entries | trace | average trace | negative entries | share of saliency | validation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        check = row["validation"]
        lines.append(
            f"| `{row['name']}` | {tuple(row['shape'])} | {row['engine']} | {row['entries']:,} | {row['trace']:.4e} "
            f"| {row['trace'] / row['entries']:.4e} | {row['negative_entries']:,} | {row['share']:.2%} "
            f"| {check.get('samples', 0)} samples, {_fmt(check.get('max_rel_error'), '.1e')}, {validation_outcome(check)} |"
        )
    lines += ["", "Why each engine: " + "; ".join(f"`{row['name']}`: {row['engine_reason']}" for row in rows), "",
              "## Plots", ""]
    lines += [f"![{name}]({os.path.basename(path)})" for name, path in plots]
    return "\n".join(lines) + "\n"


def contents(store: ResultStore) -> tuple[list[dict], list[tuple[str, str, plt.Figure]]]:
    """The per-tensor rows of the report and its (label, file name, figure) plots."""
    result = read_result(store)
    names = list(result)
    title = f"{store.attrs.get('model')}, {store.attrs.get('examples')} examples"
    saliencies = [result[n].saliency for n in names]
    total_saliency = float(sum(np.sum(s) for s in saliencies)) or 1.0
    thresholds = pruning_thresholds(saliencies)
    rows, fractions = [], []
    for name in names:
        tensor = result[name]
        attrs = tensor.attrs
        rows.append({"name": name, "shape": tensor.hessian_diagonal.shape, "engine": attrs.get("engine"),
                     "engine_reason": attrs.get("engine_reason"), "entries": tensor.hessian_diagonal.size,
                     "trace": float(np.sum(tensor.hessian_diagonal)), "negative_entries": int(np.sum(tensor.hessian_diagonal < 0)),
                     "share": float(np.sum(tensor.saliency)) / total_saliency, "validation": attrs.get("validation") or {}})
        fractions.append(pruned_fractions(tensor.saliency, thresholds))
    figures = [
        ("Average trace per tensor", "average_trace.png", _per_layer_trace(names, [r["trace"] / r["entries"] for r in rows], title)),
        ("Global saliency distribution", "saliency_histogram.png", _saliency_histogram(saliencies, thresholds, title)),
        ("Global pruning per tensor", "pruning.png", _pruning_bars(names, fractions, title)),
    ]
    for k, name in enumerate(sorted(names, key=lambda n: -result[n].hessian_diagonal.size)[:HEATMAPS]):
        figures.append((f"Hessian diagonal of {name}", f"heatmap_{k}.png",
                        _heatmap(name, result[name].hessian_diagonal, result[name].dims, title)))
    overall = store.attrs.get("validation") or {}
    figures.append(("Validation", "validation_scatter.png", _validation_scatter(
        {r["name"]: r["validation"] for r in rows}, overall.get("rtol", 0.0), overall.get("atol", 0.0))))
    return rows, figures


def write_report(store: ResultStore, out_dir: str) -> list[str]:
    """Write the plots and report.md into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    rows, figures = contents(store)
    plots = []
    for label, filename, fig in figures:
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots.append((label, path))
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as handle:
        handle.write(_markdown(store.attrs, store_status(store), rows, plots))
    return [path for _, path in plots] + [report]

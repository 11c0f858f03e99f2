"""``hessdiag report``: PNG plots and a Markdown summary of a finished store."""

from __future__ import annotations

import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.status import store_status  # noqa: E402
from pipeline.store import ResultStore  # noqa: E402

UNITS_DIAG = "d²L/dW² (loss / weight²)"
UNITS_GRAD = "dL/dW (loss / weight)"


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _per_channel_pairs(diagonal: np.ndarray) -> np.ndarray:
    """Sum of the diagonal over all axes but (input channel, output channel)."""
    if diagonal.ndim == 2:
        return diagonal
    return np.nansum(diagonal.reshape(-1, diagonal.shape[-2], diagonal.shape[-1]), axis=0)


def _heatmap(diagonal, title) -> plt.Figure:
    pairs = _per_channel_pairs(diagonal)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    zero = pairs == 0
    magnitude = np.ma.masked_array(np.log10(np.where(zero, 1.0, np.abs(pairs))), mask=zero)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    image = ax.imshow(magnitude, aspect="auto", cmap=cmap, origin="lower", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 |sum of d²L/dW² over kernel positions| (loss / weight²)")
    note = f"\ngray: exactly zero ({int(zero.sum())} pairs, e.g. dead ReLU channels)" if zero.any() else ""
    ax.set_xlabel(f"output channel{note}")
    ax.set_ylabel("input channel" if diagonal.ndim > 2 else "input feature")
    ax.set_title(f"Hessian diagonal per (input, output) channel\n{title}")
    fig.tight_layout()
    return fig


def _channel_trace(diagonal, title) -> plt.Figure:
    trace = np.nansum(diagonal.reshape(-1, diagonal.shape[-1]), axis=0)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(np.arange(len(trace)), trace, width=1.0, color="tab:blue")
    ax.set_xlabel("output channel")
    ax.set_ylabel("trace of diagonal block (loss / weight²)")
    ax.set_title(f"Per-output-channel trace of the Hessian diagonal\n{title}")
    fig.tight_layout()
    return fig


def _histogram(values, xlabel, title, log_magnitude) -> plt.Figure:
    data = _finite(values).ravel()
    if log_magnitude:
        zeros = int(np.sum(data == 0))
        data = np.log10(np.abs(data[data != 0]))
        title = f"{title} ({zeros} exact zeros not shown)"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(data, bins=80, color="tab:purple" if log_magnitude else "tab:green")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("number of entries")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    return fig


ERROR_FLOOR = 1e-17


def _validation_scatter(validation) -> plt.Figure:
    """Relative error of each sampled entry against the magnitude of its finite difference, on log axes,
    with the tolerance as a band: an entry passes below rtol + atol / |value|."""
    entries = validation.get("entries", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    rtol, atol = validation.get("rtol", 0.0), validation.get("atol", 0.0)
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
            ax.fill_between(span, ERROR_FLOOR, rtol + atol / span, color="tab:orange", alpha=0.3,
                            label=f"within tolerance (rtol {rtol:g}, atol {atol:g})")
            ax.scatter(magnitude[shown], error, s=18, label="sampled entry", zorder=3)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # a few labelled decades, however many the data span
                axis.set_major_locator(matplotlib.ticker.LogLocator(numticks=5))
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlim(lo, hi)
            ax.set_ylim(ERROR_FLOOR, max(10 * rtol, error.max() * 10, 1e-12))
            ax.legend(fontsize=8, loc="upper right")
        skipped = int((~smooth).sum()) + int((~shown).sum())
        if skipped:
            ax.text(0.02, 0.02, f"{skipped} entries at a kink or exactly zero not shown", transform=ax.transAxes, fontsize=8, color="tab:red")
        ax.set_xlabel(f"|float64 finite difference|, {units}")
        ax.set_ylabel("relative error of the stored value")
        ax.set_title(key.replace("_", " "))
    fig.suptitle(f"Validation: {validation.get('samples', 0)} sampled entries, passed = {validation.get('passed')}")
    fig.tight_layout()
    return fig


def _fmt(value, spec=".3e"):
    return "—" if value is None else format(value, spec)


def _markdown(attrs, status, validation, plots) -> str:
    config = attrs.get("config", {})
    runs = attrs.get("runs", [])
    manifest_seconds = status["compute_seconds"]
    lines = [
        f"# hessdiag report: {attrs.get('model')} / {attrs.get('target_layer')} / {attrs.get('target_weight')}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{status['store']}`.",
        "",
        "| | |", "|---|---|",
        f"| complete | {status['complete']} ({status['units_done']}/{status['units_total']} units, {status['shards_done']}/{status['shards_total']} shards) |",
        f"| weight shape | {tuple(attrs.get('weight_shape', []))} |",
        f"| model | {config.get('model', {}).get('source')} `{config.get('model', {}).get('builder') or config.get('model', {}).get('path')}`, fingerprint `{attrs.get('model_fingerprint', '')[:16]}` |",
        f"| data | {config.get('data', {}).get('source')}, {attrs.get('examples')} examples, batch size {attrs.get('batch_size')} |",
        f"| loss | {attrs.get('loss_name')} = {_fmt(attrs.get('loss'), '.6f')} (mean over the data set) |",
        f"| engine | **{attrs.get('engine')}** (requested `{attrs.get('engine_requested')}`): {attrs.get('engine_reason')} |",
        f"| exact | {attrs.get('exact')} |",
        f"| compute time | {manifest_seconds:.1f} s summed over units; {len(runs)} run(s), wall {sum(r.get('seconds', 0) for r in runs):.1f} s |",
        f"| config fingerprint | `{attrs.get('config_fingerprint', '')[:16]}` |",
        "",
        "## Validation against float64 finite differences",
        "",
        f"samples {validation.get('samples')}, max relative error {_fmt(validation.get('max_rel_error'))} "
        f"(gradient {_fmt(validation.get('max_rel_error_gradient'))}, diagonal {_fmt(validation.get('max_rel_error_hessian_diagonal'))}), "
        f"rtol {validation.get('rtol')}, atol {validation.get('atol')}, passed **{validation.get('passed')}**",
        "",
    ]
    if validation.get("spot_check"):
        spot = validation["spot_check"]
        lines += [f"Spot check with the exact engine: {spot['entries']} entries, max relative difference {spot['max_rel_diff']:.2e}, passed {spot['passed']}.", ""]
    if validation.get("nonsmooth_samples"):
        lines += [f"{validation['nonsmooth_samples']} sampled entries sit at a kink: {validation.get('nonsmooth_note')}.", ""]
    lines += ["| index | diagonal | finite difference | rel. error | gradient | finite difference | rel. error | smooth | passed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in validation.get("entries", []):
        lines.append(
            f"| {tuple(e['index'])} | {e['hessian_diagonal']:.6e} | {e['hessian_diagonal_fd']:.6e} | {e['hessian_diagonal_rel_error']:.2e} "
            f"| {e['gradient']:.6e} | {e['gradient_fd']:.6e} | {e['gradient_rel_error']:.2e} | {e.get('smooth', True)} | {e['passed']} |"
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({os.path.basename(path)})" for name, path in plots]
    return "\n".join(lines) + "\n"


def figures(store: ResultStore) -> list[plt.Figure]:
    """The report's figures, in the order of ``write_report``'s plots."""
    attrs = store.attrs
    gradient, diagonal = store.arrays()
    title = f"{attrs.get('model')}/{attrs.get('target_layer')} {tuple(attrs.get('weight_shape', []))}, engine {attrs.get('engine')}"
    return [
        _heatmap(diagonal, title),
        _channel_trace(diagonal, title),
        _histogram(diagonal, "log10 |d²L/dW²| (loss / weight²)", f"Hessian diagonal magnitudes\n{title}", True),
        _histogram(gradient, UNITS_GRAD, f"Gradient values\n{title}", False),
        _validation_scatter(attrs.get("validation") or {}),
    ]


def write_report(store: ResultStore, out_dir: str) -> list[str]:
    """Write the plots and report.md into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    attrs = store.attrs
    status = store_status(store)
    validation = attrs.get("validation") or {}
    plots = [
        ("Hessian diagonal heat map", os.path.join(out_dir, "diagonal_heatmap.png")),
        ("Per-output-channel trace", os.path.join(out_dir, "channel_trace.png")),
        ("Histogram of log10 |diagonal|", os.path.join(out_dir, "diagonal_histogram.png")),
        ("Histogram of the gradient", os.path.join(out_dir, "gradient_histogram.png")),
        ("Finite-difference validation", os.path.join(out_dir, "validation_scatter.png")),
    ]
    for (_, path), fig in zip(plots, figures(store)):
        fig.savefig(path, dpi=110)
        plt.close(fig)
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as handle:
        handle.write(_markdown(attrs, status, validation, plots))
    return [path for _, path in plots] + [report]

"""Sampled validation of a store against independent float64 finite differences."""

from __future__ import annotations

import numpy as np

from pipeline.config import ValidationConfig
from pipeline.curvature import finite_difference_derivatives
from pipeline.curvature.exact import exact_entries
from pipeline.job import Job
from pipeline.plan import Plan, sample_indices
from pipeline.store import ResultStore


def _errors(actual: np.ndarray, reference: np.ndarray, config: ValidationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(absolute error, relative error, within tolerance) per entry."""
    absolute = np.abs(actual - reference)
    relative = absolute / np.maximum(np.abs(reference), config.atol / config.rtol if config.rtol else config.atol)
    return absolute, relative, absolute <= config.rtol * np.abs(reference) + config.atol


def validate_store(job: Job, store: ResultStore, plan: Plan, config: ValidationConfig, samples: int | None = None) -> dict:
    """Check sampled entries of both arrays; for the factored engine also spot-check with the exact engine."""
    count = config.samples if samples is None else samples
    indices = sample_indices(plan, count, config.seed)
    if not indices:
        return {"samples": 0, "max_rel_error": None, "passed": True, "note": "validation disabled (samples: 0)"}
    c = job.config
    fd = finite_difference_derivatives(
        job.model, c.target.layer, None, None, indices, loss=c.loss.name, from_logits=c.loss.from_logits,
        weight=c.target.weight, step=config.step, batches=job.iter_batches,
    )
    gradient, diagonal = store.values_at(indices)
    g_abs, g_rel, g_ok = _errors(gradient, fd.gradient, config)
    d_abs, d_rel, d_ok = _errors(diagonal, fd.hessian_diagonal, config)
    smooth = fd.smooth
    exact = job.curvature.choice.exact
    entries = [
        {
            "index": list(index),
            "gradient": float(gradient[k]), "gradient_fd": float(fd.gradient[k]), "gradient_rel_error": float(g_rel[k]),
            "hessian_diagonal": float(diagonal[k]), "hessian_diagonal_fd": float(fd.hessian_diagonal[k]),
            "hessian_diagonal_rel_error": float(d_rel[k]),
            "smooth": bool(fd.smooth[k]),
            "passed": bool(not fd.smooth[k] or (g_ok[k] and (d_ok[k] or not exact))),
        }
        for k, index in enumerate(indices)
    ]
    def worst(errors):
        return float(errors[smooth].max()) if smooth.any() else 0.0

    summary = {
        "samples": len(indices),
        "nonsmooth_samples": int((~smooth).sum()),
        "max_rel_error": max(worst(g_rel), worst(d_rel)),
        "max_rel_error_gradient": worst(g_rel),
        "max_rel_error_hessian_diagonal": worst(d_rel),
        "max_abs_error_hessian_diagonal": worst(d_abs),
        "max_abs_error_gradient": worst(g_abs),
        "rtol": config.rtol,
        "atol": config.atol,
        "step": config.step,
        "passed": all(e["passed"] for e in entries) and 2 * int((~smooth).sum()) <= len(indices),
        "entries": entries,
    }
    if not smooth.all():
        summary["nonsmooth_note"] = (
            "entries whose finite differences with steps h and h/2 disagree sit within h of a kink"
            " (ReLU/max-pool), where neither derivative is defined; they are excluded from the errors and"
            " 'passed', and more than half of the samples being non-smooth fails validation"
        )
    if not exact:
        summary["note"] = f"{job.curvature.choice.name} is a stochastic estimate: only the gradient decides 'passed'"
    if job.curvature.choice.name == "factored":
        spot = indices[: min(4, len(indices))]
        reference = exact_entries(job.curvature.problem, job.iter_batches(), spot)
        diff = np.abs(diagonal[: len(spot)] - reference) / np.maximum(np.abs(reference), 1e-12)
        summary["spot_check"] = {
            "engine": "exact",
            "entries": len(spot),
            "max_rel_diff": float(diff.max()),
            "passed": bool(np.all(np.abs(diagonal[: len(spot)] - reference) <= 1e-4 * np.abs(reference) + config.atol)),
        }
        summary["passed"] = summary["passed"] and summary["spot_check"]["passed"]
    return summary

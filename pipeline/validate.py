"""Sampled validation of a store against independent float64 references from loss values, tensor by tensor.

Per tensor, half the samples are its largest-magnitude diagonal entries (where an error matters
most), the rest random, round-robin over its shards. The reference:

* where the tensor's suffix is piecewise linear, float64 differences of the frozen-decision function
  (``frozen_decision_derivatives``): early layers of ReLU networks move thousands of
  pre-activations with one entry, and plain differences then straddle kinks;
* elsewhere, float64 central differences of the loss and its gradient, steps h and h/2; where the two
  disagree by more than a quarter of the tolerance (a kink lies within h, or the derivatives vary
  faster than h resolves), ever smaller steps are tried (``finite_difference_derivatives``);
  entries whose smallest steps still disagree are reported as unresolved.

Unresolved entries never fail a correct result, and never pass a wrong one: a tensor with more than
half of its samples unresolved, and none failed, is reported ``unresolved`` (not passed, not
failed), since it was not checked. A few factored tensors (the first, the last, one between)
are also spot-checked with the exact engine, run on the float64 model: in float32 its own ReLU masks and
max-pool routing can flip near a tie (the factored engine takes its decisions in float64), so a float32
exact engine can be the one that is off.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.config import ValidationConfig
from pipeline.curvature.engines import Engine
from pipeline.curvature.exact import exact_entries
from pipeline.curvature.finite_diff import finite_difference_derivatives, frozen_decision_derivatives
from pipeline.curvature.precision import float64_clone
from pipeline.curvature.problem import Problem
from pipeline.curvature.second_order import rule_layers
from pipeline.curvature.target import located_target
from pipeline.job import Job
from pipeline.plan import Plan, sample_counts, sample_indices
from pipeline.store import ResultStore

SPOT_CHECKS = 2  # entries of a factored tensor re-computed by the exact engine
SPOT_CHECKED_TENSORS = 3  # factored tensors spot-checked (the first, the last and one between): each costs a traced HVP


def _errors(actual: np.ndarray, reference: np.ndarray, config: ValidationConfig,
            resolved: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(absolute error, relative error, within tolerance) per entry. The floor ``atol`` is relative to the largest
    resolved reference entry compared, so a tensor whose entries are all tiny is held to the same standard."""
    absolute = np.abs(actual - reference)
    magnitudes = np.abs(reference[resolved]) if resolved.any() else np.abs(reference)
    floor = config.atol * float(magnitudes.max(initial=0.0))
    relative = absolute / np.maximum(np.abs(reference), max(floor / config.rtol, np.finfo(float).tiny))  # rtol > 0
    return absolute, relative, absolute <= config.rtol * np.abs(reference) + floor


def chosen_indices(store: ResultStore, plan: Plan, tensor: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` distinct entries: the largest |diagonal| entries for half, random ones (every shard) for the rest."""
    if count <= 0:
        return []
    diagonal = store.tensor_arrays(plan.tensors[tensor].name)["hessian_diagonal"]
    magnitude = np.nan_to_num(np.abs(diagonal), nan=-1.0).ravel()
    largest = [tuple(int(i) for i in np.unravel_index(flat, diagonal.shape))
               for flat in np.argsort(-magnitude, kind="stable")[: count // 2]]
    extra = [index for index in sample_indices(plan, tensor, count, seed) if index not in largest]
    return largest + extra[: count - len(largest)]


def _worst(errors: np.ndarray, resolved: np.ndarray) -> float:
    return float(errors[resolved].max()) if resolved.any() else 0.0


def precision_advice(validation: dict, engines: dict[str, Engine], precision: str) -> str | None:
    """What to try when tensors whose engine takes ``compute.precision`` failed validation in float32: their float64
    references may show the model's own float32 rounding (a forward pass that loses digits), which float64 removes."""
    failed = [name for name in validation.get("failed", []) if name in engines and engines[name].takes_precision]
    if not failed or precision != "float32":
        return None
    return (f"{', '.join(failed)} ran on the exact engine in float32; where the model's float32 forward pass loses digits,"
            " `compute.precision: float64` computes them in float64 (a new run: --set compute.precision=float64 --overwrite)")


def spot_checked(job: Job, plan: Plan) -> set[int]:
    """The factored tensors whose entries the exact engine re-computes: the first, the last and ones evenly between."""
    factored = [i for i, t in enumerate(plan.tensors) if job.curvature.choices[t.name].exact
                and not job.curvature.choices[t.name].engine.needs_audit]
    if len(factored) <= SPOT_CHECKED_TENSORS:
        return set(factored)
    return {factored[int(round(k))] for k in np.linspace(0, len(factored) - 1, SPOT_CHECKED_TENSORS)}


def validate_tensor(job: Job, store: ResultStore, plan: Plan, tensor: int, indices, config: ValidationConfig,
                    model64: keras.Model, spot_check: bool = False) -> dict:
    """One tensor's validation summary, with each sampled entry (``model64``: the model's float64 clone)."""
    spec = plan.tensors[tensor]
    target = job.targets[tensor]
    c = job.config
    check = job.curvature.checks[spec.name]
    choice = job.curvature.choices[spec.name]
    options = dict(loss=c.loss.name, from_logits=c.loss.from_logits, weight=target.weight.name, batches=job.iter_batches,
                   model64=model64)
    if check.piecewise_linear:
        reference = frozen_decision_derivatives(job.model, target.path, indices, peel_softmax=check.peel_softmax, **options)
        method = "frozen-decision differences"
    else:
        reference = finite_difference_derivatives(job.model, target.path, None, None, indices, step=config.step,
                                                rtol=config.rtol, atol=config.atol, **options)
        method = "finite differences"
    gradient = store.values_at(spec.name, "gradient", indices)
    diagonal = store.values_at(spec.name, "hessian_diagonal", indices)
    resolved = reference.smooth
    _, g_rel, g_ok = _errors(gradient, reference.gradient, config, resolved)
    _, d_rel, d_ok = _errors(diagonal, reference.hessian_diagonal, config, resolved)
    entries = [
        {"index": list(index), "gradient": float(gradient[k]), "gradient_fd": float(reference.gradient[k]),
         "gradient_rel_error": float(g_rel[k]), "hessian_diagonal": float(diagonal[k]),
         "hessian_diagonal_fd": float(reference.hessian_diagonal[k]), "hessian_diagonal_rel_error": float(d_rel[k]),
         "smooth": bool(resolved[k]), "passed": bool(not resolved[k] or (g_ok[k] and (d_ok[k] or not choice.exact)))}
        for k, index in enumerate(indices)
    ]
    unresolved = int((~resolved).sum())
    failed = not all(e["passed"] for e in entries)
    summary = {
        "samples": len(indices), "reference": method, "nonsmooth_samples": unresolved,
        "max_rel_error": max(_worst(g_rel, resolved), _worst(d_rel, resolved) if choice.exact else 0.0),
        "max_rel_error_gradient": _worst(g_rel, resolved), "max_rel_error_hessian_diagonal": _worst(d_rel, resolved),
        "passed": not failed and 2 * unresolved <= len(indices),
        "unresolved": not failed and 2 * unresolved > len(indices),
        "entries": entries,
    }
    if not choice.exact:
        summary["note"] = f"{choice.name} is a stochastic estimate: only the gradient decides 'passed'"
    if spot_check:
        spot = indices[:SPOT_CHECKS]
        checker = located_target(model64, target.path, target.weight.name)
        problem = Problem(checker, job.loss, rule_layers(checker))
        exact = exact_entries(problem, job.iter_batches(), spot)
        found = diagonal[: len(spot)]
        summary["spot_check"] = {
            "engine": "exact", "precision": str(checker.variable.dtype), "entries": len(spot),
            "max_rel_diff": float((np.abs(found - exact) / np.maximum(np.abs(exact), 1e-12)).max()),
            "passed": bool(np.all(np.abs(found - exact) <= 1e-4 * np.abs(exact) + config.atol * np.abs(exact).max())),
        }
        if not summary["spot_check"]["passed"]:
            summary["passed"] = summary["unresolved"] = False
    return summary


def validate_store(job: Job, store: ResultStore, plan: Plan, config: ValidationConfig, samples: int | None = None) -> dict:
    """Validate every tensor (at least two samples each, more for larger ones) and record each summary in its
    group and the overall one at the root; returns the overall one."""
    total = config.samples if samples is None else samples
    counts = sample_counts(plan, total)
    if not any(counts):
        summary = {"samples": 0, "max_rel_error": None, "passed": True, "note": "validation disabled (samples: 0)", "tensors": {}}
        store.update_attrs(validation=summary)
        return summary
    per_tensor = {}
    checked = spot_checked(job, plan)
    model64 = float64_clone(job.model)  # one float64 copy for every tensor's reference
    for index, spec in enumerate(plan.tensors):
        indices = chosen_indices(store, plan, index, counts[index], config.seed)
        per_tensor[spec.name] = validate_tensor(job, store, plan, index, indices, config, model64,
                                                spot_check=index in checked)
        store.update_tensor_attrs(spec.name, validation=per_tensor[spec.name])
    brief = {name: {k: v for k, v in result.items() if k != "entries"} for name, result in per_tensor.items()}
    summary = {
        "samples": sum(r["samples"] for r in per_tensor.values()),
        "nonsmooth_samples": sum(r["nonsmooth_samples"] for r in per_tensor.values()),
        "max_rel_error": max(r["max_rel_error"] for r in per_tensor.values()),
        "max_rel_error_gradient": max(r["max_rel_error_gradient"] for r in per_tensor.values()),
        "max_rel_error_hessian_diagonal": max(r["max_rel_error_hessian_diagonal"] for r in per_tensor.values()),
        "rtol": config.rtol, "atol": config.atol, "step": config.step,
        "passed": all(r["passed"] for r in per_tensor.values()),
        "failed": [name for name, r in per_tensor.items() if not r["passed"] and not r["unresolved"]],
        "unresolved": [name for name, r in per_tensor.items() if r["unresolved"]],
        "tensors": brief,
    }
    store.update_attrs(validation=summary)
    return summary

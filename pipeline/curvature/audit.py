"""Audit of second derivatives through Keras layers and activations.

For each layer the autodiff Hessian (forward-over-reverse, vectorized over
directions by ``tf.vectorized_map``: as the engines take it) of a scalar function of the layer's output is compared, at sampled diagonal
and off-diagonal entries, with float64 central differences of function VALUES,
Richardson-extrapolated over steps h and h/2. No autodiff enters the reference.

Every audited point is one row of a batch, so all difference quotients are one
layer call (inference-mode layers treat examples independently); all Hessian
entries are one vectorized product.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import math
import multiprocessing
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature.autodiff import hvp
from pipeline.curvature.layer_facts import ACTIVATIONS, FACTS, second_order_rules

TABLE_PATH = Path(__file__).with_name("audit_table.json")
RTOL = 1e-5
STEP = 1e-3


@dataclass(frozen=True)
class AuditResult:
    """Largest disagreement between autodiff and value differences, relative to the largest entry."""

    label: str
    passed: bool
    max_rel_error: float
    entries: int
    detail: str = ""
    xla: dict | None = None  # the same check with the products compiled by XLA: {"passed", "max_rel_error", "detail"}


def _scalar_weights(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=size), rng.normal(size=size)


def audit_function(fn: Callable[[list[tf.Tensor]], object], shapes: Sequence[tuple[int, ...]], label: str, *,
                   seed: int = 0, entries: int = 8, pairs: int = 8, step: float = STEP, rtol: float = RTOL,
                   xla: bool = True) -> AuditResult:
    """Audit ``fn`` (float64 tensors of ``shapes`` with a leading batch axis -> nested outputs).

    With ``xla`` the products are also checked compiled by XLA (``jit_compile``), as the exact engine
    runs them where every layer passes that way too: XLA lowers each op its own way.
    """
    rng = np.random.default_rng(seed)
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    theta0 = rng.normal(size=total)

    def unpack(theta: tf.Tensor) -> list[tf.Tensor]:
        parts = tf.split(theta, sizes, axis=1)
        return [tf.reshape(p, (-1, *s)) for p, s in zip(parts, shapes)]

    def outputs(theta: tf.Tensor) -> tf.Tensor:
        flat = [tf.reshape(tf.cast(t, tf.float64), (tf.shape(theta)[0], -1)) for t in keras.tree.flatten(fn(unpack(theta)))]
        return tf.concat(flat, axis=1)

    width = int(outputs(tf.constant(theta0[None])).shape[1])
    c1, c2 = (tf.constant(c) for c in _scalar_weights(width, rng))

    def scalar(theta: tf.Tensor) -> tf.Tensor:
        y = outputs(theta)
        return tf.linalg.matvec(y, c1) + 0.5 * tf.linalg.matvec(tf.square(y), c2)

    diag_ids = rng.choice(total, size=min(entries, total), replace=False)
    pair_ids = [tuple(rng.choice(total, size=2, replace=False)) for _ in range(pairs if total > 1 else 0)]
    points = [theta0]

    def unit(i):
        e = np.zeros(total)
        e[i] = 1.0
        return e

    for i in diag_ids:
        for h in (step, step / 2):
            points += [theta0 + h * unit(i), theta0 - h * unit(i)]
    for i, j in pair_ids:
        for h in (step, step / 2):
            points += [theta0 + h * (si * unit(i) + sj * unit(j)) for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
    values = scalar(tf.constant(np.stack(points))).numpy()
    base, cursor = values[0], 1
    quotients = []  # (D(h), D(h/2)) per entry
    for _ in diag_ids:
        d = []
        for h in (step, step / 2):
            d.append((values[cursor] - 2 * base + values[cursor + 1]) / h**2)
            cursor += 2
        quotients.append(d)
    for _ in pair_ids:
        d = []
        for h in (step, step / 2):
            pp, pm, mp, mm = values[cursor : cursor + 4]
            d.append((pp - pm - mp + mm) / (4 * h**2))
            cursor += 4
        quotients.append(d)
    quotients = np.array(quotients)
    reference = (4 * quotients[:, 1] - quotients[:, 0]) / 3
    scale = max(float(np.abs(reference).max()), 1e-8)
    smooth = np.abs(quotients[:, 0] - quotients[:, 1]) <= 1e-3 * scale + 1e-6

    directions = np.stack([unit(i) for i in diag_ids] + [unit(j) for _, j in pair_ids])
    rows = np.array(list(diag_ids) + [i for i, _ in pair_ids])
    if not smooth.any():
        return AuditResult(label, False, math.inf, 0, "no sampled entry is smooth")
    theta = tf.constant(theta0[None])
    rounding = 10 * np.finfo(np.float64).eps * float(np.abs(values).max()) / (step / 2) ** 2 / scale

    def products(v):  # as the engines take them: forward-over-reverse at a zero offset, vectorized over directions
        return tf.vectorized_map(lambda u: hvp(lambda d: tf.reduce_sum(scalar(theta + d)), tf.zeros_like(theta), u[None])[0], v)

    directions = tf.constant(directions)
    try:
        traced = tf.function(products).get_concrete_function(directions)
    except Exception as exc:  # noqa: BLE001 - any autodiff failure is the finding
        traced = exc

    def run(jit_compile: bool) -> np.ndarray:
        if isinstance(traced, Exception):
            raise traced
        if not jit_compile:
            return traced(directions).numpy()
        # XLA compiles the very graph traced for the graph run, as the exact engine does
        return tf.function(lambda v: traced(v), jit_compile=True)(directions).numpy()

    def check(jit_compile: bool) -> tuple[bool, float, str]:
        try:
            found = run(jit_compile)
        except Exception as exc:  # noqa: BLE001 - any autodiff failure is the finding
            return False, math.inf, f"autodiff failed: {_failure(exc)}"
        error = float(np.abs(found[np.arange(len(rows)), rows] - reference)[smooth].max()) / scale
        passed = bool(np.isfinite(error) and error <= rtol + rounding)
        return passed, error, "" if passed else f"largest entry {scale:.3e}"

    passed, error, detail = check(False)
    compiled = dict(zip(("passed", "max_rel_error", "detail"), check(True))) if xla else None
    return AuditResult(label, passed, error, int(smooth.sum()), detail, compiled)


def _failure(exc: Exception) -> str:
    """The informative part of a (possibly traced, ANSI-coloured) TensorFlow error, on one line, without
    the run-specific names of traced functions."""
    unsupported = re.findall(r"XLA_\w+_JIT: (\w+) \(", str(exc))
    if unsupported:
        return f"XLA has no kernel for {', '.join(sorted(set(unsupported)))} here"
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith("File ") and not line.endswith("in user code:")]
    errors = [i for i, line in enumerate(lines) if "Error" in line]
    picked = lines[errors[-1]:errors[-1] + 2] if errors else lines[:1]
    text = " ".join(picked) if errors else f"{type(exc).__name__}: {' '.join(picked)}"
    return text[:200]


def _randomize(layer: keras.layers.Layer, rng: np.random.Generator) -> None:
    """Weights away from their initial values (variances stay positive), so no term vanishes by accident."""
    for w in layer.weights:
        shape = tuple(w.shape)
        value = rng.uniform(0.5, 1.5, shape) if "variance" in w.path else 0.5 * rng.normal(size=shape)
        w.assign(value.astype(w.dtype))


@dataclass(frozen=True)
class LayerCase:
    """One configuration of a Keras layer type (or an activation through an Activation layer)."""

    label: str
    kind: str  # "layer" or "activation"
    key: str  # the layer class name or the activation name
    make: Callable[[], keras.layers.Layer]
    shapes: tuple[tuple[int, ...], ...]
    call: Callable = field(default=lambda layer, xs: layer(xs[0] if len(xs) == 1 else xs, training=False))

    def layer(self, seed: int = 0) -> keras.layers.Layer:
        layer = self.make()
        self.call(layer, [tf.zeros((1, *s), tf.float64) for s in self.shapes])
        _randomize(layer, np.random.default_rng(seed))
        return layer

    def run(self, rules: bool, seed: int = 0, xla: bool = True) -> AuditResult:
        try:
            layer = self.layer(seed)
        except Exception as exc:  # noqa: BLE001 - a layer that cannot run in float64 cannot be verified
            return AuditResult(self.label, False, math.inf, 0, f"cannot evaluate in float64: {type(exc).__name__}")

        def fn(xs):
            if not rules:
                return self.call(layer, xs)
            with second_order_rules([layer]):
                return self.call(layer, xs)

        return audit_function(fn, self.shapes, self.label, seed=seed, xla=xla)


F64 = {"dtype": "float64"}
_L = keras.layers
# Every layer type's audit configurations, from its facts, in the table's order; keyed by their class name.
_AUDITED = [(case.label.split("(")[0], case, facts) for facts in FACTS.values() for case in facts.audit]
LAYER_CASES: tuple[LayerCase, ...] = tuple(
    LayerCase(case.label, "layer", key, lambda case=case: case.make(**F64), case.shapes, case.call)
    for key, case, _ in _AUDITED
)
_AUDITED_FACTS = {key: facts for key, _, facts in _AUDITED}

def _takes_one_tensor(fn) -> bool:
    required = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    return len(required) == 1


# Every Keras activation usable by name (``threshold`` needs extra arguments and is not).
ACTIVATION_NAMES = tuple(
    name for name in dir(keras.activations)
    if not name.startswith("_") and name not in {"get", "serialize", "deserialize"}
    and _takes_one_tensor(getattr(keras.activations, name))
)
ACTIVATION_CASES: tuple[LayerCase, ...] = tuple(
    LayerCase(name, "activation", name, lambda name=name: _L.Activation(name, dtype="float64"), ((6,),))
    for name in ACTIVATION_NAMES
)
REGISTERED_CASES = LAYER_CASES + ACTIVATION_CASES


def _rule_of(case: LayerCase) -> tuple | None:
    if case.kind == "layer":
        return _AUDITED_FACTS[case.key].second_order
    facts = ACTIVATIONS.get(case.key)
    return None if facts is None else facts.second_order


def _audit(case: LayerCase) -> tuple[dict, dict]:
    """(autodiff alone, with the rule) for one case; the rule's run only where it has one, and compiled
    by XLA only as the engines would run it: with the rule."""
    if not _rule_of(case):
        raw = asdict(case.run(rules=False))
        return raw, raw
    return asdict(case.run(rules=False, xla=False)), asdict(case.run(rules=True))


def _audit_registered(index: int) -> tuple[dict, dict]:
    return _audit(REGISTERED_CASES[index])


def run_audit(cases: Sequence[LayerCase] | None = None, workers: int = 1) -> dict:
    """The audit table: per layer type and activation, whether autodiff is exact, the rule, and the result with it.

    ``cases`` defaults to every registered layer and activation case; those can be spread over
    ``workers`` processes (tracing is single-threaded Python), with the same table as one process.
    """
    if cases is None and workers > 1:
        context = multiprocessing.get_context("spawn")  # TensorFlow must not be forked
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_audit_registered, range(len(REGISTERED_CASES))))
        cases = REGISTERED_CASES
    else:
        cases = REGISTERED_CASES if cases is None else cases
        results = [_audit(case) for case in cases]
    table: dict[str, dict] = {"layers": {}, "activations": {}}
    for case, (raw, ruled) in zip(cases, results):
        section = table["layers" if case.kind == "layer" else "activations"]
        found = _rule_of(case)
        entry = section.setdefault(case.key, {"rule": found[0] if found else None, "autodiff_exact": True, "verified": True,
                                              "xla_verified": True, "cases": []})
        entry["autodiff_exact"] &= raw["passed"]
        entry["verified"] &= ruled["passed"]
        entry["xla_verified"] &= ruled["passed"] and ruled["xla"]["passed"]
        entry["cases"].append({"label": case.label, "autodiff": raw, "with_rule": ruled})
    return table


def load_table() -> dict:
    return json.loads(TABLE_PATH.read_text())


def render_markdown(table: dict) -> str:
    """The verified-layers section of the README, rendered from the audit table."""

    def row(key: str, entry: dict) -> str:
        if entry["autodiff_exact"]:
            status = "verified"
        elif entry["verified"]:
            status = f"verified with a rule: {entry['rule']}"
        else:
            reasons = sorted({c["with_rule"]["detail"] for c in entry["cases"] if not c["with_rule"]["passed"]})
            status = "**refused**: " + "; ".join(r or "fails the audit" for r in reasons)
        worst = max(c["with_rule"]["max_rel_error"] for c in entry["cases"])
        if entry["xla_verified"]:
            compiled = f"verified, {max(c['with_rule']['xla']['max_rel_error'] for c in entry['cases']):.1e}"
        elif entry["verified"]:
            compiled = "; ".join(sorted({c["with_rule"]["xla"]["detail"] for c in entry["cases"] if not c["with_rule"]["xla"]["passed"]}))
        else:
            compiled = "—"
        return f"| `{key}` | {len(entry['cases'])} | {status} | {worst:.1e} | {compiled or 'fails the audit'} |"

    lines = [
        f"Audit: autodiff Hessian entries (forward-over-reverse, as the engines take them) of a scalar function"
        f" through each layer, against float64 differences of function values (Richardson over h = {STEP:g}"
        f" and h/2); passes at {RTOL:g} of the largest entry. The last column is the same check with the products"
        " compiled by XLA, as the exact engine runs them when every layer and activation after the target passes it."
        " Regenerate with `scripts/gen_audit_table.py`.",
        "",
        "| layer type | configurations | second derivatives | worst rel. error | compiled by XLA |",
        "|---|---|---|---|---|",
        *(row(k, e) for k, e in table["layers"].items()),
        "",
        "| activation | configurations | second derivatives | worst rel. error | compiled by XLA |",
        "|---|---|---|---|---|",
        *(row(k, e) for k, e in table["activations"].items()),
    ]
    return "\n".join(lines) + "\n"

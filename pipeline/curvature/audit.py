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
from pipeline.curvature.layer_rules import ACTIVATION_RULES, LAYER_RULES, second_order_rules

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
    points, eye = [theta0], np.eye(total)
    for i in diag_ids:
        for h in (step, step / 2):
            points += [theta0 + h * eye[i], theta0 - h * eye[i]]
    for i, j in pair_ids:
        for h in (step, step / 2):
            points += [theta0 + h * (si * eye[i] + sj * eye[j]) for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
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

    directions = np.stack([eye[i] for i in diag_ids] + [eye[j] for _, j in pair_ids])
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
VEC, SEQ, IMG, VOL = (6,), (4, 6), (5, 5, 4), (4, 4, 4, 2)
_L = keras.layers


def _layer(label, make, *shapes, call=None, key=None):
    make_f64 = lambda: make(**F64)  # noqa: E731
    key = key or label.split("(")[0]
    return LayerCase(label, "layer", key, make_f64, shapes, call) if call else LayerCase(label, "layer", key, make_f64, shapes)


def _self_attention(layer, xs):
    return layer(xs[0], xs[0], training=False)


LAYER_CASES: tuple[LayerCase, ...] = (
    _layer("Dense", lambda **k: _L.Dense(5, **k), VEC),
    _layer("EinsumDense", lambda **k: _L.EinsumDense("...b,bc->...c", output_shape=5, bias_axes="c", **k), SEQ),
    _layer("Conv1D", lambda **k: _L.Conv1D(3, 3, **k), SEQ),
    _layer("Conv2D", lambda **k: _L.Conv2D(3, 3, padding="same", **k), IMG),
    _layer("Conv2D(strided, dilated)", lambda **k: _L.Conv2D(3, 2, strides=2, **k), IMG),
    _layer("Conv3D", lambda **k: _L.Conv3D(2, 2, **k), VOL),
    _layer("DepthwiseConv2D", lambda **k: _L.DepthwiseConv2D(3, **k), IMG),
    _layer("SeparableConv2D", lambda **k: _L.SeparableConv2D(3, 3, **k), IMG),
    _layer("Conv2DTranspose", lambda **k: _L.Conv2DTranspose(3, 3, **k), IMG),
    _layer("Conv1DTranspose", lambda **k: _L.Conv1DTranspose(3, 3, **k), SEQ),
    _layer("DepthwiseConv1D", lambda **k: _L.DepthwiseConv1D(3, **k), SEQ),
    _layer("SeparableConv1D", lambda **k: _L.SeparableConv1D(3, 3, **k), SEQ),
    _layer("MaxPooling1D", lambda **k: _L.MaxPooling1D(**k), SEQ),
    _layer("MaxPooling1D(2, strides 1, same)", lambda **k: _L.MaxPooling1D(2, strides=1, padding="same", **k), (6, 3)),
    _layer("MaxPooling2D", lambda **k: _L.MaxPooling2D(**k), IMG),
    _layer("MaxPooling2D(2, strides 1, same)", lambda **k: _L.MaxPooling2D(2, strides=1, padding="same", **k), (6, 6, 3)),
    _layer("MaxPooling2D(3, strides 2)", lambda **k: _L.MaxPooling2D(3, strides=2, **k), IMG),
    _layer("MaxPooling3D", lambda **k: _L.MaxPooling3D(**k), VOL),
    _layer("AveragePooling1D", lambda **k: _L.AveragePooling1D(2, **k), SEQ),
    _layer("AveragePooling2D", lambda **k: _L.AveragePooling2D(2, **k), IMG),
    _layer("AveragePooling2D(3, strides 1, same)", lambda **k: _L.AveragePooling2D(3, strides=1, padding="same", **k), IMG),
    _layer("AveragePooling3D", lambda **k: _L.AveragePooling3D(2, **k), VOL),
    _layer("GlobalMaxPooling1D", lambda **k: _L.GlobalMaxPooling1D(**k), SEQ),
    _layer("GlobalMaxPooling2D", lambda **k: _L.GlobalMaxPooling2D(**k), IMG),
    _layer("GlobalMaxPooling3D", lambda **k: _L.GlobalMaxPooling3D(**k), VOL),
    _layer("GlobalAveragePooling1D", lambda **k: _L.GlobalAveragePooling1D(**k), SEQ),
    _layer("GlobalAveragePooling2D", lambda **k: _L.GlobalAveragePooling2D(**k), IMG),
    _layer("GlobalAveragePooling3D", lambda **k: _L.GlobalAveragePooling3D(**k), VOL),
    _layer("Flatten", lambda **k: _L.Flatten(**k), IMG),
    _layer("Reshape", lambda **k: _L.Reshape((25, 4), **k), IMG),
    _layer("Permute", lambda **k: _L.Permute((2, 1), **k), SEQ),
    _layer("RepeatVector", lambda **k: _L.RepeatVector(3, **k), VEC),
    _layer("ZeroPadding1D", lambda **k: _L.ZeroPadding1D(1, **k), SEQ),
    _layer("ZeroPadding2D", lambda **k: _L.ZeroPadding2D(1, **k), IMG),
    _layer("ZeroPadding3D", lambda **k: _L.ZeroPadding3D(1, **k), VOL),
    _layer("Cropping1D", lambda **k: _L.Cropping1D(1, **k), SEQ),
    _layer("Cropping2D", lambda **k: _L.Cropping2D(1, **k), IMG),
    _layer("Cropping3D", lambda **k: _L.Cropping3D(1, **k), VOL),
    _layer("UpSampling1D", lambda **k: _L.UpSampling1D(2, **k), SEQ),
    _layer("UpSampling2D", lambda **k: _L.UpSampling2D(2, **k), IMG),
    _layer("UpSampling3D", lambda **k: _L.UpSampling3D(2, **k), VOL),
    _layer("Add", lambda **k: _L.Add(**k), VEC, VEC),
    _layer("Subtract", lambda **k: _L.Subtract(**k), VEC, VEC),
    _layer("Multiply", lambda **k: _L.Multiply(**k), VEC, VEC),
    _layer("Average", lambda **k: _L.Average(**k), VEC, VEC),
    _layer("Maximum", lambda **k: _L.Maximum(**k), VEC, VEC),
    _layer("Minimum", lambda **k: _L.Minimum(**k), VEC, VEC),
    _layer("Concatenate", lambda **k: _L.Concatenate(**k), VEC, VEC),
    _layer("Dot", lambda **k: _L.Dot(axes=1, **k), VEC, VEC),
    _layer("Dot(normalize)", lambda **k: _L.Dot(axes=1, normalize=True, **k), VEC, VEC),
    _layer("BatchNormalization", lambda **k: _L.BatchNormalization(**k), IMG),
    _layer("LayerNormalization", lambda **k: _L.LayerNormalization(**k), VEC),
    _layer("LayerNormalization(axis=(1, 2))", lambda **k: _L.LayerNormalization(axis=(1, 2), **k), SEQ),
    _layer("LayerNormalization(no center, no scale)", lambda **k: _L.LayerNormalization(center=False, scale=False, **k), SEQ),
    _layer("LayerNormalization(rms_scaling)", lambda **k: _L.LayerNormalization(rms_scaling=True, **k), VEC),
    _layer("GroupNormalization", lambda **k: _L.GroupNormalization(groups=2, **k), IMG),
    _layer("GroupNormalization(groups=-1)", lambda **k: _L.GroupNormalization(groups=-1, **k), SEQ),
    _layer("RMSNormalization", lambda **k: _L.RMSNormalization(**k), SEQ),
    _layer("UnitNormalization", lambda **k: _L.UnitNormalization(**k), SEQ),
    _layer("Dropout", lambda **k: _L.Dropout(0.5, **k), VEC),
    _layer("SpatialDropout1D", lambda **k: _L.SpatialDropout1D(0.5, **k), SEQ),
    _layer("SpatialDropout2D", lambda **k: _L.SpatialDropout2D(0.5, **k), IMG),
    _layer("SpatialDropout3D", lambda **k: _L.SpatialDropout3D(0.5, **k), VOL),
    _layer("GaussianDropout", lambda **k: _L.GaussianDropout(0.5, **k), VEC),
    _layer("GaussianNoise", lambda **k: _L.GaussianNoise(0.5, **k), VEC),
    _layer("AlphaDropout", lambda **k: _L.AlphaDropout(0.5, **k), VEC),
    _layer("ActivityRegularization", lambda **k: _L.ActivityRegularization(l2=0.1, **k), VEC),
    _layer("Identity", lambda **k: _L.Identity(**k), VEC),
    _layer("ReLU", lambda **k: _L.ReLU(**k), VEC),
    _layer("LeakyReLU", lambda **k: _L.LeakyReLU(**k), VEC),
    _layer("PReLU", lambda **k: _L.PReLU(**k), VEC),
    _layer("ELU", lambda **k: _L.ELU(**k), VEC),
    _layer("Softmax", lambda **k: _L.Softmax(**k), VEC),
    _layer("MultiHeadAttention", lambda **k: _L.MultiHeadAttention(num_heads=2, key_dim=3, **k), SEQ, call=_self_attention),
    _layer("GroupQueryAttention", lambda **k: _L.GroupQueryAttention(head_dim=3, num_query_heads=2, num_key_value_heads=1, **k),
           SEQ, call=_self_attention),
    _layer("Attention", lambda **k: _L.Attention(**k), SEQ, SEQ),
    _layer("AdditiveAttention", lambda **k: _L.AdditiveAttention(**k), SEQ, SEQ),
    _layer("SimpleRNN", lambda **k: _L.SimpleRNN(3, **k), SEQ),
    _layer("GRU", lambda **k: _L.GRU(3, **k), SEQ),
    _layer("LSTM", lambda **k: _L.LSTM(3, **k), SEQ),
)

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
    LayerCase(name, "activation", name, lambda name=name: _L.Activation(name, dtype="float64"), (VEC,))
    for name in ACTIVATION_NAMES
)
REGISTERED_CASES = LAYER_CASES + ACTIVATION_CASES


def _rule_of(case: LayerCase) -> tuple | None:
    return LAYER_RULES.get(getattr(_L, case.key, None)) if case.kind == "layer" else ACTIVATION_RULES.get(case.key)


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

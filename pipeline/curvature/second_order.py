"""Which layers after the target have trustworthy second derivatives, and which need a rule.

Engines that take Hessian-vector products (exact, hutchinson) differentiate the
suffix twice. Every Keras layer type and activation there must be verified by
the audit table (``audit_table.json``, with its rule where it needs one). A
layer type or activation function the table does not know (a custom layer) is
audited on the spot, on a float64 copy of that very layer. Anything that fails
is refused before any compute, naming the layer. Where every layer and activation
also passes with the products compiled by XLA, the exact engine compiles them so.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature.audit import AuditResult, audit_function, load_table
from pipeline.curvature.layer_facts import activation_name, is_keras_activation, rule_for, second_order_rules
from pipeline.curvature.suffix import suffix_operations
from pipeline.curvature.target import Target
from pipeline.errors import BadInputError


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return load_table()


def _is_keras_class(layer) -> bool:
    return getattr(keras.layers, type(layer).__name__, None) is type(layer)


SMALL_SIDE = 4  # audited inputs keep their channels and shrink every other axis to at most this
AUDIT_MAX_ENTRIES = 4096  # an input the operation needs at its own size is audited only up to this size


def _float64_copy(operation, shapes):
    """A float64 copy of ``operation`` (same config and weights) and a function calling it as its node does, built
    for per-example input ``shapes``."""
    node = operation._inbound_nodes[0]
    tensors = node.arguments.keras_tensors
    config = operation.get_config()
    clone = type(operation).from_config({**config, "dtype": "float64"} if isinstance(operation, keras.layers.Layer) else config)

    def call(xs):
        args, kwargs = node.arguments.fill_in({id(t): x for t, x in zip(tensors, xs)})
        with second_order_rules([clone]):
            return clone(*args, **kwargs)

    call([tf.zeros((1, *s), tf.float64) for s in shapes])
    if isinstance(operation, keras.layers.Layer):
        clone.set_weights([np.asarray(w, np.float64) for w in operation.get_weights()])
    return call


_AUDITED: "weakref.WeakKeyDictionary[object, AuditResult]" = weakref.WeakKeyDictionary()


def audit_layer_instance(operation) -> AuditResult:
    """Audit a float64 copy of ``operation`` (a layer with its weights, or a ``keras.ops`` node), called as the
    model calls it, on a small input of the same shape class: its channels, every other axis at most
    ``SMALL_SIDE``; at its own size only where it needs that and it is small. Each operation is audited once per
    process: every target before it shares the result."""
    if operation not in _AUDITED:
        _AUDITED[operation] = _audit_instance(operation)
    return _AUDITED[operation]


def _audit_instance(operation) -> AuditResult:
    label = f"{operation.name} ({type(operation).__name__})"
    try:
        tensors = operation._inbound_nodes[0].arguments.keras_tensors
        full = [tuple(int(d) for d in t.shape[1:]) for t in tensors]
    except Exception as exc:  # noqa: BLE001 - an operation without a node cannot be called as the model calls it
        return AuditResult(label, False, float("inf"), 0, f"cannot be audited ({type(exc).__name__}: {exc})"[:300])
    small = [tuple(min(d, SMALL_SIDE) for d in s[:-1]) + s[-1:] for s in full]
    failures = []
    for shapes in (small, full) if small != full else (full,):
        entries = sum(int(np.prod(s)) for s in shapes)
        if shapes is full and small != full and entries > AUDIT_MAX_ENTRIES:
            break
        try:
            call = _float64_copy(operation, shapes)
        except Exception as exc:  # noqa: BLE001 - a copy that cannot run in float64 at this size
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        return audit_function(call, shapes, f"{label} on inputs {', '.join(map(str, shapes))}")
    detail = "; ".join(failures) or "no input small enough to audit"
    return AuditResult(label, False, float("inf"), 0,
                       f"cannot be audited in float64 on an input of at most {AUDIT_MAX_ENTRIES} entries ({detail})"[:300])


def audit_activation(name: str, fn) -> AuditResult:
    return audit_function(lambda xs: fn(xs[0]), [(6,)], f"activation {name!r}")


@dataclass(frozen=True)
class SecondOrderCheck:
    """The layers to evaluate under their rules, what the rules are, and what was audited on the spot."""

    rule_layers: tuple[keras.layers.Layer, ...]
    rules: tuple[str, ...]
    audited: tuple[str, ...]
    not_xla_verified: tuple[str, ...] = ()  # layers and activations whose XLA-compiled products failed the audit

    @property
    def xla(self) -> bool:
        """True when Hessian-vector products through the suffix may be compiled by XLA."""
        return not self.not_xla_verified


def rule_layers(target: Target) -> tuple[keras.layers.Layer, ...]:
    """The target and every operation after it (nested models flattened): the ones that rules may patch."""
    return (target.layer, *suffix_operations(target))


def _refuse(layer, what: str, result: AuditResult) -> None:
    raise BadInputError(
        f"layer {layer.name!r} ({type(layer).__name__}): {what} has second derivatives that TensorFlow gets wrong"
        f" and no rule fixes ({result.detail or f'relative error {result.max_rel_error:.2e}'});"
        " engines 'exact' and 'hutchinson' would be wrong here. Use engine 'factored' if the suffix is piecewise linear."
    )


def _verify(entry: dict | None, key: str, audit, refuse, audited: list[str]) -> bool:
    """Refuse unless the table ``entry`` (or, without one, ``audit()`` on the spot) verifies the second
    derivatives; return whether they are verified compiled by XLA too."""
    if entry is None:
        result = audit()
        audited.append(f"{result.label}: max rel. error {result.max_rel_error:.1e}")
        if not result.passed:
            refuse(result)
        return result.xla["passed"]
    if not entry["verified"]:
        refuse(AuditResult(key, False, float("inf"), 0, "failed the audit"))
    return entry["xla_verified"]


def check_second_order(target: Target) -> SecondOrderCheck:
    """Verify every layer and activation after the target; raise BadInputError naming the first that fails."""
    table = _table()
    layers = rule_layers(target)
    audited, not_xla = [], []
    for layer in layers:
        if layer is not target.layer:
            key = type(layer).__name__
            entry = table["layers"].get(key) if _is_keras_class(layer) else None
            what = "this layer" if entry is None else "this layer type"
            if not _verify(entry, key, lambda: audit_layer_instance(layer), lambda r: _refuse(layer, what, r), audited):
                not_xla.append(f"{layer.name} ({key})")
        name = activation_name(layer)
        if name is None:
            continue
        entry = table["activations"].get(name) if is_keras_activation(name, layer.activation) else None
        if not _verify(entry, name, lambda: audit_activation(name, layer.activation),
                       lambda r: _refuse(layer, f"activation {name!r}", r), audited):
            not_xla.append(f"{layer.name}: activation {name!r}")
    rules = tuple(f"{layer.name}: {rule}" for layer in layers if (rule := rule_for(layer)))
    return SecondOrderCheck(rule_layers=layers, rules=rules, audited=tuple(audited), not_xla_verified=tuple(not_xla))

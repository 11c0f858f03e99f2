"""Dense maps as target kinds: Dense on inputs of any rank, and EinsumDense (MultiHeadAttention's projections)."""

from __future__ import annotations

import math
import re
import string

import tensorflow as tf

from pipeline.curvature.kinds.base import LayerKind, Stage, TargetWeight, bias_weight, flatten_positions, ones_patches, shape_of, weight
from pipeline.errors import BadInputError


class DenseStage(Stage):
    """z = u · W + b over u's last axis; every other axis but the batch is a position."""

    def __init__(self, layer):
        weights = {"kernel": TargetWeight("kernel", shape_of(layer.kernel), (0, 1), 1, 1, ("in_feature", "out_channel"))}
        if layer.use_bias:
            weights["bias"] = bias_weight(layer)
        super().__init__(layer, "", weights)

    def linear(self, u, magnitude=False):
        return tf.tensordot(u, weight(self.layer, "kernel", u, magnitude), axes=[[u.shape.rank - 1], [0]])

    def patches(self, weight_name, u):
        flat = flatten_positions(u)
        return ones_patches(flat) if weight_name == "bias" else flat[:, :, None, :]


class Einsum:
    """The letters of an EinsumDense equation sorted by role; a left ellipsis is spelled out per input rank."""

    def __init__(self, equation: str):
        match = re.fullmatch(r"(\.\.\.)?(\w+),(\w+)->(\.\.\.)?(\w+)", equation.replace(" ", ""))
        if not match or bool(match.group(1)) != bool(match.group(4)):
            raise BadInputError(f"EinsumDense equation {equation!r}: only equations like 'abc,cd->abd' or '...b,bc->...c' can be targets")
        self.elided = bool(match.group(1))
        self.inputs, self.kernel, self.outputs = match.group(2), match.group(3), match.group(5)
        self.spare = [c for c in string.ascii_letters if c not in equation]
        self.channels = "".join(c for c in self.outputs if c in self.kernel)
        self.contracted = "".join(c for c in self.kernel if c in self.inputs and c not in self.outputs)
        kept = self.outputs[: len(self.outputs) - len(self.channels)]
        roles_ok = (
            self.outputs.endswith(self.channels) and set(self.kernel) == set(self.channels) | set(self.contracted)
            and set(self.inputs) == set(kept) | set(self.contracted) and not set(kept) & set(self.kernel)
            and (self.elided or (kept and kept[0] == self.inputs[0]))
        )
        if not roles_ok:
            raise BadInputError(
                f"EinsumDense equation {equation!r}: a target needs the kernel's output axes last in the output and"
                " every other input axis either kept or contracted with the kernel")

    def spelled(self, rank: int) -> tuple[str, str]:
        """(input letters, output letters) for an input of ``rank`` axes, the ellipsis replaced by letters."""
        elided = "".join(self.spare[: rank - len(self.inputs)]) if self.elided else ""
        return elided + self.inputs, elided + self.outputs

    @property
    def equation(self) -> str:
        return f"{'...' if self.elided else ''}{self.inputs},{self.kernel}->{'...' if self.elided else ''}{self.outputs}"


class EinsumStage(Stage):
    """z = einsum(equation, u, W) + b: positions are the output axes from the input, channels those from the kernel."""

    def __init__(self, layer):
        self.spec = spec = Einsum(layer.equation)
        perm = tuple(spec.kernel.index(c) for c in spec.contracted + spec.channels)
        names = {c: ("in_feature" if len(spec.contracted) == 1 else f"in_{c}") for c in spec.contracted}
        names.update({c: ("out_channel" if len(spec.channels) == 1 else f"out_{c}") for c in spec.channels})
        weights = {"kernel": TargetWeight("kernel", shape_of(layer.kernel), perm, len(spec.contracted), 1,
                                          tuple(names[c] for c in spec.kernel))}
        if layer.bias is not None and sorted(layer.bias_axes or "") == sorted(spec.channels):
            weights["bias"] = bias_weight(layer, dims=tuple(names[c] for c in spec.channels))
        self.channel_axes = len(spec.channels)
        super().__init__(layer, "", weights)

    def linear(self, u, magnitude=False):
        return tf.einsum(self.spec.equation, u, weight(self.layer, "kernel", u, magnitude))

    def z(self, u):
        z = self.linear(u)
        return z + weight(self.layer, "bias", z) if self.layer.bias is not None else z

    def patches(self, weight_name, u):
        spec = self.spec
        inputs, outputs = spec.spelled(u.shape.rank)
        kept = outputs[: len(outputs) - len(spec.channels)]
        n = tf.shape(u)[0]
        if weight_name == "bias":
            positions = math.prod(int(u.shape[inputs.index(c)]) for c in kept[1:])
            return tf.ones(tf.stack([n, positions, 1, 1]), u.dtype)
        moved = tf.transpose(u, [inputs.index(c) for c in kept + spec.contracted])
        features = math.prod(int(u.shape[inputs.index(c)]) for c in spec.contracted)
        return tf.reshape(moved, (n, -1, 1, features))


def dense_kind(layer) -> LayerKind:
    return LayerKind(layer, (DenseStage(layer),))


def einsum_kind(layer) -> LayerKind:
    return LayerKind(layer, (EinsumStage(layer),))


"""How one stage's factor columns are folded, chunk by chunk, into its targets' sums of squared weight gradients.

Every form gives Σ_{n,c} (Σ_s P[n, s, (o,) f] v_c[n, s, o])² for columns v_c (C, N, S, O) and patches P; each is the
cheapest somewhere:

* products (``ProductFold``): each column's weight gradients over all S positions, C·S·F per example and channel;
* Gram (``GramFold``): with M = Σ_c v_c v_cᵀ on the A support positions (where the columns can be nonzero, the same
  for every column: ReLU masks and max-pool routing do not depend on c), Σ_a P ⊙ (M P) once at the end,
  A²(C + F), for supports narrower than the factor's width;
* support products (``SupportProductFold``): each column's weight gradients from its values on the support and each
  channel's patches gathered there once, C·A·F, for supports that are a small part of S (convolutions before a
  max pool) but no narrower than the factor's width.

``stage_fold`` chooses by what each form costs and what the pass's spare memory holds (``SpareMemory``).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature.columns import support_positions
from pipeline.curvature.patches import column_square_sums, shared_by_channels

GATHERED_PRODUCT_COST = 1.7  # a product with gathered patches, in multiply-adds of the dense products (``scripts/bench_folds.py``)
GATHER_COST = 90  # gathering one column entry at its support and counting what lies outside, in the same units


def dense_products(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """(F, O) float64 sum over examples and columns of the squared weight gradients of ``columns`` (C, N, S, O)."""
    return tf.cast(column_square_sums(patches, columns), tf.float64)


def gathered_patches(patches: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
    """(N, O, A, F) patches at each channel's support ``positions`` (N, O, A)."""
    if patches.shape.rank == 3:
        return tf.gather(patches, positions, batch_dims=1)
    return tf.gather(tf.transpose(patches, (0, 2, 1, 3)), positions, batch_dims=2)


def support_values(columns: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
    """(N, O, C, A) entries of ``columns`` (C, N, S, O) at ``positions`` (N, O, A). Run compiled by XLA
    (``_support_values``), which gathers them without first transposing every column (about 4 times faster here,
    ``scripts/bench_folds.py``)."""
    return tf.gather(tf.transpose(columns, (1, 3, 0, 2)), positions, axis=3, batch_dims=2)


def nonzero_entries(x: tf.Tensor) -> tf.Tensor:
    """The number of nonzero entries of ``x`` (int64), counted along the last axis in int32 first (about half the
    time of ``tf.math.count_nonzero``, which casts every entry to int64)."""
    return tf.reduce_sum(tf.cast(tf.reduce_sum(tf.cast(tf.not_equal(x, 0), tf.int32), axis=-1), tf.int64))


def on_support(columns: tf.Tensor, positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The (N, O, C, A) values of ``columns`` (C, N, S, O) at the support ``positions`` (N, O, A), and the number of
    nonzero column entries outside it (0 unless the support is wrong)."""
    values = _support_values(columns, positions)
    return values, nonzero_entries(columns) - nonzero_entries(values)


def gram_update(gram: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """``gram`` (N, O, A, A) plus Σ_c v_c v_cᵀ of the support ``values`` (N, O, C, A)."""
    return gram + tf.einsum("noca,nocb->noab", values, values)


def gram_products(patches: tf.Tensor, positions: tf.Tensor, gram: tf.Tensor) -> tf.Tensor:
    """(F, O) float64 Σ_n Σ_a P ⊙ (M P) with the patches gathered at ``positions``: Σ_c (v_cᵀ P)²."""
    gathered = gathered_patches(patches, positions)  # (N, O, A, F)
    per_channel = tf.reduce_sum(gathered * tf.einsum("noab,nobf->noaf", gram, gathered), axis=(0, 2))
    return tf.transpose(tf.cast(per_channel, tf.float64))


def support_products(values: tf.Tensor, gathered: tf.Tensor) -> tf.Tensor:
    """(F, O) float64 Σ_{n,c} (Σ_a v_c[n, o, a] P[n, o, a, f])² of support ``values`` (N, O, C, A) and ``gathered``
    patches (N, O, A, F)."""
    return tf.transpose(tf.cast(tf.reduce_sum(tf.square(tf.linalg.matmul(values, gathered)), axis=(0, 2)), tf.float64))


_support_values = tf.function(support_values, jit_compile=True)
_dense_products = tf.function(dense_products)
_gathered_patches = tf.function(gathered_patches, jit_compile=True)
_on_support = tf.function(on_support)
_gram_update = tf.function(gram_update)
_gram_products = tf.function(gram_products, jit_compile=True)
_support_products = tf.function(support_products)


class SpareMemory:
    """The bytes a pass has beyond its examples' needs: half for what stages keep through the pass (Gram matrices,
    gathered patches), which they draw in turn, half for the one product call that runs at a time."""

    def __init__(self, spare: int):
        self.kept = spare // 2
        self.products = spare - self.kept

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` to keep through the pass if they fit what is left."""
        if nbytes > self.kept:
            return False
        self.kept -= nbytes
        return True


def gram_pays(support: int, features: int, positions: int, columns: int) -> bool:
    """Whether Gram matrices pay for a support of A = ``support`` of S = ``positions`` positions: A below the C
    ``columns``, and their A²(C + ΣF) operations per example and channel fewer than the products' C·S·ΣF (ΣF the
    stage's targets' ``features``). A bias alone (one feature) never pays. The first condition stands for what
    counting operations misses: the Gram form's gathers and small products ran about 5 times slower per operation
    here, so a support only a little smaller than S (VGG's pooled 32x32 layers) is faster by the products."""
    return support < columns and support**2 * (columns + features) < columns * positions * features


def support_products_pay(support: int, features: int, positions: int) -> bool:
    """Whether products on a support of A = ``support`` of S = ``positions`` positions cost less than over all of
    them, per column, example and channel: A·ΣF gathered products and S gathered entries against S·ΣF products,
    at their measured costs (``GATHERED_PRODUCT_COST``, ``GATHER_COST``). A convolution before a 2x2 max pool
    (A = S/4) pays from about 160 features."""
    return GATHERED_PRODUCT_COST * support * features + GATHER_COST * positions < positions * features


def channel_width(features: int, channels: int, examples: int, per_example: int, available: int) -> int:
    """Channels per product call whose ``per_example`` floats per example, channel and feature, and their squares,
    fit ``available`` bytes; at least one."""
    per_channel = 4 * examples * features * per_example
    return max(1, min(channels, available // (2 * per_channel)))


class ProductFold:
    """Sums of the squared per-column weight gradients over all positions, ``width`` channels per call."""

    def __init__(self, stage, patches: dict, examples: int, spare: SpareMemory, column_chunk: int):
        self.stage, self.patches = stage, patches
        features = max(t.product_features for t in stage.targets)
        self.width = channel_width(features, stage.width, examples, column_chunk, spare.products)
        self.sums = {t.name: None for t in stage.targets}

    def add(self, columns: tf.Tensor) -> None:
        for target in self.stage.targets:
            self.sums[target.name] = _by_channels(
                lambda o, end: _dense_products(_channels(self.patches[target.name], o, end), columns[..., o:end]),
                self.stage.width, self.width, self.sums[target.name])

    def result(self) -> dict[str, np.ndarray]:
        return self.sums


class OnSupport:
    """The columns' values at each channel's support, checked to hold every nonzero entry."""

    def __init__(self, positions: tf.Tensor):
        self.positions = positions

    def values(self, columns: tf.Tensor) -> tf.Tensor:
        values, outside = _on_support(columns, self.positions)
        if int(outside):
            raise RuntimeError(f"{int(outside)} factor-column entries lie outside their computed support")
        return values


class GramFold(OnSupport):
    """Per-channel Gram matrices of the columns on the support, met with the gathered patches at the end."""

    def __init__(self, stage, patches: dict, positions: tf.Tensor, examples: int, spare: SpareMemory):
        super().__init__(positions)
        self.stage, self.patches = stage, patches
        support = int(positions.shape[-1])
        features = max(t.features for t in stage.targets)
        self.width = channel_width(features, stage.width, examples, 2 * support, spare.products)
        self.gram = tf.zeros((*positions.shape, support), tf.float32)

    def add(self, columns: tf.Tensor) -> None:
        self.gram = _gram_update(self.gram, self.values(columns))

    def result(self) -> dict[str, np.ndarray]:
        return {t.name: _by_channels(lambda o, end: _gram_products(_channels(self.patches[t.name], o, end),
                                                                    self.positions[:, o:end], self.gram[:, o:end]),
                                     self.stage.width, self.width)
                for t in self.stage.targets}


class SupportProductFold(OnSupport):
    """Per-column weight gradients from the columns' values on the support and the patches gathered there once."""

    def __init__(self, stage, patches: dict, positions: tf.Tensor):
        super().__init__(positions)
        self.stage = stage
        self.gathered = {t.name: _gathered_patches(patches[t.name], positions) for t in stage.targets}
        self.sums = {t.name: None for t in stage.targets}

    def add(self, columns: tf.Tensor) -> None:
        values = self.values(columns)
        for target in self.stage.targets:
            part = _support_products(values, self.gathered[target.name]).numpy()
            self.sums[target.name] = part if self.sums[target.name] is None else self.sums[target.name] + part

    def result(self) -> dict[str, np.ndarray]:
        return self.sums


def stage_fold(stage, patches: dict, reach, examples: int, spare: SpareMemory, factor_width: int, column_chunk: int):
    """The cheapest form for ``stage`` that fits ``spare``: Gram matrices or support products where the support found
    by ``reach`` (the magnitude pass's cotangents at the stage, None when not computed) makes them pay, else products.
    Forms on the support need dense patches."""
    if reach is None or any(t.weight.one_hot for t in stage.targets):
        return ProductFold(stage, patches, examples, spare, column_chunk)
    active = tf.transpose(stage.targets[0].flat_columns(reach)[0][..., stage.z_channels] > 0, (0, 2, 1))
    positions = support_positions(active)
    support = int(positions.shape[-1])
    features = sum(t.features for t in stage.targets)
    every = stage.targets[0].positions
    kept = 4 * examples * stage.width * support
    if gram_pays(support, features, every, factor_width) and spare.take(kept * support):
        return GramFold(stage, patches, positions, examples, spare)
    gradients = 2 * 4 * examples * stage.width * column_chunk * features  # one chunk's weight gradients and their squares
    if support_products_pay(support, features, every) and gradients <= spare.products and spare.take(kept * features):
        return SupportProductFold(stage, patches, positions)
    return ProductFold(stage, patches, examples, spare, column_chunk)


def _channels(patches: tf.Tensor, start: int, stop: int) -> tf.Tensor:
    """Channel patches of z channels start:stop (shared patches serve every channel)."""
    return patches if shared_by_channels(patches) else patches[:, :, start:stop]


def _by_channels(products, channels: int, width: int, into: np.ndarray | None = None) -> np.ndarray:
    """(F, channels) ``products(o, end)`` of channels o:end, ``width`` at a time, added to ``into`` in place when
    given (so no call's result is copied again)."""
    for o in range(0, channels, width):
        part = products(o, min(o + width, channels)).numpy()
        if into is None:
            into = np.zeros((part.shape[0], channels), part.dtype)
        into[:, o:o + part.shape[1]] += part
    return into

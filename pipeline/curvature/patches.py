"""The patches algebra every engine shares: contractions of a weight's patches with cotangents, columns and HVP rows.

A target weight's patches are (N, S, G, F): z[n, s, o] = Σ_f P[n, s, g(o), f] · W_c[f, o] + (terms free of W)
(``kinds.base``). Most kinds hold them as a dense tensor. An Embedding's are one-hot codes over its
vocabulary, held as the codes (``OneHotPatches``): every operation below then touches only the rows
whose tokens occur, so a vocabulary of millions costs what the tokens cost, and no (N, S, F) tensor
is built.
"""

from __future__ import annotations

import tensorflow as tf


class OneHotPatches(tf.experimental.ExtensionType):
    """(N, S, 1, F) patches P[n, s, 0, f] = [codes[n, s] == f], held as the (N, S) integer ``codes``."""

    codes: tf.Tensor
    features: int
    value_dtype: tf.DType

    def dense(self) -> tf.Tensor:
        return tf.one_hot(self.codes, self.features, dtype=self.value_dtype)[:, :, None, :]

    def column(self, feature) -> tf.Tensor:
        """(N, S) P[:, :, 0, feature]."""
        return tf.cast(tf.equal(self.codes, tf.cast(feature, self.codes.dtype)), self.value_dtype)

    def contract(self, dz: tf.Tensor) -> tf.Tensor:
        """(F, O') Σ_{n,s} P[n, s, f] dz[n, s, o]: each code's cotangents summed into its row."""
        channels = tf.shape(dz)[-1]
        return tf.math.unsorted_segment_sum(tf.reshape(dz, (-1, channels)), tf.reshape(self.codes, (-1,)), self.features)

    def expand(self, values: tf.Tensor) -> tf.Tensor:
        """(N, S, O') Σ_f P[n, s, f] values[f, o]: the rows of the codes."""
        return tf.gather(values, self.codes)

    def column_square_sums(self, columns: tf.Tensor) -> tf.Tensor:
        """(F, O') Σ_{c,n} (Σ_s P[n, s, f] v_c[n, s, o])² for columns (C, N, S, O'): per example, each occurring
        code's positions summed, then squared."""
        count = tf.shape(columns)
        keys = tf.cast(self.codes, tf.int64) + self.features * tf.range(tf.cast(count[1], tf.int64))[:, None]
        occurring, where = tf.unique(tf.reshape(keys, (-1,)))  # one segment per (example, code) that occurs
        by_position = tf.transpose(tf.reshape(columns, (count[0], -1, count[3])), (1, 0, 2))  # (N·S, C, O')
        per_code = tf.math.unsorted_segment_sum(by_position, where, tf.size(occurring))  # (U, C, O')
        squares = tf.reduce_sum(tf.square(per_code), axis=1)
        return tf.math.unsorted_segment_sum(squares, occurring % self.features, self.features)

    def block_products(self, s_ids: tf.Tensor, o_ids: tf.Tensor, rows: tf.Tensor, width) -> tf.Tensor:
        """(F, width) Σ_k Σ_n P[n, s_k, f] Σ_s' rows[k, n, s'] P[n, s', f] placed in channel o_ids[k] (0 <= o < width):
        only the code at (n, s_k) is nonzero, and it meets the positions that hold the same code."""
        own = tf.transpose(tf.gather(self.codes, s_ids, axis=1))  # (K, N)
        same = tf.cast(tf.equal(self.codes[None], own[:, :, None]), rows.dtype)
        values = tf.reduce_sum(rows * same, axis=2)  # (K, N)
        cells = tf.cast(own, tf.int64) * tf.cast(width, tf.int64) + tf.cast(o_ids, tf.int64)[:, None]
        flat = tf.math.unsorted_segment_sum(tf.reshape(values, (-1,)), tf.reshape(cells, (-1,)),
                                            self.features * tf.cast(width, tf.int64))
        return tf.reshape(flat, (self.features, width))


def as_dense(patches) -> tf.Tensor:
    """The patches as a dense (N, S, G, F) tensor."""
    return patches.dense() if isinstance(patches, OneHotPatches) else patches


def shared_by_channels(patches) -> bool:
    """Whether one set of (N, S, F) patches serves every z channel (else (N, S, O', F), per channel)."""
    return isinstance(patches, OneHotPatches) or patches.shape.rank == 3


def channel_patches(patches, groups: tf.Tensor):
    """Patches (N, S, G, F) as the engines contract them: (N, S, F) when one group serves every channel, else
    (N, S, O', F) with each of the O' z channels' own group (``groups``: the group of each)."""
    if isinstance(patches, OneHotPatches):
        return patches
    if patches.shape[2] == 1:
        return patches[:, :, 0]
    return tf.gather(patches, groups, axis=2)


def patch_column(patches, group, feature) -> tf.Tensor:
    """(N, S) patches (N, S, G, F) of one group and feature: an entry's z-direction within its channel."""
    if isinstance(patches, OneHotPatches):
        return patches.column(feature)
    # One gather over the merged (group, feature) axis: vectorized over entries, gathering the group first
    # would copy every example's patches per entry.
    shape = tf.shape(patches)
    merged = tf.reshape(patches, tf.concat([shape[:2], [shape[2] * shape[3]]], 0))
    return tf.gather(merged, group * shape[3] + feature, axis=2)


def contract(patches, dz: tf.Tensor) -> tf.Tensor:
    """(F, O') Σ_{n,s} P[n, s, (o,) f] dz[n, s, o]: the weight gradient of cotangents ``dz`` (N, S, O')."""
    if isinstance(patches, OneHotPatches):
        return patches.contract(dz)
    return tf.einsum("nsf,nso->fo" if patches.shape.rank == 3 else "nsof,nso->fo", patches, dz)


def expand(patches, values: tf.Tensor) -> tf.Tensor:
    """(N, S, O') Σ_f P[n, s, (o,) f] values[f, o]: the z-direction of weight-space ``values`` (F, O')."""
    if isinstance(patches, OneHotPatches):
        return patches.expand(values)
    return tf.einsum("nsf,fo->nso" if patches.shape.rank == 3 else "nsof,fo->nso", patches, values)


def column_gradients(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """(C, N, F, O') per-example weight gradients of columns (C, N, S, O') for dense patches.

    With shared patches, one matrix product per column and example, broadcast over the columns: einsum would
    transpose the columns first, which costs more than the products themselves for small F (a bias, a first layer).
    """
    if patches.shape.rank == 3:
        return tf.linalg.matmul(patches[None], columns, transpose_a=True)
    return tf.einsum("nsof,cnso->cnfo", patches, columns)


def column_square_sums(patches, columns: tf.Tensor) -> tf.Tensor:
    """(F, O') Σ_{c,n} (Σ_s P[n, s, (o,) f] v_c[n, s, o])²: the squared per-example weight gradients of columns
    (C, N, S, O'), summed."""
    if isinstance(patches, OneHotPatches):
        return patches.column_square_sums(columns)
    if patches.shape.rank == 3 and narrow_products(columns.shape[3], patches.shape[2]):
        return per_example_square_sums(patches, columns)
    return tf.reduce_sum(tf.square(column_gradients(patches, columns)), axis=(0, 1))


def per_example_square_sums(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """``column_square_sums`` for shared patches (N, S, F) with the columns (C, N, S, O') transposed first: one
    F x S times S x (C·O') product per example."""
    count = columns.shape
    by_example = tf.reshape(tf.transpose(columns, (1, 2, 0, 3)), (count[1], count[2], count[0] * count[3]))
    gradients = tf.linalg.matmul(patches, by_example, transpose_a=True)  # (N, F, C·O')
    return tf.reduce_sum(tf.reshape(tf.square(gradients), (count[1], -1, count[0], count[3])), axis=(0, 2))


def narrow_products(channels: int, features: int) -> bool:
    """Whether per-column products (F x S times S x O') are too narrow to run near the matrix-product rate, so that
    transposing the columns first, for one F x S times S x (C·O') product per example, pays: for at most 32 channels
    and at least 8 features per channel. Measured on x86 with oneDNN (``docs/BENCHMARKS.md``): 0.36 to 0.8 of the
    time there, up to 3 times slower for few features or 128 channels, where the transpose is not repaid
    (``scripts/bench_products.py``)."""
    return channels is not None and features is not None and channels <= 32 and features >= 8 * channels


def block_products(patches, s_ids: tf.Tensor, o_ids: tf.Tensor, start, rows: tf.Tensor, width) -> tf.Tensor:
    """(F, width) Σ_k Σ_n P[n, s_k, f] Σ_s' B_k[n, s'] P[n, s', f] added into channel ``o_ids[k] - start``, for HVP
    rows (K, N, S): row s_k of each example's block of H_z within direction k's z channel ``o_ids[k]``, and patches
    of every z channel."""
    if isinstance(patches, OneHotPatches):
        return patches.block_products(s_ids, o_ids - start, rows, width)
    if patches.shape.rank == 3:  # (N, S, F), shared by every channel
        own = tf.gather(patches, s_ids, axis=1)  # (N, K, F)
        per_direction = tf.einsum("nkf,kns,nsf->kf", own, rows, patches)
    else:  # (N, S, O, F): each direction's channel has its own patches
        mine = tf.transpose(tf.gather(patches, o_ids, axis=2), (2, 0, 1, 3))  # (K, N, S, F)
        own = tf.gather(mine, s_ids[:, None], axis=2, batch_dims=1)[:, :, 0]  # (K, N, F)
        per_direction = tf.einsum("knf,kns,knsf->kf", own, rows, mine)
    return tf.transpose(tf.math.unsorted_segment_sum(per_direction, o_ids - start, width))

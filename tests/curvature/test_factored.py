"""The factored engine's two product paths agree with each other and with plain sums of squares."""

import numpy as np
import tensorflow as tf

from pipeline.curvature.factored import SPARSE_MIN_CLASSES, dense_products, support_products


def _columns_with_shared_support(rng, classes, examples, positions, channels):
    """Columns that vanish at the same positions for every class, as behind ReLU and max-pool."""
    values = rng.normal(size=(classes, examples, positions, channels))
    support = rng.random(size=(1, examples, positions, channels)) < 0.25
    return (values * support).astype("float32")


def test_sparse_gram_and_direct_paths_equal_dense_sums_of_squares():
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(3, 20, 7)).astype("float32")
    for classes in (2, 90):  # direct path (active positions >= classes) and Gram path (fewer)
        columns = _columns_with_shared_support(rng, classes, 3, 20, 4)
        expected = np.einsum("nsp,cnso->cnpo", patches.astype(float), columns.astype(float))
        expected = (expected**2).sum(axis=(0, 1))
        for products in (support_products, dense_products):
            got = tf.function(products)(tf.constant(patches), tf.constant(columns)).numpy()
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


def test_all_zero_columns_give_zero():
    patches = tf.ones((2, 5, 3))
    columns = tf.zeros((SPARSE_MIN_CLASSES, 2, 5, 4))
    assert float(tf.reduce_max(tf.abs(support_products(patches, columns)))) == 0.0

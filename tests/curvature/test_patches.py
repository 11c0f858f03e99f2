"""One-hot patches (an Embedding's tokens, held as codes) against the same operations on the dense one-hot patches
in NumPy, and an Embedding whose vocabulary is a million rows: only the rows whose tokens occur are nonzero."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature import layer_derivatives
from pipeline.curvature.factored import FactoredPass
from pipeline.curvature.patches import (OneHotPatches, block_products, column_square_sums, contract, expand, narrow_products,
                                        patch_column)
from pipeline.curvature.target import resolve_targets
from pipeline.losses import get_loss
from tests.curvature.cases import KIND_CASES, KIND_IDS

FEATURES = 9


@pytest.fixture
def coded():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, size=(3, 6)).astype("int32")  # tokens repeat within an example; rows 4-8 never occur
    return codes, np.eye(FEATURES)[codes], OneHotPatches(tf.constant(codes), FEATURES, tf.float32)


def test_one_hot_patches_contract_expand_and_columns_as_dense_ones(coded):
    codes, dense, patches = coded
    rng = np.random.default_rng(4)
    dz = rng.normal(size=(3, 6, 2)).astype("float32")
    values = rng.normal(size=(FEATURES, 2)).astype("float32")
    np.testing.assert_allclose(contract(patches, tf.constant(dz)).numpy(), np.einsum("nsf,nso->fo", dense, dz), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(expand(patches, tf.constant(values)).numpy(), np.einsum("nsf,fo->nso", dense, values), rtol=1e-6)
    np.testing.assert_array_equal(patch_column(patches, 0, 2).numpy(), dense[:, :, 2])


def test_one_hot_column_square_sums_square_each_codes_sum(coded):
    codes, dense, patches = coded
    columns = np.random.default_rng(5).normal(size=(7, 3, 6, 2)).astype("float32")
    expected = (np.einsum("nsf,cnso->cnfo", dense, columns.astype(float)) ** 2).sum(axis=(0, 1))
    found = column_square_sums(patches, tf.constant(columns)).numpy()
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6)
    assert not found[4:].any()


def test_one_hot_block_products_as_dense_ones(coded):
    codes, dense, patches = coded
    rng = np.random.default_rng(6)
    s_ids, o_ids, start, width = np.array([0, 5, 2, 2]), np.array([3, 4, 3, 4]), 3, 2
    rows = rng.normal(size=(4, 3, 6)).astype("float32")
    expected = np.zeros((FEATURES, width))
    for k, (s, o) in enumerate(zip(s_ids, o_ids)):
        expected[:, o - start] += np.einsum("nf,ns,nsf->f", dense[:, s], rows[k], dense)
    found = block_products(patches, tf.constant(s_ids, tf.int32), tf.constant(o_ids, tf.int32), start, tf.constant(rows), width)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-5, atol=1e-6)
    dense_found = block_products(tf.constant(dense, tf.float32), tf.constant(s_ids, tf.int32), tf.constant(o_ids, tf.int32),
                                 start, tf.constant(rows), width)
    np.testing.assert_allclose(dense_found.numpy(), expected, rtol=1e-5, atol=1e-6)


def _with_vocabulary(small: keras.Model, vocabulary: int) -> keras.Model:
    """The embedding case's model with ``vocabulary`` rows: its first rows the small model's, the rest random."""
    L = keras.layers
    inp = keras.Input((5,), dtype="int32")
    h = L.Embedding(vocabulary, 3, name="target")(inp)
    model = keras.Model(inp, L.Dense(4, name="head")(L.Flatten()(L.ReLU()(L.Dense(3)(h)))))
    table = np.random.default_rng(8).normal(size=(vocabulary, 3)).astype("float32")
    table[: small.layers[1].input_dim] = small.layers[1].embeddings.numpy()
    model.layers[1].embeddings.assign(table)
    for big, little in zip(model.layers[2:], small.layers[2:]):
        big.set_weights(little.get_weights())
    return model


@pytest.mark.parametrize("engine", ["exact", "factored"])
def test_a_million_row_vocabulary_costs_only_the_rows_that_occur(engine):
    case = KIND_CASES[KIND_IDS.index("embedding")]
    small = case.model()
    big = _with_vocabulary(small, 1_000_000)
    x, y = case.data()
    options = dict(loss=case.loss, from_logits=case.from_logits, weight="embeddings", engine=engine, batch_size=6)
    expected = layer_derivatives(small, "target", x, y, **options)  # checked against float64 references in test_kinds
    found = layer_derivatives(big, "target", x, y, **options)
    assert found.hessian_diagonal.shape == (1_000_000, 3)
    np.testing.assert_allclose(found.hessian_diagonal[:7], expected.hessian_diagonal, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(found.gradient[:7], expected.gradient, rtol=1e-5, atol=1e-9)
    assert not found.hessian_diagonal[7:].any() and not found.gradient[7:].any()


def test_the_factored_plan_of_an_embedding_does_not_grow_with_its_vocabulary():
    case = KIND_CASES[KIND_IDS.index("embedding")]
    small = case.model()
    loss = get_loss(case.loss, case.from_logits)
    needs = [FactoredPass(loss, resolve_targets(model, [("target", "embeddings")]), False).bytes_per_example()
             for model in (small, _with_vocabulary(small, 1_000_000))]
    assert needs[0] == needs[1]


@pytest.mark.parametrize("channels, features, narrow", [(4, 40, True), (4, 9, False), (48, 400, False)])
def test_column_square_sums_in_either_layout_meet_float64_numpy(channels, features, narrow):
    """Narrow products (few channels, many features) transpose the columns for one product per example; the others
    take one product per column and example. Both are Σ_{c,n} (Σ_s P[n, s, f] v_c[n, s, o])²."""
    rng = np.random.default_rng(0)
    patches, columns = rng.normal(size=(3, 10, features)), rng.normal(size=(5, 3, 10, channels))
    expected = np.einsum("cnfo->fo", np.einsum("nsf,cnso->cnfo", patches, columns) ** 2)
    found = column_square_sums(tf.constant(patches, tf.float32), tf.constant(columns, tf.float32)).numpy()
    assert narrow_products(channels, features) == narrow
    np.testing.assert_allclose(found, expected, rtol=1e-5)

"""The factored engine's two product paths agree with each other and with plain sums of squares;
its batched transpose rules give the same factor columns as autodiff."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature import LayerCurvature
from pipeline.curvature.columns import (factor_columns, rule_columns, rule_forward, rule_graph, rule_support,
                                        support_positions)
from pipeline.curvature.factored import SPARSE_MIN_CLASSES, dense_products, gram_products, gram_update, support_products
from pipeline.curvature.suffix import check_suffix
from pipeline.losses import get_loss
from tests.curvature.cases import CASES


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


@pytest.mark.parametrize("name", ["sparse_categorical_crossentropy", "categorical_crossentropy"])
def test_cross_entropy_factor_has_c_minus_one_columns_and_the_analytic_hessian(name):
    rng = np.random.default_rng(0)
    classes = 6
    logits = rng.normal(size=(5, classes)) * 3
    logits[0] = [40.0, 0, 0, 0, 0, 0]  # probability ~1 on the first class
    logits[1] = [0, 0, 0, 0, 0, 40.0]  # ... and on the last, the reflection's pivot
    y = rng.integers(0, classes, 5) if name.startswith("sparse") else rng.dirichlet(np.ones(classes), 5) * 1.5
    loss = get_loss(name, from_logits=True)
    factor = loss.hessian_factor(tf.constant(logits), tf.constant(y)).numpy()
    assert factor.shape == (5, classes, loss.factor_width(classes)) == (5, classes, classes - 1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    mass = np.ones(5) if name.startswith("sparse") else y.sum(1)
    hessian = mass[:, None, None] * (np.einsum("nc,cd->ncd", p, np.eye(classes)) - p[:, :, None] * p[:, None, :])
    np.testing.assert_allclose(np.einsum("nck,ndk->ncd", factor, factor), hessian, rtol=0, atol=1e-14)


def test_all_zero_columns_give_zero():
    patches = tf.ones((2, 5, 3))
    columns = tf.zeros((SPARSE_MIN_CLASSES, 2, 5, 4))
    assert float(tf.reduce_max(tf.abs(support_products(patches, columns)))) == 0.0


def _rule_cases():
    return [case for case in CASES if case.piecewise_linear]


@pytest.mark.parametrize("case", _rule_cases(), ids=[case.name for case in _rule_cases()])
def test_transpose_rules_give_the_autodiff_columns(case):
    """Factor columns are first derivatives (Jᵀ s), which autodiff gets right: the rules must match them."""
    curvature = LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=case.from_logits, engine="factored")
    engine, problem = curvature.engine, curvature.engine.problem
    peel = check_suffix(problem.target, problem.loss).peel_softmax
    graph = rule_graph(problem, peel)
    assert graph is not None and engine.column_method == "rules", case.name
    x, y = case.data(n=3)
    x, y = tf.constant(x), tf.constant(y)
    ids = tf.range(engine.factor_width + 1)
    channels = (1, problem.target.out_channels)
    expected = factor_columns(problem, x, y, ids, *channels, peel).numpy()
    got = rule_columns(problem, graph, x, y, ids, *channels, peel).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())

    # The streamed engine keeps only each channel's support: every nonzero autodiff column entry lies in it.
    positions = rule_support(problem, graph, rule_forward(problem, graph, x, y, peel)[0], *channels).numpy()
    inside = np.zeros(expected.shape[1:], bool)  # (N, S, O)
    for n, o, a in np.ndindex(positions.shape):
        inside[n, positions[n, o, a], o] = True
    assert np.all(expected[:, ~inside] == 0), case.name
    assert positions.shape[-1] < expected.shape[2] or case.name != "cnn_70_classes"  # max pooling keeps a quarter


def test_streamed_gradient_and_loss_equal_autodiff():
    """The rules path takes the gradient as one more column of its forward pass; autodiff gets first derivatives right."""
    case = next(case for case in CASES if case.name == "cnn_softmax_head")
    curvature = LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=case.from_logits, engine="factored")
    assert curvature.engine.streams_gradient
    x, y = case.data(n=5)
    channels = slice(1, curvature.target.out_channels)
    gradient, _, loss = curvature.engine.batch_derivatives(x, y, channels)
    expected, expected_loss = curvature.problem.batch_gradient(tf.constant(x), tf.constant(y), channels)
    np.testing.assert_allclose(gradient, expected.numpy(), rtol=1e-5, atol=1e-6 * np.abs(expected.numpy()).max())
    assert loss == pytest.approx(float(expected_loss), rel=1e-6)


def test_streamed_gram_equals_sums_of_squares_and_counts_entries_off_the_support():
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(3, 20, 7)).astype("float32")
    columns = _columns_with_shared_support(rng, 90, 3, 20, 4)
    positions = support_positions(tf.transpose(tf.reduce_any(columns != 0, axis=0), (0, 2, 1)))
    gram = tf.zeros((*positions.shape, positions.shape[-1]))
    for chunk in np.array_split(columns, 4):  # streamed in column chunks
        gram, outside = gram_update(gram, tf.constant(chunk), positions)
        assert int(outside) == 0
    expected = (np.einsum("nsp,cnso->cnpo", patches.astype(float), columns.astype(float)) ** 2).sum(axis=(0, 1))
    np.testing.assert_allclose(gram_products(tf.constant(patches), positions, gram).numpy(), expected, rtol=2e-5, atol=1e-6)

    narrower = positions[..., 1:]  # drops an active position of some (example, channel)
    _, outside = gram_update(tf.zeros((*narrower.shape, narrower.shape[-1])), tf.constant(columns), narrower)
    assert int(outside) > 0

"""The factored engine: its product paths agree with plain sums of squares, its transpose rules give the autodiff
columns at every target of one shared pass, and the shared pass equals each tensor computed alone."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature import LayerCurvature
from pipeline.curvature.columns import backward, factor_columns, site_key, support_positions
from pipeline.curvature.factored import FactoredPass
from pipeline.curvature.folds import (SupportProductFold, dense_products, gathered_patches, gram_products, gram_update, on_support,
                                      support_products)
from pipeline.curvature.network import NetworkCurvature
from pipeline.curvature.problem import Problem
from pipeline.curvature.target import resolve_targets
from pipeline.losses import get_loss
from tests.curvature.cases import CASES, Case, assert_close, reference


def _columns_with_shared_support(rng, classes, examples, positions, channels):
    """Columns that vanish at the same positions for every class, as behind ReLU and max-pool."""
    values = rng.normal(size=(classes, examples, positions, channels))
    support = rng.random(size=(1, examples, positions, channels)) < 0.25
    return (values * support).astype("float32")


def _sums_of_squares(patches, columns):
    if patches.ndim == 3:
        grads = np.einsum("nsp,cnso->cnpo", patches.astype(float), columns.astype(float))
    else:
        grads = np.einsum("nsop,cnso->cnpo", patches.astype(float), columns.astype(float))
    return (grads**2).sum(axis=(0, 1))


@pytest.mark.parametrize("grouped", [False, True], ids=["shared_patches", "per_channel_patches"])
def test_streamed_gram_support_and_dense_products_equal_sums_of_squares(grouped):
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(3, 20, 4, 7) if grouped else (3, 20, 7)).astype("float32")
    columns = _columns_with_shared_support(rng, 90, 3, 20, 4)
    expected = _sums_of_squares(patches, columns)
    np.testing.assert_allclose(dense_products(tf.constant(patches), tf.constant(columns)).numpy(), expected, rtol=2e-5, atol=1e-6)
    positions = support_positions(tf.transpose(tf.reduce_any(columns != 0, axis=0), (0, 2, 1)))
    gathered = gathered_patches(tf.constant(patches), positions)
    gram = tf.zeros((*positions.shape, positions.shape[-1]))
    by_support = 0
    for chunk in np.array_split(columns, 4):  # streamed in column chunks
        values, outside = on_support(tf.constant(chunk), positions)
        assert int(outside) == 0
        gram = gram_update(gram, values)
        by_support += support_products(values, gathered).numpy()
    np.testing.assert_allclose(gram_products(tf.constant(patches), positions, gram).numpy(), expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(by_support, expected, rtol=2e-5, atol=1e-6)

    narrower = positions[..., 1:]  # drops an active position of some (example, channel)
    _, outside = on_support(tf.constant(columns), narrower)
    assert int(outside) > 0


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


def _rule_cases():
    return [case for case in CASES if case.piecewise_linear]


def _every_kernel(model):
    return [t for t in resolve_targets(model, "all") if t.weight.name == "kernel"]


@pytest.mark.parametrize("case", _rule_cases(), ids=[case.name for case in _rule_cases()])
def test_transpose_rules_give_the_autodiff_columns_at_every_target(case):
    """Factor columns are first derivatives (Jᵀ s), which autodiff gets right: one backward pass of the rules must
    give, at every kernel the suffix passes, the columns autodiff gives for that kernel alone; and every nonzero
    entry lies in the support ones through |Jᵀ| find."""
    model = case.model()
    loss = get_loss(case.loss, case.from_logits)
    curvature = LayerCurvature(model, case.layer, loss=case.loss, from_logits=case.from_logits, engine="factored")
    peel = curvature.suffix_check.peel_softmax
    targets = [t for t in _every_kernel(model) if NetworkCurvature(model, [t], loss).choices[t.name].name == "factored"]
    assert any(t.path == case.layer for t in targets)
    shared = FactoredPass(loss, targets, peel)
    assert shared.column_method == "rules", case.name
    x, y = case.data(n=3)
    x, y = tf.constant(x), tf.constant(y)
    forward = shared._forward(x, y)
    ids = tf.range(shared.factor_width + 1)
    captured = backward(shared.suffix, forward, ids)
    reach = backward(shared.suffix, forward, None, magnitude=True)
    for target in targets:
        problem = Problem(target, loss)
        expected = factor_columns(problem, x, y, ids, 0, target.z_channels, peel).numpy()
        got = target.flat_columns(captured[site_key(target.layer, target.stage_index)]).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=target.name)
        positions = support_positions(tf.transpose(target.flat_columns(reach[site_key(target.layer, 0)])[0] > 0, (0, 2, 1))).numpy()
        inside = np.zeros(expected.shape[1:], bool)  # (N, S, O)
        for n, o, a in np.ndindex(positions.shape):
            inside[n, positions[n, o, a], o] = True
        assert np.all(expected[:, ~inside] == 0), target.name


@pytest.mark.parametrize("name", ["merge_zoo", "residual_relu", "cnn_70_classes", "transpose_zoo"])
def test_one_shared_pass_equals_every_tensor_computed_alone(name):
    """Kernels and biases of every layer from one pass, against each tensor's own factored run."""
    case = next(case for case in CASES if case.name == name)
    model = case.model()
    loss = get_loss(case.loss, case.from_logits)
    targets = resolve_targets(model, "all")
    network = NetworkCurvature(model, targets, loss)
    assert len(network.shared_names) >= 3
    x, y = case.data(n=5)
    together = network.shared_sums([(x[:3], y[:3]), (x[3:], y[3:])])
    for target in targets:
        if target.name not in network.shared_names:
            continue
        alone = LayerCurvature(model, target.path, weight=target.weight.name, loss=case.loss, from_logits=case.from_logits,
                               engine="factored").compute_sums([(x[:3], y[:3]), (x[3:], y[3:])])
        for mine, theirs in zip(together[target.name], alone):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max(), err_msg=target.name)


def test_streamed_gradient_and_loss_equal_autodiff():
    """The rules path takes the gradient as one more column of its forward pass; autodiff gets first derivatives right."""
    case = next(case for case in CASES if case.name == "cnn_softmax_head")
    curvature = LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=case.from_logits, engine="factored")
    x, y = case.data(n=5)
    channels = slice(1, curvature.target.z_channels)
    gradient, _, loss = curvature.engine.batch_derivatives(x, y, channels)
    expected, expected_loss = curvature.problem.batch_gradient(tf.constant(x), tf.constant(y), channels)
    np.testing.assert_allclose(gradient, expected.numpy(), rtol=1e-5, atol=1e-6 * np.abs(expected.numpy()).max())
    assert loss == pytest.approx(float(expected_loss), rel=1e-6)


@pytest.mark.parametrize("column_chunk", [1, 3, 69, 70], ids=["chunk_1", "chunk_3", "chunk_factor_width", "chunk_with_gradient"])
@pytest.mark.parametrize("room", ["tight", "roomy"])
def test_chunked_examples_channels_and_columns_match_loss_values(column_chunk, room):
    """A budget that fits one example and no Gram matrix (tight: channel by channel) or Gram matrices (roomy), and
    column chunks of 1, 3, the factor's width (the gradient column then fills a chunk of its own) and width + 1,
    against the float64 frozen-decision reference at 1e-5 of the largest entry."""
    case = next(case for case in CASES if case.name == "cnn_70_classes")
    model = case.model()
    loss = get_loss(case.loss, case.from_logits)
    targets = [t for t in resolve_targets(model, "all") if t.layer.name == case.layer and t.weight.name == case.weight]
    probe = NetworkCurvature(model, targets, loss, column_chunk=column_chunk).shared
    assert probe.factor_width == 69 and probe.sparse
    budget = probe.bytes_per_example() + (1 << 10 if room == "tight" else 1 << 24)
    network = NetworkCurvature(model, targets, loss, column_chunk=column_chunk, memory_budget=budget)
    assert (network.shared.example_chunk() == 1) == (room == "tight")
    x, y = case.data(6, 0)
    sums = network.shared_sums([(x, y)])[targets[0].name]
    expected = reference(case)
    assert_close(sums.gradient / len(x), expected.gradient, 1e-5, "gradient", expected.smooth)
    assert_close(sums.hessian_diagonal / len(x), expected.hessian_diagonal, 1e-5, "diagonal", expected.smooth)


def _deep_relu_net(depth: int = 45, width: int = 256):
    """A convolution, then He-initialized ReLU layers: the columns keep their size (signs cancel in Wᵀg), but ones
    pushed back through |Jᵀ| grow about tenfold a layer and overflow float32, as through the fifty layers of ResNet50."""
    L = keras.layers

    def build():
        inp = keras.Input((5, 2))
        h = L.Flatten()(L.Conv1D(4, 2, activation="relu", name="target")(inp))
        for _ in range(depth):
            h = L.Dense(width, activation="relu", kernel_initializer="he_normal")(h)
        return keras.Model(inp, L.Dense(70)(h))

    return build


def test_the_support_survives_magnitudes_that_overflow_float32():
    """inf times a ReLU mask's zero is NaN, which read as unreached: the support check then refused the pass."""
    case = Case("deep_relu_net", _deep_relu_net(), "target", "sparse_categorical_crossentropy", True, True, (5, 2), 70)
    model = case.model()
    targets = [t for t in resolve_targets(model, "all") if t.layer.name == "target"]
    network = NetworkCurvature(model, targets, get_loss(case.loss, case.from_logits), memory_budget=1 << 26)
    assert network.shared.sparse
    x, y = case.data(6, 0)
    sums = network.shared_sums([(x, y)])[targets[0].name]
    expected = reference(case)
    assert np.abs(expected.hessian_diagonal).max() > 0
    assert_close(sums.gradient / len(x), expected.gradient, 1e-5, "gradient", expected.smooth)
    assert_close(sums.hessian_diagonal / len(x), expected.hessian_diagonal, 1e-5, "diagonal", expected.smooth)


def _wide_conv_before_pool():
    """A convolution of 216 features per channel before a 2x2 max pool, and 65 classes: a support of a quarter of the
    positions, no narrower than the factor's 64 columns, so the columns fold by products on the support."""
    L = keras.layers
    inp = keras.Input((16, 16, 24))
    h = L.MaxPooling2D()(L.Conv2D(2, 3, padding="same", activation="relu", name="target")(inp))
    return keras.Model(inp, L.Dense(65)(L.Flatten()(h)))


@pytest.mark.parametrize("weight", ["kernel", "bias"])
def test_support_products_match_loss_values(weight):
    case = Case("wide_conv_before_pool", _wide_conv_before_pool, "target", "sparse_categorical_crossentropy", True, True,
                (16, 16, 24), 65, weight=weight)
    model = case.model()
    loss = get_loss(case.loss, case.from_logits)
    targets = [t for t in resolve_targets(model, "all") if t.layer.name == "target"]
    network = NetworkCurvature(model, targets, loss, column_chunk=24)
    x, y = case.data(4, 0)
    shared = network.shared
    forward = shared._forward(tf.constant(x), tf.constant(y))
    folds = shared._folds(shared._patches(forward), shared._reach(forward), len(x))
    assert [type(fold) for fold in folds.values()] == [SupportProductFold]
    sums = network.shared_sums([(x, y)])[f"target/{weight}"]
    expected = reference(case, n=4)
    assert_close(sums.gradient / len(x), expected.gradient, 1e-5, "gradient", expected.smooth)
    assert_close(sums.hessian_diagonal / len(x), expected.hessian_diagonal, 1e-5, "diagonal", expected.smooth)

"""Engine choice, refusal of inexact engines, and the Hutchinson estimator's convergence."""

import contextlib
import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature import LayerCurvature, batches_of, layer_derivatives
from pipeline.curvature.exact import ExactEngine
from pipeline.errors import BadInputError
from tests.curvature.cases import CASE_IDS, CASES, reference as case_reference


def _case(name):
    return CASES[CASE_IDS.index(name)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_auto_picks_factored_exactly_when_suffix_is_piecewise_linear(case):
    curvature = LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=case.from_logits, engine="auto")
    assert curvature.choice.name == ("factored" if case.piecewise_linear else "exact")
    assert curvature.choice.exact
    assert curvature.choice.reason.startswith("auto: ")
    if not case.piecewise_linear:
        assert "not piecewise linear" in curvature.choice.reason


def test_factored_on_gelu_suffix_is_refused_naming_the_layer():
    case = _case("cnn_gelu")
    with pytest.raises(BadInputError, match=r"target \(own activation 'gelu'\)"):
        LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=True, engine="factored")


def test_factored_on_layernorm_suffix_names_the_layernorm():
    case = _case("layernorm")
    with pytest.raises(BadInputError, match=r"layer_normalization.*LayerNormalization"):
        LayerCurvature(case.model(), case.layer, loss=case.loss, engine="factored")


def test_cross_entropy_on_probabilities_without_softmax_is_not_piecewise_linear():
    case = _case("cnn_maxpool_relu")
    curvature = LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=False, engine="auto")
    assert curvature.choice.name == "exact"
    assert "without a final softmax" in curvature.choice.reason


@pytest.mark.parametrize(
    "name,engine,option,counts",
    [("mlp_tanh", "hutchinson", "probes", (16, 256)), ("cnn_maxpool_relu", "monte_carlo", "samples", (8, 128))],
)
def test_stochastic_estimates_converge_like_one_over_sqrt_samples(name, engine, option, counts):
    case = _case(name)
    model = case.model()
    x, y = case.data(n=8)
    reference = case_reference(case, n=8)
    exact, smooth = reference.hessian_diagonal, reference.smooth
    errors = {}
    for count in counts:
        curvature = LayerCurvature(model, case.layer, loss=case.loss, from_logits=case.from_logits, engine=engine, seed=3, **{option: count})
        assert not curvature.choice.exact
        result = curvature.compute(batches_of(x, y, 4))
        errors[count] = np.sqrt(np.mean((result.hessian_diagonal - exact)[smooth] ** 2))
        assert curvature.stderr is not None and curvature.stderr.shape == exact.shape
        # the reported standard error is an honest scale of the actual error
        assert 0.2 < errors[count] / np.sqrt(np.mean(curvature.stderr[smooth] ** 2)) < 5
    ratio = errors[counts[0]] / errors[counts[1]]  # 1/sqrt(count) predicts 4
    assert 2.0 < ratio < 8.0, errors


def test_hutchinson_shard_equals_slice_of_full_estimate():
    case = _case("cnn_gelu")
    model = case.model()
    x, y = case.data()
    full = layer_derivatives(model, case.layer, x, y, loss=case.loss, from_logits=True, engine="hutchinson", probes=8)
    part = layer_derivatives(
        model, case.layer, x, y, loss=case.loss, from_logits=True, engine="hutchinson", probes=8, out_channels=slice(2, 4)
    )
    np.testing.assert_allclose(part.hessian_diagonal, full.hessian_diagonal[..., 2:4], rtol=1e-6, atol=1e-9)


def test_monte_carlo_on_smooth_suffix_is_refused():
    case = _case("cnn_gelu")
    with pytest.raises(BadInputError, match="monte_carlo' needs a piecewise-linear suffix"):
        LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=True, engine="monte_carlo")


@pytest.mark.parametrize("name", ["strided_valid", "mlp_tanh", "cnn_gelu"])
def test_exact_engine_block_and_entry_methods_agree(name):
    case = _case(name)
    model = case.model()
    x, y = case.data()
    curvature = LayerCurvature(model, case.layer, loss=case.loss, from_logits=case.from_logits, engine="exact", chunk_size=16)
    results = {}
    for method in ("block", "entry"):
        curvature.engine.method = method
        results[method] = curvature.compute(batches_of(x, y, 3)).hessian_diagonal
    scale = np.abs(results["entry"]).max()
    np.testing.assert_allclose(results["block"], results["entry"], rtol=0, atol=1e-5 * scale)
    reference = case_reference(case)
    assert np.abs(results["block"] - reference.hessian_diagonal)[reference.smooth].max() <= 1e-5 * np.abs(reference.hessian_diagonal).max()


def test_exact_engine_takes_the_cheaper_method_per_layer():
    dense = LayerCurvature(_case("mlp_tanh").model(), "target", loss="mse", engine="exact")
    assert dense.engine.method == "block" and dense.engine.positions == 1  # one HVP per output unit
    conv = LayerCurvature(_case("cnn_gelu").model(), "target", loss="categorical_crossentropy", from_logits=True, engine="exact")
    assert conv.engine.method == "entry" and conv.engine.features < conv.engine.positions


def test_layer_derivatives_reuses_its_compiled_state():
    from pipeline.curvature.layer import cached_curvature

    case = _case("mlp_tanh")
    model = case.model()
    first = cached_curvature(model, case.layer, loss=case.loss, engine="exact")
    assert cached_curvature(model, case.layer, loss=case.loss, engine="exact") is first
    assert cached_curvature(model, case.layer, loss=case.loss, engine="hutchinson") is not first
    assert cached_curvature(case.model(), case.layer, loss=case.loss, engine="exact") is not first  # another model


def test_exact_engine_is_compiled_by_xla_only_where_the_audit_verifies_it():
    case = _case("layernorm")  # its LayerNormalization rule passes the audit compiled by XLA
    model, (x, y) = case.model(), case.data()
    runs = []
    for _ in range(2):  # each compiles anew: the results must still be bit-identical (resumed and retried work)
        smooth = LayerCurvature(model, "target", loss=case.loss, engine="exact")
        assert smooth.second_order.not_xla_verified == () and smooth.engine.compiler == "xla"
        runs.append(smooth.compute(batches_of(x, y, 4)))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    pooled = LayerCurvature(_case("cnn_gelu").model(), "target", loss="categorical_crossentropy", from_logits=True, engine="exact")
    assert pooled.engine.compiler == "graph"
    (blocker,) = pooled.second_order.not_xla_verified
    assert blocker.endswith("(MaxPooling2D)")


def test_exact_engine_runs_as_a_graph_where_xla_cannot_compile(caplog):
    case = _case("cnn_gelu")  # its max pool's second-order rule has no XLA kernel
    x, y = case.data()
    curvature = LayerCurvature(case.model(), case.layer, loss=case.loss, from_logits=True, engine="exact")
    graph = curvature.engine.batch_derivatives(x, y, slice(0, 4))
    forced = ExactEngine(curvature.problem, jit_compile=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.curvature.exact"):
        fallen_back = forced.batch_derivatives(x, y, slice(0, 4))
    assert forced.compiler == "graph" and "XLA cannot compile" in caplog.text
    for a, b in zip(fallen_back, graph):
        np.testing.assert_array_equal(a, b)


def test_exact_engine_by_xla_agrees_with_the_factored_rules():
    """A suffix through ZeroPadding2D and LeakyReLU: the factored engine's transpose rules (first derivatives
    only) against the XLA-compiled exact engine. Traced inside an XLA context, TensorFlow differentiated this
    suffix through ops with no second-order gradient."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="target")(inp)
    h = keras.layers.LeakyReLU(0.1)(keras.layers.Conv2D(3, 3)(keras.layers.ZeroPadding2D(1)(h)))
    model = keras.Model(inp, keras.layers.Dense(5)(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 6, 6, 2)).astype("float32"), rng.integers(0, 5, 6)
    options = dict(loss="sparse_categorical_crossentropy", from_logits=True)
    factored = LayerCurvature(model, "target", engine="factored", **options)
    exact = LayerCurvature(model, "target", engine="exact", **options)
    assert factored.engine.column_method == "rules" and exact.engine.compiler == "xla"
    for a, b in zip(factored.compute(batches_of(x, y, 3)), exact.compute(batches_of(x, y, 3))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    assert exact.engine.compiler == "xla"


def _softmax_head_mlp(activation="softmax"):
    """An MLP whose softmax head sees logit gaps of ~50-100: many class probabilities lie far below Keras' ε (1e-7)."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="relu", name="target")(inp)
    out = keras.layers.Dense(4, activation=activation, name="out")
    model = keras.Model(inp, out(h))
    out.kernel.assign(out.kernel * 40)
    return model


@pytest.mark.parametrize("from_logits", [False, True])
def test_softmax_head_engines_give_the_keras_training_loss_where_probabilities_underflow(from_logits):
    """Keras' cross-entropy of a softmax output uses its logits (even with from_logits=True): no clipping. The peeled
    factored engine, the exact engine and the gradient of ``keras.losses`` on the model output all agree."""
    model = _softmax_head_mlp()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5)).astype("float32") * 2, rng.integers(0, 4, 8)
    probs = model(x).numpy()
    assert (probs[np.arange(8), y] < keras.config.epsilon()).sum() >= 3
    options = dict(loss="sparse_categorical_crossentropy", from_logits=from_logits)
    factored = LayerCurvature(model, "target", engine="auto", **options)
    assert factored.choice.name == "factored" and "final softmax folded" in factored.choice.reason
    exact = LayerCurvature(model, "target", engine="exact", **options)
    with pytest.warns() if from_logits else contextlib.nullcontext():
        got, reference = factored.compute(batches_of(x, y, 4)), exact.compute(batches_of(x, y, 4))
    for a, b in zip(got, reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    kernel = model.get_layer("target").kernel
    with tf.GradientTape() as tape, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)(y, model(x))
    np.testing.assert_allclose(got.gradient, tape.gradient(keras_loss, kernel).numpy(), rtol=0, atol=1e-5 * np.abs(got.gradient).max())


def test_activation_named_softmax_that_is_not_keras_softmax_is_not_peeled():
    """Keras attaches logits only to its own softmax's output; another function gets the clipped loss of its values."""

    def softmax(t):
        e = keras.ops.exp(t - keras.ops.max(t, axis=-1, keepdims=True))
        return e / keras.ops.sum(e, axis=-1, keepdims=True)

    curvature = LayerCurvature(_softmax_head_mlp(softmax), "target", loss="sparse_categorical_crossentropy", engine="auto")
    assert curvature.choice.name == "exact" and "without a final softmax" in curvature.choice.reason


def test_exact_engine_takes_fewer_directions_per_call_where_the_memory_budget_needs():
    case = _case("cnn_gelu")
    model = case.model()
    x, y = case.data()
    options = dict(loss=case.loss, from_logits=case.from_logits, engine="exact", chunk_size=64)
    full = LayerCurvature(model, case.layer, **options)
    budget = full.engine.memory.bytes(len(x), 5)
    bounded = LayerCurvature(model, case.layer, memory_budget=budget, **options)
    assert full.engine.directions_per_call(len(x)) == 64 and bounded.engine.directions_per_call(len(x)) == 5
    assert bounded.predicted_bytes(len(x)) <= budget < full.predicted_bytes(len(x))
    expected = full.compute(batches_of(x, y, len(x))).hessian_diagonal
    found = bounded.compute(batches_of(x, y, len(x))).hessian_diagonal
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    reference = case_reference(case)  # float64 differences of loss values, not nested tapes
    assert np.abs(found - reference.hessian_diagonal)[reference.smooth].max() <= 1e-5 * np.abs(reference.hessian_diagonal).max()


def test_exact_engine_refuses_a_batch_whose_one_product_cannot_fit():
    case = _case("cnn_gelu")
    options = dict(loss=case.loss, from_logits=case.from_logits, engine="exact")
    one = LayerCurvature(case.model(), case.layer, **options).engine.memory.bytes(1, 1)
    curvature = LayerCurvature(case.model(), case.layer, memory_budget=3 * one, **options)
    curvature.check_memory(3)
    with pytest.raises(BadInputError, match=r"for one Hessian-vector product over a batch of 4 examples .* data.batch_size 3 would fit"):
        curvature.check_memory(4)
    tiny = LayerCurvature(case.model(), case.layer, memory_budget=one // 2, **options)
    with pytest.raises(BadInputError, match=r"needs compute.memory_gb of at least .* \(with data.batch_size 1\)"):
        tiny.check_memory(1)

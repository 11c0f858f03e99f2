"""The exact engine's ``precision``: a model whose float32 forward pass loses digits (an offset of 1e4 added and taken
away again) is off in float32, and right in float64, against float64 differences of loss values."""

import keras
import numpy as np
import pytest

from pipeline.curvature import layer_derivatives
from tests.curvature.cases import Case, assert_close, value_reference


def _cancelling():
    L = keras.layers
    inp = keras.Input((6,))
    h = L.Dense(4, activation="tanh", name="target")(inp)
    h = L.Dense(4, name="down")(L.Dense(4, name="up")(h))
    return keras.Model(inp, L.Dense(3, name="out")(L.Dense(5, activation="tanh")(h)))


class Cancelling(Case):
    def model(self) -> keras.Model:
        """An identity that float32 cannot hold: h + OFFSET, then - OFFSET (h kept to about 5e-4 only)."""
        model = super().model()
        for name, offset in (("up", OFFSET), ("down", -OFFSET)):
            layer = model.get_layer(name)
            layer.kernel.assign(np.eye(4, dtype="float32"))
            layer.bias.assign(np.full(4, offset, "float32"))
        return model


OFFSET = 1e4
CASE = Cancelling("cancelling", _cancelling, "target", "sparse_categorical_crossentropy", True, False, (6,), 3)


@pytest.fixture(scope="module")
def expected():
    return value_reference(CASE, step=3e-3)  # a wider step: loss values carry the offset's rounding too


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_float64_precision_recovers_the_digits_float32_loses(precision, expected):
    x, y = CASE.data()
    found = layer_derivatives(CASE.model(), "target", x, y, loss=CASE.loss, from_logits=True, engine="exact",
                              precision=precision, batch_size=6)
    if precision == "float64":
        assert_close(found.hessian_diagonal, expected.hessian_diagonal, 1e-5, "float64 diagonal", expected.smooth)
        assert_close(found.gradient, expected.gradient, 1e-5, "float64 gradient", expected.smooth)
    else:  # the float32 model's own arithmetic: off by far more than the reference's accuracy
        scale = np.abs(expected.hessian_diagonal).max()
        assert np.abs(found.hessian_diagonal - expected.hessian_diagonal).max() > 1e-4 * scale


def test_validation_advises_float64_only_for_float32_tensors_of_an_engine_that_takes_it():
    from pipeline.curvature.engines import ENGINES
    from pipeline.validate import precision_advice

    engines = {"a/kernel": ENGINES["exact"], "b/kernel": ENGINES["factored"]}
    advice = precision_advice({"failed": ["a/kernel", "b/kernel"]}, engines, "float32")
    assert advice.startswith("a/kernel ran on the exact engine in float32") and "b/kernel" not in advice
    assert precision_advice({"failed": ["a/kernel"]}, engines, "float64") is None
    assert precision_advice({"failed": ["b/kernel"]}, engines, "float32") is None


def _grouped_suffix():
    L = keras.layers
    inp = keras.Input((5, 5, 2))
    h = L.Conv2D(4, 3, padding="same", activation="tanh", name="target")(inp)
    h = L.Conv2D(4, 3, groups=2, padding="same", activation="tanh")(h)  # its gradient has no TensorFlow CPU kernel
    return keras.Model(inp, L.Dense(3)(L.Flatten()(h)))


def test_float64_products_through_a_grouped_convolution():
    case = Case("grouped_suffix", _grouped_suffix, "target", "sparse_categorical_crossentropy", True, False, (5, 5, 2), 3)
    expected = value_reference(case)
    x, y = case.data()
    found = layer_derivatives(case.model(), "target", x, y, loss=case.loss, from_logits=True, engine="exact",
                              precision="float64", batch_size=6)
    assert_close(found.hessian_diagonal, expected.hessian_diagonal, 1e-5, "diagonal", expected.smooth)
    assert_close(found.gradient, expected.gradient, 1e-5, "gradient", expected.smooth)


def test_float64_clone_and_float64_computation_share_the_models_built_constants():
    """``Normalization(mean=[0.485, ...])`` builds float32 constants: the float64 clone (the references' model) takes
    those values, not the config's float64 ones, and ``computing_in_float64`` takes their square roots in float64, so
    the two compute one function, bit for bit (before, they differed by 2e-8 at the input)."""
    import tensorflow as tf

    from pipeline.curvature.precision import computing_in_float64, float64_clone

    inp = keras.Input((4, 4, 3))
    normalized = keras.layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.229**2, 0.224**2, 0.225**2])(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(normalized))
    x = tf.constant(np.random.default_rng(0).uniform(size=(2, 4, 4, 3)), tf.float64)
    with computing_in_float64(model):
        computed = model(x).numpy()
    cloned = float64_clone(model)(x).numpy()
    assert computed.dtype == cloned.dtype == np.float64
    np.testing.assert_array_equal(computed, cloned)
    assert model.layers[1].mean.dtype == tf.float32  # restored after the block


@pytest.mark.parametrize("nesting", ["sequential", "functional"])
def test_float64_passes_enter_nested_models_without_rounding(nesting):
    """A nested model casts what it is called on to its input's dtype, float32 as built (ConvNeXt's stem and
    downsampling blocks are nested ``Sequential`` models). In the float64 clone and in ``computing_in_float64`` it
    must not: both meet NumPy's float64 arithmetic to 1e-15, where a rounded entry leaves 1e-8."""
    import tensorflow as tf

    from pipeline.curvature.precision import computing_in_float64, float64_clone

    if nesting == "sequential":
        block = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh", name="inner")], name="block")
    else:
        inner_input = keras.Input((4,))
        block = keras.Model(inner_input, keras.layers.Dense(4, activation="tanh", name="inner")(inner_input), name="block")
    inp = keras.Input((3,))
    model = keras.Model(inp, block(keras.layers.Dense(4, name="first")(inp)))
    x = np.random.default_rng(0).normal(size=(5, 3))
    (w1, b1), (w2, b2) = (model.get_layer("first").get_weights(),
                          model.get_layer("block").get_layer("inner").get_weights())
    expected = np.tanh((x @ w1.astype(np.float64) + b1) @ w2.astype(np.float64) + b2)
    with computing_in_float64(model):
        computed = model(tf.constant(x, tf.float64)).numpy()
    cloned = float64_clone(model)(tf.constant(x, tf.float64)).numpy()
    for found in (computed, cloned):
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-15)
    assert model.get_layer("block").inputs[0].dtype == "float32"  # restored after the block

"""layer_derivatives against float64 references from loss values (frozen decisions where the suffix is piecewise
linear), on the shared case table."""

import numpy as np
import pytest

from pipeline.curvature import finite_difference_derivatives, layer_derivatives
from tests.curvature.cases import CASE_IDS, CASES, assert_close, reference


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case_with_reference(request):
    case = request.param
    model = case.model()
    x, y = case.data()
    return case, model, x, y, reference(case)


def test_exact_engine_matches_loss_value_differences(case_with_reference):
    case, model, x, y, (grad_ref, diag_ref, smooth) = case_with_reference
    result = layer_derivatives(
        model, case.layer, x, y, loss=case.loss, from_logits=case.from_logits, engine="exact", batch_size=4, chunk_size=16
    )
    assert_close(result.gradient, grad_ref, 1e-5, f"{case.name} gradient", smooth)
    assert_close(result.hessian_diagonal, diag_ref, 1e-5, f"{case.name} hessian diagonal", smooth)


def test_factored_engine_matches_loss_value_differences_on_piecewise_linear_suffixes(case_with_reference):
    case, model, x, y, (grad_ref, diag_ref, smooth) = case_with_reference
    if not case.piecewise_linear:
        pytest.skip("factored engine is refused for this suffix (tested in test_engines)")
    result = layer_derivatives(model, case.layer, x, y, loss=case.loss, from_logits=case.from_logits, engine="factored", batch_size=4)
    assert_close(result.gradient, grad_ref, 1e-5, f"{case.name} gradient", smooth)
    assert_close(result.hessian_diagonal, diag_ref, 1e-5, f"{case.name} hessian diagonal", smooth)


# Slicing is engine logic, not layer logic: one case per engine path (exact by XLA and as a graph, conv and
# dense targets; factored dense and sparse products, transpose rules over branches and strides).
SLICED_CASES = ("mlp_tanh", "layernorm", "cnn_gelu", "cnn_maxpool_relu", "cnn_70_classes", "merge_zoo", "residual_relu",
                "transpose_zoo", "strided_valid", "mlp_relu")


def test_channel_slice_equals_slice_of_full_result(case_with_reference):
    case, model, x, y, (grad_ref, diag_ref, smooth) = case_with_reference
    if case.name not in SLICED_CASES:
        pytest.skip("channel slicing is tested on one case per engine path")
    result = layer_derivatives(
        model, case.layer, x, y, loss=case.loss, from_logits=case.from_logits, out_channels=slice(1, 3), engine="auto"
    )
    assert result.hessian_diagonal.shape == diag_ref[..., 1:3].shape
    assert_close(result.hessian_diagonal, diag_ref[..., 1:3], 1e-5, f"{case.name} sliced diagonal", smooth[..., 1:3])
    assert_close(result.gradient, grad_ref[..., 1:3], 1e-5, f"{case.name} sliced gradient", smooth[..., 1:3])


@pytest.mark.parametrize("name", ["cnn_gelu", "residual_relu"])
def test_exact_engine_matches_float64_finite_differences(name):
    case = CASES[CASE_IDS.index(name)]
    model = case.model()
    x, y = case.data()
    result = layer_derivatives(model, case.layer, x, y, loss=case.loss, from_logits=case.from_logits, engine="exact")
    rng = np.random.default_rng(0)
    indices = [tuple(rng.integers(0, d) for d in result.gradient.shape) for _ in range(6)]
    fd = finite_difference_derivatives(model, case.layer, x, y, indices, loss=case.loss, from_logits=case.from_logits)
    got_diag = np.array([result.hessian_diagonal[i] for i in indices])
    got_grad = np.array([result.gradient[i] for i in indices])
    np.testing.assert_allclose(got_diag, fd.hessian_diagonal, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_grad, fd.gradient, rtol=1e-4, atol=1e-7)


def test_finite_differences_step_past_a_kink_within_h():
    """A ReLU input 3e-6 from its kink: steps h = 1e-5 and h/2 straddle it; a smaller step resolves the entry."""
    import keras

    inp = keras.Input((1,))
    hidden = keras.layers.Dense(1, activation="relu", name="target")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, use_bias=False, name="out")(hidden))
    model.get_layer("target").set_weights([np.array([[0.5]], "float32"), np.array([-0.499997], "float32")])
    model.get_layer("out").set_weights([np.array([[3.0]], "float32")])
    x, y = np.ones((1, 1), "float32"), np.full((1, 1), 2.0, "float32")
    z = 0.5 + float(np.float32(-0.499997))
    assert 0 < z < 5e-6  # within both steps of the kink
    fd = finite_difference_derivatives(model, "target", x, y, [(0, 0)], loss="mse", step=1e-5)
    assert fd.smooth[0]
    np.testing.assert_allclose(fd.hessian_diagonal[0], 2 * 3.0**2, rtol=1e-6)  # d²/dw² (3 relu(w + b) - 2)² = 18
    np.testing.assert_allclose(fd.gradient[0], 2 * (3.0 * z - 2.0) * 3.0, rtol=1e-6)


def test_finite_differences_take_longer_steps_for_a_gradient_far_below_the_loss():
    """(1e-6 sin z + 10)²: a loss of 100 whose gradient entries are 2e-5, as in ConvNeXt's blocks (scaled by 1e-6). Its
    loss values at w ± h differ in their last digits only, so rounding, not truncation, limits the difference
    quotient; shorter steps make it worse, until both sides round to one value and the gradient reads 0. Longer steps
    resolve it, and the values meet the analytic ones."""
    import keras

    scale, offset = 1e-6, 10.0
    inp = keras.Input((3,))
    z = keras.layers.Dense(1, name="target")(inp)
    model = keras.Model(inp, keras.ops.sin(z) * scale + offset)
    model.get_layer("target").set_weights([np.array([[0.5], [-0.3], [0.8]], "float32"), np.array([0.1], "float32")])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3)).astype("float32"), np.zeros((4, 1), "float32")
    w, b = (v.astype(np.float64) for v in model.get_layer("target").get_weights())
    x64 = x.astype(np.float64)
    z64 = x64 @ w[:, 0] + b[0]
    residual = scale * np.sin(z64) + offset
    gradient = np.mean(2 * residual[:, None] * scale * np.cos(z64)[:, None] * x64, axis=0)
    diagonal = np.mean(2 * ((scale * np.cos(z64)) ** 2 - residual * scale * np.sin(z64))[:, None] * x64**2, axis=0)
    indices = [(0, 0), (1, 0), (2, 0)]
    fd = finite_difference_derivatives(model, "target", x, y, indices, loss="mse", step=1e-5)
    assert fd.smooth.all()
    # resolved as promised: within a quarter of validation's default tolerance (rtol 1e-3, atol 1e-4 of the largest)
    promised = 0.25 * (1e-3 * np.abs(gradient) + 1e-4 * np.abs(gradient).max())
    assert np.all(np.abs(fd.gradient - gradient) <= promised), (fd.gradient, gradient)
    np.testing.assert_allclose(fd.hessian_diagonal, diagonal, rtol=1e-6)


def test_finite_differences_refine_where_derivatives_vary_faster_than_the_step():
    """sin(2e4 z): the phase moves 0.2 rad over h = 1e-5, so steps h and h/2 agree to 0.3% and are both 0.3% off; a
    reference resolved only to that would fail a correct result at rtol 1e-3. Smaller steps are taken until they agree
    to a quarter of the tolerance, and the extrapolated values meet the analytic ones."""
    import keras

    frequency = 2e4
    inp = keras.Input((3,))
    z = keras.layers.Dense(1, name="target")(inp)
    model = keras.Model(inp, keras.ops.sin(z * frequency))
    model.get_layer("target").set_weights([np.array([[0.5], [-0.3], [0.8]], "float32"), np.array([0.1], "float32")])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(4, 1)).astype("float32")
    w, b = (v.astype(np.float64) for v in model.get_layer("target").get_weights())
    x64, y64 = x.astype(np.float64), y[:, 0].astype(np.float64)
    phase = frequency * (x64 @ w[:, 0] + b[0])
    residual = np.sin(phase) - y64
    gradient = np.mean(2 * residual[:, None] * frequency * np.cos(phase)[:, None] * x64, axis=0)
    diagonal = np.mean(2 * frequency**2 * (np.cos(phase) ** 2 - residual * np.sin(phase))[:, None] * x64**2, axis=0)
    indices = [(0, 0), (1, 0), (2, 0)]
    fd = finite_difference_derivatives(model, "target", x, y, indices, loss="mse", step=1e-5)
    assert fd.smooth.all()
    np.testing.assert_allclose(fd.gradient, gradient, rtol=1e-6)
    np.testing.assert_allclose(fd.hessian_diagonal, diagonal, rtol=1e-6)

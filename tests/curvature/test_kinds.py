"""Every target kind against float64 references from loss values: plain differences where the suffix is smooth, the
frozen-decision function where it is piecewise linear; and each kind's algebra (its patches rebuild z)."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature import LayerCurvature, layer_derivatives
from pipeline.curvature.patches import as_dense
from pipeline.curvature.target import layer_names, resolve_target
from pipeline.errors import BadInputError
from tests.curvature.cases import KIND_CASES, KIND_IDS, assert_close, reference


@pytest.mark.parametrize("case", KIND_CASES, ids=KIND_IDS)
def test_every_engine_matches_the_float64_reference(case):
    model = case.model()
    x, y = case.data()
    expected = reference(case)
    options = dict(loss=case.loss, from_logits=case.from_logits, weight=case.weight, batch_size=4)
    auto = LayerCurvature(model, case.layer, loss=case.loss, from_logits=case.from_logits, weight=case.weight, engine="auto")
    assert auto.choice.name == ("factored" if case.piecewise_linear else "exact"), auto.choice.reason
    engines = ["exact", "factored"] if case.piecewise_linear else ["exact"]
    for engine in engines:
        result = layer_derivatives(model, case.layer, x, y, engine=engine, chunk_size=16, **options)
        assert_close(result.gradient, expected.gradient, 1e-5, f"{case.name} {engine} gradient", expected.smooth)
        assert_close(result.hessian_diagonal, expected.hessian_diagonal, 1e-5, f"{case.name} {engine} diagonal", expected.smooth)
    assert np.abs(expected.hessian_diagonal).max() > 0


@pytest.mark.parametrize("case", KIND_CASES, ids=KIND_IDS)
def test_patches_rebuild_the_stage_output(case):
    """z(W) - z(0) = Σ_f P[n, s, g(o), f] W_c[f, o]: the one formula every engine relies on, in float64."""
    model = case.model()
    target = resolve_target(model, case.layer, case.weight)
    x, _ = case.data(n=2)
    u = target.input_stage(tf.constant(x))
    variable = target.variable
    saved = variable.numpy()
    z = target.flat(target.pre_activation(u)).numpy().astype(np.float64)
    variable.assign(np.zeros_like(saved))
    offset = target.flat(target.pre_activation(u)).numpy().astype(np.float64)
    variable.assign(saved)
    patches = as_dense(target.patches(u)).numpy().astype(np.float64)
    weight = target.weight
    canonical = saved.astype(np.float64).transpose(weight.perm).reshape(weight.feature_count, -1)
    groups = target.group_ids(slice(0, target.z_channels)).numpy()
    rebuilt = np.einsum("nsof,fo->nso", patches[:, :, groups, :], canonical)
    np.testing.assert_allclose(z - offset, rebuilt, rtol=0, atol=1e-5 * np.abs(rebuilt).max())
    np.testing.assert_array_equal(weight.to_weight(canonical, slice(0, weight.channels)), saved)


def test_channel_slices_of_a_depthwise_kernel_follow_its_shard_axis():
    case = KIND_CASES[KIND_IDS.index("depthwise2d")]
    model = case.model()
    x, y = case.data()
    options = dict(loss=case.loss, from_logits=case.from_logits, engine="exact")
    whole = layer_derivatives(model, case.layer, x, y, **options)
    part = layer_derivatives(model, case.layer, x, y, out_channels=slice(1, 3), **options)
    assert whole.hessian_diagonal.shape == (3, 3, 3, 2) and part.hessian_diagonal.shape == (3, 3, 2, 2)
    np.testing.assert_allclose(part.hessian_diagonal, whole.hessian_diagonal[:, :, 1:3], rtol=1e-6, atol=1e-12)


def test_nested_paths_and_sublayers_are_listed_and_found():
    case = KIND_CASES[KIND_IDS.index("nested_conv")]
    model = case.model()
    assert "middle/inner/conv" in layer_names(model)
    with pytest.raises(BadInputError, match=r"layer 'middle/inner/cnv' not found \(did you mean 'middle/inner/conv'"):
        resolve_target(model, "middle/inner/cnv")
    attention = KIND_CASES[KIND_IDS.index("mha_query")].model()
    assert {"mha/query", "mha/key", "mha/value", "mha/attention_output"} <= set(layer_names(attention))


def test_a_layer_called_twice_cannot_be_a_target():
    import keras

    shared = keras.layers.Dense(3, name="shared")
    inp = keras.Input((3,))
    model = keras.Model(inp, shared(shared(inp)))
    with pytest.raises(BadInputError, match="called 2 times"):
        resolve_target(model, "shared")


def test_a_nested_sequential_loaded_from_a_keras_file_is_targetable(tmp_path):
    """Loading builds a nested Sequential twice, which leaves its layers two graph nodes for one call."""
    import keras

    L = keras.layers
    stem = keras.Sequential([L.Conv2D(3, 2, name="stem_conv"), L.LayerNormalization(name="stem_ln")], name="stem")  # ConvNeXt's
    inp = keras.Input((4, 4, 2))
    keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(stem(inp)))).save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert len(loaded.get_layer("stem").layers[0]._inbound_nodes) == 2
    assert resolve_target(loaded, "stem/stem_conv").name == "stem/stem_conv/kernel"

"""The second-derivative audit: its table is current, it finds what autodiff gets wrong, and engines refuse it."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature import LayerCurvature, layer_derivatives
from pipeline.curvature.audit import audit_function, load_table, render_markdown, run_audit
from pipeline.curvature.layer_facts import support_markdown
from pipeline.errors import BadInputError

README = Path(__file__).resolve().parents[2] / "README.md"


class StopGradientNorm(keras.layers.Layer):
    """Normalizes like Keras' TensorFlow moments: variance around stop_gradient(mean)."""

    def call(self, x):
        mean = tf.reduce_mean(x, -1, keepdims=True)
        variance = tf.reduce_mean(tf.square(x - tf.stop_gradient(mean)), -1, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + 1e-3)


class CubicGate(keras.layers.Layer):
    """A smooth custom layer with honest second derivatives."""

    def call(self, x):
        return x + 0.1 * x**3


def _model(custom):
    keras.utils.set_random_seed(4)
    inp = keras.Input((5,))
    h = custom(keras.layers.Dense(6, activation="tanh", name="target")(inp))
    return keras.Model(inp, keras.layers.Dense(3)(h))


def test_table_matches_a_fresh_audit_and_the_readme():
    stored, fresh = load_table(), run_audit(workers=2)
    for section in ("layers", "activations"):
        assert list(stored[section]) == list(fresh[section])
        for key, entry in fresh[section].items():
            mine = stored[section][key]
            summary = lambda e: (e["rule"], e["autodiff_exact"], e["verified"], e["xla_verified"],  # noqa: E731
                                 [(c["with_rule"]["passed"], (c["with_rule"]["xla"] or {}).get("passed")) for c in e["cases"]])
            assert summary(mine) == summary(entry), f"{section}/{key} is stale: run scripts/gen_audit_table.py"
    readme = README.read_text()
    assert render_markdown(stored) in readme, "README's audit table is stale: run scripts/gen_audit_table.py"
    assert support_markdown() in readme, "README's support table is stale: run scripts/gen_audit_table.py --support-only"


def test_audit_finds_the_known_autodiff_errors_and_each_rule_fixes_them():
    table = load_table()
    for key in ("LayerNormalization", "GroupNormalization"):
        assert not table["layers"][key]["autodiff_exact"] and table["layers"][key]["verified"]
    worst = max(c["autodiff"]["max_rel_error"] for c in table["layers"]["LayerNormalization"]["cases"])
    assert worst > 0.01  # far beyond difference noise
    assert not table["activations"]["softsign"]["autodiff_exact"] and table["activations"]["softsign"]["verified"]
    assert table["layers"]["RMSNormalization"]["autodiff_exact"] and table["activations"]["mish"]["autodiff_exact"]
    pooling = {c["label"]: c for c in table["layers"]["MaxPooling2D"]["cases"]}
    overlapping = pooling["MaxPooling2D(2, strides 1, same)"]
    assert not overlapping["autodiff"]["passed"] and overlapping["with_rule"]["passed"]
    # compiled by XLA: the rules hold too, except the max-pool rule, which XLA cannot compile
    for section, key in (("layers", "LayerNormalization"), ("layers", "GroupNormalization"), ("layers", "Dense"),
                         ("layers", "MultiHeadAttention"), ("activations", "softsign"), ("activations", "gelu")):
        assert table[section][key]["xla_verified"], key
    assert not table["layers"]["MaxPooling2D"]["xla_verified"]
    assert "MaxPoolWithArgmax" in overlapping["with_rule"]["xla"]["detail"]


def test_audit_accepts_true_second_derivatives_and_rejects_a_dropped_term():
    # f(x) = sum(sin(x) * x0): autodiff is right here, and the audit's value differences must accept it
    result = audit_function(lambda xs: tf.sin(xs[0]) * xs[0][:, :1], [(4,)], "sin")
    assert result.passed and result.max_rel_error < 1e-6
    # and must reject a function whose autodiff drops a second-order term
    wrong = audit_function(lambda xs: xs[0] * tf.stop_gradient(xs[0]) ** 2, [(4,)], "stop_gradient")
    assert not wrong.passed and wrong.max_rel_error > 0.1
    assert result.xla["passed"] and not wrong.xla["passed"] and wrong.xla["max_rel_error"] > 0.1


def test_custom_layer_failing_the_audit_is_refused_naming_it():
    model = _model(StopGradientNorm(name="sg_norm"))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    for engine in ("exact", "auto", "hutchinson"):
        with pytest.raises(BadInputError, match=r"layer 'sg_norm' \(StopGradientNorm\).*TensorFlow gets wrong"):
            LayerCurvature(model, "target", loss="mse", engine=engine)
    with pytest.raises(BadInputError, match="sg_norm"):
        layer_derivatives(model, "target", x, np.zeros((4, 3), "float32"), loss="mse")


def test_custom_layer_passing_the_audit_is_accepted_and_recorded():
    curvature = LayerCurvature(_model(CubicGate(name="cubic")), "target", loss="mse", engine="exact")
    assert curvature.choice.name == "exact"
    assert any(entry.startswith("cubic (CubicGate)") for entry in curvature.second_order.audited)


def test_custom_layer_is_audited_on_a_small_input_of_its_shape_class():
    keras.utils.set_random_seed(0)
    inp = keras.Input((384, 256, 3))
    h = CubicGate(name="cubic")(keras.layers.Conv2D(4, 3, name="target")(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))
    curvature = LayerCurvature(model, "target", loss="mse", engine="exact")
    assert [entry.split(":")[0] for entry in curvature.second_order.audited] == ["cubic (CubicGate) on inputs (4, 4, 4)"]


def test_keras_layer_that_fails_the_audit_is_refused():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 4, 2))
    h = keras.layers.Dense(2, activation="tanh", name="target")(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.AveragePooling3D(2, name="pool3")(h))))
    with pytest.raises(BadInputError, match=r"layer 'pool3' \(AveragePooling3D\): this layer type"):
        LayerCurvature(model, "target", loss="mse", engine="exact")

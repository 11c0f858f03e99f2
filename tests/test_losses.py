"""``pipeline.losses`` against ``keras.losses``, its Hessian factors against value differences, label checks.

Every engine and reference evaluates ``Loss.per_example``, so only a comparison with Keras itself can
catch a wrong loss definition. Second derivatives come from float64 value differences, not autodiff.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.errors import BadInputError
from pipeline.losses import LOSS_NAMES, check_labels, get_loss, keras_logits

KERAS_LOSSES = {
    "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
    "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
    "mse": keras.losses.MeanSquaredError,
}
VARIANTS = [(name, logits) for name in LOSS_NAMES for logits in (True, False) if not (name == "mse" and logits)]
DTYPES = ["float64", "float32"]
TOLERANCE = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=2e-6, atol=2e-6)}
EPSILON = keras.config.epsilon()


def keras_per_example(name, from_logits, y, output, dtype):
    """Keras' loss with reduction=None, averaged over the non-batch positions (what its default reduction averages)."""
    options = {} if name == "mse" else {"from_logits": from_logits}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns when from_logits=True meets a softmax's output
        values = KERAS_LOSSES[name](reduction=None, dtype=dtype, **options)(y, output)
    values = np.asarray(values)
    return values.reshape(len(values), -1).mean(axis=1)


def ours(name, from_logits, output, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_loss(name, from_logits).per_example(output, tf.constant(y)).numpy()


def labels(name, rng, n, classes, dtype, masses=(1.0,)):
    """Class ids, soft labels (rows summing to each of ``masses`` in turn) or regression targets."""
    if name == "sparse_categorical_crossentropy":
        return rng.integers(0, classes, n)
    if name == "categorical_crossentropy":
        soft = rng.dirichlet(np.full(classes, 0.5), n) * np.resize(np.asarray(masses), n)[:, None]
        soft[0] = np.eye(classes)[1] * masses[0]  # one one-hot row
        return soft.astype(dtype)
    return rng.normal(size=(n, classes)).astype(dtype)


def outputs(from_logits, rng, n, classes, dtype):
    """Logits, or probabilities as plain values (no softmax attached): rows summing to 1 and to other masses."""
    z = rng.normal(size=(n, classes)) * 3
    if from_logits:
        return z.astype(dtype)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[1::2] *= 1.7  # unnormalized rows: Keras renormalizes them
    return p.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, from_logits", VARIANTS)
def test_per_example_equals_keras_on_random_outputs(name, from_logits, dtype):
    rng = np.random.default_rng(0)
    output = outputs(from_logits, rng, 8, 5, dtype)
    y = labels(name, rng, 8, 5, dtype, masses=(1.0, 0.4, 2.5))
    expected = keras_per_example(name, from_logits, y, tf.constant(output), dtype)
    eager = ours(name, from_logits, tf.constant(output), y)
    graph = tf.function(lambda o: get_loss(name, from_logits).per_example(o, tf.constant(y)))(tf.constant(output)).numpy()
    assert eager.dtype == np.dtype(dtype) and eager.shape == (8,)
    np.testing.assert_allclose(eager, expected, **TOLERANCE[dtype])
    np.testing.assert_allclose(graph, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sparse_categorical_crossentropy", "categorical_crossentropy"])
def test_tiny_and_saturated_probabilities_are_clipped_as_keras_clips_them(name, dtype):
    """Probabilities given as values: Keras clips them to [ε, 1 - ε] (and renormalizes); the loss stays finite."""
    probs = np.array([
        [0.0, 0.5, 0.5],  # the labelled class has probability exactly 0
        [1.0, 0.0, 0.0],  # exactly one-hot (0 log 0 terms)
        [1e-9, 1 - 1e-9, 0.0],
        [1e-30, 0.5, 0.5],
        [EPSILON, 0.5, 0.5 - EPSILON],  # at the clip
        [3e-7, 0.5, 0.5 - 3e-7],  # just inside
        [0.4, 0.4, 0.4],  # rows summing to 1.2
    ], dtype)
    ids = np.zeros(len(probs), int)
    y = ids if name.startswith("sparse") else np.eye(3, dtype=dtype)[ids]
    got = ours(name, False, tf.constant(probs), y)
    np.testing.assert_allclose(got, keras_per_example(name, False, y, tf.constant(probs), dtype), **TOLERANCE[dtype])
    assert np.all(np.isfinite(got))
    assert got[0] == pytest.approx(-np.log(EPSILON), rel=1e-6)  # ≈ 16.118, not inf
    assert got[-1] == pytest.approx(np.log(3), rel=1e-6)  # renormalized: not -log 0.4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, from_logits", VARIANTS)
def test_outputs_of_rank_above_two_with_one_position(name, from_logits, dtype):
    """(N, 1, C) outputs: one distribution per example, as Keras sees them; MSE also takes any number of positions."""
    rng = np.random.default_rng(1)
    output = outputs(from_logits, rng, 6, 4, dtype)[:, None, :]
    y = labels(name, rng, 6, 4, dtype)
    keras_y = y[:, None] if name.startswith("sparse") else y[:, None, :]
    np.testing.assert_allclose(ours(name, from_logits, tf.constant(output), y),
                               keras_per_example(name, from_logits, keras_y, tf.constant(output), dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_on_outputs_with_several_positions_is_the_mean_of_keras_position_means(dtype):
    rng = np.random.default_rng(2)
    output, y = rng.normal(size=(5, 3, 2, 4)).astype(dtype), rng.normal(size=(5, 3, 2, 4)).astype(dtype)
    np.testing.assert_allclose(ours("mse", False, tf.constant(output), y),
                               keras_per_example("mse", False, y, tf.constant(output), dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("name", ["sparse_categorical_crossentropy", "categorical_crossentropy"])
def test_cross_entropy_on_outputs_with_several_positions_is_refused(name):
    """Keras computes one loss per position there; flattening would be another loss."""
    loss = get_loss(name, True)
    with pytest.raises(BadInputError, match=r"model output \(3, 4\) has 3 positions: Keras computes one loss per position"):
        loss.per_example(tf.zeros((2, 3, 4)), tf.zeros((2, 3, 4)))
    y = np.zeros(2, int) if name.startswith("sparse") else np.zeros((2, 3, 4))
    with pytest.raises(BadInputError, match="3 positions"):
        check_labels(loss, y, (None, 3, 4), 2)


def _softmax_models(dtype):
    """Models ending in each form of Keras softmax, with identity logits: the output is softmax(x)."""
    L = keras.layers
    identity = dict(use_bias=False, kernel_initializer="identity", dtype=dtype)

    def model(head):
        inp = keras.Input((3,), dtype=dtype)
        return keras.Model(inp, head(inp))

    return {
        "dense_softmax": model(lambda h: L.Dense(3, activation="softmax", **identity)(h)),
        "dense_ops_softmax": model(lambda h: L.Dense(3, activation=keras.ops.softmax, **identity)(h)),
        "softmax_layer": model(lambda h: L.Softmax(dtype=dtype)(L.Dense(3, **identity)(h))),
        "activation_layer": model(lambda h: L.Activation("softmax", dtype=dtype)(L.Dense(3, **identity)(h))),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("name", ["sparse_categorical_crossentropy", "categorical_crossentropy"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_softmax_outputs_take_the_logits_as_keras_does(name, from_logits, dtype):
    """A Keras softmax attaches its logits to its output and Keras' cross-entropy uses them: no clipping, exact where
    p underflows (logit gaps 40, 120, 800: p_label = e^-40 ... 0). The same probabilities as plain values are clipped."""
    z = np.array([[40.0, 0, 0], [120.0, 0, 0], [800.0, 0, 0], [1.0, 2.0, 3.0]], dtype)
    ids = np.array([1, 1, 1, 2])
    y = ids if name.startswith("sparse") else np.eye(3, dtype=dtype)[ids]
    logits_loss = np.array([40.0, 120.0, 800.0, np.log(np.exp([1.0, 2.0, 3.0]).sum()) - 3.0])
    x, labels_ = tf.constant(z), tf.constant(y)
    for form, model in _softmax_models(dtype).items():
        for mode, run in (("eager", lambda f: f()), ("graph", lambda f: tf.function(f)())):
            expected = run(lambda: KERAS_LOSSES[name](from_logits=from_logits, reduction=None, dtype=dtype)(labels_, model(x)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = run(lambda: get_loss(name, from_logits).per_example(model(x, training=False), labels_))
            assert got.dtype.name == dtype, form
            np.testing.assert_allclose(got.numpy(), expected.numpy(), **TOLERANCE[dtype], err_msg=f"{form} {mode}")
            np.testing.assert_allclose(expected.numpy(), logits_loss, rtol=1e-6, err_msg=f"{form} {mode}")
    values = tf.constant(tf.nn.softmax(z).numpy())  # no softmax attached
    clipped = ours(name, False, values, y)
    assert keras_logits(values) is None
    np.testing.assert_allclose(clipped, keras_per_example(name, False, y, values, dtype), **TOLERANCE[dtype])
    assert clipped[:3] == pytest.approx(-np.log(EPSILON), rel=1e-5)  # 16.118 where the logits give 40, 120, 800


def test_from_logits_on_a_softmax_output_warns_and_uses_its_logits():
    p = keras.activations.softmax(tf.constant([[1.0, 2.0, 3.0]]))
    with pytest.warns(UserWarning, match="uses that softmax's logits"):
        got = get_loss("sparse_categorical_crossentropy", True).per_example(p, tf.constant([2])).numpy()
    assert got[0] == pytest.approx(0.40760596, rel=1e-6)  # not the cross-entropy of softmax(p): 0.797


def test_raw_tensorflow_softmax_counts_as_softmax_only_in_a_graph_as_in_keras():
    """Keras reads the input of a graph's Softmax op; an eager tf.nn.softmax output carries nothing."""
    z, y = tf.constant([[30.0, 0.0, 0.0]]), tf.constant([1])
    loss = get_loss("sparse_categorical_crossentropy", False)
    graph = tf.function(lambda t: loss.per_example(tf.nn.softmax(t), y))(z).numpy()
    keras_graph = tf.function(lambda t: keras.losses.SparseCategoricalCrossentropy(reduction=None)(y, tf.nn.softmax(t)))(z)
    assert graph[0] == pytest.approx(30.0, rel=1e-6) and keras_graph.numpy()[0] == pytest.approx(30.0, rel=1e-6)
    eager = loss.per_example(tf.nn.softmax(z), y).numpy()
    assert eager[0] == pytest.approx(-np.log(EPSILON), rel=1e-5)
    assert keras_per_example("sparse_categorical_crossentropy", False, y, tf.nn.softmax(z), "float32")[0] == pytest.approx(eager[0])


def test_mse_has_no_logits_variant():
    with pytest.raises(BadInputError, match="'mse' has no from_logits variant"):
        get_loss("mse", from_logits=True)
    assert get_loss("mse").from_logits is False


# Hessian factors against value differences ---------------------------------------------------------------


def value_hessian(f, z, h=1e-3):
    """(N, C, C) Hessians of the per-example function ``f`` ((M, C) -> (M,)) at the rows of ``z``, from float64 values:
    four-point central differences, Richardson-extrapolated over steps h and h/2."""
    n, c = z.shape
    e = np.eye(c)
    signs = [(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)]  # (s_i, s_j, weight)

    def at(step):
        total = np.zeros((n, c, c))
        for si, sj, weight in signs:
            points = z[:, None, None, :] + step * (si * e[:, None, :] + sj * e[None, :, :])  # (N, C, C, C)
            total += weight * f(points.reshape(-1, c)).reshape(n, c, c)
        return total / (4 * step**2)

    return (4 * at(h / 2) - at(h)) / 3


def _repeat(y, times):
    return tf.constant(np.repeat(np.asarray(y), times, axis=0))


FACTOR_VARIANTS = [
    ("sparse_categorical_crossentropy", True), ("sparse_categorical_crossentropy", False),
    ("categorical_crossentropy", True), ("categorical_crossentropy", False), ("mse", False),
]


@pytest.mark.parametrize("name, from_logits", FACTOR_VARIANTS)
def test_hessian_factor_is_the_value_hessian_of_per_example(name, from_logits):
    """S Sᵀ against value differences of ``per_example``: of the logits, or (peeled) of a Keras softmax's output.
    Rows include p_label ≈ 1e-11 (< ε) and p ≈ 1, where the peeled loss is not clipped."""
    rng = np.random.default_rng(3)
    n, classes = 5, 4
    z = rng.normal(size=(n, classes)) * 2
    z[0] = [25.0, 0, 0, 0]  # label probability ~1e-11 for the labels below
    z[1] = [0, 0, 0, 25.0]  # ~1 on the reflection's pivot class
    y = labels(name, rng, n, classes, "float64", masses=(1.0, 0.3, 2.0))
    if name.startswith("sparse"):
        y[0] = 1
    loss = get_loss(name, from_logits)

    def f(points):
        out = tf.constant(points) if from_logits or name == "mse" else keras.activations.softmax(tf.constant(points))
        return loss.per_example(out, _repeat(y, len(points) // n)).numpy()

    expected = value_hessian(f, z)
    factor = loss.hessian_factor(tf.constant(z), tf.constant(y)).numpy()
    assert factor.shape == (n, classes, loss.factor_width(classes))
    np.testing.assert_allclose(np.einsum("nck,ndk->ncd", factor, factor), expected, rtol=0, atol=1e-7 * max(1, np.abs(expected).max()))


def test_mse_factor_on_outputs_with_several_positions():
    rng = np.random.default_rng(4)
    out, y = rng.normal(size=(3, 2, 3)), rng.normal(size=(3, 2, 3))
    loss = get_loss("mse")

    def f(points):
        return loss.per_example(tf.constant(points.reshape(-1, 2, 3)), _repeat(y, len(points) // 3)).numpy()

    expected = value_hessian(f, out.reshape(3, 6))
    factor = loss.hessian_factor(tf.constant(out), tf.constant(y)).numpy()
    np.testing.assert_allclose(np.einsum("nck,ndk->ncd", factor, factor), expected, rtol=0, atol=1e-8)
    np.testing.assert_allclose(expected, np.broadcast_to(np.eye(6) * 2 / 6, (3, 6, 6)), atol=1e-8)


def test_clipped_loss_of_plain_probabilities_is_not_what_the_factor_describes():
    """Where p_label < ε the clipped loss of probabilities without a softmax is flat in the logits: its Hessian is not
    the softmax factor's, which is why the factored engine refuses such outputs (``check_suffix``) and the exact engine
    differentiates the clipped loss as defined. A Keras softmax's output has no clipping: the factor is its Hessian."""
    z = np.array([[0.0, -18.0, 0.0, 0.0]])  # p_1 = e^-18 / 3 ≈ 5e-9 < ε, the others ≈ 1/3
    y = np.array([1])
    loss = get_loss("sparse_categorical_crossentropy", False)
    plain = lambda points: loss.per_example(tf.exp(tf.nn.log_softmax(tf.constant(points))), _repeat(y, len(points))).numpy()  # noqa: E731
    peeled = lambda points: loss.per_example(keras.activations.softmax(tf.constant(points)), _repeat(y, len(points))).numpy()  # noqa: E731
    factor = loss.hessian_factor(tf.constant(z), tf.constant(y)).numpy()
    exact = np.einsum("nck,ndk->ncd", factor, factor)
    np.testing.assert_allclose(value_hessian(peeled, z), exact, atol=1e-8)
    assert exact[0, 0, 0] == pytest.approx(2 / 9, rel=1e-6)
    assert np.abs(value_hessian(plain, z)).max() < 1e-6  # flat: -log ε + log(1 - p_1 + ε)
    p1 = np.exp(-18.0) / (3 + np.exp(-18.0))
    assert plain(z)[0] == pytest.approx(-np.log(EPSILON) + np.log1p(EPSILON - p1), rel=1e-12)  # 16.118
    assert peeled(z)[0] == pytest.approx(18.0 + np.log(3 + np.exp(-18.0)), rel=1e-12)  # 19.099


# Monte-Carlo factors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sparse_categorical_crossentropy", "categorical_crossentropy", "mse"])
def test_sampled_factor_has_the_second_moment_of_the_factor(name):
    """E[R Rᵀ] = S Sᵀ: the mean of M sampled outer products is within 5 standard errors of it (seeded)."""
    rng = np.random.default_rng(5)
    n, classes, samples = 4, 5, 20000
    z = rng.normal(size=(n, classes)) * 2
    y = labels(name, rng, n, classes, "float64", masses=(1.0, 1.7))
    loss = get_loss(name, name != "mse")
    r = loss.sampled_factor(tf.constant(z), tf.constant(y), samples, seed=7).numpy()
    assert r.shape == (n, classes, samples)
    singles = np.einsum("ncm,ndm->ncdm", r, r) * samples  # each sample's own unbiased estimate
    stderr = singles.std(axis=-1) / np.sqrt(samples)
    s = loss.hessian_factor(tf.constant(z), tf.constant(y)).numpy()
    gap = np.abs(singles.mean(axis=-1) - np.einsum("nck,ndk->ncd", s, s))
    assert np.all(gap <= 5 * stderr + 1e-12), (gap / (stderr + 1e-300)).max()
    again = loss.sampled_factor(tf.constant(z), tf.constant(y), samples, seed=7).numpy()
    np.testing.assert_array_equal(again, r)
    assert not np.array_equal(loss.sampled_factor(tf.constant(z), tf.constant(y), samples, seed=8).numpy(), r)


# Label checks --------------------------------------------------------------------------------------------------

SPARSE, CATEGORICAL, MSE = (get_loss(name) for name in LOSS_NAMES)


@pytest.mark.parametrize("loss, y, shape, message", [
    (SPARSE, np.zeros(3, int), (None, 4), r"labels have 3 rows but inputs have 4 examples"),
    (SPARSE, np.eye(4)[[0, 1, 2, 3]], (None, 4),
     r"needs integer class labels of shape \(N,\), got \(4, 4\); use categorical_crossentropy for one-hot labels"),
    (SPARSE, np.array([0, 4, 1, 2]), (None, 4), r"class labels must lie in \[0, 4\), got range \[0, 4\]"),
    (SPARSE, np.array([0, -1, 1, 2]), (None, 4), r"class labels must lie in \[0, 4\), got range \[-1, 2\]"),
    (SPARSE, np.array([0.0, 1.5, 1, 2]), (None, 4), r"class labels must be integers, got 1.5 at row 1"),
    (SPARSE, np.array([0.0, np.nan, 1, 2]), (None, 4), r"labels must be finite; row 1 is nan"),
    (CATEGORICAL, np.zeros((4, 3)), (None, 4),
     r"categorical_crossentropy needs labels with 4 values per example to match the model output \(4,\),"
     r" got labels of shape \(4, 3\)"),
    (CATEGORICAL, np.array([[1, 0], [0, 1], [-0.5, 0.2], [0, 1]]), (None, 2), r"row 2 sums to -0.3"),
    (CATEGORICAL, np.zeros((4, 3, 4)), (None, 3, 4), r"model output \(3, 4\) has 3 positions"),
    (MSE, np.zeros((4, 5)), (None, 2, 3), r"mse needs labels with 6 values per example .* \(2, 3\)"),
])
def test_check_labels_messages(loss, y, shape, message):
    with pytest.raises(BadInputError, match=message):
        check_labels(loss, y, shape, 4)


@pytest.mark.parametrize("loss, y, shape", [
    (SPARSE, np.array([0, 3, 1, 2]), (None, 4)),
    (SPARSE, np.array([[0], [3], [1], [2]], "float32"), (None, 1, 4)),
    (CATEGORICAL, np.full((4, 4), 0.6), (None, 4)),  # soft labels of mass 2.4
    (MSE, np.zeros((4, 2, 3)), (None, 6)),
    (MSE, np.zeros((4, 6)), (None, 2, 3)),
])
def test_check_labels_accepts(loss, y, shape):
    check_labels(loss, y, shape, 4)

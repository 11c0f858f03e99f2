import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature import flat_hessian, hessian_diagonal, per_example_hessians, rowwise_hessian_diagonal


def value_second_derivatives(f, x, pairs, step=1e-3) -> np.ndarray:
    """d²f/dx_i dx_j at flat index pairs (i, j) from float64 VALUES of f only: central differences,
    Richardson-extrapolated over steps h and h/2 (no autodiff, so independent of the nested tapes)."""
    x = np.asarray(x, np.float64)
    flat = x.ravel()

    def at(i, si, j, sj, h):
        shifted = flat.copy()
        shifted[i] += si * h
        shifted[j] += sj * h
        return float(f(tf.constant(shifted.reshape(x.shape))))

    found = []
    for i, j in pairs:
        estimates = [(at(i, 1, j, 1, h) - at(i, 1, j, -1, h) - at(i, -1, j, 1, h) + at(i, -1, j, -1, h)) / (4 * h * h)
                     for h in (step, step / 2)]
        found.append((4 * estimates[1] - estimates[0]) / 3)
    return np.array(found)


def test_seed_case_reduce_prod():
    f = lambda v: tf.reduce_prod(v**2 - 3 * v + 1)  # noqa: E731
    x = tf.constant([[1.0], [2.0], [0.0]], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = f(x)
    assert float(value) == 1.0
    np.testing.assert_allclose(tape.gradient(value, x).numpy().ravel(), [1, -1, -3])
    diag = hessian_diagonal(f, x)
    assert diag.shape == (3, 1)
    np.testing.assert_allclose(diag.numpy().ravel(), [-2, -2, 2])


def test_rowwise_laplacian_of_log_norm_is_two_over_r_squared():
    q = tf.random.stateless_normal((7, 3), seed=[1, 2], dtype=tf.float64)
    diag = rowwise_hessian_diagonal(lambda q: tf.math.log(tf.reduce_sum(q**2, axis=1)), q)
    assert diag.shape == (7, 3)
    r2 = tf.reduce_sum(q**2, axis=1).numpy()
    np.testing.assert_allclose(tf.reduce_sum(diag, axis=1).numpy(), 2 / r2, rtol=1e-12)


def _random_function(shape):
    """A smooth function of all entries jointly, with a dense Hessian."""
    size = int(np.prod(shape))
    a = tf.constant(np.random.default_rng(size).normal(size=(4, size)), tf.float64)

    def f(v):
        return tf.reduce_sum(tf.sin(a @ tf.reshape(v, (size, 1)))) + tf.reduce_sum(v**4) * 0.1

    return f


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 2, 2, 3)])
def test_hessian_diagonal_matches_full_jacobian_of_gradient(shape):
    f = _random_function(shape)
    x = tf.random.stateless_normal(shape, seed=[3, len(shape)], dtype=tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            value = f(x)
        grad = inner.gradient(value, x)
    full = outer.jacobian(grad, x)
    size = int(np.prod(shape))
    expected = np.diagonal(tf.reshape(full, (size, size)).numpy()).reshape(shape)
    diag = hessian_diagonal(f, x, chunk_size=4).numpy()
    np.testing.assert_allclose(diag, expected, rtol=1e-10, atol=1e-12)
    from_values = value_second_derivatives(f, x, [(i, i) for i in range(size)]).reshape(shape)
    np.testing.assert_allclose(diag, from_values, rtol=1e-6, atol=1e-8)


def test_hessian_diagonal_of_conv_kernel_in_chunks_equals_one_hot_hvps_and_value_differences():
    kernel = tf.random.stateless_normal((3, 3, 32, 32), seed=[0, 1])
    image = tf.random.stateless_normal((1, 4, 4, 32), seed=[0, 2])
    f = lambda w: tf.reduce_sum(tf.tanh(tf.nn.conv2d(image, w, 1, "SAME")) ** 2)  # noqa: E731
    diag = hessian_diagonal(f, kernel, chunk_size=1024)  # 9 chunks of 1024 entries
    assert diag.shape == kernel.shape
    # spot-check entries against one-hot HVPs taken one at a time, independently of the chunking
    for index in [(0, 0, 0, 0), (1, 2, 17, 30), (2, 1, 31, 31)]:
        e = tf.reshape(tf.one_hot(np.ravel_multi_index(index, kernel.shape), kernel.shape.num_elements()), kernel.shape)
        with tf.GradientTape() as outer:
            outer.watch(kernel)
            with tf.GradientTape() as inner:
                inner.watch(kernel)
                value = f(kernel)
            directional = tf.reduce_sum(inner.gradient(value, kernel) * e)
        expected = float(tf.reduce_sum(outer.gradient(directional, kernel) * e))
        np.testing.assert_allclose(float(diag[index]), expected, rtol=2e-4, atol=1e-6)
        flat_index = int(np.ravel_multi_index(index, kernel.shape))
        f64 = lambda w: tf.reduce_sum(tf.tanh(tf.nn.conv2d(tf.cast(image, tf.float64), w, 1, "SAME")) ** 2)  # noqa: E731
        from_values = value_second_derivatives(f64, kernel.numpy(), [(flat_index, flat_index)])[0]
        np.testing.assert_allclose(float(diag[index]), from_values, rtol=2e-4, atol=1e-6)


def test_flat_hessian_includes_cross_blocks():
    a = tf.Variable(tf.random.stateless_normal((2, 3), seed=[5, 1], dtype=tf.float64))
    b = tf.Variable(tf.random.stateless_normal((4,), seed=[5, 2], dtype=tf.float64))
    c = tf.Variable(tf.constant(0.7, tf.float64))

    def g(a, b, c):
        return tf.reduce_sum(tf.sin(a)) * tf.reduce_sum(b**2) + c**3 * tf.reduce_sum(a * a[0, 0]) + c * tf.reduce_sum(b)

    def f():
        return g(a, b, c)

    flat = flat_hessian(f, [a, b, c])
    assert flat.matrix.shape == (11, 11)
    np.testing.assert_allclose(flat.matrix, flat.matrix.T, atol=1e-12)
    # brute force: float64 finite differences of the flat gradient, one coordinate at a time
    theta = np.concatenate([v.numpy().ravel() for v in (a, b, c)])

    def grad_at(t):
        parts = flat.unflatten(t)
        for var, part in zip((a, b, c), parts):
            var.assign(part.reshape(var.shape))
        with tf.GradientTape() as tape:
            value = f()
        return np.concatenate([g.numpy().ravel() for g in tape.gradient(value, [a, b, c])])

    h = 1e-6
    expected = np.stack([(grad_at(theta + h * e) - grad_at(theta - h * e)) / (2 * h) for e in np.eye(11)], axis=1)
    grad_at(theta)
    np.testing.assert_allclose(flat.matrix, expected, rtol=1e-6, atol=1e-7)
    # and every entry, cross blocks included, from values of g alone
    all_pairs = [(i, j) for i in range(11) for j in range(11)]
    from_values = value_second_derivatives(lambda t: g(*flat.unflatten(t.numpy())), theta, all_pairs).reshape(11, 11)
    np.testing.assert_allclose(flat.matrix, from_values, rtol=1e-6, atol=1e-8)
    assert np.abs(flat.block(0, 1)).max() > 0.1  # the off-diagonal block tf.hessians would drop
    assert flat.block(0, 1).shape == (2, 3, 4)
    # the diagonal blocks agree with tf.hessians, which returns only those
    values = [tf.convert_to_tensor(v) for v in (a, b, c)]
    blocks = tf.function(lambda *t: tf.hessians(g(*t), list(t)))(*values)
    for i, block in enumerate(blocks):
        np.testing.assert_allclose(flat.block(i, i), block.numpy(), rtol=1e-10, atol=1e-12)
    assert [d.shape for d in flat.unflatten(np.diagonal(flat.matrix))] == [(2, 3), (4,), ()]


def test_per_example_hessians_of_sum_of_squares():
    x = tf.random.stateless_normal((5, 3), seed=[2, 2], dtype=tf.float64)
    hessians = per_example_hessians(lambda x: tf.reduce_sum(x**2), x)
    np.testing.assert_allclose(hessians.numpy(), np.broadcast_to(2 * np.eye(3), (5, 3, 3)))


def test_per_example_hessians_match_brute_force_with_unknown_batch():
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 3)), tf.float64)
    f = lambda x: tf.reduce_sum(tf.tanh(x @ w) ** 2)  # noqa: E731
    fn = tf.function(lambda x: per_example_hessians(f, x), input_signature=[tf.TensorSpec([None, 3], tf.float64)])
    x = tf.random.stateless_normal((4, 3), seed=[9, 9], dtype=tf.float64)
    actual = fn(x).numpy()
    for n in range(4):
        row = tf.Variable(x[n : n + 1])
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = f(row)
            grad = inner.gradient(value, row)
        expected = tf.reshape(outer.jacobian(grad, row), (3, 3)).numpy()
        np.testing.assert_allclose(actual[n], expected, rtol=1e-12, atol=1e-12)
        pairs = [(3 * n + i, 3 * n + j) for i in range(3) for j in range(3)]
        from_values = value_second_derivatives(f, x.numpy(), pairs).reshape(3, 3)
        np.testing.assert_allclose(actual[n], from_values, rtol=1e-6, atol=1e-8)

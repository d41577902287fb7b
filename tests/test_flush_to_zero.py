"""atskern called from threads that flush subnormals to zero (TensorFlow's executor, XLA's CPU callbacks): the
draws equal the main thread's, subnormal weights included (``atskern._fpenv``)."""

from __future__ import annotations

import numpy as np
import pytest

import atskern
from atskern import _fpenv

# one row: cell 0 holds 2/3 of the mass, cells 1-5 (each subnormal in float32) the rest
ROWS = np.repeat(np.array([[1e-37] + [1e-38] * 5], np.float32), 64, axis=0)


def test_the_main_thread_does_not_flush():
    assert not _fpenv.flushing()
    with _fpenv.ieee_subnormals():
        assert not _fpenv.flushing()


def test_a_tf_function_draws_subnormal_cells_as_the_main_thread():
    tf = pytest.importorskip("tensorflow")

    @tf.function
    def inside(_):
        return tf.numpy_function(lambda: np.array(_fpenv.flushing()), [], tf.bool)

    assert inside(tf.constant(0)).numpy(), "TensorFlow's threads no longer flush subnormals: this test tests nothing"
    want, want_probs = atskern.sample(ROWS, 2, seed=11)
    assert (want[:, :, 0] > 0).any()

    draw = tf.function(lambda a: tf.numpy_function(lambda rows: atskern.sample(rows, 2, seed=11), [a],
                                                   (tf.int32, tf.float32)))
    indices, probs = draw(tf.constant(ROWS))
    np.testing.assert_array_equal(indices.numpy(), want)
    np.testing.assert_array_equal(probs.numpy(), want_probs)
    grad_probs, _ = tf.function(lambda f, p: tf.numpy_function(
        lambda f, p: atskern.expectation_grad(np.ones((64, 1), np.float32), f, p), [f, p], (tf.float32, tf.float32)))(
        tf.ones((64, 2, 1)), tf.constant(want_probs))
    np.testing.assert_array_equal(grad_probs.numpy(), atskern.expectation_grad(
        np.ones((64, 1), np.float32), np.ones((64, 2, 1), np.float32), want_probs)[0])


def test_the_jax_kernel_path_under_jit_draws_subnormal_cells_as_atskern():
    jax = pytest.importorskip("jax")
    from ats import jax as aj

    want, want_probs = atskern.sample(ROWS, 2, seed=5)
    indices, probs = jax.jit(lambda a: aj.sample_indices(a, 2, 5, path="kernel"))(ROWS)
    np.testing.assert_array_equal(np.asarray(indices), want)
    np.testing.assert_array_equal(np.asarray(probs), want_probs)

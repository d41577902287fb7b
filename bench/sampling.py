"""Sampling without replacement: atskern CPU versus the alternatives a user would pick.

(a) TF Gumbel-top-k (``tf.random.uniform`` + ``tf.math.top_k``, in a ``tf.function``),
(b) ``numpy.random.Generator.choice(replace=False, p=row)`` row by row,
(c) the floor: one streaming pass over the map (``np.sum``).
"""

from __future__ import annotations

import numpy as np

import atskern

from ._timing import TENSORFLOW_MISSING, Table, median_seconds, skipped, tensorflow_or_none

NAME = "sampling"


def cases(quick: bool):
    if quick:
        return [(1, 256, 10), (4, 256, 100)]
    return [(b, side, n) for b in (1, 32) for side in (256, 1024) for n in (10, 100)]


def _tf_gumbel_top_k():
    tf = tensorflow_or_none()
    if tf is None:
        return None, None

    @tf.function(reduce_retracing=True)
    def gumbel_top_k(attention, n):
        flat = tf.reshape(attention, (tf.shape(attention)[0], -1))
        u = tf.random.uniform(tf.shape(flat), minval=1e-20, maxval=1.0, dtype=flat.dtype)
        keys = tf.math.log(flat) - tf.math.log(-tf.math.log(u))
        return tf.math.top_k(keys, k=n).indices

    return tf, gumbel_top_k


def run(quick: bool = False, progress=None) -> Table:
    table = Table(
        NAME,
        "Sampling without replacement, float32 (ms per call, median)",
        ["B", "grid", "n", "atskern", "TF Gumbel-top-k", "numpy choice", "np.sum floor", "vs TF", "vs choice", "/ floor"],
    )
    tf, gumbel_top_k = _tf_gumbel_top_k()
    rng = np.random.default_rng(0)
    repeats = 3 if quick else 9
    for rows, side, n in cases(quick):
        attention = rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3)
        flat = attention.reshape(rows, -1)
        probabilities = flat.astype(np.float64) / flat.sum(axis=1, dtype=np.float64, keepdims=True)
        generator = np.random.default_rng(1)
        tf_attention = tf.constant(attention) if tf is not None else None

        indices, probs = atskern.sample(attention, n, seed=3)
        assert indices.shape == (rows, n, 2) and np.all(probs > 0)
        t_ats = median_seconds(lambda: atskern.sample(attention, n, seed=3), repeats=repeats, min_time=0.05)
        t_tf = None
        if tf is not None:
            t_tf = median_seconds(lambda: gumbel_top_k(tf_attention, n).numpy(), repeats=repeats, min_time=0.05)
        choice_repeats = 1 if quick or rows * side * side > 4_000_000 else 3
        t_choice = median_seconds(
            lambda: [generator.choice(flat.shape[1], n, replace=False, p=row) for row in probabilities],
            repeats=choice_repeats,
            warmup=0,
        )
        t_sum = median_seconds(lambda: attention.sum(), repeats=repeats, min_time=0.05)
        table.rows.append(
            [rows, f"{side}x{side}", n, 1e3 * t_ats, skipped(t_tf and 1e3 * t_tf), 1e3 * t_choice, 1e3 * t_sum,
             skipped(t_tf and t_tf / t_ats), t_choice / t_ats, t_ats / t_sum]
        )
        if progress is not None:
            progress.update(1)
    if tf is None:
        table.notes.append(TENSORFLOW_MISSING)
    table.notes.append("goals: >= 3x faster than TF Gumbel-top-k, >= 20x faster than numpy choice, within 4x of np.sum")
    table.notes.append("atskern time includes validation (one pass computing row sums and counts) and the sampling pass")
    return table

"""Kernel path versus XLA-native path: ``atskern`` (Numba) against ``ats.jax`` and ``ats.tf.xla``.

The same draws (same seed, checked first) and the same patches, timed side by
side in one process: atskern's kernels on NumPy arrays, the pure-JAX functions
eager (op by op) and under ``jax.jit``, the TensorFlow ops eager and under
``tf.function(jit_compile=True)``. JAX runs in its default 32-bit mode
(float32 keys) and, for sampling, also under ``jax.enable_x64`` (float64, as
atskern). Not part of the default run: ``python -m bench --only xla``.
"""

from __future__ import annotations

import numpy as np

import atskern

from ._timing import Table, median_seconds, quiet_tensorflow

NAME = "xla"


def cases(quick: bool):
    if quick:
        return [("sample", 4, 64, 10), ("patches", 2, 256, 32)]
    return [
        ("sample", 8, 64, 10),
        ("sample", 32, 256, 100),
        ("sample", 4, 1024, 10),
        ("patches", 8, 512, 50),
        ("patches", 4, 2048, 50),
        ("patches", 32, 512, 32),
    ]


def _jax():
    import jax
    import jax.numpy as jnp

    from ats import jax as aj

    return jax, jnp, aj


def _sample_row(rows, side, n, repeats, tf, xla):
    jax, jnp, aj = _jax()
    attention = np.random.default_rng(0).random((rows, side, side), dtype=np.float32) + np.float32(1e-3)
    want, _ = atskern.sample(attention, n, seed=3)
    on_device = jnp.asarray(attention)
    jitted = jax.jit(lambda a, k: aj.sample_indices(a, n, k)[0])
    key = jnp.array([3, 0], jnp.uint32)
    tf_attention = tf.constant(attention)
    tf_jit = tf.function(lambda a: xla.sample_indices(a, n, 3)[0], jit_compile=True, autograph=False)
    agree = int(np.all(np.asarray(jitted(on_device, key)) == want)) + int(np.all(tf_jit(tf_attention).numpy() == want))
    with jax.enable_x64(True):
        jitted64 = jax.jit(lambda a, k: aj.sample_indices(a, n, k)[0])
        agree += int(np.all(np.asarray(jitted64(on_device, key)) == want))
        t_x64 = median_seconds(lambda: jitted64(on_device, key).block_until_ready(), repeats=repeats, min_time=0.05)
    times = [
        median_seconds(lambda: atskern.sample(attention, n, seed=3), repeats=repeats, min_time=0.05),
        median_seconds(lambda: aj.sample_indices(on_device, n, 3)[0].block_until_ready(), repeats=max(3, repeats // 3)),
        median_seconds(lambda: jitted(on_device, key).block_until_ready(), repeats=repeats, min_time=0.05),
        t_x64,
        median_seconds(lambda: xla.sample_indices(tf_attention, n, 3)[0].numpy(), repeats=max(3, repeats // 3)),
        median_seconds(lambda: tf_jit(tf_attention).numpy(), repeats=repeats, min_time=0.05),
    ]
    return [f"sample B={rows} {side}x{side} n={n}", *(1e3 * t for t in times), f"{agree}/3"]


def _patches_row(rows, side, patch, repeats, tf, xla):
    jax, jnp, aj = _jax()
    rng = np.random.default_rng(1)
    image = rng.random((rows, side, side, 3), dtype=np.float32)
    offsets = rng.integers(-patch // 2, side - patch // 2, (rows, 10, 2)).astype(np.int32)
    want = atskern.extract_patches(image, offsets, (patch, patch))
    on_device, jax_offsets = jnp.asarray(image), jnp.asarray(offsets)
    jitted = jax.jit(lambda x, o: aj.extract_patches(x, o, (patch, patch)))
    tf_image, tf_offsets = tf.constant(image), tf.constant(offsets)
    tf_jit = tf.function(lambda x, o: xla.extract_patches(x, o, (patch, patch)), jit_compile=True, autograph=False)
    agree = int(np.array_equal(np.asarray(jitted(on_device, jax_offsets)), want)) + int(np.array_equal(tf_jit(tf_image, tf_offsets).numpy(), want))
    times = [
        median_seconds(lambda: atskern.extract_patches(image, offsets, (patch, patch)), repeats=repeats, min_time=0.05),
        median_seconds(lambda: aj.extract_patches(on_device, jax_offsets, (patch, patch)).block_until_ready(), repeats=max(3, repeats // 3)),
        median_seconds(lambda: jitted(on_device, jax_offsets).block_until_ready(), repeats=repeats, min_time=0.05),
        float("nan"),
        median_seconds(lambda: xla.extract_patches(tf_image, tf_offsets, (patch, patch)).numpy(), repeats=max(3, repeats // 3)),
        median_seconds(lambda: tf_jit(tf_image, tf_offsets).numpy(), repeats=repeats, min_time=0.05),
    ]
    return [f"patches B={rows} {side}x{side}x3 K=10 P={patch}", *(1e3 * t for t in times), f"{agree}/2"]


def run(quick: bool = False, progress=None) -> Table:
    table = Table(
        NAME,
        "Kernel path versus XLA-native path, float32 (ms per call, median)",
        ["case", "atskern kernel", "JAX eager", "JAX jit", "JAX jit x64", "TF eager", "TF jit_compile", "same result"],
    )
    tf = quiet_tensorflow()
    from ats.tf import xla

    repeats = 3 if quick else 9
    for kind, rows, side, size in cases(quick):
        if kind == "sample":
            table.rows.append(_sample_row(rows, side, size, repeats, tf, xla))
        else:
            table.rows.append(_patches_row(rows, side, size, repeats, tf, xla))
        if progress is not None:
            progress.update(1)
    table.notes.append("sample: without replacement, seed 3; 'same result' counts XLA paths whose draws equal atskern's")
    table.notes.append("patches: 10 patches per image, offsets anywhere (some partly outside); no JAX x64 variant (no floats involved)")
    table.notes.append("eager JAX dispatches every jnp op separately; jitted times exclude compilation (warm-up call)")
    return table

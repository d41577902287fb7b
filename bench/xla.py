"""Kernel path versus XLA-native path, in JAX (``ats.jax``) and TensorFlow (``ats.ops`` / ``ats.tf.xla``).

Two tables, each checked for equal results first and timed side by side in
one process, the alternatives interleaved (one call of each in turn, medians
over the rounds: the machine is shared).

JAX: ``atskern`` on NumPy arrays (the floor), ``ats.jax`` with
``path="kernel"`` (atskern's kernels: called directly when eager, through
``jax.pure_callback`` under ``jax.jit``, the scatter adjoint as its
``custom_vjp``) and ``path="xla"`` (pure ``jnp``), each eager and jitted, and
the XLA path under ``jax.enable_x64`` (float64 keys, as atskern). The
``auto`` column says what ``path="auto"`` picks on this CPU (eager / jit).

TensorFlow: ``ats.ops`` (the kernels through ``tf.numpy_function``; it cannot
run under ``jit_compile``) eager and in ``tf.function``, and ``ats.tf.xla``
eager, in ``tf.function`` and in ``tf.function(jit_compile=True)``.

Not part of the default run: ``python -m bench --only xla``.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

import atskern

from ._timing import Table, quiet_tensorflow

NAME = "xla"
PATCH = 50


def cases(quick: bool):
    if quick:
        return [("sample", 2, 32, 5), ("patches", 1, 256, 4)]
    return [
        ("sample", 1, 64, 10),
        ("sample", 8, 64, 10),
        ("sample", 32, 64, 100),
        ("sample", 8, 256, 100),
        ("sample", 1, 512, 10),
        ("sample", 8, 512, 100),
        ("patches", 1, 1500, 10),
        ("patches", 4, 2048, 10),
        ("patches", 8, 1500, 50),
    ]


def interleaved(fns: dict, repeats: int, budget: float = 20.0) -> dict:
    """Median seconds of each callable, called in turn (one warm-up each); fewer rounds past ``budget`` s."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for round_ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if round_ >= 2 and time.perf_counter() - start > budget:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def _ms(times: dict, name: str):
    return 1e3 * times[name] if name in times else "n/a"


# --- JAX --------------------------------------------------------------------------------------


def _jax_sample(rows, side, n, repeats):
    import jax
    import jax.numpy as jnp

    from ats import jax as aj
    from ats.jax import _paths

    attention = np.random.default_rng(0).random((rows, side, side), dtype=np.float32) + np.float32(1e-3)
    want, _ = atskern.sample(attention, n, seed=3)
    x = jnp.asarray(attention)
    key = jnp.array([3, 0], jnp.uint32)
    jitted = {p: jax.jit(lambda a, k, p=p: aj.sample_indices(a, n, k, path=p)[0]) for p in ("kernel", "xla")}
    fns = {
        "numpy": lambda: atskern.sample(attention, n, seed=3),
        "kernel eager": lambda: aj.sample_indices(x, n, 3, path="kernel")[0].block_until_ready(),
        "kernel jit": lambda: jitted["kernel"](x, key).block_until_ready(),
        "xla eager": lambda: aj.sample_indices(x, n, 3, path="xla")[0].block_until_ready(),
        "xla jit": lambda: jitted["xla"](x, key).block_until_ready(),
    }
    same = [np.array_equal(np.asarray(jitted[p](x, key)), want) for p in ("kernel", "xla")]
    same.append(np.array_equal(np.asarray(aj.sample_indices(x, n, 3, path="kernel")[0]), want))
    times = interleaved(fns, repeats)
    with jax.enable_x64(True):
        jitted64 = jax.jit(lambda a, k: aj.sample_indices(a, n, k, path="xla")[0])
        same.append(np.array_equal(np.asarray(jitted64(x, key)), want))
        times.update(interleaved({"xla jit x64": lambda: jitted64(x, key).block_until_ready()}, max(3, repeats // 2)))
    auto = f"{_paths.choose('auto', 'sample', x)} / kernel"
    return [f"sample B={rows} {side}x{side} n={n}", *_jax_columns(times), auto, f"{sum(same)}/{len(same)}"]


def _jax_columns(times):
    return [_ms(times, k) for k in ("numpy", "kernel eager", "kernel jit", "xla eager", "xla jit", "xla jit x64")]


def _patch_inputs(rows, side, count):
    rng = np.random.default_rng(1)
    image = rng.random((rows, side, side, 3), dtype=np.float32)
    offsets = rng.integers(-PATCH // 2, side - PATCH // 2, (rows, count, 2)).astype(np.int32)
    grad = rng.random((rows, count, PATCH, PATCH, 3), dtype=np.float32)
    return image, offsets, grad


def _jax_patches(rows, side, count, repeats):
    import jax
    import jax.numpy as jnp

    from ats import jax as aj

    image, offsets, grad = _patch_inputs(rows, side, count)
    want = atskern.extract_patches(image, offsets, PATCH)
    want_grad = atskern.scatter_patches(grad, offsets, (side, side))
    x, o, g = jnp.asarray(image), jnp.asarray(offsets), jnp.asarray(grad)
    jitted = {p: jax.jit(lambda a, b, p=p: aj.extract_patches(a, b, PATCH, path=p)) for p in ("kernel", "xla")}
    grads = {p: jax.grad(lambda a, b, p=p: jnp.vdot(aj.extract_patches(a, b, PATCH, path=p), g)) for p in ("kernel", "xla")}
    jit_grads = {p: jax.jit(f) for p, f in grads.items()}
    same = [np.array_equal(np.asarray(f(x, o)), want) for f in jitted.values()]
    same += [np.array_equal(np.asarray(aj.extract_patches(x, o, PATCH, path=p)), want) for p in ("kernel", "xla")]
    same += [np.array_equal(np.asarray(f(x, o)), want_grad) for f in jit_grads.values()]
    forward = interleaved(
        {
            "numpy": lambda: atskern.extract_patches(image, offsets, PATCH),
            "kernel eager": lambda: aj.extract_patches(x, o, PATCH, path="kernel").block_until_ready(),
            "kernel jit": lambda: jitted["kernel"](x, o).block_until_ready(),
            "xla eager": lambda: aj.extract_patches(x, o, PATCH, path="xla").block_until_ready(),
            "xla jit": lambda: jitted["xla"](x, o).block_until_ready(),
        },
        repeats,
    )
    backward = interleaved(
        {
            "numpy": lambda: atskern.scatter_patches(grad, offsets, (side, side)),
            "kernel eager": lambda: grads["kernel"](x, o).block_until_ready(),
            "kernel jit": lambda: jit_grads["kernel"](x, o).block_until_ready(),
            "xla eager": lambda: grads["xla"](x, o).block_until_ready(),
            "xla jit": lambda: jit_grads["xla"](x, o).block_until_ready(),
        },
        max(3, repeats // 2),
    )
    name = f"B={rows} {side}x{side}x3 K={count} P={PATCH}"
    return [
        [f"patches {name}", *_jax_columns(forward), "kernel / xla", f"{sum(same[:4])}/4"],
        [f"patches+grad {name}", *_jax_columns(backward), "xla (traced)", f"{sum(same[4:])}/2"],
    ]


# --- TensorFlow -------------------------------------------------------------------------------


def _tf_sample(tf, rows, side, n, repeats):
    import ats.ops as ops
    from ats.tf import xla

    attention = np.random.default_rng(0).random((rows, side, side), dtype=np.float32) + np.float32(1e-3)
    want, _ = atskern.sample(attention, n, seed=3)
    a = tf.constant(attention)
    seed = tf.Variable(np.array([3, 0], np.uint32))
    kernel_fn = tf.function(lambda t: ops.sample(t, n, seed=3)[0], autograph=False)
    xla_fn = tf.function(lambda t: xla.sample_indices(t, n, seed)[0], autograph=False)
    xla_jit = tf.function(lambda t: xla.sample_indices(t, n, seed)[0], autograph=False, jit_compile=True)
    fns = {
        "ops eager": lambda: ops.sample(a, n, seed=3)[0].numpy(),
        "ops function": lambda: kernel_fn(a).numpy(),
        "xla eager": lambda: xla.sample_indices(a, n, 3)[0].numpy(),
        "xla function": lambda: xla_fn(a).numpy(),
        "xla jit": lambda: xla_jit(a).numpy(),
    }
    same = sum(np.array_equal(fn(), want) for fn in fns.values())
    times = interleaved(fns, repeats)
    return [f"sample B={rows} {side}x{side} n={n}", *(_ms(times, k) for k in fns), f"{same}/{len(fns)}"]


def _tf_patches(tf, rows, side, count, repeats):
    import ats.ops as ops
    from ats.tf import xla

    image, offsets, grad = _patch_inputs(rows, side, count)
    want = atskern.extract_patches(image, offsets, PATCH)
    want_grad = atskern.scatter_patches(grad, offsets, (side, side))
    x, o, g = tf.constant(image), tf.constant(offsets), tf.constant(grad)

    def gradient(module):
        def fn(t, off):
            with tf.GradientTape() as tape:
                tape.watch(t)
                patches = module.extract_patches(t, off, PATCH)
            return tape.gradient(patches, t, output_gradients=g)

        return fn

    forward, backward = {}, {}
    for label, module in (("ops", ops), ("xla", xla)):
        extract = lambda t, off, m=module: m.extract_patches(t, off, PATCH)  # noqa: E731
        modes = [("eager", False, None), ("function", True, False)] + ([("jit", True, True)] if label == "xla" else [])
        for mode, compiled, jit in modes:
            f = tf.function(extract, autograph=False, jit_compile=jit) if compiled else extract
            b = tf.function(gradient(module), autograph=False, jit_compile=jit) if compiled else gradient(module)
            forward[f"{label} {mode}"] = lambda f=f: f(x, o).numpy()
            backward[f"{label} {mode}"] = lambda b=b: b(x, o).numpy()
    same = sum(np.array_equal(fn(), want) for fn in forward.values())
    same_grad = sum(np.array_equal(fn(), want_grad) for fn in backward.values())
    t_forward = interleaved(forward, repeats)
    t_backward = interleaved(backward, max(3, repeats // 2))
    keys = ("ops eager", "ops function", "xla eager", "xla function", "xla jit")
    name = f"B={rows} {side}x{side}x3 K={count} P={PATCH}"
    return [
        [f"patches {name}", *(_ms(t_forward, k) for k in keys), f"{same}/{len(forward)}"],
        [f"patches+grad {name}", *(_ms(t_backward, k) for k in keys), f"{same_grad}/{len(backward)}"],
    ]


def run(quick: bool = False, progress=None):
    tf = quiet_tensorflow()
    repeats = 3 if quick else 11
    jax_table = Table(
        NAME,
        "JAX: kernel path versus XLA path, float32, ms per call (median)",
        ["case", "atskern (NumPy)", "kernel eager", "kernel jit", "XLA eager", "XLA jit", "XLA jit x64", "auto picks (eager / jit)", "same result"],
    )
    tf_table = Table(
        NAME + "_tf",
        "TensorFlow: ats.ops (kernels) versus ats.tf.xla, float32, ms per call (median)",
        ["case", "ats.ops eager", "ats.ops tf.function", "ats.tf.xla eager", "ats.tf.xla tf.function", "ats.tf.xla jit_compile", "same result"],
    )
    load = [os.getloadavg()[0]]
    for kind, rows, side, size in cases(quick):
        if kind == "sample":
            jax_table.rows.append(_jax_sample(rows, side, size, repeats))
            tf_table.rows.append(_tf_sample(tf, rows, side, size, repeats))
        else:
            jax_table.rows.extend(_jax_patches(rows, side, size, repeats))
            tf_table.rows.extend(_tf_patches(tf, rows, side, size, repeats))
        load.append(os.getloadavg()[0])
        if progress is not None:
            progress.update(1)
    common = [
        f"load average (1 min) during the run: {min(load):.1f} to {max(load):.1f}",
        "alternatives interleaved (one call each in turn), median over the rounds; jitted times exclude compilation",
        "sample: without replacement, seed 3, float32 weights; patches: float32 images, offsets anywhere (some partly outside)",
        "patches+grad: the gradient of <patches, g> with respect to the image (the scatter adjoint); atskern column: scatter_patches alone",
    ]
    jax_table.notes += common + [
        "'same result': draws / patches / gradients equal to atskern's (kernel and XLA paths, x64 included)",
        "kernel eager calls atskern on the arrays' host buffers; kernel jit goes through jax.pure_callback, which copies "
        "its operands (the whole image for patches)",
    ]
    tf_table.notes += common + [
        "ats.ops calls atskern through tf.numpy_function outside XLA; under jit_compile=True it switches to ats.tf.xla (that column)",
        "'same result': draws / patches / gradients equal to atskern's",
    ]
    return [jax_table, tf_table]

"""How often the float32 draws of ``ats.jax``'s XLA path (JAX's default mode) differ from atskern's, per row.

``python -m bench.xla_agreement`` prints a markdown table: typical attention
maps (softmax of Gaussian logits at three temperatures, and uniform-ish
weights), several seeds, with and without replacement; the x64 column checks
that the float64 path agrees on every row. Not a timing: a correctness
figure for the README.
"""

from __future__ import annotations

import sys

import numpy as np

import atskern

MAPS = {
    "softmax(N(0,1) logits)": 1.0,
    "softmax(N(0,3^2) logits)": 3.0,
    "softmax(N(0,8^2) logits)": 8.0,
    "uniform(0,1) weights": None,
}


def _map(kind_scale, rows, side, seed):
    rng = np.random.default_rng(seed)
    if kind_scale is None:
        return rng.random((rows, side, side)).astype(np.float32)
    logits = rng.standard_normal((rows, side, side)) * kind_scale
    flat = logits.reshape(rows, -1)
    weights = np.exp(flat - flat.max(axis=1, keepdims=True))
    return (weights / weights.sum(axis=1, keepdims=True)).reshape(rows, side, side).astype(np.float32)


def measure(rows=512, side=64, seeds=4, ns=(10, 100)):
    import jax

    from ats import jax as aj

    lines = ["| map | n | replace | rows | rows differing, float32 | rows differing, x64 |", "|---|---|---|---|---|---|"]
    for name, scale in MAPS.items():
        for n in ns:
            for replace in (False, True):
                differ32 = differ64 = 0
                for seed in range(seeds):
                    attention = _map(scale, rows, side, seed)
                    want, _ = atskern.sample(attention, n, seed=seed, replace=replace)
                    got, _ = aj.sample_indices(attention, n, seed, replace=replace, path="xla")
                    differ32 += int(np.any(np.asarray(got) != want, axis=(1, 2)).sum())
                    with jax.enable_x64(True):
                        got64, _ = aj.sample_indices(attention, n, seed, replace=replace, path="xla")
                    differ64 += int(np.any(np.asarray(got64) != want, axis=(1, 2)).sum())
                lines.append(f"| {name} | {n} | {replace} | {rows * seeds} | {differ32} | {differ64} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"{side}x{side} maps" if (side := 64) else "", file=sys.stderr)
    print(measure())

"""ats.jax's double-floats (float32 pairs) against exact rational arithmetic, eagerly and under jit (where XLA's
CPU contracts products and sums into fused multiply-adds)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from ats.jax import _double, _sampling  # noqa: E402

RUNS = {"eager": lambda f: f, "jit": jax.jit}


def _exact(hi, lo):
    return [Fraction(float(h)) + Fraction(float(l)) for h, l in zip(np.ravel(hi), np.ravel(lo))]


def _tree_sums(w):
    """Each node's exact sum in :func:`_sampling._sum_tree`'s layout, from the leaves up."""
    width = 1 << (w.size - 1).bit_length()
    level = [Fraction(float(x)) for x in w] + [Fraction(0)] * (width - w.size)
    levels = [level]
    while len(level) > 1:
        level = [level[i] + level[i + 1] for i in range(0, len(level), 2)]
        levels.append(level)
    return [Fraction(0)] + [x for lv in reversed(levels) for x in lv]


@pytest.mark.parametrize("run", RUNS)
def test_sum_tree_is_exact_where_its_sums_fit_in_48_bits(run):
    """Multiples of 2**-24 below 1 over 3000 cells: every sum fits in 36 bits, so every node must be exact."""
    w = np.random.default_rng(1).integers(0, 1 << 24, (2, 3000)).astype(np.float32) * np.float32(2.0**-24)
    hi, lo = RUNS[run](_sampling._sum_tree)(jnp.asarray(w))
    for r in range(2):
        assert _exact(hi[r], lo[r]) == _tree_sums(w[r])
        np.testing.assert_array_equal(np.asarray(hi[r, 4096:7096], np.float64) + np.asarray(lo[r, 4096:7096]), w[r])


@pytest.mark.parametrize("run", RUNS)
def test_sum_tree_is_within_2_to_the_minus_46(run):
    """Weights spread over 2**-30 .. 1: each node within 2**-46 of its exact sum (measured up to 2**-47.6), where
    a float32 sum is off by up to 2**-24."""
    rng = np.random.default_rng(2)
    w = (np.exp2(rng.uniform(-30, 0, 1000)) * rng.random(1000)).astype(np.float32)
    hi, lo = RUNS[run](_sampling._sum_tree)(jnp.asarray(w[None]))
    for got, want in zip(_exact(hi, lo)[1:], _tree_sums(w)[1:]):
        assert abs(got - want) <= want * Fraction(1, 2**46)


@pytest.mark.parametrize("run", RUNS)
def test_two_product_is_exact(run):
    """The sum of the four exact products of 12-bit halves: exact for these inputs (Dekker's form with
    ``p = fl(a b)`` lost ``p``'s rounding error inside the jitted draw, consistent with XLA fusing
    ``a_high b_high - a b``)."""
    rng = np.random.default_rng(3)
    a = rng.random(3000).astype(np.float32)
    b = (rng.random(3000) * np.exp2(rng.integers(-20, 21, 3000))).astype(np.float32)
    p, e = RUNS[run](_double.two_product)(jnp.asarray(a), jnp.asarray(b))
    assert _exact(p, e) == [Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a, b)]


@pytest.mark.parametrize("run", RUNS)
def test_uniforms_are_atskerns_53_bit_ones_to_2_to_the_minus_49(run):
    words = np.random.default_rng(4).integers(0, 1 << 32, (2, 3000), dtype=np.uint64)
    words[:, :2] = [[0, 0xFFFFFFFF], [0, 0xFFFFFFFF]]  # the smallest uniform, 2**-53, and the largest, 1
    hi, lo = RUNS[run](_double.uniforms)(*(jnp.asarray(x.astype(np.uint32)) for x in words))
    want = [Fraction((h << 21 | l >> 11) + 1, 2**53) for h, l in zip(words[0].tolist(), words[1].tolist())]
    got = _exact(hi, lo)
    assert got[:2] == [Fraction(1, 2**53), 1]
    assert max(abs(g - w) for g, w in zip(got, want)) <= Fraction(1, 2**49)


def test_reaches_compares_values_not_words():
    """``(1, 1.5 ulp)`` is above ``(1 + ulp, 0)`` though its high word is below (a pair a fused product may
    leave unnormalized); equal values reach each other."""
    ulp = np.float32(2.0**-23)
    x = (jnp.float32(1), jnp.float32(1.5 * ulp))
    assert bool(_double.reaches(x, (jnp.float32(1 + ulp), jnp.float32(0))))
    assert not bool(_double.reaches((jnp.float32(1 + ulp), jnp.float32(0)), x))
    assert bool(_double.reaches((jnp.float32(1 + ulp), jnp.float32(-ulp)), (jnp.float32(1), jnp.float32(0))))

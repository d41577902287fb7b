"""The Philox4x32-10 generator: known-answer vectors, and the three implementations agree."""

from __future__ import annotations

import numpy as np
import pytest

from atskern import _rng
from atskern.cpu._jit import jit
from atskern.cpu.philox import block_words, to_uniform

# Known-answer vectors of Philox4x32-10 (Salmon et al., Random123 kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_numpy_philox_known_answers(counter, key, expected):
    out = _rng.philox4x32(*[np.array([c]) for c in counter], *key)
    assert tuple(int(w[0]) for w in out) == expected


@jit
def _numba_words(q, row, stream, k0, k1):
    w0, w1, w2, w3 = block_words(np.uint64(q), row, stream, np.uint64(k0), np.uint64(k1))
    return np.array([w0, w1, w2, w3], dtype=np.uint64)


@jit
def _numba_uniform(hi, lo):
    return to_uniform(np.uint64(hi), np.uint64(lo))


def test_numba_philox_equals_numpy():
    seed = 0xDEADBEEF12345678
    k0, k1 = _rng.split_seed(seed)
    for q, row, stream in [(0, 0, 0), (12345, 7, 1), (2**40 + 3, 2**31, 2), (2**64 - 1, 2**32 - 1, 0)]:
        want = _rng.philox4x32(np.array([q & 0xFFFFFFFF]), np.array([q >> 32]), np.array([row]), np.array([stream]), k0, k1)
        got = _numba_words(np.uint64(q), np.uint64(row), np.uint64(stream), k0, k1)
        assert got.tolist() == [int(w[0]) for w in want]


def test_uniforms_are_in_the_half_open_unit_interval():
    assert _rng.to_uniform(0, 0) == 2.0**-53
    assert _rng.to_uniform(0xFFFFFFFF, 0xFFFFFFFF) == 1.0
    assert _numba_uniform(0, 0) == 2.0**-53 and _numba_uniform(0xFFFFFFFF, 0xFFFFFFFF) == 1.0
    u = _rng.position_uniforms(100_000, 3, 42)
    assert (u > 0).all() and (u <= 1).all()
    assert abs(u.mean() - 0.5) < 4 * (1 / np.sqrt(12 * u.size))
    r = _rng.replacement_uniforms(1001, 3, 42)
    assert r.shape == (1001,) and len(np.unique(r)) == 1001


def test_streams_and_rows_are_independent_draws():
    a = _rng.position_uniforms(1000, 0, 1)
    assert not np.array_equal(a, _rng.position_uniforms(1000, 1, 1))
    assert not np.array_equal(a, _rng.position_uniforms(1000, 0, 2))
    assert np.abs(np.corrcoef(a, _rng.position_uniforms(1000, 1, 1))[0, 1]) < 0.15

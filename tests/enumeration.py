"""Exact enumeration of every ordered draw, for the estimator's unbiasedness tests."""

from __future__ import annotations

import itertools
import math

import numpy as np


def all_draws(a, n, replace):
    """Every ordered draw of n positions and its exact probability."""
    if replace:
        seqs = np.array(list(itertools.product(range(a.size), repeat=n)), dtype=np.intp)
        return seqs, a[seqs].prod(axis=1)
    seqs = np.array(list(itertools.permutations(range(a.size), n)), dtype=np.intp)
    drawn = a[seqs]
    left = 1.0 - np.concatenate([np.zeros((len(seqs), 1)), np.cumsum(drawn, axis=1)[:, :-1]], axis=1)
    return seqs, (drawn / left).prod(axis=1)


def expect_at(seqs, terms, K):
    """Sum of ``terms[r, k]`` over draws landing on each position (exactly rounded sums)."""
    flat_terms = terms.reshape(seqs.size, -1)
    positions = seqs.ravel()
    sums = [[math.fsum(flat_terms[positions == i, c]) for c in range(flat_terms.shape[1])] for i in range(K)]
    return np.array(sums).reshape((K,) + terms.shape[2:])

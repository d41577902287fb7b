"""Exact enumeration of every ordered draw, for the estimator's unbiasedness tests."""

from __future__ import annotations

import itertools
import math

import numpy as np


def _successive_probability(a, seq):
    """Probability of the ordered draw ``seq`` under successive sampling with the filler rule
    (DESIGN.md R1): once the positive mass is used up, the zero-weight positions follow in
    increasing index order, each with certainty."""
    p, left, drawn = 1.0, 1.0, set()
    positives = int(np.count_nonzero(a > 0))
    for i in seq:
        if sum(a[j] > 0 for j in drawn) == positives:  # positives used up: the next filler is forced
            filler = min(j for j in range(a.size) if a[j] == 0 and j not in drawn)
            if i != filler:
                return 0.0
        else:
            if a[i] == 0:
                return 0.0
            p *= a[i] / left
            left -= a[i]
        drawn.add(int(i))
    return p


def all_draws(a, n, replace):
    """Every ordered draw of n positions and its exact probability (``a`` sums to 1; zeros
    allowed: without replacement a row with fewer than n positive entries continues with fillers)."""
    if replace:
        seqs = np.array(list(itertools.product(range(a.size), repeat=n)), dtype=np.intp)
        return seqs, a[seqs].prod(axis=1)
    seqs = np.array(list(itertools.permutations(range(a.size), n)), dtype=np.intp)
    if (a > 0).all():
        drawn = a[seqs]
        left = 1.0 - np.concatenate([np.zeros((len(seqs), 1)), np.cumsum(drawn, axis=1)[:, :-1]], axis=1)
        return seqs, (drawn / left).prod(axis=1)
    weight = np.array([_successive_probability(a, seq) for seq in seqs])
    keep = weight > 0
    return seqs[keep], weight[keep]


def expect_at(seqs, terms, K):
    """Sum of ``terms[r, k]`` over draws landing on each position (exactly rounded sums)."""
    flat_terms = terms.reshape(seqs.size, -1)
    positions = seqs.ravel()
    sums = [[math.fsum(flat_terms[positions == i, c]) for c in range(flat_terms.shape[1])] for i in range(K)]
    return np.array(sums).reshape((K,) + terms.shape[2:])

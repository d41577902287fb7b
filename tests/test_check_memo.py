"""The remembered argument checks of the GPU patch calls (``atskern._check_memo``): a call answered from the memo
gets exactly what the checks give (the same layout and fill bytes, or the same error), whatever calls came before.

Runs on the CPU: ``bench._stand_in_cupy`` supplies CuPy-typed arrays (shapes and dtypes, no data).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atskern import _check_memo, patches
from bench import _stand_in_cupy

# each pool: valid values first (index 0 of every pool makes a valid call), then look-alikes and bad ones
IMAGES = [((2, 64, 64, 3), np.float32), ((2, 64, 64, 3), np.uint8), ((2, 64, 64, 4), np.float32),
          ((2, 32, 64, 3), np.float32), ((2, 64, 64, 3), np.float64), ((2, 64, 64, 3), np.dtype(">f4")),
          ((2, 0, 64, 3), np.float32), ((2, 64, 64, 3), np.bool_), ((2, 64), np.float32), ((2, 64, 3), np.float64)]
OFFSETS = [((2, 5, 2), np.int32), ((2, 5, 2), np.int64), ((2, 7, 2), np.int32), ((2, 5, 2), np.uint16),
           ((2, 5, 1), np.int32), ((2, 5, 2), np.float32), ((3, 5, 2), np.int32), ((2, 0, 2), np.int32)]
PATCH_SIZES = [8, (8, 8), (4, 6), 16, np.int64(8), 8.0, (8, 8.0), [8, 8], True, 0, -1, (8,)]
FILLS = [0, 0.0, -0.0, 1.5, 7, math.nan, 300, -1, True, np.float32(0), "0", 1e300]
FLAGS = [False, True, 0, 1, np.True_]
GRADS = [((2, 5, 8, 8, 3), np.float32), ((2, 5, 8, 8, 3), np.float64), ((2, 5, 8, 8, 3), np.float16),
         ((2, 5, 4, 8, 3), np.float32), ((2, 5, 3, 8, 8), np.float64), ((2, 5, 8, 8, 3), np.int32),
         ((2, 4, 8, 8, 3), np.float32), ((2, 5, 8, 3), np.float32)]
SHAPES = [(64, 64), (32, 64), (64, 64.0), [64, 64], (64,), 64, (0, 64), (np.int64(64), 64)]


def outcome(check, *args):
    """What ``check(*args)`` gives: its result, with 0-d arrays as (dtype, bytes), or its error's type and text."""
    try:
        result = check(*args)
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return tuple((a.dtype, a.tobytes()) if isinstance(a, np.ndarray) else a for a in result)


def walks(pools):
    """A first call (an index into each pool; often index 0 of each, a valid call) and then up to 30 steps, each changing one argument: consecutive
    calls differ in one place, so a look-alike (8.0 after 8, float32 after uint8) meets the call it resembles."""
    first = st.tuples(*(st.integers(0, len(pool) - 1) for pool in pools))
    step = st.integers(0, len(pools) - 1).flatmap(
        lambda field: st.tuples(st.just(field), st.integers(0, len(pools[field]) - 1)))
    return st.tuples(st.one_of(st.just((0,) * len(pools)), first), st.lists(step, max_size=30))


def replay(walk):
    (current, steps) = walk
    current = list(current)
    yield tuple(current)
    for field, index in steps:
        current[field] = index
        yield tuple(current)


def gather_args(cp, image, offset, patch, fill, flag):
    return (cp.ndarray(*IMAGES[image]), cp.ndarray(*OFFSETS[offset]), PATCH_SIZES[patch], FILLS[fill], FLAGS[flag],
            None)


def scatter_args(cp, grad, offset, shape, flag, deterministic):
    return (cp.ndarray(*GRADS[grad]), cp.ndarray(*OFFSETS[offset]), SHAPES[shape], FLAGS[flag], None,
            FLAGS[deterministic])


CALLS = {
    "gather": ((IMAGES, OFFSETS, PATCH_SIZES, FILLS, FLAGS), gather_args, _check_memo.gather_signature,
               patches._checked_gather, patches._check_gather),
    "scatter": ((GRADS, OFFSETS, SHAPES, FLAGS, FLAGS), scatter_args, _check_memo.scatter_signature,
                patches._checked_scatter, patches._check_scatter),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_remembered_checks_answer_as_the_checks(call, data):
    pools, make_args, signature_of, remembered, checks = CALLS[call]
    walk = data.draw(walks(pools))
    with _stand_in_cupy.installed() as cp:
        remembered.clear()
        for indices in replay(walk):
            args = make_args(cp, *indices)
            assert outcome(remembered, signature_of(*args), *args) == outcome(checks, *args)


def test_a_remembered_call_does_not_answer_for_a_look_alike():
    """Values that hash alike but check differently: 8.0 after 8 (refused), -0.0 after 0.0 (other fill bytes),
    1 after True (refused), np.int64 sizes (checked each time, accepted)."""
    with _stand_in_cupy.installed() as cp:
        patches._checked_gather.clear()
        x, offsets = cp.ndarray((2, 64, 64, 3), np.float32), cp.ndarray((2, 5, 2), np.int32)
        atskern_call = patches.extract_patches
        assert atskern_call(x, offsets, 8).shape == (2, 5, 8, 8, 3)
        with pytest.raises(TypeError, match="patch_size"):
            atskern_call(x, offsets, 8.0)
        with pytest.raises(TypeError, match="patch_size"):
            atskern_call(x, offsets, (8, 8.0))
        assert atskern_call(x, offsets, np.int64(8)).shape == (2, 5, 8, 8, 3)
        signature = _check_memo.gather_signature(x, offsets, 8, 0.0, False, None)
        zero = patches._checked_gather(signature, x, offsets, 8, 0.0, False, None)[1]
        signature = _check_memo.gather_signature(x, offsets, 8, -0.0, False, None)
        negative_zero = patches._checked_gather(signature, x, offsets, 8, -0.0, False, None)[1]
        assert zero.tobytes() == np.float32(0.0).tobytes()
        assert negative_zero.tobytes() == np.float32(-0.0).tobytes()
        atskern_call(x, offsets, 8, channels_first=False)
        with pytest.raises(TypeError, match="channels_first"):
            atskern_call(x, offsets, 8, channels_first=0)


def test_only_plain_cupy_calls_without_out_are_remembered():
    with _stand_in_cupy.installed() as cp:
        x, offsets = cp.ndarray((2, 64, 64, 3), np.float32), cp.ndarray((2, 5, 2), np.int32)
        assert _check_memo.gather_signature(x, offsets, 8, 0, False, None) is not None
        assert _check_memo.gather_signature(x, offsets, 8, 0, False, cp.ndarray((2, 5, 8, 8, 3), np.float32)) is None
        assert _check_memo.gather_signature(x, offsets, [8, 8], 0, False, None) is None
        assert _check_memo.gather_signature(x, offsets, 8, np.float32(0), False, None) is None
        assert _check_memo.gather_signature(x, offsets, 8, True, False, None) is None
        assert _check_memo.gather_signature(np.zeros((2, 64, 64, 3)), offsets, 8, 0, False, None) is None
        grad = cp.ndarray((2, 5, 8, 8, 3), np.float32)
        assert _check_memo.scatter_signature(grad, offsets, (64, 64), False, None, True) is not None
        assert _check_memo.scatter_signature(grad, offsets, (64, 64), False, None, 1) is None
        assert _check_memo.scatter_signature(grad, offsets, [64, 64], False, None, True) is None


def test_the_memo_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(_check_memo, "MAX_ENTRIES", 3)
    calls = []
    memo = _check_memo.CheckMemo(lambda value: calls.append(value) or value * 2)
    for value in (1, 2, 3, 1, 4, 1):
        assert memo(("key", value), value) == value * 2
    assert calls == [1, 2, 3, 4, 1]  # 1 remembered until the fourth signature emptied the memo
    assert memo(None, 5) == 10 and memo(None, 5) == 10 and calls[-2:] == [5, 5]

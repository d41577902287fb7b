"""atskern._fork_guard on its own: its fork hooks called by hand on a fresh guard (no process is forked here; the
real forks are tests/test_fork_threads.py)."""

from __future__ import annotations

import threading
import time

from atskern._fork_guard import ForkGuard


def _in_call(guard, inside: threading.Event, leave: threading.Event):
    guard.enter()
    inside.set()
    leave.wait(10)
    guard.exit()


def test_a_fork_waits_for_the_calls_of_other_threads_and_holds_new_ones_back():
    guard = ForkGuard()
    inside, leave = threading.Event(), threading.Event()
    caller = threading.Thread(target=_in_call, args=(guard, inside, leave))
    caller.start()
    assert inside.wait(10)
    forked = threading.Event()
    fork = threading.Thread(target=lambda: (guard.before_fork(), forked.set()))
    fork.start()
    assert not forked.wait(0.3), "the fork went ahead while another thread's call ran"
    leave.set()
    assert forked.wait(10)
    started = threading.Event()
    later = threading.Thread(target=lambda: (guard.enter(), started.set(), guard.exit()))
    later.start()
    assert not started.wait(0.3), "a call started before the fork was done"
    guard.after_fork_in_parent()
    assert started.wait(10)
    for thread in (caller, fork, later):
        thread.join(10)


def test_a_thread_inside_a_call_may_fork_and_call_again():
    """The forking thread's own call does not wait for itself, nor does its nested call wait for a pending fork."""
    guard = ForkGuard()
    guard.enter()
    started = time.monotonic()
    guard.before_fork()
    assert time.monotonic() - started < 1
    guard.enter()  # nested, while the fork is pending
    guard.exit()
    guard.after_fork_in_parent()
    guard.exit()


def _child_of(guard, other_thread_called: bool):
    if other_thread_called:
        thread = threading.Thread(target=lambda: (guard.enter(), guard.exit()))
        thread.start()
        thread.join()
    guard.enter()
    guard.exit()
    guard.before_fork()
    guard.after_fork_in_child()
    return guard


def test_a_child_runs_its_kernels_on_one_thread_only_where_another_thread_had_called():
    calls = []
    guard = _child_of(ForkGuard(), other_thread_called=True)
    guard.single_thread = lambda: calls.append(threading.get_ident())
    assert guard.single_threaded
    for _ in range(3):
        guard.enter()
        guard.exit()
    assert calls == [threading.get_ident()]  # once a thread
    thread = threading.Thread(target=lambda: (guard.enter(), guard.exit()))
    thread.start()
    thread.join()
    assert len(calls) == 2 and calls[1] != calls[0]
    grandchild = _child_of(guard, other_thread_called=False)
    assert grandchild.single_threaded, "a child's children inherit its split pool"

    alone = _child_of(ForkGuard(), other_thread_called=False)
    alone.single_thread = lambda: calls.append("alone")
    alone.enter()
    alone.exit()
    assert not alone.single_threaded and "alone" not in calls


def test_a_keyboard_interrupt_anywhere_in_the_call_wrapper_leaves_no_call_counted():
    """Ctrl-C can land anywhere in the public call wrapper and the guard: a count left behind made every later
    fork wait the full patience (10 minutes). CPython runs a signal handler where a function starts and after a
    call returns; the tracer raises a KeyboardInterrupt at each such point of the two files in turn (entering or
    returning from ``call``, ``enter``, ``exit`` and the helpers), then the guard must be clean."""
    import sys

    import numpy as np

    import atskern
    from atskern import _fork_guard, _serial
    from atskern._fork_guard import GUARD

    attention = np.full((1, 4, 4), 1 / 16)
    atskern.sample(attention, 2, seed=0)
    files = (_serial.__file__, _fork_guard.__file__)

    def interrupt_at(target: int):
        seen = [0]

        def tracer(frame, event, arg):
            if frame.f_code.co_filename not in files:
                return None
            if event in ("call", "return"):
                seen[0] += 1
                if seen[0] == target:
                    raise KeyboardInterrupt
            return tracer

        sys.settrace(tracer)
        try:
            atskern.sample(attention, 2, seed=0)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        return seen[0]

    points = interrupt_at(0)  # no interrupt: how many such points a call passes
    assert points >= 8
    for target in range(1, points + 1):
        interrupt_at(target)
        assert (GUARD._in_call, GUARD._depth()) == (set(), 0), f"interrupted at point {target} of {points}"

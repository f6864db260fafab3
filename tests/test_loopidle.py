"""The poll task's view of trio's scheduler (loopidle.py) reads trio internals: these tests
fail, rather than the gateway silently getting slower, when a trio release moves them."""

from __future__ import annotations

import math

import trio
import trio.testing

from tunlwip.loopidle import LoopIdleProbe


def test_probe_works_on_trios_real_clock() -> None:
    async def main() -> None:
        probe = LoopIdleProbe.current()
        assert probe is not None, "trio internals changed: the poll task lost its fast wait"
        assert probe.io_fd >= 0
        await trio.testing.wait_all_tasks_blocked()  # trio's own tasks start with ours
        assert probe.idle_seconds() == math.inf  # nothing else runs, no deadline
        with trio.CancelScope(deadline=trio.current_time() + 5):  # noqa: ASYNC100 (only its deadline matters)
            assert 4 < probe.idle_seconds() <= 5
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            assert probe.idle_seconds() == 0.0  # a task waits to run

    trio.run(main)


def test_probe_is_off_under_a_virtual_clock() -> None:
    async def main() -> None:
        assert LoopIdleProbe.current() is None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_probe_is_off_outside_trio() -> None:
    assert LoopIdleProbe.current() is None


def test_a_task_scheduled_in_the_same_round_is_not_idle_time() -> None:
    """trio takes a whole round of runnable tasks off its run queue before running them; the
    probe must still see the ones not run yet, or the poll task would block in C while they
    wait (the DNS proxy's tasks did: answers took 100 ms)."""
    seen: list[float] = []

    async def main() -> None:
        probe = LoopIdleProbe.current()
        assert probe is not None

        async def look() -> None:
            seen.append(probe.idle_seconds())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            nursery.start_soon(look)  # both run in the same round

    trio.run(main)
    assert sorted(seen) == [0.0, math.inf]  # the first saw the second still waiting to run

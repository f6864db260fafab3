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

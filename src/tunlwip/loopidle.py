"""When trio's event loop has nothing to do, and the fd that wakes it.

Why: each pass through trio's scheduler costs the poll task about 15 µs of Python, more than
lwIP and the relays spend on a small packet. While traffic flows, the poll task therefore
runs the poll loop in C (``tl_relay_run``), waiting on its own poll set *and* trio's epoll fd,
for as long as trio has no runnable task, no pending callback and no deadline due, so that it
returns to trio exactly when trio would have woken up anyway.

trio has no public API for this, so this module reads five of its internals (the runner's run
queue, task set, deadlines, entry queue and the epoll object). It checks they are there once, and
``LoopIdleProbe.current()`` returns None if not (another trio version or I/O backend, or a
test clock that is not real time): the poll task then simply always waits through trio.
"""

from __future__ import annotations

import time
from typing import Any

try:
    from trio._core._run import GLOBAL_RUN_CONTEXT
except ImportError:  # pragma: no cover - a trio without it: the probe stays off
    GLOBAL_RUN_CONTEXT = None  # type: ignore[assignment,misc]
_RUN_CONTEXT: Any = GLOBAL_RUN_CONTEXT


_MAX_TASKS_WALKED = 64


class LoopIdleProbe:
    """Reads trio's scheduler state for the poll task (one per ``trio.run``)."""

    __slots__ = ("_deadlines", "_entry_queue", "_runner", "_runq", "io_fd", "monotonic_offset")

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._runq = runner.runq
        self._deadlines = runner.deadlines
        self._entry_queue = runner.entry_queue
        #: trio's epoll fd: readable when trio has I/O to handle.
        self.io_fd: int = runner.io_manager._epoll.fileno()
        #: trio's time minus CLOCK_MONOTONIC's (SystemClock is an offset perf_counter), so C
        #: can keep lwIP's clock in step with trio's while Python is not running.
        self.monotonic_offset: float = runner.current_time() - time.perf_counter()

    @classmethod
    def current(cls) -> LoopIdleProbe | None:
        """The probe for the running trio loop, or None where it cannot be trusted."""
        runner = getattr(_RUN_CONTEXT, "runner", None)
        if runner is None or type(runner.clock).__name__ != "SystemClock":
            return None  # MockClock's virtual time cannot be waited for in real time
        if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
            return None  # C could not follow trio's clock
        try:
            probe = cls(runner)
            probe.idle_seconds()
        except (AttributeError, TypeError):
            return None
        return probe

    def idle_seconds(self) -> float:
        """How long trio may sleep with nothing to run: 0 if a task or callback is waiting,
        else the time to its next deadline (``inf`` if none)."""
        if self._runq or self._entry_queue.size():
            return 0.0
        # Tasks trio picked to run in this round beside the caller are off the run queue but
        # still scheduled (``_next_send_fn`` set until they run). Looking costs a walk over
        # every task: with many, say trio is busy rather than walk.
        tasks = self._runner.tasks
        if len(tasks) > _MAX_TASKS_WALKED:
            return 0.0
        for task in tasks:
            if task._next_send_fn is not None:
                return 0.0
        until = self._deadlines.next_deadline() - self._runner.current_time()
        return until if until > 0 else 0.0

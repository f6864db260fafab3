"""The poll set: one epoll set, kept in C, for the device's fd, relayed sockets and watchers.

Theory of operation
-------------------
C keeps a single epoll set (``binding.relay``). It holds the packet device's fd (when the
device offers one: C reads batches of packets into lwIP), the upstream socket of every C relay,
and the fds Python watches (UDP sessions, non-blocking connects). The poll task (``run``)
waits for that set's own fd with trio, then lets C serve what is ready; one wakeup serves
client packets and upstream sockets alike. While trio has nothing else to do
(``loopidle.LoopIdleProbe``), the task stays in C (``binding.relay.run``): wait, serve, run
lwIP's timers, until Python is needed.

Watchers are ``on_ready()`` callbacks keyed by a token; C reports a ready fd with its token
(``on_fd_ready``), from inside the serve call, so callbacks must not re-enter lwIP input.

A device fd that fails for good (read error, end of file) or is closed under the stack stops
the stack with ``DeviceError`` (``device_failed``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import trio

from .binding import core
from .binding import relay as crelay
from .errors import DeviceError, TunlwipError
from .loopidle import LoopIdleProbe

_RELAY_POLL_BATCH = 256  # poll-set events handled per wakeup of the poll task
_MIN_WAIT_IN_C = 0.001  # below this, trio's deadline is too close: go back to trio
_MAX_WAIT_IN_C = 0.1  # then the poll task goes back through trio even when all is quiet


def device_failed(device: object, err: int, operation: str = "read") -> DeviceError:
    """The error that stops the stack when ``operation`` on ``device`` failed with ``err``
    (EPIPE is how C reports end of file), naming the device and the errno; the OSError is
    its cause."""
    name = getattr(device, "name", "") or type(device).__name__
    why = "end of file" if err == errno.EPIPE else \
        f"{os.strerror(err)} ({errno.errorcode.get(err, err)})"  # fmt: skip
    exc = DeviceError(f"packet device {name} failed: {operation}: {why}; stopping")
    exc.__cause__ = OSError(err, os.strerror(err))
    return exc


class LwipClock:
    """lwIP's clock is trio's clock (ms since ``start``, continuing lwIP's previous value),
    so trio's ``autojump_clock`` makes retransmissions and TIME-WAIT instant in tests."""

    def __init__(self) -> None:
        self.base_ms = 0
        self.origin = 0.0

    def start(self) -> None:
        self.base_ms = core.now()
        self.origin = trio.current_time()

    def tick(self) -> None:
        """Bring lwIP's clock to trio's now (before every call into lwIP)."""
        elapsed_ms = int((trio.current_time() - self.origin) * 1000)
        core.set_now((self.base_ms + elapsed_ms) & 0xFFFFFFFF)


class PollSet:
    """The poll set of one running stack: its device fd, its watchers, and the poll task.

    ``after_serving`` runs after each time C served the set (the stack's queued work)."""

    def __init__(self, device: object, clock: LwipClock, after_serving: Callable[[], None]) -> None:
        self._device = device
        self._clock = clock
        self._after_serving = after_serving
        self._watchers: dict[int, Callable[[], None]] = {}
        self._next_token = 1
        self._input_fd_identity: tuple[int, int, int] | None = None

    # -- the device's fd ---------------------------------------------------------------------
    def read_device_fd(self, fd: int) -> None:
        """Let C read the device's packets from ``fd`` as part of the poll set. Raises
        ``DeviceError`` if it cannot be watched (e.g. closed before the stack got to it)."""
        try:
            crelay.set_input(fd)
        except OSError as exc:
            err = exc.errno or errno.EBADF
        else:
            err = 0
        if err:  # raised outside the except, so the error keeps device_failed's OSError cause
            raise device_failed(self._device, err, "poll")
        st = os.fstat(fd)
        self._input_fd_identity = (fd, st.st_dev, st.st_ino)

    def check_device_fd(self) -> None:
        """The device's fd closed under us (by an embedder, say) vanishes from the poll set
        without a read error, so look: the same fd number must still be the same file."""
        if self._input_fd_identity is None:
            return
        fd, dev, ino = self._input_fd_identity
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise device_failed(self._device, exc.errno or errno.EBADF) from None
        if (st.st_dev, st.st_ino) != (dev, ino):
            raise device_failed(self._device, errno.EBADF)

    # -- watchers ------------------------------------------------------------------------------
    def watch(self, fd: int, on_ready: Callable[[], None], *, writable: bool) -> int:
        """Call ``on_ready()`` while ``fd`` is readable (or writable); returns the token for
        ``unwatch``. Raises OSError if the fd cannot be watched."""
        token = self._next_token
        self._next_token += 1
        crelay.watch_add(fd, token, writable)
        self._watchers[token] = on_ready
        return token

    def unwatch(self, fd: int, token: int) -> None:
        """Stop watching ``fd`` (registered as ``token``); harmless if already stopped."""
        if self._watchers.pop(token, None) is not None:
            crelay.watch_del(fd)

    def fd_ready(self, token: int) -> None:
        """C found a watched fd ready (called from inside lwIP's serve call)."""
        on_ready = self._watchers.get(token)
        if on_ready is not None:
            on_ready()

    # -- the poll task -------------------------------------------------------------------------
    async def run(self, *, wait_in_c: bool) -> None:
        """Wait for the poll set; C then reads packets into lwIP and moves relayed bytes. Each
        wait is a checkpoint, so a busy device cannot starve other tasks. A failed device read
        (the TUN deleted, the fd closed: EOF, EBADFD, EBADF, EIO) stops the stack with
        ``DeviceError``: no packet can arrive any more, and running on would hold every
        upstream open until its idle timeout."""
        try:
            epoll_fd = crelay.epoll_fd()
        except OSError as exc:
            reason = os.strerror(exc.errno or errno.EIO)
            raise TunlwipError(f"cannot create the poll set: {reason}") from None
        probe = LoopIdleProbe.current() if wait_in_c else None
        if probe is not None and not crelay.wait_with(probe.io_fd):
            probe = None  # cannot wait on trio's epoll set: always wait through trio
        clock = self._clock
        while True:
            await trio.lowlevel.wait_readable(epoll_fd)
            self._serve()
            # While trio has nothing else to do, run the poll loop in C (wait, serve, lwIP's
            # timers) until Python is needed: a pass through trio's scheduler, or even through
            # this loop, per packet costs more than handling the packet.
            while probe is not None and (idle := probe.idle_seconds()) > _MIN_WAIT_IN_C:
                timeout_ms = int(min(idle, _MAX_WAIT_IN_C) * 1000)
                origin = clock.origin - probe.monotonic_offset
                why = crelay.run(timeout_ms, clock.base_ms, origin)
                clock.tick()
                self._served()
                if why != crelay.RUN_PYTHON:
                    break  # trio has I/O or a deadline, or a signal came: go through trio

    def _serve(self) -> None:
        """Handle what the poll set has ready: device packets, relays, watchers."""
        self._clock.tick()
        crelay.poll(_RELAY_POLL_BATCH)
        if core.sleeptime() == 0:
            core.check_timeouts()
        self._served()

    def _served(self) -> None:
        """What Python does after the poll set was served: queued work, a failed device."""
        self._after_serving()
        if (err := crelay.input_error()) != 0:
            crelay.stop_input()  # clears the error: report it once
            raise device_failed(self._device, err)

    def stop(self) -> None:
        """Take the device's fd and trio's loop fd out of the poll set (the stack stops)."""
        crelay.stop_input()
        crelay.wait_with(-1)

"""Relay: the Python handle of a connection the C relay (``_csrc/relay.c``) forwards.

Why: the default forwarder moves every byte in C, between lwIP and the upstream socket, so a
connection costs no task switch, no Python object per read and no copy through Python. Python
keeps what it needs around that: when the relay ended and why (for the flow record), its byte
counts (for ``tunlwip status``), the first bytes the client sent (to name the flow), and a way
to end it early. ``LwipStack.relay`` creates one; the stack's poll task drives them all.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .binding import relay as crelay
from .binding.relay import RelayHandle
from .endpoint import Endpoint

#: Why a relay ended, as flow records name it.
REASONS = {
    crelay.CLOSED: "closed",
    crelay.CLIENT_RESET: "reset",
    crelay.UPSTREAM_RESET: "reset",
    crelay.ERROR: "error",
    crelay.IDLE: "idle timeout",
    crelay.STOPPED: "stopped",
    # An end stopped answering (keepalive probes or retransmissions): the other one is reset.
    crelay.CLIENT_TIMEOUT: "client timeout",
    crelay.UPSTREAM_TIMEOUT: "upstream timeout",
}
#: Which side a reset came from, for debug logs.
RESET_SIDES = {crelay.CLIENT_RESET: "client", crelay.UPSTREAM_RESET: "upstream"}

FirstDataCallback = Callable[[bytes], None]


class Relay:
    """One connection forwarded in C. ``wait`` returns once it ended; ``abort`` ends it now
    (both sides see RST)."""

    __slots__ = ("_done", "_final", "_on_done", "_ptr", "_stack_after", "client",
                 "on_first_data", "reason", "reason_code", "target")  # fmt: skip

    def __init__(self, client: Endpoint, target: Endpoint,
                 on_first_data: FirstDataCallback | None,
                 stack_after: Callable[[], None]) -> None:  # fmt: skip
        self.client = client
        self.target = target
        self.on_first_data = on_first_data
        self.reason: str | None = None
        self.reason_code: int | None = None
        self._ptr: RelayHandle | None = None
        self._final = (0, 0)
        self._done: trio.Event | None = None  # created by the first ``wait``
        self._on_done: Callable[[Relay], None] | None = None
        self._stack_after = stack_after

    def __repr__(self) -> str:
        state = self.reason or "open"
        return f"<Relay {self.client} -> {self.target} {state}>"

    @property
    def done(self) -> bool:
        return self.reason is not None

    def byte_counts(self) -> tuple[int, int]:
        """(client -> upstream, upstream -> client) bytes so far."""
        if self._ptr is None:
            return self._final
        return crelay.byte_counts(self._ptr)

    async def wait(self) -> str:
        """Wait until the relay ended; returns the reason ("closed", "reset", ...)."""
        if self.reason is None:
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()
        assert self.reason is not None
        return self.reason

    def when_done(self, callback: Callable[[Relay], None]) -> None:
        """Call ``callback(relay)`` when it ends (now, if it has). No task needed: this is how
        the gateway keeps a relayed connection's Python cost to a few small objects."""
        if self.reason is not None:
            callback(self)
        else:
            self._on_done = callback

    def abort(self, reason: int = crelay.STOPPED) -> None:
        """End the relay now: RST to the client and the upstream. No-op once ended."""
        if self._ptr is not None:
            crelay.abort(self._ptr, reason)  # reports back through finish
            self._stack_after()

    # -- from the stack (lwIP callbacks) ---------------------------------------------------------
    def started(self, handle: RelayHandle) -> None:
        """C set the relay up (unless it already ended during the setup)."""
        if not self.done:
            self._ptr = handle

    def finish(self, reason: int, bytes_up: int, bytes_down: int) -> None:
        """C ended the relay (``binding.relay`` reason) with these final byte counts."""
        self._ptr = None
        self._final = (bytes_up, bytes_down)
        self.reason_code = reason
        self.reason = REASONS.get(reason, "error")
        if self._done is not None:
            self._done.set()
        callback, self._on_done = self._on_done, None
        if callback is not None:
            callback(self)

"""A socket stand-in for the proxy fuzzers: the proxy's bytes arrive in chunks the input
chooses, and reads never block, so a handshake coroutine runs to its end without trio (``run``).

Why: the property that matters most is that a handshake never consumes a byte past its answer,
and that depends on how the answer is split into arrivals (an HTTP head's end straddling two
reads). ``consumed`` says how far the handshake read; ``sent`` what it wrote.
"""

from __future__ import annotations

import socket
from collections.abc import Coroutine
from typing import Any


class FakeSocket:
    """``data`` arrives ``sizes[i]`` bytes at a time (cycling; 0 counts as 1)."""

    def __init__(self, data: bytes, sizes: bytes) -> None:
        self.data = data
        self.sizes = sizes or b"\xff"
        self.consumed = 0
        self.arrived = 0
        self.sent = b""
        self._turn = 0

    def _arrive(self) -> None:
        size = self.sizes[self._turn % len(self.sizes)] or 1
        self._turn += 1
        self.arrived = min(len(self.data), self.arrived + size)

    def recv(self, count: int, flags: int = 0) -> bytes:
        if count <= 0:
            raise AssertionError(f"recv({count})")
        if self.consumed == self.arrived:
            self._arrive()  # nothing waiting: the next chunk comes in now
        chunk = self.data[self.consumed : min(self.arrived, self.consumed + count)]
        if not flags & socket.MSG_PEEK:
            self.consumed += len(chunk)
        return chunk

    def send(self, data: bytes | memoryview) -> int:
        self.sent += bytes(data)
        return len(data)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (the fake socket never blocks)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the handshake waited on a socket that never blocks")

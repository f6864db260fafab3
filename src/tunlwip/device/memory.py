"""An in-memory packet device: the client side of the "wire" is plain Python calls.

Tests (and embedders that already hold packets) push client packets with ``inject_packet`` and
read what the stack emitted with ``receive_emitted``. Both directions are unbounded queues so a
test can never deadlock the stack by not reading.
"""

from __future__ import annotations

import contextlib
import math

import trio


class MemoryDevice(trio.abc.AsyncResource):
    """A packet device backed by two trio memory channels (``async with MemoryDevice() as
    device`` closes it on the way out)."""

    def __init__(self, mtu: int = 1500) -> None:
        self.mtu = mtu
        self._to_stack_send, self._to_stack_receive = trio.open_memory_channel[bytes](math.inf)
        self._from_stack_send, self._from_stack_receive = trio.open_memory_channel[bytes](math.inf)

    # -- the stack's side ---------------------------------------------------------------------
    async def receive_packet(self) -> bytes:
        try:
            return await self._to_stack_receive.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError("memory device closed") from None

    async def send_packet(self, packet: bytes) -> None:
        # If the test side stopped listening, the wire eats the packet, as a real link would.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._from_stack_send.send_nowait(bytes(packet))
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self._to_stack_send.aclose()
        await self._to_stack_receive.aclose()
        await self._from_stack_send.aclose()

    # -- the clients' side --------------------------------------------------------------------
    def inject_packet(self, packet: bytes) -> None:
        """Queue a packet as if a client had written it to the TUN."""
        self._to_stack_send.send_nowait(bytes(packet))

    async def receive_emitted(self) -> bytes:
        """Wait for the next packet the stack wrote towards the clients."""
        return await self._from_stack_receive.receive()

    def emitted_nowait(self) -> list[bytes]:
        """Return every packet already emitted, without waiting."""
        out: list[bytes] = []
        while True:
            try:
                out.append(self._from_stack_receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

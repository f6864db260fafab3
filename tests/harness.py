"""The in-memory test harness: a running stack whose accepted streams are queued for the test."""

from __future__ import annotations

import trio

from tunlwip import LwipStack, LwipTcpStream, MemoryDevice
from tunlwip.endpoint import Endpoint

from tcppeer import PacketWire


class Harness:
    """A running stack on a memory device, with the accepted streams queued for the test."""

    def __init__(self, stack: LwipStack, device: MemoryDevice, wire: PacketWire) -> None:
        self.stack = stack
        self.device = device
        self.wire = wire
        self.accepted_send, self.accepted = trio.open_memory_channel[
            tuple[LwipTcpStream, Endpoint]
        ](1000)

    async def next_stream(self) -> LwipTcpStream:
        with trio.fail_after(30):
            stream, _ = await self.accepted.receive()
        return stream

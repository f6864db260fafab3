"""The in-memory test harness: a running stack whose accepted streams are queued for the test."""

from __future__ import annotations

import dataclasses

import trio

from tunlwip import LwipStack, LwipTcpStream, MemoryDevice
from tunlwip.endpoint import Endpoint
from tunlwip.gateway import GatewayConfig
from tunlwip.stack import StackConfig

from tcppeer import PacketWire


class Harness:
    """A running stack on a memory device, with the accepted streams queued for the test."""

    def __init__(
        self,
        stack: LwipStack,
        device: MemoryDevice,
        wire: PacketWire,
        udp_received: list[tuple[Endpoint, Endpoint, bytes]] | None = None,
    ) -> None:
        self.stack = stack
        #: (client, destination, payload) of every UDP datagram, when the stack was built with
        #: a UDP receiver (the ``udp_harness`` fixture); ``harness`` has none.
        self.udp_received = udp_received if udp_received is not None else []
        self.device = device
        self.wire = wire
        self.accepted_send, self.accepted = trio.open_memory_channel[
            tuple[LwipTcpStream, Endpoint]
        ](1000)

    async def next_stream(self) -> LwipTcpStream:
        with trio.fail_after(30):
            stream, _ = await self.accepted.receive()
        return stream


def on_loopback(config: GatewayConfig | None = None) -> GatewayConfig:
    """``config`` for a gateway whose test upstreams listen on 127.0.0.1 and ::1, which a
    real gateway never forwards to (``drop_local_destination``)."""
    config = config or GatewayConfig()
    stack = dataclasses.replace(config.stack, forward_local_destinations=True)
    return dataclasses.replace(config, stack=stack)


LOOPBACK_STACK = StackConfig(forward_local_destinations=True)

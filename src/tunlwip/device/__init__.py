"""Packet devices: where IP packets come from and go to.

A device moves whole IP packets (no link-layer header, no packet-info prefix). The stack reads
with ``receive_packet`` and writes with ``send_packet``; it never cares whether the other side is
a Linux TUN, a mobile VPN fd or a test harness.

The devices here are also async context managers (``trio.abc.AsyncResource``): ``async with
TunDevice.open(name) as device`` closes the device however the block ends. The protocol does
not ask that of other devices: the stack only calls the three operations below.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .callback import CallbackDevice
from .memory import MemoryDevice
from .tun import TunDevice


@runtime_checkable
class PacketDevice(Protocol):
    """The three operations the stack needs from a packet source/sink."""

    async def receive_packet(self) -> bytes:
        """Wait for and return the next IP packet from the clients."""
        ...

    async def send_packet(self, packet: bytes) -> None:
        """Deliver one IP packet to the clients."""
        ...

    async def aclose(self) -> None:
        """Release the device; pending and later calls raise ``trio.ClosedResourceError``."""
        ...


__all__ = ["CallbackDevice", "MemoryDevice", "PacketDevice", "TunDevice"]

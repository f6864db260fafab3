"""Packet devices: where IP packets come from and go to.

A device moves whole IP packets (no link-layer header, no packet-info prefix). The stack reads
with ``receive_packet`` and writes with ``send_packet``; it never cares whether the other side is
a Linux TUN, a mobile VPN fd or a test harness.

The devices here are also async context managers (``trio.abc.AsyncResource``): ``async with
TunDevice.open(name) as device`` closes the device however the block ends. The protocol does
not ask that of other devices: the stack only calls the three operations below.

A device that is a file descriptor (a TUN) may also be an ``FdPacketDevice``: then C reads
its packets in batches from the stack's poll set and writes output to it directly, and no
Python runs per packet. The stack checks for it with ``isinstance``; either fd may be None,
which leaves that direction to ``receive_packet``/``send_packet``.
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


@runtime_checkable
class FdPacketDevice(PacketDevice, Protocol):
    """A ``PacketDevice`` backed by a non-blocking packet fd, which the stack may use from C."""

    #: Every packet on the fd starts with a virtio-net header (opened with ``IFF_VNET_HDR``):
    #: C skips it on reads and coalesces TCP output into GSO writes.
    vnet_header: bool

    def direct_input_fd(self) -> int | None:
        """The fd the stack may read packets from in C, in batches (None: use
        ``receive_packet``)."""
        ...

    def direct_output_fd(self) -> int | None:
        """The fd the stack may write output packets to from C (None: use ``send_packet``);
        writes to it must not block in practice."""
        ...


__all__ = ["CallbackDevice", "FdPacketDevice", "MemoryDevice", "PacketDevice", "TunDevice"]

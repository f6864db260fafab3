"""The client side of a real TUN, played packet by packet: what an attacker on a VM or a
container behind the gateway can do.

Why: the kernel in the client namespace only ever sends well-formed packets. To write crafted
ones *into the TUN* (extension headers, fragment trains, SYN floods, one-byte segments), a
packet socket (AF_PACKET) on the TUN interface in ``cli`` sends them, and a second one reads
what the gateway writes back. The packets use a source address the client kernel does not
own (``RAW_CLIENT4``/``RAW_CLIENT6``, inside the client networks), so the kernel drops the
gateway's answers silently instead of resetting connections it knows nothing about, and a
``tcppeer.TcpPeer`` plays the whole client.

The gateway must run with ``--no-offload`` for these tests: with the virtio-net header it
writes coalesced segments with partial checksums, which the peer would reject as invalid.
"""

from __future__ import annotations

import socket

import trio

from netns import Namespace

__all__ = ["RAW_CLIENT4", "RAW_CLIENT6", "RawTun"]

RAW_CLIENT4 = "198.18.0.9"
RAW_CLIENT6 = "fd00:18::9"
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
PACKET_OUTGOING = 4


class RawTun:
    """A ``tcppeer.PacketDevice`` over the TUN interface ``iface`` in namespace ``ns``."""

    def __init__(self, ns: Namespace, iface: str) -> None:
        self.iface = iface
        # Sending: a blocking socket that receives nothing (protocol 0), so a flood just waits
        # for room in the queue.
        self._out = ns.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        self._out.bind((iface, 0))
        receiver = ns.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        receiver.bind((iface, ETH_P_ALL))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        receiver.setblocking(False)
        self._receiver = receiver
        self._in: trio.socket.SocketType | None = None  # made inside trio.run

    def inject_packet(self, packet: bytes) -> None:
        proto = ETH_P_IPV6 if packet[0] >> 4 == 6 else ETH_P_IP
        self._out.sendto(packet, (self.iface, proto))

    async def receive_emitted(self) -> bytes:
        """The next packet the gateway wrote into the TUN (our own sends are skipped)."""
        if self._in is None:
            self._in = trio.socket.from_stdlib_socket(self._receiver)
        while True:
            data, address = await self._in.recvfrom(65536)
            if address[2] != PACKET_OUTGOING:
                return bytes(data)

    def close(self) -> None:
        """Close both sockets (outside trio.run: the wrapper is not closed through trio)."""
        self._out.close()
        self._receiver.close()

    def __enter__(self) -> RawTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

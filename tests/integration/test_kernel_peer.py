"""LwipTcpStream against the kernel's own TCP stack as the peer.

    [namespace cli]                               [this process]
    kernel TCP socket --route--> TUN tlwNNN ===fd===> LwipStack -> LwipTcpStream

The TUN lives in a namespace of its own (default route through it); its fd is driven by the
stack in this process. trio's generic stream conformance suite runs on the pair.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tunlwip import DeviceError, LwipStack, LwipTcpStream, StackConfig, TunDevice
from tunlwip.device.tun import TUNSETVNETHDRSZ
from tunlwip.endpoint import Endpoint

from netns import Namespace, Topology, open_tun_in, setup_client_tun

pytestmark = pytest.mark.netns


class KernelPeer:
    def __init__(self, ns: Namespace, stack: LwipStack) -> None:
        self.ns = ns
        self.stack = stack
        self.accepted_send, self.accepted = trio.open_memory_channel[LwipTcpStream](100)
        self.port = 30000

    async def pair(self, family: int = socket.AF_INET) -> tuple[LwipTcpStream, trio.SocketStream]:
        self.port += 1
        target = (
            ("198.19.7.7", self.port) if family == socket.AF_INET else ("fd00:99::7", self.port)
        )
        raw = self.ns.socket(family, socket.SOCK_STREAM)
        sock = trio.socket.from_stdlib_socket(raw)
        with trio.fail_after(10):
            await sock.connect(target)
            ours = await self.accepted.receive()
        return ours, trio.SocketStream(sock)


@pytest.fixture(params=[False, True], ids=["plain", "vnet"])
async def kernel_peer(
    topology: Topology, nursery: trio.Nursery, request: pytest.FixtureRequest
) -> AsyncIterator[KernelPeer]:
    """The stack on a TUN with and without a virtio-net header: with one, the streams' output
    reaches the kernel as coalesced GSO writes with partial checksums."""
    cli = topology.add("cli")
    name = topology.ifname("t")
    vnet = request.param
    fd = open_tun_in(cli, name, vnet_header=vnet)
    setup_client_tun(cli, name)
    stack = LwipStack(TunDevice.from_fd(fd, name=name, vnet_header=vnet), StackConfig())
    peer = KernelPeer(cli, stack)
    stop = trio.Event()

    async def handler(stream: LwipTcpStream, target: Endpoint) -> None:
        await peer.accepted_send.send(stream)
        await stop.wait()

    await nursery.start(stack.run, handler)
    yield peer
    stop.set()


async def test_check_half_closeable_stream(kernel_peer: KernelPeer) -> None:
    async def lwip_first() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        return await kernel_peer.pair()

    await trio.testing.check_half_closeable_stream(lwip_first, None)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
async def test_kernel_client_round_trip(kernel_peer: KernelPeer, family: int) -> None:
    ours, theirs = await kernel_peer.pair(family)
    payload = bytes(range(256)) * 4096  # 1 MiB
    received = bytearray()

    async def drain() -> None:
        while len(received) < len(payload):
            received.extend(await ours.receive_some())

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(drain)
            await theirs.send_all(payload)
    assert received == payload
    await ours.send_all(b"bye")
    await ours.send_eof()
    with trio.fail_after(10):
        assert await theirs.receive_some() == b"bye"
        assert await theirs.receive_some() == b""
    await theirs.aclose()
    await ours.aclose()


def test_an_adopted_tun_with_another_header_size_is_refused(topology: Topology) -> None:
    """A TUN whose virtio-net header is not the 10 bytes the stack parses would have every
    packet misread: adopting it as one with a header fails at once, naming the sizes."""
    cli = topology.add("cli")
    name = topology.ifname("t")
    fd = open_tun_in(cli, name, vnet_header=True)
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 12))
        with pytest.raises(DeviceError, match="header of 12 bytes; tunlwip reads 10"):
            TunDevice.from_fd(fd, name=name, vnet_header=True)
    finally:
        os.close(fd)

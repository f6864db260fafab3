"""Test rules for tunlwip.

* Unit tests drive the stack through an in-memory device with packets from tests/packets.py
  (independent checksum code) and the small TCP peer in tests/tcppeer.py.
* Anything timed runs on trio's virtual clock (``autojump_clock``); no test depends on wall time.
* Integration tests (tests/integration) use network namespaces they create and remove, with
  198.18.0.0/15 and fd00::/8 addresses only.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))

from tunlwip import LwipStack, LwipTcpStream, MemoryDevice
from tunlwip.endpoint import Endpoint
from tunlwip.stack import StackHooks

from harness import LOOPBACK_STACK, Harness
from tcppeer import PacketWire


@pytest.fixture
async def harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """A running stack with no UDP receiver (datagrams are counted as ``udp_unhandled``)."""
    async for h in _running_harness(nursery, receive_udp=False):
        yield h


@pytest.fixture
async def udp_harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """A running stack whose UDP datagrams are recorded in ``udp_received``."""
    async for h in _running_harness(nursery, receive_udp=True):
        yield h


async def _running_harness(nursery: trio.Nursery, *, receive_udp: bool) -> AsyncIterator[Harness]:
    device = MemoryDevice()
    received: list[tuple[Endpoint, Endpoint, bytes]] = []

    def on_udp(src: Endpoint, dst: Endpoint, data: bytes) -> None:
        received.append((src, dst, data))

    hooks = StackHooks(udp_receiver=on_udp if receive_udp else None)
    stack = LwipStack(device, LOOPBACK_STACK, hooks=hooks)
    wire = PacketWire(device)
    h = Harness(stack, device, wire, received)
    done = trio.Event()

    async def handler(stream: LwipTcpStream, target: Endpoint) -> None:
        await h.accepted_send.send((stream, target))
        await done.wait()  # the test owns the stream until teardown

    nursery.start_soon(wire.run)
    await nursery.start(stack.run, handler)
    yield h
    assert not wire.invalid, f"the stack emitted invalid packets: {wire.invalid[:3]}"
    done.set()


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """A UDP echo server on 127.0.0.1 (loopback only); yields its port."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        while True:
            data, addr = await sock.recvfrom(65535)
            await sock.sendto(data, addr)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield sock.getsockname()[1]
        nursery.cancel_scope.cancel()
    sock.close()

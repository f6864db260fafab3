"""The fd fast path (a device with ``direct_input_fd``) without a TUN: a SOCK_SEQPACKET pair
keeps packet boundaries like a TUN fd, so the poll set's batch reads and direct writes run
against a real kernel fd in a unit test."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from tunlwip import DeviceError, TunDevice
from tunlwip.stack import LwipStack, StackConfig
from tunlwip.tcp import LwipTcpStream

from packets import SYN, parse, tcp_packet


async def never_accept(stream: LwipTcpStream, target: object) -> None:
    await stream.aclose()


async def test_packets_are_read_in_c_and_a_closed_device_stops_the_stack() -> None:
    """A device whose reads fail for good (here: end of file; a deleted TUN gives EBADFD)
    stops the stack with one DeviceError naming the device, instead of running on deaf."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice.from_fd(ours.detach(), name="pair")
    stack = LwipStack(device, StackConfig())
    with theirs, pytest.RaisesGroup(
        pytest.RaisesGroup(pytest.RaisesExc(DeviceError, match="^packet device pair failed: "
                                            "read: end of file; stopping$"))
    ):  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run, never_accept)
            theirs.send(tcp_packet("198.18.0.2", "198.18.9.9", 40000, 80, seq=1, flags=SYN))
            theirs.setblocking(False)
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(theirs)
            reply = parse(theirs.recv(65536))
            assert (reply.src, reply.sport, reply.dst, reply.dport) == (
                "198.18.9.9",
                80,
                "198.18.0.2",
                40000,
            )
            assert stack.statistics().counters["packets_in"] == 1
            theirs.close()  # the device's other end goes away: read() returns 0
            with trio.fail_after(10):
                await trio.sleep_forever()
    await device.aclose()


async def test_a_device_fd_closed_under_the_stack_stops_it() -> None:
    """Closing the device's fd (its last reference) silently drops it from the poll set, so
    no read ever fails: the stack notices by looking, within about a second."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()
    device = TunDevice.from_fd(fd, name="pair")
    stack = LwipStack(device, StackConfig())
    # Depending on who runs first, the stack fails to start watching the fd (poll: EBADF)
    # or notices its closing later: either way one DeviceError naming the device.
    with (
        theirs,
        pytest.RaisesGroup(
            pytest.RaisesGroup(pytest.RaisesExc(DeviceError, match="^packet device pair failed: "))
        ),
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run, never_accept)
            os.close(fd)  # what an embedder closing the VPN fd too early does
            with trio.fail_after(10):
                await trio.sleep_forever()


async def test_a_device_fd_closed_before_the_stack_starts_is_named_in_the_error() -> None:
    """The same error when the fd is already gone when the stack starts watching it (EBADF,
    or another error if the stack reused the number for an fd of its own)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()
    device = TunDevice.from_fd(fd, name="pair")
    stack = LwipStack(device, StackConfig())
    os.close(fd)
    with theirs, pytest.RaisesGroup(
        pytest.RaisesGroup(pytest.RaisesExc(DeviceError, match="^packet device pair failed: "
                                            "poll: .+; stopping$"))
    ):  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run, never_accept)
            with trio.fail_after(10):
                await trio.sleep_forever()

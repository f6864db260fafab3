"""The fd fast path (a device with ``direct_input_fd``) without a TUN: a SOCK_SEQPACKET pair
keeps packet boundaries like a TUN fd, so the poll set's batch reads and direct writes run
against a real kernel fd in a unit test."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from tunlwip import DeviceError, MemoryDevice, TunDevice
from tunlwip.device import CallbackDevice, FdPacketDevice
from tunlwip.stack import LwipStack, StackConfig
from tunlwip.tcp import LwipTcpStream

from packets import ACK, SYN, internet_checksum, is_valid, parse, problems, tcp_options, tcp_packet


async def never_accept(stream: LwipTcpStream, target: object) -> None:
    await stream.aclose()


async def test_a_tun_fd_is_an_fd_device_and_the_others_are_not() -> None:
    """The stack takes the fd fast path exactly for an ``FdPacketDevice`` (a TUN fd)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice.from_fd(ours.detach(), name="pair", vnet_header=True)
    with theirs:
        assert isinstance(device, FdPacketDevice) and device.vnet_header
        assert device.direct_input_fd() == device.direct_output_fd() == device.fileno()
        await device.aclose()
        assert device.direct_input_fd() is None and device.direct_output_fd() is None
    assert not isinstance(MemoryDevice(), FdPacketDevice)
    callback = CallbackDevice(lambda: None, lambda packet: None)
    assert not isinstance(callback, FdPacketDevice)


class HalfFdDevice(MemoryDevice):
    """A device offering only one of the fd methods: not an ``FdPacketDevice``."""

    def direct_output_fd(self) -> int | None:
        return None


async def test_a_device_with_only_part_of_the_fd_protocol_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Such a device works, through Python; the warning says why it is not the fast path."""
    device = HalfFdDevice()
    assert not isinstance(device, FdPacketDevice)
    async with trio.open_nursery() as nursery:
        await nursery.start(LwipStack(device, StackConfig()).run, never_accept)
        nursery.cancel_scope.cancel()
    assert "HalfFdDevice offers a direct fd but is not an FdPacketDevice" in caplog.text


def test_hooks_cannot_be_set_after_construction() -> None:
    """Assigning one of the old hook attributes would be ignored; it raises instead."""
    stack = LwipStack(MemoryDevice(), StackConfig())
    assert stack.udp_receiver is None
    with pytest.raises(AttributeError, match="fixed at construction"):
        stack.udp_receiver = lambda client, target, data: None


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


def _complete_partial_checksum(packet: bytes, start: int, offset: int) -> bytes:
    """What the kernel does for VIRTIO_NET_HDR_F_NEEDS_CSUM: sum from ``start`` to the end
    (the field holds the pseudo-header's sum) and store the complement at ``start + offset``."""
    at = start + offset
    total = internet_checksum(packet[start:])
    return packet[:at] + struct.pack("!H", total) + packet[at + 2 :]


async def test_a_device_with_a_virtio_net_header_gets_tcp_segments_coalesced() -> None:
    """A TUN opened with IFF_VNET_HDR: reads skip the header, TCP output carries partial
    checksums, and a connection's consecutive segments leave in one GSO write that the kernel
    (played here) can complete into a valid packet: payload whole and in order."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice.from_fd(ours.detach(), name="pair", vnet_header=True)
    stack = LwipStack(device, StackConfig())
    body = bytes(range(250)) * 16  # 4 segments of the client's 1000-byte MSS: lwIP's first cwnd
    plain = struct.pack("=BBHHHH", 0, 0, 0, 0, 0, 0)

    async def send_body(stream: LwipTcpStream, target: object) -> None:
        await stream.send_all(body)
        await trio.sleep_forever()

    def read_one() -> tuple[tuple[int, ...], bytes]:
        data = theirs.recv(70000)
        return struct.unpack("=BBHHHH", data[:10]), data[10:]

    with theirs:
        theirs.setblocking(False)
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run, send_body)
            client = ("198.18.0.2", "198.18.9.9", 40000, 80)
            syn = tcp_packet(*client, seq=1, flags=SYN, options=tcp_options(mss=1000))
            theirs.send(plain + syn)
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(theirs)
            header, synack = read_one()
            assert header == (1, 0, 44, 0, 20, 16)  # NEEDS_CSUM from 20, field at +16; MSS option
            synack = _complete_partial_checksum(synack, 20, 16)
            assert is_valid(synack), problems(synack)
            isn = parse(synack).seq
            theirs.send(plain + tcp_packet(*client, seq=2, ack=isn + 1, flags=ACK))

            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(theirs)
            header, merged = read_one()
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = header
            assert (flags, gso_type, hdr_len, gso_size) == (1, 1, 40, 1000)  # GSO TCPV4
            merged = _complete_partial_checksum(merged, csum_start, csum_offset)
            assert is_valid(merged), problems(merged)
            got = parse(merged)
            assert (got.seq, got.payload) == (isn + 1, body)
            counters = stack.statistics().counters
            assert counters["output_gso_writes"] == 1
            assert counters["output_segments_coalesced"] == 3

            # A GSO packet from the device (offloads negotiated) is one segment to lwIP
            # (tests/test_vnet_input.py has the rest).
            gso = struct.pack("=BBHHHH", 1, 1, 40, 1000, 20, 16)
            theirs.send(gso + tcp_packet(*client, seq=2, ack=isn + 1, payload=b"x" * 2000))
            with trio.fail_after(10):  # (a C counter: no event to wait for)
                while stack.statistics().counters["input_gso_tcp"] == 0:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    await device.aclose()


async def test_python_reads_and_writes_skip_and_add_the_virtio_net_header() -> None:
    """The device's own packet I/O (used when the stack does not read in C) hides the header:
    reads drop it, writes add one that asks nothing of the kernel (no GSO, checksums whole)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice.from_fd(ours.detach(), name="pair", vnet_header=True)
    with theirs:
        await device.send_packet(b"packet out")
        assert theirs.recv(100) == bytes(10) + b"packet out"
        theirs.send(bytes(10) + b"packet in")
        with trio.fail_after(10):
            assert await device.receive_packet() == b"packet in"
    await device.aclose()

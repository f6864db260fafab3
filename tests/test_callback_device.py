"""CallbackDevice: the mobile-VPN device shape, driving the real stack.

The "app" side is a queue: ``read_packet`` blocks on it in the device's reader thread (as a
blocking fd read would), ``write_packet`` lands in a trio channel that tests/tcppeer.py's
PacketWire reads. These tests run on the real clock: a real thread delivers the packets, so
trio's autojump clock would race it. Every wait is bounded.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import queue
import socket
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from tunlwip import (
    CallbackDevice,
    DeviceError,
    LwipStack,
    LwipTcpStream,
    PacketDevice,
)
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ProtectError
from tunlwip.gateway import Gateway, GatewayConfig
from tunlwip.hooks import UdpReceiver
from tunlwip.stack import StackHooks

from harness import LOOPBACK_STACK, on_loopback
from packets import udp_packet
from tcppeer import PacketWire, TcpPeer

CLIENT = "198.18.0.2"
WAIT = 10.0  # seconds any single wait may take before the test fails


class FakeApp:
    """The app's side: what a VpnService/NEPacketTunnelFlow adapter would hand over."""

    def __init__(self, protect_answer: bool = True) -> None:
        self.to_stack: queue.Queue[bytes | BaseException | None] = queue.Queue()
        self._emitted_send, self._emitted_receive = trio.open_memory_channel[bytes](math.inf)
        self.reads = 0
        self.close_calls = 0
        self.protected: list[int] = []
        self.protect_answer = protect_answer

    # -- the four callables --------------------------------------------------------------------
    def read_packet(self) -> bytes | None:
        item = self.to_stack.get(timeout=60)  # bounded even if a test forgets to close
        self.reads += 1
        if isinstance(item, BaseException):
            raise item
        return item

    def write_packet(self, packet: bytes) -> None:
        self._emitted_send.send_nowait(packet)

    def protect(self, fd: int) -> bool:
        self.protected.append(fd)
        return self.protect_answer

    def close(self) -> None:
        self.close_calls += 1
        self.to_stack.put(None)  # wakes the blocked read_packet, as closing the fd should

    def device(self, queue_packets: int = 256) -> CallbackDevice:
        return CallbackDevice(self.read_packet, self.write_packet, self.protect, self.close,
                              queue_packets=queue_packets)  # fmt: skip

    # -- what PacketWire needs ----------------------------------------------------------------
    def inject_packet(self, packet: bytes) -> None:
        self.to_stack.put(bytes(packet))

    async def receive_emitted(self) -> bytes:
        return await self._emitted_receive.receive()


class Env:
    def __init__(
        self,
        app: FakeApp,
        device: CallbackDevice,
        stack: LwipStack,
        udp_receivers: list[UdpReceiver],
    ) -> None:
        self.app, self.device, self.stack = app, device, stack
        #: Called with every UDP datagram the stack receives (tests append theirs).
        self.udp_receivers = udp_receivers
        self.wire = PacketWire(app, timeout=WAIT)
        self.accepted_send, self.accepted = trio.open_memory_channel[LwipTcpStream](100)

    async def next_stream(self) -> LwipTcpStream:
        with trio.fail_after(WAIT):
            return await self.accepted.receive()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a condition another thread makes true (a thread cannot set a trio.Event)."""
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def env(nursery: trio.Nursery) -> AsyncIterator[Env]:
    app = FakeApp()
    device = app.device()

    receivers: list[UdpReceiver] = []  # a test's own; the stack's hooks are fixed when created

    def on_udp(src: Endpoint, dst: Endpoint, data: bytes) -> None:
        for receive in receivers:
            receive(src, dst, data)

    stack = LwipStack(device, LOOPBACK_STACK, hooks=StackHooks(udp_receiver=on_udp))
    env = Env(app, device, stack, receivers)
    done = trio.Event()

    async def handler(stream: LwipTcpStream, target: Endpoint) -> None:
        await env.accepted_send.send(stream)
        await done.wait()

    nursery.start_soon(env.wire.run)
    await nursery.start(env.stack.run, handler)
    yield env
    await device.aclose()
    assert not env.wire.invalid
    done.set()


async def test_udp_datagram_reaches_the_stack_and_reply_is_written(env: Env) -> None:
    got: list[tuple[Endpoint, Endpoint, bytes]] = []
    arrived = trio.Event()

    def receiver(src: Endpoint, dst: Endpoint, data: bytes) -> None:
        got.append((src, dst, data))
        arrived.set()

    env.udp_receivers.append(receiver)
    env.app.inject_packet(udp_packet(CLIENT, "203.0.113.9", 5353, 9999, b"ping"))
    with trio.fail_after(WAIT):
        await arrived.wait()
    client, target, data = got[0]
    assert (str(client), str(target), data) == (f"{CLIENT}:5353", "203.0.113.9:9999", b"ping")

    env.stack.send_udp(b"pong", src=target, dst=client)  # leaves through write_packet
    reply = await env.wire.next_unmatched()
    assert (reply.src, reply.sport, reply.dst, reply.dport) == ("203.0.113.9", 9999, CLIENT, 5353)
    assert reply.payload == b"pong"


async def test_tcp_exchange_both_ways(env: Env) -> None:
    peer = TcpPeer(env.wire, CLIENT, 40000, "192.0.2.80", 80, timeout=WAIT)
    await peer.connect()
    stream = await env.next_stream()
    assert (str(stream.remote), str(stream.local)) == (f"{CLIENT}:40000", "192.0.2.80:80")

    upload = os.urandom(200_000)  # many segments: the reader thread hands them over in batches
    await peer.send(upload)
    received = bytearray()
    with trio.fail_after(WAIT):
        while len(received) < len(upload):
            received += await stream.receive_some()
    assert received == upload

    download = os.urandom(150_000)
    await stream.send_all(download)
    await stream.send_eof()
    assert await peer.recv_until_eof() == download
    assert env.device.wakeups <= env.app.reads


async def test_app_side_close_stops_the_stack_reader(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunlwip.stack")
    env.app.to_stack.put(None)  # read_packet returns None: the device is gone
    await wait_until(lambda: "packet device closed" in caplog.text, "the stack's reader to stop")
    with pytest.raises(trio.ClosedResourceError):
        await env.device.receive_packet()


async def test_aclose_calls_close_once_and_ends_the_reader_thread(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunlwip.stack")
    await trio.sleep(0.05)  # let the stack's reader park in receive_packet
    await env.device.aclose()
    await env.device.aclose()
    assert env.app.close_calls == 1
    assert env.device._thread is not None and not env.device._thread.is_alive()
    await wait_until(lambda: "packet device closed" in caplog.text, "the stack's reader to stop")
    with pytest.raises(trio.ClosedResourceError):
        await env.device.receive_packet()
    with pytest.raises(trio.ClosedResourceError):
        await env.device.send_packet(b"\x45")


async def test_read_packet_raising_is_a_device_error_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FakeApp()
    device = app.device()
    stack = LwipStack(device, LOOPBACK_STACK)

    async def handler(stream: LwipTcpStream, target: Endpoint) -> None:
        raise AssertionError("no connection expected")

    app.to_stack.put(OSError(errno.EIO, "the tunnel broke"))
    with trio.fail_after(WAIT), pytest.RaisesGroup(DeviceError) as raised:
        await stack.run(handler)
    error = raised.value.exceptions[0]
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.EIO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].name == "tunlwip.device"
    with pytest.raises(DeviceError):  # and it stays failed
        await device.receive_packet()
    await device.aclose()
    assert app.close_calls == 1


async def test_write_packet_errors() -> None:
    def broken_write(packet: bytes) -> None:
        raise ValueError("adapter bug")

    def full_write(packet: bytes) -> None:
        raise BlockingIOError(errno.EAGAIN, "queue full")

    with pytest.raises(DeviceError) as raised:
        await CallbackDevice(lambda: None, broken_write).send_packet(b"x")
    assert isinstance(raised.value.__cause__, ValueError)
    with pytest.raises(BlockingIOError):  # an OSError: the stack drops the packet and goes on
        await CallbackDevice(lambda: None, full_write).send_packet(b"x")


async def test_bounded_queue_and_no_wakeup_while_packets_wait() -> None:
    app = FakeApp()
    device = app.device(queue_packets=8)
    for i in range(50):
        app.inject_packet(bytes([0x45, i]))
    assert await device.receive_packet() == bytes([0x45, 0])  # starts the reader thread
    # Nobody reads now: the thread fills the queue, reads one more packet and waits for room.
    await wait_until(lambda: app.reads == 1 + 8 + 1, "the queue to fill")
    await trio.sleep(0.1)
    assert app.reads == 10  # backpressure: the other 40 stay on the app's side
    wakeups = device.wakeups
    for i in range(1, 9):  # queued while trio was busy: handed over without a thread hop
        assert await device.receive_packet() == bytes([0x45, i])
    assert device.wakeups == wakeups
    await device.aclose()
    assert app.close_calls == 1 and device._thread is not None
    assert not device._thread.is_alive()


async def test_close_that_does_not_unblock_read_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FakeApp()
    device = CallbackDevice(app.read_packet, app.write_packet, close=lambda: None,
                            close_timeout=0.2)  # fmt: skip
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await device.receive_packet()

        nursery.start_soon(read)
        await trio.sleep(0.05)
        with trio.fail_after(WAIT):
            await device.aclose()  # the pending receive_packet raises ClosedResourceError
    assert "read_packet still blocked" in caplog.text
    app.to_stack.put(None)  # release the abandoned thread
    assert device._thread is not None
    device._thread.join(WAIT)
    assert not device._thread.is_alive()


# -- protect: the gateway's dials go through the device's protect callback ----------------------


async def serve_greeting(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello from upstream")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


@pytest.mark.parametrize("protect_answer", [True, False])
async def test_gateway_dials_through_protect(nursery: trio.Nursery, protect_answer: bool) -> None:
    port = await nursery.start(serve_greeting)
    app = FakeApp(protect_answer)
    device = app.device()
    assert device.protector is not None
    config = GatewayConfig(dial_timeout=5, unreachable_reply="rst")
    gateway = Gateway(device, on_loopback(config), protector=device.protector)
    wire = PacketWire(app, timeout=WAIT)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    target = Endpoint.parse("127.0.0.1", port)

    peer = TcpPeer(wire, CLIENT, 40100, "127.0.0.1", port, timeout=WAIT)
    if protect_answer:
        await peer.connect()
        assert await peer.recv_exactly(19) == b"hello from upstream"
        assert gateway.statistics().dials_ok == 1
    else:
        with pytest.raises(ConnectionRefusedError):  # dial failed -> RST ("rst" mode)
            await peer.connect()
        assert gateway.statistics().dials_failed == 1
        with pytest.raises(ProtectError):
            await gateway.dialer.open_tcp(target)
    assert app.protected and all(isinstance(fd, int) and fd >= 0 for fd in app.protected)
    await device.aclose()


def test_no_protect_callback_means_no_protector() -> None:
    device = CallbackDevice(lambda: None, lambda packet: None)
    assert isinstance(device, PacketDevice)
    assert device.protector is None
    with socket.socket() as sock:
        protector = CallbackDevice(lambda: None, lambda p: None, lambda fd: True).protector
        assert protector is not None
        protector(sock)  # True: accepted

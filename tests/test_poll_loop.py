"""The poll loop in C (``tl_relay_run``) runs while trio is idle, so it must hand control back
as soon as trio has work: I/O on trio's own fds, and tasks woken by lwIP's callbacks. A loop
that missed either would still work, but late: it goes back through trio after a fallback
time regardless. These tests stretch that fallback to a second and compare the median
wake-up delay over many rounds with it, so only a broken loop, not a slow machine, fails."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from tunlwip import TunDevice, pollset
from tunlwip import stack as stack_module
from tunlwip.endpoint import Endpoint
from tunlwip.stack import LwipStack, StackConfig, StackHooks
from tunlwip.tcp import LwipTcpStream

from packets import RST, tcp_packet, udp_packet

ROUNDS = 20
FALLBACK = 1.0  # the poll loop goes back through trio at least this often (stretched)
CLIENT, SERVER = "198.18.0.2", "198.18.9.9"
STRAY_RST = tcp_packet(CLIENT, SERVER, 40001, 80, seq=1, flags=RST)  # no connection: dropped


async def never_accept(stream: LwipTcpStream, target: object) -> None:
    await stream.aclose()


def _in_a_while(
    device_peer: socket.socket, sock: socket.socket, payload: bytes, sent_at: list[float]
) -> threading.Thread:
    """From a thread: wake the poll task with a packet lwIP drops silently (it then waits in
    C, trio being idle), and a moment later send ``payload`` on ``sock``."""

    def send() -> None:
        time.sleep(0.02)
        device_peer.send(STRAY_RST)
        time.sleep(0.01 + 0.005 * (len(sent_at) % 3))
        sent_at.append(time.perf_counter())
        sock.send(payload)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.fixture(autouse=True)
def stretched_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop in C returns after at most the wait's cap or trio's next deadline (the timer
    task's, among others): make both long, so a late wake-up stands out from noise."""
    monkeypatch.setattr(pollset, "_MAX_WAIT_IN_C", FALLBACK)
    monkeypatch.setattr(stack_module, "_TIMER_CAP_SECONDS", FALLBACK)


@pytest.fixture
def device_pair() -> Iterator[tuple[TunDevice, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice.from_fd(ours.detach(), name="pair")
    yield device, theirs
    theirs.close()


async def test_trio_io_brings_the_loop_back_at_once(
    device_pair: tuple[TunDevice, socket.socket],
) -> None:
    await _trio_io_brings_the_loop_back(*device_pair)


def test_each_event_loop_in_turn_brings_the_loop_back_at_once() -> None:
    """Stacks run one after another in one process share C's poll set and wait set; each
    ``trio.run`` has a new epoll fd (often with the last one's number), which the wait set
    must hear in place of the last one's, with the device and relays still registered."""
    for _ in range(3):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            device = TunDevice.from_fd(ours.detach(), name="pair")
            trio.run(_trio_io_brings_the_loop_back, device, theirs)


async def _trio_io_brings_the_loop_back(device: TunDevice, theirs: socket.socket) -> None:
    """Trio's I/O (a socket's byte, sent while the poll task waits in C) is handled at once."""
    stack = LwipStack(device, StackConfig())
    a, b = trio.socket.socketpair()
    delays: list[float] = []
    with a, b:
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run, never_accept)
            for _ in range(ROUNDS):
                sent_at: list[float] = []
                thread = _in_a_while(theirs, a._sock, b"x", sent_at)  # type: ignore[attr-defined]
                with trio.fail_after(5):
                    await b.recv(1)
                delays.append(time.perf_counter() - sent_at[0])
                thread.join()
            nursery.cancel_scope.cancel()
    await device.aclose()
    assert statistics.median(delays) < FALLBACK / 5, delays


async def test_a_task_woken_by_a_callback_runs_at_once(
    device_pair: tuple[TunDevice, socket.socket],
) -> None:
    device, theirs = device_pair
    send, receive = trio.open_memory_channel[bytes](ROUNDS)

    def on_udp(src: Endpoint, dst: Endpoint, data: bytes) -> None:
        send.send_nowait(data)

    stack = LwipStack(device, StackConfig(), hooks=StackHooks(udp_receiver=on_udp))
    delays: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, never_accept)
        for i in range(ROUNDS):
            sent_at: list[float] = []
            packet = udp_packet(CLIENT, SERVER, 40000, 5000, b"%d" % i)
            thread = _in_a_while(theirs, theirs, packet, sent_at)
            with trio.fail_after(5):
                assert await receive.receive() == b"%d" % i
            delays.append(time.perf_counter() - sent_at[0])
            thread.join()
        nursery.cancel_scope.cancel()
    await device.aclose()
    assert statistics.median(delays) < FALLBACK / 5, delays

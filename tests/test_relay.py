"""The C relay (the default forwarder) on the in-memory device, with real loopback upstreams.

Why: the relay moves bytes in C, so the properties the Python splice had by construction must
be shown again: backpressure instead of buffering, no byte lost or reordered when the upstream
is slow, the first bytes named, every socket closed when the gateway stops, and nothing left
behind (relays, PCBs) once connections end.
"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import trio

from test_gateway import CLIENT, serve_sha256, start_env, upload_and_check_digest
from tunlwip.binding import relay as crelay
from tunlwip.endpoint import Endpoint
from tunlwip.gateway import GatewayConfig
from tunlwip.tcp import LwipTcpStream

from tcppeer import TcpPeer


async def accept_one_slow_reader(task_status: trio.TaskStatus[int]) -> trio.socket.SocketType:
    """Accept one loopback connection (its port goes to ``task_status``) on a socket with a
    4 KiB receive buffer, so an upstream that does not read pushes back at once."""
    with trio.socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        task_status.started(listener.getsockname()[1])
        sock, _ = await listener.accept()
    return sock


async def serve_slow_sha256(
    delay: float, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An upstream with a tiny receive buffer that waits ``delay`` s before reading to EOF,
    then answers with the sha256: the relay must hold back, not buffer or drop."""
    with await accept_one_slow_reader(task_status) as sock:
        await trio.sleep(delay)
        h = hashlib.sha256()
        while data := await sock.recv(65536):
            h.update(data)
        await sock.send(h.hexdigest().encode())


def small_send_buffer(sock: socket.socket) -> None:
    """A "protector" that shrinks the upstream socket's send buffer, so the relay meets a full
    socket (EAGAIN) long before the transfer ends."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def test_slow_upstream_gets_every_byte_in_order(nursery: trio.Nursery) -> None:
    env = await start_env(nursery, GatewayConfig(dial_timeout=5), protector=small_send_buffer)
    port = await nursery.start(serve_slow_sha256, 1.0)
    peer = TcpPeer(env.wire, CLIENT, 41000, "127.0.0.1", port)
    await peer.connect()
    payload = os.urandom(1_500_000)  # several times lwIP's window plus the socket buffers
    with trio.fail_after(60):
        await peer.send(payload)
        await peer.shutdown()
        assert await peer.recv_until_eof() == hashlib.sha256(payload).hexdigest().encode()
    assert env.gateway.statistics().stack.counters["relay_upstream_full"] > 0  # it held back


async def test_first_bytes_name_the_flow(nursery: trio.Nursery) -> None:
    env = await start_env(nursery, GatewayConfig(dial_timeout=5))

    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, answer, listeners)
    with env.gateway.flows() as records:
        peer = TcpPeer(env.wire, CLIENT, 41001, "127.0.0.1", port)
        await peer.connect()
        await peer.send(b"GET / HTTP/1.1\r\nHost: named.example\r\n\r\n")
        assert (await peer.recv()).startswith(b"HTTP/1.1 204")
        await peer.shutdown()
        await peer.recv_until_eof()
        with trio.fail_after(10):
            record = await records.__anext__()
    assert record.name == "named.example"
    assert record.close_reason == "closed"
    assert record.bytes_up == len(b"GET / HTTP/1.1\r\nHost: named.example\r\n\r\n")
    assert record.bytes_down == len(b"HTTP/1.1 204 No Content\r\n\r\n")


async def test_nothing_left_behind_after_many_connections(nursery: trio.Nursery) -> None:
    env = await start_env(nursery, GatewayConfig(dial_timeout=5))

    async def echo_once(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(65536)
        await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, echo_once, listeners)
    for i in range(20):
        peer = TcpPeer(env.wire, CLIENT, 41100 + i, "127.0.0.1", port)
        await peer.connect()
        await peer.send(b"ping %d" % i)
        assert await peer.recv_until_eof() == b"ping %d" % i
        await peer.shutdown()
    assert await env.gateway.drain(10)  # every flow ended
    assert crelay.count() == 0
    stats = env.gateway.statistics()
    assert stats.stack.tcp_connections == 0
    assert stats.flows.live_tcp == 0 and stats.flows.tcp == 20


async def test_stopping_the_gateway_closes_upstream_sockets() -> None:
    ended = trio.Event()
    outcome: list[str] = []

    async def hold(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some(65536):
                pass
            outcome.append("eof")
        except trio.BrokenResourceError:
            outcome.append("reset")
        ended.set()

    async with trio.open_nursery() as outer:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        outer.start_soon(trio.serve_listeners, hold, listeners)
        async with trio.open_nursery() as nursery:
            env = await start_env(nursery, GatewayConfig(dial_timeout=5))
            peer = TcpPeer(env.wire, CLIENT, 41200, "127.0.0.1", port)
            await peer.connect()
            await peer.send(b"held open")
            await peer.wait_acked()
            assert crelay.count() == 1
            nursery.cancel_scope.cancel()
        assert crelay.count() == 0
        with trio.fail_after(10):
            await ended.wait()
        assert outcome == ["reset"]
        outer.cancel_scope.cancel()


async def test_a_custom_handler_can_hand_over_to_the_relay(nursery: trio.Nursery) -> None:
    """The embedding API: decide in Python, then let C forward (docs/embedding.md)."""
    reasons: list[str] = []

    async def handler(stream: LwipTcpStream, target: Endpoint) -> None:
        upstream = await env.gateway.dialer.open_tcp(target)
        relay = env.gateway.stack.relay(stream, upstream.socket)
        reasons.append(await relay.wait())
        reasons.append(repr(relay.byte_counts()))

    env = await start_env(nursery, GatewayConfig(dial_timeout=5), tcp_handler=handler)
    port = await nursery.start(serve_sha256)
    peer = TcpPeer(env.wire, CLIENT, 41300, "127.0.0.1", port)
    await peer.connect()
    await upload_and_check_digest(peer, 100_000)
    with trio.fail_after(10):
        while len(reasons) < 2:  # noqa: ASYNC110 - the handler task reports when it ends
            await trio.sleep(0.01)
    assert reasons == ["closed", repr((100_000, 64))]


@pytest.mark.parametrize("upstream_fin_first", [True, False])
async def test_client_bytes_outlive_the_finished_lwip_connection(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, upstream_fin_first: bool
) -> None:
    """Both FINs exchanged while the upstream has not read the client's bytes yet: lwIP
    finishes its side on its own (LAST-ACK, or TIME-WAIT for 10 s) long before the upstream
    reads, and every byte must still arrive (the relay lets go of the PCB, not of the bytes).
    """
    digests: list[str] = []
    env = await start_env(nursery, GatewayConfig(dial_timeout=5), protector=small_send_buffer)

    async def serve(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with await accept_one_slow_reader(task_status) as sock:
            if not upstream_fin_first:
                await trio.sleep(1)  # the client's bytes and FIN arrive first
            sock.shutdown(socket.SHUT_WR)
            await trio.sleep(30)  # past LAST-ACK and TIME-WAIT (2 * TCP_MSL = 10 s)
            h = hashlib.sha256()
            while data := await sock.recv(65536):
                h.update(data)
            digests.append(h.hexdigest())

    port = await nursery.start(serve)
    peer = TcpPeer(env.wire, CLIENT, 41400, "127.0.0.1", port, timeout=600)
    await peer.connect()
    if upstream_fin_first:
        assert await peer.recv_until_eof() == b""
    payload = os.urandom(200_000)  # within lwIP's window, far beyond the socket buffers
    await peer.send(payload)
    await peer.shutdown()
    if not upstream_fin_first:
        assert await peer.recv_until_eof() == b""
    with trio.fail_after(120):
        while not digests:  # noqa: ASYNC110 - the upstream reports when it has read all
            await trio.sleep(1)
    assert digests == [hashlib.sha256(payload).hexdigest()]
    assert await env.gateway.drain(10)
    assert crelay.count() == 0

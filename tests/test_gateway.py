"""The gateway on the in-memory device, with real upstreams on loopback.

The "client" is tests/tcppeer.py speaking packets; the gateway dials 127.0.0.1 for real, so
dial-before-accept, refusal and splicing are exercised against the kernel's loopback.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from tunlwip import MemoryDevice
from tunlwip.dialer import Dialer, Keepalive
from tunlwip.endpoint import Endpoint
from tunlwip.forward import SpliceResult, splice
from tunlwip.gateway import Gateway, GatewayConfig
from tunlwip.held_dials import HeldDial
from tunlwip.tcp import LwipTcpStream

from harness import on_loopback
from packets import ACK, FIN, RST, SYN, is_valid, parse, tcp_options, tcp_packet
from tcppeer import PacketWire, TcpPeer

CLIENT = "198.18.0.2"


class Env:
    def __init__(self, gateway: Gateway, device: MemoryDevice, wire: PacketWire) -> None:
        self.gateway, self.device, self.wire = gateway, device, wire


async def start_env(nursery: trio.Nursery, config: GatewayConfig, **kw: Any) -> Env:
    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(config), **kw)
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return Env(gateway, device, wire)


@pytest.fixture
async def env(nursery: trio.Nursery) -> AsyncIterator[Env]:
    env = await start_env(nursery, GatewayConfig(dial_timeout=5))
    yield env
    assert not env.wire.invalid


async def serve_on_loopback(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on an ephemeral 127.0.0.1 port, reported through ``started``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def serve_sha256(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A loopback upstream: read to EOF, answer with the sha256 of what arrived."""

    async def handler(stream: trio.SocketStream) -> None:
        h = hashlib.sha256()
        try:
            while data := await stream.receive_some(65536):
                h.update(data)
            await stream.send_all(h.hexdigest().encode())
        except trio.BrokenResourceError:
            pass  # the gateway reset the flow (tests that expect this check the client side)

    await serve_on_loopback(handler, task_status=task_status)


async def upload_and_check_digest(peer: TcpPeer, size: int) -> None:
    """Send ``size`` random bytes, half-close, and expect their sha256 back (``serve_sha256``)."""
    payload = os.urandom(size)
    await peer.send(payload)
    await peer.shutdown()
    assert await peer.recv_until_eof() == hashlib.sha256(payload).hexdigest().encode()


async def test_forward_with_half_close(env: Env, nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_sha256)
    peer = TcpPeer(env.wire, CLIENT, 40000, "127.0.0.1", port)
    await peer.connect()
    await upload_and_check_digest(peer, 300_000)
    assert env.gateway.statistics().dials_ok == 1


async def test_closed_port_is_refused_with_rst(env: Env) -> None:
    with trio.socket.socket() as s:  # find a port with nothing listening
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = TcpPeer(env.wire, CLIENT, 40001, "127.0.0.1", port)
    with pytest.raises(ConnectionRefusedError):
        await peer.connect()
    stats = env.gateway.statistics()
    assert stats.dials_refused == 1 and stats.stack.lwip_tcp_pcbs == 0


async def test_out_of_file_descriptors_refuses_new_connections(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No fd for the upstream socket (EMFILE): the new connection is refused with RST, counted
    and warned about once, and the gateway keeps going (no crash, no spinning)."""

    def no_fds(target: Endpoint) -> socket.socket:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(env.gateway.dialer, "start_tcp", no_fds)
    for port in (40010, 40011):
        peer = TcpPeer(env.wire, CLIENT, port, "127.0.0.1", 9)
        with pytest.raises(ConnectionRefusedError):
            await peer.connect()
    refused = env.gateway.statistics().refused
    assert refused.file_descriptors == 2 and refused.tcp_connections == 0
    warnings = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(warnings) == 1  # once, not per flow


async def test_syn_retransmits_are_swallowed_while_dialing(
    env: Env, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = await nursery.start(serve_sha256)
    dials = env.gateway._tcp.dials
    assert dials is not None
    finished: list[HeldDial] = []

    def not_yet(dial: HeldDial) -> None:  # the connect is done, but we pretend it is not
        dials._unwatch(dial)
        finished.append(dial)

    monkeypatch.setattr(dials, "_finished", not_yet)
    syn = tcp_packet(CLIENT, "127.0.0.1", 40002, port, seq=9, flags=SYN,
                     options=tcp_options(mss=1460))  # fmt: skip
    for _ in range(3):
        env.device.inject_packet(syn)
    await trio.testing.wait_all_tasks_blocked()
    assert env.wire.unmatched_nowait() == []  # held: no handshake before the upstream answers
    assert env.gateway.statistics().syn_retransmits_swallowed == 2
    monkeypatch.undo()
    for dial in finished:
        dials._finished(dial)
    reply = await env.wire.next_unmatched()
    assert reply.flags == SYN | ACK and reply.ack == 10
    await trio.testing.wait_all_tasks_blocked()
    assert env.wire.unmatched_nowait() == []  # exactly one SYN-ACK


async def test_unreachable_destination_gets_icmp(nursery: trio.Nursery) -> None:
    e = await start_env(nursery, GatewayConfig(dial_timeout=0.5))
    device, gateway, wire = e.device, e.gateway, e.wire
    # A dial that fails for any reason but refusal (here: protection) answers with ICMP;
    # real unreachable hosts are covered by the namespace tests.
    gateway.dialer.protector = _refuse_protect
    syn = tcp_packet(CLIENT, "127.0.0.1", 40003, 9, seq=1, flags=SYN)
    device.inject_packet(syn)
    reply = await wire.next_unmatched()
    assert reply.proto == 1 and reply.icmp_type == 3 and reply.icmp_code == 1
    assert reply.src == "198.18.0.1" and is_valid(reply.raw)
    assert gateway.statistics().dials_failed == 1


def _refuse_protect(sock: object) -> None:
    raise OSError("protect refused in test")


async def test_rst_answer_mode(nursery: trio.Nursery) -> None:
    e = await start_env(nursery, GatewayConfig(unreachable_reply="rst"), protector=_refuse_protect)
    device, wire = e.device, e.wire
    device.inject_packet(tcp_packet("fd00:18::2", "::1", 40004, 9, seq=41, flags=SYN))
    reply = parse((await wire.next_unmatched()).raw)
    assert reply.flags & RST and reply.ack == 42 and reply.src == "::1" and reply.sport == 9


async def serve_then_reset(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A loopback upstream that sends a greeting and then resets the connection."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello")
        await trio.sleep(0.2)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    await serve_on_loopback(handler, task_status=task_status)


async def test_upstream_reset_resets_the_client(env: Env, nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_then_reset)
    peer = TcpPeer(env.wire, CLIENT, 40010, "127.0.0.1", port)
    await peer.connect()
    assert await peer.recv_exactly(5) == b"hello"
    with pytest.raises(ConnectionResetError):
        await peer.recv()


async def test_client_reset_resets_the_upstream(env: Env, nursery: trio.Nursery) -> None:
    outcome: list[str] = []
    done = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some(65536):
                pass
            outcome.append("eof")
        except trio.BrokenResourceError as exc:
            outcome.append(f"broken: {exc.__cause__!r}")
        done.set()

    port = await nursery.start(serve_on_loopback, handler)
    peer = TcpPeer(env.wire, CLIENT, 40011, "127.0.0.1", port)
    await peer.connect()
    await peer.send(b"some data")
    await peer.wait_acked()
    peer.send_rst()
    with trio.fail_after(10):
        await done.wait()
    assert outcome and "ConnectionResetError" in outcome[0], outcome


async def test_idle_flow_is_reset_after_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    wire = (await start_env(nursery, GatewayConfig(idle_timeout=60))).wire
    port = await nursery.start(serve_sha256)
    peer = TcpPeer(wire, CLIENT, 40012, "127.0.0.1", port, timeout=600)
    await peer.connect()
    start = trio.current_time()
    with pytest.raises(ConnectionResetError):
        await peer.recv()
    assert 60 <= trio.current_time() - start < 65


async def serve_echo_until_reset(
    ended: list[str],
    done: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A loopback upstream that echoes; how its connection ended goes to ``ended``, then
    ``done`` is set."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            ended.append("eof")
        except trio.BrokenResourceError as exc:
            ended.append(repr(exc.__cause__))
        if done is not None:
            done.set()

    await serve_on_loopback(handler, task_status=task_status)


def keepalive_probes(peer: TcpPeer) -> list[Any]:
    """The empty segments one below what the peer expects next: lwIP's keepalive probes."""
    below = (peer.rcv_nxt - 1) % 2**32
    return [
        s for s in peer.segments if not s.payload and not s.flags & (SYN | FIN) and s.seq == below
    ]


async def test_quiet_flow_lives_while_its_client_answers_keepalives(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The defaults: no idle limit, keepalive after 120 s. An hour without a byte, the flow
    still carries bytes both ways; lwIP probed it all along and the client answered."""
    wire = (await start_env(nursery, GatewayConfig())).wire
    ended: list[str] = []
    port = await nursery.start(serve_echo_until_reset, ended)
    peer = TcpPeer(wire, CLIENT, 40013, "127.0.0.1", port, timeout=7200)
    await peer.connect()
    await peer.send(b"before")
    assert await peer.recv_exactly(6) == b"before"
    await trio.sleep(3600)
    assert peer.probes_answered >= 3600 // (120 + 1) - 1, peer.probes_answered
    payload = os.urandom(100_000)
    await peer.send(payload)
    assert await peer.recv_exactly(len(payload)) == payload
    assert not ended and not peer.reset_received


async def test_vanished_client_is_given_up_after_the_keepalive_budget(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A client that stops answering: lwIP probes it ``count`` times, then resets it and the
    relay resets the upstream, idle + interval x count seconds after its last packet (lwIP's
    500 ms timer may add a tick). The flow record says why."""
    config = GatewayConfig(keepalive_idle=60, keepalive_interval=10, keepalive_count=3)
    env = await start_env(nursery, config)
    records = env.gateway.flows()
    ended: list[str] = []
    done = trio.Event()
    port = await nursery.start(serve_echo_until_reset, ended, done)
    peer = TcpPeer(env.wire, CLIENT, 40014, "127.0.0.1", port, timeout=600)
    await peer.connect()
    await peer.send(b"hello")
    assert await peer.recv_exactly(5) == b"hello"
    peer.answer_probes = False
    last_packet = trio.current_time()
    with pytest.raises(ConnectionResetError):
        await peer.recv()
    elapsed = trio.current_time() - last_packet
    with trio.fail_after(10):
        record = await records.__anext__()
    assert 90 <= elapsed <= 91, elapsed
    assert len(keepalive_probes(peer)) == 3
    assert record.close_reason == "client timeout"
    with trio.fail_after(10):
        await done.wait()
    assert "ConnectionResetError" in ended[0], ended


async def test_keepalive_off_and_no_idle_limit_keep_a_silent_client(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Keepalive off: lwIP never probes, so nothing ends a flow whose client is silent."""
    wire = (await start_env(nursery, GatewayConfig(keepalive_idle=None))).wire
    port = await nursery.start(serve_echo_until_reset, [])
    peer = TcpPeer(wire, CLIENT, 40015, "127.0.0.1", port, timeout=7200)
    await peer.connect()
    peer.answer_probes = False
    await trio.sleep(3600)
    assert not keepalive_probes(peer) and not peer.reset_received
    await peer.send(b"still here")
    assert await peer.recv_exactly(10) == b"still here"


def test_upstream_sockets_get_the_keepalive_settings() -> None:
    """The dialer arms the kernel's keepalive on every upstream TCP socket, so a vanished
    upstream ends its flow (ETIMEDOUT) however quiet the flow is."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        target = Endpoint.parse("127.0.0.1", listener.getsockname()[1])
        with Dialer(keepalive=Keepalive(idle=7, interval=3, count=2)).start_tcp(target) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            options = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
            assert [sock.getsockopt(socket.IPPROTO_TCP, o) for o in options] == [7, 3, 2]
        with Dialer().start_tcp(target) as sock:  # none asked for: the kernel's default, off
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    with pytest.raises(ValueError, match="keepalive idle"):
        Keepalive(idle=0)


async def test_upstream_reset_after_its_eof_resets_a_quiet_client(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The upstream half-closes, then its connection dies (here a RST; a keepalive timeout
    looks the same: an error on a socket with nothing left to read) while the client, which
    has not closed its side, is quiet. The relay no longer reads that socket, but still hears
    its error: the client gets RST at once, not never (there is no idle limit)."""
    env = await start_env(nursery, GatewayConfig())
    records = env.gateway.flows()

    async def greet_close_then_reset(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.send_eof()
        await trio.sleep(5)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    port = await nursery.start(serve_on_loopback, greet_close_then_reset)
    peer = TcpPeer(env.wire, CLIENT, 40016, "127.0.0.1", port, timeout=600)
    await peer.connect()
    assert await peer.recv_until_eof() == b"bye"
    started = trio.current_time()
    await peer.wait_reset()
    assert trio.current_time() - started < 10
    with trio.fail_after(10):
        record = await records.__anext__()
    assert record.close_reason == "reset"


async def test_half_closed_flow_lives_while_its_client_answers_then_ends(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The upstream sent EOF and waits for the client's; the client keeps its side open.
    lwIP does not probe in FIN-WAIT-2, so the relay's sweep does, with the same timing: the
    flow lives while the client answers, and once it stops, both ends are reset within the
    keepalive budget (plus a sweep)."""
    config = GatewayConfig(keepalive_idle=60, keepalive_interval=10, keepalive_count=3)
    env = await start_env(nursery, config)
    records = env.gateway.flows()
    ended: list[str] = []
    done = trio.Event()

    async def bye_then_wait(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.send_eof()
        try:
            while await stream.receive_some(65536):
                pass
            ended.append("eof")
        except trio.BrokenResourceError as exc:
            ended.append(repr(exc.__cause__))
        done.set()

    port = await nursery.start(serve_on_loopback, bye_then_wait)
    peer = TcpPeer(env.wire, CLIENT, 40017, "127.0.0.1", port, timeout=3600)
    await peer.connect()
    assert await peer.recv_until_eof() == b"bye"
    await trio.sleep(600)
    assert peer.probes_answered >= 600 // 61 - 1, peer.probes_answered
    assert not ended and not peer.reset_received
    peer.answer_probes = False
    silent_from, seen = trio.current_time(), len(peer.segments)
    await peer.wait_reset()
    # The last answer came at most keep_idle before; the sweep runs every second.
    elapsed = trio.current_time() - silent_from
    assert 10 * 3 - 1 <= elapsed <= 60 + 10 * 3 + 1.5, elapsed
    probes = [s for s in peer.segments[seen:] if not s.payload and not s.flags & (SYN | RST)]
    assert len(probes) == 3, probes
    with trio.fail_after(10):
        record = await records.__anext__()
        await done.wait()
    assert record.close_reason == "client timeout"
    assert "ConnectionResetError" in ended[0], ended


async def test_splice_resets_the_upstream_of_a_client_keepalive_gave_up_on(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The Python forwarder has no idle limit by default either: lwIP's keepalive giving up
    on a silent client breaks the client's direction, and the upstream is reset."""
    results: list[SpliceResult] = []
    gateway_box: list[Gateway] = []

    async def handler(stream: LwipTcpStream, target: Endpoint) -> None:
        upstream = await gateway_box[0].dialer.open_tcp(target)
        async with upstream:
            results.append(await splice(stream, upstream))

    config = GatewayConfig(keepalive_idle=60, keepalive_interval=10, keepalive_count=3)
    env = await start_env(nursery, config, tcp_handler=handler)
    gateway_box.append(env.gateway)
    ended: list[str] = []
    done = trio.Event()
    port = await nursery.start(serve_echo_until_reset, ended, done)
    peer = TcpPeer(env.wire, CLIENT, 40018, "127.0.0.1", port, timeout=600)
    await peer.connect()
    await peer.send(b"hello")
    assert await peer.recv_exactly(5) == b"hello"
    peer.answer_probes = False
    await peer.wait_reset()
    with trio.fail_after(10):
        await done.wait()
    assert "ConnectionResetError" in ended[0], ended
    assert results[0].reason.startswith("reset") and "timeout" in results[0].reason, results

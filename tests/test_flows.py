"""Flow records and live flows: what each TCP connection and UDP session did, and its name.

Why: embedders write flow logs from ``Gateway.flows()`` and operators read ``tunlwip status``;
both are only useful if byte counts, close reasons and latencies are exact and the flow carries
the name the client meant (DNS answer, TLS SNI, HTTP Host). The gateway runs on the memory
device; upstreams are real sockets on loopback, DNS answers come from overrides (no upstream).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunlwip import MemoryDevice
from tunlwip.dns.names import ResolvedNames
from tunlwip.dns.proxy import DnsConfig
from tunlwip.endpoint import Endpoint
from tunlwip.flows import FlowRecord, FlowTable, open_flow_log, write_flow_log
from tunlwip.gateway import Gateway, GatewayConfig
from tunlwip.sniff import http_host, sniff_name, tls_server_name
from tunlwip.tcp import LwipTcpStream
from tunlwip.udp import UdpConfig, UdpSession

from harness import on_loopback
from packets import parse, udp_packet
from tcppeer import PacketWire, TcpPeer

CLIENT = "198.18.0.2"
GW4 = "198.18.0.1"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class Env:
    def __init__(self, gateway: Gateway, device: MemoryDevice, wire: PacketWire) -> None:
        self.gateway, self.device, self.wire = gateway, device, wire

    async def resolve(self, name: str, sport: int = 5353) -> str:
        """Ask the gateway's DNS proxy for ``name`` (A) over UDP; the first address."""
        query = dns.message.make_query(name, "A")
        self.device.inject_packet(udp_packet(CLIENT, GW4, sport, 53, query.to_wire()))
        with trio.fail_after(10):
            reply = await self.wire.next_unmatched()
        answer = dns.message.from_wire(parse(reply.raw).payload)
        return str(answer.answer[0][0].address)


async def start(nursery: trio.Nursery, config: GatewayConfig | None = None, **kw: Any) -> Env:
    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(config or GatewayConfig(dial_timeout=5)), **kw)
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return Env(gateway, device, wire)


async def next_record(records: AsyncIterator[FlowRecord], within: float = 10) -> FlowRecord:
    with trio.fail_after(within):
        return await records.__anext__()


async def serve_sha256(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A loopback upstream: read to EOF, answer with the sha256 hex digest (64 bytes)."""

    async def handler(stream: trio.SocketStream) -> None:
        digest = hashlib.sha256()
        try:
            while data := await stream.receive_some(65536):
                digest.update(data)
            await stream.send_all(digest.hexdigest().encode())
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


def client_hello(server_hostname: str) -> bytes:
    """The first flight of a real TLS client (the stdlib's OpenSSL) for ``server_hostname``."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# -- TCP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dial_before_accept", [True, False])
async def test_tcp_flow_record(nursery: trio.Nursery, dial_before_accept: bool) -> None:
    env = await start(nursery, GatewayConfig(dial_timeout=5,
                                             dial_before_accept=dial_before_accept))  # fmt: skip
    port = await nursery.start(serve_sha256)
    records = env.gateway.flows()
    peer = TcpPeer(env.wire, CLIENT, 41000, "127.0.0.1", port)
    await peer.connect()
    await peer.send(b"x" * 5000)
    await peer.wait_acked()
    [live] = env.gateway.live_flows()
    assert (live.protocol, live.client, live.target) == (
        "tcp", Endpoint.parse(CLIENT, 41000), Endpoint(LOOPBACK, port))  # fmt: skip
    assert live.bytes_up == 5000 and live.bytes_down == 0 and live.age >= 0
    await peer.shutdown()
    assert len(await peer.recv_until_eof()) == 64
    record = await next_record(records)
    assert record.protocol == "tcp" and record.target == Endpoint(LOOPBACK, port)
    assert (record.bytes_up, record.bytes_down, record.close_reason) == (5000, 64, "closed")
    assert record.connect_latency is not None and 0 <= record.connect_latency < 5
    assert record.duration >= 0 and record.name is None
    assert record.to_json()["client"] == f"{CLIENT}:41000"
    stats = env.gateway.statistics()
    assert (stats.flows.tcp, stats.flows.live_tcp, stats.flows.subscribers) == (1, 0, 1)
    assert env.gateway.live_flows() == []


async def test_refused_dial_is_recorded(nursery: trio.Nursery) -> None:
    env = await start(nursery)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with env.gateway.flows() as records:
        peer = TcpPeer(env.wire, CLIENT, 41001, "127.0.0.1", closed_port)
        with pytest.raises(ConnectionRefusedError):
            await peer.connect()
        record = await next_record(records)
    assert (record.close_reason, record.bytes_up, record.bytes_down) == ("refused", 0, 0)
    assert record.connect_latency is not None


async def test_upstream_reset_is_recorded_as_reset(nursery: trio.Nursery) -> None:
    env = await start(nursery)

    async def greet_then_reset(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello")
        await trio.sleep(0.2)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        stream.socket.close()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, greet_then_reset, listeners)
    port = listeners[0].socket.getsockname()[1]
    records = env.gateway.flows()
    peer = TcpPeer(env.wire, CLIENT, 41002, "127.0.0.1", port)
    await peer.connect()
    assert await peer.recv_exactly(5) == b"hello"
    with pytest.raises(ConnectionResetError):
        await peer.recv()
    record = await next_record(records)
    assert record.close_reason == "reset" and record.bytes_down == 5


async def test_custom_handler_flows_are_recorded(nursery: trio.Nursery) -> None:
    async def upper(stream: LwipTcpStream, target: Endpoint) -> None:
        async with stream:
            data = await stream.receive_some()
            await stream.send_all(data.upper() * 2)

    env = await start(nursery, tcp_handler=upper)
    records = env.gateway.flows()
    peer = TcpPeer(env.wire, CLIENT, 41003, "203.0.113.7", 80)
    await peer.connect()
    await peer.send(b"abc")
    assert await peer.recv_exactly(6) == b"ABCABC"
    record = await next_record(records)
    assert (record.bytes_up, record.bytes_down, record.close_reason) == (3, 6, "closed")
    assert record.connect_latency is None
    assert record.target == Endpoint.parse("203.0.113.7", 80)


# -- UDP ------------------------------------------------------------------------------------------


async def test_udp_session_record_on_expiry(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    async def echo(session: UdpSession) -> None:
        while True:
            await session.send(await session.receive() + b"!")

    config = GatewayConfig(udp=UdpConfig(idle_timeout=30, sweep_interval=5))
    env = await start(nursery, config, udp_handler=echo)
    records = env.gateway.flows()
    env.device.inject_packet(udp_packet(CLIENT, "203.0.113.9", 6000, 7777, b"ping"))
    assert (await env.wire.next_unmatched()).payload == b"ping!"
    [live] = env.gateway.live_flows()
    assert (live.protocol, live.bytes_up, live.bytes_down) == ("udp", 4, 5)
    started = trio.current_time()
    record = await next_record(records, within=60)
    assert record.protocol == "udp" and record.close_reason == "idle timeout"
    assert (record.bytes_up, record.bytes_down) == (4, 5)
    assert 30 <= trio.current_time() - started <= 36
    assert 30 <= record.duration <= 36 and record.connect_latency is None
    assert record.client == Endpoint.parse(CLIENT, 6000)


async def test_slow_consumer_loses_records_others_do_not(nursery: trio.Nursery) -> None:
    async def answer_once(session: UdpSession) -> None:
        await session.send(await session.receive())  # then return: the session closes

    env = await start(nursery, udp_handler=answer_once)
    slow = env.gateway.flows(max_buffer=2)
    fast = env.gateway.flows()
    for port in range(6000, 6005):
        env.device.inject_packet(udp_packet(CLIENT, "203.0.113.9", port, 7777, b"x"))
    for _ in range(5):
        await next_record(fast)
    assert [(await next_record(slow)).client.port for _ in range(2)] == [6000, 6001]
    assert slow.dropped == 3 and fast.dropped == 0
    assert env.gateway.statistics().flows.records_dropped == 3
    fast.close()
    env.device.inject_packet(udp_packet(CLIENT, "203.0.113.9", 6010, 7777, b"x"))
    assert (await next_record(slow)).client.port == 6010  # room again after reading
    assert env.gateway.statistics().flows.subscribers == 1


async def test_flow_log_writes_json_lines(nursery: trio.Nursery, tmp_path: Path) -> None:
    async def answer_once(session: UdpSession) -> None:
        await session.send(await session.receive())

    env = await start(nursery, udp_handler=answer_once)
    path = tmp_path / "flows.jsonl"
    path.write_text("")  # appended to, never truncated
    await nursery.start(write_flow_log, env.gateway, path)
    with env.gateway.flows() as records:
        for port in (6200, 6201, 6202):
            env.device.inject_packet(udp_packet(CLIENT, "203.0.113.9", port, 7777, b"abc"))
        for _ in range(3):
            await next_record(records)
    with trio.fail_after(10):
        while len(path.read_text().splitlines()) < 3:  # noqa: ASYNC110 (a file: no event)
            await trio.sleep(0.01)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["client"] for line in lines) == [f"{CLIENT}:{p}" for p in (6200, 6201, 6202)]
    assert {(line["protocol"], line["bytes_up"], line["bytes_down"], line["close_reason"])
            for line in lines} == {("udp", 3, 3, "closed")}  # fmt: skip


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_flow_log_is_created_0640_whatever_the_umask(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "flows.jsonl"
    with open_flow_log(path) as log_file:
        log_file.write("one\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with open_flow_log(path) as log_file:  # appended, never truncated
        log_file.write("two\n")
    assert path.read_text() == "one\ntwo\n"


def test_an_existing_flow_log_wider_than_0640_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    path.write_text("old\n")
    path.chmod(0o666)
    open_flow_log(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o600)  # narrower stays as it is
    open_flow_log(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "old\n"


def test_flow_log_refuses_a_symlink_and_other_non_files(tmp_path: Path) -> None:
    """A link planted at the flow log's path would make root append to its target."""
    target = tmp_path / "passwd"
    target.write_text("precious\n")
    link = tmp_path / "flows.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link") as caught:
        open_flow_log(link)
    assert caught.value.errno == errno.ELOOP and str(link) in str(caught.value)
    assert target.read_text() == "precious\n"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # ENXIO (no reader) or "not a regular file": never blocks
    with pytest.raises(OSError, match=r"No such device or address|not a regular file"):
        open_flow_log(fifo)
    with pytest.raises(IsADirectoryError):
        open_flow_log(tmp_path)
    with pytest.raises(OSError, match="not a regular file"):
        open_flow_log("/dev/null")


async def test_write_flow_log_reports_a_symlink_before_started(tmp_path: Path) -> None:
    link = tmp_path / "flows.jsonl"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="symbolic link"):
        await write_flow_log(None, link)  # type: ignore[arg-type]  # never reached
    assert not (tmp_path / "elsewhere").exists()


async def test_no_subscriber_buffers_nothing() -> None:
    table = FlowTable()
    table.close(table.open("udp", Endpoint.parse(CLIENT, 1), Endpoint.parse(GW4, 2)), "x")
    subscription = table.subscribe()  # records from before subscribing are not kept
    assert subscription._receive.statistics().current_buffer_used == 0
    del subscription  # forgotten without closing: it stops receiving once collected
    flow = table.open("tcp", Endpoint.parse(CLIENT, 1), Endpoint.parse(GW4, 2))
    assert table.close(flow, "closed") is True and table.totals().subscribers == 0
    assert table.close(flow, "closed") is False  # closing twice records once


async def test_iteration_ends_when_the_gateway_stops() -> None:
    got: list[FlowRecord] = []

    async def answer_once(session: UdpSession) -> None:
        await session.send(await session.receive())
        await trio.sleep_forever()  # the gateway's stop ends it

    async with trio.open_nursery() as outer:
        env_nursery_scope = trio.CancelScope()

        async def run_gateway(task_status: trio.TaskStatus[Env]) -> None:
            with env_nursery_scope:
                async with trio.open_nursery() as inner:
                    task_status.started(await start(inner, udp_handler=answer_once))

        env = await outer.start(run_gateway)
        records = env.gateway.flows()

        async def consume() -> None:
            async for record in records:
                got.append(record)

        outer.start_soon(consume)
        env.device.inject_packet(udp_packet(CLIENT, "203.0.113.9", 6100, 7777, b"x"))
        await env.wire.next_unmatched()
        env_nursery_scope.cancel()
    assert [r.close_reason for r in got] == ["stopped"]


# -- names ----------------------------------------------------------------------------------------


@pytest.fixture
async def dns_env(nursery: trio.Nursery) -> Env:
    overrides = {"www.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    dns_config = DnsConfig(upstreams=("udp://127.0.0.1:9",), overrides=overrides)
    return await start(nursery, GatewayConfig(dial_timeout=5, dns=dns_config))


@pytest.mark.parametrize(
    ("first_bytes", "name"),
    [
        pytest.param(b"plain bytes, no name in them", "www.test", id="dns"),
        pytest.param(client_hello("example.test"), "example.test", id="sni"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: web.example.test:8080\r\n\r\n", "web.example.test", id="host"
        ),
    ],
)
async def test_flow_carries_the_name(
    dns_env: Env, nursery: trio.Nursery, first_bytes: bytes, name: str
) -> None:
    assert await dns_env.resolve("www.test") == "127.0.0.1"
    port = await nursery.start(serve_sha256)
    records = dns_env.gateway.flows()
    peer = TcpPeer(dns_env.wire, CLIENT, 41010, "127.0.0.1", port)
    await peer.connect()
    await peer.send(first_bytes)
    await peer.wait_acked()
    [live] = [f for f in dns_env.gateway.live_flows() if f.protocol == "tcp"]
    assert live.name == name
    await peer.shutdown()
    await peer.recv_until_eof()
    record = await next_record(records)
    while record.protocol != "tcp":  # the DNS query's own UDP session may end first
        record = await next_record(records)
    assert record.name == name and record.bytes_up == len(first_bytes)


async def test_name_is_per_client(dns_env: Env, nursery: trio.Nursery) -> None:
    await dns_env.resolve("www.test")
    port = await nursery.start(serve_sha256)
    records = dns_env.gateway.flows()
    peer = TcpPeer(dns_env.wire, "198.18.0.3", 41011, "127.0.0.1", port)  # asked no one
    await peer.connect()
    await peer.shutdown()
    await peer.recv_until_eof()
    record = await next_record(records)
    while record.protocol != "tcp":
        record = await next_record(records)
    assert record.name is None


def _response(qname: str, *rrsets: dns.rrset.RRset) -> dns.message.Message:
    response = dns.message.make_response(dns.message.make_query(qname, "A"))
    response.answer.extend(rrsets)
    return response


def test_resolved_names_use_the_question_and_expire() -> None:
    client = ipaddress.ip_address(CLIENT)
    names = ResolvedNames(max_entries=3, min_ttl=60)
    chain = _response(
        "www.Example.test.",
        dns.rrset.from_text("www.example.test.", 10, "IN", "CNAME", "edge.cdn.test."),
        dns.rrset.from_text("edge.cdn.test.", 10, "IN", "A", "198.18.7.1", "198.18.7.2"),
        dns.rrset.from_text("edge.cdn.test.", 300, "IN", "AAAA", "fd00:7::1"),
    )
    assert names.remember(client, chain, now=0) == 3
    for address in ("198.18.7.1", "198.18.7.2", "fd00:7::1"):
        assert names.lookup(client, ipaddress.ip_address(address), 1) == "www.example.test"
    assert names.lookup(ipaddress.ip_address("198.18.0.9"), LOOPBACK, 1) is None
    a_record = ipaddress.ip_address("198.18.7.1")
    assert names.lookup(client, a_record, 59) == "www.example.test"  # TTL 10, kept 60 s
    assert names.lookup(client, a_record, 60) is None
    assert names.lookup(client, ipaddress.ip_address("fd00:7::1"), 299) == "www.example.test"
    single = _response("new.test.", dns.rrset.from_text("new.test.", 60, "IN", "A", "198.18.8.1"))
    names.remember(client, single, now=100)
    assert len(names) == 3  # bounded: the least recently answered entry went
    assert names.lookup(client, ipaddress.ip_address("198.18.8.1"), 100) == "new.test"


def test_resolved_names_tell_ipv4_from_ipv6_of_the_same_number() -> None:
    """The table keys addresses by number: an IPv6 address whose number is an IPv4 one's
    (``::c612:701``, ``198.18.7.1``) is another address, as a client or as an answer."""
    v4, v6 = ipaddress.ip_address("198.18.7.1"), ipaddress.ip_address("::c612:701")
    names = ResolvedNames()
    names.remember_addresses(v4, "four.test", [(v4, 60)], now=0)
    names.remember_addresses(v6, "six.test", [(v6, 60)], now=0)
    assert names.lookup(v4, v4, 1) == "four.test"
    assert names.lookup(v6, v6, 1) == "six.test"
    assert names.lookup(v4, v6, 1) is None
    assert names.lookup(v6, v4, 1) is None


# -- the first-bytes parser -----------------------------------------------------------------------

HELLO = client_hello("example.test")


def test_tls_server_name_from_a_real_client_hello() -> None:
    assert sniff_name(HELLO) == tls_server_name(HELLO) == "example.test"
    assert sniff_name(client_hello("Mixed.Case.Example.test")) == "mixed.case.example.test"
    # Without SNI (an IP address as server_hostname sends none):
    assert sniff_name(client_hello("198.18.1.2")) is None


def test_truncated_client_hello_gives_a_name_or_none() -> None:
    results = {sniff_name(HELLO[:n]) for n in range(len(HELLO) + 1)}
    assert results == {None, "example.test"}
    assert sniff_name(HELLO + b"trailing application data") == "example.test"


@pytest.mark.parametrize(
    ("request_bytes", "name"),
    [
        (b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n", "example.test"),
        (b"GET /x HTTP/1.0\r\nUser-Agent: t\r\nHOST:  Example.Test.:80 \r\n\r\n", "example.test"),
        (
            b"POST /upload HTTP/1.1\r\nHost: a.example.test\r\nContent-Length: 3\r\n\r\nabc",
            "a.example.test",
        ),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: cut.example.test\r\n", "cut.example.test"),
        (b"GET / HTTP/1.1\r\nHost: cut.exam", None),  # the line may be cut: not trusted
        (b"GET / HTTP/1.1\r\nHost: 198.18.1.2\r\n\r\n", None),  # an address is no name
        (b"GET / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n", None),
        (b"GET / HTTP/2.0\r\nHost: example.test\r\n\r\n", None),
        (b"get / HTTP/1.1\r\nHost: example.test\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: bad..name\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.test\r\n\r\n", None),
        (b"SSH-2.0-OpenSSH_9.2\r\n", None),
        (b"", None),
    ],
)
def test_http_host(request_bytes: bytes, name: str | None) -> None:
    assert sniff_name(request_bytes) == name


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_sniff_never_raises_on_garbage(data: bytes) -> None:
    _check_sniff_result(data)


@settings(max_examples=500)
@given(st.data())
def test_sniff_never_raises_on_damaged_client_hellos(data: st.DataObject) -> None:
    hello = bytearray(HELLO[: data.draw(st.integers(0, len(HELLO)))])
    for _ in range(data.draw(st.integers(1, 8))):
        if hello:
            hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    _check_sniff_result(bytes(hello))
    prefix = data.draw(st.sampled_from([b"GET / HTTP/1.1\r\n", b"\x16\x03\x01"]))
    _check_sniff_result(prefix + data.draw(st.binary(max_size=512)))


def _check_sniff_result(data: bytes) -> None:
    for parse_fn in (sniff_name, tls_server_name):
        try:
            name = parse_fn(data)
        except Exception as exc:  # the parser must absorb anything
            raise AssertionError(f"{parse_fn.__name__} raised {exc!r} on {data!r}") from exc
        assert name is None or (0 < len(name) <= 253 and name == name.lower()), name
    assert http_host(data) is None or data[:1].isupper()

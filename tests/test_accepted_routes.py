"""Connections accepted first, carried by their route (``egress.accepted``), in one process: the
gateway on the memory device, a scripted TCP client (``TcpPeer``), real upstreams on loopback.

What is shown: a custom via's socket stream goes to the C relay and a non-socket stream is
relayed in Python, both with half-close (the upstream reads to EOF, then answers); a custom
via that refuses or hangs resets the client with a counted reason; with dial before accept off,
every route applies after the accept (reject resets, drop stays silent until the dial timeout,
direct works) and records carry the route.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from test_gateway import serve_sha256
from tunlwip import CustomVia, FlowRecord, Gateway, GatewayConfig, MemoryDevice, Route
from tunlwip.egress.via import Drop, Reject
from tunlwip.endpoint import Endpoint

from harness import on_loopback
from tcppeer import PacketWire, TcpPeer

CLIENT = "198.18.0.2"


async def start(nursery: trio.Nursery, config: GatewayConfig) -> tuple[Gateway, PacketWire]:
    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(config))
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return gateway, wire


async def next_record(records: AsyncIterator[FlowRecord], within: float = 10) -> FlowRecord:
    with trio.fail_after(within):
        return await records.__anext__()


async def upload_and_digest(wire: PacketWire, port: int, client_port: int,
                            payload: bytes) -> bytes:  # fmt: skip
    """Connect, send ``payload``, half-close, read the upstream's answer to EOF."""
    peer = TcpPeer(wire, CLIENT, client_port, "127.0.0.1", port)
    await peer.connect()
    await peer.send(payload)
    await peer.shutdown()
    return await peer.recv_until_eof()


def custom_route(name: str, port: int, opener: Any) -> Route:
    return Route(name=name, ports=((port, port),), protocols=("tcp",),
                 via=CustomVia(name, opener))  # fmt: skip


@pytest.mark.parametrize("wrap", ["socket", "stapled"])
async def test_custom_via_streams_carry_a_flow(nursery: trio.Nursery, wrap: str) -> None:
    """A SocketStream is taken by the C relay; a StapledStream (no socket) is relayed in
    Python. Either way every byte arrives, the client's EOF reaches the upstream, the answer
    and the upstream's EOF reach the client, and the record names the route."""
    port = await nursery.start(serve_sha256)
    opened: list[Endpoint] = []

    async def opener(target: Endpoint, name: str | None) -> trio.abc.Stream:
        opened.append(target)
        stream = await trio.open_tcp_stream("127.0.0.1", target.port)
        return stream if wrap == "socket" else trio.StapledStream(stream, stream)

    gateway, wire = await start(nursery, GatewayConfig(
        dial_timeout=5, routes=(custom_route("mine", port, opener),)))  # fmt: skip
    payload = os.urandom(300_000)
    with gateway.flows() as records:
        answer = await upload_and_digest(wire, port, 41000, payload)
        record = await next_record(records)
    assert answer == hashlib.sha256(payload).hexdigest().encode()
    assert opened == [Endpoint.parse("127.0.0.1", port)]
    assert (record.route, record.close_reason) == ("mine", "closed"), record
    assert (record.bytes_up, record.bytes_down) == (len(payload), 64), record
    routes = gateway.statistics().routes
    assert routes is not None
    assert routes.flows_tcp["mine"] == 1  # counted once, not at the SYN too


@pytest.mark.parametrize(("failure", "reason"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "no"), "refused"),
    (None, "dial timeout"),
])  # fmt: skip
async def test_a_custom_via_that_fails_resets_the_client(
    nursery: trio.Nursery, failure: OSError | None, reason: str
) -> None:
    async def opener(target: Endpoint, name: str | None) -> trio.abc.Stream:
        if failure is not None:
            raise failure
        await trio.sleep_forever()
        raise AssertionError

    gateway, wire = await start(nursery, GatewayConfig(
        dial_timeout=0.5, routes=(custom_route("broken", 9999, opener),)))  # fmt: skip
    with gateway.flows() as records:
        peer = TcpPeer(wire, CLIENT, 41001, "127.0.0.1", 9999)
        await peer.connect()  # accepted first
        await peer.wait_reset()
        record = await next_record(records)
    assert (record.route, record.close_reason) == ("broken", reason), record
    stats = gateway.statistics()
    assert stats.dials_refused + stats.dials_failed == 1


async def test_routes_without_dial_before_accept(nursery: trio.Nursery) -> None:
    """Accepted at once, then: reject resets, drop answers nothing until the dial timeout,
    direct carries the flow; each record and counter says which route."""
    port = await nursery.start(serve_sha256)
    routes = (Route(name="no", ports=((7001, 7001),), via=Reject()),
              Route(name="quiet", ports=((7002, 7002),), via=Drop()))  # fmt: skip
    gateway, wire = await start(nursery, GatewayConfig(dial_timeout=0.5, routes=routes,
                                                       dial_before_accept=False))  # fmt: skip
    with gateway.flows() as records:
        rejected = TcpPeer(wire, CLIENT, 41002, "127.0.0.1", 7001)
        await rejected.connect()
        await rejected.wait_reset()
        assert (await next_record(records)).close_reason == "rejected"
        dropped = TcpPeer(wire, CLIENT, 41003, "127.0.0.1", 7002)
        await dropped.connect()
        started = trio.current_time()
        await dropped.send(b"hello?")
        await dropped.wait_reset()
        assert trio.current_time() - started >= 0.4  # nothing came back before the timeout
        record = await next_record(records)
        assert (record.route, record.close_reason) == ("quiet", "dropped"), record
        payload = b"direct" * 1000
        answer = await upload_and_digest(wire, port, 41004, payload)
        assert answer == hashlib.sha256(payload).hexdigest().encode()
        record = await next_record(records)
        assert (record.route, record.close_reason) == ("default", "closed"), record
    stats = gateway.statistics().routes
    assert stats is not None
    assert (stats.rejected["no"], stats.dropped["quiet"], stats.flows_tcp["default"]) == (1, 1, 1)


async def test_a_client_that_resets_during_the_sniff_ends_quietly(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    route = Route(name="named", domains=("x.example",), protocols=("tcp",), sniff=True,
                  via=Reject())  # fmt: skip
    gateway, wire = await start(nursery, GatewayConfig(dial_timeout=5, routes=(route,)))
    with gateway.flows() as records:
        peer = TcpPeer(wire, CLIENT, 41005, "127.0.0.1", 7003)
        await peer.connect()  # accepted first: a sniffing route could take it
        peer.send_rst()
        record = await next_record(records)
    assert record.close_reason == "reset" and record.route is None, record
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    routes = gateway.statistics().routes
    assert routes is not None and sum(routes.flows_tcp.values()) == 0  # never decided

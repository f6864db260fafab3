"""The route glue of the TCP held-SYN path (tunlwip.egress.tcp_routes), without a network.

Why: what the namespace tests cannot pin down cheaply: a dropped flow's retransmits are
remembered for a bounded time in bounded memory, a new table forgets the old one's drops and
dialers, a reject answers and records, and a via this path cannot dial fails loudly instead
of leaving another way. (tests/integration/test_routes_tcp_netns.py has the real flows.)
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from tunlwip.config.routes import Route
from tunlwip.dialer import Dialer
from tunlwip.egress import tcp_routes
from tunlwip.egress.routes import RouteTable
from tunlwip.egress.tcp_routes import DROP_MEMORY, TcpRoutes, is_plain_direct
from tunlwip.egress.via import Direct, Drop, Reject, Socks5Proxy, parse_via
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ProxyError
from tunlwip.flows import FlowTable

CLIENT = Endpoint.parse("198.18.0.2", 40000)


def target(port: int) -> Endpoint:
    return Endpoint.parse("198.18.1.2", port)


class Recorder:
    def __init__(self) -> None:
        self.answers: list[tuple[bytes, bool]] = []
        self.failures: list[tuple[Any, ...]] = []

    def answer(self, packet: bytes, *, refused: bool) -> None:
        self.answers.append((packet, refused))

    def failed(self, *args: Any) -> None:
        self.failures.append(args)


def routing(flows: FlowTable | None = None) -> tuple[TcpRoutes, Recorder]:
    seen = Recorder()
    table = FlowTable() if flows is None else flows  # an empty FlowTable is falsy
    routes = TcpRoutes(Dialer(), table, None, name_for=None, answer=seen.answer,
                       on_connected=lambda dial: None, on_failed=seen.failed)  # fmt: skip
    return routes, seen


def test_plain_direct() -> None:
    assert is_plain_direct(Direct()) and is_plain_direct(parse_via("direct"))
    for via in (Direct(fwmark=7), Direct(interface="eth1"), Reject(), Drop(),
                Socks5Proxy("198.18.1.1", 1080)):  # fmt: skip
        assert not is_plain_direct(via)


async def test_a_dropped_flow_is_counted_once_and_forgotten_in_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    table = RouteTable([Route(name="hole", ports=((9, 9),), via=Drop())])
    routes, seen = routing()
    key = (CLIENT, target(9))
    decision = routes.decide(table, *key)
    assert (decision.name, routes.plain) == ("hole", (False, True))
    assert not routes.swallows(key)
    assert routes.refuse(decision, key, b"syn")
    assert seen.answers == []  # silence
    assert routes.swallows(key), "its retransmit"
    assert table.counters[0].dropped == table.counters[0].tcp == 1
    await trio.sleep(DROP_MEMORY + 1)
    assert not routes.swallows(key), "a SYN after the memory is a new flow"


async def test_dropped_tuples_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_routes, "MAX_DROPPED", 16)
    table = RouteTable([Route(name="hole", via=Drop())])
    routes, _ = routing()
    keys = [(CLIENT, target(1000 + i)) for i in range(40)]
    for key in keys:
        routes.refuse(routes.decide(table, *key), key, b"syn")
    assert len(routes._dropped) == 16
    assert routes.swallows(keys[-1]) and not routes.swallows(keys[0])


async def test_a_new_table_forgets_drops_and_dialers() -> None:
    marked = Direct(fwmark=42)
    table = RouteTable([Route(name="hole", ports=((9, 9),), via=Drop()),
                        Route(name="marked", via=marked)])  # fmt: skip
    routes, _ = routing()
    key = (CLIENT, target(9))
    routes.refuse(routes.decide(table, *key), key, b"syn")
    dialer = routes.dialer_for(marked)
    assert routes.dialer_for(marked) is dialer and dialer.protector.mark == 42  # type: ignore[attr-defined]
    newer = RouteTable([Route(name="marked", via=marked)], previous=table)
    assert routes.decide(newer, *key).name == "marked"
    assert not routes.swallows(key) and routes.dialer_for(marked) is not dialer


async def test_reject_answers_rst_and_records_the_route() -> None:
    flows = FlowTable()
    table = RouteTable([Route(name="no", via=Reject())])
    routes, seen = routing(flows)
    flows.start()
    with flows.subscribe() as records:
        key = (CLIENT, target(443))
        decision = routes.decide(table, *key)
        assert routes.refuse(decision, key, b"syn")
        assert seen.answers == [(b"syn", True)]
        record = records.receive_nowait()
    assert (record.route, record.close_reason, record.target) == ("no", "rejected", key[1])
    assert table.counters[0].rejected == 1


async def test_a_proxy_route_without_a_nursery_fails_loudly() -> None:
    table = RouteTable([Route(name="socks", via=Socks5Proxy("198.18.1.1", 1080))])
    routes, seen = routing()
    key = (CLIENT, target(443))
    decision = routes.decide(table, *key)
    assert not routes.refuse(decision, key, b"syn")
    routes.start(decision, key, b"syn")
    assert len(seen.failures) == 1 and seen.failures[0][4] == "socks"
    assert len(routes) == 0 and not routes.swallows(key)


async def test_a_proxied_dial_holds_its_syn_and_counts_a_stalled_proxy(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A SOCKS5 proxy on loopback that accepts and never answers: while the dial runs, the
    flow's retransmits are swallowed and the dial counts as the client's pending dial; at the
    handshake deadline it fails as the proxy's failure, counted on the route."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(4)  # the kernel completes the connect; nobody reads the greeting
        port = stalled.getsockname()[1]
        table = RouteTable([Route(name="socks", via=Socks5Proxy("127.0.0.1", port))])
        routes, seen = routing()
        key = (CLIENT, target(443))
        async with trio.open_nursery() as nursery:
            routes.nursery = nursery
            decision = routes.decide(table, *key)
            routes.start(decision, key, b"syn")
            assert routes.swallows(key) and len(routes) == 1
            assert routes.dialing_for(CLIENT.address) == 1
        assert len(routes) == 0 and not routes.swallows(key)
        assert routes.dialing_for(CLIENT.address) == 0
    ((failed_key, packet, error, latency, route),) = seen.failures
    assert (failed_key, packet, route) == (key, b"syn", "socks")
    assert isinstance(error, ProxyError) and error.reason == "proxy: handshake timeout"
    assert latency >= 10 and table.counters[0].proxy_failures == 1

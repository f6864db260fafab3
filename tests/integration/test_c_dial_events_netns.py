"""The C dials' events when their array cannot grow (``_csrc/dial.c``), with kernel clients.

Why: every step of a C dial reaches Python as an event (connected, failed, unclaimed, opened,
ended); one lost would leave a flow record open, a pending count high and the dial's memory
held for good. So each dial reserves the events it may owe when it starts, and a dial that
cannot reserve them is refused at the SYN (RST, counted in ``refused.memory``). These tests cap
the event arrays through the binding (as if memory ran out past the cap) and show both halves:
the dials beyond the cap are refused, and every admitted one is still accounted for to the end.
A flow C admitted alone makes no event until it ends: the last test shows it is listed,
counted and recorded all the same.

The gateway runs in this process (the cap is C state of this process), its trio loop in a
thread that entered the gw namespace, so its upstream sockets live there; clients are the
kernel's TCP in cli, the echo server is in srv (the split topology of test_c_dials_netns.py).
Every loop is bounded in count and time.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from tunlwip import TunDevice
from tunlwip.binding import dial as cdial
from tunlwip.gateway import Gateway, GatewayConfig, GatewayStatistics

from netns import SRV_ADDR4, SplitTopology
from transfers import start_script_server

pytestmark = pytest.mark.netns

ECHO_PORT = 7310
#: A dial C admitted alone reserves the one event it owes (its end); with room for 12 the 13th
#: connection held open finds 12 + 1 > 12 and is refused.
SLOTS, ADMITTED = 12, 12


@pytest.fixture
def event_cap() -> Iterator[None]:
    cdial.limit_event_slots(SLOTS)
    try:
        yield
    finally:
        cdial.limit_event_slots(0)


def run_gateway(split: SplitTopology, scenario: Callable[[Gateway], Awaitable[None]]) -> None:
    """Serve a gateway on a TUN that is cli's uplink, from a thread in gw, for ``scenario``."""
    fd, name = split.client_tun()

    async def main() -> None:
        device = TunDevice.from_fd(fd, name=name)
        gateway = Gateway(device, GatewayConfig(dial_timeout=5))
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            with trio.fail_after(60):
                await scenario(gateway)
            nursery.cancel_scope.cancel()

    split.gw.enter_thread(trio.run, main)


async def wait_until(gateway: Gateway, done: Callable[[GatewayStatistics], bool],
                     what: str) -> GatewayStatistics:  # fmt: skip
    """Poll the gateway's statistics (C's events are taken then) for at most 10 s."""
    for _ in range(500):
        if done(stats := gateway.statistics()):
            return stats
        await trio.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}: {gateway.statistics()}")


def client_connect(split: SplitTopology) -> socket.socket | int:
    """A kernel client's connection to the echo server, or the errno it failed with."""
    sock = split.cli.socket(socket.AF_INET)
    sock.settimeout(5)
    try:
        sock.connect((SRV_ADDR4, ECHO_PORT))
    except OSError as exc:
        sock.close()
        return exc.errno or -1
    return sock


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload) and (part := sock.recv(65536)):
        got += part
    return got


def settled(stats: GatewayStatistics) -> bool:
    """No flow open, no dial held or connected, no C relay: nothing left to account for."""
    counters = stats.stack.counters
    return (stats.active_flows == 0 and stats.pending_dials == 0 and counters["c_relays"] == 0
            and counters["c_dialing"] == 0 and counters["c_dial_connected"] == 0)  # fmt: skip


def test_dials_that_cannot_reserve_their_events_are_refused_and_none_is_lost(
    split: SplitTopology, event_cap: None
) -> None:
    """Connections held open one by one: the first ADMITTED are relayed in C, the next ones get
    RST at once (``refused.memory``); closing them all leaves nothing open, every record closed
    and no event lost. With the cap lifted, a new connection is served again."""
    start_script_server(split.srv, "echo", ECHO_PORT)

    async def scenario(gateway: Gateway) -> None:
        held: list[socket.socket] = []
        refusals: list[int] = []
        try:
            for i in range(ADMITTED + 4):
                got = await trio.to_thread.run_sync(client_connect, split)
                if isinstance(got, int):
                    refusals.append(got)
                    continue
                held.append(got)
                await wait_until(gateway, lambda s: s.active_flows == len(held),
                                 f"connection {i} to be relayed")  # fmt: skip
            stats = gateway.statistics()
            assert len(held) == ADMITTED, (len(held), refusals, stats)
            assert refusals == [errno.ECONNREFUSED] * 4, refusals
            assert stats.refused.memory == 4 and stats.dials_failed == 0, stats
            assert stats.stack.counters["c_relays"] == ADMITTED, stats
            for sock in held:  # the admitted ones work (and their first bytes fit the cap)
                assert await trio.to_thread.run_sync(echo, sock, b"ping") == b"ping"
        finally:
            for sock in held:
                sock.close()
        stats = await wait_until(gateway, settled, "every flow to end")
        # A record for each: the relayed ones closed, the refused ones as failed dials.
        assert stats.flows.tcp == ADMITTED + 4 and stats.flows.live_tcp == 0, stats
        assert stats.stack.counters["c_dial_events_lost"] == 0 and not gateway.live_flows()
        cdial.limit_event_slots(0)
        again = await trio.to_thread.run_sync(client_connect, split)
        assert isinstance(again, socket.socket), again
        with again:
            assert await trio.to_thread.run_sync(echo, again, b"served") == b"served"

    run_gateway(split, scenario)


def test_a_burst_past_the_cap_is_refused_in_part_and_fully_accounted_for(
    split: SplitTopology, event_cap: None
) -> None:
    """30 connects at once against room for 4 starting dials: some are refused (RST, counted
    as a memory shortage), the others are served, and afterwards no flow, dial or relay is
    left, whatever the interleaving of their events and Python's takes."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    count = 30

    def burst() -> tuple[int, int]:
        socks = [split.cli.socket(socket.AF_INET) for _ in range(count)]
        try:
            for sock in socks:
                sock.setblocking(False)
                sock.connect_ex((SRV_ADDR4, ECHO_PORT))
            served = refused = 0
            for sock in socks:
                sock.settimeout(5)
                try:
                    if echo(sock, b"x") == b"x":
                        served += 1
                except ConnectionRefusedError:
                    refused += 1
            return served, refused
        finally:
            for sock in socks:
                sock.close()

    async def scenario(gateway: Gateway) -> None:
        served, refused = await trio.to_thread.run_sync(burst)
        stats = await wait_until(gateway, settled, "every flow to end")
        assert served + refused == count and refused > 0 and served > 0, (served, refused)
        assert stats.refused.memory == refused, stats
        assert stats.flows.tcp == count and stats.flows.live_tcp == 0, stats
        # Only a FIRST_DATA (the flow's name) may be dropped at the cap: one per flow at most.
        assert stats.stack.counters["c_dial_events_lost"] <= served, stats

    run_gateway(split, scenario)


def test_flows_c_keeps_are_listed_while_open_and_recorded_at_their_end(
    split: SplitTopology,
) -> None:
    """Flows C admitted and relayed alone make no event until they end: while open they are
    still listed (``live_flows``: endpoints, bytes, route, the Host name from their first
    bytes), counted (``flows.live_tcp``, ``active_flows``, ``dials_ok``) and waited for by a
    drain; a subscriber that came after they opened gets their records at their end."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    request = b"GET / HTTP/1.1\r\nHost: kept-in-c.test\r\n\r\n"
    binary = b"\x00\x01 no name here"

    async def scenario(gateway: Gateway) -> None:
        named = await trio.to_thread.run_sync(client_connect, split)
        plain = await trio.to_thread.run_sync(client_connect, split)
        assert isinstance(named, socket.socket) and isinstance(plain, socket.socket)
        try:
            assert await trio.to_thread.run_sync(echo, named, request) == request
            assert await trio.to_thread.run_sync(echo, plain, binary) == binary
            stats = await wait_until(gateway, lambda s: s.active_flows == 2, "two flows")
            assert stats.stack.counters["c_admitted"] == 2, stats
            assert stats.flows.live_tcp == 2 and stats.flows.tcp == 2, stats.flows
            assert stats.dials_ok == 2, stats
            live = {info.bytes_up: info for info in gateway.live_flows()}
            assert set(live) == {len(request), len(binary)}, live
            assert live[len(request)].name == "kept-in-c.test"
            assert live[len(binary)].name is None
            for info in live.values():
                assert info.target.port == ECHO_PORT and info.bytes_down == info.bytes_up
                assert info.route == "default" and info.connect_latency is not None
                assert info.age >= 0 and info.protocol == "tcp"
            assert len(gateway.live_flows(limit=1)) == 1
            assert gateway.live_flows(limit=1)[0].bytes_up == len(request)  # most bytes first
            with gateway.flows() as records:
                assert not await gateway.drain(0.3)  # both still open: the drain times out
                named.close()
                plain.close()
                got = [await records.__anext__() for _ in range(2)]
        finally:
            named.close()
            plain.close()
        by_bytes = {record.bytes_up: record for record in got}
        assert by_bytes[len(request)].name == "kept-in-c.test"
        for record in got:
            assert record.close_reason == "closed" and record.route == "default", record
            assert record.duration >= 0.3 and record.connect_latency is not None, record
        stats = await wait_until(gateway, settled, "every flow to end")
        assert stats.flows.live_tcp == 0 and stats.flows.tcp == 2 and not gateway.live_flows()

    run_gateway(split, scenario)


def test_a_gateway_served_again_keeps_counting_the_flows_c_kept(split: SplitTopology) -> None:
    """The counts of flows C admitted alone outlive the serve that made them: served twice,
    one flow each time, the gateway reports two of each."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    fd, name = split.client_tun()

    async def one_flow(gateway: Gateway) -> None:
        sock = await trio.to_thread.run_sync(client_connect, split)
        assert isinstance(sock, socket.socket), sock
        with sock:
            assert await trio.to_thread.run_sync(echo, sock, b"again") == b"again"
        await wait_until(gateway, settled, "the flow to end")

    async def main() -> None:
        gateway = Gateway(TunDevice.from_fd(fd, name=name), GatewayConfig(dial_timeout=5))
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.serve)
                with trio.fail_after(30):
                    await one_flow(gateway)
                nursery.cancel_scope.cancel()
        stats = gateway.statistics()
        assert stats.dials_ok == 2 and stats.flows.tcp == 2, stats
        assert stats.active_flows == 0 and stats.flows.live_tcp == 0, stats

    split.gw.enter_thread(trio.run, main)

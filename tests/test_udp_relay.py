"""UDP sessions relayed in C (``_csrc/udp_relay.c``, ``udp_forward.CRelayedSession``) on the
in-memory device, with real upstream sockets on loopback.

Why: once a session is in C, Python no longer sees its datagrams, so what Python still decides
from them must be fed from C's batches: the counts (statistics, flow records), the order of
activity that eviction follows, and the end of every session and socket when the gateway stops.
A session C cannot take must still work, from Python.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio
import trio.testing

from test_udp_icmp import CLIENT4, open_fds, start
from tunlwip.binding import udp_relay as cudp
from tunlwip.endpoint import Endpoint
from tunlwip.gateway import GatewayConfig
from tunlwip.udp import UdpConfig

from packets import udp_packet


async def echo(env: Any, port: int, target: int, payload: bytes) -> None:
    env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", port, target, payload))
    with trio.fail_after(10):
        reply = await env.wire.next_unmatched()
    assert (reply.dport, reply.payload) == (port, payload)


async def test_a_sessions_later_datagrams_bypass_python_and_are_counted(
    nursery: trio.Nursery, echo_server: int
) -> None:
    env = await start(nursery)
    for i in range(10):
        await echo(env, 5000, echo_server, b"datagram %d" % i)
    stats = env.gateway.statistics()
    c = stats.stack.counters
    # the first datagram opened the session from Python; the other 9 and all 10 replies: C
    assert (c["udp_relays_opened"], c["udp_relay_datagrams_up"]) == (1, 9)
    assert c["udp_relay_datagrams_down"] == 10
    assert (stats.udp.datagrams_in, stats.udp.datagrams_out) == (10, 10)
    (session,) = env.gateway.udp._table.all()
    assert session.byte_counts() == (100, 100) and session.datagrams_in == 10


async def test_eviction_follows_activity_seen_in_c(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, echo_server: int
) -> None:
    udp = UdpConfig(max_sessions=2, when_full="evict", max_sessions_per_client=2)
    env = await start(nursery, GatewayConfig(udp=udp))
    with env.gateway.flows() as records:
        await echo(env, 6001, echo_server, b"a")
        await trio.sleep(1)
        await echo(env, 6002, echo_server, b"b")
        await trio.sleep(1)
        await echo(env, 6001, echo_server, b"a again")  # only C sees this one
        await trio.sleep(1)
        await echo(env, 6003, echo_server, b"c")  # full: the least recently active goes
        with trio.fail_after(10):
            evicted = await records.__anext__()
    assert (evicted.client.port, evicted.close_reason) == (6002, "evicted")
    assert (evicted.bytes_up, evicted.bytes_down) == (1, 1)


async def test_a_session_c_refuses_is_relayed_from_python(
    nursery: trio.Nursery, echo_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> cudp.UdpRelayHandle:
        raise OSError(errno.ENOMEM, "no memory")

    monkeypatch.setattr(cudp, "open_relay", refuse)
    env = await start(nursery)
    for i in range(3):
        await echo(env, 5100, echo_server, b"%d" % i)
    stats = env.gateway.statistics()
    assert stats.stack.counters["udp_relays_opened"] == 0
    assert (stats.udp.datagrams_in, stats.udp.datagrams_out) == (3, 3)


async def test_stopping_ends_c_sessions_and_closes_their_sockets(echo_server: int) -> None:
    before = open_fds()
    async with trio.open_nursery() as nursery:
        env = await start(nursery)
        for port in (7100, 7101, 7102):
            await echo(env, port, echo_server, b"x")
        assert cudp.count() == 3 and open_fds() >= before + 3
        nursery.cancel_scope.cancel()
    assert cudp.count() == 0
    assert open_fds() <= before  # every upstream socket closed


async def test_bad_opens_are_refused(nursery: trio.Nursery) -> None:
    await start(nursery)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        client = Endpoint.parse(CLIENT4, 4000)
        with pytest.raises(OSError, match="Invalid argument") as mixed:
            cudp.open_relay(client, Endpoint.parse("::1", 53), sock.fileno(), 1)
        assert mixed.value.errno == errno.EINVAL
        handle = cudp.open_relay(client, Endpoint.parse("127.0.0.1", 9), sock.fileno(), 1)
        with pytest.raises(OSError, match="exists") as twice:
            cudp.open_relay(client, Endpoint.parse("127.0.0.1", 9), sock.fileno(), 2)
        assert twice.value.errno == errno.EEXIST
        final = cudp.close(handle)
        assert final is not None and final.datagrams_up == 0
        assert cudp.close(handle) is None  # closed once only

"""The upstream set: failover from one upstream to the next, against small UDP servers on
loopback (servers: dnsservers.py).

Why: an upstream that is silent, refuses with a closed port or answers SERVFAIL must cost one
attempt, not the query; the last refusal is passed on as it is, and when every upstream fails
the error names them all, with the counters saying why.
Timeouts are real but short (tenths of a second): trio's autojump clock would jump while
the kernel is still moving loopback packets.
"""

from __future__ import annotations

import dns.message
import dns.rcode
import pytest
import trio

from tunlwip.dialer import Dialer
from tunlwip.dns.upstreams import UpstreamError, UpstreamSet, parse_upstream

from dnsservers import CLIENT_ID, HOST, UdpMode, UdpServer, addresses, make_query, message_id

# -- failover ------------------------------------------------------------------------------


async def start_udp(nursery: trio.Nursery, mode: UdpMode, address: str = "192.0.2.1") -> str:
    server = UdpServer(mode, address)
    await nursery.start(server.run)
    return server.url


async def test_set_skips_an_upstream_that_does_not_answer(nursery: trio.Nursery) -> None:
    silent = await start_udp(nursery, "silent")
    good = await start_udp(nursery, "answer", "192.0.2.2")
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (silent, good)],
                               attempt_timeout=0.3)  # fmt: skip
    started = trio.current_time()
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert 0.3 <= trio.current_time() - started < 1.5
    assert used.url == good
    assert message_id(answer) == CLIENT_ID
    assert addresses(answer) == ["192.0.2.2"]
    assert upstream_set.counters["timeouts"] == 1
    assert upstream_set.counters["queries"] == 1


async def test_set_moves_on_after_servfail(nursery: trio.Nursery) -> None:
    servfail = await start_udp(nursery, "servfail")
    good = await start_udp(nursery, "answer", "192.0.2.2")
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (servfail, good)])
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert used.url == good
    assert addresses(answer) == ["192.0.2.2"]
    assert upstream_set.counters["bad_rcodes"] == 1


async def test_set_returns_the_last_refusal_as_it_is(nursery: trio.Nursery) -> None:
    servfail = await start_udp(nursery, "servfail")
    refused = await start_udp(nursery, "refused")
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (servfail, refused)])
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert used.url == refused
    assert message_id(answer) == CLIENT_ID
    assert dns.message.from_wire(answer).rcode() == dns.rcode.REFUSED


async def test_set_fails_when_every_upstream_fails(nursery: trio.Nursery) -> None:
    silent = await start_udp(nursery, "silent")
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as probe:
        await probe.bind((HOST, 0))
        closed = f"udp://{HOST}:{probe.getsockname()[1]}"
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (closed, silent)],
                               attempt_timeout=0.2)  # fmt: skip
    with trio.fail_after(2), pytest.raises(UpstreamError, match="all upstreams failed") as info:
        await upstream_set.resolve(make_query())
    assert closed in str(info.value) and silent in str(info.value)
    counters = upstream_set.counters
    assert (counters["failures"], counters["timeouts"], counters["all_failed"]) == (1, 1, 1)


async def test_empty_set_fails() -> None:
    with pytest.raises(UpstreamError, match="none configured"):
        await UpstreamSet([]).resolve(make_query())

"""The DNS proxy's cache, truncation and reload, with dig and unbound (topology and helpers:
dnsenv.py).

Why: the cache must honour TTLs (negative answers too) so that clients see the upstream's data
change when it should; a big answer must make dig fall back to TCP (or fit a large EDNS
buffer); and SIGHUP must reload the block lists at once, keeping the old policy when a list
cannot be read.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dnsenv import (
    BIG_COUNT,
    BIG_NAME,
    GATEWAYS,
    TTL2_ADDR,
    TTL2_NAME,
    UPSTREAM4,
    ZONE_A,
    Unbound,
    dig,
    dns_counters,
    expect,
    proxy_log,
    resolves,
)

# Fixtures, imported as themselves: pytest finds a fixture by its name in the test module,
# and `name as name` marks the import as deliberate (not unused) for ruff.
from dnsenv import dns_gateway as dns_gateway
from dnsenv import start_unbound as start_unbound
from gatewayproc import RunningGateway, wait_for
from netns import GATEWAY_ADDR4, GATEWAY_ADDR6, SplitTopology

pytestmark = pytest.mark.netns


# -- cache ------------------------------------------------------------------------------------


def test_cache_honours_ttl(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]]
) -> None:
    """Two identical queries: unbound sees the name once, the second answer is from the cache
    (query log "via cache", TTL not above the record's 2 s); once the TTL has passed, the next
    query reaches unbound again."""
    gw, unbound = dns_gateway()
    first = dig(split.cli, GATEWAY_ADDR4, TTL2_NAME)
    resolves(first, "A", TTL2_ADDR, gw, "first")
    second = dig(split.cli, GATEWAY_ADDR6, TTL2_NAME, "A", "+tcp")
    resolves(second, "A", TTL2_ADDR, gw, "second")
    assert unbound.queries(TTL2_NAME) == 1, unbound.log()
    assert [v for _, v in proxy_log(gw, TTL2_NAME)] == [UPSTREAM4, "cache"], gw.tail()
    assert all(ttl <= 2 for _, ttl, _, _ in second.answers), second.output
    time.sleep(3.0)  # the 2 s TTL runs out
    resolves(dig(split.cli, GATEWAY_ADDR4, TTL2_NAME), "A", TTL2_ADDR, gw, "after the TTL")
    assert unbound.queries(TTL2_NAME) == 2, unbound.log()
    counters = dns_counters(gw)
    assert counters["cached"] == 1 and counters["forwarded"] == 2, counters


def test_negative_cache(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]]
) -> None:
    """An NXDOMAIN from the upstream (with the zone's SOA) is cached too (RFC 2308): the second
    query for the missing name does not reach unbound."""
    gw, unbound = dns_gateway()
    for _ in range(2):
        expect(dig(split.cli, GATEWAY_ADDR4, "missing.test"), "NXDOMAIN", gw, "missing.test")
    assert unbound.queries("missing.test") == 1, unbound.log()
    assert [v for _, v in proxy_log(gw, "missing.test")] == [UPSTREAM4, "cache"], gw.tail()


# -- truncation -------------------------------------------------------------------------------


@pytest.mark.parametrize("server", GATEWAYS)
def test_big_answer_truncated_then_tcp(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    server: str,
) -> None:
    """A 3.2 KB answer: over UDP without EDNS (512) or with dig's 1232 it comes back empty with
    TC; dig without +ignore then retries over TCP and gets all 200 records; a client offering
    a 4096-byte EDNS buffer gets them over UDP."""
    gw, _ = dns_gateway()
    for opts in (("+noedns", "+ignore"), ("+ignore",)):
        result = expect(dig(split.cli, server, BIG_NAME, "A", *opts), "NOERROR", gw, str(opts))
        assert "tc" in result.flags, result.output
        assert result.answers == [] and result.transport == "UDP", result.output
    result = expect(dig(split.cli, server, BIG_NAME, "A", "+noedns"), "NOERROR", gw, "retry")
    assert "Truncated, retrying in TCP mode" in result.output, result.output
    assert result.transport == "TCP" and len(set(result.data("A"))) == BIG_COUNT, result.output
    result = expect(dig(split.cli, server, BIG_NAME, "A", "+bufsize=4096", "+ignore"),
                    "NOERROR", gw, "bufsize 4096")  # fmt: skip
    assert "tc" not in result.flags and result.transport == "UDP", result.output
    assert len(set(result.data("A"))) == BIG_COUNT, result.output
    counters = dns_counters(gw)
    assert counters["truncated"] >= 3, counters


# -- reload -----------------------------------------------------------------------------------


def test_sighup_reloads_lists(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
) -> None:
    """SIGHUP re-reads the block list: a name added to it is blocked at once (even though its
    answer is cached), removed again it resolves; a list that cannot be read keeps the old
    policy and the gateway keeps running."""
    block = tmp_path / "reload.list"
    block.write_text("# nothing blocked yet\nads.test\n")
    gw, _ = dns_gateway("--dns-block", str(block))
    resolves(dig(split.cli, GATEWAY_ADDR4, "later.test"), "A", ZONE_A["later.test"], gw, "before")

    def status_after_hup(want: str) -> None:
        gw.proc.send_signal(signal.SIGHUP)
        seen: list[str | None] = []

        def reloaded() -> bool:
            seen.append(dig(split.cli, GATEWAY_ADDR4, "later.test", wait=2).status)
            return seen[-1] == want

        wait_for(reloaded, f"later.test to be {want} after SIGHUP ({seen}); {gw.tail()}", 5)

    block.write_text(block.read_text() + "later.test\n")
    status_after_hup("NXDOMAIN")
    block.write_text("ads.test\n")
    status_after_hup("NOERROR")
    block.write_text(block.read_text() + "later.test\n")
    status_after_hup("NXDOMAIN")
    block.unlink()
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "not reloaded" in gw.log(), "the failed reload to be logged", timeout=5)
    assert gw.proc.poll() is None, gw.tail()
    expect(dig(split.cli, GATEWAY_ADDR4, "later.test"), "NXDOMAIN", gw, "old policy kept")
    expect(dig(split.cli, GATEWAY_ADDR4, "ads.test"), "NXDOMAIN", gw, "old policy kept")

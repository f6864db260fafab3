"""UDP sessions relayed in C (``_csrc/udp_relay.c``) through ``tunlwip up``, with real programs.

Why: the default UDP forwarder moves a session's datagrams in C once Python opened it; only
real peers show that this keeps what applications see (iperf3's datagrams arrive both ways
with no loss at a bounded rate, many sessions get their own echoes, a closed port fails the
client's connected socket, idle sessions end with their flow record) and that no Python runs
per datagram (the C relay's counters against the gateway's calls into Python). A flood of new
flows from one client stays within the session limit.

Split topology as in test_udp_icmp_netns.py: cli -- TUN -- gw (tunlwip up) -- veth -- srv.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from test_udp_icmp_netns import (
    ECHO_PORT,
    FAMILIES,
    MANY_UDP_CLIENT_SCRIPT,
    probe,
    start_udp_echo,
    upstream_udp_sockets,
)

from gatewayproc import RunningGateway, StartGateway, pattern, wait_for
from netns import SRV_ADDR4, SplitTopology

pytestmark = pytest.mark.netns

IPERF_PORT = 5299
CLOSED_PORT = 7299  # nothing listens there on srv


def counters(gw: RunningGateway) -> dict[str, Any]:
    """The stack's counters (``status --json``): the C UDP relay's among them."""
    doc = gw.status()
    result: dict[str, Any] = doc["totals"]["stack"]["counters"]
    result["udp_sessions"] = doc["totals"]["udp_sessions"]
    return result


def iperf3_udp(split: SplitTopology, rate: str, seconds: int, reverse: bool) -> dict[str, Any]:
    """iperf3 -u from cli to srv (``reverse``: srv sends), 1,400-byte datagrams; its JSON."""
    args = ["iperf3", "-c", SRV_ADDR4, "-p", str(IPERF_PORT), "-u", "-b", rate, "-l", "1400",
            "-t", str(seconds), "-J"]  # fmt: skip
    if reverse:
        args.append("-R")
    result = split.cli.run(*args, check=False, timeout=seconds + 30)
    assert result.returncode == 0, result.stdout + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_iperf3_udp_is_relayed_in_c(
    split: SplitTopology, split_gateway: StartGateway, require_tool: Any, reverse: bool
) -> None:
    """iperf3 -u at 100 Mbit/s for 2 s: the datagrams arrive, the C relay moved them (its
    counters) and Python was called far less often than once per datagram. How many are lost
    under load is a benchmark's figure (bench/'s udp rows), not asserted here: a shared CI
    core loses a few percent in iperf3's own buffers."""
    require_tool("iperf3")
    split.srv.popen(["iperf3", "-s", "-p", str(IPERF_PORT)])
    split.srv.wait_port(IPERF_PORT)
    gw = split_gateway()
    before = counters(gw)
    doc = iperf3_udp(split, "100M", 2, reverse)
    after = counters(gw)
    received = doc["end"]["sum_received"] if "sum_received" in doc["end"] else doc["end"]["sum"]
    packets = received["packets"]
    assert packets > 10_000, (received, gw.tail())
    key = "udp_relay_datagrams_down" if reverse else "udp_relay_datagrams_up"
    relayed = after[key] - before[key]
    python = after["python_calls"] - before["python_calls"]
    assert relayed >= packets * 0.99, (relayed, packets, gw.tail())
    assert python < packets / 20, f"{python} calls into Python for {packets} datagrams"
    print(f"{packets} datagrams, {relayed} relayed in C, {python} calls into Python; "
          f"sendmmsg {after['udp_relay_send_calls'] - before['udp_relay_send_calls']}, "
          f"recvmmsg {after['udp_relay_recv_calls'] - before['udp_relay_recv_calls']}")  # fmt: skip
    print(gw.stop())


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_many_sessions_echo_through_c(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """300 sockets x 20 datagrams with a real echo server: every reply verified (payload,
    source), and all but each session's first datagram went through the C relay."""
    sockets, count = 300, 20
    start_udp_echo(split.srv, ECHO_PORT)
    gw = split_gateway()
    result = split.cli.run(
        sys.executable, "-c", MANY_UDP_CLIENT_SCRIPT, str(int(family)), srv_addr,
        str(ECHO_PORT), str(sockets), str(count), "120", check=False, timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{gw.tail()}"
    stats = counters(gw)
    assert stats["udp_relays_opened"] == sockets, gw.tail()
    assert stats["udp_relay_datagrams_up"] >= sockets * (count - 1), stats
    assert stats["udp_relay_datagrams_down"] >= sockets * count, stats
    print(result.stdout.strip())
    print(gw.stop())


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_closed_port_is_mirrored_from_the_c_relay(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """A connected client socket to a port nobody listens on fails with ECONNREFUSED: srv's
    ICMP port unreachable reached the C relay's socket and was mirrored to the client. An
    open port on the same gateway still echoes."""
    start_udp_echo(split.srv, ECHO_PORT)
    gw = split_gateway()
    assert probe(split.cli, family, srv_addr, CLOSED_PORT, wait=1.0) == "refused", gw.tail()
    assert probe(split.cli, family, srv_addr, ECHO_PORT, wait=1.0) == "echo", gw.tail()
    assert counters(gw)["udp_relay_port_unreachable"] >= 1, gw.tail()
    print(gw.stop())


def test_idle_c_session_ends_with_its_flow_record(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """``--udp-idle-timeout 1``: a session that exchanged 10 datagrams each way in C ends
    within a few seconds of silence, its socket closed, and its flow record says "idle
    timeout" with every byte counted both ways."""
    start_udp_echo(split.srv, ECHO_PORT)
    path = tmp_path / "flows.jsonl"
    gw = split_gateway("--udp-idle-timeout", "1", "--flow-log", str(path))
    with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect((SRV_ADDR4, ECHO_PORT))
        for i in range(10):
            sock.send(pattern(i, 300))
            assert sock.recv(1 << 16) == pattern(i, 300), gw.tail()
        port = sock.getsockname()[1]
        assert counters(gw)["udp_relay_datagrams_up"] >= 9
        wait_for(lambda: upstream_udp_sockets(split.gw, ECHO_PORT) == 0, "the session to end",
                 timeout=6.0)  # fmt: skip

        def recorded() -> list[dict[str, Any]]:
            if not path.exists():
                return []
            records = [json.loads(line) for line in path.read_text().splitlines()]
            return [r for r in records if r["client"].endswith(f":{port}")]

        wait_for(lambda: bool(recorded()), "the flow record", timeout=5.0)
    (record,) = recorded()
    assert record["protocol"] == "udp" and record["close_reason"] == "idle timeout", record
    assert (record["bytes_up"], record["bytes_down"]) == (3000, 3000), record
    print(gw.stop())


def test_flood_of_new_flows_stays_within_the_session_limit(
    split: SplitTopology, split_gateway: StartGateway
) -> None:
    """One client opens 3,000 flows to an echo server as fast as it can (a new source port
    each) against ``--max-udp-sessions 200``: the gateway never holds more than 200 sessions
    (C relays) or upstream sockets, and a session opened before the flood still echoes."""
    cap, flows = 200, 3000
    start_udp_echo(split.srv, ECHO_PORT)
    gw = split_gateway("--max-udp-sessions", str(cap))
    flood = r"""
import socket, sys, time
deadline = time.monotonic() + 20
for _ in range(int(sys.argv[3])):
    if time.monotonic() > deadline:
        break
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        try:
            s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
        except OSError:
            pass  # a full queue: a flood does not care
"""
    with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect((SRV_ADDR4, ECHO_PORT))
        sock.send(b"before")
        assert sock.recv(100) == b"before", gw.tail()
        split.cli.run(sys.executable, "-c", flood, SRV_ADDR4, str(ECHO_PORT), str(flows),
                      timeout=60)  # fmt: skip
        stats = counters(gw)
        assert stats["udp_sessions"] <= cap, f"{stats['udp_sessions']} sessions; {gw.tail()}"
        assert stats["udp_relays_opened"] <= flows + 1
        assert upstream_udp_sockets(split.gw, ECHO_PORT) <= cap
        sock.send(b"after")
        assert sock.recv(100) == b"after", gw.tail()
    print(gw.stop())

"""Dials in C (``_csrc/dial.c``) with ``tunlwip up`` on a real TUN: the default TCP path.

Why: a short connection used to cost five calls from C into Python (the SYN hook, the
connect's readiness, the accept, the first bytes, the relay's end) and a dozen Python objects.
With C reading the TUN, the held SYN's connect, its release, the handover to a C relay and the
relay's end happen in C; so does the SYN's admission when nothing but a direct dial could come
of it (``_csrc/admit.c``); Python hears of the rest in batches.
These tests show that path is taken (``c_dials``, few ``python_calls`` per connection), that
the flow records keep every field (the name sniffed from the first bytes too), that each
refusal is answered and counted as before, and that a SYN flood leaves C's dial table bounded.

Split topology (as in test_faults_netns.py): kernel clients in cli, the gateway in gw, servers
and a black hole (198.18.60.0/24, routed to srv and dropped there) behind srv. Every loop is
bounded in count and time.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayproc import RunningGateway, StartGateway, wait_for
from netns import SRV_ADDR4, SplitTopology
from transfers import connect, start_script_server

pytestmark = pytest.mark.netns

ECHO_PORT, CLOSED_PORT = 7300, 7399
BLACKHOLE_NET4, BLACKHOLE4 = "198.18.60.0/24", "198.18.60.9"


def counters(gw: RunningGateway) -> dict[str, Any]:
    totals: dict[str, Any] = gw.status()["totals"]
    return totals


def stack_counter(totals: dict[str, Any], name: str) -> int:
    return int(totals["stack"]["counters"][name])


def echo_once(split: SplitTopology, payload: bytes) -> None:
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, timeout=5) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            part = sock.recv(65536)
            assert part, "EOF before the echo"
            got += part
        assert got == payload


def blackhole(split: SplitTopology) -> None:
    split.gw.run("ip", "route", "add", BLACKHOLE_NET4, "via", SRV_ADDR4)
    split.srv.run("ip", "route", "add", "blackhole", BLACKHOLE_NET4)


def test_short_connections_run_in_c_with_full_flow_records(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """40 connections, each an HTTP-looking request echoed back: every one is admitted,
    dialed and relayed in C, Python is not called for any of them (it takes their events in
    batches), and each
    flow's record has its bytes, latency, close reason and the Host name from its first bytes."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    log_path = tmp_path / "flows.jsonl"
    gw = split_gateway("--flow-log", str(log_path))
    echo_once(split, b"warm up")  # the listener, the ARP entry, the first dial
    before = counters(gw)
    count = 40
    request = b"GET / HTTP/1.1\r\nHost: c-path.test\r\n\r\n"
    for _ in range(count):
        echo_once(split, request)
    wait_for(lambda: counters(gw)["active_flows"] == 0, "the flows to end", timeout=10)
    after = counters(gw)
    dials = stack_counter(after, "c_dials") - stack_counter(before, "c_dials")
    calls = stack_counter(after, "python_calls") - stack_counter(before, "python_calls")
    print(f"c_dials {dials}, python calls {calls} for {count} connections")
    assert dials == count
    assert after["dials_ok"] - before["dials_ok"] == count
    assert stack_counter(after, "c_relays") == 0 and stack_counter(after, "c_dialing") == 0
    # The Python path makes at least five calls per connection, Python's admission one; C
    # admitted every one of these itself (no routes, no limit near): none.
    admitted = stack_counter(after, "c_admitted") - stack_counter(before, "c_admitted")
    assert admitted == count, admitted
    assert calls <= count // 10, calls
    assert after["flows"]["tcp"] - before["flows"]["tcp"] == count
    gw.stop()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    ours = [r for r in records if r["name"] == "c-path.test"]
    assert len(ours) == count, records[-3:]
    for record in ours:
        assert record["protocol"] == "tcp" and record["close_reason"] == "closed", record
        assert record["bytes_up"] == len(request) == record["bytes_down"], record
        assert record["target"] == f"{SRV_ADDR4}:{ECHO_PORT}", record
        assert record["route"] == "default", record  # the route's name, carried beside C's dial
        assert record["connect_latency"] is not None and record["duration"] >= 0, record


def test_refusals_through_the_c_path(split: SplitTopology, split_gateway: StartGateway,
                                     tmp_path: Path) -> None:  # fmt: skip
    """A closed port: RST (ECONNREFUSED), counted refused. A black hole with a 1 s dial
    timeout: ICMP host unreachable (EHOSTUNREACH), counted failed, the record says "dial
    timeout". A port-853 SYN with dns.reject_encrypted: RST, counted encrypted_dns."""
    blackhole(split)
    config = tmp_path / "gateway.toml"
    config.write_text("[tcp]\ndial_timeout = 1.0\n[dns]\nreject_encrypted = true\n")
    log_path = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(log_path))
    with pytest.raises(ConnectionRefusedError):
        connect(split.cli, socket.AF_INET, SRV_ADDR4, CLOSED_PORT, timeout=5).close()
    started = time.monotonic()
    with pytest.raises(OSError, match="No route to host") as unreachable:
        connect(split.cli, socket.AF_INET, BLACKHOLE4, 80, timeout=10).close()
    assert unreachable.value.errno == errno.EHOSTUNREACH, unreachable.value
    assert time.monotonic() - started < 5
    with pytest.raises(ConnectionRefusedError):
        connect(split.cli, socket.AF_INET, SRV_ADDR4, 853, timeout=5).close()
    totals = counters(gw)
    assert (totals["dials_refused"], totals["dials_failed"]) == (1, 1), totals
    assert totals["refused"]["encrypted_dns"] == 1, totals
    assert stack_counter(totals, "c_dials") == 2, totals
    gw.stop()
    reasons = {json.loads(line)["close_reason"] for line in log_path.read_text().splitlines()}
    assert {"refused", "dial timeout"} <= reasons, reasons


def test_a_syn_flood_leaves_the_c_dial_table_bounded(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """200 SYNs to a black hole against max_pending_dials = 32 (one client's share: all of
    it): at most 32 dials are ever held in C, the rest get RST at once (counted), and once the
    dial timeout passed C holds none and a normal connection still works."""
    blackhole(split)
    start_script_server(split.srv, "echo", ECHO_PORT)
    config = tmp_path / "gateway.toml"
    config.write_text("[tcp]\ndial_timeout = 2.0\nmax_pending_dials = 32\n"
                      "max_pending_dials_per_client = 32\n")  # fmt: skip
    gw = split_gateway("--config", str(config))
    socks = []
    refused = 0
    try:
        for _ in range(200):
            sock = split.cli.socket(socket.AF_INET)
            sock.setblocking(False)
            socks.append(sock)
            sock.connect_ex((BLACKHOLE4, 80))
        time.sleep(0.5)
        for sock in socks:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
                refused += 1
        during = counters(gw)
        assert stack_counter(during, "c_dialing") <= 32, during
        assert during["pending_dials"] <= 32, during
        assert refused >= 200 - 32 - 5, refused
        assert during["refused"]["pending_dials"] >= 200 - 32 - 5, during
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: stack_counter(counters(gw), "c_dialing") == 0, "the held dials to time out",
             timeout=15)  # fmt: skip
    echo_once(split, b"still served")
    totals = counters(gw)
    assert totals["pending_dials"] == 0 and stack_counter(totals, "c_dial_connected") == 0


def test_connections_at_the_limit_go_to_python_which_refuses_them(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """tcp.max_connections = 6: six held-open connections are admitted in C (no Python call),
    the seventh reaches Python, which answers RST (ECONNREFUSED) and counts it; once one of the
    six closes, C admits the next one alone again. The same with one client's share (4 of 50):
    C never admits past it."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    config = tmp_path / "gateway.toml"
    config.write_text("[tcp]\nmax_connections = 6\n")
    gw = split_gateway("--config", str(config))
    echo_once(split, b"warm up")
    wait_for(lambda: counters(gw)["active_flows"] == 0, "the warm-up to end", timeout=10)
    before = counters(gw)
    held = [connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, timeout=5) for _ in range(6)]
    try:
        for sock in held:  # each one relayed end to end
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        during = counters(gw)
        assert stack_counter(during, "c_admitted") - stack_counter(before, "c_admitted") == 6
        assert stack_counter(during, "python_calls") == stack_counter(before, "python_calls")
        with pytest.raises(ConnectionRefusedError):
            connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, timeout=5).close()
        refused = counters(gw)
        assert refused["refused"]["tcp_connections"] == 1, refused
        assert stack_counter(refused, "python_calls") > stack_counter(during, "python_calls")
        held.pop().close()
        wait_for(lambda: stack_counter(counters(gw), "c_relays") == 5, "one relay to end",
                 timeout=10)  # fmt: skip
        again = counters(gw)
        echo_once(split, b"room again")
        assert stack_counter(counters(gw), "c_admitted") == stack_counter(again, "c_admitted") + 1
    finally:
        for sock in held:
            sock.close()
    gw.stop()

    config.write_text("[tcp]\nmax_connections = 50\nmax_connections_per_client = 4\n")
    gw = split_gateway("--config", str(config))
    held = [connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, timeout=5) for _ in range(4)]
    try:
        with pytest.raises(ConnectionRefusedError):
            connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, timeout=5).close()
        totals = counters(gw)
        assert totals["refused"]["client_share_connections"] == 1, totals
        assert stack_counter(totals, "c_admitted") == 4, totals
    finally:
        for sock in held:
            sock.close()

"""Budgets of ``tunlwip up`` (issue 8), with real programs: at the TCP connection cap, the
UDP session cap and the DNS in-flight cap a new flow is refused within 1 s, while existing
flows keep working and a byte-verified transfer alongside completes intact.

Why: a cap that makes new clients wait for a timeout (a dropped SYN, a silent UDP session, an
unanswered query) looks like a dead network; one that makes room by breaking existing flows
is worse. Each test fills one budget with real kernel sockets (or dig), checks that the next
flow is refused at once (RST, ICMP port unreachable, DNS REFUSED), that the flows already
open still work, that ``tunlwip status --json`` counted the refusal, and runs
``transfers.ParallelUpload`` alongside.

Split topology (docs/architecture.md#test-topology, as in test_faults_netns.py)::

    [cli]                          [gw]                                [srv]
    kernel sockets, dig            tunlwip up --iface T                echo/digest servers,
    T: 198.18.0.2/32               lwIP: 198.18.0.1, fd00:18::1        UDP echo, a DNS
       fd00:18::2/64               DNS proxy                           upstream that never
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- veth 198.18.1.2
                                                                       answers unless told
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest

from gatewayproc import RunningGateway, StartGateway, pattern, wait_for
from netns import GATEWAY_ADDR4, SRV_ADDR4, SRV_ADDR6, Namespace, SplitTopology
from transfers import ParallelUpload, connect, start_script_server

pytestmark = pytest.mark.netns

ECHO_PORT, DIGEST_PORT, UDP_ECHO_PORT = 7000, 7001, 7200
#: The healthy transfer: 8 MiB spread over 6 s, started just before the refusal so that it
#: spans it even on a loaded machine (where each ``tunlwip status`` takes a while).
HEALTHY, HEALTHY_SECONDS = 8 * 1024 * 1024, 6.0
#: How fast a refusal must arrive (issue 8); a dropped SYN would be retried after 1 s.
REFUSED_WITHIN = 1.0


def healthy(split: SplitTopology, seconds: float = HEALTHY_SECONDS) -> ParallelUpload:
    """Start the byte-verified upload that must not notice the budgets (digest server in srv,
    over IPv6 while the capped flows use IPv4)."""
    return ParallelUpload(split.cli, socket.AF_INET6, SRV_ADDR6, DIGEST_PORT, size=HEALTHY,
                          seconds=seconds)  # fmt: skip


def totals(gw: RunningGateway) -> dict[str, Any]:
    """The ``totals`` of ``tunlwip status --json``."""
    totals: dict[str, Any] = gw.status()["totals"]
    return totals


def echo_line(sock: socket.socket, line: bytes) -> None:
    """Send ``line`` to the TCP echo server and require it back."""
    sock.sendall(line)
    got = b""
    while len(got) < len(line):
        chunk = sock.recv(1 << 16)
        assert chunk, f"EOF after {got!r}"
        got += chunk
    assert got == line


# -- 1. TCP: tcp.max_connections --------------------------------------------------------------


def test_tcp_cap_refuses_new_connections_at_once(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """``tcp.max_connections = 6``: five held echo connections and a running upload fill it;
    one more connect() gets ECONNREFUSED (the gateway's RST) within 1 s, the upload completes
    intact, the held connections still echo, the refusal is counted
    (``refused.tcp_connections``) and never reached the server, and once two are closed a
    new connection works again."""
    cap = 6
    config = tmp_path / "gw.toml"
    config.write_text(f"[tcp]\nmax_connections = {cap}\n")
    start_script_server(split.srv, "echo", ECHO_PORT)
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--config", str(config))
    held: list[socket.socket] = []
    try:
        for i in range(cap - 1):
            held.append(connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, timeout=10))
            echo_line(held[-1], f"held {i}\n".encode())
        upload = healthy(split)
        wait_for(lambda: totals(gw)["stack"]["tcp_connections"] >= cap,
                 "the upload's connection", timeout=10)  # fmt: skip
        assert totals(gw)["refused"]["tcp_connections"] == 0
        sock = split.cli.socket(socket.AF_INET)
        with sock:
            sock.settimeout(10)
            started = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                sock.connect((SRV_ADDR4, ECHO_PORT))
            elapsed = time.monotonic() - started
        print(f"connection {cap + 1} refused after {elapsed * 1000:.0f} ms")
        assert elapsed < REFUSED_WITHIN, f"refused after {elapsed:.2f}s; {gw.tail()}"
        assert upload.running(), "the refusal must happen while the healthy transfer runs"
        for i, sock in enumerate(held):
            echo_line(sock, f"still here {i}\n".encode())
        upload.check()
        assert totals(gw)["refused"]["tcp_connections"] >= 1
        for sock in held[:2]:
            sock.close()
        del held[:2]
        wait_for(lambda: totals(gw)["stack"]["tcp_connections"] <= cap - 2,
                 "closed connections to leave the count", timeout=10)  # fmt: skip
        with connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, timeout=10) as sock:
            echo_line(sock, b"room again\n")
    finally:
        for sock in held:
            sock.close()
    line = gw.stop()
    print(line)
    assert f"dials ok {cap + 1} " in line, line  # the refused one was never dialed


# -- 2. UDP: udp.max_sessions -----------------------------------------------------------------

#: Blocking echo on PORT, dual stack (as in test_udp_icmp_netns.py).
UDP_ECHO_SCRIPT = r"""
import socket, sys

s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


def udp_echo(sock: socket.socket, data: bytes, attempts: int = 5) -> None:
    """On a connected UDP socket: send ``data`` until it comes back (each wait bounded by the
    socket's timeout); ECONNREFUSED fails at once."""
    for _ in range(attempts):
        sock.send(data)
        try:
            reply = sock.recv(1 << 16)
        except TimeoutError:
            continue
        assert reply == data
        return
    raise AssertionError(f"no echo after {attempts} attempts")


def test_udp_cap_refuses_new_sessions_at_once(
    split: SplitTopology, split_gateway: StartGateway
) -> None:
    """``--max-udp-sessions 4``: with the sessions full, a new connected UDP socket's recv()
    fails with ECONNREFUSED (the gateway's ICMP port unreachable) within 1 s; the open
    sessions still echo, ``udp.refused_full`` counts it and the healthy upload is intact."""
    cap = 4
    split.srv.popen([sys.executable, "-c", UDP_ECHO_SCRIPT, str(UDP_ECHO_PORT)])
    split.srv.wait_port(UDP_ECHO_PORT, proto="udp")
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--max-udp-sessions", str(cap))
    socks: list[socket.socket] = []
    try:
        # Any session already open (none expected: nothing else in cli speaks UDP) counts.
        for i in range(cap - totals(gw)["flows"]["live_udp"]):
            socks.append(split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM))
            socks[-1].settimeout(1.0)
            socks[-1].connect((SRV_ADDR4, UDP_ECHO_PORT))
            udp_echo(socks[-1], pattern(i, 100))
        now = totals(gw)
        assert now["flows"]["live_udp"] == cap and now["udp"]["refused_full"] == 0, now
        upload = healthy(split)
        with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as extra:
            extra.settimeout(5.0)
            extra.connect((SRV_ADDR4, UDP_ECHO_PORT))
            started = time.monotonic()
            extra.send(b"one too many")
            with pytest.raises(ConnectionRefusedError):
                extra.recv(1 << 16)
            elapsed = time.monotonic() - started
        print(f"session {cap + 1} refused after {elapsed * 1000:.0f} ms")
        assert elapsed < REFUSED_WITHIN, f"refused after {elapsed:.2f}s; {gw.tail()}"
        assert upload.running(), "the refusal must happen while the healthy transfer runs"
        for i, sock in enumerate(socks):
            udp_echo(sock, pattern(100 + i, 100))
        now = totals(gw)
        assert now["udp"]["refused_full"] >= 1 and now["flows"]["live_udp"] == cap, now
        upload.check()
    finally:
        for sock in socks:
            sock.close()
    print(gw.stop())


# -- 3. DNS: dns.max_in_flight ----------------------------------------------------------------


class SilentUpstream:
    """A UDP DNS upstream in ``ns`` on port 53 (a daemon thread, at most 2 min) that records
    the names it is asked and answers none of them, until ``answer_all``: then it answers
    every query, held or new, with ``ANSWER``."""

    ANSWER = "198.18.5.5"

    def __init__(self, ns: Namespace) -> None:
        self.sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((SRV_ADDR4, 53))
        self.sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._pending: list[tuple[dns.message.Message, Any]] = []
        self.names: list[str] = []
        self._answering = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                wire, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                wire, addr = b"", None
            with self._lock:
                if wire:
                    query = dns.message.from_wire(wire)
                    self.names.append(query.question[0].name.to_text(omit_final_dot=True))
                    self._pending.append((query, addr))
                if self._answering.is_set():
                    pending, self._pending = self._pending, []
                    for query, to in pending:
                        self.sock.sendto(self._response(query).to_wire(), to)

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        name = query.question[0].name
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", self.ANSWER))
        return response

    def seen(self, name: str) -> bool:
        with self._lock:
            return name in self.names

    def answer_all(self) -> None:
        self._answering.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def dig_args(name: str, wait: float) -> list[str]:
    return ["dig", f"@{GATEWAY_ADDR4}", "+tries=1", f"+time={wait:g}", name, "A"]


def dig_status(output: str) -> str | None:
    statuses = re.findall(r"status: ([A-Z]+)", output)
    return statuses[-1] if statuses else None


def test_dns_in_flight_cap_answers_refused_at_once(
    split: SplitTopology,
    split_gateway: StartGateway,
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """``dns.max_in_flight = 2`` and an upstream that does not answer (yet): two dig queries
    stay in flight; a third gets REFUSED within 1 s (dig's query time), ``dns.overload``
    counts it, and the healthy upload is intact. Once the upstream answers, the two waiting
    digs get their answer and a new query is resolved again."""
    require_tool("dig")
    cap, slow = 2, 30.0
    config = tmp_path / "gw.toml"
    config.write_text(f'[dns]\nupstreams = ["udp://{SRV_ADDR4}:53"]\nmax_in_flight = {cap}\n'
                      f"query_timeout = {slow}\nattempt_timeout = {slow}\n")  # fmt: skip
    start_script_server(split.srv, "digest", DIGEST_PORT)
    upstream = SilentUpstream(split.srv)
    waiting: list[subprocess.Popen[str]] = []
    try:
        gw = split_gateway("--config", str(config))
        for i in range(cap):
            name = f"wait{i}.budget.test"
            waiting.append(split.cli.popen(dig_args(name, slow + 5), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True))  # fmt: skip
            wait_for(functools.partial(upstream.seen, name), f"{name} at the upstream", 10)
        assert totals(gw)["dns"]["overload"] == 0
        upload = healthy(split)
        started = time.monotonic()
        result = split.cli.run(*dig_args("refused.budget.test", 5), check=False, timeout=20)
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        assert dig_status(output) == "REFUSED", f"{output}\n{gw.tail()}"
        query_ms = re.search(r";; Query time: (\d+) msec", output)
        assert query_ms is not None, output
        print(f"query {cap + 1} REFUSED after {query_ms[1]} ms (dig ran {elapsed:.2f}s)")
        assert int(query_ms[1]) < REFUSED_WITHIN * 1000, f"{output}\n{gw.tail()}"
        assert not upstream.seen("refused.budget.test")
        assert totals(gw)["dns"]["overload"] >= 1
        assert upload.running(), "the refusal must happen while the healthy transfer runs"
        upload.check()
        upstream.answer_all()
        for proc in waiting:
            out, _ = proc.communicate(timeout=20)
            assert dig_status(out) == "NOERROR" and SilentUpstream.ANSWER in out, out
        result = split.cli.run(*dig_args("again.budget.test", 5), check=False, timeout=20)
        assert dig_status(result.stdout) == "NOERROR", f"{result.stdout}\n{gw.tail()}"
        print(gw.stop())
    finally:
        for proc in waiting:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        upstream.close()

"""Fair shares per client (issue 19) with ``tunlwip up`` on a real TUN and two clients.

Why: one client that fills a global budget (held SYNs to a black hole, thousands of UDP
sessions, slow DNS queries) used to deny every other client. Here client A floods all three,
each time past the *global* limit, and client B, on the same TUN, must still get a TCP
connection through byte-exact, a UDP round trip and a DNS answer; A's excess is answered as
at a global limit (RST, ICMP port unreachable, REFUSED), counted per reason in
``tunlwip status``, and once A's held dials time out its share is free again.

Split topology (as in test_faults_netns.py)::

    [cli]                          [gw]                                [srv]
    kernel sockets                 tunlwip up --iface T                echo servers (TCP,
    T: 198.18.0.2/32 (A)           lwIP: 198.18.0.1                    UDP), a DNS upstream
       198.18.0.3/32 (B)           DNS proxy                           answering only
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- veth 198.18.1.2
                                   198.18.60.0/24 via srv, which blackholes it

Every flood is bounded in count (a fixed number of sockets or queries) and in time (socket
timeouts, ``wait_for`` deadlines, a server thread that ends after 2 minutes).
"""

from __future__ import annotations

import errno
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest

from gatewayproc import RunningGateway, StartGateway, pattern, wait_for
from netns import GATEWAY_ADDR4, SRV_ADDR4, Namespace, SplitTopology
from transfers import connect, start_script_server

pytestmark = pytest.mark.netns

A, B = "198.18.0.2", "198.18.0.3"
ECHO_PORT, UDP_ECHO_PORT = 7000, 7200
BLACKHOLE_NET4, BLACKHOLE4 = "198.18.60.0/24", "198.18.60.7"
DIAL_TIMEOUT = 12.0
SLACK = 5.0  # scheduling on a loaded 2-CPU machine
#: Global limits and A's shares of them (small, so that A's flood passes the global limit).
DIALS, DIAL_SHARE = 24, 6
SESSIONS, SESSION_SHARE = 40, 10
IN_FLIGHT, DNS_SHARE = 24, 6
#: How many flows A tries: more than each global limit.
FLOOD_SYNS, FLOOD_SESSIONS, FLOOD_QUERIES = DIALS + 8, SESSIONS + 8, IN_FLIGHT + 8
#: A's UDP flows refused: A's DNS flow (port 53 is a UDP session too) holds one of its share.
UDP_REFUSED = FLOOD_SESSIONS - SESSION_SHARE + 1
FAST_ANSWER = "198.18.5.9"
#: Blocking UDP echo on PORT (as in test_budgets_netns.py).
UDP_ECHO_SCRIPT = r"""
import socket, sys

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


def totals(gw: RunningGateway) -> dict[str, Any]:
    """The ``totals`` of ``tunlwip status --json``."""
    totals: dict[str, Any] = gw.status()["totals"]
    return totals


class SelectiveUpstream:
    """A UDP DNS upstream in ``ns`` on port 53 (a daemon thread, at most 2 min): names under
    ``slow.`` are never answered, every other name gets A ``FAST_ANSWER``."""

    def __init__(self, ns: Namespace) -> None:
        self.sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((SRV_ADDR4, 53))
        self.sock.settimeout(0.2)
        self.silenced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                wire, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            name = query.question[0].name
            if name.labels[-2:-1] == (b"slow",):
                self.silenced += 1
                continue
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", FAST_ANSWER))
            self.sock.sendto(response.to_wire(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def query_wire(name: str, qid: int) -> bytes:
    query = dns.message.make_query(name, "A", use_edns=-1)
    query.id = qid
    return query.to_wire()


def echo_exact(sock: socket.socket, total: int, chunk: int = 16384) -> None:
    """Send ``total`` pattern bytes through the TCP echo server in chunks; each must come back
    byte for byte."""
    for offset in range(0, total, chunk):
        data = pattern(offset, chunk)
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            part = sock.recv(len(data) - len(got))
            assert part, f"EOF after {offset + len(got)} bytes"
            got += part
        assert got == data, f"bytes {offset}..{offset + chunk} differ"


def flood_syns(cli: Namespace, count: int, wait: float) -> tuple[list[socket.socket], int]:
    """A: ``count`` non-blocking connects to the black hole. Returns (the sockets still
    connecting after ``wait`` s, how many failed with ECONNREFUSED: the gateway's RST)."""
    pending: list[socket.socket] = []
    for _ in range(count):
        sock = cli.socket(socket.AF_INET)
        sock.setblocking(False)
        sock.bind((A, 0))
        assert sock.connect_ex((BLACKHOLE4, 80)) == errno.EINPROGRESS
        pending.append(sock)
    refused = 0
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
        for sock in writable:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err == errno.ECONNREFUSED, f"{errno.errorcode.get(err, err)} for a held SYN"
            refused += 1
            pending.remove(sock)
            sock.close()
        if refused >= count - DIAL_SHARE:
            break  # the rest are held: nothing more will happen before the dial timeout
    return pending, refused


def test_one_client_flooding_every_budget_leaves_the_other_served(
    split: SplitTopology,
    split_gateway: StartGateway,
    tmp_path: Path,
) -> None:
    """A: SYNs to a black hole, UDP sessions and never-answered DNS queries, each past the
    global limit. A gets exactly its share of each, the rest refused at once as at a global
    limit; B meanwhile gets a byte-exact TCP echo, a UDP echo and a DNS answer; the refusals
    are counted per reason (and no global limit was hit); after the dial timeout A's held
    SYNs are released and A connects again."""
    config = tmp_path / "gw.toml"
    config.write_text(
        f"[tcp]\ndial_timeout = {DIAL_TIMEOUT}\nmax_pending_dials = {DIALS}\n"
        f"max_pending_dials_per_client = {DIAL_SHARE}\n"
        f"[udp]\nmax_sessions = {SESSIONS}\nmax_sessions_per_client = {SESSION_SHARE}\n"
        f'[dns]\nupstreams = ["udp://{SRV_ADDR4}:53"]\nquery_timeout = 60\n'
        f"attempt_timeout = 60\nmax_in_flight = {IN_FLIGHT}\n"
        f"max_in_flight_per_client = {DNS_SHARE}\n"
    )
    split.gw.ip("-4", "route", "add", BLACKHOLE_NET4, "via", SRV_ADDR4)
    split.srv.ip("-4", "route", "add", "blackhole", BLACKHOLE_NET4)
    start_script_server(split.srv, "echo", ECHO_PORT)
    split.srv.popen([sys.executable, "-c", UDP_ECHO_SCRIPT, str(UDP_ECHO_PORT)])
    split.srv.wait_port(UDP_ECHO_PORT, proto="udp")
    upstream = SelectiveUpstream(split.srv)
    gw = split_gateway("--config", str(config))
    split.cli.add_addrs(gw.iface, [f"{B}/32"])
    sockets: list[socket.socket] = []
    try:
        # -- TCP: A's SYNs to a black hole; B connects and echoes byte-exact -----------------
        held, refused = flood_syns(split.cli, FLOOD_SYNS, wait=5.0)
        sockets += held
        assert (len(held), refused) == (DIAL_SHARE, FLOOD_SYNS - DIAL_SHARE), gw.tail()
        with connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, bind=B, timeout=5) as sock:
            echo_exact(sock, 256 * 1024)
        now = totals(gw)
        assert now["pending_dials"] == DIAL_SHARE, now
        assert now["refused"]["client_share_dials"] == FLOOD_SYNS - DIAL_SHARE, now
        assert now["refused"]["pending_dials"] == 0, now

        # -- DNS: A's slow queries past max_in_flight; B gets an answer ----------------------
        resolver_a = split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(resolver_a)
        resolver_a.bind((A, 0))
        resolver_a.settimeout(2.0)
        for qid in range(1, FLOOD_QUERIES + 1):
            resolver_a.sendto(query_wire(f"q{qid}.slow.", qid), (GATEWAY_ADDR4, 53))
        refused_ids: set[int] = set()
        try:
            while len(refused_ids) < FLOOD_QUERIES:
                answer = dns.message.from_wire(resolver_a.recv(65535))
                assert answer.rcode() == dns.rcode.REFUSED, answer
                refused_ids.add(answer.id)
        except TimeoutError:
            pass  # the admitted ones wait for an upstream that never answers
        assert len(refused_ids) == FLOOD_QUERIES - DNS_SHARE, sorted(refused_ids)
        wait_for(lambda: upstream.silenced >= DNS_SHARE, "A's queries at the upstream", 10)
        with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((B, 0))
            sock.settimeout(5.0)
            sock.sendto(query_wire("b.fast.", 7), (GATEWAY_ADDR4, 53))
            answer = dns.message.from_wire(sock.recv(65535))
        assert answer.rcode() == dns.rcode.NOERROR and FAST_ANSWER in answer.to_text(), answer
        now = totals(gw)
        assert now["dns"]["client_share"] == FLOOD_QUERIES - DNS_SHARE, now["dns"]
        assert now["refused"]["client_share_dns"] == FLOOD_QUERIES - DNS_SHARE
        assert now["dns"]["overload"] == 0, now["dns"]

        # -- UDP: A opens sessions past max_sessions; B's round trip works ------------------
        echoed = unreachable = 0
        for i in range(FLOOD_SESSIONS):
            sock = split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.settimeout(2.0)
            sock.bind((A, 0))
            sock.connect((SRV_ADDR4, UDP_ECHO_PORT))
            data = pattern(1000 + i, 64)
            sock.send(data)
            try:
                assert sock.recv(1 << 16) == data
                echoed += 1
            except ConnectionRefusedError:  # the gateway's ICMP port unreachable
                unreachable += 1
        # A's DNS flow above is one of its sessions too.
        assert (echoed, unreachable) == (SESSION_SHARE - 1, UDP_REFUSED), gw.tail()
        with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2.0)
            sock.bind((B, 0))
            sock.connect((SRV_ADDR4, UDP_ECHO_PORT))
            sock.send(b"B's datagram")
            assert sock.recv(1 << 16) == b"B's datagram"
        now = totals(gw)
        assert now["udp"]["refused_client_share"] == UDP_REFUSED, now
        assert now["refused"]["client_share_udp_sessions"] == UDP_REFUSED
        assert now["udp"]["refused_full"] == 0, now

        # -- status names each reason --------------------------------------------------------
        status = subprocess.run([sys.executable, "-m", "tunlwip", "status", "--iface",
                                 gw.iface], capture_output=True, text=True, timeout=30)  # fmt: skip
        assert status.returncode == 0, status.stderr
        print(status.stdout)
        expected = (f"shares:    refused dials {FLOOD_SYNS - DIAL_SHARE}, udp sessions "
                    f"{UDP_REFUSED}, dns {FLOOD_QUERIES - DNS_SHARE}\n")  # fmt: skip
        assert expected in status.stdout, status.stdout

        # -- A's held SYNs end at the dial timeout; its share is free again ------------------
        wait_for(lambda: totals(gw)["pending_dials"] == 0, "A's held SYNs to time out",
                 timeout=DIAL_TIMEOUT + SLACK)  # fmt: skip
        for sock in held:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err in (0, errno.EHOSTUNREACH), errno.errorcode.get(err, err)
        with connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, bind=A, timeout=5) as sock:
            echo_exact(sock, 16384)
    finally:
        for sock in sockets:
            sock.close()
        upstream.close()
    print(gw.stop())

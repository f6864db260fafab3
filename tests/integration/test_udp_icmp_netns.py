"""UDP sessions, the QUIC policy and ICMP echo through ``tunlwip up``, with real kernel peers.

Why: the unit tests (tests/test_udp_icmp.py) check session bookkeeping and packet contents on a
memory device; only the kernel on both ends shows what applications see: that an unconnected
socket's replies come from the address and port it sent to, under load and fragmented, that a
QUIC probe is refused at once (so browsers fall back to TCP without waiting), that ``ping``
works in each ``--icmp`` mode, and that idle sessions give their sockets back.

Split topology (docs/architecture.md#test-topology, as in test_gateway_netns.py)::

    [cli]                          [gw]                                [srv]
    sockets, ping                  tunlwip up --iface T                UDP echo (one socket
    T: 198.18.0.2/32               one UDP socket per flow,            per port, dual stack)
       fd00:18::2/64               ping sockets (--icmp forward)
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- veth 198.18.1.2
                                                   fd00:1::1               fd00:1::2
                                   198.18.1.99, fd00:1::99: on srv's link, owned by nobody
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gatewayproc import RunningGateway, StartGateway, pattern, wait_for
from netns import SRV_ADDR4, SRV_ADDR6, Namespace, SplitTopology

pytestmark = pytest.mark.netns

ECHO_PORT = 7200
QUIC_PORT, HTTP_PORT, ALT_QUIC_PORT = 443, 80, 8443
#: On srv's subnet but assigned to no one: only the gateway itself can answer a ping there.
NOBODY4, NOBODY6 = "198.18.1.99", "fd00:1::99"
PING_ALL_GROUPS = "0 2147483647"
PING_DISABLED = "1 0"  # the kernel's default in a fresh namespace

FAMILIES = [
    pytest.param(socket.AF_INET, SRV_ADDR4, id="v4"),
    pytest.param(socket.AF_INET6, SRV_ADDR6, id="v6"),
]
PING_TARGETS = [
    pytest.param(SRV_ADDR4, NOBODY4, id="v4"),
    pytest.param(SRV_ADDR6, NOBODY6, id="v6"),
]

#: Blocking echo on every port in argv, one dual-stack socket each (IPv4 arrives v4-mapped and
#: is answered from the IPv4 address it was sent to).
ECHO_SERVER_SCRIPT = r"""
import selectors, socket, sys

sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind(("::", port))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        try:
            data, addr = key.fileobj.recvfrom(65535)
        except BlockingIOError:
            continue
        key.fileobj.sendto(data, addr)
"""

#: SOCKETS unconnected sockets, each a ping-pong of COUNT datagrams (unique payload per socket
#: and sequence number) with HOST:PORT. A datagram unanswered for 1 s is resent, at most 5 times
#: in all. Every reply must come from (HOST, PORT) and carry the socket's own current payload
#: (late duplicates of answered ones are counted, not failures). Exit 0 only if all
#: SOCKETS*COUNT were answered correctly within TIMEOUT seconds.
MANY_UDP_CLIENT_SCRIPT = r"""
import hashlib, selectors, socket, struct, sys, time

FAMILY, HOST, PORT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
SOCKETS, COUNT, TIMEOUT = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
TRIES, WAIT = 5, 1.0
FILL = hashlib.shake_256(b"tunlwip udp").digest(256)

def payload(i, k):
    return struct.pack("!II", i, k) + FILL[: 16 + (i * 7 + k * 13) % 240]

sel = selectors.DefaultSelector()
socks = []
seq, tries, sent_at = [0] * SOCKETS, [0] * SOCKETS, [0.0] * SOCKETS
ok = resent = dups = send_errors = finished = 0
wrong, missing = [], []

def send(i):
    global send_errors
    tries[i] += 1
    sent_at[i] = time.monotonic()
    try:
        socks[i].sendto(payload(i, seq[i]), (HOST, PORT))
    except OSError:
        send_errors += 1  # e.g. a full queue: the retry timer covers it

def advance(i):
    global finished
    seq[i] += 1
    tries[i] = 0
    if seq[i] < COUNT:
        send(i)
    else:
        sel.unregister(socks[i])
        finished += 1

started = time.monotonic()
for i in range(SOCKETS):
    s = socket.socket(FAMILY, socket.SOCK_DGRAM)
    s.setblocking(False)
    socks.append(s)
    sel.register(s, selectors.EVENT_READ, i)
for i in range(SOCKETS):
    send(i)
deadline = started + TIMEOUT
while finished < SOCKETS and time.monotonic() < deadline:
    for key, _ in sel.select(0.05):
        i = key.data
        while seq[i] < COUNT:
            try:
                data, addr = socks[i].recvfrom(4096)
            except BlockingIOError:
                break
            if (addr[0], addr[1]) != (HOST, PORT):
                wrong.append((i, seq[i], "from", addr[:2]))
                continue
            j, k = struct.unpack("!II", data[:8]) if len(data) >= 8 else (-1, -1)
            if j != i or k > seq[i] or data != payload(j, k):
                wrong.append((i, seq[i], "payload", data[:8].hex(), len(data)))
            elif k < seq[i]:
                dups += 1
            else:
                ok += 1
                advance(i)
    now = time.monotonic()
    for i in range(SOCKETS):
        if seq[i] < COUNT and now - sent_at[i] >= WAIT:
            if tries[i] < TRIES:
                resent += 1
                send(i)
            else:
                missing.append((i, seq[i]))
                advance(i)
missing += [(i, seq[i], "deadline") for i in range(SOCKETS) if seq[i] < COUNT]
print(f"{ok}/{SOCKETS * COUNT} replies verified from {HOST}:{PORT} over {SOCKETS} sockets in"
      f" {time.monotonic() - started:.1f}s; resent {resent}, late duplicates {dups}, send"
      f" errors {send_errors}; wrong {len(wrong)} {wrong[:5]}; missing {len(missing)}"
      f" {missing[:5]}")
sys.exit(0 if ok == SOCKETS * COUNT and not wrong and not missing else 1)
"""


# -- helpers ----------------------------------------------------------------------------------


def start_udp_echo(ns: Namespace, *ports: int) -> None:
    """ECHO_SERVER_SCRIPT in ``ns`` on ``ports``, returned once all of them are bound."""
    ns.popen([sys.executable, "-c", ECHO_SERVER_SCRIPT, *map(str, ports)])
    for port in ports:
        ns.wait_port(port, proto="udp")


def udp_socket(ns: Namespace, family: int, timeout: float) -> socket.socket:
    sock = ns.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    return sock


def roundtrip(
    sock: socket.socket, host: str, port: int, data: bytes, attempts: int = 5
) -> tuple[bytes, tuple[str, int]]:
    """sendto until a reply arrives (each wait bounded by the socket's timeout)."""
    for _ in range(attempts):
        sock.sendto(data, (host, port))
        try:
            reply, addr = sock.recvfrom(1 << 16)
        except TimeoutError:
            continue
        return reply, (addr[0], addr[1])
    raise AssertionError(f"no reply from {host}:{port} after {attempts} attempts")


def probe(ns: Namespace, family: int, host: str, port: int, wait: float, attempts: int = 3) -> str:
    """What a connected UDP socket sees after sending to host:port: "echo" (its own payload
    back), "refused" (ICMP port unreachable), "timeout" (nothing within ``wait`` s, every
    attempt) or "wrong echo"."""
    data = pattern(port, 64)
    with udp_socket(ns, family, wait) as sock:
        sock.connect((host, port))
        for _ in range(attempts):
            sock.send(data)
            try:
                reply = sock.recv(1 << 16)
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                continue
            return "echo" if reply == data else "wrong echo"
    return "timeout"


def upstream_udp_sockets(ns: Namespace, port: int) -> int:
    """UDP sockets in ``ns`` connected to remote ``port`` (the gateway's sessions), per ss."""
    out = ns.run("ss", "-Huan").stdout
    count = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4].rpartition(":")[2] == str(port):
            count += 1
    return count


def socket_fds(gw: RunningGateway) -> int:
    """How many of the gateway process's file descriptors are sockets."""
    fd_dir = f"/proc/{gw.proc.pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{name}").startswith("socket:")
        except FileNotFoundError:
            continue  # closed while we looked
    return count


def ping(ns: Namespace, addr: str, count: int = 3) -> tuple[int, int, str]:
    """``ping -c count -W 2`` from ``ns``: (exit status, replies received, output)."""
    family = "-6" if ":" in addr else "-4"
    result = ns.run(
        "ping", family, "-n", "-c", str(count), "-i", "0.2", "-W", "2", addr,
        check=False, timeout=30,
    )  # fmt: skip
    match = re.search(r"(\d+) received", result.stdout)
    return result.returncode, int(match.group(1)) if match else 0, result.stdout + result.stderr


# -- 1. many sessions -------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_500_udp_sessions(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """500 unconnected client sockets exchange 20 datagrams each with an echo server: all
    10,000 replies carry the right payload and come from the address and port sent to."""
    start_udp_echo(split.srv, ECHO_PORT)
    gw = split_gateway()
    result = split.cli.run(
        sys.executable, "-c", MANY_UDP_CLIENT_SCRIPT, str(int(family)), srv_addr,
        str(ECHO_PORT), "500", "20", "120", check=False, timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{gw.tail()}"
    print(result.stdout.strip())
    print(gw.stop())


# -- 2. fragmented datagrams ------------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_16k_datagram_both_ways(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """A 16 KiB datagram (11+ fragments at MTU 1500) reaches the echo server and its echo
    reaches the client intact; a small one first, so a failure shows which part broke."""
    start_udp_echo(split.srv, ECHO_PORT)
    gw = split_gateway()
    with udp_socket(split.cli, family, 1.0) as sock:
        for size in (1000, 16 * 1024):
            data = pattern(size, size)
            reply, source = roundtrip(sock, srv_addr, ECHO_PORT, data)
            assert source == (srv_addr, ECHO_PORT), source
            assert len(reply) == size and reply == data, f"{size} B: got {len(reply)} B"
    print(gw.stop())


# -- 3. QUIC policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_quic_reject(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """Default ``--quic reject``: UDP to 443 and 80 is refused within 1 s (ICMP port
    unreachable from the gateway: srv has echo servers on both), other ports pass."""
    start_udp_echo(split.srv, QUIC_PORT, HTTP_PORT, ECHO_PORT)
    gw = split_gateway()
    for port in (QUIC_PORT, HTTP_PORT):
        started = time.monotonic()
        outcome = probe(split.cli, family, srv_addr, port, wait=1.0, attempts=1)
        elapsed = time.monotonic() - started
        assert outcome == "refused", f"port {port}: {outcome}; {gw.tail()}"
        assert elapsed < 1.0, f"port {port}: refused after {elapsed:.2f}s"
    assert probe(split.cli, family, srv_addr, ECHO_PORT, wait=1.0) == "echo", gw.tail()
    print(gw.stop())


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_quic_drop(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """``--quic drop``: UDP to 443 gets no answer at all (a timeout, not a refusal), though
    srv would echo it; other ports still pass."""
    start_udp_echo(split.srv, QUIC_PORT, ECHO_PORT)
    gw = split_gateway("--quic", "drop")
    outcome = probe(split.cli, family, srv_addr, QUIC_PORT, wait=1.5, attempts=1)
    assert outcome == "timeout", f"{outcome}; {gw.tail()}"
    assert probe(split.cli, family, srv_addr, ECHO_PORT, wait=1.0) == "echo", gw.tail()
    print(gw.stop())


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_quic_off_forwards(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """``--quic off``: UDP to 443 and 80 is forwarded like any other; the echo comes back."""
    start_udp_echo(split.srv, QUIC_PORT, HTTP_PORT)
    gw = split_gateway("--quic", "off")
    for port in (QUIC_PORT, HTTP_PORT):
        outcome = probe(split.cli, family, srv_addr, port, wait=1.0)
        assert outcome == "echo", f"port {port}: {outcome}; {gw.tail()}"
    print(gw.stop())


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_quic_ports_option(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """``--quic-ports 8443`` replaces the list: 8443 is refused, 443 is forwarded."""
    start_udp_echo(split.srv, QUIC_PORT, ALT_QUIC_PORT)
    gw = split_gateway("--quic-ports", str(ALT_QUIC_PORT))
    outcome = probe(split.cli, family, srv_addr, ALT_QUIC_PORT, wait=1.0, attempts=1)
    assert outcome == "refused", f"port {ALT_QUIC_PORT}: {outcome}; {gw.tail()}"
    outcome = probe(split.cli, family, srv_addr, QUIC_PORT, wait=1.0)
    assert outcome == "echo", f"port {QUIC_PORT}: {outcome}; {gw.tail()}"
    print(gw.stop())


# -- 4. ICMP echo -----------------------------------------------------------------------------


@pytest.mark.parametrize(("srv_addr", "nobody"), PING_TARGETS)
def test_icmp_reply(
    split: SplitTopology,
    split_gateway: StartGateway,
    require_tool: Callable[[str], str],
    srv_addr: str,
    nobody: str,
) -> None:
    """Default ``--icmp reply``: the gateway answers pings to any address, even one that
    nobody holds."""
    require_tool("ping")
    gw = split_gateway()
    for addr in (srv_addr, nobody):
        status, received, out = ping(split.cli, addr)
        assert status == 0 and received == 3, f"ping {addr}:\n{out}\n{gw.tail()}"
    print(gw.stop())


@pytest.mark.parametrize(("srv_addr", "nobody"), PING_TARGETS)
def test_icmp_forward(
    split: SplitTopology,
    split_gateway: StartGateway,
    require_tool: Callable[[str], str],
    srv_addr: str,
    nobody: str,
) -> None:
    """``--icmp forward`` with ping sockets allowed in gw: srv's kernel answers, and an
    address nobody holds stays silent (so the answers really came from srv)."""
    require_tool("ping")
    split.gw.write_sysctl("net.ipv4.ping_group_range", PING_ALL_GROUPS)
    gw = split_gateway("--icmp", "forward")
    assert "falling back to reply" not in gw.log(), gw.tail()
    status, received, out = ping(split.cli, srv_addr)
    assert status == 0 and received == 3, f"ping {srv_addr}:\n{out}\n{gw.tail()}"
    status, received, out = ping(split.cli, nobody)
    assert status != 0 and received == 0, f"ping {nobody}:\n{out}\n{gw.tail()}"
    print(gw.stop())


@pytest.mark.parametrize(("srv_addr", "nobody"), PING_TARGETS)
def test_icmp_forward_falls_back_to_reply(
    split: SplitTopology,
    split_gateway: StartGateway,
    require_tool: Callable[[str], str],
    srv_addr: str,
    nobody: str,
) -> None:
    """``--icmp forward`` where ping sockets are not allowed (ping_group_range "1 0"): the
    gateway says so and answers pings itself, even for an address nobody holds."""
    require_tool("ping")
    split.gw.write_sysctl("net.ipv4.ping_group_range", PING_DISABLED)
    gw = split_gateway("--icmp", "forward")
    assert "falling back to reply" in gw.log(), gw.tail()
    for addr in (srv_addr, nobody):
        status, received, out = ping(split.cli, addr)
        assert status == 0 and received == 3, f"ping {addr}:\n{out}\n{gw.tail()}"
    print(gw.stop())


@pytest.mark.parametrize(("srv_addr", "nobody"), PING_TARGETS)
def test_icmp_off(
    split: SplitTopology,
    split_gateway: StartGateway,
    require_tool: Callable[[str], str],
    srv_addr: str,
    nobody: str,
) -> None:
    """``--icmp off``: echo requests are ignored, so even srv seems silent."""
    require_tool("ping")
    split.gw.write_sysctl("net.ipv4.ping_group_range", PING_ALL_GROUPS)  # not a reason to fail
    gw = split_gateway("--icmp", "off")
    for addr in (srv_addr, nobody):
        status, received, out = ping(split.cli, addr)
        assert status != 0 and received == 0, f"ping {addr}:\n{out}\n{gw.tail()}"
    print(gw.stop())


# -- 5. session lifetime ----------------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_idle_sessions_release_sockets(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """``--udp-idle-timeout 1``: after an exchange on 20 flows the gateway holds 20 upstream
    sockets; within a few seconds of silence they are closed (ss in gw, and the process's
    socket descriptors are back to where they were), and the flows work again afterwards."""
    flows = 20
    start_udp_echo(split.srv, ECHO_PORT)
    gw = split_gateway("--udp-idle-timeout", "1")
    baseline = socket_fds(gw)
    assert upstream_udp_sockets(split.gw, ECHO_PORT) == 0
    socks = [udp_socket(split.cli, family, 1.0) for _ in range(flows)]
    try:
        for i, sock in enumerate(socks):  # all sessions open within a few milliseconds
            sock.sendto(pattern(i, 100), (srv_addr, ECHO_PORT))
        for i, sock in enumerate(socks):
            reply, _ = sock.recvfrom(1 << 16)
            assert reply == pattern(i, 100), f"flow {i}; {gw.tail()}"
        assert upstream_udp_sockets(split.gw, ECHO_PORT) == flows, gw.tail()
        assert socket_fds(gw) >= baseline + flows
        wait_for(
            lambda: upstream_udp_sockets(split.gw, ECHO_PORT) == 0,
            "idle UDP sessions to close",
            timeout=5.0,
        )
        wait_for(lambda: socket_fds(gw) <= baseline, "socket descriptors back", timeout=2.0)
        for i, sock in enumerate(socks):
            reply, source = roundtrip(sock, srv_addr, ECHO_PORT, pattern(i, 100))
            assert (reply, source) == (pattern(i, 100), (srv_addr, ECHO_PORT)), f"flow {i}"
    finally:
        for sock in socks:
            sock.close()
    print(gw.stop())


def test_max_udp_sessions_evicts_when_configured(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """``--max-udp-sessions 8`` with ``udp.when_full = "evict"``: 24 flows in turn all get
    their echo, the gateway never holds more than 8 upstream sockets, and an evicted flow works
    again when it sends. (The default, refusing, is in test_budgets_netns.py.)"""
    cap, flows = 8, 24
    start_udp_echo(split.srv, ECHO_PORT)
    config = tmp_path / "evict.toml"
    config.write_text('[udp]\nwhen_full = "evict"\n')
    gw = split_gateway("--config", str(config), "--max-udp-sessions", str(cap))
    socks = [udp_socket(split.cli, socket.AF_INET, 1.0) for _ in range(flows)]
    try:
        for i, sock in enumerate(socks):
            reply, source = roundtrip(sock, SRV_ADDR4, ECHO_PORT, pattern(i, 200))
            assert (reply, source) == (pattern(i, 200), (SRV_ADDR4, ECHO_PORT)), f"flow {i}"
            held = upstream_udp_sockets(split.gw, ECHO_PORT)
            assert held <= cap, f"{held} upstream sockets after flow {i}; {gw.tail()}"
        reply, _ = roundtrip(socks[0], SRV_ADDR4, ECHO_PORT, b"again")
        assert reply == b"again"
    finally:
        for sock in socks:
            sock.close()
    print(gw.stop())


# -- 6. UDP segmentation offload (USO) ---------------------------------------------------------

SOL_UDP, UDP_SEGMENT = 17, 103


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_a_udp_segment_send_arrives_as_separate_datagrams(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """A client sending with ``UDP_SEGMENT`` (one send, eleven datagrams): with USO negotiated
    cli's kernel hands the TUN one super-datagram, the gateway splits it, and the echo server
    sees (and echoes) eleven separate datagrams, the last one shorter."""
    start_udp_echo(split.srv, ECHO_PORT)
    gw = split_gateway()
    sizes = [1200] * 10 + [4]
    datagrams = [pattern(i, size) for i, size in enumerate(sizes)]
    with udp_socket(split.cli, family, 1.0) as sock:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 1200)
        sock.connect((srv_addr, ECHO_PORT))
        got: set[bytes] = set()
        for _ in range(5):  # UDP: resend whatever was lost
            sock.send(b"".join(datagrams))
            try:
                while len(got) < len(datagrams):
                    got.add(sock.recv(1 << 16))
            except TimeoutError:
                continue
            break
    assert got == set(datagrams), sorted(map(len, got))
    stopped = gw.stop()
    match = re.search(r"offloaded in: \d+ TCP super-segments, (\d+) UDP super-datagrams", stopped)
    assert match and int(match[1]) >= 1, stopped


#: Answers each datagram "COUNT SIZE" with COUNT datagrams of SIZE bytes, as fast as it can:
#: the i-th filled with byte i % 256.
BURST_SERVER_SCRIPT = r"""
import socket, sys

s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
s.bind(("::", int(sys.argv[1])))
while True:
    request, addr = s.recvfrom(100)
    count, size = map(int, request.split())
    for i in range(min(count, 1000)):
        s.sendto(bytes([i % 256]) * size, addr)
"""


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_a_burst_from_upstream_reaches_the_client_through_uso_writes(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """A real upstream answers one request with 60 datagrams of 1,200 bytes (what the
    gateway's upstream socket buffers by default): the gateway
    drains its socket in bursts and hands the client's kernel each burst's datagrams in one
    GSO_UDP_L4 write (counted), which the kernel cuts back into datagrams: the client reads
    them one by one, whole."""
    split.srv.popen([sys.executable, "-c", BURST_SERVER_SCRIPT, str(ECHO_PORT)])
    split.srv.wait_port(ECHO_PORT, proto="udp")
    gw = split_gateway()
    with udp_socket(split.cli, family, 2.0) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.connect((srv_addr, ECHO_PORT))
        for _ in range(3):  # UDP: the request (or the whole answer) may be lost; ask again
            sock.send(b"60 1200")
            got: list[bytes] = []
            with contextlib.suppress(TimeoutError):
                while len(got) < 60:
                    got.append(sock.recv(1 << 16))
            if len(got) > 50:
                break
    assert len(got) > 50, f"{len(got)}; {gw.stop()}"  # UDP: a few may be lost under load
    assert all(len(d) == 1200 and d == d[:1] * 1200 for d in got), {len(d) for d in got}
    stopped = gw.stop()
    match = re.search(r"more, (\d+) of UDP\)", stopped)
    assert match and int(match[1]) > 0, stopped

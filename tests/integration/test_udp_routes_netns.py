"""Routes on UDP sessions (``egress.udp_routes``, ``udp_forward``) through ``tunlwip up``, with
real programs: danted relaying UDP ASSOCIATE sessions, unbound answering dig through it, the
kernel's UDP stack as the client.

Why: what a route does to a UDP flow is only believable from the client's side and the far
side: the echo server must see the proxy's address as the datagrams' source (danted really
relayed them), a rejected flow must fail the client's connected socket with ECONNREFUSED, a
dropped one must get nothing, a proxy that is down must fail the flow at once (ICMP host
unreachable), a ``direct?fwmark=N`` route must leave by the routing table of its mark, and an
idle session must close its association at the proxy. Each is also checked in the gateway's
flow records and statistics (the route's name and counters).

Split topology as in test_udp_icmp_netns.py: cli -- TUN -- gw (tunlwip up) -- veth -- srv; danted
and the echo servers run in srv (danted's control port and UDP relay on 198.18.1.2, its
external address the same), so a datagram relayed by danted reaches the echo server from
198.18.1.2, one sent directly from the gateway's 198.18.1.1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_proxies_real import system_user as system_user
from test_udp_icmp_netns import ECHO_PORT, probe, start_udp_echo

from proxyservers import DANTED, _stop_group

from dnsenv import WWW4, dig
from dnsenv import start_unbound as start_unbound
from gatewayproc import RunningGateway, StartGateway, pattern, wait_for
from netns import GW_VETH_ADDR4, SRV_ADDR4, SRV_ADDR6, Namespace, SplitTopology

pytestmark = pytest.mark.netns

PROXY_PORT = 1080
DEAD_PROXY_PORT = 1081  # nothing listens there
WHO_PORT = 7301  # answers "source address|payload"
REJECT_PORT, DROP_PORT, DOWN_PORT = 7310, 7311, 7312
IP_RECVERR = 11  # linux/in.h (not in Python's socket module)
MARK, MARK_TABLE, MARKED_NET, MARKED_ADDR = 0x2D, 177, "198.18.77.0/24", "198.18.77.1"

#: Echo on every port in argv, each reply prefixed with the source address the datagram came
#: from (IPv4 without its v4-mapped form), so a test sees who relayed it.
WHO_SERVER_SCRIPT = r"""
import selectors, socket, sys

sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        try:
            data, peer = key.fileobj.recvfrom(65535)
        except OSError:
            continue
        source = peer[0].removeprefix("::ffff:")
        key.fileobj.sendto(source.encode() + b"|" + data, peer)
"""

#: Echo on one address and port (argv).
BOUND_ECHO_SCRIPT = r"""
import socket, sys

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

#: A hostile SOCKS5 proxy (argv: address, port): any UDP ASSOCIATE is granted, and its relay
#: answers each datagram with six bad ones (a fragment, reserved bytes set, an unknown address
#: type, another source port, another source address, a 2-byte datagram), one from another
#: socket (a source the gateway's connected socket must not take), then the datagram itself
#: behind the header it came with (a wrong header from the gateway gets no good answer).
HOSTILE_PROXY_SCRIPT = r"""
import socket, struct, sys, threading

host, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(8)
relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
relay.bind((host, 0))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.bind((host, 0))


def control(conn):
    conn.recv(3)
    conn.sendall(b"\x05\x00")
    conn.recv(262)
    conn.sendall(b"\x05\x00\x00\x01" + socket.inet_aton(host)
                 + struct.pack(">H", relay.getsockname()[1]))
    while conn.recv(100):
        pass


def serve_relay():
    while True:
        data, peer = relay.recvfrom(65535)
        head, payload = data[:10], data[10:]
        for bad in (b"\x00\x00\x01" + head[3:] + b"fragment",
                    b"\x00\x01\x00" + head[3:] + b"reserved",
                    b"\x00\x00\x00\x07junk",
                    head[:8] + struct.pack(">H", 9) + b"foreign port",
                    head[:4] + socket.inet_aton("198.18.1.99") + head[8:] + b"foreign address",
                    b"\x00\x00"):
            relay.sendto(bad, peer)
        other.sendto(head + b"spoofed", peer)
        relay.sendto(head + payload, peer)


threading.Thread(target=serve_relay, daemon=True).start()
while True:
    conn, _ = listener.accept()
    threading.Thread(target=control, args=(conn,), daemon=True).start()
"""


@contextlib.contextmanager
def danted_in(ns: Namespace, work: Path, *, socksmethod: str = "none") -> Iterator[Path]:
    """danted in ``ns`` on 198.18.1.2 and fd00:1::2 port 1080 (UDP ASSOCIATE allowed, every
    session logged), in the foreground, its own process group; yields its log's path. Stopped
    by its PID (the group it leads) even when the test fails."""
    config, log = work / "danted.conf", work / "danted.log"
    rule = "\n  command: udpassociate udpreply connect\n  log: connect disconnect iooperation\n"
    config.write_text(
        f"logoutput: {log}\n"
        f"internal: {SRV_ADDR4} port = {PROXY_PORT}\n"
        f"internal: {SRV_ADDR6} port = {PROXY_PORT}\n"
        f"external: {SRV_ADDR4}\n"
        f"external: {SRV_ADDR6}\n"
        "clientmethod: none\n"
        f"socksmethod: {socksmethod}\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        "client pass { from: 0/0 to: 0/0 }\n"
        f"socks pass {{ from: 0/0 to: 0/0 {rule} }}\n"
    )
    with (work / "danted.out").open("wb") as out:
        proc = ns.popen([DANTED, "-f", str(config), "-N", "1", "-p", str(work / "danted.pid")],
                        stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True)  # fmt: skip
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"danted exited {proc.returncode}: {log.read_text()}")
            return (SRV_ADDR4, PROXY_PORT) in ns.listeners("tcp")

        wait_for(listening, "danted to listen", timeout=10.0)
        yield log
    finally:
        _stop_group(proc)


def write_config(path: Path, routes: str) -> str:
    path.write_text(routes)
    return str(path)


def route(name: str, via: str, *, ports: list[int] | None = None,
          networks: list[str] | None = None) -> str:  # fmt: skip
    lines = ["[[route]]", f'name = "{name}"', 'protocols = ["udp"]', f'via = "{via}"']
    if ports is not None:
        lines.append(f"ports = {ports}")
    if networks is not None:
        lines.append(f"networks = {json.dumps(networks)}")
    return "\n".join(lines) + "\n\n"


def flow_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_of(path: Path, port: int) -> list[dict[str, Any]]:
    """The flow records of the client socket bound to ``port``."""
    return [r for r in flow_records(path) if r["client"].endswith(f":{port}")]


def totals(gw: RunningGateway) -> dict[str, Any]:
    doc: dict[str, Any] = gw.status()["totals"]
    return doc


def proxy_connections(ns: Namespace) -> int:
    """The gateway's TCP connections to the proxy's port (its associations' control)."""
    out = ns.run("ss", "-Htn", "state", "established", f"( dport = :{PROXY_PORT} )").stdout
    return len(out.splitlines())


@pytest.mark.parametrize(
    ("family", "target", "socksmethod"),
    [
        pytest.param(socket.AF_INET, SRV_ADDR4, "none", id="v4"),
        pytest.param(socket.AF_INET6, SRV_ADDR6, "none", id="v6"),
        pytest.param(socket.AF_INET, SRV_ADDR4, "username", id="v4-username"),
    ],
)
def test_session_through_danted(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path,
    request: pytest.FixtureRequest, family: int, target: str, socksmethod: str,
) -> None:  # fmt: skip
    """A connected client socket sends 20 datagrams to a server behind a SOCKS5 route: every
    echo comes back whole, and the server saw danted's address as their source (v4: the
    gateway's own would be 198.18.1.1); danted logged the association. All but the datagrams
    that waited for the association went through the C relay (its counters: the SOCKS5
    header added and stripped in C). After ``--udp-idle-timeout 2`` of silence the session
    ends: its flow record names the route, says "idle timeout" and counts every byte, and
    the gateway's control connection to danted is closed."""
    credentials = ""
    if socksmethod == "username":
        user, password = request.getfixturevalue("system_user")
        credentials = f"{user}:{password}@"
    split.srv.popen([sys.executable, "-c", WHO_SERVER_SCRIPT, str(WHO_PORT)])
    split.srv.wait_port(WHO_PORT, proto="udp")
    flows = tmp_path / "flows.jsonl"
    config = write_config(tmp_path / "routes.toml", route(
        "danted", f"socks5://{credentials}{SRV_ADDR4}:{PROXY_PORT}", ports=[WHO_PORT]))  # fmt: skip
    with danted_in(split.srv, tmp_path, socksmethod=socksmethod) as danted_log:
        gw = split_gateway("--config", config, "--udp-idle-timeout", "2", "--flow-log",
                           str(flows))  # fmt: skip
        before = totals(gw)["stack"]["counters"]
        source = (SRV_ADDR4 if family == socket.AF_INET else SRV_ADDR6).encode()
        with split.cli.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5.0)
            sock.connect((target, WHO_PORT))
            port = sock.getsockname()[1]
            for i in range(20):
                sock.send(pattern(i, 200))
                assert sock.recv(1 << 16) == source + b"|" + pattern(i, 200), gw.tail()
            status = gw.status()  # one call: the session idles out after 2 s
            doc = status["totals"]
            counters = doc["stack"]["counters"]
            up = counters["udp_relay_datagrams_up"] - before["udp_relay_datagrams_up"]
            down = counters["udp_relay_datagrams_down"] - before["udp_relay_datagrams_down"]
            assert up >= 19 and down == 20, (up, down, gw.tail())
            assert counters["udp_relay_socks5_malformed"] == 0
            assert counters["udp_relay_socks5_foreign"] == 0
            assert doc["routes"]["flows_udp"]["danted"] == 1, doc["routes"]
            (live,) = [f for f in status["flows"] if f["client"].endswith(f":{port}")]
            assert live["route"] == "danted", live
            assert proxy_connections(split.gw) == 1
            wait_for(lambda: bool(records_of(flows, port)), "the idle session's record",
                     timeout=8.0)  # fmt: skip
            wait_for(lambda: proxy_connections(split.gw) == 0, "the association to close",
                     timeout=5.0)  # fmt: skip
        (record,) = records_of(flows, port)
        assert record["route"] == "danted" and record["close_reason"] == "idle timeout", record
        assert (record["bytes_up"], record["bytes_down"]) == (4000, 20 * (len(source) + 201))
        log = danted_log.read_text()
        assert "udpassociate" in log and "udpreply" in log, log[-2000:]
    print(gw.stop())


def test_dig_through_danted(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path, start_unbound: Any
) -> None:
    """dig's query to unbound (DNS proxy off: ``--dns-hijack off``, so port 53 is an ordinary
    UDP flow) goes through danted: the answer is unbound's, and unbound logged the query as
    coming from danted's address, not the gateway's."""
    unbound = start_unbound()
    proxy = f"socks5://{SRV_ADDR4}:{PROXY_PORT}"
    config = write_config(tmp_path / "routes.toml", route("dns", proxy, ports=[53]))
    with danted_in(split.srv, tmp_path):
        gw = split_gateway("--config", config, "--dns-hijack", "off")
        answer = dig(split.cli, SRV_ADDR4, "www.test")
        assert answer.status == "NOERROR" and answer.data("A") == [WWW4], answer.output
        assert unbound.queries("www.test", "A") == 1
        lines = [line for line in unbound.log().splitlines() if "www.test. A IN" in line]
        assert lines and all(SRV_ADDR4 in line and GW_VETH_ADDR4 not in line
                             for line in lines), lines  # fmt: skip
        assert totals(gw)["routes"]["flows_udp"]["dns"] == 1
    print(gw.stop())


def test_proxy_closing_the_association_ends_the_session(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """danted stops while a session is open: the gateway sees its control connection close,
    ends the session at once (not at its idle timeout) with the reason in its flow record,
    and counts it."""
    start_udp_echo(split.srv, ECHO_PORT)
    flows = tmp_path / "flows.jsonl"
    config = write_config(tmp_path / "routes.toml",
                          route("danted", f"socks5://{SRV_ADDR4}:{PROXY_PORT}"))  # fmt: skip
    gw = split_gateway("--config", config, "--flow-log", str(flows))
    with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5.0)
        sock.connect((SRV_ADDR4, ECHO_PORT))
        port = sock.getsockname()[1]
        with danted_in(split.srv, tmp_path):
            sock.send(b"hello")
            assert sock.recv(100) == b"hello", gw.tail()
            assert proxy_connections(split.gw) == 1
        wait_for(lambda: bool(records_of(flows, port)), "the session to end", timeout=5.0)
    (record,) = records_of(flows, port)
    assert record["route"] == "danted", record
    assert record["close_reason"] == "proxy closed association", record
    assert totals(gw)["udp"]["ended_by_proxy"] == 1
    print(gw.stop())


def test_reject_drop_and_a_proxy_that_is_down(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """One gateway, three routes and the default: ``reject`` fails the client's connected
    socket with ECONNREFUSED; ``drop`` answers nothing, and its repeated datagrams are
    counted, the route decided once; a SOCKS5 route whose proxy is down fails the flow at
    once with ICMP host unreachable, counted as the route's proxy failure; an unrouted flow
    still echoes directly. Every flow record names its route."""
    start_udp_echo(split.srv, ECHO_PORT)
    flows = tmp_path / "flows.jsonl"
    config = write_config(tmp_path / "routes.toml",
                          route("rej", "reject", ports=[REJECT_PORT])
                          + route("silent", "drop", ports=[DROP_PORT])
                          + route("down", f"socks5://{SRV_ADDR4}:{DEAD_PROXY_PORT}",
                                  ports=[DOWN_PORT]))  # fmt: skip
    gw = split_gateway("--config", config, "--flow-log", str(flows))
    assert probe(split.cli, socket.AF_INET, SRV_ADDR4, REJECT_PORT, wait=2.0) == "refused"
    assert probe(split.cli, socket.AF_INET, SRV_ADDR4, DROP_PORT, wait=0.5) == "timeout"
    with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5.0)
        # Host unreachable is a soft error for UDP (RFC 1122): a connected socket reports it
        # with IP_RECVERR, as QUIC stacks set it.
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.connect((SRV_ADDR4, DOWN_PORT))
        down_port = sock.getsockname()[1]
        started = time.monotonic()
        sock.send(b"through a dead proxy")
        with pytest.raises(OSError, match="No route to host") as failure:
            sock.recv(100)
        elapsed = time.monotonic() - started
    assert failure.value.errno == errno.EHOSTUNREACH, failure.value
    assert elapsed < 2.0, f"the dead proxy took {elapsed:.1f}s to fail the flow"
    assert probe(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT, wait=2.0) == "echo"
    doc = totals(gw)
    routes, udp = doc["routes"], doc["udp"]
    assert routes["rejected"]["rej"] == 1 and routes["flows_udp"]["rej"] == 1, routes
    assert routes["dropped"]["silent"] == 1 and routes["flows_udp"]["silent"] == 1, routes
    assert routes["proxy_failures"]["down"] == 1, routes
    assert routes["flows_udp"]["default"] == 1, routes
    assert udp["dropped_by_route"] == 3 and udp["refused_by_route"] >= 1, udp
    wait_for(lambda: len(flow_records(flows)) >= 3, "the flow records", timeout=5.0)
    by_route = {r["route"]: r for r in flow_records(flows)}
    assert by_route["rej"]["close_reason"] == "rejected by route", by_route
    assert by_route["silent"]["close_reason"] == "dropped by route", by_route
    assert by_route["down"]["close_reason"] == "proxy: refused", by_route
    assert by_route["down"]["client"].endswith(f":{down_port}"), by_route
    print(gw.stop())


def test_direct_with_fwmark_leaves_by_its_routing_table(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """``direct?fwmark=0x2d``: 198.18.77.1 is reachable from gw only through routing table 177,
    which only packets marked 0x2d use (``ip rule``, in gw's test namespace); the main table
    has no route to it. A flow routed with the mark echoes; the gateway's upstream socket
    carries the mark (``ss -e``)."""
    split.srv.ip("addr", "add", f"{MARKED_ADDR}/32", "dev", split.srv_veth)
    split.gw.ip("rule", "add", "fwmark", hex(MARK), "lookup", str(MARK_TABLE))
    split.gw.ip("route", "add", f"{MARKED_ADDR}/32", "via", SRV_ADDR4, "dev", split.gw_veth,
                "table", str(MARK_TABLE))  # fmt: skip
    assert split.gw.ip("route", "get", MARKED_ADDR, check=False).returncode != 0
    # Bound to the address itself, so its answers come from it (a wildcard socket's would
    # leave from 198.18.1.2, which the gateway's connected socket does not take).
    split.srv.popen([sys.executable, "-c", BOUND_ECHO_SCRIPT, MARKED_ADDR, str(ECHO_PORT)])
    split.srv.wait_port(ECHO_PORT, MARKED_ADDR, proto="udp")
    flows = tmp_path / "flows.jsonl"
    marked = route("marked", f"direct?fwmark={MARK}", networks=[MARKED_NET])
    config = write_config(tmp_path / "routes.toml", marked)
    gw = split_gateway("--config", config, "--flow-log", str(flows), "--udp-idle-timeout", "1")
    with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3.0)
        sock.connect((MARKED_ADDR, ECHO_PORT))
        port = sock.getsockname()[1]
        for i in range(5):
            sock.send(pattern(i, 100))
            assert sock.recv(1000) == pattern(i, 100), gw.tail()
        sockets = split.gw.run("ss", "-Huane", "dst", MARKED_ADDR).stdout
        assert f"fwmark:{hex(MARK)}" in sockets, sockets
        wait_for(lambda: bool(records_of(flows, port)), "the flow record", timeout=8.0)
    (record,) = records_of(flows, port)
    assert record["route"] == "marked" and record["bytes_up"] == 500, record
    assert totals(gw)["routes"]["flows_udp"]["marked"] == 1
    print(gw.stop())


def test_hostile_relay_answers_are_dropped_and_counted(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """A SOCKS5 relay answering each datagram with six malformed, fragmented or foreign ones
    and one from another socket before the real answer: the client gets exactly its two
    echoes (the second datagram went up through C with the header C prepends), and C counted
    what it dropped, by kind."""
    split.srv.popen([sys.executable, "-c", HOSTILE_PROXY_SCRIPT, SRV_ADDR4, str(PROXY_PORT)])
    split.srv.wait_port(PROXY_PORT, SRV_ADDR4)
    config = write_config(tmp_path / "routes.toml",
                          route("hostile", f"socks5://{SRV_ADDR4}:{PROXY_PORT}"))  # fmt: skip
    gw = split_gateway("--config", config)
    with split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3.0)
        sock.connect((SRV_ADDR4, WHO_PORT))
        for payload in (b"first, from Python", b"second, from C"):
            sock.send(payload)
            assert sock.recv(1000) == payload, gw.tail()
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1000)
    counters = totals(gw)["stack"]["counters"]
    assert counters["udp_relay_datagrams_up"] == 1, counters
    assert counters["udp_relay_socks5_fragments"] == 2, counters
    assert counters["udp_relay_socks5_malformed"] == 6, counters
    assert counters["udp_relay_socks5_foreign"] == 4, counters
    assert counters["udp_relay_datagrams_down"] == 2, counters
    print(gw.stop())

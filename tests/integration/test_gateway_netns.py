"""``tunlwip up`` end to end, with real kernel clients and servers in throwaway namespaces.

Why: unit tests drive lwIP through a memory device; only real programs (curl, the kernel's TCP)
on both ends show that bulk data, many flows, half-closes, refusals and the client filter behave
as a router's would, and that protect (fwmark) really keeps the gateway out of its own TUN.

Split topology (docs/architecture.md#test-topology): ``tunlwip up`` creates TUN T in gw,
the test moves T to cli::

    [cli]                          [gw]                                [srv]
    curl, kernel sockets           tunlwip up --iface T                http.server, asyncio
    T: 198.18.0.2/32               lwIP: 198.18.0.1, fd00:18::1        servers, sockets
       fd00:18::2/64                                                   blackhole 198.18.60/24
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- veth 198.18.1.2
                                                   fd00:1::1               fd00:1::2
                                   198.18.60.0/24 via 198.18.1.2 (dials there time out)

Single-host topology (the wg-quick recipe, without suppress_prefixlength)::

    [gw]                                                               [srv]
    curl (unmarked) -- rule "not fwmark 0x1d lookup 1234" --> T (198.18.0.2/32)
                          table 1234: default dev T              |
    tunlwip up --iface T --fwmark 0x1d  <========= fd ===========+
      marked sockets -- rule skipped --> main -- veth 198.18.1.1 ---- veth 198.18.1.2
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gatewayproc import StartGateway, pattern
from netns import (
    CLIENT_ADDR4,
    CLIENT_ADDR6,
    GW_VETH_ADDR4,
    GW_VETH_ADDR6,
    SRV_ADDR4,
    SRV_ADDR6,
    Namespace,
    SplitTopology,
    Topology,
)
from transfers import (
    OneShotServer,
    connect,
    listen,
    recv_all,
    start_script_server,
    upload_and_check_digest,
)

pytestmark = pytest.mark.netns

HTTP_PORT, ECHO_PORT, DIGEST_PORT, SOCK_PORT = 8080, 7000, 7001, 7100
CLOSED_PORT = 9  # nothing listens there in srv
BIG, SMALL = 50 * 1024 * 1024, 1024 * 1024
FWMARK, TABLE = 0x1D, "1234"
#: Routed from gw to srv, which blackholes them: SYNs vanish, only the dial timeout ends a dial.
BLACKHOLE_NET4, BLACKHOLE4 = "198.18.60.0/24", "198.18.60.7"
BLACKHOLE_NET6, BLACKHOLE6 = "fd00:60::/64", "fd00:60::7"
#: No route at all in gw: the dial fails at once (ENETUNREACH).
UNROUTED4, UNROUTED6 = "198.19.77.7", "fd00:77::7"
#: Extra cli addresses outside the client networks of the filter test.
FOREIGN4, FOREIGN6 = "198.18.0.3", "fd00:19::3"

FAMILIES = [
    pytest.param(socket.AF_INET, SRV_ADDR4, id="v4"),
    pytest.param(socket.AF_INET6, SRV_ADDR6, id="v6"),
]


# -- programs in srv and cli ------------------------------------------------------------------


@pytest.fixture(scope="module")
def webroot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Files to serve and their sha256: a 50 MiB and a 1 MiB random file."""
    root = tmp_path_factory.mktemp("www")
    digests = {}
    for name, size in (("big.bin", BIG), ("small.bin", SMALL)):
        data = os.urandom(size)
        (root / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return root, digests


def start_http(ns: Namespace, root: Path) -> None:
    """python's http.server on [::]:HTTP_PORT (it clears IPV6_V6ONLY, so IPv4 works too)."""
    ns.popen(
        [sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(root),
         str(HTTP_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ns.wait_port(HTTP_PORT)


def url(host: str, path: str) -> str:
    return (
        f"http://[{host}]:{HTTP_PORT}/{path}"
        if ":" in host
        else f"http://{host}:{HTTP_PORT}/{path}"
    )


def curl(ns: Namespace, target: str, out: Path, max_time: int) -> subprocess.CompletedProcess[str]:
    return ns.run(
        "curl", "-sS", "--fail", "--max-time", str(max_time), "-o", str(out), target,
        check=False, timeout=max_time + 15,
    )  # fmt: skip


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


#: N concurrent connections alternating over HOSTS; each sends SIZE bytes (64 KiB chunks tagged
#: with connection and chunk number) while reading the echo, half-closes after sending, and
#: compares the echo's sha256 and length. Exit 0 only if every flow verified within TIMEOUT.
MANY_CLIENT_SCRIPT = r"""
import asyncio, hashlib, struct, sys, time

N, SIZE, PORT, TIMEOUT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
HOSTS = sys.argv[5:]
CHUNK = 1 << 16
FILL = hashlib.shake_256(b"tunlwip").digest(CHUNK - 8)
connect_times, flow_times = [], []

def chunks(i):
    return [struct.pack("!II", i, k) + FILL for k in range(SIZE // CHUNK)]

progress = {}  # flow -> [bytes sent, bytes received]: which direction stalled

async def one(i):
    expected = hashlib.sha256()
    for c in chunks(i):
        expected.update(c)
    progress[i] = [0, 0]
    t0 = time.monotonic()
    r, w = await asyncio.open_connection(HOSTS[i % len(HOSTS)], PORT)
    connect_times.append(time.monotonic() - t0)

    async def send():
        for c in chunks(i):
            w.write(c)
            await w.drain()
            progress[i][0] += len(c)
        w.write_eof()

    sender = asyncio.create_task(send())
    got, n = hashlib.sha256(), 0
    while data := await r.read(CHUNK):
        got.update(data)
        n += len(data)
        progress[i][1] = n
    await sender
    w.close()
    flow_times.append(time.monotonic() - t0)
    return n == SIZE and got.digest() == expected.digest()

async def main():
    tasks = [asyncio.ensure_future(one(i)) for i in range(N)]
    done, pending = await asyncio.wait(tasks, timeout=TIMEOUT)
    bad = [(i, "timeout" if t in pending else t.exception() or "mismatch")
           for i, t in enumerate(tasks) if t in pending or t.exception() or not t.result()]
    flow_times.sort()
    median = flow_times[len(flow_times) // 2] if flow_times else 0
    print(f"{N - len(bad)}/{N} verified; slowest connect {max(connect_times, default=0):.2f}s,"
          f" flows median {median:.2f}s, slowest {max(flow_times, default=0):.2f}s;"
          f" first failures (flow, why, [sent, received]): "
          f"{[(i, why, progress.get(i)) for i, why in bad[:5]]}")
    for t in pending:
        t.cancel()
    sys.exit(1 if bad else 0)

asyncio.run(main())
"""


# -- 1. bulk transfers ------------------------------------------------------------------------


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_download_50mb(
    split: SplitTopology,
    split_gateway: StartGateway,
    webroot: tuple[Path, dict[str, str]],
    require_tool: Callable[[str], str],
    tmp_path: Path,
    family: int,
    srv_addr: str,
    offload: bool,
) -> None:
    """curl in cli fetches 50 MiB from srv through the gateway, byte for byte. With offload
    (the default) the segments reach cli's kernel coalesced, many to a write, with checksums
    left partial: the digest shows the kernel put them together right."""
    require_tool("curl")
    root, digests = webroot
    start_http(split.srv, root)
    gw = split_gateway() if offload else split_gateway("--no-offload")
    out = tmp_path / "big.out"
    started = time.monotonic()
    result = curl(split.cli, url(srv_addr, "big.bin"), out, max_time=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, f"{result.stderr}\n{gw.tail()}"
    assert sha256_file(out) == digests["big.bin"]
    stopped = gw.stop()
    match = re.search(r"GSO writes (\d+) carried (\d+) more", stopped)
    assert match, stopped
    gso_writes, coalesced = int(match[1]), int(match[2])
    if offload:  # 50 MiB is ~36,000 segments at MTU 1500
        assert gso_writes > 0 and coalesced > 10_000, stopped
    else:
        assert gso_writes == coalesced == 0, stopped
    print(
        f"download 50 MiB: {elapsed:.2f}s, {BIG * 8 / elapsed / 1e6:.0f} Mbit/s; "
        f"{gso_writes} GSO writes carried {coalesced} more segments"
    )


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_upload_50mb(
    split: SplitTopology,
    split_gateway: StartGateway,
    family: int,
    srv_addr: str,
    offload: bool,
) -> None:
    """A kernel socket in cli sends 50 MiB to a digest server in srv; the digests agree. With
    offload (the default) cli's kernel hands the TUN super-segments with partial checksums
    (TSO, TUNSETOFFLOAD), which lwIP takes whole; with --no-offload, none."""
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway() if offload else split_gateway("--no-offload")
    payload = pattern(7, BIG)
    started = time.monotonic()
    with connect(split.cli, family, srv_addr, DIGEST_PORT) as sock:
        upload_and_check_digest(sock, payload)
    elapsed = time.monotonic() - started
    stopped = gw.stop()
    match = re.search(r"offloaded in: (\d+) TCP super-segments", stopped)
    assert match, stopped
    super_segments = int(match[1])
    if offload:
        assert super_segments > 100, stopped
        assert "offloads csum tso4 tso6" in gw.log(), gw.tail()
    else:
        assert super_segments == 0, stopped
    print(
        f"upload 50 MiB: {elapsed:.2f}s, {BIG * 8 / elapsed / 1e6:.0f} Mbit/s; "
        f"{super_segments} super-segments"
    )


# -- 2. many flows ----------------------------------------------------------------------------


def test_200_concurrent_connections(split: SplitTopology, split_gateway: StartGateway) -> None:
    """200 simultaneous flows over both families, 1 MiB echoed each, half-closed by the
    client: none is starved, truncated or mixed up with another."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    gw = split_gateway()
    result = split.cli.run(
        sys.executable, "-c", MANY_CLIENT_SCRIPT, "200", str(SMALL), str(ECHO_PORT), "120",
        SRV_ADDR4, SRV_ADDR6, check=False, timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{gw.tail()}"
    print(result.stdout.strip())


# -- 3. half-close ----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_half_close_client_first(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """The client's FIN reaches the server, which only then answers; the answer still flows
    to the half-closed client."""
    split_gateway()
    request, response = pattern(1, SMALL), pattern(2, 2 * SMALL)

    def serve(conn: socket.socket) -> bytes:
        got = recv_all(conn)  # returns only once the client's FIN was forwarded
        conn.sendall(hashlib.sha256(got).digest() + response)
        return got

    server = OneShotServer(listen(split.srv, family, SOCK_PORT), serve)
    with connect(split.cli, family, srv_addr, SOCK_PORT) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock)
    assert server.result() == request
    assert reply == hashlib.sha256(request).digest() + response


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_half_close_server_first(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """The server sends and shuts down its write side; the client sees EOF, keeps sending
    afterwards, and the server receives all of it."""
    split_gateway()
    greeting, upload = pattern(3, SMALL), pattern(4, 2 * SMALL)

    def serve(conn: socket.socket) -> bytes:
        conn.sendall(greeting)
        conn.shutdown(socket.SHUT_WR)
        return recv_all(conn)

    server = OneShotServer(listen(split.srv, family, SOCK_PORT), serve)
    with connect(split.cli, family, srv_addr, SOCK_PORT) as sock:
        assert recv_all(sock) == greeting  # EOF seen; our direction is still open
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    assert server.result() == upload


# -- 4. truthful handshakes -------------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_closed_port_refuses_connect(
    split: SplitTopology, split_gateway: StartGateway, family: int, srv_addr: str
) -> None:
    """A closed upstream port makes connect() itself fail with ECONNREFUSED (dial before
    accept), not a handshake that succeeds and is reset later."""
    gw = split_gateway()
    for _ in range(2):  # the second attempt must get the same truthful answer
        with pytest.raises(ConnectionRefusedError):
            connect(split.cli, family, srv_addr, CLOSED_PORT, timeout=10).close()
    line = gw.stop()
    assert "refused 2 " in line, line


def test_unreachable_fails_within_dial_timeout(
    split: SplitTopology,
    split_gateway: StartGateway,
    webroot: tuple[Path, dict[str, str]],
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Unreachable destinations fail the client's connect() with EHOSTUNREACH (ICMP from the
    gateway) no later than the dial timeout; the gateway keeps serving afterwards."""
    require_tool("curl")
    root, digests = webroot
    dial_timeout = 3.0
    split.gw.ip("-4", "route", "add", BLACKHOLE_NET4, "via", SRV_ADDR4)
    split.gw.ip("-6", "route", "add", BLACKHOLE_NET6, "via", SRV_ADDR6)
    split.srv.ip("-4", "route", "add", "blackhole", BLACKHOLE_NET4)
    split.srv.ip("-6", "route", "add", "blackhole", BLACKHOLE_NET6)
    start_http(split.srv, root)
    gw = split_gateway("--dial-timeout", str(dial_timeout))

    cases = [  # (family, address, seconds the failure may take at least, at most)
        (socket.AF_INET, UNROUTED4, 0.0, 1.5),
        (socket.AF_INET6, UNROUTED6, 0.0, 1.5),
        (socket.AF_INET, BLACKHOLE4, dial_timeout - 0.5, dial_timeout + 1.5),
        (socket.AF_INET6, BLACKHOLE6, dial_timeout - 0.5, dial_timeout + 1.5),
    ]
    for family, addr, at_least, at_most in cases:
        started = time.monotonic()
        with pytest.raises(OSError) as info:  # noqa: PT011 (errno checked below, with the log)
            connect(split.cli, family, addr, 80, timeout=dial_timeout + 10).close()
        elapsed = time.monotonic() - started
        assert info.value.errno == errno.EHOSTUNREACH, f"{addr}: {info.value!r}; {gw.tail()}"
        assert at_least <= elapsed <= at_most, f"{addr}: failed after {elapsed:.1f}s"

    out = tmp_path / "small.out"
    result = curl(split.cli, url(SRV_ADDR4, "small.bin"), out, max_time=20)
    assert result.returncode == 0, f"{result.stderr}\n{gw.tail()}"
    assert sha256_file(out) == digests["small.bin"]
    line = gw.stop()
    assert "ok 1 " in line and f"failed {len(cases)};" in line, line


# -- 5. client filter -------------------------------------------------------------------------


def test_client_filter_drops_foreign_sources(
    split: SplitTopology, split_gateway: StartGateway
) -> None:
    """Only configured client networks are served (no open relay): SYNs from other sources
    get no answer at all and are counted as not_client drops."""
    gw = split_gateway("--client-net", f"{CLIENT_ADDR4}/32", "--client-net", "fd00:18::/64")
    split.cli.add_addrs(gw.iface, [f"{FOREIGN4}/32", f"{FOREIGN6}/128"])
    per_family, window = 10, 2.0

    # Non-blocking connects from the foreign addresses: within `window` none may complete or
    # fail (no SYN-ACK, RST or ICMP). Each sends >= 1 SYN (typically 2: RTO is 1 s).
    foreign = []
    try:
        for family, src, dst in (
            (socket.AF_INET, FOREIGN4, SRV_ADDR4),
            (socket.AF_INET6, FOREIGN6, SRV_ADDR6),
        ):
            for _ in range(per_family):
                sock = split.cli.socket(family)
                foreign.append(sock)
                sock.bind((src, 0))
                sock.setblocking(False)
                assert sock.connect_ex((dst, SOCK_PORT)) == errno.EINPROGRESS
        with listen(split.srv, socket.AF_INET6, SOCK_PORT) as listener:
            _, writable, _ = select.select([], foreign, [], window)
            assert writable == [], [
                s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for s in writable
            ]
            # Meanwhile the real clients are served.
            for family, src, dst, upstream_src in (
                (socket.AF_INET, CLIENT_ADDR4, SRV_ADDR4, f"::ffff:{GW_VETH_ADDR4}"),
                (socket.AF_INET6, CLIENT_ADDR6, SRV_ADDR6, GW_VETH_ADDR6),
            ):
                with connect(split.cli, family, dst, SOCK_PORT, bind=src) as ok:
                    conn, peer = listener.accept()
                    with conn:
                        assert peer[0] == upstream_src
                        ok.sendall(b"ping")
                        assert conn.recv(4) == b"ping"
    finally:
        for sock in foreign:
            sock.close()
    line = gw.stop()
    match = re.search(r"'not_client': (\d+)", line)
    # A couple of the kernel's own IPv6 packets (from :: / fe80::) count here too.
    assert match and int(match.group(1)) >= 2 * per_family, line


# -- 6. single host: protect is what makes it work ---------------------------------------------


@pytest.fixture
def single_host(topology: Topology) -> tuple[Namespace, Namespace]:
    """gw (client programs and gateway together) and srv, joined by a veth."""
    gw, srv = topology.add("gw"), topology.add("srv")
    gw_veth, _ = topology.veth(
        gw, srv,
        addrs_a=[f"{GW_VETH_ADDR4}/24", f"{GW_VETH_ADDR6}/64"],
        addrs_b=[f"{SRV_ADDR4}/24", f"{SRV_ADDR6}/64"],
    )  # fmt: skip
    # Strict reverse-path filtering would drop srv's replies to the marked sockets (an unmarked
    # lookup of srv's address points into the TUN); make that explicit whatever the defaults.
    for dev in ("all", "default", gw_veth):
        gw.write_sysctl(f"net.ipv4.conf.{dev}.rp_filter", "0")
    return gw, srv


def route_into_tun(ns: Namespace, iface: str) -> None:
    """Everything unmarked goes to the TUN; marked sockets use the main table."""
    ns.add_addrs(iface, [f"{CLIENT_ADDR4}/32", f"{CLIENT_ADDR6}/64"])
    ns.wait_not_tentative(iface)
    for fam in ("-4", "-6"):
        ns.ip(fam, "route", "add", "default", "dev", iface, "table", TABLE)
        ns.ip(fam, "rule", "add", "not", "fwmark", hex(FWMARK), "table", TABLE)


def route_dev(ns: Namespace, dst: str, *extra: str) -> str:
    out = ns.ip("route", "get", dst, *extra).stdout
    match = re.search(r"\bdev (\S+)", out)
    assert match, out
    return match.group(1)


@pytest.mark.parametrize(("family", "srv_addr"), FAMILIES)
def test_single_host_fwmark_protect(
    single_host: tuple[Namespace, Namespace],
    start_gateway: StartGateway,
    webroot: tuple[Path, dict[str, str]],
    require_tool: Callable[[str], str],
    tmp_path: Path,
    family: int,
    srv_addr: str,
) -> None:
    """Client and gateway in one namespace: with --fwmark the gateway's own sockets bypass
    the TUN, so a download through it works."""
    require_tool("curl")
    gw_ns, srv = single_host
    root, digests = webroot
    start_http(srv, root)
    gw = start_gateway(gw_ns, "--fwmark", hex(FWMARK))
    route_into_tun(gw_ns, gw.iface)
    assert route_dev(gw_ns, srv_addr) == gw.iface
    assert route_dev(gw_ns, srv_addr, "mark", hex(FWMARK)) != gw.iface
    out = tmp_path / "small.out"
    result = curl(gw_ns, url(srv_addr, "small.bin"), out, max_time=30)
    assert result.returncode == 0, f"{result.stderr}\n{gw.tail()}"
    assert sha256_file(out) == digests["small.bin"]
    line = gw.stop()
    assert "dials ok 1 " in line, line  # one flow, no loop


def test_single_host_without_protect_fails(
    single_host: tuple[Namespace, Namespace],
    start_gateway: StartGateway,
    webroot: tuple[Path, dict[str, str]],
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """The same setup without --fwmark sends the gateway's dials back into its own TUN and
    nothing reaches srv: the previous test passes because of protect, not by accident. (The
    gateway recognises its own SYN and drops it: test_loop_netns.py.)"""
    require_tool("curl")
    gw_ns, srv = single_host
    root, _ = webroot
    start_http(srv, root)
    gw = start_gateway(gw_ns, "--dial-timeout", "3", "--grace", "1")
    route_into_tun(gw_ns, gw.iface)
    assert route_dev(gw_ns, SRV_ADDR4) == gw.iface
    out = tmp_path / "small.out"
    result = curl(gw_ns, url(SRV_ADDR4, "small.bin"), out, max_time=5)
    assert result.returncode != 0, "download succeeded without protect"
    assert not out.exists() or out.stat().st_size < SMALL
    line = gw.stop()
    assert "dials ok 0 " in line, line  # its own SYN came back and was dropped
    assert "routing loop" in gw.log(), gw.tail()

"""Faults around ``tunlwip up``, with real programs: what the client sees, and that the other
flows keep working.

Why: a gateway is judged by how it fails. Each test breaks one thing (the upstream resets or
goes silent, the client vanishes, the DNS upstream is dead, the TUN is deleted, SIGTERM with
a thousand flows open), asserts the outcome a client or server really observes, and runs a
byte-verified upload (``transfers.ParallelUpload``) alongside that must not notice.

Split topology (docs/architecture.md#test-topology, as in test_gateway_netns.py)::

    [cli]                          [gw]                                [srv]
    kernel sockets, dig            tunlwip up --iface T                digest/echo servers,
    T: 198.18.0.2/32 (+ .0.3)      lwIP: 198.18.0.1, fd00:18::1        socket servers
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- veth 198.18.1.2
                                   198.18.60.0/24 via srv, which blackholes it
                                   198.18.1.77: on srv's link, owned by nobody
"""

from __future__ import annotations

import errno
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayproc import StartGateway, launch_gateway, pattern, wait_for
from netns import (
    CLIENT_ADDR4,
    GATEWAY_ADDR4,
    SRV_ADDR4,
    SRV_ADDR6,
    SplitTopology,
    move_link,
    setup_client_tun,
)
from transfers import (
    SOCK_TIMEOUT,
    OneShotServer,
    ParallelUpload,
    connect,
    listen,
    start_script_server,
)

pytestmark = pytest.mark.netns

DIGEST_PORT, ECHO_PORT, SOCK_PORT = 7001, 7000, 7100
#: The healthy transfer: 8 MiB, spread over a few seconds so that it spans the fault.
HEALTHY = 8 * 1024 * 1024
IDLE_TIMEOUT = 3.0  # the gateway's relay idle timeout in these tests (swept every second)
SWEEP = 1.0
SLACK = 3.0  # scheduling on a loaded 2-CPU machine (one run took 6.3 s for a 3 s timeout)
BLACKHOLE_NET4, BLACKHOLE4 = "198.18.60.0/24", "198.18.60.7"
NOBODY4 = "198.18.1.77"
#: A second client address on the TUN, removed to make its client vanish without a FIN.
VANISHING4 = "198.18.0.3"


def healthy(split: SplitTopology, seconds: float) -> ParallelUpload:
    """Start the byte-verified upload that must survive the fault (digest server in srv),
    over IPv6 while the faulty flows use IPv4."""
    return ParallelUpload(split.cli, socket.AF_INET6, SRV_ADDR6, DIGEST_PORT, size=HEALTHY,
                          seconds=seconds)  # fmt: skip


def flow_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_record(path: Path, client: str, what: str) -> dict[str, Any]:
    """The flow log's record of the TCP flow from ``client`` (``addr:port``)."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [r for r in flow_records(path) if r["client"] == client]
        return bool(found)

    wait_for(logged, what, timeout=10)
    return found[0]


def sock_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_to_eof(sock: socket.socket) -> None:
    while sock.recv(1 << 16):
        pass


def reset_with_linger0(conn: socket.socket) -> None:
    """Close so that the peer sees RST (SO_LINGER 0), as a crashing server's kernel does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def end_of(conn: socket.socket) -> str:
    """Read ``conn`` until it ends: "eof" or "reset" (what a server sees when we close)."""
    try:
        while conn.recv(1 << 16):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


# -- 1. upstream reset mid-transfer -----------------------------------------------------------


def test_upstream_reset_resets_the_client(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """The server resets (SO_LINGER 0) in the middle of a transfer: the client reads what
    was sent before, then ECONNRESET, not EOF (which would look like a complete response)."""
    flow_log = tmp_path / "flows.jsonl"
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--flow-log", str(flow_log))
    first = pattern(11, 256 * 1024)

    def serve(conn: socket.socket) -> bytes:
        conn.sendall(first)
        got = conn.recv(3)  # the client has read `first`
        reset_with_linger0(conn)
        return got

    upload = healthy(split, seconds=3.0)
    server = OneShotServer(listen(split.srv, socket.AF_INET, SOCK_PORT), serve)
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, SOCK_PORT) as sock:
        got = b""
        while len(got) < len(first):
            chunk = sock.recv(1 << 16)
            assert chunk, "EOF before the reset"
            got += chunk
        assert got == first
        sock.sendall(b"ack")
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
        client = sock_name(sock)
    assert server.result() == b"ack"
    assert upload.running(), "the fault must happen while the healthy transfer runs"
    upload.check()
    record = wait_record(flow_log, client, "the reset flow's record")
    assert record["close_reason"] == "reset", record
    gw.stop()


# -- 2. upstream silent: dial timeout, idle timeout --------------------------------------------


def test_blackholed_dial_fails_after_the_dial_timeout(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """SYNs to a blackholed destination get no answer at all: the client's connect() fails
    with EHOSTUNREACH (the gateway's ICMP) at the dial timeout, not after the kernel's 2 min."""
    dial_timeout, flow_log = 2.0, tmp_path / "flows.jsonl"
    split.gw.ip("-4", "route", "add", BLACKHOLE_NET4, "via", SRV_ADDR4)
    split.srv.ip("-4", "route", "add", "blackhole", BLACKHOLE_NET4)
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--dial-timeout", str(dial_timeout), "--flow-log", str(flow_log))
    upload = healthy(split, seconds=dial_timeout + 1.5)
    sock = split.cli.socket(socket.AF_INET)
    with sock:
        sock.settimeout(dial_timeout + 10)
        sock.bind((CLIENT_ADDR4, 0))
        client = sock_name(sock)
        started = time.monotonic()
        with pytest.raises(OSError) as info:  # noqa: PT011 (errno checked below, with the log)
            sock.connect((BLACKHOLE4, 80))
        elapsed = time.monotonic() - started
    assert info.value.errno == errno.EHOSTUNREACH, f"{info.value!r}; {gw.tail()}"
    assert dial_timeout - 0.5 <= elapsed <= dial_timeout + SLACK, f"failed after {elapsed:.1f}s"
    assert upload.running(), "the fault must happen while the healthy transfer runs"
    upload.check()
    assert wait_record(flow_log, client, "the failed dial's record")["close_reason"] == \
        "dial timeout"  # fmt: skip
    gw.stop()


def test_silent_upstream_is_reset_after_the_idle_timeout(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """The upstream accepts, then never reads or answers: after the idle timeout (plus at
    most one sweep) the client gets RST and the server sees its connection closed. The
    healthy upload lasts twice the idle timeout and is not touched: only idle flows expire."""
    flow_log = tmp_path / "flows.jsonl"
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--idle-timeout", str(IDLE_TIMEOUT), "--flow-log", str(flow_log))
    accepted, may_read = threading.Event(), threading.Event()

    def serve(conn: socket.socket) -> bytes:
        accepted.set()
        may_read.wait(SOCK_TIMEOUT)  # silent: no read, no answer
        return end_of(conn).encode()

    server = OneShotServer(listen(split.srv, socket.AF_INET, SOCK_PORT), serve)
    upload = healthy(split, seconds=2 * IDLE_TIMEOUT + 1)
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, SOCK_PORT) as sock:
        sock.sendall(b"request")
        assert accepted.wait(5)
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        elapsed = time.monotonic() - started
        client = sock_name(sock)
    may_read.set()
    assert server.result() in (b"eof", b"reset")
    assert IDLE_TIMEOUT - 0.5 <= elapsed <= IDLE_TIMEOUT + SWEEP + SLACK, f"{elapsed:.1f}s"
    assert upload.running(), "the healthy transfer must outlive the idle timeout"
    upload.check()
    assert wait_record(flow_log, client, "the idle flow's record")["close_reason"] == \
        "idle timeout"  # fmt: skip
    gw.stop()


# -- 3. the client vanishes without a FIN ------------------------------------------------------


def test_vanished_client_frees_the_upstream_after_the_idle_timeout(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """A client whose address disappears (its packets go nowhere, no FIN, no RST) while the
    server streams to it: once lwIP's send buffer is full nothing moves, and after the idle
    timeout the gateway closes the upstream socket (the server's send fails); ``tunlwip
    status --json`` no longer lists the flow."""
    flow_log = tmp_path / "flows.jsonl"
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--idle-timeout", str(IDLE_TIMEOUT), "--flow-log", str(flow_log))
    split.cli.add_addrs(gw.iface, [f"{VANISHING4}/32"])
    ended: list[float] = []

    def stream_forever(conn: socket.socket) -> bytes:
        chunk = pattern(12, 1 << 16)
        try:
            while True:
                conn.sendall(chunk)
        except (ConnectionResetError, BrokenPipeError) as exc:
            ended.append(time.monotonic())
            return type(exc).__name__.encode()

    server = OneShotServer(listen(split.srv, socket.AF_INET, SOCK_PORT), stream_forever)
    upload = healthy(split, seconds=2 * IDLE_TIMEOUT + SLACK + 2)
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, SOCK_PORT, bind=VANISHING4) as sock:
        client = sock_name(sock)
        assert any(f["client"] == client for f in gw.status()["flows"])
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # the flow is busy up to the moment the client goes
            assert sock.recv(1 << 16), "the stream ended early"
        split.cli.ip("addr", "del", f"{VANISHING4}/32", "dev", gw.iface)  # gone, silently
        vanished = time.monotonic()
        assert server.result() in (b"ConnectionResetError", b"BrokenPipeError")
        elapsed = ended[0] - vanished
    assert IDLE_TIMEOUT - 0.5 <= elapsed <= IDLE_TIMEOUT + SWEEP + SLACK, f"{elapsed:.1f}s"
    assert not any(f["client"] == client for f in gw.status()["flows"])
    assert wait_record(flow_log, client, "the vanished flow's record")["close_reason"] == \
        "idle timeout"  # fmt: skip
    assert upload.running(), "the fault must happen while the healthy transfer runs"
    upload.check()
    gw.stop()


# -- 4. DNS upstream down ----------------------------------------------------------------------


def test_dead_dns_upstream_gives_servfail_within_the_query_timeout(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """The only DNS upstream is an address nobody holds: dig gets SERVFAIL within the
    configured query timeout, over UDP and TCP; transfers are not held up meanwhile."""
    query_timeout = 2.0
    config = tmp_path / "gw.toml"
    config.write_text(f'[dns]\nupstreams = ["udp://{NOBODY4}:53"]\nquery_timeout = '
                      f"{query_timeout}\nattempt_timeout = {query_timeout}\n")  # fmt: skip
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--config", str(config))
    upload = healthy(split, seconds=2 * query_timeout + 1)
    for opts in ((), ("+tcp",)):
        started = time.monotonic()
        result = split.cli.run("dig", f"@{GATEWAY_ADDR4}", "+tries=1", "+time=10", *opts,
                               "www.test", "A", check=False, timeout=20)  # fmt: skip
        elapsed = time.monotonic() - started
        assert re.search(r"status: SERVFAIL\b", result.stdout), f"{result.stdout}\n{gw.tail()}"
        assert elapsed <= query_timeout + 1.0, f"SERVFAIL after {elapsed:.2f}s ({opts})"
    assert upload.running(), "the fault must happen while the healthy transfer runs"
    upload.check()
    line = gw.stop()
    assert "dials ok 1 " in line, line  # the healthy upload


# -- 5. the TUN deleted under the gateway ------------------------------------------------------


def test_deleted_tun_stops_the_gateway_with_status_1(split: SplitTopology, tmp_path: Path) -> None:
    """Moving the TUN to another namespace keeps it working (the split topology does it);
    deleting it does not: ``tunlwip up`` exits 1 with one error line naming the device and
    the errno, and closes its upstream sockets (the server of a running upload sees its
    connection end, and got an intact prefix of the bytes)."""
    iface = split.topo.ifname("t")
    gw = launch_gateway(split.gw, iface, tmp_path / "gateway.log")  # not the fixture: exits 1
    gw.wait_serving()
    move_link(iface, split.gw, split.cli)
    setup_client_tun(split.cli, iface)
    payload = pattern(13, 64 * 1024 * 1024)
    received: list[int] = []

    def serve(conn: socket.socket) -> bytes:
        got = bytearray()
        try:
            while chunk := conn.recv(1 << 16):
                got += chunk
                received[:] = [len(got)]
        except ConnectionResetError:
            return b"reset:" + bytes(got)
        return b"eof:" + bytes(got)

    server = OneShotServer(listen(split.srv, socket.AF_INET, SOCK_PORT), serve)

    def send() -> None:
        sent = 0
        try:
            with connect(split.cli, socket.AF_INET, SRV_ADDR4, SOCK_PORT, timeout=5) as sock:
                sock.settimeout(5)
                while sent < len(payload):  # a little at a time: runs until the TUN goes
                    sock.sendall(payload[sent : sent + 16384])
                    sent += 16384
                    time.sleep(0.005)
        except OSError:
            pass  # the path went away with the TUN

    threading.Thread(target=send, daemon=True).start()
    wait_for(lambda: bool(received) and received[0] >= 1 << 20, "the upload to get going", 10)
    split.cli.ip("link", "del", iface)
    deleted = time.monotonic()
    try:
        code = gw.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 10 s after the TUN was deleted; {gw.tail()}") from None
    assert code == 1, gw.tail()
    outcome, _, got = server.result().partition(b":")
    assert outcome in (b"eof", b"reset") and time.monotonic() - deleted < 10
    assert len(got) >= 1 << 20 and got == payload[: len(got)], "bytes lost or corrupted"
    errors = [line for line in gw.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        f" ERROR tunlwip: packet device {iface} failed: read: File descriptor in bad state "
        "(EBADFD); stopping"), gw.tail()  # fmt: skip
    assert "Traceback" not in gw.log(), gw.tail()


# -- 6. SIGTERM with 1,000 live flows ---------------------------------------------------------

#: N connections to HOST:PORT (an echo server), each verified with one echoed line, then held
#: open; prints "ready". After a line on stdin, waits until every connection ended and prints
#: a JSON object: how many saw EOF, reset or nothing within WAIT seconds.
HOLD_SCRIPT = r"""
import asyncio, json, resource, sys, time

N, HOST, PORT, WAIT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (N + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    async def one(i):
        r, w = await asyncio.open_connection(HOST, PORT)
        line = f"flow {i}\n".encode()
        w.write(line)
        assert await r.readline() == line
        return r, w
    conns = []
    for start in range(0, N, 100):  # 100 handshakes at a time
        conns += await asyncio.gather(*(one(i) for i in range(start, min(N, start + 100))))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t0 = time.monotonic()
    async def end(r):
        try:
            await r.read()
            return "eof"
        except ConnectionResetError:
            return "reset"
    results = await asyncio.wait_for(asyncio.gather(*(end(r) for r, _ in conns)), WAIT)
    print(json.dumps({"eof": results.count("eof"), "reset": results.count("reset"),
                      "seconds": round(time.monotonic() - t0, 2)}), flush=True)

asyncio.run(main())
"""


def test_sigterm_with_1000_flows_stops_within_the_grace_period(
    split: SplitTopology, split_gateway: StartGateway
) -> None:
    """1,000 idle TCP flows and one busy upload, then SIGTERM: the upload finishes within the
    grace period (bytes verified), the gateway exits 0 right after it, every one of the 1,000
    clients sees its connection end (none hangs) and the server has none left open."""
    flows, grace = 1000, 4.0
    start_script_server(split.srv, "echo", ECHO_PORT)
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--grace", str(grace))
    holder = split.cli.popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(flows), SRV_ADDR4, str(ECHO_PORT),
         str(grace + 10)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().strip() == "ready", gw.tail()
    assert gw.status()["flows_live"] >= flows
    upload = healthy(split, seconds=grace / 2)
    time.sleep(0.3)
    holder.stdin.write("go\n")
    holder.stdin.flush()
    started = time.monotonic()
    line = gw.stop(timeout=grace + 5)  # SIGTERM, exit status 0
    elapsed = time.monotonic() - started
    assert grace - 0.5 <= elapsed <= grace + 3, f"stopped after {elapsed:.1f}s"
    assert "(grace period over, flows reset)" in line, line
    upload.check()
    ends = json.loads(holder.stdout.readline())
    assert ends["eof"] + ends["reset"] == flows, ends
    print(f"{flows} flows ended {ends}; gateway stopped after {elapsed:.1f}s")
    established = split.srv.run("ss", "-Htn", "state", "established", f"( sport = :{ECHO_PORT} )")
    assert established.stdout.strip() == "", established.stdout
    holder.wait(10)

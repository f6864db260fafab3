"""Long-lived connections through ``tunlwip up``: quiet flows live, dead ones end by keepalive.

Why: with no idle limit (the default) a quiet flow must live as it does on a direct route (an
idle SSH session, a websocket, a database pool), and a flow whose client or upstream is really
gone must still end, found by keepalive: the kernel's on the upstream socket, lwIP's toward the
client. Each test runs the real gateway with short keepalive timing (probe after 1 s quiet,
every 1 s, give up after 2 unanswered: a 3 s budget) in the split topology of
test_faults_netns.py, whose ``IDLE_TIMEOUT`` (3 s) stands for the old idle limit.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayproc import RunningGateway, StartGateway, pattern, wait_for
from netns import GW_VETH_ADDR4, SRV_ADDR4, SplitTopology
from transfers import OneShotServer, connect, listen

pytestmark = pytest.mark.netns

SOCK_PORT = 7100
KEEP_IDLE, KEEP_INTERVAL, KEEP_COUNT = 1, 1, 2
KEEPALIVE = ("--keepalive-idle", str(KEEP_IDLE), "--keepalive-interval", str(KEEP_INTERVAL),
             "--keepalive-count", str(KEEP_COUNT))  # fmt: skip
#: From an end's last answer until its flow is given up.
BUDGET = KEEP_IDLE + KEEP_INTERVAL * KEEP_COUNT
LWIP_TICK = 0.5  # lwIP checks keepalive on its slow timer: each step may be this late
SWEEP = 1.0  # the relay's sweep, which probes half-closed clients
SLACK = 3.0  # scheduling on a loaded 2-CPU machine
OLD_IDLE_LIMIT = 3.0  # test_faults_netns.IDLE_TIMEOUT: what an idle limit would have reset
#: A second client address on the TUN, removed to make its client vanish without a FIN.
VANISHING4 = "198.18.0.3"


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
    return f"{host}:{port}"


def status_flows(gw: RunningGateway) -> list[dict[str, Any]]:
    """The open flows ``tunlwip status --json`` lists."""
    flows: list[dict[str, Any]] = gw.status()["flows"]
    return flows


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(1 << 16, size - len(data)))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def exchange(sock: socket.socket, seed: int, size: int) -> None:
    """``size`` pattern bytes up to the echoing server and the same bytes back, byte-exact."""
    payload = pattern(seed, size)
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    assert recv_exactly(sock, size) == payload
    sender.join(10)


def echo_exactly(conn: socket.socket) -> bytes:
    """The server: echo everything until EOF ("eof") or a reset ("reset")."""
    try:
        while data := conn.recv(1 << 16):
            conn.sendall(data)
    except ConnectionResetError:
        return b"reset"
    return b"eof"


def upstream_keepalive_armed(split: SplitTopology) -> bool:
    """The gateway's upstream socket runs the kernel's keepalive timer (``ss -o``)."""
    out = split.gw.run("ss", "-tnoH", "state", "established", "dst", f"{SRV_ADDR4}:{SOCK_PORT}")
    return "keepalive" in out.stdout


def test_quiet_flow_outlives_the_old_idle_limit(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """No idle limit (the default), short keepalive: a flow quiet for more than twice the old
    limit, and for several keepalive budgets (so probes went both ways and were answered),
    still carries bytes both ways, byte-exact, and ends cleanly when the client closes."""
    flow_log = tmp_path / "flows.jsonl"
    gw = split_gateway(*KEEPALIVE, "--flow-log", str(flow_log))
    server = OneShotServer(listen(split.srv, socket.AF_INET, SOCK_PORT), echo_exactly)
    quiet = 2 * OLD_IDLE_LIMIT + 2 * BUDGET
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, SOCK_PORT) as sock:
        client = sock_name(sock)
        exchange(sock, 21, 256 * 1024)
        assert upstream_keepalive_armed(split), "the upstream socket has no keepalive"
        time.sleep(quiet)  # not a byte either way
        assert any(f["client"] == client for f in status_flows(gw)), gw.tail()
        exchange(sock, 22, 1024 * 1024)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b"", "the server's EOF"
    assert server.result() == b"eof"
    record = wait_record(flow_log, client, "the quiet flow's record")
    assert record["close_reason"] == "closed", record
    assert record["duration"] >= quiet
    gw.stop()


def test_vanished_upstream_resets_the_client_within_the_keepalive_budget(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """The upstream host goes silent (srv blackholes its route to the gateway: the gateway's
    probes arrive, no answer comes back, no RST, no ICMP): the kernel's keepalive gives up
    on the quiet flow (ETIMEDOUT) and the client gets RST within the budget."""
    flow_log = tmp_path / "flows.jsonl"
    gw = split_gateway(*KEEPALIVE, "--idle-timeout", "off", "--flow-log", str(flow_log))
    server = OneShotServer(listen(split.srv, socket.AF_INET, SOCK_PORT), echo_exactly)
    try:
        with connect(split.cli, socket.AF_INET, SRV_ADDR4, SOCK_PORT) as sock:
            client = sock_name(sock)
            exchange(sock, 23, 64 * 1024)
            time.sleep(BUDGET)  # quiet and alive: probes answered, nothing ends
            split.srv.ip("-4", "route", "add", "blackhole", f"{GW_VETH_ADDR4}/32")
            vanished = time.monotonic()
            sock.settimeout(BUDGET + 4 * SLACK)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
            elapsed = time.monotonic() - vanished
    finally:
        split.srv.ip("-4", "route", "del", "blackhole", f"{GW_VETH_ADDR4}/32", check=False)
    # Its last answered probe was at most one interval before the blackhole.
    assert KEEP_INTERVAL * (KEEP_COUNT - 1) <= elapsed <= BUDGET + SLACK, f"{elapsed:.1f}s"
    record = wait_record(flow_log, client, "the dead upstream's flow record")
    assert record["close_reason"] == "upstream timeout", record
    assert server.result() in (b"eof", b"reset")  # the server's socket is just closed later
    gw.stop()


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "after-server-eof"])
def test_vanished_client_frees_the_upstream_within_the_keepalive_budget(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path, half_closed: bool
) -> None:
    """A quiet client whose address disappears (lwIP's probes go nowhere, no FIN, no RST):
    lwIP gives up after its keepalive budget (on its 500 ms timer) and the gateway resets the
    upstream socket: the server sees ECONNRESET, the flow leaves ``tunlwip status``. Also
    after the server's EOF, with the client's side still open (FIN-WAIT-2, where lwIP does
    not probe: the relay's once-a-second sweep does)."""
    flow_log = tmp_path / "flows.jsonl"
    gw = split_gateway(*KEEPALIVE, "--flow-log", str(flow_log))
    split.cli.add_addrs(gw.iface, [f"{VANISHING4}/32"])
    ended: list[float] = []

    def serve(conn: socket.socket) -> bytes:
        conn.settimeout(BUDGET + 30)
        if half_closed:
            conn.sendall(b"bye")
            conn.shutdown(socket.SHUT_WR)
        result = echo_exactly(conn)
        ended.append(time.monotonic())
        return result

    server = OneShotServer(listen(split.srv, socket.AF_INET, SOCK_PORT), serve)
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, SOCK_PORT, bind=VANISHING4) as sock:
        client = sock_name(sock)
        if half_closed:
            assert recv_exactly(sock, 3) == b"bye" and sock.recv(1) == b""
        else:
            exchange(sock, 24, 64 * 1024)
        time.sleep(BUDGET)  # quiet and alive: lwIP's probes answered by the client's kernel
        assert any(f["client"] == client for f in status_flows(gw)), gw.tail()
        split.cli.ip("addr", "del", f"{VANISHING4}/32", "dev", gw.iface)  # gone, silently
        vanished = time.monotonic()
        assert server.result() == b"reset"
        elapsed = ended[0] - vanished
    lwip_budget = BUDGET + 2 * LWIP_TICK + (SWEEP if half_closed else 0)
    assert KEEP_INTERVAL * (KEEP_COUNT - 1) <= elapsed <= lwip_budget + SLACK, f"{elapsed:.1f}s"
    assert not any(f["client"] == client for f in status_flows(gw))
    record = wait_record(flow_log, client, "the vanished client's flow record")
    assert record["close_reason"] == "client timeout", record
    gw.stop()

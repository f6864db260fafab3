"""``tunlwip status`` against a gateway on a real TUN, with kernel clients and servers.

Why: the unit tests (tests/test_control.py, tests/test_flows.py) drive packets by hand; here a
real client resolves a name through the proxy, keeps a TCP connection and a UDP socket open
after exchanging bytes, and ``status --json`` must list both with exact byte counts and the
TCP one must carry the name the client resolved.

``tunlwip up --control-socket PATH --flow-log FILE`` runs in gw; ``tunlwip status`` asks it
from the test's own namespace (a unix socket is a file: namespaces do not matter)::

    [cli]                          [gw]                                [srv]
    CLIENT_SCRIPT                  tunlwip up --iface T                SERVER_SCRIPT: DNS on
    T: 198.18.0.2/32               DNS upstream udp://198.18.1.2:5353  5353 (www.flows.test ->
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- 198.18.1.2), TCP and UDP
                                                                       echo on 7300 / 7301
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayproc import StartGateway, wait_for
from netns import CLIENT_ADDR4, SRV_ADDR4, SplitTopology

pytestmark = pytest.mark.netns

NAME = "www.flows.test"
DNS_PORT, TCP_PORT, UDP_PORT = 5353, 7300, 7301
TCP_BYTES, UDP_BYTES = 10_000, 300

SERVER_SCRIPT = r"""
import socket, sys, threading
import dns.message, dns.rrset

name, address = sys.argv[1], sys.argv[2]
dns_port, tcp_port, udp_port = map(int, sys.argv[3:6])

def serve_dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", dns_port))
    while True:
        data, peer = s.recvfrom(65535)
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        if query.question[0].name.to_text() == name + ".":
            response.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", address))
        s.sendto(response.to_wire(), peer)

def serve_udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", udp_port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)

def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

for target in (serve_dns, serve_udp):
    threading.Thread(target=target, daemon=True).start()
listener = socket.create_server(("0.0.0.0", tcp_port))
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

CLIENT_SCRIPT = r"""
import socket, sys
import dns.message, dns.query

name, tcp_port, udp_port, tcp_bytes, udp_bytes = sys.argv[1], *map(int, sys.argv[2:6])
answer = dns.query.udp(dns.message.make_query(name, "A"), "198.18.0.1", timeout=5)
address = answer.answer[0][0].address
tcp = socket.create_connection((address, tcp_port), timeout=10)
tcp.sendall(b"t" * tcp_bytes)
got = 0
while got < tcp_bytes:
    got += len(tcp.recv(65536))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(5)
udp.connect((address, udp_port))
udp.send(b"u" * udp_bytes)
assert len(udp.recv(65535)) == udp_bytes
print("ready", address, tcp.getsockname()[1], udp.getsockname()[1], flush=True)
sys.stdin.read()  # keep both open until the test is done
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for the control socket (unix socket paths have 107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="tlw-st-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_line(proc: subprocess.Popen[str], what: str) -> str:
    """The next stdout line of ``proc`` (which must not have exited)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"{what} exited {proc.wait(5)}: {proc.stderr and proc.stderr.read()}")
    return line.strip()


def status(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunlwip", "status", "--control-socket", str(path),
                           *args], capture_output=True, text=True, timeout=30)  # fmt: skip


def test_status_lists_live_flows_with_bytes_and_name(
    split: SplitTopology, split_gateway: StartGateway, sock_dir: Path, tmp_path: Path
) -> None:
    path, flow_log = sock_dir / "gw.sock", tmp_path / "flows.jsonl"
    server = split.srv.popen(
        [sys.executable, "-c", SERVER_SCRIPT, NAME, SRV_ADDR4, str(DNS_PORT), str(TCP_PORT),
         str(UDP_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert read_line(server, "the servers") == "ready"
    gw = split_gateway("--control-socket", str(path), "--flow-log", str(flow_log),
                       "--dns-upstream", f"udp://{SRV_ADDR4}:{DNS_PORT}")  # fmt: skip
    assert (path.stat().st_mode & 0o777) == 0o600

    client = split.cli.popen(
        [sys.executable, "-c", CLIENT_SCRIPT, NAME, str(TCP_PORT), str(UDP_PORT),
         str(TCP_BYTES), str(UDP_BYTES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ready, address, tcp_port, udp_port = read_line(client, "the client").split()
    assert (ready, address) == ("ready", SRV_ADDR4)

    result = status(path, "--json")
    assert result.returncode == 0, f"{result.stderr}\n{gw.tail()}"
    doc = json.loads(result.stdout)
    flows = {(f["protocol"], f["client"]): f for f in doc["flows"]}
    tcp = flows[("tcp", f"{CLIENT_ADDR4}:{tcp_port}")]
    assert tcp["target"] == f"{SRV_ADDR4}:{TCP_PORT}" and tcp["name"] == NAME
    assert (tcp["bytes_up"], tcp["bytes_down"]) == (TCP_BYTES, TCP_BYTES)
    udp = flows[("udp", f"{CLIENT_ADDR4}:{udp_port}")]
    assert udp["target"] == f"{SRV_ADDR4}:{UDP_PORT}" and udp["name"] == NAME
    assert (udp["bytes_up"], udp["bytes_down"]) == (UDP_BYTES, UDP_BYTES)
    assert doc["iface"] == gw.iface and doc["totals"]["dns"]["forwarded"] >= 1

    table = status(path)
    assert table.returncode == 0, table.stderr
    assert NAME in table.stdout and f"{SRV_ADDR4}:{TCP_PORT}" in table.stdout

    assert client.stdin is not None
    client.stdin.close()  # the client closes its sockets and exits
    client.wait(10)

    def tcp_logged() -> bool:
        lines = flow_log.read_text().splitlines() if flow_log.exists() else []
        return any(json.loads(line)["protocol"] == "tcp" for line in lines)

    wait_for(tcp_logged, "the TCP flow's record in the flow log", timeout=10)
    [record] = [r for r in map(json.loads, flow_log.read_text().splitlines())
                if r["protocol"] == "tcp"]  # fmt: skip
    assert (record["name"], record["close_reason"]) == (NAME, "closed")
    assert (record["bytes_up"], record["bytes_down"]) == (TCP_BYTES, TCP_BYTES)
    assert record["connect_latency"] is not None

    gw.stop()
    assert not path.exists()  # removed on exit
    gone = status(path)
    assert gone.returncode == 1 and f"no gateway on {path}" in gone.stderr

"""``tunlwip up --config FILE`` and SIGHUP reload, with real clients and servers.

Why: the unit tests (tests/test_config_*.py) check loading and ``reload`` on a memory device; only
a running process shows what an operator gets: that editing the file and sending SIGHUP changes
the QUIC policy and the DNS answers at once, that a TCP transfer in progress does not notice,
that a setting needing a restart is named in the log, and that a broken file is logged and the
old policy kept while the gateway runs on.

Split topology (docs/architecture.md#test-topology, as in test_udp_icmp_netns.py)::

    [cli]                          [gw]                                [srv]
    sockets, dig                   tunlwip up --config FILE            DNS (every A: WWW4),
    T: 198.18.0.2/32                                                   UDP echo, TCP stream
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- veth 198.18.1.2
"""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gatewayproc import RunningGateway, StartGateway, wait_for
from netns import GATEWAY_ADDR4, SRV_ADDR4, Namespace, SplitTopology

pytestmark = pytest.mark.netns

OLD_QUIC, NEW_QUIC = 8443, 7443  # quic.ports before and after the reload
STREAM_PORT = 7900
STREAM_SIZE, STREAM_SECONDS = 4 << 20, 8.0  # a transfer that outlives the reload checks
WWW4 = "198.18.5.5"

#: Answers every A query with WWW4 (TTL 60), on ADDR:53 over UDP.
DNS_SERVER_SCRIPT = r"""
import socket, sys
import dns.message, dns.rdatatype, dns.rrset

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    data, peer = s.recvfrom(4096)
    try:
        query = dns.message.from_wire(data)
    except Exception:
        continue
    response = dns.message.make_response(query)
    for q in query.question:
        if q.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", sys.argv[2]))
    s.sendto(response.to_wire(), peer)
"""

#: UDP echo on every port in argv[2:], bound to argv[1].
ECHO_SCRIPT = r"""
import selectors, socket, sys

sel = selectors.DefaultSelector()
for port in map(int, sys.argv[2:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], port))
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(65535)
        key.fileobj.sendto(data, peer)
"""

#: On each connection to ADDR:PORT, send SIZE pattern bytes in 40 slices over SECONDS.
STREAM_SERVER_SCRIPT = r"""
import hashlib, socket, sys, threading, time

addr, port, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = hashlib.shake_256(b"reload").digest(size)

def serve(conn):
    with conn:
        step = -(-size // 40)
        for i in range(0, size, step):
            conn.sendall(data[i:i + step])
            time.sleep(seconds / 40)

listener = socket.create_server((addr, port))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: Connect to ADDR:PORT, print "connected", read to EOF, print "<bytes> <sha256>".
STREAM_CLIENT_SCRIPT = r"""
import hashlib, socket, sys

s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
print("connected", flush=True)
digest, count = hashlib.sha256(), 0
while chunk := s.recv(65536):
    digest.update(chunk)
    count += len(chunk)
print(count, digest.hexdigest(), flush=True)
"""


def probe(ns: Namespace, port: int, wait: float = 1.0) -> str:
    """A connected UDP socket to srv:port: "echo", "refused" (ICMP port unreachable: the QUIC
    policy) or "timeout" (three tries)."""
    data = f"probe {port}".encode()
    with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        sock.connect((SRV_ADDR4, port))
        for _ in range(3):
            sock.send(data)
            try:
                return "echo" if sock.recv(65535) == data else "wrong echo"
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                continue
    return "timeout"


def dig_status(ns: Namespace, name: str) -> str | None:
    out = ns.run("dig", f"@{GATEWAY_ADDR4}", "+tries=1", "+time=2", name, "A", check=False,
                 timeout=15).stdout  # fmt: skip
    found = re.findall(r"status: ([A-Z]+)", out)
    return found[-1] if found else None


def config_text(quic_port: int, extra: str = "") -> str:
    return (f'[quic]\nports = [{quic_port}]\n\n[dns]\nupstreams = ["udp://{SRV_ADDR4}:53"]\n'
            f'block_lists = ["block.list"]\n{extra}')  # fmt: skip


def hup_and_wait(gw: RunningGateway, marker: str) -> str:
    """SIGHUP, then wait for one more log line containing ``marker``; returns it."""
    before = gw.log().count(marker)
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gw.log().count(marker) > before, f"{marker!r} after SIGHUP; {gw.tail()}", 5)
    return [line for line in gw.log().splitlines() if marker in line][-1]


@pytest.fixture
def servers(split: SplitTopology, require_tool: Callable[[str], str]) -> None:
    """DNS, UDP echo and the TCP stream server in srv, returned once they listen."""
    require_tool("dig")
    srv = split.srv
    srv.popen([sys.executable, "-c", DNS_SERVER_SCRIPT, SRV_ADDR4, WWW4])
    srv.popen([sys.executable, "-c", ECHO_SCRIPT, SRV_ADDR4, str(OLD_QUIC), str(NEW_QUIC)])
    srv.popen([sys.executable, "-c", STREAM_SERVER_SCRIPT, SRV_ADDR4, str(STREAM_PORT),
               str(STREAM_SIZE), str(STREAM_SECONDS)])  # fmt: skip
    srv.wait_port(53, SRV_ADDR4, proto="udp")
    for port in (OLD_QUIC, NEW_QUIC):
        srv.wait_port(port, SRV_ADDR4, proto="udp")
    srv.wait_port(STREAM_PORT, SRV_ADDR4)


def test_sighup_applies_the_edited_file_without_breaking_a_transfer(
    split: SplitTopology, split_gateway: StartGateway, servers: None, tmp_path: Path
) -> None:
    """Edit the file (QUIC port, block list, MTU) and SIGHUP during a TCP transfer: the policy
    changes at once, the MTU change is reported as needing a restart, the transfer completes
    intact. Then a broken file: logged with its key, the old policy stays."""
    conf = tmp_path / "conf"
    conf.mkdir()
    block = conf / "block.list"
    block.write_text("ads.test\n")
    path = conf / "gw.toml"
    path.write_text(config_text(OLD_QUIC))
    gw = split_gateway("--config", str(path))
    cli = split.cli
    assert f"config {path}" in gw.log(), gw.tail()
    assert probe(cli, OLD_QUIC) == "refused", gw.tail()
    assert probe(cli, NEW_QUIC) == "echo", gw.tail()
    assert dig_status(cli, "ads.test") == "NXDOMAIN", gw.tail()
    assert dig_status(cli, "later.test") == "NOERROR", gw.tail()

    transfer: subprocess.Popen[str] = cli.popen(
        [sys.executable, "-c", STREAM_CLIENT_SCRIPT, SRV_ADDR4, str(STREAM_PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert transfer.stdout is not None
    assert transfer.stdout.readline().strip() == "connected", gw.tail()

    block.write_text("ads.test\nlater.test\n")
    path.write_text(config_text(NEW_QUIC, "\n[device]\nmtu = 1400\n"))
    line = hup_and_wait(gw, "reloaded ")
    assert f"reloaded {path}: 2 DNS rules" in line and f"quic reject {NEW_QUIC}" in line, line
    assert "reload: these settings need a restart: device.mtu" in gw.log(), gw.tail()
    assert probe(cli, NEW_QUIC) == "refused", gw.tail()
    assert probe(cli, OLD_QUIC) == "echo", gw.tail()
    assert dig_status(cli, "later.test") == "NXDOMAIN", gw.tail()
    assert transfer.poll() is None, "the transfer was still running during the checks"

    out, _ = transfer.communicate(timeout=STREAM_SECONDS + 20)
    expected = hashlib.sha256(hashlib.shake_256(b"reload").digest(STREAM_SIZE)).hexdigest()
    assert transfer.returncode == 0 and out.split() == [str(STREAM_SIZE), expected], out

    path.write_text('[quic]\nports = "many"\n')
    line = hup_and_wait(gw, "not reloaded")
    assert 'keeping the old one: quic.ports: expected a list, got "many"' in line, line
    assert gw.proc.poll() is None, gw.tail()
    assert probe(cli, NEW_QUIC) == "refused", gw.tail()
    assert dig_status(cli, "later.test") == "NXDOMAIN", gw.tail()
    assert dig_status(cli, "www.test") == "NOERROR", gw.tail()
    print(gw.stop())


def test_up_with_a_broken_file_exits_78_without_a_tun(split: SplitTopology, tmp_path: Path) -> None:
    """A config error stops `up` before it creates the TUN (nothing is left in gw)."""
    path = tmp_path / "bad.toml"
    path.write_text('[device]\nname = "tlwbadcfg0"\n[tcp]\nidel_timeout = 3\n')
    result = split.gw.run(sys.executable, "-m", "tunlwip", "up", "--config", str(path),
                          check=False, timeout=60)  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert "unknown key tcp.idel_timeout (did you mean idle_timeout?)" in result.stderr
    assert "tlwbadcfg0" not in split.gw.ip("link", "show").stdout

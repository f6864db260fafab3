"""``sniff = true`` routes through ``tunlwip up``: the name in the client's first bytes (HTTP
Host, TLS SNI) picks the route, a client that sends nothing first is decided after
``egress.sniff_timeout``, a proxy that is down resets the client with a counted reason.

    [cli] curl, Python client -- TUN --> [gw] tunlwip up -- veth --> [srv] http.server :80,
                                                                        openssl s_server :443,
                                                                        greeting echo :2525,
                                                                        danted :1080

Proof of the way taken: http.server logs each request's source address: danted's (the
server's own address, 198.18.1.2) for the proxied route, the gateway's veth address
(198.18.1.1) for the direct one; danted logs what it carried; the flow log records route and
name. Every process is started by PID and stopped by PID (groups for danted's workers).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxyservers import DANTED

from gatewayproc import RunningGateway, StartGateway, wait_for
from netns import GW_VETH_ADDR4, SRV_ADDR4, Namespace, SplitTopology
from transfers import connect

pytestmark = pytest.mark.netns

SOCKS_PORT, DOWN_PORT, GREETING_PORT = 1080, 1081, 2525
SNIFF_TIMEOUT = 0.5
SIZE = 512 * 1024
GREETING = b"220 the server speaks first\r\n"

CONFIG = f"""
[egress]
sniff_timeout = {SNIFF_TIMEOUT}

[[route]]
name = "corp"
domains = ["corp.example"]
protocols = ["tcp"]
sniff = true
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}"

[[route]]
name = "down"
domains = ["down.example"]
protocols = ["tcp"]
sniff = true
via = "socks5://{SRV_ADDR4}:{DOWN_PORT}"
"""

GREETING_SERVER = f"""
import socket, threading
listener = socket.create_server(("{SRV_ADDR4}", {GREETING_PORT}))
def serve(conn):
    with conn:
        conn.sendall({GREETING!r})
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


@pytest.fixture(autouse=True)
def _programs(require_tool: Callable[[str], str]) -> None:
    for tool in ("curl", "danted", "openssl"):
        require_tool(tool)


@contextlib.contextmanager
def danted_in(ns: Namespace, workdir: Path) -> Iterator[Path]:
    """danted in ``ns`` on SRV_ADDR4:SOCKS_PORT for the test networks; yields its log. Its own
    process group (it forks workers), stopped by the leader's PID."""
    config = workdir / "danted.conf"
    config.write_text(
        "logoutput: stderr\n"
        f"internal: {SRV_ADDR4} port = {SOCKS_PORT}\n"
        f"external: {SRV_ADDR4}\n"
        "clientmethod: none\nsocksmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        "client pass {\n from: 198.18.0.0/15 to: 0.0.0.0/0\n log: connect\n}\n"
        "socks pass {\n from: 198.18.0.0/15 to: 0.0.0.0/0\n command: connect\n log: connect\n}\n"
    )
    log = workdir / "danted.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, DANTED, "-f", str(config),
                                 "-N", "1", "-p", str(workdir / "danted.pid")],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    try:
        ns.wait_port(SOCKS_PORT)
        yield log
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture
def servers(split: SplitTopology, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """http.server on :80 (its log), openssl s_server on :443, the greeting echo, danted."""
    root = tmp_path / "www"
    root.mkdir()
    body = os.urandom(SIZE)
    (root / "file.bin").write_bytes(body)
    http_log = tmp_path / "http.log"
    with http_log.open("wb") as out:
        split.srv.popen([sys.executable, "-u", "-m", "http.server", "--bind", SRV_ADDR4,
                         "--directory", str(root), "80"], stdout=out,
                        stderr=subprocess.STDOUT)  # fmt: skip
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=corp.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    split.srv.popen(["openssl", "s_server", "-accept", f"{SRV_ADDR4}:443", "-cert", str(cert),
                     "-key", str(key), "-www", "-quiet"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)  # fmt: skip
    split.srv.popen([sys.executable, "-c", GREETING_SERVER], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)  # fmt: skip
    for port in (80, 443, GREETING_PORT):
        split.srv.wait_port(port)
    with danted_in(split.srv, tmp_path) as danted_log:
        yield {"digest": hashlib.sha256(body).hexdigest(), "http_log": http_log,
               "danted_log": danted_log}  # fmt: skip


def curl(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run("curl", "-sS", "--max-time", "20", *args, check=False, timeout=40)


def flow_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def is_flow(name: str, port: str, record: dict[str, Any]) -> bool:
    return bool(record["name"] == name and record["target"].rpartition(":")[2] == port)


def wait_record(path: Path, where: Callable[[dict[str, Any]], bool], gw: RunningGateway,
                what: str) -> dict[str, Any]:  # fmt: skip
    wait_for(lambda: any(where(r) for r in flow_records(path)), what, 10)
    return next(r for r in flow_records(path) if where(r))


def test_sniffed_names_pick_routes(split: SplitTopology, split_gateway: StartGateway,
                                   servers: dict[str, Any], tmp_path: Path) -> None:  # fmt: skip
    """HTTP Host corp.example goes through danted, another Host directly, the same bytes
    either way; a TLS ClientHello's SNI picks the proxy too; the flow log says which route and
    name each flow had."""
    config = tmp_path / "routes.toml"
    config.write_text(CONFIG)
    flows = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(flows))
    url = f"http://{SRV_ADDR4}/file.bin"
    for host in ("corp.example", "other.example"):
        out = tmp_path / f"{host}.out"
        result = curl(split.cli, "--fail", "-H", f"Host: {host}", "-o", str(out), url)
        assert result.returncode == 0, f"{host}: {result.stderr}\n{gw.tail()}"
        assert hashlib.sha256(out.read_bytes()).hexdigest() == servers["digest"], host
    requests = [line for line in servers["http_log"].read_text().splitlines() if "GET" in line]
    assert len(requests) == 2, requests
    assert requests[0].startswith(f"{SRV_ADDR4} "), f"corp.example came from danted: {requests}"
    assert requests[1].startswith(f"{GW_VETH_ADDR4} "), f"other.example came directly: {requests}"
    tls = curl(split.cli, "-k", "--resolve", f"corp.example:443:{SRV_ADDR4}",
               "https://corp.example/")  # fmt: skip
    assert tls.returncode == 0 and "s_server" in tls.stdout, f"{tls.stderr}\n{gw.tail()}"
    danted = servers["danted_log"].read_text()
    assert danted.count(f"{SRV_ADDR4}.80") >= 1 and f"{SRV_ADDR4}.443" in danted, danted
    for name, port, route in (("corp.example", "80", "corp"), ("other.example", "80", "default"),
                              ("corp.example", "443", "corp")):  # fmt: skip
        record = wait_record(flows, functools.partial(is_flow, name, port), gw,
                             f"the record of {name}:{port}")  # fmt: skip
        assert record["route"] == route, record
        assert record["close_reason"] == "closed", record
        if port == "80":
            assert record["bytes_down"] > SIZE and record["bytes_up"] > 50, record
    totals = gw.status()["totals"]["routes"]
    assert totals["flows_tcp"]["corp"] == 2 and totals["flows_tcp"]["default"] >= 1, totals


def test_a_silent_client_is_decided_after_the_sniff_timeout(
    split: SplitTopology, split_gateway: StartGateway, servers: dict[str, Any], tmp_path: Path
) -> None:
    """A server that speaks first: its greeting arrives once the sniff gave up (about
    ``sniff_timeout`` late, never hanging), then the connection works both ways, directly."""
    config = tmp_path / "routes.toml"
    config.write_text(CONFIG)
    flows = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(flows))
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, GREETING_PORT) as sock:
        sock.settimeout(10)
        started = time.monotonic()
        greeting = b""
        while len(greeting) < len(GREETING):
            greeting += sock.recv(100)
        waited = time.monotonic() - started
        assert greeting == GREETING
        assert SNIFF_TIMEOUT * 0.8 <= waited < SNIFF_TIMEOUT + 5, waited
        payload = os.urandom(200_000)
        sock.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            echoed += sock.recv(65536)
        assert echoed == payload
    record = wait_record(flows, lambda r: r["target"].endswith(f":{GREETING_PORT}"), gw,
                         "the greeting flow's record")  # fmt: skip
    assert record["route"] == "default" and record["name"] is None, record
    assert record["bytes_up"] == len(payload) and record["bytes_down"] == len(GREETING) + len(
        payload), record  # fmt: skip


def test_a_proxy_that_is_down_resets_the_client_and_is_counted(
    split: SplitTopology, split_gateway: StartGateway, servers: dict[str, Any], tmp_path: Path
) -> None:
    """Host down.example routes to a SOCKS5 port nothing listens on: curl sees the connection
    reset at once (not a hang), the record says why, the route counts a proxy failure."""
    config = tmp_path / "routes.toml"
    config.write_text(CONFIG)
    flows = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(flows))
    started = time.monotonic()
    result = curl(split.cli, "-H", "Host: down.example", f"http://{SRV_ADDR4}/file.bin")
    assert result.returncode in (52, 56), result  # empty reply / connection reset
    assert time.monotonic() - started < 5
    record = wait_record(flows, lambda r: r["name"] == "down.example", gw, "the failed flow")
    assert record["route"] == "down" and record["close_reason"] == "proxy: refused", record
    assert gw.status()["totals"]["routes"]["proxy_failures"]["down"] == 1

"""5,000 concurrent TCP flows through ``tunlwip up`` started with a soft open-files limit of 1024.

Why: every flow holds an upstream socket, so a gateway left at the usual soft limit (1024)
refuses flows long before ``tcp.max_connections``. ``up`` must raise its soft limit to the hard
one at start (here ``prlimit --nofile=1024:200000``, or the test process's own hard limit if
lower), say so in its log, and then hold 5,000 flows at once, each still carrying bytes both
ways; ``status`` must count all of them.

Split topology (docs/architecture.md#test-topology)::

    [cli]                          [gw]                                [srv]
    CLIENT_SCRIPT: 5,000 sockets   prlimit --nofile=1024:200000        SERVER_SCRIPT: accepts
    (at most 200 connects in        tunlwip up --iface T               and holds every
    flight), echo checked on a     upstream sockets -- veth --------- connection, echoes
    sample, then held              198.18.1.1                          198.18.1.2:7400

The client and the server run as their own processes under ``prlimit`` too, so the test
process itself needs no more descriptors than usual.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gatewayproc import StartGateway, wait_for
from netns import SRV_ADDR4, SplitTopology

pytestmark = pytest.mark.netns

FLOWS = 5_000
PORT = 7400
#: What each helper process may open: the flows plus room for the interpreter's own.
HELPER_NOFILE = "--nofile=16384:16384"
#: The gateway's hard limit: 200000, or less where this process may not go that high (without
#: CAP_SYS_RESOURCE a hard limit can only be lowered, e.g. in a container).
GATEWAY_HARD = min(200_000, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
GATEWAY_NOFILE = f"--nofile=1024:{GATEWAY_HARD}"
#: What the default settings may need: tcp.max_connections + udp.max_sessions + the margin.
DEFAULTS_NEED = 65536 + 4096 + 256

SERVER_SCRIPT = r"""
import selectors, socket, sys

sel = selectors.DefaultSelector()
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=4096)
listener.setblocking(False)
sel.register(listener, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        sock = key.fileobj
        if sock is listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
            continue
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if data:
            sock.setblocking(True)  # a sample's few KiB: the send buffer takes them at once
            sock.sendall(data)
            sock.setblocking(False)
        else:
            sel.unregister(sock)
            sock.close()
"""

CLIENT_SCRIPT = r"""
import hashlib, json, selectors, socket, sys, time

host, port, count, sample_every, in_flight, seconds = sys.argv[1], *map(int, sys.argv[2:7])
deadline = time.monotonic() + seconds
sel = selectors.DefaultSelector()
held, failed, started = [], 0, 0
while (started < count or sel.get_map()) and time.monotonic() < deadline:
    while started < count and len(sel.get_map()) < in_flight:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((host, port))
        sel.register(sock, selectors.EVENT_WRITE)
        started += 1
    for key, _ in sel.select(timeout=1.0):
        sock = key.fileobj
        sel.unregister(sock)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            failed += 1
            sock.close()
        else:
            held.append(sock)
connect_seconds = seconds - (deadline - time.monotonic())
sampled = echoed = 0
for i in range(0, len(held), sample_every):
    sock, payload = held[i], hashlib.shake_256(i.to_bytes(4, "big")).digest(3000)
    sampled += 1
    try:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload) and (data := sock.recv(65536)):
            got += data
        echoed += got == payload
    except OSError:
        pass
print(json.dumps({"held": len(held), "failed": failed, "unfinished": count - len(held) - failed,
                  "sampled": sampled, "echoed": echoed,
                  "connect_seconds": round(connect_seconds, 1)}), flush=True)
sys.stdin.readline()  # hold every connection until the test is done counting
for sock in held:
    sock.close()
"""


def status(path: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "tunlwip", "status", "--control-socket", str(path), "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_5000_flows_under_a_1024_soft_limit(
    split: SplitTopology, split_gateway: StartGateway, require_tool: Any
) -> None:
    prlimit = require_tool("prlimit")
    server = split.srv.popen([prlimit, HELPER_NOFILE, sys.executable, "-c", SERVER_SCRIPT,
                              str(PORT)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    split.srv.wait_port(PORT)
    with tempfile.TemporaryDirectory(prefix="tunlwip-ctl-") as run_dir:
        control = Path(run_dir) / "gw.sock"
        gw = split_gateway("--control-socket", str(control), "--log-level", "info",
                           wrapper=[prlimit, GATEWAY_NOFILE])  # fmt: skip
        log = gw.log()
        assert f"open files: limit {GATEWAY_HARD} (hard {GATEWAY_HARD})" in log, gw.tail()
        # warned once, at start, exactly when the limit is below what the defaults allow
        warnings = log.count("open files: the limit")
        assert warnings == (1 if GATEWAY_HARD < DEFAULTS_NEED else 0), gw.tail()

        client = split.cli.popen(
            [prlimit, HELPER_NOFILE, sys.executable, "-c", CLIENT_SCRIPT, SRV_ADDR4, str(PORT),
             str(FLOWS), "50", "200", "150"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None and client.stdin is not None
        report = json.loads(client.stdout.readline() or "{}")
        assert report.get("held") == FLOWS, f"{report}; {gw.tail()}"
        assert report["sampled"] == FLOWS // 50 and report["echoed"] == report["sampled"], report

        def all_counted() -> bool:
            return bool(status(control)["totals"]["flows"]["live_tcp"] == FLOWS)

        wait_for(all_counted, f"status to count {FLOWS} open TCP flows", timeout=30)
        doc = status(control)
        assert doc["flows_live"] == FLOWS and doc["totals"]["refused"]["file_descriptors"] == 0
        assert doc["process"]["open_files"] > FLOWS
        assert doc["process"]["open_files_limit"] == GATEWAY_HARD
        process = doc["process"]
        print(f"{FLOWS} flows held (connected in {report['connect_seconds']} s), "
              f"{report['echoed']} echoes checked, gateway open files "
              f"{process['open_files']}, rss {process['rss_bytes'] >> 20} MiB")  # fmt: skip

        client.stdin.write("done\n")
        client.stdin.close()
        assert client.wait(timeout=60) == 0
        wait_for(lambda: status(control)["totals"]["flows"]["live_tcp"] == 0,
                 "the flows to close", timeout=60)  # fmt: skip

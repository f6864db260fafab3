"""``tunlwip up --flow-log FILE`` as root: the records of flows reset when the grace period ends
are written before the gateway exits, and a symbolic link at the path is refused at start.

Split topology (tests/integration/test_gateway_netns.py): clients in cli, servers in srv.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from gatewayproc import StartGateway, launch_gateway
from netns import SRV_ADDR4, SplitTopology
from transfers import connect, start_script_server

pytestmark = pytest.mark.netns

ECHO_PORT = 7000
FLOWS, GRACE = 20, 1.0


def test_flows_reset_at_the_end_of_the_grace_period_are_in_the_flow_log(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """20 idle TCP flows outlive a 1 s grace period: the gateway resets them, and each one's
    record (client port, bytes, close reason "stopped") is in the flow log when it has exited."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    path = tmp_path / "flows.jsonl"
    gw = split_gateway("--grace", str(GRACE), "--flow-log", str(path))
    clients = []
    try:
        for _ in range(FLOWS):
            sock = connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT)
            clients.append(sock)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"  # established end to end, counted both ways
        line = gw.stop(timeout=GRACE + 10)
        assert "(grace period over, flows reset)" in line, line
        ports = {sock.getsockname()[1] for sock in clients}
        records = [json.loads(text) for text in path.read_text().splitlines()]
        ours = [r for r in records if r["client"].rpartition(":")[2] in map(str, ports)]
        assert len(ours) == FLOWS, (records, gw.tail())
        for record in ours:
            assert record["target"] == f"{SRV_ADDR4}:{ECHO_PORT}", record
            assert (record["bytes_up"], record["bytes_down"]) == (4, 4), record
            assert record["close_reason"] == "stopped", record
    finally:
        for sock in clients:
            sock.close()


def test_a_symlinked_flow_log_is_refused_at_start(split: SplitTopology, tmp_path: Path) -> None:
    """One error line and exit status 1, no traceback; the link's target is left alone."""
    target = tmp_path / "precious"
    target.write_text("keep\n")
    link = tmp_path / "flows.jsonl"
    link.symlink_to(target)
    iface = split.topo.ifname("t")
    gw = launch_gateway(split.gw, iface, tmp_path / "gateway.log", "--flow-log", str(link))
    assert gw.proc.wait(timeout=20) == 1, gw.tail()
    gw.returncode = 1
    assert "symbolic link" in gw.log() and "Traceback" not in gw.log(), gw.tail()
    assert target.read_text() == "keep\n"

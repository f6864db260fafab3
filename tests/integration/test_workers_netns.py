"""``tunlwip up --workers 2``: a supervisor and two workers on one multi-queue TUN, with kernel
clients and servers in namespaces.

Why: what the workers promise only shows with the kernel spreading real flows over the queues:
both workers serve connections, ``status`` and the metrics are the sums of what the workers
say, a SIGHUP reaches both, a worker killed with SIGKILL is started again on its queue while a
transfer on the other worker completes byte-exact, and a stop leaves no process and no TUN.

    [cli]                        [gw]                                  [srv]
    kernel clients               supervisor --- worker 0 (queue 0)     echo and digest servers
    T (2 queues) ===== fds =====>           \\-- worker 1 (queue 1)
                                 sockets -- veth 198.18.1.1 --------- 198.18.1.2
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayproc import RunningGateway, StartGateway, launch_gateway, wait_for
from netns import SRV_ADDR4, SplitTopology
from transfers import ParallelUpload, connect, recv_all, start_script_server

pytestmark = pytest.mark.netns

ECHO_PORT, DIGEST_PORT, METRICS_PORT = 7400, 7401, 9477
SCRAPE = "import sys, urllib.request; print(urllib.request.urlopen(" \
    "f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=10).read().decode())"  # fmt: skip
CONNECTIONS = 32


def echo_once(split: SplitTopology, payload: bytes) -> None:
    with connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == payload


def ask(path: str) -> dict[str, Any]:
    """One worker's own status (its control socket, as the supervisor lists it)."""
    result = subprocess.run([sys.executable, "-m", "tunlwip", "status", "--control-socket",
                             path, "--json"], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def lost_flow_answer(sock: socket.socket) -> bytes | None:
    """What a connection whose worker died answers to a request: None for a reset or EOF."""
    try:
        sock.sendall(b"lost")
        answer = sock.recv(100)
    except OSError:
        return None
    return answer or None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_one_worker_during_upload(
    gw: RunningGateway, split: SplitTopology, idle: list[socket.socket]
) -> tuple[int, int, list[int]]:
    """SIGKILL the worker that does not carry a long upload while the upload runs; require
    the crash logged, the worker back, and the upload complete byte-exact. Returns (the
    victim, the busy worker, the worker of each ``idle`` connection)."""
    by_port = {f["client"].rsplit(":", 1)[1]: f["worker"] for f in gw.status()["flows"]}
    on_worker = [by_port[str(sock.getsockname()[1])] for sock in idle]
    assert set(on_worker) == {0, 1}, on_worker
    upload = ParallelUpload(split.cli, socket.AF_INET, SRV_ADDR4, DIGEST_PORT,
                            size=8 << 20, seconds=10.0)  # fmt: skip

    def upload_worker() -> int | None:
        flows = gw.status()["flows"]
        found = [f["worker"] for f in flows if f["target"].endswith(f":{DIGEST_PORT}")]
        return found[0] if found else None

    wait_for(lambda: upload_worker() is not None, "the upload's flow")
    busy = upload_worker()
    assert busy is not None
    victim = 1 - busy
    victim_pid = gw.status()["workers"][victim]["pid"]
    os.kill(victim_pid, signal.SIGKILL)
    assert upload.running(), "the upload ended before the kill: make it longer"
    wait_for(lambda: f"worker {victim} (pid {victim_pid}) was killed by SIGKILL" in gw.log(),
             "the crash to be logged")  # fmt: skip
    wait_for(lambda: gw.status()["workers"][victim]["state"] == "running", "the restart", 60)
    upload.check()
    return victim, busy, on_worker


def test_two_workers_share_flows_merge_reload_restart_and_stop(
    split: SplitTopology, split_gateway: StartGateway
) -> None:
    start_script_server(split.srv, "echo", ECHO_PORT)
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--workers", "2")
    for n in range(CONNECTIONS):  # distinct source ports: the kernel spreads them by hash
        echo_once(split, b"x%d" % n)

    doc = gw.status()
    assert doc["supervisor"]["workers"] == 2
    assert doc["supervisor"]["workers_running"] == 2
    workers = doc["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    assert all(w["state"] == "running" and w["flows_tcp"] > 0 for w in workers), workers
    own = [ask(w["control_socket"]) for w in workers]
    for key in ("tcp", "udp"):
        assert doc["totals"]["flows"][key] == sum(d["totals"]["flows"][key] for d in own)
    assert doc["totals"]["flows"]["tcp"] >= CONNECTIONS
    assert doc["totals"]["dials_ok"] == sum(d["totals"]["dials_ok"] for d in own)
    assert doc["totals"]["stack"]["counters"]["listeners"] == sum(
        d["totals"]["stack"]["counters"]["listeners"] for d in own
    )
    metrics = subprocess.run([sys.executable, "-m", "tunlwip", "status", "--iface", gw.iface,
                              "--format", "prometheus"], capture_output=True, text=True,
                             timeout=30).stdout  # fmt: skip
    assert "tunlwip_workers 2.0" in metrics
    flows_total = doc["totals"]["flows"]["tcp"]
    assert f'tunlwip_flows_total{{protocol="tcp"}} {float(flows_total)}' in metrics
    table = subprocess.run([sys.executable, "-m", "tunlwip", "status", "--iface", gw.iface],
                           capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    assert "workers:   2 of 2 running" in table

    # SIGHUP: checked by the supervisor, then reloaded by each worker.
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: all(f"[worker {i}] reloaded" in gw.log() for i in (0, 1)),
             "both workers to reload")  # fmt: skip

    # Idle connections on both workers, a long upload on one; the other is killed and comes
    # back on its queue. Its flows are lost (a reset on the next send), the others' go on.
    with contextlib.ExitStack() as held:
        idle = [held.enter_context(connect(split.cli, socket.AF_INET, SRV_ADDR4, ECHO_PORT))
                for _ in range(8)]  # fmt: skip
        victim, busy, on_worker = kill_one_worker_during_upload(gw, split, idle)
        for sock, worker in zip(idle, on_worker, strict=True):
            if worker == busy:  # idle through the restart, and still served
                sock.sendall(b"still here")
                assert sock.recv(100) == b"still here"
            else:  # reset by the restarted worker: the error or an EOF, never an answer
                assert lost_flow_answer(sock) is None
    after = gw.status()
    assert after["workers"][victim]["restarts"] == 1
    assert after["workers"][busy]["restarts"] == 0
    assert after["supervisor"]["worker_restarts"] == 1
    assert after["supervisor"]["flows_lost"] >= on_worker.count(victim)
    assert after["workers"][victim]["flows_lost"] == after["supervisor"]["flows_lost"]
    assert after["workers"][victim]["pid"] not in (None, workers[victim]["pid"])
    assert after["totals"]["flows"]["tcp"] >= flows_total  # the dead worker's counts kept
    for n in range(CONNECTIONS // 2):  # both workers serve again
        echo_once(split, b"y%d" % n)
    assert all(w["flows_tcp"] > 0 for w in gw.status()["workers"])

    pids = [w["pid"] for w in gw.status()["workers"]]
    stopped = gw.stop()
    assert "stopped" in stopped
    assert not any(alive(pid) for pid in pids)
    link = split.cli.ip("link", "show", "dev", gw.iface, check=False)
    assert link.returncode != 0, link.stdout


def test_workers_refuse_a_single_queue_tun(split: SplitTopology, tmp_path: Path) -> None:
    """An existing persistent TUN made without multi_queue: one clear line, exit status 1."""
    iface = split.topo.ifname("t")
    split.gw.ip("tuntap", "add", "dev", iface, "mode", "tun")
    gw = launch_gateway(split.gw, iface, tmp_path / "gw.log", "--workers", "2")
    assert gw.proc.wait(timeout=30) == 1, gw.tail()
    assert "exists without multi-queue support" in gw.log(), gw.tail()
    assert "Traceback" not in gw.log()


def test_workers_on_a_persistent_multi_queue_tun(split: SplitTopology, tmp_path: Path) -> None:
    """A TUN created with multi_queue (``tunlwip route up --multi-queue`` does that) is served
    and stays when the gateway stops."""
    iface = split.topo.ifname("t")
    split.gw.ip("tuntap", "add", "dev", iface, "mode", "tun", "multi_queue")
    config = tmp_path / "gw.toml"
    config.write_text("[udp]\nidle_timeout = 30\n")
    gw = launch_gateway(split.gw, iface, tmp_path / "gw.log", "--workers", "2", "--config",
                        str(config), "--metrics-listen", f"127.0.0.1:{METRICS_PORT}")  # fmt: skip
    gw.wait_serving()
    doc = gw.status()
    assert doc["supervisor"]["workers_running"] == 2
    scraped = split.gw.run(sys.executable, "-c", SCRAPE, str(METRICS_PORT)).stdout
    assert "tunlwip_workers 2.0" in scraped
    assert 'tunlwip_worker_open_flows{worker="1"}' in scraped
    # A broken file on SIGHUP: the supervisor says so and no worker hears of it.
    config.write_text('[udp]\nidle_timeout = "soon"\n')
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "workers not signalled" in gw.log(), "the refused reload")
    assert "udp.idle_timeout" in gw.log()
    time.sleep(0.5)
    assert "[worker 0] reload" not in gw.log() and "[worker 1] reload" not in gw.log()
    gw.stop()
    assert split.gw.ip("link", "show", "dev", iface).returncode == 0


def test_workers_stop_when_the_supervisor_is_killed(split: SplitTopology, tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no time: the workers see their lifeline close and stop."""
    iface = split.topo.ifname("t")
    gw = launch_gateway(split.gw, iface, tmp_path / "gw.log", "--workers", "2")
    gw.wait_serving()
    pids = [w["pid"] for w in gw.status()["workers"]]
    gw.proc.kill()
    gw.proc.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the workers to stop")
    assert gw.log().count("the supervisor is gone: stopping") == 2, gw.tail()
    wait_for(lambda: split.gw.ip("link", "show", "dev", iface, check=False).returncode != 0,
             "the TUN to go")  # fmt: skip


def test_workers_1_runs_no_supervisor(split_gateway: StartGateway) -> None:
    gw: RunningGateway = split_gateway("--workers", "1")
    doc = gw.status()
    assert "supervisor" not in doc and "workers" not in doc
    assert doc["pid"] == gw.proc.pid
    children = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()
    assert children == []


def test_a_worker_that_cannot_start_stops_the_start(split: SplitTopology, tmp_path: Path) -> None:
    """A worker failing before the gateway served (here: its flow log cannot be opened) ends
    the start with one line and exit status 1, leaving no worker behind."""
    iface = split.topo.ifname("t")
    bad = tmp_path / "missing-dir" / "flows.jsonl"
    gw = launch_gateway(split.gw, iface, tmp_path / "gw.log", "--workers", "2",
                        "--flow-log", str(bad))  # fmt: skip
    assert gw.proc.wait(timeout=60) == 1, gw.tail()
    assert "cannot start: worker " in gw.log() and "before serving" in gw.log(), gw.tail()
    wait_for(lambda: split.gw.ip("link", "show", "dev", iface, check=False).returncode != 0,
             "the TUN to go")  # fmt: skip

"""The control socket and ``tunlwip status`` against a gateway on the memory device.

Why: operators rely on ``status`` to see what a running gateway does, so the round trip (JSON
and table), the socket's permissions and life cycle (stale file replaced, a live one never
stolen, removed on exit) and its limits (oversized or silent requests dropped without harming
the gateway) are checked here; the namespace test repeats the round trip with a real TUN.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tunlwip import MemoryDevice
from tunlwip.control import (
    MAX_LISTED_FLOWS,
    ControlError,
    add_status_parser,
    format_status,
    process_usage,
    run_status,
    serve_control,
    status,
)
from tunlwip.gateway import Gateway
from tunlwip.udp import UdpSession

from harness import on_loopback
from packets import udp_packet
from tcppeer import PacketWire, TcpPeer

CLIENT = "198.18.0.2"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes; tmp_path can be long)."""
    path = Path(tempfile.mkdtemp(prefix="tlw-ctl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def hold(session: UdpSession) -> None:
    """A UDP handler that answers each datagram reversed and keeps the session open."""
    while True:
        await session.send((await session.receive())[::-1])


async def start_gateway(nursery: trio.Nursery) -> tuple[Gateway, MemoryDevice, PacketWire]:
    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(), udp_handler=hold, tcp_handler=echo_tcp)
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return gateway, device, wire


async def echo_tcp(stream: trio.abc.HalfCloseableStream, target: object) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


def status_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tunlwip")
    add_status_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["status", *argv])


async def run_status_in_thread(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await trio.to_thread.run_sync(run_status, status_args(*argv), out)
    return code, out.getvalue()


async def test_status_round_trip(nursery: trio.Nursery, sock_dir: Path) -> None:
    gateway, device, wire = await start_gateway(nursery)
    path = sock_dir / "run" / "tun9.sock"  # the directory is created
    assert await nursery.start(serve_control, gateway, path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755

    peer = TcpPeer(wire, CLIENT, 42000, "203.0.113.80", 443)
    await peer.connect()
    await peer.send(b"a" * 3000)
    assert await peer.recv_exactly(3000) == b"a" * 3000
    device.inject_packet(udp_packet(CLIENT, "203.0.113.53", 6000, 9999, b"hello"))
    assert (await wire.next_unmatched()).payload == b"olleh"

    code, output = await run_status_in_thread("--control-socket", str(path), "--json")
    assert code == 0 and output.endswith("\n") and output.count("\n") == 1
    doc = json.loads(output)
    assert doc["version"] and doc["pid"] == os.getpid() and doc["uptime"] >= 0
    assert doc["totals"]["flows"]["live_tcp"] == 1 and doc["totals"]["flows"]["live_udp"] == 1
    assert doc["totals"]["udp"]["opened"] == 1 and "dns" in doc["totals"]
    assert isinstance(doc["drops"], dict) and doc["flows_live"] == 2
    flows = {f["protocol"]: f for f in doc["flows"]}
    assert flows["tcp"]["client"] == f"{CLIENT}:42000"
    assert flows["tcp"]["target"] == "203.0.113.80:443"
    assert (flows["tcp"]["bytes_up"], flows["tcp"]["bytes_down"]) == (3000, 3000)
    assert (flows["udp"]["bytes_up"], flows["udp"]["bytes_down"]) == (5, 5)
    assert doc["flows"][0]["protocol"] == "tcp"  # most bytes first

    code, table = await run_status_in_thread("--control-socket", str(path))
    assert code == 0
    assert "203.0.113.80:443" in table and "2.9 KiB" in table and "203.0.113.53:9999" in table
    assert table.index("drops:") < table.index("PROTO") < table.index("203.0.113.80:443")
    assert table.index("203.0.113.80:443") < table.index("203.0.113.53:9999")
    peer.send_rst()


async def test_socket_removed_on_exit_and_stale_file_replaced(sock_dir: Path) -> None:
    path = sock_dir / "tun0.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # a crashed gateway's socket file: nobody listens
    async with trio.open_nursery() as nursery:
        gateway, _, _ = await start_gateway(nursery)
        scope = trio.CancelScope()

        async def control(task_status: trio.TaskStatus[Path]) -> None:
            with scope:
                await serve_control(gateway, path, task_status=task_status)

        await nursery.start(control)
        code, output = await run_status_in_thread("--control-socket", str(path), "--json")
        assert code == 0 and json.loads(output)["flows"] == []
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not path.exists()
        nursery.cancel_scope.cancel()


async def test_refuses_to_steal_a_live_socket(nursery: trio.Nursery, sock_dir: Path) -> None:
    gateway, _, _ = await start_gateway(nursery)
    path = sock_dir / "tun1.sock"
    await nursery.start(serve_control, gateway, path)
    with pytest.raises(ControlError, match="another gateway is listening"):
        await nursery.start(serve_control, gateway, path)
    regular = sock_dir / "file.sock"
    regular.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        await nursery.start(serve_control, gateway, regular)
    assert regular.read_text() == "not a socket"
    code, _ = await run_status_in_thread("--control-socket", str(path))
    assert code == 0  # the first server still answers


async def raw_exchange(path: Path, data: bytes, *, shut: bool = True) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := await sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # closed with our bytes unread: that is a drop too
            pass
    return b"".join(chunks)


async def test_bad_requests_are_dropped_and_the_gateway_carries_on(
    nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.abc.Clock
) -> None:
    gateway, _, _ = await start_gateway(nursery)
    path = sock_dir / "tun2.sock"
    await nursery.start(serve_control, gateway, path)
    assert await raw_exchange(path, b"x" * 5000) == b""  # over 4 KiB: closed unanswered
    unknown = json.loads(await raw_exchange(path, b'{"cmd": "reboot"}\n'))
    assert "unknown command" in unknown["error"]
    assert "not JSON" in json.loads(await raw_exchange(path, b"status\n"))["error"]
    assert json.loads(await raw_exchange(path, b'{"cmd": "status"}'))["flows"] == []  # no \n
    started = trio.current_time()
    assert await raw_exchange(path, b'{"cmd": "sta', shut=False) == b""  # silent: dropped
    assert 5 <= trio.current_time() - started < 6
    assert json.loads(await raw_exchange(path, b'{"cmd": "status"}\n'))["version"]


async def test_listed_flows_are_bounded(nursery: trio.Nursery) -> None:
    gateway, device, _ = await start_gateway(nursery)
    for port in range(7000, 7000 + MAX_LISTED_FLOWS + 5):
        device.inject_packet(udp_packet(CLIENT, "203.0.113.53", port, 9999, b"x" * (port % 7)))
    await trio.testing.wait_all_tasks_blocked()
    assert gateway.statistics().flows.live_udp == MAX_LISTED_FLOWS + 5
    doc = status(gateway)
    assert len(doc["flows"]) == MAX_LISTED_FLOWS and doc["flows_omitted"] == 5
    assert doc["flows"][0]["bytes_up"] == 6 and doc["flows"][-1]["bytes_up"] <= 1
    assert "... and 5 more" in format_status(json.loads(json.dumps(doc)))


async def test_no_gateway_is_a_clear_error(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = await run_status_in_thread("--control-socket", str(sock_dir / "tun7.sock"))
    assert code == 1 and output == ""
    message = capsys.readouterr().err
    assert f"no gateway on {sock_dir / 'tun7.sock'}" in message
    assert "is `tunlwip up --iface tun7` running?" in message


def test_iface_selects_the_default_path() -> None:
    args = status_args("--iface", "dmesh1", "--json")
    assert (args.iface, args.control_socket, args.json) == ("dmesh1", None, True)


def test_socket_is_a_deprecated_alias_of_control_socket(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``status`` names the flag as ``up`` does; the old ``--socket`` still works, with a note."""
    assert status_args("--control-socket", "/x.sock").control_socket == "/x.sock"
    assert "deprecated" not in capsys.readouterr().err
    assert status_args("--socket", "/y.sock").control_socket == "/y.sock"
    assert "--socket is deprecated, use --control-socket" in capsys.readouterr().err


def test_table_of_an_idle_gateway() -> None:
    table = format_status({"version": "1", "iface": "t", "pid": 1, "uptime": 3725,
                           "totals": {"dns": None}, "drops": {}, "flows": []})  # fmt: skip
    assert "up 1h02m05s" in table and "drops:     none" in table and "no open flows" in table
    assert "dns:       proxy off" in table and "refused:   none" in table


def test_table_names_the_limits_new_flows_met() -> None:
    totals = {"refused": {"tcp_connections": 3, "pending_dials": 0, "loops": 1},
              "udp": {"refused_full": 2}, "dns": {"overload": 5}}  # fmt: skip
    table = format_status({"version": "1", "totals": totals, "drops": {}, "flows": []})
    assert "refused:   tcp connections 3, loops 1, udp sessions 2, dns in flight 5" in table


def test_table_names_the_client_shares_new_flows_met() -> None:
    """Refusals at a client's share get their own line; the global limits' line stays."""
    totals = {"refused": {"tcp_connections": 1, "client_share_dials": 7,
                          "client_share_connections": 0, "client_share_udp_sessions": 3,
                          "client_share_dns": 2}, "udp": {}, "dns": {}}  # fmt: skip
    table = format_status({"version": "1", "totals": totals, "drops": {}, "flows": []})
    assert "refused:   tcp connections 1\n" in table
    assert "shares:    refused dials 7, udp sessions 3, dns 2\n" in table
    idle = format_status({"version": "1", "totals": {}, "drops": {}, "flows": []})
    assert "shares:    none refused" in idle


def test_process_usage_reports_memory_and_file_descriptors() -> None:
    usage = process_usage()
    assert usage["rss_bytes"] is not None and usage["rss_bytes"] > 1 << 20
    assert usage["open_files"] is not None and usage["open_files"] >= 3  # stdin/out/err at least
    assert usage["open_files_limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]

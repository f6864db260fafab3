"""CallbackDevice with a real, *blocking* TUN fd as the "mobile app": curl through it works.

Why: mobile VPN code hands over a blocking read, a write, protect and close. Here the app is a
TUN fd in blocking mode (``os.read``/``os.write``), read by the device's thread, while the
gateway runs in-process inside namespace gw (a thread that entered it, so its sockets live
there). Split topology (docs/architecture.md#test-topology)::

    [cli] curl -- T (moved here) ==== blocking fd ====> [gw] CallbackDevice + Gateway
                                                                 sockets -- veth --> [srv] http
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tunlwip import CallbackDevice, Gateway, GatewayConfig
from tunlwip.gateway import GatewayStatistics

from netns import SRV_ADDR4, SRV_ADDR6, Namespace, SplitTopology

pytestmark = pytest.mark.netns

HTTP_PORT = 8080
SIZE = 2 * 1024 * 1024


class BlockingTunApp:
    """The app's tunnel: a blocking TUN fd, polled with a wake-up pipe so close() works
    (closing a TUN fd does not wake a read(2) blocked on it)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, True)
        self.fd = fd
        self.reads = self.writes = self.close_calls = 0
        self.protected: list[int] = []
        self._wake_read, self._wake_write = os.pipe()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(self._wake_read, select.POLLIN)

    def read_packet(self) -> bytes | None:
        while True:
            ready = dict(self._poll.poll(60_000))  # bounded: a stuck test still ends
            if not ready or self._wake_read in ready:
                return None
            if ready.get(self.fd, 0) & (select.POLLERR | select.POLLHUP):
                return None
            if self.fd in ready:
                self.reads += 1
                return os.read(self.fd, 65535)

    def write_packet(self, packet: bytes) -> None:
        self.writes += 1
        os.write(self.fd, packet)

    def protect(self, fd: int) -> bool:
        self.protected.append(fd)
        return True  # split topology: the gateway's sockets cannot reach the TUN anyway

    def close(self) -> None:
        self.close_calls += 1
        os.write(self._wake_write, b"\0")

    def release(self) -> None:
        for fd in (self.fd, self._wake_read, self._wake_write):
            os.close(fd)


@dataclass
class Outcome:
    curl: subprocess.CompletedProcess[bytes]
    stats: GatewayStatistics
    reader_alive: bool


async def gateway_and_curl(app: BlockingTunApp, cli: Namespace, url: str, out: Path) -> Outcome:
    """Runs in a thread inside namespace gw: the gateway serves while curl runs in cli."""
    device = CallbackDevice(app.read_packet, app.write_packet, app.protect, app.close)
    assert device.protector is not None
    gateway = Gateway(device, GatewayConfig(dial_timeout=10), protector=device.protector)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        with trio.fail_after(60):
            curl = await trio.run_process(
                ["ip", "netns", "exec", cli.name, "curl", "-sS", "--fail", "--max-time", "30",
                 "-o", str(out), url],
                check=False, capture_stderr=True,
            )  # fmt: skip
        stats = gateway.statistics()
        nursery.cancel_scope.cancel()
    await device.aclose()
    assert device._thread is not None
    return Outcome(curl, stats, device._thread.is_alive())


@pytest.mark.parametrize("srv_addr", [SRV_ADDR4, SRV_ADDR6], ids=["v4", "v6"])
def test_curl_through_callback_device_on_blocking_fd(
    split: SplitTopology, require_tool: Callable[[str], str], tmp_path: Path, srv_addr: str
) -> None:
    require_tool("curl")
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "file.bin").write_bytes(data)
    split.srv.popen(
        [sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(root),
         str(HTTP_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    split.srv.wait_port(HTTP_PORT)
    fd, _ = split.client_tun()
    app = BlockingTunApp(fd)
    host = f"[{srv_addr}]" if ":" in srv_addr else srv_addr
    out = tmp_path / "file.out"
    try:
        outcome = split.gw.enter_thread(
            trio.run, gateway_and_curl, app, split.cli, f"http://{host}:{HTTP_PORT}/file.bin", out
        )
    finally:
        app.release()
    assert outcome.curl.returncode == 0, outcome.curl.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert outcome.stats.dials_ok == 1 and len(app.protected) == 1  # protect ran for the dial
    assert app.reads > 100 and app.writes > 100  # the packets really crossed the fd
    assert app.close_calls == 1 and not outcome.reader_alive  # close() ended the thread

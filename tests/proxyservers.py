"""Real proxies on loopback for the proxy client tests: Debian's danted (SOCKS5) and tinyproxy
(HTTP CONNECT), each started in the foreground with a temporary config, by PID, and stopped
even when the test fails; plus small echo servers to reach through them.

Why real programs: what a SOCKS5 or HTTP proxy answers for a refused port, how a UDP relay
behaves and what its replies look like are only believable from the programs people deploy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from netns import Namespace as InNamespace  # a test namespace a proxy may run in

HOST = "127.0.0.1"
DANTED = shutil.which("danted") or "/usr/sbin/danted"
TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on now (TCP or UDP) on 127.0.0.1."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _listening(port: int, netns: InNamespace | None) -> bool:
    if netns is not None:
        return any(p == port for _, p in netns.listeners("tcp"))
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def _wait_listening(proc: subprocess.Popen[bytes], name: str, port: int, log: Path,
                    netns: InNamespace | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {log.read_text()[-800:]}")
        if _listening(port, netns):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} does not listen on {port}: {log.read_text()[-800:]}")


@contextlib.contextmanager
def _running(args: list[str], port: int, log: Path,
             netns: InNamespace | None = None) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """``args`` running (in ``netns``: ``ip netns exec`` execs it in place, so the PID and the
    process group are the proxy's), until the block ends."""
    name = args[0]
    if netns is not None:
        args = ["ip", "netns", "exec", netns.name, *args]
    # Its own process group: danted forks workers, and they must end with it.
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        _wait_listening(proc, name, port, log, netns)
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group this test started (its leader's PID), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.05)  # the workers exit after the leader
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    """Does a process of group ``pgid`` still run (zombies waiting to be reaped do not)?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it just ended
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@contextlib.contextmanager
def danted(workdir: Path, *, socksmethod: str = "none") -> Iterator[int]:
    """danted on 127.0.0.1 and ::1 (one process, foreground); yields its port. ``socksmethod``:
    ``none`` or ``username`` (checked against the system's password database)."""
    port = free_port()
    config = workdir / "danted.conf"
    config.write_text(
        "logoutput: stderr\n"
        f"internal: {HOST} port = {port}\n"
        f"internal: ::1 port = {port}\n"
        f"external: {HOST}\n"
        "external: ::1\n"
        "clientmethod: none\n"
        f"socksmethod: {socksmethod}\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        "client pass { from: ::1/128 to: ::/0 }\n"
        "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 "
        "command: connect udpassociate udpreply }\n"
        "socks pass { from: ::1/128 to: ::/0 command: connect udpassociate udpreply }\n"
    )
    args = [DANTED, "-f", str(config), "-N", "1", "-p", str(workdir / "danted.pid")]
    with _running(args, port, workdir / "danted.log"):
        yield port


@contextlib.contextmanager
def danted_in(netns: InNamespace, workdir: Path, host: str, port: int, clients: str, *,
              socksmethod: str = "none",
              external6: str | None = None) -> Iterator[int]:  # fmt: skip
    """danted in test namespace ``netns`` on ``host:port`` (IPv4), serving ``clients`` (a
    network), connecting out from ``host`` (and from ``external6`` to IPv6 destinations, when
    given); yields the port. Stopped by PID (its group)."""
    config = workdir / f"danted-{port}.conf"
    config.write_text(
        "logoutput: stderr\n"
        f"internal: {host} port = {port}\n"
        f"external: {host}\n"
        + (f"external: {external6}\n" if external6 else "")
        + "clientmethod: none\n"
        f"socksmethod: {socksmethod}\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        f"client pass {{ from: {clients} to: 0.0.0.0/0 }}\n"
        f"socks pass {{ from: {clients} to: {'0/0' if external6 else '0.0.0.0/0'} "
        "command: connect }\n"
    )
    args = [DANTED, "-f", str(config), "-N", "1", "-p", str(workdir / f"danted-{port}.pid")]
    with _running(args, port, workdir / f"danted-{port}.log", netns):
        yield port


@contextlib.contextmanager
def tinyproxy_in(netns: InNamespace, workdir: Path, host: str, port: int, clients: str,
                 connect_ports: list[int]) -> Iterator[int]:  # fmt: skip
    """tinyproxy in test namespace ``netns`` on ``host:port``, CONNECT allowed from
    ``clients`` to ``connect_ports``; yields the port. Stopped by PID."""
    lines = [f"Port {port}", f"Listen {host}", "Timeout 30", f"Allow {clients}",
             "LogLevel Info", "MaxClients 20"]  # fmt: skip
    lines += [f"ConnectPort {p}" for p in connect_ports]
    config = workdir / f"tinyproxy-{port}.conf"
    config.write_text("\n".join(lines) + "\n")
    args = [TINYPROXY, "-d", "-c", str(config)]
    with _running(args, port, workdir / f"tinyproxy-{port}.log", netns):
        yield port


@contextlib.contextmanager
def tinyproxy(workdir: Path, connect_ports: list[int], *,
              basic_auth: tuple[str, str] | None = None) -> Iterator[int]:  # fmt: skip
    """tinyproxy on 127.0.0.1 in the foreground (``-d``), CONNECT allowed to
    ``connect_ports``; yields its port."""
    port = free_port()
    lines = [f"Port {port}", f"Listen {HOST}", "Timeout 30", f"Allow {HOST}", "LogLevel Info",
             "MaxClients 20"]  # fmt: skip
    lines += [f"ConnectPort {p}" for p in connect_ports]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    config = workdir / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    with _running([TINYPROXY, "-d", "-c", str(config)], port, workdir / "tinyproxy.log"):
        yield port


async def tcp_echo(nursery: trio.Nursery, *, greeting: bytes = b"", host: str = HOST) -> int:
    """A TCP echo server on ``host`` (optionally speaking first); returns its port."""

    async def echo(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                if greeting:
                    await stream.send_all(greeting)
                async for data in stream:
                    await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host=host))
    return int(listeners[0].socket.getsockname()[1])


async def udp_echo(nursery: trio.Nursery, host: str = HOST) -> int:
    """A UDP echo server on ``host``; returns its port."""
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((host, 0))

    async def serve() -> None:
        with sock:
            while True:
                data, peer = await sock.recvfrom(65535)
                await sock.sendto(data, peer)

    nursery.start_soon(serve)
    return int(sock.getsockname()[1])


def open_fds() -> int:
    """This process's open file descriptors (to check that nothing leaks)."""
    return len(list(Path("/proc/self/fd").iterdir()))

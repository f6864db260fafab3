"""Proves the namespace helpers do what the gateway tests rely on, and clean up after themselves."""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netns import (
    CLIENT_ADDR4,
    CLIENT_ADDR6,
    SRV_ADDR4,
    SRV_ADDR6,
    SplitTopology,
    Topology,
    open_tun_in,
    prefix,
)

pytestmark = pytest.mark.netns

A4, A6, B4, B6 = "198.18.1.1", "fd00:1::1", "198.18.1.2", "fd00:1::2"


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def _our_root_links() -> list[str]:
    """Root-namespace links with our prefix: there must never be any."""
    return [line for line in _root_links().splitlines() if prefix() in line]


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _pair(topology: Topology) -> tuple[Topology, str, str]:
    a, b = topology.add("a"), topology.add("b")
    va, vb = topology.veth(a, b, [f"{A4}/24", f"{A6}/64"], [f"{B4}/24", f"{B6}/64"])
    return topology, va, vb


def test_veth_ping_both_families(topology: Topology, require_tool: Callable[[str], str]) -> None:
    require_tool("ping")
    _pair(topology)
    a, b = topology["a"], topology["b"]
    for ns, dst in ((a, B4), (a, B6), (b, A4), (b, A6)):
        ns.run("ping", "-c1", "-W2", dst, timeout=10)
    # Only connected routes: nothing points at a real network.
    assert "default" not in a.ip("route").stdout + a.ip("-6", "route").stdout


def test_socket_in_namespace_reaches_http_server(topology: Topology, tmp_path: Path) -> None:
    _pair(topology)
    a, b = topology["a"], topology["b"]
    (tmp_path / "hello.txt").write_text("hello from srv\n")
    for host in (B4, B6):
        srv = b.popen(
            [sys.executable, "-m", "http.server", "--bind", host, "8080"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        b.wait_port(8080, host, timeout=10)
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        with a.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect((host, 8080))
            s.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.0 200")
        assert data.endswith(b"hello from srv\n")
        b.stop_processes()
        assert srv.returncode is not None


def test_enter_thread_binds_namespace_addresses_and_reraises(topology: Topology) -> None:
    _pair(topology)
    a = topology["a"]
    with a.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((A4, 0))  # only exists inside namespace a
    with pytest.raises(ZeroDivisionError):
        a.enter_thread(lambda: 1 // 0)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
        pytest.raises(OSError, match="Cannot assign requested address"),
    ):
        s.bind((A4, 0))  # the calling thread is still in the root namespace


def test_tun_lives_only_in_its_namespace(topology: Topology) -> None:
    ns = topology.add("t")
    name = topology.ifname("t")
    fd = open_tun_in(ns, name, mtu=1400)
    try:
        assert not os.get_blocking(fd)
        show = ns.ip("link", "show", "dev", name).stdout
        assert "mtu 1400" in show and "UP" in show
        assert name not in _root_links()
    finally:
        os.close(fd)
    assert name not in ns.ip("link").stdout  # non-persistent: gone with its fd


def _read_until(fd: int, match: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            pkt = os.read(fd, 65535)
            if match(pkt):
                return pkt
    raise TimeoutError("expected packet never arrived on the TUN")


def test_split_topology_tun_fd_survives_move(
    split: SplitTopology, require_tool: Callable[[str], str]
) -> None:
    require_tool("ping")
    fd, ifname = split.client_tun(mtu=1500)
    try:
        assert ifname in split.cli.ip("link").stdout
        assert ifname not in split.gw.ip("link").stdout
        assert f"default dev {ifname}" in split.cli.ip("route").stdout
        assert f"default dev {ifname}" in split.cli.ip("-6", "route").stdout
        assert "default" not in split.gw.ip("route").stdout
        # A client ping leaves through the TUN and is readable from the fd held in gw.
        split.cli.popen(["ping", "-c3", "-i0.2", "-W1", SRV_ADDR4], stdout=subprocess.DEVNULL)
        pkt = _read_until(
            fd, lambda p: p[0] >> 4 == 4 and p[9] == 1 and p[16:20] == socket.inet_aton(SRV_ADDR4)
        )
        assert pkt[12:16] == socket.inet_aton(CLIENT_ADDR4)
        split.cli.popen(["ping", "-6", "-c3", "-i0.2", "-W1", SRV_ADDR6], stdout=subprocess.DEVNULL)
        dst6 = socket.inet_pton(socket.AF_INET6, SRV_ADDR6)
        pkt = _read_until(fd, lambda p: p[0] >> 4 == 6 and p[6] == 58 and p[24:40] == dst6)
        assert pkt[8:24] == socket.inet_pton(socket.AF_INET6, CLIENT_ADDR6)
    finally:
        os.close(fd)


def test_exit_removes_everything_even_on_error(netns_available: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology() as topo:  # noqa: PT012 (the error comes last)
        _, va, vb = _pair(topo)
        fd = open_tun_in(topo["a"], topo.ifname("t"))
        os.close(fd)
        sleeper = topo["b"].popen(["sleep", "300"])
        names = [ns.name for ns in topo.namespaces.values()]
        assert all(n in _netns_list() for n in names)
        raise RuntimeError("boom")
    assert sleeper.returncode is not None
    listed = _netns_list()
    assert not any(n in listed for n in names)
    assert _our_root_links() == []
    assert va not in _root_links() and vb not in _root_links()

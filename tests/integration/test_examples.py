"""The runnable examples in examples/, each as a real process with real clients.

Why: examples rot unless something runs them. Each one runs in namespace gw of the split
topology (its TUN is then moved to cli and made cli's uplink, as for ``tunlwip up``); the
callback-device example also runs single-host with ``--fwmark``, where only its protect
callback keeps the gateway's own sockets out of the TUN. Assertions use what the clients got
and the lines the examples log; every example must stop on SIGTERM with status 0.

    [cli] curl, UDP client -- T ==== fd ====> [gw] python examples/X.py --iface T
                                                    sockets -- veth --> [srv] http.server, UDP
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from gatewayproc import LoggedProcess, wait_for
from netns import (
    CLIENT_ADDR4,
    CLIENT_ADDR6,
    GW_VETH_ADDR4,
    GW_VETH_ADDR6,
    SRV_ADDR4,
    SRV_ADDR6,
    Namespace,
    SplitTopology,
    Topology,
    move_link,
    setup_client_tun,
)

pytestmark = pytest.mark.netns

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HTTP_PORT, UDP_PORT, UDP_OTHER_PORT, CLOSED_PORT = 8080, 7000, 7001, 9
SIZE = 1024 * 1024
FWMARK, TABLE = 0x1D, "1234"
FAMILIES = [
    pytest.param(socket.AF_INET, SRV_ADDR4, CLIENT_ADDR4, id="v4"),
    pytest.param(socket.AF_INET6, SRV_ADDR6, CLIENT_ADDR6, id="v6"),
]


@dataclass
class Example(LoggedProcess):
    """One example process."""

    what: ClassVar[str] = "example"

    def wait_line(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(f"example exited {self.proc.returncode}; {self.tail()}")
            return text in self.log()

        wait_for(seen, f"{text!r} in the example's log", timeout)

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM; require exit status 0 within ``timeout`` s; returns the whole log."""
        self.terminate(timeout)
        assert "example." in self.log() and "stopped" in self.log(), self.tail()
        return self.log()


StartExample = Callable[..., Example]


@pytest.fixture
def start_example(topology: Topology, tmp_path: Path) -> Iterator[StartExample]:
    """Factory: ``start(ns, "x.py", *args)`` runs examples/x.py --iface <fresh TUN> in ``ns``
    and returns once it logged "serving on"; every example is stopped at teardown."""
    started: list[Example] = []

    def start(ns: Namespace, script: str, *args: str) -> Example:
        iface = topology.ifname("t")
        log_path = tmp_path / f"{script}-{iface}.log"
        with log_path.open("wb") as log:
            proc = ns.popen(
                [sys.executable, str(EXAMPLES / script), "--iface", iface, *args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        example = Example(ns, iface, proc, log_path)
        started.append(example)
        example.wait_line(f"serving on {iface}")
        return example

    yield start
    problems = []
    for example in started:
        try:
            example.stop()
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, "\n\n".join(problems)


@pytest.fixture
def split_example(split: SplitTopology, start_example: StartExample) -> StartExample:
    """Factory: an example in gw whose TUN is moved to cli and made cli's uplink."""

    def start(script: str, *args: str) -> Example:
        example = start_example(split.gw, script, *args)
        move_link(example.iface, split.gw, split.cli)
        setup_client_tun(split.cli, example.iface)
        return example

    return start


@pytest.fixture
def webroot(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "file.bin").write_bytes(data)
    return root, hashlib.sha256(data).hexdigest()


def start_http(ns: Namespace, root: Path) -> None:
    ns.popen(
        [sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(root),
         str(HTTP_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ns.wait_port(HTTP_PORT)


def curl(ns: Namespace, host: str, port: int, out: Path) -> subprocess.CompletedProcess[str]:
    url = f"http://[{host}]:{port}/file.bin" if ":" in host else f"http://{host}:{port}/file.bin"
    return ns.run("curl", "-sS", "--fail", "--max-time", "20", "-o", str(out), url,
                  check=False, timeout=40)  # fmt: skip


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- examples/logging_tcp_handler.py --------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr", "client_addr"), FAMILIES)
def test_logging_tcp_handler(
    split: SplitTopology,
    split_example: StartExample,
    webroot: tuple[Path, str],
    require_tool: Callable[[str], str],
    tmp_path: Path,
    family: int,
    srv_addr: str,
    client_addr: str,
) -> None:
    """curl downloads through the custom handler; it logs bytes each way, and a refused dial."""
    require_tool("curl")
    root, digest = webroot
    start_http(split.srv, root)
    example = split_example("logging_tcp_handler.py")
    out = tmp_path / "file.out"
    result = curl(split.cli, srv_addr, HTTP_PORT, out)
    assert result.returncode == 0, f"{result.stderr}\n{example.tail()}"
    assert sha256_file(out) == digest
    refused = curl(split.cli, srv_addr, CLOSED_PORT, tmp_path / "refused.out")
    assert refused.returncode != 0  # handshake done, then reset: the dial was refused
    log = example.stop()
    target = f"[{srv_addr}]:{HTTP_PORT}" if family == socket.AF_INET6 else f"{srv_addr}:{HTTP_PORT}"
    pattern = rf"tcp \S+ -> {re.escape(target)}: (\d+) bytes up, (\d+) down, [\d.]+ s, closed"
    match = re.search(pattern, log)
    assert match, log
    assert int(match.group(1)) > 0 and int(match.group(2)) > SIZE, match.group(0)
    assert client_addr in log
    assert re.search(rf"-> \S+:{CLOSED_PORT}: dial failed: .*[Rr]efused", log), log


# -- examples/udp_handler.py ---------------------------------------------------------------------

UDP_SERVER = f"""
import socket
a = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
a.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
a.bind(("::", {UDP_PORT}))
b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
b.bind(("::", {UDP_OTHER_PORT}))
while True:
    data, addr = a.recvfrom(65535)
    a.sendto(b"echo:" + data, addr)   # from the destination
    b.sendto(b"other:" + data, addr)  # from another port: a connected relay would drop it
"""


@pytest.mark.parametrize(("family", "srv_addr", "client_addr"), FAMILIES)
def test_udp_handler_full_cone(
    split: SplitTopology,
    split_example: StartExample,
    family: int,
    srv_addr: str,
    client_addr: str,
) -> None:
    """The client gets the destination's reply *and* one from another port (send_udp), each
    from its real source; the session's close is logged once it idles out."""
    split.srv.popen([sys.executable, "-c", UDP_SERVER], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)  # fmt: skip
    split.srv.wait_port(UDP_PORT, proto="udp")
    split.srv.wait_port(UDP_OTHER_PORT, proto="udp")
    example = split_example("udp_handler.py", "--udp-idle-timeout", "1")
    with split.cli.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"hi", (srv_addr, UDP_PORT))
        got = {sock.recvfrom(100)[:2] for _ in range(2)}
    got_simple = {(data, addr[0], addr[1]) for data, addr in got}
    assert got_simple == {
        (b"echo:hi", srv_addr, UDP_PORT),
        (b"other:hi", srv_addr, UDP_OTHER_PORT),
    }, example.tail()
    example.wait_line("session closed")
    log = example.stop()
    assert re.search(r"udp \S+ <- \S+:7001: 8 bytes from a third party", log), log
    assert re.search(
        r"session closed after [\d.]+ s: 1 datagrams in, 1 out, 1 from third parties", log
    ), log


# -- examples/callback_device.py -----------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr", "client_addr"), FAMILIES)
def test_callback_device_example_split(
    split: SplitTopology,
    split_example: StartExample,
    webroot: tuple[Path, str],
    require_tool: Callable[[str], str],
    tmp_path: Path,
    family: int,
    srv_addr: str,
    client_addr: str,
) -> None:
    """A download through the blocking-fd callback device; it stops promptly (close() woke the
    reader thread) and reports the traffic."""
    require_tool("curl")
    root, digest = webroot
    start_http(split.srv, root)
    example = split_example("callback_device.py")
    out = tmp_path / "file.out"
    result = curl(split.cli, srv_addr, HTTP_PORT, out)
    assert result.returncode == 0, f"{result.stderr}\n{example.tail()}"
    assert sha256_file(out) == digest
    log = example.stop()
    match = re.search(r"stopped: packets in (\d+) out (\d+), dials ok 1 failed 0", log)
    assert match and int(match.group(1)) > 100, log
    assert "still blocked" not in log, log


@pytest.fixture
def single_host(topology: Topology) -> tuple[Namespace, Namespace]:
    """gw (clients and the example together) and srv, joined by a veth."""
    gw, srv = topology.add("gw"), topology.add("srv")
    gw_veth, _ = topology.veth(
        gw, srv,
        addrs_a=[f"{GW_VETH_ADDR4}/24", f"{GW_VETH_ADDR6}/64"],
        addrs_b=[f"{SRV_ADDR4}/24", f"{SRV_ADDR6}/64"],
    )  # fmt: skip
    for dev in ("all", "default", gw_veth):  # replies to marked sockets must not be filtered
        gw.write_sysctl(f"net.ipv4.conf.{dev}.rp_filter", "0")
    return gw, srv


def test_callback_device_example_single_host_protect(
    single_host: tuple[Namespace, Namespace],
    start_example: StartExample,
    webroot: tuple[Path, str],
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """TUN, clients and gateway in one namespace, everything unmarked routed into the TUN: the
    download works because protect(fd) marks the gateway's sockets (one dial, no loop)."""
    require_tool("curl")
    gw, srv = single_host
    root, digest = webroot
    start_http(srv, root)
    example = start_example(gw, "callback_device.py", "--fwmark", hex(FWMARK))
    gw.ip("link", "set", "dev", example.iface, "up")
    gw.add_addrs(example.iface, [f"{CLIENT_ADDR4}/32", f"{CLIENT_ADDR6}/64"])
    gw.wait_not_tentative(example.iface)
    for fam in ("-4", "-6"):
        gw.ip(fam, "route", "add", "default", "dev", example.iface, "table", TABLE)
        gw.ip(fam, "rule", "add", "not", "fwmark", hex(FWMARK), "table", TABLE)
    assert f"dev {example.iface}" in gw.ip("route", "get", SRV_ADDR4).stdout
    out = tmp_path / "file.out"
    result = curl(gw, SRV_ADDR4, HTTP_PORT, out)
    assert result.returncode == 0, f"{result.stderr}\n{example.tail()}"
    assert sha256_file(out) == digest
    log = example.stop()
    assert "protect: fwmark 0x1d" in log and "dials ok 1 failed 0" in log, log


# -- examples/custom_route.py --------------------------------------------------------------------


@pytest.mark.parametrize(("family", "srv_addr", "client_addr"), FAMILIES)
def test_custom_route_example(
    split: SplitTopology,
    split_example: StartExample,
    webroot: tuple[Path, str],
    require_tool: Callable[[str], str],
    tmp_path: Path,
    family: int,
    srv_addr: str,
    client_addr: str,
) -> None:
    """Downloads through both custom routes arrive whole: 'lab' (a socket stream: C relay) and
    'counted' (a wrapping stream: relayed in Python, which counted every byte); a third port
    takes the default route; each custom route's flow record names it."""
    require_tool("curl")
    root, digest = webroot
    start_http(split.srv, root)
    counted_port, other_port = HTTP_PORT + 1, HTTP_PORT + 2
    for port in (counted_port, other_port):
        split.srv.popen(
            [sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(root),
             str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        split.srv.wait_port(port)
    example = split_example("custom_route.py", "--lab-port", str(HTTP_PORT),
                            "--counted-port", str(counted_port))  # fmt: skip
    for port in (HTTP_PORT, counted_port, other_port):
        out = tmp_path / f"{port}.out"
        result = curl(split.cli, srv_addr, port, out)
        assert result.returncode == 0, f"{port}: {result.stderr}\n{example.tail()}"
        assert sha256_file(out) == digest, port
    example.wait_line("counted stream to")
    for port, route in ((HTTP_PORT, "lab"), (counted_port, "counted")):
        example.wait_line(f":{port} route={route} ")
    example.wait_line(f":{other_port} route=")  # the default route, on the held-SYN path
    log = example.stop()
    match = re.search(r"counted stream to \S+ closed: (\d+) bytes sent, (\d+) received", log)
    assert match and int(match.group(1)) > 50 and int(match.group(2)) > SIZE, log
    for port, route in ((HTTP_PORT, "lab"), (counted_port, "counted")):
        line = re.search(rf"flow tcp \S+ -> \S+:{port} route={route} name=None: (\d+) bytes up, "
                         rf"(\d+) down, closed", log)  # fmt: skip
        assert line and int(line.group(2)) > SIZE, (port, log)
    assert client_addr in log

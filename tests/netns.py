"""Helpers for integration tests in throwaway Linux network namespaces.

Why: the gateway must be exercised against the real kernel stack (TUN, TCP, UDP) without ever
touching the host's network. Every namespace and interface made here carries a per-process
prefix (``tlw<pid><kind><n>``), test addresses are confined to 198.18.0.0/15 and fd00::/8, veth
pairs are created directly inside namespaces, and nothing is ever run in the root namespace
except ``ip netns add/del/list`` and read-only ``ip link`` queries. Deleting a namespace removes
the virtual interfaces in it, so cleanup is "stop our processes, delete our namespaces".

Stdlib only, so it can be used before the package under test is importable.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shutil
import socket as _socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = [
    "CLIENT_ADDR4",
    "CLIENT_ADDR6",
    "GATEWAY_ADDR4",
    "GATEWAY_ADDR6",
    "GW_VETH_ADDR4",
    "GW_VETH_ADDR6",
    "SRV_ADDR4",
    "SRV_ADDR6",
    "CommandError",
    "Namespace",
    "SplitTopology",
    "Topology",
    "have_netns",
    "move_link",
    "open_tun_in",
    "prefix",
    "setup_client_tun",
    "split_topology",
    "unique_ifname",
]

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16  # including the NUL: names are at most 15 characters

#: The gateway's own addresses live inside lwIP, never on a kernel interface.
GATEWAY_ADDR4 = "198.18.0.1"
GATEWAY_ADDR6 = "fd00:18::1"
#: Client side of the TUN (kernel addresses in namespace ``cli``).
CLIENT_ADDR4 = "198.18.0.2"
CLIENT_ADDR6 = "fd00:18::2"
#: gw <-> srv veth link of the split topology.
GW_VETH_ADDR4 = "198.18.1.1"
GW_VETH_ADDR6 = "fd00:1::1"
SRV_ADDR4 = "198.18.1.2"
SRV_ADDR6 = "fd00:1::2"

_TEST_NETS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00::/8"))
_OUR_NAME = re.compile(r"^tlw\d+[a-z]")
_counter = itertools.count()
_counter_lock = threading.Lock()
_live_topologies: set[Topology] = set()


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes stderr, so failing ``ip`` calls explain why."""

    def __str__(self) -> str:
        base = super().__str__()
        err = self.stderr.strip() if isinstance(self.stderr, str) else ""
        return f"{base}: {err}" if err else base


def prefix() -> str:
    """Per-process name prefix; computed per call so a forked child gets its own."""
    return f"tlw{os.getpid()}"


def _next() -> int:
    with _counter_lock:
        return next(_counter)


def unique_ifname(kind: str = "i") -> str:
    """Fresh interface name ``tlw<pid><kind><n>`` (≤ 15 chars); the letter avoids ambiguity."""
    if not re.fullmatch(r"[a-z]", kind):
        raise ValueError(f"kind must be one lowercase letter, got {kind!r}")
    name = f"{prefix()}{kind}{_next()}"
    if len(name) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} longer than {IFNAMSIZ - 1} characters")
    return name


def _check_ours(name: str, what: str) -> None:
    """Refuse to operate on anything not named by this module (safety net against typos)."""
    if not _OUR_NAME.match(name):
        raise ValueError(f"refusing to touch {what} {name!r}: not created by tests/netns.py")


def _check_test_addr(addr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """Only 198.18.0.0/15 and fd00::/8 may be configured, so tests can't shadow real networks."""
    iface = ipaddress.ip_interface(addr)
    net = iface.network
    if not any(
        net.version == allowed.version and net.subnet_of(allowed)  # type: ignore[arg-type]
        for allowed in _TEST_NETS
    ):
        raise ValueError(f"{addr} is outside the test ranges 198.18.0.0/15 and fd00::/8")
    return iface


def _run(
    cmd: Sequence[str], *, check: bool = True, capture: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        capture_output=capture,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


@functools.cache
def _libc_setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def have_netns() -> tuple[bool, str]:
    """Whether namespace tests can run here; the reason is shown when they are skipped."""
    if os.geteuid() != 0:
        return False, "network namespace tests need root"
    for tool in ("ip", "ss"):
        if shutil.which(tool) is None:
            return False, f"{tool!r} (iproute2) not found"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return False, f"cannot open /dev/net/tun: {exc}"
    try:
        _libc_setns()
    except (OSError, AttributeError) as exc:
        return False, f"libc setns() unavailable: {exc}"
    probe = f"{prefix()}p{_next()}"
    try:
        _run(["ip", "netns", "add", probe], timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"'ip netns add' failed: {exc}"
    try:
        _run(["ip", "netns", "del", probe], timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"'ip netns del' failed: {exc}"
    return True, ""


class Namespace:
    """A network namespace created by a :class:`Topology`; every operation stays inside it."""

    def __init__(self, name: str) -> None:
        _check_ours(name, "namespace")
        self.name = name
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def run(
        self, *args: str, check: bool = True, capture: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (``ip netns exec``); text output."""
        return _run(
            ["ip", "netns", "exec", self.name, *args], check=check, capture=capture, timeout=timeout
        )

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n <name> ...``: iproute2 configuration of this namespace only."""
        return _run(["ip", "-n", self.name, *args], check=check)

    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a background process in the namespace; it is stopped by stop_processes()."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *args], **kw
        )
        # `ip netns exec` execs the command in place, so proc.pid is the command itself.
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop_processes(self, grace: float = 5.0) -> None:
        """Terminate (then kill after ``grace`` s) only the processes popen() started, by PID."""
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def enter_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a fresh thread that first setns()es into this namespace.

        Sockets and TUN devices are bound to the namespace of the thread that creates them, so
        objects returned from here keep living in the namespace while the caller's thread stays
        in the root namespace.
        """
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc_setns()(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.path}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result.append(fn(*args))
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def socket(
        self,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,
        proto: int = 0,
    ) -> _socket.socket:
        """A socket that belongs to this namespace (created in a setns() thread)."""
        return self.enter_thread(_socket.socket, family, type, proto)

    def write_sysctl(self, key: str, value: str) -> None:
        """Set a net.* sysctl of this namespace only (/proc/sys/net is per namespace)."""
        if not key.startswith("net."):
            raise ValueError(f"only net.* sysctls are per-namespace, got {key!r}")
        path = "/proc/sys/" + key.replace(".", "/")

        def write() -> None:
            with open(path, "w") as f:
                f.write(value)

        self.enter_thread(write)

    def listeners(self, proto: Literal["tcp", "udp"] = "tcp") -> list[tuple[str, int]]:
        """(address, port) of listening TCP / bound UDP sockets, from ``ss``."""
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        out = self.run("ss", flag).stdout
        found: list[tuple[str, int]] = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            host, _, port = fields[3].rpartition(":")
            host = host.strip("[]").split("%", 1)[0]
            with contextlib.suppress(ValueError):
                found.append((host, int(port)))
        return found

    def wait_port(
        self,
        port: int,
        host: str | None = None,
        timeout: float = 10.0,
        *,
        proto: Literal["tcp", "udp"] = "tcp",
    ) -> None:
        """Poll ``ss`` until something listens on ``port`` (on ``host`` or a wildcard)."""
        want: set[str] | None = None
        if host is not None:
            v6 = ipaddress.ip_address(host).version == 6
            want = {host, "*", "::"} if v6 else {host, "*", "::", "0.0.0.0"}
        deadline = time.monotonic() + timeout
        while True:
            for addr, p in self.listeners(proto):
                if p == port and (want is None or addr in want):
                    return
            if time.monotonic() >= deadline:
                where = f"{host}:{port}" if host else f"port {port}"
                raise TimeoutError(
                    f"no {proto} listener on {where} in {self.name} after {timeout}s"
                )
            time.sleep(0.05)

    def add_addrs(self, dev: str, addrs: Iterable[str]) -> None:
        """Add test addresses to ``dev``; IPv6 ones with ``nodad`` so they are usable at once."""
        for addr in addrs:
            iface = _check_test_addr(addr)
            extra = ["nodad"] if iface.version == 6 else []
            self.ip("addr", "add", str(iface), "dev", dev, *extra)

    def wait_not_tentative(self, dev: str, timeout: float = 5.0) -> None:
        """Wait until no IPv6 address on ``dev`` is tentative (DAD would make binds fail)."""
        deadline = time.monotonic() + timeout
        while self.ip("-6", "addr", "show", "dev", dev, "tentative").stdout.strip():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"IPv6 addresses on {dev} in {self.name} still tentative")
            time.sleep(0.05)


class Topology:
    """Owns a set of namespaces and removes all of them on exit, whatever happened."""

    def __init__(self) -> None:
        self.namespaces: dict[str, Namespace] = {}
        self._closed = False
        _live_topologies.add(self)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, tag: str) -> Namespace:
        """Create namespace ``tlw<pid>n<k>-<tag>`` with lo up and IPv6 DAD off."""
        if self._closed:
            raise RuntimeError("topology already closed")
        if tag in self.namespaces:
            raise ValueError(f"namespace tag {tag!r} already used")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", tag):
            raise ValueError(f"tag must be short lowercase alphanumeric, got {tag!r}")
        name = f"{prefix()}n{_next()}-{tag}"
        _run(["ip", "netns", "add", name])
        ns = Namespace(name)
        self.namespaces[tag] = ns  # registered before configuring, so close() removes it
        ns.ip("link", "set", "dev", "lo", "up")
        if os.path.isdir("/proc/sys/net/ipv6"):
            # Interfaces created later (veth, TUN) inherit "default": no DAD, no tentative wait.
            for key in ("net.ipv6.conf.default.accept_dad", "net.ipv6.conf.all.accept_dad"):
                ns.write_sysctl(key, "0")
        return ns

    def __getitem__(self, tag: str) -> Namespace:
        return self.namespaces[tag]

    def ifname(self, kind: str = "i") -> str:
        """A fresh interface name with this process's prefix (see unique_ifname)."""
        return unique_ifname(kind)

    def veth(
        self,
        ns_a: Namespace,
        ns_b: Namespace,
        addrs_a: Sequence[str] = (),
        addrs_b: Sequence[str] = (),
        *,
        mtu: int | None = None,
    ) -> tuple[str, str]:
        """Create a veth pair directly between two of our namespaces, address it, bring it up.

        Returns (name in ns_a, name in ns_b). The pair is never visible in the root namespace.
        """
        for ns in (ns_a, ns_b):
            if not any(ns is own for own in self.namespaces.values()):
                raise ValueError(f"{ns!r} does not belong to this topology")
        for addr in (*addrs_a, *addrs_b):
            _check_test_addr(addr)
        name_a, name_b = unique_ifname("v"), unique_ifname("v")
        ns_a.ip("link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b.name)
        for ns, dev, addrs in ((ns_a, name_a, addrs_a), (ns_b, name_b, addrs_b)):
            if mtu is not None:
                ns.ip("link", "set", "dev", dev, "mtu", str(mtu))
            ns.add_addrs(dev, addrs)
            ns.ip("link", "set", "dev", dev, "up")
        for ns, dev in ((ns_a, name_a), (ns_b, name_b)):
            _wait_oper_up(ns, dev)
            ns.wait_not_tentative(dev)
        return name_a, name_b

    def close(self) -> None:
        """Stop our processes, then delete every namespace we created; idempotent."""
        if self._closed:
            return
        self._closed = True
        _live_topologies.discard(self)
        errors: list[str] = []
        for ns in self.namespaces.values():
            try:
                ns.stop_processes()
            except Exception as exc:
                errors.append(f"stopping processes in {ns.name}: {exc}")
        for ns in self.namespaces.values():
            try:
                _run(["ip", "netns", "del", ns.name], timeout=30)
            except Exception as exc:
                errors.append(f"deleting {ns.name}: {exc}")
        if errors:
            raise RuntimeError("topology cleanup failed: " + "; ".join(errors))


def _wait_oper_up(ns: Namespace, dev: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while " UP " not in ns.ip("-br", "link", "show", "dev", dev).stdout + " ":
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{dev} in {ns.name} did not come up")
        time.sleep(0.05)


@atexit.register
def _cleanup_at_exit() -> None:
    """Safety net: a topology that escaped its context manager is still removed."""
    for topo in list(_live_topologies):
        with contextlib.suppress(Exception):
            topo.close()


def open_tun_in(ns: Namespace, name: str, mtu: int = 1500, *, vnet_header: bool = False) -> int:
    """Create TUN ``name`` (IFF_TUN|IFF_NO_PI, and IFF_VNET_HDR if ``vnet_header``) inside
    ``ns``; return its non-blocking fd.

    The fd is opened in a setns() thread, so the device is born in ``ns``. The device is not
    persistent: closing the fd removes it.
    """
    _check_ours(name, "interface")
    if len(name) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} too long")

    def create() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_header else 0)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        except BaseException:
            os.close(fd)
            raise
        return fd

    fd = ns.enter_thread(create)
    try:
        os.set_blocking(fd, False)
        ns.ip("link", "set", "dev", name, "mtu", str(mtu), "up")
    except BaseException:
        os.close(fd)
        raise
    return fd


def move_link(name: str, from_ns: Namespace, to_ns: Namespace) -> None:
    """Move interface ``name`` between two of our namespaces (it goes down, addresses are lost)."""
    _check_ours(name, "interface")
    from_ns.ip("link", "set", "dev", name, "netns", to_ns.name)


def setup_client_tun(
    cli_ns: Namespace,
    ifname: str,
    *,
    client_addr4: str | None = f"{CLIENT_ADDR4}/32",
    client_addr6: str | None = f"{CLIENT_ADDR6}/64",
    mtu: int | None = None,
) -> None:
    """Make TUN ``ifname`` in ``cli_ns`` the client's uplink: addresses and default routes.

    The gateway's own addresses (198.18.0.1, fd00:18::1) live in lwIP, so the kernel side only
    gets the client addresses, and everything (v4 and v6) is routed into the TUN.
    """
    _check_ours(ifname, "interface")
    if mtu is not None:
        cli_ns.ip("link", "set", "dev", ifname, "mtu", str(mtu))
    cli_ns.ip("link", "set", "dev", ifname, "up")
    if client_addr4 is not None:
        cli_ns.add_addrs(ifname, [client_addr4])
        cli_ns.ip("-4", "route", "replace", "default", "dev", ifname)
    if client_addr6 is not None:
        cli_ns.add_addrs(ifname, [client_addr6])
        cli_ns.ip("-6", "route", "replace", "default", "dev", ifname)
        cli_ns.wait_not_tentative(ifname)


@dataclass
class SplitTopology:
    """The split topology (docs/architecture.md#test-topology): gateway sockets in ``gw``,
    upstreams in ``srv``, clients in ``cli`` (whose uplink is the gateway's TUN, moved there by
    :meth:`client_tun`)."""

    topo: Topology
    gw: Namespace
    srv: Namespace
    cli: Namespace
    gw_veth: str
    srv_veth: str

    def client_tun(self, mtu: int = 1500, name: str | None = None) -> tuple[int, str]:
        """Create a TUN in ``gw``, move it to ``cli`` and configure the client side.

        Returns (fd, ifname); the fd (held in gw) keeps working after the move.
        """
        ifname = name or unique_ifname("t")
        fd = open_tun_in(self.gw, ifname, mtu)
        try:
            move_link(ifname, self.gw, self.cli)
            setup_client_tun(self.cli, ifname, mtu=mtu)
        except BaseException:
            os.close(fd)
            raise
        return fd, ifname


def split_topology(topo: Topology) -> SplitTopology:
    """Build namespaces gw, srv (joined by veth) and cli inside ``topo``.

    gw only has the connected routes of the veth (198.18.1.0/24, fd00:1::/64): no default route,
    so nothing can leak to a real network.
    """
    gw, srv, cli = topo.add("gw"), topo.add("srv"), topo.add("cli")
    gw_veth, srv_veth = topo.veth(
        gw,
        srv,
        addrs_a=[f"{GW_VETH_ADDR4}/24", f"{GW_VETH_ADDR6}/64"],
        addrs_b=[f"{SRV_ADDR4}/24", f"{SRV_ADDR6}/64"],
    )
    return SplitTopology(topo, gw, srv, cli, gw_veth, srv_veth)

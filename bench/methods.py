"""The ways a client namespace reaches the server namespace, built on tests/netns.py.

Why one module: each method must put the same client programs (in ``cli``) and the same
servers (in ``srv``, 198.18.1.2 / fd00:1::2 behind gw's veth) on either side of a different
middle, so that the figures differ only by the middle::

    kernel       cli --veth--> gw (ip_forward=1) --veth--> srv
    slirp4netns  cli --tap--> slirp4netns in gw (libslirp, sockets) --veth--> srv
    pasta        cli --tap--> pasta in gw (passt, sockets) --veth--> srv
    hev          cli --TUN==fd==> hev-socks5-tunnel in gw (lwIP) --SOCKS5, lo--> danted in gw
                 (sockets) --veth--> srv
    tunlwip      cli --TUN==fd==> tunlwip up in gw (lwIP, sockets) --veth--> srv
    tunlwip-w2   the same with ``--workers 2``
    tunlwip-socks5  tunlwip up in gw with ``--proxy socks5://`` to danted on gw's loopback
                 (hev's danted, the same configuration) --veth--> srv: a proxied route's cost

Every address is in 198.18.0.0/15 or fd00::/8; every namespace and interface comes from the
netns helpers (per-process prefix) and is removed with its Topology.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _load_netns() -> ModuleType:
    """tests/netns.py, imported by path (tests/ is not a package) and registered as ``netns``
    so that every importer shares one module and its cleanup-at-exit registry."""
    if "netns" in sys.modules:
        return sys.modules["netns"]
    spec = importlib.util.spec_from_file_location("netns", ROOT / "tests" / "netns.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns"] = module
    spec.loader.exec_module(module)
    return module


netns = _load_netns()
Namespace = netns.Namespace
SplitTopology = netns.SplitTopology
GATEWAY_ADDR4: str = netns.GATEWAY_ADDR4
GATEWAY_ADDR6: str = netns.GATEWAY_ADDR6
GW_VETH_ADDR4: str = netns.GW_VETH_ADDR4
GW_VETH_ADDR6: str = netns.GW_VETH_ADDR6
SRV_ADDR4: str = netns.SRV_ADDR4
SRV_ADDR6: str = netns.SRV_ADDR6
move_link = netns.move_link
setup_client_tun = netns.setup_client_tun
unique_ifname = netns.unique_ifname

#: Kernel method: the cli <-> gw link (the same client addresses tunlwip's TUN gets).
KCLI_ADDR4, KCLI_ADDR6 = "198.18.0.2", "fd00:18::2"
#: slirp4netns' virtual network (its default is 10.0.2.0/24, outside the test ranges).
SLIRP_CIDR = "198.18.2.0/24"
#: pasta's namespace side: address and gateway it hands to cli.
PASTA_ADDR4, PASTA_GW4 = "198.18.3.2", "198.18.3.1"
PASTA_ADDR6, PASTA_GW6 = "fd00:3::2", "fd00:3::1"

#: In run order: a method's baselines (the kernel for every row, slirp4netns, pasta and hev
#: for tunlwip, tunlwip for tunlwip-w2 and tunlwip-socks5) are measured before it, so its
#: ratios exist when its figure is recorded.
METHODS = ("kernel", "slirp4netns", "pasta", "hev", "tunlwip", "tunlwip-w2", "tunlwip-socks5")
#: Where the hev method looks for hev-socks5-tunnel (not packaged by Debian; bench/README.md
#: says how to build it): ``--hev-bin`` (which sets this variable), then the variable, then PATH.
HEV_ENV = "HEV_SOCKS5_TUNNEL"
HEV_NAME = "hev-socks5-tunnel"
#: danted's SOCKS5 port on gw's loopback, where hev-socks5-tunnel sends every flow.
SOCKS_PORT = 1080


class MethodUnavailable(Exception):
    """The method cannot run here (tool missing, MTU unsupported): skipped with this reason."""


@dataclass
class Middle:
    """A method set up between cli and srv."""

    method: str
    pid: int | None  # the userspace gateway process (None for the kernel)
    dns_server: str  # where cli sends DNS queries
    log_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    #: Every process the gateway is made of besides ``pid`` (hev's danted); CPU and memory
    #: are summed over these and all their descendants (tunlwip's workers, danted's children).
    helpers: list[int] = field(default_factory=list)

    @property
    def roots(self) -> list[int]:
        """The processes whose trees are the gateway (empty for the kernel)."""
        return ([self.pid] if self.pid is not None else []) + self.helpers

    def alive(self) -> bool:
        return all(Path(f"/proc/{pid}").exists() for pid in self.roots)

    def log_tail(self, size: int = 1500) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-size:]


def wait_until(pred: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll every 50 ms, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def has_default_routes(ns: Namespace, v6: bool = True) -> bool:
    v4 = "default" in ns.ip("-4", "route", "show", "default").stdout
    six = "default" in ns.ip("-6", "route", "show", "default").stdout if v6 else True
    return v4 and six


def set_mtu(ns: Namespace, dev: str, mtu: int) -> None:
    ns.ip("link", "set", "dev", dev, "mtu", str(mtu))


def hev_binary() -> tuple[str | None, str]:
    """hev-socks5-tunnel's path, or None and why it was not found."""
    given = os.environ.get(HEV_ENV)
    if given:
        if os.path.isfile(given) and os.access(given, os.X_OK):
            return given, ""
        return None, f"{HEV_ENV}={given} (or --hev-bin) is not an executable file"
    found = shutil.which(HEV_NAME)
    if found:
        return found, ""
    return None, (
        f"{HEV_NAME} not found (--hev-bin PATH, {HEV_ENV}, or PATH; not packaged by Debian: "
        "bench/README.md says how to build it)"
    )


@functools.cache
def tunlwip_has_workers() -> bool:
    """Whether this tunlwip's ``up`` takes ``--workers`` (asked once, from its --help)."""
    r = subprocess.run(
        [sys.executable, "-m", "tunlwip", "up", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--workers" in r.stdout


def available(method: str, mtu: int) -> str | None:
    """Why ``method`` cannot run at ``mtu`` here, or None."""
    tool = {"slirp4netns": "slirp4netns", "pasta": "pasta", "hev": "danted",
            "tunlwip-socks5": "danted"}.get(method)  # fmt: skip
    if tool and shutil.which(tool) is None:
        package = {"pasta": "passt", "danted": "dante-server"}.get(tool, tool)
        return f"{tool} not installed (Debian package {package})"
    if method == "slirp4netns" and mtu > 65521:
        return "slirp4netns supports MTU <= 65521"
    if method == "hev":
        path, why = hev_binary()
        if path is None:
            return why
    if method.startswith("tunlwip"):
        try:
            import tunlwip  # noqa: F401
        except ImportError as exc:
            return f"tunlwip not importable by {sys.executable}: {exc}"
    if method == "tunlwip-w2" and not tunlwip_has_workers():
        return "this tunlwip has no `up --workers` (not in `tunlwip up --help`)"
    return None


def start(
    method: str, split: SplitTopology, mtu: int, work: Path, tunlwip_args: Sequence[str] = ()
) -> Middle:
    """Build ``method`` between split.cli and split.srv; return once cli has its routes.
    ``tunlwip_args`` are extra ``tunlwip up`` flags (the soak's short UDP timeout, say)."""
    set_mtu(split.gw, split.gw_veth, mtu)
    set_mtu(split.srv, split.srv_veth, mtu)
    if method == "kernel":
        return _kernel(split, mtu)
    if method == "slirp4netns":
        return _slirp(split, mtu, work)
    if method == "pasta":
        return _pasta(split, mtu, work)
    if method == "hev":
        return _hev(split, mtu, work)
    if method == "tunlwip":
        return _tunlwip(split, mtu, work, tunlwip_args)
    if method == "tunlwip-w2":
        middle = _tunlwip(split, mtu, work, [*tunlwip_args, "--workers", "2"])
        middle.method = method
        return middle
    if method == "tunlwip-socks5":
        return _tunlwip_socks5(split, mtu, work, tunlwip_args)
    raise ValueError(f"unknown method {method!r}")


def _kernel(split: SplitTopology, mtu: int) -> Middle:
    cli, gw, srv = split.cli, split.gw, split.srv
    split.topo.veth(
        cli,
        gw,
        addrs_a=[f"{KCLI_ADDR4}/24", f"{KCLI_ADDR6}/64"],
        addrs_b=[f"{GATEWAY_ADDR4}/24", f"{GATEWAY_ADDR6}/64"],
        mtu=mtu,
    )
    cli.ip("-4", "route", "add", "default", "via", GATEWAY_ADDR4)
    cli.ip("-6", "route", "add", "default", "via", GATEWAY_ADDR6)
    gw.write_sysctl("net.ipv4.ip_forward", "1")
    gw.write_sysctl("net.ipv6.conf.all.forwarding", "1")
    # Only this method needs srv to route back to the client addresses.
    srv.ip("-4", "route", "add", "default", "via", GW_VETH_ADDR4)
    srv.ip("-6", "route", "add", "default", "via", GW_VETH_ADDR6)
    return Middle("kernel", None, SRV_ADDR4)


def _spawn(ns: Namespace, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return ns.popen(args, stdout=log, stderr=subprocess.STDOUT)


def _check_running(proc: subprocess.Popen[bytes], log_path: Path, what: str) -> None:
    if proc.poll() is not None:
        raise RuntimeError(
            f"{what} exited {proc.returncode}: {log_path.read_text(errors='replace')[-800:]}"
        )


def _slirp(split: SplitTopology, mtu: int, work: Path) -> Middle:
    """slirp4netns runs in gw (its sockets reach srv over gw's veth) and plugs a tap into cli,
    which it configures itself (--configure: address .100, default route via .2, IPv6 by RA)."""
    tap = unique_ifname("s")
    log_path = work / "slirp4netns.log"
    args = [
        "slirp4netns",
        "--configure",
        f"--mtu={mtu}",
        f"--cidr={SLIRP_CIDR}",
        "--enable-ipv6",
        "--disable-host-loopback",
        "--netns-type=path",
        split.cli.path,
        tap,
    ]
    proc = _spawn(split.gw, args, log_path)

    def ready() -> bool:
        _check_running(proc, log_path, "slirp4netns")
        return has_default_routes(split.cli)

    wait_until(ready, "slirp4netns to configure cli (IPv4 route and IPv6 RA)", 15)
    return Middle("slirp4netns", proc.pid, SRV_ADDR4, log_path)


def _pasta(split: SplitTopology, mtu: int, work: Path) -> Middle:
    """pasta runs in gw attached to cli's netns by path. As root it would drop to "nobody" and
    then fail to join the namespace, so ``--runas 0:0``; no port forwarding either way; explicit
    addresses (its default copies the host's, and gw has no default route to copy from)."""
    tap = unique_ifname("p")
    log_path = work / "pasta.log"
    args = [
        "pasta",
        "--config-net",
        "-f",
        "-q",
        "--runas",
        "0:0",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "-i",
        split.gw_veth,
        "-I",
        tap,
        "-m",
        str(mtu),
        "--no-map-gw",
        "-a",
        PASTA_ADDR4,
        "-n",
        "24",
        "-g",
        PASTA_GW4,
        "-a",
        PASTA_ADDR6,
        "-g",
        PASTA_GW6,
        "--netns",
        split.cli.path,
    ]
    proc = _spawn(split.gw, args, log_path)

    def ready() -> bool:
        _check_running(proc, log_path, "pasta")
        return has_default_routes(split.cli)

    wait_until(ready, "pasta to configure cli", 15)
    have = split.cli.ip("link", "show", "dev", tap).stdout
    if f"mtu {mtu} " not in have:
        set_mtu(split.cli, tap, mtu)
    return Middle("pasta", proc.pid, SRV_ADDR4, log_path)


@functools.cache
def compile_tunlwip() -> None:
    """Byte-compile the tunlwip package ``sys.executable`` imports, as installing it does (pip
    writes every module's bytecode); bytecode already up to date is left alone. Why: from an
    editable install under PYTHONDONTWRITEBYTECODE, every start compiles about 85 modules from
    source, and what the compiler frees stays behind in the allocator's arenas: 0.5 MiB more
    idle RSS than an installed gateway has (docs/performance.md, *Idle memory*)."""
    spec = importlib.util.find_spec("tunlwip")
    if spec is None or not spec.submodule_search_locations:
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", *spec.submodule_search_locations],
                   stdout=subprocess.DEVNULL, check=False, timeout=120)  # fmt: skip


def _tunlwip(split: SplitTopology, mtu: int, work: Path, extra: Sequence[str] = ()) -> Middle:
    """``tunlwip up`` in gw; its TUN then moves to cli (as conftest's split_gateway does).
    --max-udp-sessions is raised above the default 4096, and with it the one client's share
    of them (``udp.max_sessions_per_client``, a file-only key; by default a quarter), so the
    5,000-session test is not measuring eviction or refusal; everything else is the default
    configuration. It starts from bytecode, as an installed gateway does (``compile_tunlwip``)."""
    compile_tunlwip()
    iface = unique_ifname("t")
    log_path = work / "tunlwip.log"
    config = work / "tunlwip.toml"
    config.write_text("[udp]\nmax_sessions_per_client = 16384\n")
    args = [
        sys.executable,
        "-m",
        "tunlwip",
        "up",
        "--config",
        str(config),
        "--iface",
        iface,
        "--mtu",
        str(mtu),
        "--dns-upstream",
        f"udp://{SRV_ADDR4}:53",
        "--max-udp-sessions",
        "16384",
        "--grace",
        "1",
        "--log-level",
        "info",
        *extra,
    ]
    proc = _spawn(split.gw, args, log_path)

    def serving() -> bool:
        _check_running(proc, log_path, "tunlwip up")
        return f"up: iface {iface} " in log_path.read_text(errors="replace")

    wait_until(serving, "tunlwip up to serve", 30)
    move_link(iface, split.gw, split.cli)
    setup_client_tun(split.cli, iface, mtu=mtu)
    return Middle("tunlwip", proc.pid, GATEWAY_ADDR4, log_path)


def danted_conf(work: Path, external_iface: str) -> str:
    """danted as an open SOCKS5 proxy for gw's loopback only: no authentication, TCP connect
    and UDP associate to anywhere, leaving through gw's veth (both families)."""
    return "\n".join(
        [
            f"logoutput: {work / 'danted.log'}",
            f"internal: 127.0.0.1 port = {SOCKS_PORT}",
            f"external: {external_iface}",
            "socksmethod: none",
            "clientmethod: none",
            "user.privileged: root",
            "user.unprivileged: root",
            "client pass { from: 127.0.0.0/8 to: 0/0 }",
            "socks pass { from: 0/0 to: 0/0 command: connect udpassociate udpreply }",
            "",
        ]
    )


def _danted(split: SplitTopology, work: Path) -> subprocess.Popen[bytes]:
    """danted in gw on loopback (``danted_conf``), started by PID; returns once it listens."""
    danted_path = work / "danted.conf"
    danted_path.write_text(danted_conf(work, split.gw_veth))
    danted_log = work / "danted.out"
    danted = _spawn(split.gw, ["danted", "-f", str(danted_path)], danted_log)

    def listening() -> bool:
        _check_running(danted, danted_log, "danted")
        return any(p == SOCKS_PORT for _, p in split.gw.listeners("tcp"))

    wait_until(listening, f"danted to listen on 127.0.0.1:{SOCKS_PORT}", 15)
    return danted


def _tunlwip_socks5(split: SplitTopology, mtu: int, work: Path,
                    extra: Sequence[str] = ()) -> Middle:  # fmt: skip
    """tunlwip with every flow routed through danted (``--proxy``), the route a SOCKS5 user
    of tunlwip configures: TCP by CONNECT, UDP by UDP ASSOCIATE, DNS still answered by the
    gateway's own proxy (its upstream queries leave directly)."""
    danted = _danted(split, work)
    middle = _tunlwip(split, mtu, work, [*extra, "--proxy", f"socks5://127.0.0.1:{SOCKS_PORT}"])
    middle.method = "tunlwip-socks5"
    middle.helpers.append(danted.pid)
    return middle


def hev_conf(iface: str, mtu: int) -> str:
    """hev-socks5-tunnel: its TUN (no addresses: they would be lost when the TUN moves to
    cli) and danted on loopback, UDP by SOCKS5 UDP ASSOCIATE (danted has no UDP-in-TCP)."""
    return (
        f"tunnel:\n  name: {iface}\n  mtu: {mtu}\n  multi-queue: false\n"
        f"socks5:\n  port: {SOCKS_PORT}\n  address: 127.0.0.1\n  udp: 'udp'\n"
        "misc:\n  log-file: stderr\n  log-level: warn\n  limit-nofile: 65535\n"
    )


def _hev(split: SplitTopology, mtu: int, work: Path) -> Middle:
    """danted in gw (loopback in, gw's veth out), then hev-socks5-tunnel in gw pointing at it;
    hev's TUN then moves to cli as tunlwip's does. Both are started by PID through gw.popen
    and stopped by PID with the topology; their configuration lives in ``work``."""
    hev_bin, why = hev_binary()
    if hev_bin is None:
        raise MethodUnavailable(why)
    danted = _danted(split, work)
    iface = unique_ifname("h")
    conf = work / "hev.yml"
    conf.write_text(hev_conf(iface, mtu))
    log_path = work / "hev.log"
    proc = _spawn(split.gw, [hev_bin, str(conf)], log_path)

    def tun_up() -> bool:
        # hev sets the link up last, after its MTU: then the TUN may move.
        _check_running(proc, log_path, HEV_NAME)
        shown = split.gw.ip("link", "show", "dev", iface, check=False)
        return shown.returncode == 0 and ",UP" in shown.stdout.split(">")[0]

    wait_until(tun_up, f"{HEV_NAME} to bring {iface} up", 15)
    move_link(iface, split.gw, split.cli)
    setup_client_tun(split.cli, iface, mtu=mtu)
    return Middle("hev", proc.pid, SRV_ADDR4, log_path, helpers=[danted.pid])

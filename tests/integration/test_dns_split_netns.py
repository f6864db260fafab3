"""Split DNS (``[[dns.route]]``) and DNS upstreams reached through a SOCKS5 proxy, with ``tunlwip
up --config``, dig in cli, two unbound servers and danted in srv.

Why: which server learns a name and whose answer the client gets is only believable from real
programs. The two unbound servers answer different addresses for the same name, so dig's answer
says which one resolved it, and each logs the queries it got (``log-queries``), so the default
server's log proves that a split name never leaked to it, not even when the split server is
down; the split server's log shows who asked (danted's address, not the gateway's, when the
route goes through the proxy), and danted's own log shows the connections it carried.

Topology (split, see dnsenv.py)::

    [cli] dig @198.18.0.1 -- TUN --> [gw] tunlwip up --config F -- veth --> [srv] 198.18.1.2:
        default unbound :53 (udp/tcp), split unbound :5353 (udp/tcp) and :853 (DoT),
        danted :1080 and tinyproxy :8888 (their connections leave from 198.18.1.2 itself)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dnsenv import Dig, dig, make_cert, resolves
from gatewayproc import RunningGateway, StartGateway, wait_for
from netns import GATEWAY_ADDR4, GW_VETH_ADDR4, SRV_ADDR4, Namespace, SplitTopology

pytestmark = pytest.mark.netns

DANTED = "/usr/sbin/danted"
SPLIT_PORT, DOT_PORT, SOCKS_PORT, HTTP_PORT = 5353, 853, 1080, 8888
#: The same names in both servers, with different answers: the answer says who resolved it.
DEFAULT_A = {"www.corp.test": "198.18.9.1", "www.tls.test": "198.18.9.1",
             "www.test": "198.18.9.10", "www2.test": "198.18.9.11",
             "www3.test": "198.18.9.12", "www4.test": "198.18.9.13"}  # fmt: skip
SPLIT_A = {"www.corp.test": "198.18.9.2", "www2.corp.test": "198.18.9.3",
           "www3.corp.test": "198.18.9.4", "www.tls.test": "198.18.9.5"}  # fmt: skip


class Unbound:
    """unbound -d in srv on ``port`` (and DoT on 853 with ``cert``), logging every query."""

    def __init__(self, ns: Namespace, work: Path, port: int, records: dict[str, str],
                 tls: bool = False) -> None:  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "unbound.log"
        server = [
            f"interface: {SRV_ADDR4}@{port}", "do-daemonize: no", 'username: ""', 'chroot: ""',
            f'directory: "{work}"', 'pidfile: ""', "use-syslog: no",
            f'logfile: "{self.log_path}"', "log-queries: yes", "verbosity: 1",
            "access-control: 0.0.0.0/0 allow", 'module-config: "iterator"',
            'local-zone: "test." static',
            'local-data: "test. 300 IN SOA ns.test. admin.test. 1 3600 600 86400 60"',
            *(f'local-data: "{name}. 300 IN A {addr}"' for name, addr in records.items()),
        ]  # fmt: skip
        if tls:
            server += [f"interface: {SRV_ADDR4}@{DOT_PORT}", f"tls-port: {DOT_PORT}",
                       f'tls-service-key: "{work / "key.pem"}"',
                       f'tls-service-pem: "{work / "cert.pem"}"']  # fmt: skip
        conf = work / "unbound.conf"
        conf.write_text("server:\n" + "".join(f"    {line}\n" for line in server))
        with (work / "stdout.log").open("wb") as out:
            self.proc = ns.popen(["unbound", "-d", "-c", str(conf)], stdout=out,
                                 stderr=subprocess.STDOUT)  # fmt: skip
        for proto in ("udp", "tcp"):
            ns.wait_port(port, SRV_ADDR4, proto=proto)
        if tls:
            ns.wait_port(DOT_PORT, SRV_ADDR4)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def askers(self, name: str) -> list[str]:
        """The source address of each ``name A`` query unbound got."""
        line = re.compile(rf"info: (\S+) {re.escape(name)}\. A IN$", re.I | re.M)
        return line.findall(self.log())

    def queries_under(self, suffix: str) -> list[str]:
        """Every query line for a name under ``suffix``."""
        return [line for line in self.log().splitlines()
                if re.search(rf"info: \S+ (\S+\.)?{re.escape(suffix)}\. ", line)]  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def danted_in(ns: Namespace, work: Path) -> Iterator[Path]:
    """danted in ``ns`` on SRV_ADDR4:SOCKS_PORT for the gateway's veth address, logging every
    connection; yields its log. Its own process group (it forks), stopped by its PID."""
    work.mkdir(parents=True, exist_ok=True)
    conf, log = work / "danted.conf", work / "danted.log"
    conf.write_text(
        f"logoutput: {log}\n"
        f"internal: {SRV_ADDR4} port = {SOCKS_PORT}\n"
        f"external: {SRV_ADDR4}\n"
        "clientmethod: none\nsocksmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        f"client pass {{\n from: {GW_VETH_ADDR4}/32 to: 0.0.0.0/0\n log: connect error\n}}\n"
        f"socks pass {{\n from: {GW_VETH_ADDR4}/32 to: 0.0.0.0/0\n command: connect\n"
        " log: connect disconnect error\n}\n"
    )
    with (work / "stdout.log").open("wb") as out:
        proc = ns.popen([DANTED, "-f", str(conf), "-N", "1", "-p", str(work / "danted.pid")],
                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        ns.wait_port(SOCKS_PORT, SRV_ADDR4)
        yield log
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group of the danted we started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
                break


@pytest.fixture
def servers(split: SplitTopology, tmp_path: Path,
            require_tool: Callable[[str], str]) -> tuple[Unbound, Unbound]:  # fmt: skip
    """(default unbound on :53, split unbound on :5353 and DoT :853) in srv."""
    require_tool("unbound")
    require_tool("dig")
    require_tool("openssl")
    (tmp_path / "split").mkdir()
    make_cert(tmp_path / "split")
    default = Unbound(split.srv, tmp_path / "default", 53, DEFAULT_A)
    return default, Unbound(split.srv, tmp_path / "split", SPLIT_PORT, SPLIT_A, tls=True)


def start(split_gateway: StartGateway, path: Path, text: str) -> RunningGateway:
    path.write_text(text)
    return split_gateway("--config", str(path))


def ask(split: SplitTopology, name: str, *opts: str) -> Dig:
    return dig(split.cli, GATEWAY_ADDR4, name, "A", *opts)


#: The corp route leaves bound to the gateway's veth (``direct?interface``); the "lo" route,
#: bound to loopback, cannot reach srv at all: its SERVFAIL shows the binding is applied.
SPLIT_FILE = f"""\
[dns]
upstreams = ["udp://{SRV_ADDR4}:53"]
attempt_timeout = 1.0
query_timeout = 2.0

[[dns.route]]
name = "corp"
domains = ["*.corp.test"]
upstreams = ["udp://{SRV_ADDR4}:{SPLIT_PORT}"]
via = "direct?interface=VETH"

[[dns.route]]
name = "lo"
domains = ["*.lo.test"]
upstreams = ["tcp://{SRV_ADDR4}:{SPLIT_PORT}"]
via = "direct?interface=lo"
"""


def test_split_names_go_to_their_upstream_only_even_when_it_is_down(
    split: SplitTopology, split_gateway: StartGateway, servers: tuple[Unbound, Unbound],
    tmp_path: Path,
) -> None:  # fmt: skip
    default, corp = servers
    gw = start(split_gateway, tmp_path / "split.toml", SPLIT_FILE.replace("VETH", split.gw_veth))
    assert f"dns routes: corp [udp://198.18.1.2:5353] via direct?interface={split.gw_veth}; " \
        "lo [tcp://198.18.1.2:5353] via direct?interface=lo" in gw.log(), gw.tail()  # fmt: skip
    assert ask(split, "www.lo.test").status == "SERVFAIL", gw.tail()
    resolves(ask(split, "www.corp.test"), "A", SPLIT_A["www.corp.test"], gw, "split name")
    resolves(ask(split, "www.test"), "A", DEFAULT_A["www.test"], gw, "other name")
    resolves(ask(split, "www2.corp.test", "+tcp"), "A", SPLIT_A["www2.corp.test"], gw, "tcp")
    corp.stop()
    started = time.monotonic()
    down = ask(split, "www3.corp.test")
    assert down.status == "SERVFAIL", f"{down.output}\n{gw.tail()}"
    assert time.monotonic() - started < 2.0 + 1.5  # the query's deadline at most
    resolves(ask(split, "www2.test"), "A", DEFAULT_A["www2.test"], gw, "others still resolve")
    assert default.queries_under("corp.test") == [], "a split name leaked to the default"
    assert default.askers("www.test") and default.askers("www2.test"), default.log()
    totals = gw.status()["totals"]["dns_routes"]
    assert totals["queries"] == {"corp": 3, "lo": 1, "default": 2}, totals
    assert totals["failures"] == {"corp": 1, "lo": 1, "default": 0}, totals
    assert corp.queries_under("lo.test") == default.queries_under("lo.test") == []
    table = subprocess.run(
        [sys.executable, "-m", "tunlwip", "status", "--iface", gw.iface],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "split dns: corp 3 (failed 1), lo 1 (failed 1), default 2" in table, table
    metrics = subprocess.run([sys.executable, "-m", "tunlwip", "status", "--iface", gw.iface,
                              "--format", "prometheus"], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
    assert 'tunlwip_split_dns_queries_total{dns_route="corp"} 3' in metrics, metrics
    assert 'tunlwip_split_dns_failures_total{dns_route="corp"} 1' in metrics, metrics


def via_file(cert: Path, routes: str) -> str:
    return f"""\
[dns]
upstreams = ["udp://{SRV_ADDR4}:53"]
ca_file = "{cert}"
{routes}"""


VIA_ROUTES = f"""
[[dns.route]]
name = "corp"
domains = ["*.corp.test"]
upstreams = ["tcp://{SRV_ADDR4}:{SPLIT_PORT}"]
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}"

[[dns.route]]
name = "tls"
domains = ["tls.test", "*.tls.test"]
upstreams = ["tls://{SRV_ADDR4}:{DOT_PORT}#dot.test"]
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}"
"""


#: After the reload: the corp route takes other names, the tls route is gone.
REROUTED = f"""
[[dns.route]]
name = "corp"
domains = ["*.other.test"]
upstreams = ["tcp://{SRV_ADDR4}:{SPLIT_PORT}"]
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}"
"""


def test_upstreams_through_danted_over_tcp_and_tls_and_a_reload_swaps_routes(
    split: SplitTopology, split_gateway: StartGateway, servers: tuple[Unbound, Unbound],
    tmp_path: Path,
) -> None:  # fmt: skip
    default, corp = servers
    cert = tmp_path / "split" / "cert.pem"
    with danted_in(split.srv, tmp_path / "danted") as danted_log:
        path = tmp_path / "via.toml"
        gw = start(split_gateway, path, via_file(cert, VIA_ROUTES))
        resolves(ask(split, "www.corp.test"), "A", SPLIT_A["www.corp.test"], gw, "tcp via socks5")
        resolves(ask(split, "www.tls.test"), "A", SPLIT_A["www.tls.test"], gw, "tls via socks5")
        resolves(ask(split, "www.test"), "A", DEFAULT_A["www.test"], gw, "default, direct")
        # Through the proxy, the split server was asked by danted (its external address), not
        # by the gateway; the default server by the gateway itself.
        assert corp.askers("www.corp.test") == [SRV_ADDR4], corp.log()
        assert corp.askers("www.tls.test") == [SRV_ADDR4], corp.log()
        assert default.askers("www.test") == [GW_VETH_ADDR4], default.log()
        carried = danted_log.read_text()
        assert re.search(rf"{re.escape(SRV_ADDR4)}\.{SPLIT_PORT}\b", carried), carried
        assert re.search(rf"{re.escape(SRV_ADDR4)}\.{DOT_PORT}\b", carried), carried
        assert default.queries_under("corp.test") == default.queries_under("tls.test") == []

        # Reload: corp.test now goes to the default upstreams, the tls route stays.
        path.write_text(via_file(cert, REROUTED))
        before = gw.log().count("reloaded ")
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: gw.log().count("reloaded ") > before, f"reload; {gw.tail()}", 5)
        line = [x for x in gw.log().splitlines() if "reloaded " in x][-1]
        assert "dns routes corp [tcp://198.18.1.2:5353] via socks5://198.18.1.2:1080" in line, line
        resolves(ask(split, "www.corp.test"), "A", DEFAULT_A["www.corp.test"], gw,
                 "after the reload: the default's answer, not a cached split one")  # fmt: skip
        resolves(ask(split, "www.tls.test"), "A", DEFAULT_A["www.tls.test"], gw, "tls route gone")
        assert len(corp.askers("www.corp.test")) == 1
        totals = gw.status()["totals"]["dns_routes"]
        assert totals["queries"] == {"corp": 1, "default": 3}, totals  # corp's count goes on
        gw.stop()


@contextlib.contextmanager
def tinyproxy_in(ns: Namespace, work: Path) -> Iterator[Path]:
    """tinyproxy in ``ns`` on SRV_ADDR4:HTTP_PORT, CONNECT to port 53 only, for the gateway's
    veth address; yields its log. Stopped by its PID."""
    work.mkdir(parents=True, exist_ok=True)
    conf, log = work / "tinyproxy.conf", work / "tinyproxy.log"
    lines = [f"Port {HTTP_PORT}", f"Listen {SRV_ADDR4}", "Timeout 30", f"Allow {GW_VETH_ADDR4}",
             "ConnectPort 53", "LogLevel Info", "MaxClients 10", f'LogFile "{log}"']  # fmt: skip
    conf.write_text("\n".join(lines) + "\n")
    with (work / "stdout.log").open("wb") as out:
        proc = ns.popen(["tinyproxy", "-d", "-c", str(conf)], stdout=out,
                        stderr=subprocess.STDOUT)  # fmt: skip
    try:
        ns.wait_port(HTTP_PORT, SRV_ADDR4)
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_default_upstreams_through_an_http_connect_proxy(
    split: SplitTopology, split_gateway: StartGateway, servers: tuple[Unbound, Unbound],
    tmp_path: Path, require_tool: Callable[[str], str],
) -> None:  # fmt: skip
    """``dns.via``: the default upstreams (tcp://) through tinyproxy's CONNECT; a split route
    without a via still goes direct."""
    require_tool("tinyproxy")
    default, corp = servers
    text = f"""\
[dns]
upstreams = ["tcp://{SRV_ADDR4}:53"]
via = "http://{SRV_ADDR4}:{HTTP_PORT}"

[[dns.route]]
domains = ["*.corp.test"]
upstreams = ["udp://{SRV_ADDR4}:{SPLIT_PORT}"]
"""
    with tinyproxy_in(split.srv, tmp_path / "tinyproxy") as proxy_log:
        gw = start(split_gateway, tmp_path / "http.toml", text)
        resolves(ask(split, "www3.test"), "A", DEFAULT_A["www3.test"], gw, "via http CONNECT")
        resolves(ask(split, "www.corp.test"), "A", SPLIT_A["www.corp.test"], gw, "split, direct")
        assert default.askers("www3.test") == [SRV_ADDR4], default.log()  # tinyproxy asked
        assert corp.askers("www.corp.test") == [GW_VETH_ADDR4], corp.log()  # the gateway did
        carried = proxy_log.read_text()
        assert re.search(rf"CONNECT\S* .*{re.escape(SRV_ADDR4)}:53", carried), carried
        gw.stop()

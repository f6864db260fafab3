"""Shared ground of the DNS proxy's namespace tests (tests/integration/test_dns*_netns.py):
unbound's zone and the block lists, unbound in srv, dig in cli, what the gateway logged, and
the fixtures ``start_unbound``, ``lists`` and ``dns_gateway``.

Why: the unit tests (tests/test_dns_proxy.py) drive the proxy with in-memory messages; only
real clients and a real resolver show what users get. The tests are split by concern, all on
this ground: test_dns_netns.py (resolution, block/allow lists, hijack modes),
test_dns_upstream_netns.py (dead, slow and encrypted upstreams, matching, malformed queries),
test_dns_cache_netns.py (TTLs, truncation to TCP, SIGHUP reload) and
test_dns_adversarial_netns.py (clients and answers that try to get around the proxy). Each
helper script (a python -c program run in a namespace) lives beside the tests that use it.

A test module uses the fixtures here by importing them as themselves
(``from dnsenv import dns_gateway as dns_gateway``): pytest looks fixtures up by name in the
test module, and the redundant alias tells ruff the import is deliberate. ``dns_gateway``
requests ``start_unbound``, so a module importing one imports both.

Split topology (as in test_udp_icmp_netns.py)::

    [cli]                          [gw]                                [srv]
    dig, dnspython scripts         tunlwip up --iface T                unbound: zone "test."
    T: 198.18.0.2/32               DNS proxy (198.18.0.1, fd00:18::1;  udp/tcp 53, DoT 853
       fd00:18::2/64               port 53 to anywhere by default)     log-queries: yes;
                                                                       DoH test server 443
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- veth 198.18.1.2
                                                   fd00:1::1               fd00:1::2
                                   198.18.1.77: on srv's link, owned by nobody (a silent
                                   upstream, and the forwarder unbound hangs on for slow.test)
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gatewayproc import RunningGateway, StartGateway, wait_for
from netns import (
    GATEWAY_ADDR4,
    GATEWAY_ADDR6,
    SRV_ADDR4,
    SRV_ADDR6,
    Namespace,
    SplitTopology,
)

QUERY_TIMEOUT = 5.0  # the proxy's per-query timeout: SERVFAIL after it
ATTEMPT_TIMEOUT = 2.0  # what one upstream gets before the next one is tried
SLACK = 1.0
#: On srv's subnet but assigned to no one: queries sent there are never answered.
NOBODY4 = "198.18.1.77"
CLOSED_PORT = 5399  # nothing listens there on srv: ICMP port unreachable / RST
UPSTREAM4 = f"udp://{SRV_ADDR4}:53"
UPSTREAM6 = f"udp://[{SRV_ADDR6}]:53"

GATEWAYS = [
    pytest.param(GATEWAY_ADDR4, id="v4"),
    pytest.param(GATEWAY_ADDR6, id="v6"),
]
HARD_CODED = [
    pytest.param(SRV_ADDR4, id="v4"),
    pytest.param(SRV_ADDR6, id="v6"),
]

WWW4, WWW6 = "198.18.5.5", "fd00:5::5"
#: name -> its A record in unbound's zone (every name a block rule may cover resolves there,
#: so a NOERROR with this address means "not blocked").
ZONE_A = {
    "www.test": WWW4,
    "ads.test": "198.18.5.10",
    "x.ads.test": "198.18.5.11",
    "ok.ads.test": "198.18.5.12",
    "deep.ok.ads.test": "198.18.5.13",
    "fine.ads.test": "198.18.5.14",
    "x.fine.ads.test": "198.18.5.15",
    "star.test": "198.18.5.20",
    "x.star.test": "198.18.5.21",
    "dotted.test": "198.18.5.22",
    "x.dotted.test": "198.18.5.23",
    "exact.test": "198.18.5.24",
    "sub.exact.test": "198.18.5.25",
    "tracker.test": "198.18.5.26",
    "tracker2.test": "198.18.5.27",
    "later.test": "198.18.5.28",
    **{f"host{i}.test": f"198.18.7.{i}" for i in range(1, 65)},
}
ZONE_AAAA = {"www.test": WWW6, "ads.test": "fd00:5::10", "ok.ads.test": "fd00:5::12"}
TTL2_NAME, TTL2_ADDR = "ttl2.test", "198.18.5.30"
BIG_NAME, BIG_COUNT = "big.test", 200  # 200 A records: a 3.2 KB answer
SLOW_NAME = "slow.test"  # unbound forwards it to NOBODY4 and hangs
#: CNAME chains, in an auth-zone of unbound's (local-data CNAMEs are not followed; an auth-zone's
#: are, as a recursive resolver's): cloak -> hop -> x.tracker (a tracker behind an innocent
#: name), alias -> www (harmless).
CHAIN_ZONE = "chain.test"
CHAIN_ZONEFILE = f"""\
$ORIGIN {CHAIN_ZONE}.
@ 300 IN SOA ns.test. admin.test. 1 3600 600 86400 60
@ 300 IN NS ns.test.
cloak 300 IN CNAME hop
hop 300 IN CNAME x.tracker
x.tracker 300 IN A 198.18.5.40
alias 300 IN CNAME www
www 300 IN A {WWW4}
"""

#: Block lists in every format the proxy reads (two files), and an allow list.
BLOCK_DOMAINS = """\
# domain list: exact names and whole suffixes
||ads.test^
*.star.test
.dotted.test
exact.test
"""
BLOCK_HOSTS = """\
# hosts-file format: exact names
0.0.0.0 tracker.test
127.0.0.1   tracker2.test   # trailing comment
"""
ALLOW = """\
# exceptions under a blocked suffix: one exact name, one whole subtree
ok.ads.test
||fine.ads.test^
"""
BLOCKED = [
    *("ads.test", "x.ads.test", "deep.ok.ads.test", "star.test", "x.star.test"),
    *("dotted.test", "x.dotted.test", "exact.test", "tracker.test", "tracker2.test"),
]
NOT_BLOCKED = ["www.test", "sub.exact.test", "ok.ads.test", "fine.ads.test", "x.fine.ads.test"]

STATS = re.compile(
    r"dns: queries (?P<queries>\d+) blocked (?P<blocked>\d+) overridden (?P<overridden>\d+) "
    r"cached (?P<cached>\d+) \(replayed \d+\) forwarded (?P<forwarded>\d+) failed (?P<failed>\d+) "
    r"\(timeouts (?P<timeouts>\d+)\) truncated (?P<truncated>\d+) malformed (?P<malformed>\d+)"
)


# -- unbound in srv ---------------------------------------------------------------------------


def unbound_conf(work: Path, *, tls: bool) -> str:
    """unbound.conf for srv: static zone "test." (see ZONE_A), logging every query."""
    server = [
        f"interface: {SRV_ADDR4}",
        f"interface: {SRV_ADDR6}",
        "port: 53",
        "do-daemonize: no",
        'username: ""',
        'chroot: ""',
        f'directory: "{work}"',
        'pidfile: ""',
        "use-syslog: no",
        f'logfile: "{work / "unbound.log"}"',
        "log-queries: yes",
        "verbosity: 1",
        "access-control: 0.0.0.0/0 allow",
        "access-control: ::/0 allow",
        "do-not-query-localhost: no",
        'module-config: "iterator"',
        'local-zone: "test." static',
        'local-data: "test. 300 IN SOA ns.test. admin.test. 1 3600 600 86400 60"',
        # slow.test falls through to the iterator, which forwards it to nobody: it hangs.
        f'local-zone: "{SLOW_NAME}." transparent',
        f'local-data: "{TTL2_NAME}. 2 IN A {TTL2_ADDR}"',
    ]
    server += [f'local-data: "{name}. 300 IN A {addr}"' for name, addr in ZONE_A.items()]
    server.append(f'local-zone: "{CHAIN_ZONE}." transparent')  # to the auth-zone below
    (work / "chain.zone").write_text(CHAIN_ZONEFILE)
    server += [f'local-data: "{name}. 300 IN AAAA {addr}"' for name, addr in ZONE_AAAA.items()]
    server += [f'local-data: "{BIG_NAME}. 300 IN A 198.18.6.{i}"' for i in range(1, BIG_COUNT + 1)]
    if tls:
        server += [
            f"interface: {SRV_ADDR4}@853",
            f"interface: {SRV_ADDR6}@853",
            "tls-port: 853",
            f'tls-service-key: "{work / "key.pem"}"',
            f'tls-service-pem: "{work / "cert.pem"}"',
        ]
    forward = [f'name: "{SLOW_NAME}."', f"forward-addr: {NOBODY4}"]
    auth = [f'name: "{CHAIN_ZONE}."', f'zonefile: "{work / "chain.zone"}"',
            "for-downstream: yes", "for-upstream: yes"]  # fmt: skip
    return (
        "server:\n"
        + "".join(f"    {line}\n" for line in server)
        + "forward-zone:\n"
        + "".join(f"    {line}\n" for line in forward)
        + "auth-zone:\n"
        + "".join(f"    {line}\n" for line in auth)
    )


@dataclasses.dataclass
class Unbound:
    """unbound -d in srv; every query it receives is a line of ``log_path``."""

    ns: Namespace
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def queries(self, name: str, rdtype: str = "A") -> int:
        """How many ``name rdtype`` queries reached unbound (its log-queries lines)."""
        line = re.compile(rf"info: \S+ {re.escape(name)}\. {rdtype} IN$", re.I | re.M)
        return len(line.findall(self.log()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def make_cert(work: Path) -> Path:
    """Self-signed certificate for "dot.test" and 198.18.1.2 (key.pem, cert.pem in work)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", str(work / "key.pem"), "-out", str(work / "cert.pem"), "-days", "1",
         "-subj", "/CN=dot.test", "-addext", f"subjectAltName=DNS:dot.test,IP:{SRV_ADDR4}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return work / "cert.pem"


@pytest.fixture
def start_unbound(
    split: SplitTopology, tmp_path: Path, require_tool: Callable[[str], str]
) -> Callable[..., Unbound]:
    """Factory: unbound in srv (``tls=True``: DoT on 853 too, with make_cert's files),
    returned once it listens on all its addresses."""
    unbound = require_tool("unbound")
    require_tool("dig")

    def start(*, tls: bool = False) -> Unbound:
        work = tmp_path / "unbound"
        work.mkdir(exist_ok=True)
        if tls:
            require_tool("openssl")
            make_cert(work)
        conf = work / "unbound.conf"
        conf.write_text(unbound_conf(work, tls=tls))
        with (work / "stdout.log").open("wb") as out:
            proc = split.srv.popen([unbound, "-d", "-c", str(conf)], stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        server = Unbound(split.srv, proc, work / "unbound.log")
        ports = [(53, "udp"), (53, "tcp")] + ([(853, "tcp")] if tls else [])

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"unbound exited {proc.returncode}: "
                    f"{(work / 'stdout.log').read_text()}{server.log()}"
                )
            have = set(split.srv.listeners("udp")) | set(split.srv.listeners("tcp"))
            return all((addr, port) in have for addr in (SRV_ADDR4, SRV_ADDR6) for port, _ in ports)

        wait_for(listening, "unbound to listen", timeout=10)
        for port, proto in ports:
            split.srv.wait_port(port, SRV_ADDR4, proto=proto)  # type: ignore[arg-type]
        return server

    return start


# -- dig in cli -------------------------------------------------------------------------------


@dataclasses.dataclass
class Dig:
    """What one ``dig`` saw. ``status`` is None when no answer came at all."""

    status: str | None
    flags: set[str]
    answers: list[tuple[str, int, str, str]]  # (name, ttl, type, data)
    transport: str | None  # "UDP" or "TCP", of the last exchange
    elapsed: float
    output: str

    def data(self, rdtype: str | None = None) -> list[str]:
        return [d for _, _, t, d in self.answers if rdtype is None or t == rdtype]


def parse_dig(output: str, elapsed: float) -> Dig:
    statuses = re.findall(r"status: ([A-Z]+)", output)
    flags = re.findall(r";; flags: ([a-z ]*);", output)
    transports = re.findall(r";; SERVER: \S+ \((UDP|TCP|TLS)\)", output)
    answers: list[tuple[str, int, str, str]] = []
    section = output.rsplit(";; ANSWER SECTION:\n", 1)
    if len(section) == 2 and statuses:
        for line in section[1].splitlines():
            fields = line.split(None, 4)
            if len(fields) < 5:
                break
            answers.append((fields[0].rstrip(".").lower(), int(fields[1]), fields[3], fields[4]))
    return Dig(
        status=statuses[-1] if statuses else None,
        flags=set(flags[-1].split()) if flags else set(),
        answers=answers,
        transport=transports[-1] if transports else None,
        elapsed=elapsed,
        output=output,
    )


def dig_args(server: str, name: str, rdtype: str, opts: tuple[str, ...], wait: float) -> list[str]:
    return ["dig", f"@{server}", "+tries=1", f"+time={wait:g}", *opts, name, rdtype]


def dig(
    ns: Namespace, server: str, name: str, rdtype: str = "A", *opts: str, wait: float = 3
) -> Dig:
    """``dig @server name rdtype`` in ``ns`` (one try, ``wait`` s per exchange), timed."""
    started = time.monotonic()
    result = ns.run(*dig_args(server, name, rdtype, opts, wait), check=False,
                    timeout=3 * wait + 10)  # fmt: skip
    return parse_dig(result.stdout + result.stderr, time.monotonic() - started)


class BackgroundDig:
    """A dig running in the background (ns.popen: stopped with the namespace's processes)."""

    def __init__(self, ns: Namespace, server: str, name: str, *opts: str, wait: float) -> None:
        self.started = time.monotonic()
        self.proc: subprocess.Popen[str] = ns.popen(
            dig_args(server, name, "A", opts, wait),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self, timeout: float) -> Dig:
        out, _ = self.proc.communicate(timeout=timeout)
        return parse_dig(out, time.monotonic() - self.started)


def expect(result: Dig, status: str, gw: RunningGateway, what: str = "") -> Dig:
    assert result.status == status, (
        f"{what}: expected {status}, got {result.status}\n{result.output}\n{gw.tail()}"
    )
    return result


def resolves(result: Dig, rdtype: str, addr: str, gw: RunningGateway, what: str = "") -> None:
    expect(result, "NOERROR", gw, what)
    assert result.data(rdtype) == [addr], f"{what}:\n{result.output}\n{gw.tail()}"


# -- the gateway's side -----------------------------------------------------------------------


def proxy_log(gw: RunningGateway, name: str, rdtype: str = "A") -> list[tuple[str, str]]:
    """(rcode, via) of each query-log line the gateway wrote for ``name rdtype``."""
    line = re.compile(rf"\bdns \S+ {re.escape(name)}\.? {rdtype} -> (\S+) via (\S+)", re.I)
    return line.findall(gw.log())


def dns_counters(gw: RunningGateway) -> dict[str, int]:
    """Stop the gateway (SIGTERM, exit 0) and parse its last ``dns: queries ...`` line."""
    print(gw.stop())
    found = list(STATS.finditer(gw.log()))
    assert found, f"no 'dns: queries' line; {gw.tail()}"
    assert found[-1].start() > gw.log().rindex("tunlwip: stopped"), gw.tail()
    print(found[-1].group(0))
    return {key: int(value) for key, value in found[-1].groupdict().items()}


def upstream(*urls: str) -> list[str]:
    return [arg for url in urls for arg in ("--dns-upstream", url)]


@pytest.fixture
def lists(tmp_path: Path) -> dict[str, Path]:
    """The BLOCK_DOMAINS, BLOCK_HOSTS and ALLOW files."""
    files = {"domains": BLOCK_DOMAINS, "hosts": BLOCK_HOSTS, "allow": ALLOW}
    paths = {}
    for label, text in files.items():
        paths[label] = tmp_path / f"{label}.list"
        paths[label].write_text(text)
    return paths


def list_args(lists: dict[str, Path]) -> list[str]:
    return ["--dns-block", str(lists["domains"]), "--dns-block", str(lists["hosts"]),
            "--dns-allow", str(lists["allow"])]  # fmt: skip


@pytest.fixture
def dns_gateway(
    split: SplitTopology, split_gateway: StartGateway, start_unbound: Callable[..., Unbound]
) -> Callable[..., tuple[RunningGateway, Unbound]]:
    """Factory: unbound in srv, then ``tunlwip up --dns-upstream udp://198.18.1.2:53 *args``
    (unless args name their own upstreams)."""

    def start(*args: str, tls: bool = False) -> tuple[RunningGateway, Unbound]:
        server = start_unbound(tls=tls)
        extra = [] if "--dns-upstream" in args else upstream(UPSTREAM4)
        gw = split_gateway(*extra, *args)
        if "off" not in args:
            assert "dns: hijack" in gw.log(), gw.tail()
        return gw, server

    return start

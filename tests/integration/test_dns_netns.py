"""The DNS proxy of ``tunlwip up`` with real programs: ``dig`` in cli, unbound in srv.

Why: the unit tests (tests/test_dns_proxy.py) drive the proxy with in-memory messages; only real
clients and a real resolver show what users get: that dig's answers are right over UDP and TCP
and both IP versions, that block/allow lists and the blocked-answer modes behave as in a
filtering resolver, that a resolver hard-coded by an app is answered (and filtered) by the
proxy, that a dead or hanging upstream costs one query a SERVFAIL after the timeout but never
stalls the others, that DNS over TLS and over HTTPS are verified, that the cache honours TTLs,
that a big answer makes dig fall back to TCP, that SIGHUP reloads the lists, and that the proxy
holds up against adversarial clients and answers: no CD=1 or EDNS-Client-Subnet answer served
to another client from the cache, a CNAME to a blocked name blocked, a DNS-over-TCP client
trickling bytes cut off at the query deadline, and DoT refused with ``--dns-reject-encrypted``.

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
import signal
import subprocess
import sys
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

pytestmark = pytest.mark.netns

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

#: Two UDP sockets (FAMILY, to SERVER:53) send queries with the SAME message ID at the same
#: moment, for two different names, ROUNDS times: each socket must get the answer to its own
#: question (ID, question and address). Names hostI.test resolve to 198.18.7.I.
SAME_ID_SCRIPT = r"""
import random, socket, sys
import dns.message, dns.rdatatype

FAMILY, SERVER, ROUNDS = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = random.Random(5)
socks = [socket.socket(FAMILY, socket.SOCK_DGRAM) for _ in range(2)]
for s in socks:
    s.settimeout(3.0)
bad = []
for r in range(ROUNDS):
    qid = rng.randrange(1 << 16)
    hosts = [2 * r + 1, 2 * r + 2]
    queries = []
    for h in hosts:
        q = dns.message.make_query(f"host{h}.test", "A")
        q.id = qid
        queries.append(q.to_wire())
    for s, wire in zip(socks, queries):
        s.sendto(wire, (SERVER, 53))
    for s, h in zip(socks, hosts):
        try:
            resp = dns.message.from_wire(s.recv(4096))
        except TimeoutError:
            bad.append((r, h, "timeout"))
            continue
        got = [rd.address for rrset in resp.answer for rd in rrset
               if rrset.rdtype == dns.rdatatype.A]
        name = resp.question[0].name.to_text() if resp.question else None
        if resp.id != qid or name != f"host{h}.test." or got != [f"198.18.7.{h}"]:
            bad.append((r, h, resp.id, qid, name, got))
print(f"{2 * ROUNDS - len(bad)}/{2 * ROUNDS} answers right; wrong: {bad[:5]}")
sys.exit(1 if bad else 0)
"""

#: One TCP connection to SERVER:53; three length-prefixed queries written at once, the first
#: for a name the upstream hangs on. The two others must be answered first (out of order), each
#: within 1 s; the first gets SERVFAIL. Prints "order: ..." and exits 0 when all is right.
PIPELINE_SCRIPT = r"""
import socket, struct, sys, time
import dns.message, dns.rcode

FAMILY, SERVER, SLOW = int(sys.argv[1]), sys.argv[2], sys.argv[3]
names = {1: SLOW, 2: "host61.test", 3: "host62.test"}
wire = b""
for qid, name in names.items():
    q = dns.message.make_query(name, "A")
    q.id = qid
    w = q.to_wire()
    wire += struct.pack("!H", len(w)) + w
s = socket.create_connection((SERVER, 53), timeout=10)
start = time.monotonic()
s.sendall(wire)
buf = b""
order = []
while len(order) < 3:
    while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            chunk = b""
        if not chunk:
            print(f"closed or silent early; order {order}")
            sys.exit(1)
        buf += chunk
    n = struct.unpack("!H", buf[:2])[0]
    resp = dns.message.from_wire(buf[2:2 + n])
    buf = buf[2 + n:]
    order.append((resp.id, dns.rcode.to_text(resp.rcode()), round(time.monotonic() - start, 2),
                  [rd.to_text() for rrset in resp.answer for rd in rrset]))
print("order:", order)
ok = ([o[0] for o in order] in ([2, 3, 1], [3, 2, 1]) and order[2][1] == "SERVFAIL"
      and all(o[1] == "NOERROR" and o[2] < 1.0 for o in order[:2]))
sys.exit(0 if ok else 1)
"""

#: Malformed messages to SERVER:53 over UDP, each answered with FORMERR (same ID) or not at
#: all, then a valid query that must be answered. Prints what each got.
MALFORMED_SCRIPT = r"""
import random, socket, struct, sys
import dns.message, dns.rcode

FAMILY, SERVER = int(sys.argv[1]), sys.argv[2]
rng = random.Random(53)
header = lambda qid, flags, qd, an, ns, ar: struct.pack("!6H", qid, flags, qd, an, ns, ar)
question = b"\x03www\x04test\x00" + struct.pack("!HH", 1, 1)
cases = {
    "empty": b"",
    "short header": b"\x12\x34\x01",
    "header only, qdcount 1": header(0x1111, 0x0100, 1, 0, 0, 0),
    "qdcount 5, one question": header(0x2222, 0x0100, 5, 0, 0, 0) + question,
    "compression loop": header(0x3333, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01",
    "label past the end": header(0x4444, 0x0100, 1, 0, 0, 0) + b"\x3fwww",
    "ancount 3, nothing": header(0x5555, 0x0100, 1, 3, 0, 0) + question,
    "a response, not a query": header(0x6666, 0x8180, 1, 0, 0, 0) + question,
}
for i in range(20):
    cases[f"random {i}"] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
s = socket.socket(FAMILY, socket.SOCK_DGRAM)
s.settimeout(0.3)
for label, data in cases.items():
    s.sendto(data, (SERVER, 53))
    try:
        reply = s.recv(4096)
    except TimeoutError:
        print(f"{label}: no reply")
        continue
    qid = struct.unpack("!H", reply[:2])[0] if len(reply) >= 2 else None
    rcode = reply[3] & 0x0F if len(reply) >= 4 else None
    sent_id = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
    print(f"{label}: reply id {qid} rcode {rcode}")
    if qid != sent_id or rcode not in (1, 4, 5):  # FORMERR, NOTIMP or REFUSED
        print(f"  unexpected reply to {label}: {reply[:16].hex()}")
        sys.exit(1)
s.settimeout(3.0)
q = dns.message.make_query("www.test", "A")
s.sendto(q.to_wire(), (SERVER, 53))
resp = dns.message.from_wire(s.recv(4096))
print("valid query afterwards:", dns.rcode.to_text(resp.rcode()), resp.answer)
sys.exit(0 if resp.rcode() == 0 and resp.answer else 1)
"""


#: A minimal DoH server (RFC 8484 POST over HTTP/1.1 with keep-alive, TLS with CERT/KEY) on
#: ADDR:PORT...: each request is logged to LOG ("POST <path> host=<Host>") and its body asked
#: of unbound (UPSTREAM:53) over UDP.
DOH_SERVER_SCRIPT = r"""
import http.server, socket, ssl, sys, threading

CERT, KEY, UPSTREAM, LOG, ADDR = sys.argv[1:6]
lock = threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with lock, open(LOG, "a") as log:
            log.write(f"POST {self.path} host={self.headers.get('Host')}"
                      f" type={self.headers.get('Content-Type')}\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(body, (UPSTREAM, 53))
            answer = s.recv(65535)
        self.send_response(200)
        self.send_header("Content-Type", "application/dns-message")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(CERT, KEY)
for port in sys.argv[6:]:
    server = Server((ADDR, int(port)), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Event().wait()
"""

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


# -- 1. resolution ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("server", GATEWAYS)
def test_resolves_through_proxy(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    transport: str, server: str,
) -> None:  # fmt: skip
    """dig @gateway over UDP and TCP, v4 and v6 transport: www.test A and AAAA are unbound's
    data, the answers came over the transport asked for, and the proxy logged both queries
    as answered by the upstream."""
    gw, unbound = dns_gateway()
    opts = ("+tcp",) if transport == "tcp" else ()
    for rdtype, addr in (("A", WWW4), ("AAAA", WWW6)):
        result = dig(split.cli, server, "www.test", rdtype, *opts)
        resolves(result, rdtype, addr, gw, f"www.test {rdtype}")
        assert result.transport == transport.upper(), result.output
        assert proxy_log(gw, "www.test", rdtype) == [("NOERROR", UPSTREAM4)], gw.tail()
        assert unbound.queries("www.test", rdtype) == 1, unbound.log()
    counters = dns_counters(gw)
    assert counters["queries"] == 2 and counters["forwarded"] == 2, counters


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(UPSTREAM6, id="udp-v6"),
        pytest.param(f"tcp://{SRV_ADDR4}:53", id="tcp-v4"),
        pytest.param(f"tcp://[{SRV_ADDR6}]", id="tcp-v6-default-port"),
        pytest.param(f"udp://{SRV_ADDR4}", id="udp-v4-default-port"),
    ],
)
def test_upstream_transports(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]], url: str
) -> None:
    """Each plain upstream URL form reaches unbound: www.test resolves and the query log names
    the upstream used."""
    gw, unbound = dns_gateway(*upstream(url))
    resolves(dig(split.cli, GATEWAY_ADDR4, "www.test"), "A", WWW4, gw, url)
    via = [v for _, v in proxy_log(gw, "www.test")]
    addr = SRV_ADDR6 if "[" in url else SRV_ADDR4
    assert len(via) == 1 and via[0].startswith(url[:6]) and addr in via[0], gw.tail()
    assert unbound.queries("www.test") == 1, unbound.log()


# -- 2. block and allow lists -----------------------------------------------------------------


def test_block_lists_nxdomain(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
) -> None:
    """Two block lists (domain list with ||x^, *.x and .x suffixes and an exact name; hosts
    file) and an allow list: blocked names get NXDOMAIN without reaching unbound, an exact
    rule spares the name's subdomains, and allow-listed subdomains of a blocked suffix resolve
    from unbound's data (an exact allow entry only that name, a suffix entry its subtree)."""
    gw, unbound = dns_gateway(*list_args(lists))
    assert re.search(r"dns: hijack all .*rules [1-9]", gw.log()), gw.tail()
    for name in BLOCKED:
        result = expect(dig(split.cli, GATEWAY_ADDR4, name), "NXDOMAIN", gw, name)
        assert not result.answers, result.output
        logged = [(rcode, via.split(":")[0]) for rcode, via in proxy_log(gw, name)]
        assert logged == [("NXDOMAIN", "block")], f"{name}; {gw.tail()}"
    for name in NOT_BLOCKED:
        resolves(dig(split.cli, GATEWAY_ADDR4, name), "A", ZONE_A[name], gw, name)
    # AAAA of a blocked name too, and over TCP.
    expect(dig(split.cli, GATEWAY_ADDR6, "x.ads.test", "AAAA", "+tcp"), "NXDOMAIN", gw)
    leaked = {name: unbound.queries(name) for name in BLOCKED} | {
        "x.ads.test AAAA": unbound.queries("x.ads.test", "AAAA")
    }
    assert not any(leaked.values()), f"blocked names reached the upstream: {leaked}"
    assert all(unbound.queries(name) == 1 for name in NOT_BLOCKED), unbound.log()
    counters = dns_counters(gw)
    assert counters["blocked"] == len(BLOCKED) + 1, counters


@pytest.mark.parametrize(
    ("answer", "status", "a", "aaaa"),
    [
        pytest.param("nxdomain", "NXDOMAIN", None, None, id="nxdomain"),
        pytest.param("null", "NOERROR", "0.0.0.0", "::", id="null"),
        pytest.param("refused", "REFUSED", None, None, id="refused"),
    ],
)
def test_blocked_answer(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
    answer: str,
    status: str,
    a: str | None,
    aaaa: str | None,
) -> None:
    """``--dns-blocked-answer``: NXDOMAIN, the null address (A 0.0.0.0, AAAA ::) or REFUSED
    for blocked names, v4 and v6 transport; the allow-listed name still resolves."""
    gw, _ = dns_gateway(*list_args(lists), "--dns-blocked-answer", answer)
    for server in (GATEWAY_ADDR4, GATEWAY_ADDR6):
        for rdtype, addr in (("A", a), ("AAAA", aaaa)):
            result = expect(dig(split.cli, server, "x.ads.test", rdtype), status, gw, rdtype)
            assert result.data(rdtype) == ([addr] if addr else []), result.output
    resolves(dig(split.cli, GATEWAY_ADDR4, "ok.ads.test"), "A", ZONE_A["ok.ads.test"], gw)


# -- 3. hijack --------------------------------------------------------------------------------


@pytest.mark.parametrize("resolver", HARD_CODED)
def test_hijack_all_answers_hard_coded_resolver(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
    resolver: str,
) -> None:
    """Default ``--dns-hijack all``: ``dig @198.18.1.2`` (unbound's own address, as an app with a
    hard-coded resolver would) is answered by the proxy over UDP and TCP (its query log shows
    the queries) and a blocked name asked that way still gets NXDOMAIN."""
    gw, unbound = dns_gateway(*list_args(lists))
    resolves(dig(split.cli, resolver, "www.test"), "A", WWW4, gw, "udp")
    resolves(dig(split.cli, resolver, "host1.test", "A", "+tcp"), "A", ZONE_A["host1.test"], gw)
    assert proxy_log(gw, "www.test") == [("NOERROR", UPSTREAM4)], gw.tail()
    assert proxy_log(gw, "host1.test") == [("NOERROR", UPSTREAM4)], gw.tail()
    for opts in ((), ("+tcp",)):
        result = expect(dig(split.cli, resolver, "ads.test", "A", *opts), "NXDOMAIN", gw, "ads")
        assert not result.answers, result.output
    assert unbound.queries("ads.test") == 0, unbound.log()


@pytest.mark.parametrize("resolver", HARD_CODED)
def test_hijack_gateway_forwards_other_port53(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
    resolver: str,
) -> None:
    """``--dns-hijack gateway``: port 53 to another address is forwarded untouched, so a
    blocked name asked of unbound directly gets unbound's answer (UDP and TCP) and the proxy
    logs nothing for it; asked of the gateway's address, it is still blocked."""
    gw, unbound = dns_gateway(*list_args(lists), "--dns-hijack", "gateway")
    for opts in ((), ("+tcp",)):
        result = dig(split.cli, resolver, "ads.test", "A", *opts)
        resolves(result, "A", ZONE_A["ads.test"], gw, f"direct {opts}")
    assert proxy_log(gw, "ads.test") == [], gw.tail()
    assert unbound.queries("ads.test") == 2, unbound.log()
    expect(dig(split.cli, GATEWAY_ADDR4, "ads.test"), "NXDOMAIN", gw, "via the gateway")
    expect(dig(split.cli, GATEWAY_ADDR6, "ads.test", "A", "+tcp"), "NXDOMAIN", gw, "v6 tcp")
    assert unbound.queries("ads.test") == 2, unbound.log()


def test_hijack_off_forwards_everything(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
) -> None:
    """``--dns-hijack off``: no proxy; a blocked name asked of unbound gets unbound's answer,
    and nothing answers DNS on the gateway's own address."""
    gw, unbound = dns_gateway(*list_args(lists), "--dns-hijack", "off")
    resolves(dig(split.cli, SRV_ADDR4, "ads.test"), "A", ZONE_A["ads.test"], gw, "direct")
    assert unbound.queries("ads.test") == 1, unbound.log()
    result = dig(split.cli, GATEWAY_ADDR4, "www.test", "A", wait=1)
    assert result.status is None, f"{result.output}\n{gw.tail()}"
    assert proxy_log(gw, "ads.test") == [] and proxy_log(gw, "www.test") == [], gw.tail()


# -- 4. upstream failure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dead",
    [
        pytest.param("stopped", id="unbound-stopped"),
        pytest.param(f"udp://{SRV_ADDR4}:{CLOSED_PORT}", id="udp-closed-port"),
        pytest.param(f"tcp://{SRV_ADDR4}:{CLOSED_PORT}", id="tcp-closed-port"),
        pytest.param(f"udp://{NOBODY4}", id="udp-silent"),
        pytest.param(f"tcp://{NOBODY4}", id="tcp-silent"),
    ],
)
def test_upstream_down_servfail(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    dead: str,
) -> None:
    """A dead upstream (unbound stopped after a first answer, a closed port, an address
    nobody holds) gives the client SERVFAIL within the 5 s query timeout + 1 s, over UDP and
    TCP, counted as a failure."""
    if dead == "stopped":
        gw, unbound = dns_gateway()
        resolves(dig(split.cli, GATEWAY_ADDR4, "www.test"), "A", WWW4, gw, "before the stop")
        unbound.stop()
    else:
        gw, _ = dns_gateway(*upstream(dead))
    asks: list[tuple[str, tuple[str, ...]]] = [(GATEWAY_ADDR4, ()), (GATEWAY_ADDR6, ("+tcp",))]
    for i, (server, opts) in enumerate(asks, start=1):
        result = expect(dig(split.cli, server, f"host{i}.test", "A", *opts, wait=10), "SERVFAIL",
                        gw, f"{dead} {server} {opts}")  # fmt: skip
        assert result.elapsed <= QUERY_TIMEOUT + SLACK, f"SERVFAIL after {result.elapsed:.2f}s"
        print(f"{dead}: SERVFAIL after {result.elapsed:.2f}s ({server} {opts})")
    counters = dns_counters(gw)
    assert counters["failed"] >= 2, counters


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(f"udp://{NOBODY4}", id="silent"),
        pytest.param(f"udp://{SRV_ADDR4}:{CLOSED_PORT}", id="closed-port"),
    ],
)
def test_failover_to_next_upstream(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    first: str,
) -> None:
    """The first upstream is dead: after at most its 2 s attempt the next one answers, and the
    query log names it."""
    gw, _ = dns_gateway(*upstream(first, UPSTREAM4))
    result = dig(split.cli, GATEWAY_ADDR4, "www.test", wait=10)
    resolves(result, "A", WWW4, gw, "failover")
    assert result.elapsed <= ATTEMPT_TIMEOUT + SLACK, f"answered after {result.elapsed:.2f}s"
    assert proxy_log(gw, "www.test") == [("NOERROR", UPSTREAM4)], gw.tail()


def test_slow_query_does_not_block_others(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]]
) -> None:
    """While a query for slow.test hangs in the upstream, queries for other names, over UDP and
    TCP, v4 and v6, from the same client are answered promptly; slow.test gets SERVFAIL within
    the query timeout."""
    gw, unbound = dns_gateway()
    slow = BackgroundDig(split.cli, GATEWAY_ADDR4, SLOW_NAME, wait=10)
    wait_for(lambda: unbound.queries(SLOW_NAME) >= 1, "slow.test to reach unbound", timeout=3)
    fast = [
        (GATEWAY_ADDR4, ()), (GATEWAY_ADDR4, ("+tcp",)),
        (GATEWAY_ADDR6, ()), (GATEWAY_ADDR6, ("+tcp",)),
    ] * 2  # fmt: skip
    for i, (server, opts) in enumerate(fast, start=1):
        result = dig(split.cli, server, f"host{i}.test", "A", *opts)
        resolves(result, "A", ZONE_A[f"host{i}.test"], gw, f"host{i} {server} {opts}")
        assert result.elapsed < 1.0, f"host{i}.test took {result.elapsed:.2f}s; {gw.tail()}"
    assert slow.running(), "slow.test was answered before the other queries were done"
    result = expect(slow.result(timeout=15), "SERVFAIL", gw, SLOW_NAME)
    assert result.elapsed <= QUERY_TIMEOUT + SLACK, f"SERVFAIL after {result.elapsed:.2f}s"


def test_hanging_upstream_gets_the_query_timeout(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]]
) -> None:
    """With a single upstream that is alive but slow on one name (unbound recursing for
    slow.test), the query gets the whole 5 s query timeout, not just one 2 s attempt: SERVFAIL
    after ~5 s, counted as a timeout."""
    gw, _ = dns_gateway()
    result = expect(dig(split.cli, GATEWAY_ADDR4, SLOW_NAME, wait=10), "SERVFAIL", gw, SLOW_NAME)
    assert QUERY_TIMEOUT - SLACK <= result.elapsed <= QUERY_TIMEOUT + SLACK, (
        f"SERVFAIL after {result.elapsed:.2f}s, expected {QUERY_TIMEOUT:g} s; {gw.tail()}"
    )
    counters = dns_counters(gw)
    assert counters["timeouts"] == 1, counters


@pytest.mark.parametrize("server", GATEWAYS)
def test_tcp_pipelined_out_of_order(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    server: str,
) -> None:
    """Three queries pipelined on one TCP connection, the first hanging upstream: the two
    others are answered first, and the first gets SERVFAIL on the same connection."""
    gw, _ = dns_gateway()
    family = "10" if ":" in server else "2"
    result = split.cli.run(sys.executable, "-c", PIPELINE_SCRIPT, family, server, SLOW_NAME,
                           check=False, timeout=30)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{gw.tail()}"
    print(result.stdout.strip())


# -- 5. matching ------------------------------------------------------------------------------


@pytest.mark.parametrize("server", GATEWAYS)
def test_same_transaction_id_two_clients(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    server: str,
) -> None:
    """Two client sockets send queries with the same ID for different names at the same
    moment, 30 times: each always gets the answer to its own question."""
    gw, _ = dns_gateway()
    family = "10" if ":" in server else "2"
    result = split.cli.run(sys.executable, "-c", SAME_ID_SCRIPT, family, server, "30",
                           check=False, timeout=60)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{gw.tail()}"
    print(result.stdout.strip())


@pytest.mark.parametrize("server", GATEWAYS)
def test_malformed_queries(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    server: str,
) -> None:
    """Garbage, truncated headers, wrong counts, a compression loop and a response sent as
    a query get FORMERR (or another error code, with the sender's ID) or no reply; the proxy
    keeps answering, counts them, and stops cleanly."""
    gw, _ = dns_gateway()
    family = "10" if ":" in server else "2"
    result = split.cli.run(sys.executable, "-c", MALFORMED_SCRIPT, family, server,
                           check=False, timeout=60)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{gw.tail()}"
    print(result.stdout.strip())
    counters = dns_counters(gw)
    assert counters["malformed"] >= 5, counters


# -- 6. DNS over TLS --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"tls://{SRV_ADDR4}:853#dot.test", id="v4"),
        pytest.param(f"tls://[{SRV_ADDR6}]:853#dot.test", id="v6"),
        pytest.param(f"tls://{SRV_ADDR4}#dot.test", id="default-port"),
    ],
)
def test_dot_upstream(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
    url: str,
) -> None:
    """DoT to unbound with a self-signed certificate for dot.test, verified against it
    (``--dns-ca-file``): www.test resolves, via the tls:// upstream."""
    cert = tmp_path / "unbound" / "cert.pem"
    gw, unbound = dns_gateway(*upstream(url), "--dns-ca-file", str(cert), tls=True)
    for rdtype, addr in (("A", WWW4), ("AAAA", WWW6)):
        resolves(dig(split.cli, GATEWAY_ADDR4, "www.test", rdtype, wait=5), rdtype, addr, gw)
    assert [v for _, v in proxy_log(gw, "www.test")] == [url], gw.tail()
    assert unbound.queries("www.test") == 1, unbound.log()


@pytest.mark.parametrize(
    ("url", "ca"),
    [
        pytest.param(f"tls://{SRV_ADDR4}:853#wrong.test", True, id="name-mismatch"),
        pytest.param(f"tls://{SRV_ADDR4}:853#dot.test", False, id="untrusted-ca"),
    ],
)
def test_dot_unverified_servfail(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
    url: str,
    ca: bool,
) -> None:
    """A DoT upstream whose certificate does not verify (name mismatch, or a CA we were not
    given) is not used: the client gets SERVFAIL in time and no query reaches unbound."""
    cert = tmp_path / "unbound" / "cert.pem"
    ca_args = ["--dns-ca-file", str(cert)] if ca else []
    gw, unbound = dns_gateway(*upstream(url), *ca_args, tls=True)
    result = expect(dig(split.cli, GATEWAY_ADDR4, "www.test", wait=10), "SERVFAIL", gw, url)
    assert result.elapsed <= QUERY_TIMEOUT + SLACK, f"SERVFAIL after {result.elapsed:.2f}s"
    assert unbound.queries("www.test") == 0, unbound.log()
    counters = dns_counters(gw)
    assert counters["failed"] >= 1, counters


DOH_PORTS = (443, 8443)


def start_doh(split: SplitTopology, tmp_path: Path) -> Path:
    """DOH_SERVER_SCRIPT in srv on DOH_PORTS with unbound's certificate (start_unbound with
    ``tls=True`` made it); returns the server's request log."""
    work = tmp_path / "unbound"
    log = tmp_path / "doh.log"
    log.touch()
    with (tmp_path / "doh.stderr").open("wb") as err:
        split.srv.popen(
            [sys.executable, "-c", DOH_SERVER_SCRIPT, str(work / "cert.pem"),
             str(work / "key.pem"), SRV_ADDR4, str(log), SRV_ADDR4, *map(str, DOH_PORTS)],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    for port in DOH_PORTS:
        split.srv.wait_port(port, SRV_ADDR4)
    return log


@pytest.mark.parametrize(
    ("url", "request_line"),
    [
        pytest.param(
            f"https://dot.test/dns-query#{SRV_ADDR4}",
            "POST /dns-query host=dot.test type=application/dns-message",
            id="name-and-address",
        ),
        pytest.param(
            f"https://{SRV_ADDR4}:8443/resolve",
            f"POST /resolve host={SRV_ADDR4}:8443 type=application/dns-message",
            id="ip-port-path",
        ),
    ],
)
def test_doh_upstream(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
    url: str,
    request_line: str,
) -> None:
    """DoH (RFC 8484 POST over HTTP/1.1) to a small server in srv that holds the self-signed
    certificate and asks unbound: www.test A and AAAA resolve, the server saw the configured
    path and Host, and the query log names the https:// upstream."""
    cert = tmp_path / "unbound" / "cert.pem"
    gw, _ = dns_gateway(*upstream(url), "--dns-ca-file", str(cert), tls=True)
    doh_log = start_doh(split, tmp_path)
    for rdtype, addr in (("A", WWW4), ("AAAA", WWW6)):
        resolves(dig(split.cli, GATEWAY_ADDR4, "www.test", rdtype, wait=5), rdtype, addr, gw)
    assert doh_log.read_text().splitlines() == [request_line] * 2, doh_log.read_text()
    assert [v for _, v in proxy_log(gw, "www.test")] == [url], gw.tail()


def test_doh_name_mismatch_servfail(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
) -> None:
    """A DoH server whose certificate does not match the URL's host name is not used: SERVFAIL
    in time, and no HTTP request was sent."""
    cert = tmp_path / "unbound" / "cert.pem"
    url = f"https://wrong.test/dns-query#{SRV_ADDR4}"
    gw, _ = dns_gateway(*upstream(url), "--dns-ca-file", str(cert), tls=True)
    doh_log = start_doh(split, tmp_path)
    result = expect(dig(split.cli, GATEWAY_ADDR4, "www.test", wait=10), "SERVFAIL", gw, url)
    assert result.elapsed <= QUERY_TIMEOUT + SLACK, f"SERVFAIL after {result.elapsed:.2f}s"
    assert doh_log.read_text() == "", doh_log.read_text()


# -- 7. cache ---------------------------------------------------------------------------------


def test_cache_honours_ttl(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]]
) -> None:
    """Two identical queries: unbound sees the name once, the second answer is from the cache
    (query log "via cache", TTL not above the record's 2 s); once the TTL has passed, the next
    query reaches unbound again."""
    gw, unbound = dns_gateway()
    first = dig(split.cli, GATEWAY_ADDR4, TTL2_NAME)
    resolves(first, "A", TTL2_ADDR, gw, "first")
    second = dig(split.cli, GATEWAY_ADDR6, TTL2_NAME, "A", "+tcp")
    resolves(second, "A", TTL2_ADDR, gw, "second")
    assert unbound.queries(TTL2_NAME) == 1, unbound.log()
    assert [v for _, v in proxy_log(gw, TTL2_NAME)] == [UPSTREAM4, "cache"], gw.tail()
    assert all(ttl <= 2 for _, ttl, _, _ in second.answers), second.output
    time.sleep(3.0)  # the 2 s TTL runs out
    resolves(dig(split.cli, GATEWAY_ADDR4, TTL2_NAME), "A", TTL2_ADDR, gw, "after the TTL")
    assert unbound.queries(TTL2_NAME) == 2, unbound.log()
    counters = dns_counters(gw)
    assert counters["cached"] == 1 and counters["forwarded"] == 2, counters


def test_negative_cache(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]]
) -> None:
    """An NXDOMAIN from the upstream (with the zone's SOA) is cached too (RFC 2308): the second
    query for the missing name does not reach unbound."""
    gw, unbound = dns_gateway()
    for _ in range(2):
        expect(dig(split.cli, GATEWAY_ADDR4, "missing.test"), "NXDOMAIN", gw, "missing.test")
    assert unbound.queries("missing.test") == 1, unbound.log()
    assert [v for _, v in proxy_log(gw, "missing.test")] == [UPSTREAM4, "cache"], gw.tail()


# -- 8. truncation ----------------------------------------------------------------------------


@pytest.mark.parametrize("server", GATEWAYS)
def test_big_answer_truncated_then_tcp(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    server: str,
) -> None:
    """A 3.2 KB answer: over UDP without EDNS (512) or with dig's 1232 it comes back empty with
    TC; dig without +ignore then retries over TCP and gets all 200 records; a client offering
    a 4096-byte EDNS buffer gets them over UDP."""
    gw, _ = dns_gateway()
    for opts in (("+noedns", "+ignore"), ("+ignore",)):
        result = expect(dig(split.cli, server, BIG_NAME, "A", *opts), "NOERROR", gw, str(opts))
        assert "tc" in result.flags, result.output
        assert result.answers == [] and result.transport == "UDP", result.output
    result = expect(dig(split.cli, server, BIG_NAME, "A", "+noedns"), "NOERROR", gw, "retry")
    assert "Truncated, retrying in TCP mode" in result.output, result.output
    assert result.transport == "TCP" and len(set(result.data("A"))) == BIG_COUNT, result.output
    result = expect(dig(split.cli, server, BIG_NAME, "A", "+bufsize=4096", "+ignore"),
                    "NOERROR", gw, "bufsize 4096")  # fmt: skip
    assert "tc" not in result.flags and result.transport == "UDP", result.output
    assert len(set(result.data("A"))) == BIG_COUNT, result.output
    counters = dns_counters(gw)
    assert counters["truncated"] >= 3, counters


# -- 9. reload --------------------------------------------------------------------------------


def test_sighup_reloads_lists(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
) -> None:
    """SIGHUP re-reads the block list: a name added to it is blocked at once (even though its
    answer is cached), removed again it resolves; a list that cannot be read keeps the old
    policy and the gateway keeps running."""
    block = tmp_path / "reload.list"
    block.write_text("# nothing blocked yet\nads.test\n")
    gw, _ = dns_gateway("--dns-block", str(block))
    resolves(dig(split.cli, GATEWAY_ADDR4, "later.test"), "A", ZONE_A["later.test"], gw, "before")

    def status_after_hup(want: str) -> None:
        gw.proc.send_signal(signal.SIGHUP)
        seen: list[str | None] = []

        def reloaded() -> bool:
            seen.append(dig(split.cli, GATEWAY_ADDR4, "later.test", wait=2).status)
            return seen[-1] == want

        wait_for(reloaded, f"later.test to be {want} after SIGHUP ({seen}); {gw.tail()}", 5)

    block.write_text(block.read_text() + "later.test\n")
    status_after_hup("NXDOMAIN")
    block.write_text("ads.test\n")
    status_after_hup("NOERROR")
    block.write_text(block.read_text() + "later.test\n")
    status_after_hup("NXDOMAIN")
    block.unlink()
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "not reloaded" in gw.log(), "the failed reload to be logged", timeout=5)
    assert gw.proc.poll() is None, gw.tail()
    expect(dig(split.cli, GATEWAY_ADDR4, "later.test"), "NXDOMAIN", gw, "old policy kept")
    expect(dig(split.cli, GATEWAY_ADDR4, "ads.test"), "NXDOMAIN", gw, "old policy kept")


# -- 10. adversaries --------------------------------------------------------------------------

#: An upstream (UDP and TCP on ADDR:PORT) that tailors its A answers like a resolver behind
#: which validation and ECS matter: with CD=1, 198.18.8.66 (what a validating resolver would
#: have refused); with an ECS option for 198.18.X.0/N, 198.18.8.X, echoing the option with
#: scope 24; else 198.18.8.1. Each query is a line of LOG: "<name> cd=<0|1> ecs=<subnet|->".
TAILOR_SCRIPT = r"""
import socket, socketserver, struct, sys, threading
import dns.edns, dns.flags, dns.message, dns.rdatatype, dns.rrset

ADDR, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()

def respond(wire):
    q = dns.message.from_wire(wire)
    ecs = [o for o in q.options if o.otype == dns.edns.OptionType.ECS]
    cd = bool(q.flags & dns.flags.CD)
    if ecs:
        address = "198.18.8." + ecs[0].address.split(".")[2]
    else:
        address = "198.18.8.66" if cd else "198.18.8.1"
    subnet = f"{ecs[0].address}/{ecs[0].srclen}" if ecs else "-"
    with lock, open(LOG, "a") as log:
        log.write(f"{q.question[0].name} cd={int(cd)} ecs={subnet}\n")
    r = dns.message.make_response(q)
    if q.question[0].rdtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", address))
    if ecs:
        r.use_edns(0, options=[dns.edns.ECSOption(ecs[0].address, ecs[0].srclen, 24)])
    return r.to_wire()

class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(respond(data), self.client_address)

class Tcp(socketserver.StreamRequestHandler):
    def handle(self):
        while head := self.rfile.read(2):
            answer = respond(self.rfile.read(struct.unpack("!H", head)[0]))
            self.wfile.write(struct.pack("!H", len(answer)) + answer)

for server in (socketserver.ThreadingUDPServer((ADDR, PORT), Udp),
               socketserver.ThreadingTCPServer((ADDR, PORT), Tcp)):
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Event().wait()
"""
TAILOR_PORT = 5300
TAILOR = f"udp://{SRV_ADDR4}:{TAILOR_PORT}"

#: One TCP connection to SERVER:53 sending a query one byte every PAUSE s, as a client holding
#: the connection open would; prints "reset after <s> s, <n>/<total> bytes" and exits 0 if
#: the gateway reset (or closed) the connection before the query was complete.
TRICKLE_SCRIPT = r"""
import socket, struct, sys, time
import dns.message

FAMILY, SERVER, PAUSE = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
query = dns.message.make_query("www.test", "A").to_wire()
wire = struct.pack("!H", len(query)) + query
s = socket.socket(FAMILY, socket.SOCK_STREAM)
s.settimeout(10)
s.connect((SERVER, 53))
start = time.monotonic()
s.settimeout(PAUSE)
for sent in range(1, len(wire) + 1):
    try:
        s.send(wire[sent - 1:sent])
        if s.recv(4096) == b"":
            raise ConnectionResetError("closed")
    except TimeoutError:
        continue
    except OSError as exc:
        print(f"reset after {time.monotonic() - start:.2f} s, {sent}/{len(wire)} bytes ({exc})")
        sys.exit(0)
print(f"never cut off: all {len(wire)} bytes sent in {time.monotonic() - start:.2f} s")
sys.exit(1)
"""

#: A datagram to SERVER:853 (DNS over QUIC's port) from a connected UDP socket: prints how it
#: ended; exits 0 on ECONNREFUSED (ICMP port unreachable) within WAIT s.
UDP_853_SCRIPT = r"""
import socket, sys, time

FAMILY, SERVER, WAIT = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
s = socket.socket(FAMILY, socket.SOCK_DGRAM)
s.settimeout(WAIT)
s.connect((SERVER, 853))
start = time.monotonic()
s.send(b"\x00" * 64)
try:
    s.recv(4096)
    print("answered")
except ConnectionRefusedError:
    print(f"refused after {time.monotonic() - start:.3f} s")
    sys.exit(0)
except TimeoutError:
    print(f"no answer in {WAIT} s")
sys.exit(1)
"""


def start_tailor(split: SplitTopology, tmp_path: Path) -> Path:
    """TAILOR_SCRIPT in srv on TAILOR_PORT; returns its query log."""
    log = tmp_path / "tailor.log"
    log.touch()
    with (tmp_path / "tailor.stderr").open("wb") as err:
        split.srv.popen([sys.executable, "-c", TAILOR_SCRIPT, SRV_ADDR4, str(TAILOR_PORT),
                         str(log)], stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    split.srv.wait_port(TAILOR_PORT, SRV_ADDR4, proto="udp")
    split.srv.wait_port(TAILOR_PORT, SRV_ADDR4)
    return log


def stop_line_counter(gw: RunningGateway, label: str) -> int:
    """A counter of the stopped gateway's last ``dns: queries ...`` line, by its label."""
    lines = [line for line in gw.log().splitlines() if "dns: queries" in line]
    found = re.search(rf"; {label} (\d+)", lines[-1]) if lines else None
    assert found, f"no '{label}' in the dns line; {gw.tail()}"
    return int(found.group(1))


def test_checking_disabled_answer_is_not_served_to_other_clients(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
) -> None:
    """dig +cd gets the upstream's unvalidated answer; a dig without CD right after must not
    get it from the cache: it is asked upstream and gets its own answer. Each is then cached
    for its kind (CD over TCP and v6 too)."""
    gw, _ = dns_gateway(*upstream(TAILOR))
    log = start_tailor(split, tmp_path)
    resolves(dig(split.cli, GATEWAY_ADDR4, "cd.test", "A", "+cd"), "A", "198.18.8.66", gw, "cd")
    resolves(dig(split.cli, GATEWAY_ADDR4, "cd.test"), "A", "198.18.8.1", gw, "no cd, after cd")
    resolves(dig(split.cli, GATEWAY_ADDR6, "cd.test", "A", "+cd", "+tcp"), "A", "198.18.8.66",
             gw, "cd again")  # fmt: skip
    resolves(dig(split.cli, GATEWAY_ADDR4, "cd.test"), "A", "198.18.8.1", gw, "no cd again")
    assert log.read_text().splitlines() == ["cd.test. cd=1 ecs=-", "cd.test. cd=0 ecs=-"]
    assert [v for _, v in proxy_log(gw, "cd.test")] == [TAILOR, TAILOR, "cache", "cache"]


def test_client_subnet_answers_are_not_served_to_other_subnets(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
) -> None:
    """dig +subnet: each subnet gets the answer tailored to it, a query without ECS gets the
    untailored one, and an ECS answer is never cached (the same subnet asks again upstream);
    only the plain answer comes from the cache."""
    gw, _ = dns_gateway(*upstream(TAILOR))
    log = start_tailor(split, tmp_path)
    asks = [("198.18.100.0/24", "100"), ("198.18.200.0/24", "200"), (None, "1"),
            ("198.18.100.0/24", "100"), (None, "1")]  # fmt: skip
    for subnet, last in asks:
        opts = (f"+subnet={subnet}",) if subnet else ()
        result = dig(split.cli, GATEWAY_ADDR4, "ecs.test", "A", *opts)
        resolves(result, "A", f"198.18.8.{last}", gw, f"subnet {subnet}")
    assert log.read_text().splitlines() == [
        "ecs.test. cd=0 ecs=198.18.100.0/24", "ecs.test. cd=0 ecs=198.18.200.0/24",
        "ecs.test. cd=0 ecs=-", "ecs.test. cd=0 ecs=198.18.100.0/24"]  # fmt: skip
    assert [v for _, v in proxy_log(gw, "ecs.test")] == [TAILOR] * 4 + ["cache"]


@pytest.mark.parametrize(
    ("answer", "status", "a"),
    [pytest.param("nxdomain", "NXDOMAIN", None, id="nxdomain"),
     pytest.param("null", "NOERROR", "0.0.0.0", id="null")],
)  # fmt: skip
def test_cname_to_a_blocked_name_is_blocked(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
    answer: str,
    status: str,
    a: str | None,
) -> None:
    """cloak.chain.test is not blocked, but unbound answers it with the chain cloak CNAME hop
    CNAME x.tracker: the client gets exactly what x.tracker.chain.test itself gets (over UDP
    and TCP; the second time from the cache), while a harmless CNAME resolves."""
    block = tmp_path / "trackers.list"
    block.write_text(f"||tracker.{CHAIN_ZONE}^\n")
    cloak, tracker = f"cloak.{CHAIN_ZONE}", f"x.tracker.{CHAIN_ZONE}"
    gw, unbound = dns_gateway("--dns-block", str(block), "--dns-blocked-answer", answer)
    direct = expect(dig(split.cli, GATEWAY_ADDR4, tracker), status, gw, "tracker")
    for opts in ((), ("+tcp",)):
        cloaked = expect(dig(split.cli, GATEWAY_ADDR4, cloak, "A", *opts), status, gw,
                         f"{cloak} {opts}")  # fmt: skip
        assert cloaked.data() == direct.data() == ([a] if a else []), cloaked.output
    alias = dig(split.cli, GATEWAY_ADDR4, f"alias.{CHAIN_ZONE}")
    expect(alias, "NOERROR", gw, "alias")
    assert alias.data("CNAME") == [f"www.{CHAIN_ZONE}."], alias.output
    assert alias.data("A") == [WWW4], alias.output
    assert unbound.queries(cloak) == 1 and unbound.queries(tracker) == 0, unbound.log()
    assert [via for _, via in proxy_log(gw, cloak)] == [f"cname:{tracker}"] * 2, gw.tail()
    counters = dns_counters(gw)
    assert counters["blocked"] == 3, counters
    assert stop_line_counter(gw, "blocked by cname") == 2


@pytest.mark.parametrize("server", GATEWAYS)
def test_tcp_client_trickling_bytes_is_cut_off(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
    server: str,
) -> None:
    """A DNS-over-TCP client sending its query one byte a second (never idle for the 30 s
    idle timeout) is reset at dns.tcp_query_timeout (3 s here) from its first byte; while it
    trickles, other clients' queries over UDP and TCP are answered at once."""
    conf = tmp_path / "deadline.toml"
    conf.write_text("[dns]\ntcp_query_timeout = 3.0\n")
    gw, _ = dns_gateway("--config", str(conf))
    family = "10" if ":" in server else "2"
    args = [sys.executable, "-c", TRICKLE_SCRIPT, family, server, "1.0"]
    trickle = split.cli.popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    for opts in ((), ("+tcp",)):
        result = dig(split.cli, server, "host1.test", "A", *opts)
        resolves(result, "A", ZONE_A["host1.test"], gw, f"while trickling {opts}")
        assert result.elapsed < 1.0, f"took {result.elapsed:.2f}s; {gw.tail()}"
    out, _ = trickle.communicate(timeout=60)
    assert trickle.returncode == 0, f"{out}\n{gw.tail()}"
    print(out.strip())
    elapsed = float(re.search(r"reset after ([\d.]+) s", out).group(1))  # type: ignore[union-attr]
    assert 3.0 - SLACK <= elapsed <= 3.0 + 1.0 + SLACK, out
    dns_counters(gw)
    assert stop_line_counter(gw, "tcp deadline resets") == 1


def test_dot_is_forwarded_not_hijacked_by_default(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]]
) -> None:
    """Without the switch, dig +tls to unbound's DoT port is an ordinary forwarded flow: it
    reaches unbound, and the proxy sees nothing (what docs/security.md says)."""
    gw, unbound = dns_gateway(tls=True)
    result = dig(split.cli, SRV_ADDR4, "www.test", "A", "+tls", wait=5)
    resolves(result, "A", WWW4, gw, "DoT past the proxy")
    assert result.transport == "TLS", result.output
    assert proxy_log(gw, "www.test") == [] and unbound.queries("www.test") == 1, gw.tail()


@pytest.mark.parametrize("server", HARD_CODED)
def test_reject_encrypted_refuses_dot_and_doq_at_once(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    server: str,
) -> None:
    """``--dns-reject-encrypted``: dig +tls to unbound's DoT port fails at once with
    "connection refused" (RST, as from a closed port) and nothing reaches unbound; a datagram
    to UDP 853 gets ECONNREFUSED at once (ICMP port unreachable); plain DNS to the same
    address is answered by the proxy; DoH resolver names and Firefox's canary are blocked."""
    gw, unbound = dns_gateway("--dns-reject-encrypted", tls=True)
    assert "encrypted rejected" in gw.log(), gw.tail()
    result = dig(split.cli, server, "www.test", "A", "+tls", wait=5)
    assert result.status is None and "connection refused" in result.output.lower(), result.output
    assert result.elapsed < 1.0, f"refused after {result.elapsed:.2f}s"
    family = "10" if ":" in server else "2"
    udp = split.cli.run(sys.executable, "-c", UDP_853_SCRIPT, family, server, "3",
                        check=False, timeout=30)  # fmt: skip
    assert udp.returncode == 0, f"{udp.stdout}{udp.stderr}\n{gw.tail()}"
    print(udp.stdout.strip())
    assert unbound.queries("www.test") == 0, unbound.log()
    resolves(dig(split.cli, server, "www.test"), "A", WWW4, gw, "plain DNS still answered")
    rules = {
        "use-application-dns.net": "use-application-dns.net",
        "dns.google": "*.dns.google",
        "mozilla.cloudflare-dns.com": "*.cloudflare-dns.com",
    }
    for name, rule in rules.items():
        expect(dig(split.cli, GATEWAY_ADDR4, name), "NXDOMAIN", gw, name)
        assert [via for _, via in proxy_log(gw, name)] == [f"block:{rule}"], gw.tail()
    dns_counters(gw)
    assert stop_line_counter(gw, "encrypted dns refused") == 2

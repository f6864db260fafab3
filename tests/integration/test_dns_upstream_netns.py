"""The DNS proxy of ``tunlwip up`` and its upstreams, with dig and unbound (topology and
helpers: dnsenv.py).

Why: an upstream that is dead or hangs must cost one query a SERVFAIL after the timeout (or
the next upstream's answer after one attempt) but never stall the others; answers must reach
the client that asked even when two clients use the same ID, and pipelined TCP queries may be
answered out of order; malformed queries get an error, not a crash; and DNS over TLS and over
HTTPS upstreams are used only when their certificate verifies.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dnsenv import (
    ATTEMPT_TIMEOUT,
    CLOSED_PORT,
    GATEWAYS,
    NOBODY4,
    QUERY_TIMEOUT,
    SLACK,
    SLOW_NAME,
    UPSTREAM4,
    WWW4,
    WWW6,
    ZONE_A,
    BackgroundDig,
    Unbound,
    dig,
    dns_counters,
    expect,
    proxy_log,
    resolves,
    upstream,
)

# Fixtures, imported as themselves: pytest finds a fixture by its name in the test module,
# and `name as name` marks the import as deliberate (not unused) for ruff.
from dnsenv import dns_gateway as dns_gateway
from dnsenv import start_unbound as start_unbound
from gatewayproc import RunningGateway, wait_for
from netns import GATEWAY_ADDR4, GATEWAY_ADDR6, SRV_ADDR4, SRV_ADDR6, SplitTopology

pytestmark = pytest.mark.netns

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

#: SOCKETS UDP sockets (FAMILY, to SERVER:53) each send a query for every hostI.test at once
#: (names spelled in a case of their own per socket, so replay does not answer them), then
#: read every answer: each is the answer to its own question and ID, or REFUSED (the client's
#: share of queries in flight was full). The refused ones are asked again one at a time and
#: must then be answered. Prints "right N refused R" and exits 0 when all is right.
BURST_SCRIPT = r"""
import socket, sys
import dns.message, dns.rcode, dns.rdatatype

FAMILY, SERVER, SOCKETS = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
HOSTS = range(1, 65)

def spelled(name, k):
    return "".join(c.upper() if (i + k) % (k + 2) == 0 else c for i, c in enumerate(name))

def check(wire, qid, h):
    resp = dns.message.from_wire(wire)
    if resp.id != qid:
        return "id"
    if resp.rcode() == dns.rcode.REFUSED:
        return "refused"
    name = resp.question[0].name.to_text().lower() if resp.question else None
    got = [rd.address for rrset in resp.answer for rd in rrset if rrset.rdtype == dns.rdatatype.A]
    if name != f"host{h}.test." or got != [f"198.18.7.{h}"]:
        return f"wrong {name} {got}"
    return "right"

socks = [socket.socket(FAMILY, socket.SOCK_DGRAM) for _ in range(SOCKETS)]
asked = {}
for k, s in enumerate(socks):
    s.settimeout(10.0)
    for h in HOSTS:
        qid = k * 100 + h
        q = dns.message.make_query(spelled(f"host{h}.test", k), "A")
        q.id = qid
        s.sendto(q.to_wire(), (SERVER, 53))
        asked[(k, qid)] = h
outcomes, again = {}, []
for k, s in enumerate(socks):
    for _ in HOSTS:
        wire = s.recv(4096)
        qid = int.from_bytes(wire[:2], "big")
        verdict = check(wire, qid, asked.get((k, qid), 0))
        outcomes[verdict] = outcomes.get(verdict, 0) + 1
        if verdict == "refused":
            again.append((k, qid))
for k, qid in again:
    q = dns.message.make_query(f"host{asked[(k, qid)]}.test", "A")
    q.id = qid
    socks[k].sendto(q.to_wire(), (SERVER, 53))
    verdict = check(socks[k].recv(4096), qid, asked[(k, qid)])
    if verdict != "right":
        outcomes["again " + verdict] = outcomes.get("again " + verdict, 0) + 1
print(f"right {outcomes.get('right', 0)} refused {len(again)} all {outcomes}")
sys.exit(0 if set(outcomes) <= {"right", "refused"} else 1)
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

# -- upstream failure -------------------------------------------------------------------------


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


# -- matching ---------------------------------------------------------------------------------


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
def test_many_queries_in_flight_from_many_sockets_each_get_their_answer(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    server: str,
    tmp_path: Path,
) -> None:
    """Eight client sockets send 64 queries each at once (512 in flight, forwarded without a
    task per query), with a share of 16 queries in flight per client: every answer is the
    answer to its own question and ID, or REFUSED at once; the refused ones are answered
    when asked again; the counters add up (what was not forwarded or cached was refused)."""
    conf = tmp_path / "share.toml"
    conf.write_text("[dns]\nmax_in_flight_per_client = 16\n")
    gw, _ = dns_gateway("--config", str(conf))
    family = "10" if ":" in server else "2"
    result = split.cli.run(sys.executable, "-c", BURST_SCRIPT, family, server, "8",
                           check=False, timeout=60)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{gw.tail()}"
    print(result.stdout.strip())
    refused = int(result.stdout.split()[3])
    counters = dns_counters(gw)
    assert counters["queries"] == 512 + refused, counters
    assert counters["forwarded"] + counters["cached"] == 512, counters
    assert counters["failed"] == 0, counters


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


# -- DNS over TLS -----------------------------------------------------------------------------


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

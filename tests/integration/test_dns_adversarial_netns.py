"""The DNS proxy against adversarial clients and answers, with dig and unbound (topology and
helpers: dnsenv.py).

Why: a filtering proxy is only worth its lists if they cannot be walked around: no CD=1 or
EDNS-Client-Subnet answer may be served to another client from the cache, a CNAME to a
blocked name is blocked, a DNS-over-TCP client trickling bytes is cut off at the query
deadline, and DNS over TLS passes untouched by default but is refused at once with
``--dns-reject-encrypted``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dnsenv import (
    CHAIN_ZONE,
    GATEWAYS,
    HARD_CODED,
    SLACK,
    WWW4,
    ZONE_A,
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
from gatewayproc import RunningGateway
from netns import GATEWAY_ADDR4, GATEWAY_ADDR6, SRV_ADDR4, SplitTopology

pytestmark = pytest.mark.netns


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


#: An upstream on ADDR:PORT (UDP) that, before each real answer (A 198.18.8.1), sends what an
#: off-path spoofer or a confused server might: from another port of the same address the
#: right ID and question (198.18.8.66); from its own port a wrong ID (.67), another question
#: (.68), and garbage. Each query is a line of LOG: "<name> <ID> <source port>".
SPOOF_SCRIPT = r"""
import socket, struct, sys, time
import dns.message, dns.rrset

ADDR, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((ADDR, PORT))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.bind((ADDR, 0))

def answer(q, address):
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", address))
    return r.to_wire()

while True:
    data, peer = sock.recvfrom(65535)
    q = dns.message.from_wire(data)
    with open(LOG, "a") as log:
        log.write(f"{q.question[0].name} {q.id} {peer[1]}\n")
    other.sendto(answer(q, "198.18.8.66"), peer)
    wrong_id = answer(q, "198.18.8.67")
    sock.sendto(struct.pack("!H", q.id ^ 0x5555) + wrong_id[2:], peer)
    sock.sendto(answer(dns.message.make_query("other.test.", "A", id=q.id), "198.18.8.68"), peer)
    sock.sendto(b"\x12garbage", peer)
    time.sleep(0.02)
    sock.sendto(answer(q, "198.18.8.1"), peer)
"""
SPOOF_PORT = 5302
SPOOFED = f"udp://{SRV_ADDR4}:{SPOOF_PORT}"


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


def test_spoofed_upstream_answers_are_not_taken_and_ports_and_ids_vary(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    tmp_path: Path,
) -> None:
    """Through the pooled upstream sockets, a forged answer with the right ID and question
    from another port, a wrong ID, another question or garbage never reaches a client: every
    dig gets the real answer. The queries went out from many ports with unrelated IDs."""
    gw, _ = dns_gateway(*upstream(SPOOFED))
    log = tmp_path / "spoof.log"
    log.touch()
    with (tmp_path / "spoof.stderr").open("wb") as err:
        split.srv.popen([sys.executable, "-c", SPOOF_SCRIPT, SRV_ADDR4, str(SPOOF_PORT),
                         str(log)], stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    split.srv.wait_port(SPOOF_PORT, SRV_ADDR4, proto="udp")
    for i in range(20):
        resolves(dig(split.cli, GATEWAY_ADDR4, f"spoof{i}.test"), "A", "198.18.8.1", gw,
                 f"query {i}")  # fmt: skip
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [name for name, _, _ in lines] == [f"spoof{i}.test." for i in range(20)]
    assert len({port for _, _, port in lines}) >= 10, lines
    assert len({query_id for _, query_id, _ in lines}) == 20, lines

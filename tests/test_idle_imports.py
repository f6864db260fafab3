"""What ``tunlwip up`` imports before it serves: no module of a feature the gateway may not use.

Why: every module imported stays in memory for the gateway's life, and an idle gateway's RSS
is mostly Python's modules (trio and dnspython the largest, then tunlwip's own). HTTP (h11,
for DoH upstreams and HTTP CONNECT proxies), difflib (for "did you mean" in a bad
configuration), the proxy clients, what only routes other than plain ``direct`` use
(connections accepted before their way out is opened, UDP sessions on such routes), DNS over
TCP from clients and the ``[[dns.route]]`` tables' parser are imported where they are used, so
a gateway that never needs them does not pay for them (docs/performance.md, *Idle memory*).
A fresh interpreter, so modules other tests imported do not count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Imported only by the code that needs them.
ON_DEMAND = (
    "h11",
    "difflib",
    "tunlwip.dns.doh",
    # a route other than plain direct, or a proxy (the proxy clients and codecs)
    "tunlwip.egress.accepted",
    "tunlwip.egress.proxy_dial",
    "tunlwip.egress.socks5",
    "tunlwip.egress.socks5_client",
    "tunlwip.egress.http_connect",
    "tunlwip.egress.sockio",
    "tunlwip.egress.udp_routes",
    "tunlwip.forward",
    # a client asking the DNS proxy over TCP
    "tunlwip.dns.tcp_clients",
    # split DNS: [[dns.route]] tables
    "tunlwip.config.dns_routes",
)

TESTS = Path(__file__).parent

#: A gateway with the default configuration (no routes, no proxy, no split DNS) that carries a
#: TCP flow and a UDP session to real loopback servers, then says which ON_DEMAND modules it
#: imported. Run in a fresh interpreter from the tests directory (tcppeer, packets, harness).
GATEWAY_FLOWS = """
import hashlib, socket, sys
import trio
from tunlwip import MemoryDevice
from tunlwip.gateway import Gateway, GatewayConfig
from harness import on_loopback
from packets import udp_packet
from tcppeer import PacketWire, TcpPeer

async def sha256_server(task_status=trio.TASK_STATUS_IGNORED):
    async def handler(stream):
        digest = hashlib.sha256()
        while data := await stream.receive_some(65536):
            digest.update(data)
        await stream.send_all(digest.hexdigest().encode())
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)

async def echo_server(task_status=trio.TASK_STATUS_IGNORED):
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65535)
            await sock.sendto(data, addr)

async def main():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            tcp_port = await nursery.start(sha256_server)
            udp_port = await nursery.start(echo_server)
            device = MemoryDevice()
            gateway = Gateway(device, on_loopback(GatewayConfig(dial_timeout=5)))
            wire = PacketWire(device)
            nursery.start_soon(wire.run)
            await nursery.start(gateway.serve)
            peer = TcpPeer(wire, "198.18.0.2", 40000, "127.0.0.1", tcp_port)
            await peer.connect()
            await peer.send(b"x" * 10000)
            await peer.shutdown()
            assert await peer.recv_until_eof() == hashlib.sha256(b"x" * 10000).hexdigest().encode()
            device.inject_packet(udp_packet("198.18.0.2", "127.0.0.1", 5000, udp_port, b"ping"))
            assert (await wire.next_unmatched()).payload == b"ping"
            stats = gateway.statistics()
            assert stats.dials_ok == 1 and stats.udp.datagrams_in == 1, stats
            nursery.cancel_scope.cancel()
    print(*[m for m in sys.argv[1].split(",") if m in sys.modules])

trio.run(main)
"""


def imported_by(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=TESTS, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_the_cli_imports_no_module_of_an_unused_feature() -> None:
    names = ",".join(ON_DEMAND)
    code = f"import sys, tunlwip.cli\nprint(*[m for m in {names!r}.split(',') if m in sys.modules])"
    assert imported_by(code) == [], "imported at startup"


def test_a_gateway_without_routes_carries_flows_without_them() -> None:
    """Serving a TCP flow and a UDP session (the SYN's route decided, the session's route
    decided) imports none of them either: the lazy imports sit off the default path."""
    assert imported_by(GATEWAY_FLOWS, ",".join(ON_DEMAND)) == [], "imported by the first flows"


def test_parsing_a_doh_upstream_imports_http_then() -> None:
    """The other half: a DoH upstream still gets its HTTP/1.1 client, at parse time (not on
    the first query)."""
    code = (
        "import sys\n"
        "from tunlwip.dialer import Dialer\n"
        "from tunlwip.dns.upstreams import parse_upstream\n"
        "parse_upstream('https://198.18.0.53/dns-query', Dialer())\n"
        "print('h11' in sys.modules, 'tunlwip.dns.doh' in sys.modules)\n"
    )
    assert imported_by(code) == ["True", "True"]

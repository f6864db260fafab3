"""TCP routes through danted for what the address-only tests leave out: an IPv6 destination
(SOCKS5 CONNECT with an IPv6 address, the proxy reached over IPv4), and ``remote_dns``: the
name the client resolved through the gateway sent to the proxy instead of the address.

Why: a client on an IPv6-only path and a proxy that must resolve names itself (the address a
client got may mean nothing on the proxy's side) are what SOCKS5 users of tun2socks and hev
ask for; both must work with the handshake still answered only once the proxy connected.

The ``remote_dns`` proof: the gateway's DNS proxy answers ``localhost`` with 198.18.77.1
(``dns.overrides``), an address nothing in srv has. Through a route with ``remote_dns`` the
gateway sends danted the name, danted resolves ``localhost`` itself (srv's loopback, where the
echo server also listens) and the echo works; by address, the same flow fails.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxyservers import danted_in

from dnsenv import dig as run_dig
from gatewayproc import StartGateway, pattern, wait_for
from netns import GATEWAY_ADDR4, SRV_ADDR4, SRV_ADDR6, SplitTopology
from transfers import connect, start_script_server

pytestmark = pytest.mark.netns

ECHO_PORT, SOCKS_PORT = 7410, 1082
CLIENTS = "198.18.1.0/24"
DEST6 = "fd00:70::1"  # on srv's loopback: only danted reaches it
NAMED4, BY_ADDRESS4 = "198.18.77.1", "198.18.78.1"  # nothing has either address

ROUTES = f"""
[dns.overrides]
"localhost" = ["{NAMED4}"]

[[route]]
name = "socks6"
networks = ["fd00:70::/64"]
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}"

[[route]]
name = "by-name"
networks = ["198.18.77.0/24"]
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}?remote_dns=true"

[[route]]
name = "by-address"
networks = ["198.18.78.0/24"]
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}"
"""


@pytest.fixture
def danted(split: SplitTopology, tmp_path: Path) -> Iterator[None]:
    """The echo server and danted (IPv4 and IPv6 out) in srv, both stopped whatever happens."""
    srv = split.srv
    srv.add_addrs("lo", [f"{DEST6}/128"])
    start_script_server(srv, "echo", ECHO_PORT)
    work = tmp_path / "danted"
    work.mkdir()
    with contextlib.ExitStack() as stack:
        stack.enter_context(danted_in(srv, work, SRV_ADDR4, SOCKS_PORT, CLIENTS,
                                      external6=SRV_ADDR6))  # fmt: skip
        yield


def echo(split: SplitTopology, family: int, host: str, payload: bytes) -> None:
    with connect(split.cli, family, host, ECHO_PORT, timeout=10) as sock:
        sock.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            part = sock.recv(1 << 16)
            assert part, f"EOF after {len(got)} of {len(payload)} bytes"
            got += part
        assert bytes(got) == payload


def test_ipv6_destination_and_remote_dns_through_danted(
    split: SplitTopology, danted: None, split_gateway: StartGateway, tmp_path: Path
) -> None:
    config = tmp_path / "routes.toml"
    config.write_text(ROUTES)
    log_path = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(log_path))
    payload = pattern(3, 256 << 10)
    echo(split, socket.AF_INET6, DEST6, payload)  # CONNECT [fd00:70::1] over IPv4 to danted

    answer = run_dig(split.cli, GATEWAY_ADDR4, "localhost")
    assert answer.status == "NOERROR" and answer.data("A") == [NAMED4], answer
    echo(split, socket.AF_INET, NAMED4, payload)  # danted resolves "localhost" itself
    # The same kind of flow by address: danted cannot reach 198.18.78.1.
    with pytest.raises(OSError, match=r"No route to host|Connection refused"):
        connect(split.cli, socket.AF_INET, BY_ADDRESS4, ECHO_PORT, timeout=10).close()

    wait_for(lambda: gw.status()["totals"]["active_flows"] == 0, "the flows to end", timeout=10)
    routes = gw.status()["totals"]["routes"]
    assert routes["flows_tcp"]["socks6"] == 1 and routes["flows_tcp"]["by-name"] == 1, routes
    assert routes["proxy_failures"]["by-name"] == 0, routes
    gw.stop()
    found = {(r["target"], r["route"], r["name"], r["close_reason"])
             for r in map(json.loads, log_path.read_text().splitlines())}  # fmt: skip
    assert (f"[{DEST6}]:{ECHO_PORT}", "socks6", None, "closed") in found, found
    assert (f"{NAMED4}:{ECHO_PORT}", "by-name", "localhost", "closed") in found, found

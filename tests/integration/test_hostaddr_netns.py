"""The gateway host's own addresses are refused as destinations, with real kernel clients.

Why: without it a client reaches every service of the namespace the gateway's sockets live in
(its veth address here; the LAN address, docker0 or the TUN's peer on a real host), and those
connections arrive on ``lo``, past firewall rules that filter by interface.

Split topology (tests/integration/test_gateway_netns.py): cli's default route is the TUN, the
gateway's sockets live in gw, which owns 198.18.1.1 / fd00:1::1 on the veth toward srv.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from gatewayproc import StartGateway, pattern
from netns import GW_VETH_ADDR4, GW_VETH_ADDR6, SRV_ADDR6, Namespace, SplitTopology
from transfers import connect, recv_all, start_script_server

pytestmark = pytest.mark.netns

TCP_PORT, UDP_PORT, ECHO_PORT = 7300, 7301, 7000
#: Added to gw's veth after the gateway started (it must be refused too: kept current).
LATE4, LATE6 = "198.18.1.50", "fd00:1::50"
#: A refusal must come at once (a reset or ICMP), not after the client's SYN retries.
PROMPT = 2.0


def gw_listener(ns: Namespace, family: int, host: str) -> socket.socket:
    sock = ns.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, TCP_PORT))
    sock.listen(8)
    return sock


def refused(ns: Namespace, family: int, host: str) -> bool:
    """Connect from ``ns`` to ``host``: True when refused promptly, False when it connects."""
    started = time.monotonic()
    try:
        connect(ns, family, host, TCP_PORT, timeout=PROMPT + 3).close()
    except OSError as exc:  # ConnectionRefusedError, or a timeout that fails the check below
        failure, elapsed = exc, time.monotonic() - started
    else:
        return False
    assert not isinstance(failure, TimeoutError) and elapsed < PROMPT, (failure, elapsed)
    return True


def echo_through(split: SplitTopology) -> None:
    """Forwarding to srv still works, byte-exact."""
    payload = pattern(7, 256 * 1024)
    with connect(split.cli, socket.AF_INET6, SRV_ADDR6, ECHO_PORT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == payload


def test_the_gateway_namespaces_own_addresses_are_refused(
    split: SplitTopology, split_gateway: StartGateway
) -> None:
    """TCP to gw's veth addresses is refused at once (a reset: ECONNREFUSED) and never reaches
    the listener there; a UDP datagram never reaches gw's socket (the client gets ICMP port
    unreachable); an address added to gw after the start is refused too; srv is still
    reached byte-exact."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    gw = split_gateway()
    listeners = [gw_listener(split.gw, socket.AF_INET, GW_VETH_ADDR4),
                 gw_listener(split.gw, socket.AF_INET6, GW_VETH_ADDR6)]  # fmt: skip
    udp = split.gw.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind((GW_VETH_ADDR4, UDP_PORT))
        udp.settimeout(1.0)
        assert refused(split.cli, socket.AF_INET, GW_VETH_ADDR4), gw.tail()
        assert refused(split.cli, socket.AF_INET6, GW_VETH_ADDR6), gw.tail()
        for listener in listeners:  # nothing was dialed to gw's own addresses
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()

        client = split.cli.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with client:
            client.settimeout(PROMPT)
            client.connect((GW_VETH_ADDR4, UDP_PORT))
            client.send(b"to the gateway host")
            with pytest.raises(ConnectionRefusedError):  # ICMP port unreachable
                client.recv(100)
        with pytest.raises(TimeoutError):
            udp.recvfrom(100)  # the datagram never reached gw

        split.gw.add_addrs(split.gw_veth, [f"{LATE4}/32", f"{LATE6}/128"])
        listeners += [gw_listener(split.gw, socket.AF_INET, LATE4),
                      gw_listener(split.gw, socket.AF_INET6, LATE6)]  # fmt: skip
        for family, late in ((socket.AF_INET, LATE4), (socket.AF_INET6, LATE6)):
            deadline = time.monotonic() + 5  # the notification is asynchronous (milliseconds)
            while not refused(split.cli, family, late):
                assert time.monotonic() < deadline, f"{late} still dialed; {gw.tail()}"
                time.sleep(0.1)
        echo_through(split)
    finally:
        udp.close()
        for listener in listeners:
            listener.close()
    assert "local_destination" in gw.stop(), gw.tail()  # counted


def test_forward_local_destinations_dials_the_gateway_host(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """With ``device.forward_local_destinations`` nothing is refused: gw's veth address is
    dialed like any other destination."""
    config = tmp_path / "forward-local.toml"
    config.write_text("[device]\nforward_local_destinations = true\n")
    gw = split_gateway("--config", str(config))
    listener = gw_listener(split.gw, socket.AF_INET, GW_VETH_ADDR4)
    try:
        listener.settimeout(10)
        with connect(split.cli, socket.AF_INET, GW_VETH_ADDR4, TCP_PORT) as sock:
            conn, _ = listener.accept()
            with conn:
                sock.sendall(b"hello host")
                assert conn.recv(100) == b"hello host", gw.tail()
    finally:
        listener.close()

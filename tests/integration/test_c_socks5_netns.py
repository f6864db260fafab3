"""SOCKS5 dials in C against a hostile proxy: every bad answer a counted, truthful failure.

Why: a route's SOCKS5 proxy given by address is dialed in C (``_csrc/socks5_dial.c``), whose
reply parser reads bytes from a peer we do not control. What the client in cli sees must be
what the Python client would have given it, and the flow records must carry the same reasons:
a reply that is not SOCKS5 fails as the proxy's failure (the unreachable answer, counted in the
route's ``proxy_failures``), reply 5 is a refused connect (RST), reply 4 an unreachable host;
a reply dripped a byte at a time still works, the destination's first bytes sent in the same
segment as the reply reach the client intact, and a proxy that never answers is cut off by
``egress.handshake_timeout``.

The proxy is a small server written here, in srv (its sockets made in srv's namespace), one
port per behaviour; each route sends one destination network (nothing there: only the proxy
"connects") to one port::

    198.18.80.0/24 + k  ->  socks5://198.18.1.2:(7600 + k)   behaviour k of BEHAVIOURS
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dnsenv import WWW4, Unbound
from dnsenv import dig as run_dig
from dnsenv import start_unbound as start_unbound
from gatewayproc import RunningGateway, StartGateway, wait_for
from netns import GATEWAY_ADDR4, SRV_ADDR4, SplitTopology
from transfers import connect, listen

pytestmark = pytest.mark.netns

BASE_PORT = 7600
DEST_PORT = 443
HANDSHAKE_TIMEOUT = 2.0
EAGER = b"HELLO-FROM-THE-DESTINATION\n"
USER, PASSWORD = "flow", "s3cret"


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        part = sock.recv(count - len(data))
        if not part:
            raise ConnectionError("EOF")
        data += part
    return data


def read_greeting(sock: socket.socket) -> bytes:
    head = recv_exact(sock, 2)
    return head + recv_exact(sock, head[1])


def read_request(sock: socket.socket) -> bytes:
    head = recv_exact(sock, 4)
    if head[3] == 3:
        head += recv_exact(sock, 1)
    size = {1: 4, 4: 16}.get(head[3], head[-1])
    return head + recv_exact(sock, size + 2)


def reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 198, 18, 1, 2, 0x1F, 0x90])


def echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def bad_version(sock: socket.socket) -> None:
    read_greeting(sock)
    sock.sendall(b"\x04\x00")


def no_method(sock: socket.socket) -> None:
    read_greeting(sock)
    sock.sendall(b"\x05\xff")


def auth_failure(sock: socket.socket) -> None:
    offered = read_greeting(sock)
    assert offered == b"\x05\x02\x00\x02", offered  # credentials: user/password offered
    sock.sendall(b"\x05\x02")
    request = sock.recv(600)
    assert request == bytes([1, len(USER)]) + USER.encode() + bytes([len(PASSWORD)]) + \
        PASSWORD.encode(), request  # fmt: skip
    sock.sendall(b"\x01\x01")


def refused(sock: socket.socket) -> None:
    read_greeting(sock)
    sock.sendall(b"\x05\x00")
    read_request(sock)
    sock.sendall(reply(5))


def host_unreachable(sock: socket.socket) -> None:
    read_greeting(sock)
    sock.sendall(b"\x05\x00")
    read_request(sock)
    sock.sendall(reply(4))


def dripped(sock: socket.socket) -> None:
    """Every answer a byte at a time, 30 ms apart; then an echo server."""
    read_greeting(sock)
    for byte in b"\x05\x00":
        sock.sendall(bytes([byte]))
        time.sleep(0.03)
    read_request(sock)
    for byte in reply(0):
        sock.sendall(bytes([byte]))
        time.sleep(0.03)
    echo(sock)


def eager(sock: socket.socket) -> None:
    """The success reply and the destination's first bytes in one send; then echo."""
    read_greeting(sock)
    sock.sendall(b"\x05\x00")
    request = read_request(sock)
    assert request[3] == 1 and request[-2:] == DEST_PORT.to_bytes(2, "big"), request
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(reply(0) + EAGER)
    echo(sock)


#: The CONNECT requests the "by-name" behaviour received.
received_requests: list[bytes] = []


def by_name(sock: socket.socket) -> None:
    """Success for any request (recorded); then echo."""
    read_greeting(sock)
    sock.sendall(b"\x05\x00")
    received_requests.append(read_request(sock))
    sock.sendall(reply(0))
    echo(sock)


def silent(sock: socket.socket) -> None:
    read_greeting(sock)
    time.sleep(HANDSHAKE_TIMEOUT + 3)  # then the test is over


def huge_name(sock: socket.socket) -> None:
    """ATYP 3 with a 255-byte name promised, ten bytes given, then EOF."""
    read_greeting(sock)
    sock.sendall(b"\x05\x00")
    read_request(sock)
    sock.sendall(b"\x05\x00\x00\x03\xff" + b"a" * 10)


Behaviour = Callable[[socket.socket], None]
#: name -> (behaviour, credentials in the route's URL)
BEHAVIOURS: dict[str, tuple[Behaviour, bool]] = {
    "bad-version": (bad_version, False),
    "no-method": (no_method, False),
    "auth-failure": (auth_failure, True),
    "refused": (refused, False),
    "host-unreachable": (host_unreachable, False),
    "dripped": (dripped, False),
    "eager": (eager, False),
    "silent": (silent, False),
    "huge-name": (huge_name, False),
    "by-name": (by_name, False),
}


def host_of(name: str) -> str:
    return f"198.18.{80 + list(BEHAVIOURS).index(name)}.1"


class HostileProxy:
    """One listener in srv per behaviour, each connection served in a thread of its own."""

    def __init__(self, split: SplitTopology) -> None:
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.listeners = []
        for k, (behaviour, _) in enumerate(BEHAVIOURS.values()):
            listener = listen(split.srv, socket.AF_INET, BASE_PORT + k)
            listener.settimeout(0.2)
            self.listeners.append(listener)
            thread = threading.Thread(target=self._accept, args=(listener, behaviour), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _accept(self, listener: socket.socket, behaviour: Behaviour) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock, behaviour), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, sock: socket.socket, behaviour: Behaviour) -> None:
        sock.settimeout(HANDSHAKE_TIMEOUT + 8)
        try:
            with sock:
                behaviour(sock)
        except (ConnectionError, TimeoutError):
            pass
        except BaseException as exc:  # an assertion on what the gateway sent
            self.errors.append(exc)

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=HANDSHAKE_TIMEOUT + 10)
        for listener in self.listeners:
            listener.close()


@pytest.fixture
def hostile(split: SplitTopology) -> Iterator[HostileProxy]:
    proxy = HostileProxy(split)
    try:
        yield proxy
    finally:
        proxy.close()


def routes_toml(names: list[str]) -> str:
    tables = [f"[egress]\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\n"]
    for k, (name, (_, credentials)) in enumerate(BEHAVIOURS.items()):
        if name not in names:
            continue
        user = f"{USER}:{PASSWORD}@" if credentials else ""
        where = f'networks = ["{host_of(name)}/24"]'
        if name == "by-name":  # the flow's name, once resolved through the gateway
            where = 'domains = ["www.test"]'
        via = f"socks5://{user}{SRV_ADDR4}:{BASE_PORT + k}?remote_dns=true"
        tables.append(f'[[route]]\nname = "{name}"\n{where}\nvia = "{via}"\n')
    return "\n".join(tables)


def counters(gw: RunningGateway) -> dict[str, int]:
    doc: dict[str, int] = gw.status()["totals"]["stack"]["counters"]
    return doc


def connect_error(split: SplitTopology, name: str) -> tuple[OSError, float]:
    started = time.monotonic()
    try:
        connect(split.cli, socket.AF_INET, host_of(name), DEST_PORT,
                timeout=HANDSHAKE_TIMEOUT + 5).close()  # fmt: skip
    except OSError as exc:
        return exc, time.monotonic() - started
    raise AssertionError(f"{name}: connected")


def echo_through(split: SplitTopology, name: str, first: bytes = b"") -> None:
    with connect(split.cli, socket.AF_INET, host_of(name), DEST_PORT, timeout=10) as sock:
        if first:
            assert recv_exact(sock, len(first)) == first
        payload = bytes(range(256)) * 256
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload


def records_of(gw: RunningGateway, log_path: Path) -> dict[str, dict[str, Any]]:
    """The flow records by route (the last of each), once the gateway stopped."""
    gw.stop()
    records: dict[str, dict[str, Any]] = {}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        records[record["route"]] = record
    return records


def test_hostile_socks5_answers_through_c(
    split: SplitTopology, hostile: HostileProxy, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """Each hostile answer as the client sees it, as counted and as recorded."""
    config = tmp_path / "routes.toml"
    hostile_names = [name for name in BEHAVIOURS if name != "by-name"]
    config.write_text(routes_toml(hostile_names))
    log_path = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(log_path))
    before = counters(gw)
    for name in ("dripped", "eager"):  # they work, the eager bytes intact
        calls = counters(gw)["python_calls"]
        echo_through(split, name, EAGER if name == "eager" else b"")
        wait_for(lambda: gw.status()["totals"]["active_flows"] == 0, "the flow to end", timeout=10)
        calls = counters(gw)["python_calls"] - calls
        assert calls <= 3, (name, calls)  # the SYN hook and the batched events, no Python dial
    expected_errno = {"refused": errno.ECONNREFUSED, "host-unreachable": errno.EHOSTUNREACH}
    for name in ("bad-version", "no-method", "auth-failure", "refused", "host-unreachable",
                 "huge-name", "silent"):  # fmt: skip
        error, elapsed = connect_error(split, name)
        assert error.errno == expected_errno.get(name, errno.EHOSTUNREACH), (name, error)
        bound = HANDSHAKE_TIMEOUT + 1.5 if name == "silent" else 1.5
        assert elapsed < bound, (name, elapsed)
    after = counters(gw)
    assert hostile.errors == [], hostile.errors
    assert after["c_socks5_dials"] - before["c_socks5_dials"] == 9, after
    assert after["c_socks5_connected"] - before["c_socks5_connected"] == 2, after
    assert after["c_socks5_failures"] - before["c_socks5_failures"] == 7, after
    assert after["c_socks5_dialing"] == 0, after
    failures = gw.status()["totals"]["routes"]["proxy_failures"]
    proxy_own = {"bad-version", "no-method", "auth-failure", "huge-name", "silent"}
    assert failures == {"default": 0, **{name: int(name in proxy_own) for name in hostile_names}}, \
        failures  # fmt: skip
    records = records_of(gw, log_path)
    reasons = {name: records[name]["close_reason"] for name in hostile_names}
    assert reasons == {
        "bad-version": "proxy: bad version",
        "no-method": "proxy: no acceptable auth method",
        "auth-failure": "proxy: authentication failed",
        "refused": "refused",
        "host-unreachable": "unreachable",
        "dripped": "closed",
        "eager": "closed",
        "silent": "proxy: handshake timeout",
        "huge-name": "proxy: closed during handshake",
    }, reasons
    assert records["eager"]["bytes_down"] == len(EAGER) + 65536, records["eager"]


def test_remote_dns_sends_the_name_resolved_through_the_gateway(
    split: SplitTopology, hostile: HostileProxy, split_gateway: StartGateway,
    start_unbound: Callable[..., Unbound], tmp_path: Path,
) -> None:  # fmt: skip
    """``?remote_dns=true`` through C: www.test resolved by the client through the gateway's DNS
    proxy (unbound in srv), a connection to its address takes the ``domains`` route, and C's
    CONNECT names www.test (ATYP 3), not the address; the flow then works."""
    start_unbound()
    config = tmp_path / "routes.toml"
    config.write_text(routes_toml(["by-name"]))
    log_path = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--dns-upstream", f"udp://{SRV_ADDR4}:53",
                       "--flow-log", str(log_path))  # fmt: skip
    answer = run_dig(split.cli, GATEWAY_ADDR4, "www.test")
    assert answer.status == "NOERROR" and answer.data("A") == [WWW4], answer
    received_requests.clear()
    with connect(split.cli, socket.AF_INET, WWW4, DEST_PORT, timeout=10) as sock:
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"
    expected = b"\x05\x01\x00\x03\x08www.test" + DEST_PORT.to_bytes(2, "big")
    assert received_requests == [expected], received_requests
    assert counters(gw)["c_socks5_connected"] == 1
    assert hostile.errors == [], hostile.errors
    record = records_of(gw, log_path)["by-name"]
    assert (record["close_reason"], record["name"]) == ("closed", "www.test"), record

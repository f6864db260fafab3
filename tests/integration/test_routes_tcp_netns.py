"""Routes on the TCP path with ``tunlwip up``: real proxies, real clients, the kernel's TCP.

Why: a route decides where a flow's bytes go before the client's handshake is answered (dial
before accept), so what a client sees must be what the real path gave it: its handshake
completes only when the proxy connected, a destination refused through the proxy is a refused
connect, an unreachable one is unreachable, a proxy that is down fails at once and is counted
as the proxy's failure; and once connected, the bytes go through the C relay, not Python.

Split topology (tests/netns.py): kernel clients in cli, the gateway in gw, and in srv the
servers (an echo server on every address), danted without and with user/password, tinyproxy,
and extra destination networks on srv's loopback that only the proxies (or a marked socket)
reach::

    198.18.70.0/24  socks         danted 198.18.1.2:1080            (+ 198.18.61.0/24: an
    198.18.71.0/24  socks-auth    danted 198.18.1.2:1081, username     "unreachable" route
    198.18.72.0/24  http          tinyproxy 198.18.1.2:3128            in srv)
    198.18.73.0/24  down          socks5 on 198.18.1.2:1099, nothing listens
    198.18.74.0/24  no            reject
    198.18.75.0/24  hole          drop
    198.18.76.0/24  marked        direct?fwmark=42: gw routes only marked packets there

Every proxy is started by the test, in srv, and stopped by its PID (group) whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxyservers import danted_in, tinyproxy_in

from dnsenv import WWW4, Unbound
from dnsenv import dig as run_dig
from dnsenv import start_unbound as start_unbound
from gatewayproc import RunningGateway, StartGateway, pattern, wait_for
from netns import GATEWAY_ADDR4, SRV_ADDR4, SplitTopology
from transfers import connect, start_script_server

pytestmark = pytest.mark.netns

ECHO_PORT, CLOSED_PORT = 7400, 7499
SOCKS_PORT, SOCKS_AUTH_PORT, HTTP_PORT, DOWN_PORT = 1080, 1081, 3128, 1099
SOCKS_NET, UNREACHABLE_NET = "198.18.70.0/24", "198.18.61.0/24"
SOCKS4, UNREACHABLE4 = "198.18.70.1", "198.18.61.1"
AUTH4, HTTP4, DOWN4, REJECT4, DROP4, MARKED4 = (f"198.18.{n}.1" for n in range(71, 77))
MARK = 42
CLIENTS = "198.18.1.0/24"  # the gateway's sockets come from its veth, 198.18.1.1


def routes_toml(user: str, password: str) -> str:
    return f"""
[[route]]
name = "socks"
networks = ["{SOCKS_NET}", "{UNREACHABLE_NET}"]
via = "socks5://{SRV_ADDR4}:{SOCKS_PORT}"

[[route]]
name = "socks-auth"
networks = ["198.18.71.0/24"]
via = "socks5://{user}:{password}@{SRV_ADDR4}:{SOCKS_AUTH_PORT}"

[[route]]
name = "http"
networks = ["198.18.72.0/24"]
protocols = ["tcp"]
via = "http://{SRV_ADDR4}:{HTTP_PORT}"

[[route]]
name = "down"
networks = ["198.18.73.0/24"]
via = "socks5://{SRV_ADDR4}:{DOWN_PORT}"

[[route]]
name = "no"
networks = ["198.18.74.0/24"]
via = "reject"

[[route]]
name = "hole"
networks = ["198.18.75.0/24"]
via = "drop"

[[route]]
name = "marked"
networks = ["198.18.76.0/24"]
via = "direct?fwmark={MARK}"
"""


@pytest.fixture
def system_user() -> Iterator[tuple[str, str]]:
    """A uniquely named system user for danted's ``username`` method, always deleted."""
    name = f"tlwr{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, timeout=30)  # fmt: skip
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True,
                       timeout=30)  # fmt: skip
        yield name, password
    finally:
        subprocess.run(["userdel", name], check=False, timeout=30)


@pytest.fixture
def destinations(split: SplitTopology) -> SplitTopology:
    """srv: the echo server, the destination networks on its loopback, an unreachable
    network; gw: the fwmark table that alone reaches 198.18.76.0/24."""
    srv, gw = split.srv, split.gw
    srv.add_addrs("lo", [f"198.18.{n}.1/32" for n in range(70, 77)] + [f"{WWW4}/32"])
    srv.ip("route", "add", "unreachable", UNREACHABLE_NET)
    gw.ip("rule", "add", "fwmark", str(MARK), "table", "100")
    gw.ip("route", "add", "198.18.76.0/24", "via", SRV_ADDR4, "table", "100")
    gw.ip("route", "add", f"{WWW4}/32", "via", SRV_ADDR4)
    start_script_server(srv, "echo", ECHO_PORT)
    return split


@pytest.fixture
def proxies(destinations: SplitTopology, tmp_path: Path,
            system_user: tuple[str, str]) -> Iterator[tuple[str, str]]:  # fmt: skip
    """danted (no auth, user/password) and tinyproxy in srv; yields the user's credentials."""
    srv = destinations.srv
    work = tmp_path / "proxies"
    work.mkdir()
    with contextlib.ExitStack() as stack:
        stack.enter_context(danted_in(srv, work, SRV_ADDR4, SOCKS_PORT, CLIENTS))
        stack.enter_context(danted_in(srv, work, SRV_ADDR4, SOCKS_AUTH_PORT, CLIENTS,
                                      socksmethod="username"))  # fmt: skip
        stack.enter_context(tinyproxy_in(srv, work, SRV_ADDR4, HTTP_PORT, CLIENTS,
                                         [ECHO_PORT, CLOSED_PORT]))  # fmt: skip
        yield system_user


def totals(gw: RunningGateway) -> dict[str, Any]:
    doc: dict[str, Any] = gw.status()["totals"]
    return doc


def counter(doc: dict[str, Any], name: str) -> int:
    return int(doc["stack"]["counters"][name])


def echo(split: SplitTopology, host: str, payload: bytes, *, timeout: float = 10) -> None:
    with connect(split.cli, socket.AF_INET, host, ECHO_PORT, timeout=timeout) as sock:
        echo_on(sock, payload)


def echo_on(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        part = sock.recv(1 << 16)
        assert part, f"EOF after {len(got)} of {len(payload)} bytes"
        got += part
    assert bytes(got) == payload


def connect_error(split: SplitTopology, host: str, port: int,
                  timeout: float) -> tuple[OSError, float]:  # fmt: skip
    """The error the client's connect ends with (it must fail), and the seconds it took."""
    started = time.monotonic()
    try:
        connect(split.cli, socket.AF_INET, host, port, timeout=timeout).close()
    except OSError as exc:
        return exc, time.monotonic() - started
    raise AssertionError(f"{host}:{port} connected")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def status_text(gw: RunningGateway, fmt: str = "table") -> str:
    result = subprocess.run([sys.executable, "-m", "tunlwip", "status", "--iface", gw.iface,
                             "--format", fmt], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_flows_through_danted_and_tinyproxy_are_relayed_in_c(
    destinations: SplitTopology, proxies: tuple[str, str], split_gateway: StartGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Through danted (no auth, and user/password) and tinyproxy, 1 MiB echoed on each: the
    handshake completes once the proxy connected, the C relay moves the bytes (a relay opened
    per flow, a handful of calls into Python for a megabyte each way), and each flow record
    names its route. Then the failures, as the client sees them: refused through danted ->
    ECONNREFUSED; unreachable through danted, and refused through tinyproxy (its 500 does not
    say which) -> EHOSTUNREACH (ICMP); a proxy that is down -> the unreachable answer at once,
    counted as the route's proxy failure "proxy: refused"."""
    split = destinations
    user, password = proxies
    config = tmp_path / "routes.toml"
    config.write_text(routes_toml(user, password))
    log_path = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(log_path))
    payload = pattern(7, 1 << 20)
    for host in (SOCKS4, AUTH4, HTTP4):
        before = totals(gw)
        echo(split, host, payload)
        wait_for(lambda: totals(gw)["active_flows"] == 0, "the flow to end", timeout=10)
        after = totals(gw)
        calls = counter(after, "python_calls") - counter(before, "python_calls")
        relays = counter(after, "relays_opened") - counter(before, "relays_opened")
        socks_in_c = counter(after, "c_socks5_dials") - counter(before, "c_socks5_dials")
        print(f"{host}: {relays} relay, {calls} calls into Python for 2 MiB")
        assert relays == 1, (before, after)
        assert calls <= 12, calls  # a Python copy loop would be hundreds
        # SOCKS5 proxies given by address are dialed in C (socks5_dial.c); HTTP in Python.
        assert socks_in_c == (0 if host == HTTP4 else 1), (host, before, after)
        if host != HTTP4:
            assert counter(after, "c_socks5_connected") - counter(before, "c_socks5_connected") == 1
            assert calls <= 3, calls  # the SYN hook and the batched events, as a direct C dial
    refused, _ = connect_error(split, SOCKS4, CLOSED_PORT, timeout=10)
    assert isinstance(refused, ConnectionRefusedError), refused
    unreachable, _ = connect_error(split, UNREACHABLE4, ECHO_PORT, timeout=10)
    assert unreachable.errno == errno.EHOSTUNREACH, unreachable
    # tinyproxy answers 500 alike for refused and unreachable: the unreachable answer
    # (docs/proxies.md), never a claim that the port is closed.
    http_refused, _ = connect_error(split, HTTP4, CLOSED_PORT, timeout=10)
    assert http_refused.errno == errno.EHOSTUNREACH, http_refused
    down, elapsed = connect_error(split, DOWN4, ECHO_PORT, timeout=10)
    assert down.errno == errno.EHOSTUNREACH, down
    assert elapsed < 2, elapsed
    doc = totals(gw)
    # refused (reply 5), unreachable (reply 4) and the proxy that is down: all failed in C
    assert counter(doc, "c_socks5_failures") == 3 and counter(doc, "c_socks5_dialing") == 0, doc
    routes = doc["routes"]
    assert routes["flows_tcp"]["socks"] == 3 and routes["flows_tcp"]["socks-auth"] == 1, routes
    assert routes["flows_tcp"]["http"] == 2 and routes["proxy_failures"] == {
        **{name: 0 for name in routes["via"]}, "down": 1}, routes  # fmt: skip
    assert doc["dials_ok"] == 3 and doc["dials_refused"] == 1, doc
    text = status_text(gw)
    assert f"route:     socks-auth via socks5://{user}@{SRV_ADDR4}:{SOCKS_AUTH_PORT}: tcp 1" \
        in text, text  # fmt: skip
    assert "route:     down via" in text and "proxy failures 1" in text, text
    assert password not in text and password not in json.dumps(gw.status())
    metrics = status_text(gw, "prometheus")
    assert 'tunlwip_route_flows_tcp_total{route="socks"} 3' in metrics, metrics
    assert 'tunlwip_route_proxy_failures_total{route="down"} 1' in metrics, metrics
    gw.stop()
    by_target = {r["target"]: r for r in records(log_path)}
    for host, route in ((SOCKS4, "socks"), (AUTH4, "socks-auth"), (HTTP4, "http")):
        record = by_target[f"{host}:{ECHO_PORT}"]
        assert (record["route"], record["close_reason"]) == (route, "closed"), record
        assert record["bytes_up"] == record["bytes_down"] == len(payload), record
    assert by_target[f"{SOCKS4}:{CLOSED_PORT}"]["close_reason"] == "refused", by_target
    assert by_target[f"{HTTP4}:{CLOSED_PORT}"]["close_reason"] == "unreachable", by_target
    assert by_target[f"{UNREACHABLE4}:{ECHO_PORT}"]["close_reason"] == "unreachable", by_target
    down_record = by_target[f"{DOWN4}:{ECHO_PORT}"]
    assert (down_record["route"], down_record["close_reason"]) == ("down", "proxy: refused")


def test_reject_drop_fwmark_and_reload(
    destinations: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """reject -> ECONNREFUSED at once; drop -> the client's connect times out, its SYN
    retransmits swallowed and the flow counted once; direct?fwmark=42 -> the upstream socket
    carries the mark (gw routes 198.18.76.0/24 only for marked packets). A SIGHUP with the
    marked route gone and tcp.unreachable = "rst" applies to new flows only: the open marked
    flow keeps echoing, a new one now takes the default route (no route: RST)."""
    split = destinations
    config = tmp_path / "routes.toml"
    config.write_text(routes_toml("nobody", "x"))
    log_path = tmp_path / "flows.jsonl"
    gw = split_gateway("--config", str(config), "--flow-log", str(log_path))
    rejected, _ = connect_error(split, REJECT4, ECHO_PORT, timeout=5)
    assert isinstance(rejected, ConnectionRefusedError), rejected
    dropped, _ = connect_error(split, DROP4, ECHO_PORT, timeout=2.5)
    assert isinstance(dropped, TimeoutError), dropped  # its SYN was retransmitted at 1 s
    marked = connect(split.cli, socket.AF_INET, MARKED4, ECHO_PORT, timeout=10)
    with marked:
        echo_on(marked, b"marked before the reload")
        doc = totals(gw)
        routes = doc["routes"]
        assert (routes["rejected"]["no"], routes["flows_tcp"]["no"]) == (1, 1), routes
        assert (routes["dropped"]["hole"], routes["flows_tcp"]["hole"]) == (1, 1), routes
        assert doc["syn_retransmits_swallowed"] >= 1, doc
        assert routes["flows_tcp"]["marked"] == 1, routes
        unmarked = routes_toml("nobody", "x").split('[[route]]\nname = "marked"')[0]
        config.write_text('[tcp]\nunreachable = "rst"\n' + unmarked)
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "tunlwip: reloaded" in gw.log(), "the reload", timeout=10)
        echo_on(marked, b"still marked after the reload")
        again, _ = connect_error(split, MARKED4, ECHO_PORT, timeout=5)
        assert isinstance(again, ConnectionRefusedError), again
    routes = totals(gw)["routes"]
    assert "marked" not in routes["via"] and routes["flows_tcp"]["default"] >= 1, routes
    assert routes["rejected"]["no"] == 1, "a kept name keeps its counters"
    gw.stop()
    found = {(r["target"].rpartition(":")[0], r["route"], r["close_reason"])
             for r in records(log_path)}  # fmt: skip
    assert (REJECT4, "no", "rejected") in found, found
    assert (DROP4, "hole", "dropped") in found, found
    assert (MARKED4, "marked", "closed") in found, found
    assert (MARKED4, "default", "unreachable") in found, found
    assert sum(1 for r in records(log_path) if r["route"] == "hole") == 1


def test_domain_route_by_the_name_resolved_through_the_gateway(
    destinations: SplitTopology, split_gateway: StartGateway,
    start_unbound: Callable[..., Unbound], tmp_path: Path,
) -> None:  # fmt: skip
    """www.test resolves (unbound in srv, through the gateway's DNS proxy) to 198.18.5.5. Before
    the client asked, a connection there takes the default route; once dig resolved it
    through the gateway, the route for ``www.test`` (reject) takes it."""
    split = destinations
    start_unbound()
    config = tmp_path / "routes.toml"
    config.write_text('[[route]]\nname = "named"\ndomains = ["www.test"]\nvia = "reject"\n')
    gw = split_gateway("--config", str(config), "--dns-upstream", f"udp://{SRV_ADDR4}:53")
    echo(split, WWW4, b"by address: default route")
    answer = run_dig(split.cli, GATEWAY_ADDR4, "www.test")
    assert answer.status == "NOERROR" and answer.data("A") == [WWW4], answer
    refused, _ = connect_error(split, WWW4, ECHO_PORT, timeout=5)
    assert isinstance(refused, ConnectionRefusedError), refused
    routes = totals(gw)["routes"]
    assert routes["rejected"]["named"] == 1 and routes["flows_tcp"]["default"] == 1, routes

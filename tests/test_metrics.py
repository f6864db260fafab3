"""Prometheus metrics: the exposition of a real gateway's status, read back with
``prometheus_client.parser``; the trio HTTP responder; ``status --format prometheus``; the
``metrics.listen`` setting. (The namespace test scrapes a real ``tunlwip up`` with curl.)"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from test_control import CLIENT, sock_dir, start_gateway  # noqa: F401 (sock_dir: a fixture)
from tunlwip import config as cfg
from tunlwip import metrics
from tunlwip.control import add_status_parser, run_status, serve_control, status
from tunlwip.errors import ConfigError
from tunlwip.gateway import Gateway

from packets import udp_packet
from tcppeer import TcpPeer


async def busy_gateway(nursery: trio.Nursery) -> Gateway:
    """A gateway with one TCP and one UDP flow open, some bytes carried each way."""
    gateway, device, wire = await start_gateway(nursery)
    peer = TcpPeer(wire, CLIENT, 42000, "203.0.113.80", 443)
    await peer.connect()
    await peer.send(b"a" * 3000)
    assert await peer.recv_exactly(3000) == b"a" * 3000
    device.inject_packet(udp_packet(CLIENT, "203.0.113.53", 6000, 9999, b"hello"))
    assert (await wire.next_unmatched()).payload == b"olleh"
    return gateway


def parse(text: str) -> dict[str, Any]:
    """{family name: family}; fails on anything the reference parser rejects, on a family
    twice, and on a family without its HELP and TYPE lines."""
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"{family.name} twice"
        families[family.name] = family
    for name, family in families.items():
        exposed = name + "_total" if family.type == "counter" else name
        assert re.search(rf"^# HELP {exposed} \S", text, re.M), name
        assert re.search(rf"^# TYPE {exposed} {family.type}$", text, re.M), name
    return families


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name.removesuffix("_total")]
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return float(found[0])


async def test_exposition_of_a_gateway_reads_back(nursery: trio.Nursery) -> None:
    gateway = await busy_gateway(nursery)
    document = status(gateway, iface="tun9", max_flows=0)
    text = metrics.render(document).decode()
    families = parse(text)

    assert all(name.startswith("tunlwip_") for name in families)
    for name, family in families.items():
        assert family.type in ("counter", "gauge"), name
        for sample in family.samples:  # every counter sample is NAME_total
            assert sample.name == (name + "_total" if family.type == "counter" else name)
            assert not math.isnan(sample.value), sample  # the document had every value
    assert value(families, "tunlwip_info", version=document["version"], iface="tun9") == 1
    assert value(families, "tunlwip_open_flows", protocol="tcp") == 1
    assert value(families, "tunlwip_open_flows", protocol="udp") == 1
    assert value(families, "tunlwip_flows_total", protocol="tcp") == 1
    assert value(families, "tunlwip_udp_sessions") == 1
    assert value(families, "tunlwip_udp_datagrams_in_total") == 1
    assert value(families, "tunlwip_udp_opened_total") == 1
    counters = document["totals"]["stack"]["counters"]
    assert value(families, "tunlwip_stack_packets_in_total") == counters["packets_in"] > 0
    assert value(families, "tunlwip_stack_tcp_half_open") == counters["tcp_half_open"]
    assert families["tunlwip_stack_tcp_half_open"].type == "gauge"
    for reason in ("not_client", "ip_checksum"):  # every drop reason, zero or not
        assert value(families, "tunlwip_drops_total", reason=reason) == counters[f"drop_{reason}"]
    assert value(families, "tunlwip_refused_total", reason="tcp_connections") == 0
    assert value(families, "tunlwip_dns_queries_total") == 0  # the proxy is on by default
    assert value(families, "tunlwip_resident_memory_bytes") > 1 << 20
    assert value(families, "tunlwip_open_files") >= 3
    assert value(families, "tunlwip_uptime_seconds") >= 0


def test_dns_off_and_unknown_values() -> None:
    """No DNS families without the proxy; a value the document lacks is NaN, never 0."""
    text = metrics.render({"version": "1", "iface": "t", "totals": {"dns": None}}).decode()
    families = parse(text)
    assert not any(name.startswith("tunlwip_dns_") for name in families)
    assert math.isnan(value(families, "tunlwip_resident_memory_bytes"))


# -- the HTTP endpoint ---------------------------------------------------------------------------


async def ask(port: int, request: bytes) -> bytes:
    """The whole answer; b"" if the server closed (or reset) without one."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    async with stream:
        with trio.fail_after(10):
            try:
                await stream.send_all(request)
                while data := await stream.receive_some():
                    answer += data
            except trio.BrokenResourceError:  # closed with our bytes unread: a reset
                pass
    return answer


async def test_endpoint_serves_get_metrics_only(nursery: trio.Nursery) -> None:
    gateway = await busy_gateway(nursery)
    address, port = await nursery.start(metrics.serve_metrics, gateway, "127.0.0.1:0")
    assert address == "127.0.0.1" and port > 0

    answer = await ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert f"Content-Length: {len(body)}".encode() in head
    families = parse(body.decode())
    assert value(families, "tunlwip_open_flows", protocol="tcp") == 1

    assert (await ask(port, b"GET /metrics?x=1 HTTP/1.0\n\n")).startswith(b"HTTP/1.0 200 ")
    assert (await ask(port, b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404 ")
    assert (await ask(port, b"GET /metricsX HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404 ")
    post = await ask(port, b"POST /metrics HTTP/1.0\r\n\r\n")
    assert post.startswith(b"HTTP/1.0 405 ") and b"Allow: GET\r\n" in post
    assert (await ask(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
    big = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * metrics.MAX_REQUEST + b"\r\n\r\n"
    assert await ask(port, big) == b""  # over the bound: closed without an answer


async def test_endpoint_drops_slow_clients_and_keeps_serving(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.3)
    gateway, _, _ = await start_gateway(nursery)
    _, port = await nursery.start(metrics.serve_metrics, gateway, "127.0.0.1:0")
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    async with slow:
        await slow.send_all(b"GET /metrics HTTP/1.0\r\n")  # and never the blank line
        with trio.fail_after(5):
            assert await slow.receive_some() == b""  # closed at the deadline
    assert (await ask(port, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200 ")


async def test_endpoint_that_cannot_listen_is_a_clear_error(nursery: trio.Nursery) -> None:
    gateway, _, _ = await start_gateway(nursery)
    _, port = await nursery.start(metrics.serve_metrics, gateway, "127.0.0.1:0")
    with pytest.raises(metrics.MetricsError, match=rf"metrics.listen 127.0.0.1:{port}: "):
        await nursery.start(metrics.serve_metrics, gateway, f"127.0.0.1:{port}")


async def test_status_format_prometheus(nursery: trio.Nursery, sock_dir: Any) -> None:  # noqa: F811
    gateway = await busy_gateway(nursery)
    path = sock_dir / "tun9.sock"
    await nursery.start(serve_control, gateway, path)
    parser = argparse.ArgumentParser()
    add_status_parser(parser.add_subparsers())
    printed = {}
    for form in ("prometheus", "json"):
        args = parser.parse_args(["status", "--control-socket", str(path), "--format", form])
        out = io.StringIO()
        assert await trio.to_thread.run_sync(run_status, args, out) == 0
        printed[form] = out.getvalue()
    families = parse(printed["prometheus"])
    assert value(families, "tunlwip_open_flows", protocol="tcp") == 1
    document = json.loads(printed["json"])  # the same answer, as JSON
    assert value(families, "tunlwip_info", version=document["version"], iface="") == 1
    assert value(families, "tunlwip_udp_sessions") == document["totals"]["udp_sessions"] == 1


# -- the setting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:9100", "[::1]:9100", "0.0.0.0:1"])
def test_listen_accepted(listen: str) -> None:
    settings = cfg.load(None, {"device.name": "tlw0", "metrics.listen": listen})
    assert settings.metrics_listen == listen


@pytest.mark.parametrize(
    ("listen", "why"),
    [
        ("9100", "expected ADDR:PORT"),
        ("127.0.0.1:0", "expected ADDR:PORT"),
        ("127.0.0.1:70000", "expected ADDR:PORT"),
        ("::1:9100", "an IPv6 address goes in brackets"),
        ("[127.0.0.1]:9100", "brackets are for IPv6"),
        ("localhost:9100", "does not appear to be an IPv4 or IPv6 address"),
    ],
)
def test_listen_refused(listen: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^metrics.listen: .*{why}"):
        cfg.load(None, {"device.name": "tlw0", "metrics.listen": listen})

"""Prometheus metrics: ``tunlwip status --format prometheus`` and ``up --metrics-listen``.

Both render the same document, the control socket's ``status`` answer (``control.status``),
so the two cannot disagree: counters (``_total``), drops and refusals by reason, DNS counters,
and gauges (open flows, UDP sessions, pending dials, RSS, open files).

Why ``prometheus_client``: its text exposition (escaping, number formatting, HELP/TYPE lines)
and its parser are the format's reference. Only the pure parts are used: a collector of our
own is handed to ``generate_latest`` through a private ``CollectorRegistry`` made per
rendering. Its global registry (created at import, with its process and GC collectors) is
never read, and its HTTP server threads are never started: the endpoint is a small trio
responder in the gateway's own event loop.

The endpoint answers ``GET /metrics`` only (404 for other paths, 405 for other methods, 400
for anything unparseable), HTTP/1.0 with the connection closed after the answer; a request
larger than ``MAX_REQUEST`` bytes or slower than ``REQUEST_TIMEOUT`` seconds is dropped, and at
most ``MAX_CLIENTS`` are served at once, so a scraper cannot take the data path's time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from . import control
from .config import parse_listen
from .errors import TunlwipError
from .local_server import serve_clients

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = [
    "CONTENT_TYPE",
    "MAX_CLIENTS",
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "MetricsError",
    "StatusCollector",
    "render",
    "serve_metrics",
]

log = logging.getLogger("tunlwip.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
MAX_CLIENTS = 8
PREFIX = "tunlwip_"

#: Stack counters that are gauges (kept by the C side as current values, not totals).
_STACK_GAUGES = {
    "listeners": "catch-all TCP listeners lwIP holds now",
    "udp_ports": "catch-all UDP PCBs lwIP holds now",
    "tcp_half_open": "connections in SYN_RCVD now",
}


class MetricsError(TunlwipError):
    """The metrics endpoint cannot listen where ``metrics.listen`` says."""


# -- the metrics -----------------------------------------------------------------------------


class StatusCollector(Collector):
    """The metric families of one status document (``control.status``'s answer)."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def collect(self) -> Iterator[Metric]:
        doc = self.document
        totals: Mapping[str, Any] = doc.get("totals") or {}
        info = GaugeMetricFamily(PREFIX + "info", "the gateway's version and interface (1)",
                                 labels=["version", "iface"])  # fmt: skip
        info.add_metric([str(doc.get("version", "")), str(doc.get("iface") or "")], 1)
        yield info
        yield _gauge("uptime_seconds", "seconds since the gateway started", doc.get("uptime"))

        flows = totals.get("flows") or {}
        opened = CounterMetricFamily(PREFIX + "flows", "flows opened since start",
                                     labels=["protocol"])  # fmt: skip
        live = GaugeMetricFamily(PREFIX + "open_flows", "flows open now", labels=["protocol"])
        for protocol in ("tcp", "udp"):
            opened.add_metric([protocol], flows.get(protocol, 0))
            live.add_metric([protocol], flows.get(f"live_{protocol}", 0))
        yield opened
        yield live
        yield _counter("flow_records_dropped", "flow records a slow subscriber did not get",
                       flows.get("records_dropped"))  # fmt: skip

        dials = CounterMetricFamily(PREFIX + "dials", "upstream connects by result",
                                    labels=["result"])  # fmt: skip
        for result in ("ok", "refused", "failed"):
            dials.add_metric([result], totals.get(f"dials_{result}", 0))
        yield dials
        yield _gauge("pending_dials", "SYNs held while their upstream connect runs",
                     totals.get("pending_dials"))  # fmt: skip
        yield _counter("syn_retransmits_swallowed",
                       "client SYN retransmits swallowed while dialing",
                       totals.get("syn_retransmits_swallowed"))  # fmt: skip
        yield _gauge("udp_sessions", "UDP sessions open now", totals.get("udp_sessions"))
        yield from _counters("udp", "UDP sessions and datagrams", totals.get("udp"))
        yield from _counters("icmp_echo", "forwarded ICMP echo", totals.get("icmp_echo"))
        if totals.get("dns") is not None:
            yield from _counters("dns", "DNS proxy", totals.get("dns"))
        yield _by_reason("refused", "new flows turned away at a limit", totals.get("refused"))

        stack = totals.get("stack") or {}
        counters: Mapping[str, int] = stack.get("counters") or {}
        drops = {name[5:]: value for name, value in counters.items() if name.startswith("drop_")}
        yield _by_reason("drops", "client packets dropped", drops)
        for name, value in counters.items():
            if name in _STACK_GAUGES:
                yield _gauge(f"stack_{name}", _STACK_GAUGES[name], value)
            elif not name.startswith("drop_"):
                yield _counter(f"stack_{name}", f"stack counter {name} (docs/architecture.md)",
                               value)  # fmt: skip
        yield _gauge("tcp_connections", "TCP connections the stack holds now",
                     stack.get("tcp_connections"))  # fmt: skip
        yield _gauge("lwip_tcp_pcbs", "TCP PCBs lwIP holds now", stack.get("lwip_tcp_pcbs"))

        process = doc.get("process") or {}
        yield _gauge("resident_memory_bytes", "resident memory of the gateway process",
                     process.get("rss_bytes"))  # fmt: skip
        yield _gauge("open_files", "file descriptors the gateway holds", process.get("open_files"))
        yield _gauge("open_files_limit", "its soft RLIMIT_NOFILE",
                     process.get("open_files_limit"))  # fmt: skip


def _number(value: Any) -> float:
    """A counter's value; None (not known) exports as NaN, never as a made-up 0."""
    return float("nan") if value is None else float(value)


def _gauge(name: str, text: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, text, value=_number(value))


def _counter(name: str, text: str, value: Any) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, text, value=_number(value))


def _counters(group: str, what: str, values: Mapping[str, Any] | None) -> Iterator[Metric]:
    """One counter per field of a counters dataclass (``UdpCounters`` ...), by its name."""
    for name, value in (values or {}).items():
        yield _counter(f"{group}_{name}", f"{what}: {name.replace('_', ' ')}", value)


def _by_reason(name: str, text: str, values: Mapping[str, Any] | None) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, text, labels=["reason"])
    for reason, value in sorted((values or {}).items()):
        family.add_metric([reason], _number(value))
    return family


def render(document: Mapping[str, Any]) -> bytes:
    """The text exposition format (version 0.0.4) of a status document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(document))
    return generate_latest(registry)


# -- the endpoint ----------------------------------------------------------------------------


async def serve_metrics(
    gateway: Gateway,
    listen: str,
    *,
    iface: str | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``GET /metrics`` on ``listen`` (``ADDR:PORT``) until cancelled; ``started`` with
    the (address, port) bound (port 0 picks one). OSError if the address cannot be bound."""
    host, port = parse_listen(listen)
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    listener = trio.socket.socket(family, trio.socket.SOCK_STREAM)

    async def serve_client(sock: trio.socket.SocketType) -> None:
        await _serve_client(gateway, iface, sock)

    with listener:
        listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        if family == trio.socket.AF_INET6:
            listener.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
        try:
            await listener.bind((host, port))
            listener.listen(16)
        except OSError as exc:
            raise MetricsError(f"metrics.listen {listen}: {exc.strerror or exc}") from exc
        bound = listener.getsockname()[:2]
        await serve_clients(listener, serve_client, max_clients=MAX_CLIENTS, what="metrics",
                            started=lambda: task_status.started(bound))  # fmt: skip


def respond(request: bytes, body: Callable[[], bytes]) -> bytes:
    """The whole HTTP/1.0 answer to a request head; ``body()`` makes the metrics (only
    called for ``GET /metrics``)."""
    line = request.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _answer("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split("?", 1)[0]
    if target != "/metrics":
        return _answer("404 Not Found", b"not found: try /metrics\n")
    if method != "GET":
        return _answer("405 Method Not Allowed", b"only GET\n", "Allow: GET\r\n")
    return _answer("200 OK", body(), content_type=CONTENT_TYPE)


def _answer(status: str, body: bytes, extra: str = "",
            content_type: str = "text/plain; charset=utf-8") -> bytes:  # fmt: skip
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: "
            f"{len(body)}\r\n{extra}Connection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _serve_client(gateway: Gateway, iface: str | None,
                        sock: trio.socket.SocketType) -> None:  # fmt: skip
    """One request, one answer, all within REQUEST_TIMEOUT; any error ends only this client."""
    with sock, trio.move_on_after(REQUEST_TIMEOUT) as scope:
        try:
            request = await _read_head(sock)
            if request is None:
                return
            data = respond(request, lambda: render(control.status(gateway, iface=iface,
                                                                  max_flows=0)))  # fmt: skip
            view = memoryview(data)
            while view:
                sent = await sock.send(view)
                view = view[sent:]
        except Exception as exc:  # a scraper must never take the gateway down
            log.debug("metrics client failed: %r", exc, exc_info=True)
    if scope.cancelled_caught:
        log.debug("metrics client too slow: dropped after %.0f s", REQUEST_TIMEOUT)


async def _read_head(sock: trio.socket.SocketType) -> bytes | None:
    """The request head (up to the blank line, at most MAX_REQUEST bytes); None if the
    client sent more, or closed before finishing it."""
    buffer = b""
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        data = await sock.recv(MAX_REQUEST + 1 - len(buffer))
        if not data:
            return None
        buffer += data
        if len(buffer) > MAX_REQUEST:
            log.debug("metrics request over %d bytes dropped", MAX_REQUEST)
            return None
    return buffer

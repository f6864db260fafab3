"""Prometheus metrics: ``tunlwip status --format prometheus`` and ``up --metrics-listen``.

Both render the same document, the control socket's ``status`` answer (``control.status``),
so the two cannot disagree: counters (``_total``), drops and refusals by reason, DNS counters,
and gauges (open flows, UDP sessions, pending dials, RSS, open files). Which numbers, under
which names, is declared once in ``stats.METRICS``; this module only exposes them.

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
from .stats import Family, metric_families

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


class MetricsError(TunlwipError):
    """The metrics endpoint cannot listen where ``metrics.listen`` says."""


# -- the metrics -----------------------------------------------------------------------------


class StatusCollector(Collector):
    """The metric families of one status document (``control.status``'s answer): the
    gateway's identity, then every number ``stats.METRICS`` declares."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def collect(self) -> Iterator[Metric]:
        doc = self.document
        info = GaugeMetricFamily(PREFIX + "info", "the gateway's version and interface (1)",
                                 labels=["version", "iface"])  # fmt: skip
        info.add_metric([str(doc.get("version", "")), str(doc.get("iface") or "")], 1)
        yield info
        for family in metric_families(doc):
            yield _exposed(family)


def _exposed(family: Family) -> Metric:
    """``family`` as prometheus_client's metric family of its kind."""
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    if family.label is None:
        [(_, value)] = family.samples
        return kind(PREFIX + family.metric, family.help, value=value)
    exposed = kind(PREFIX + family.metric, family.help, labels=[family.label])
    for label, value in family.samples:
        exposed.add_metric([str(label)], value)
    return exposed


def render(document: Mapping[str, Any]) -> bytes:
    """The text exposition format (version 0.0.4) of a status document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(document))
    return generate_latest(registry)


# -- the endpoint ----------------------------------------------------------------------------


async def serve_metrics(
    gateway: Gateway | control.StatusSource,
    listen: str,
    *,
    iface: str | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``GET /metrics`` on ``listen`` (``ADDR:PORT``) until cancelled; ``started`` with
    the (address, port) bound (port 0 picks one). OSError if the address cannot be bound.
    ``gateway`` may be any ``control.StatusSource`` (the supervisor of ``--workers N``)."""
    source = control.status_source(gateway, iface)
    host, port = parse_listen(listen)
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    listener = trio.socket.socket(family, trio.socket.SOCK_STREAM)

    async def serve_client(sock: trio.socket.SocketType) -> None:
        await _serve_client(source, sock)

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


async def _serve_client(source: control.StatusSource, sock: trio.socket.SocketType) -> None:
    """One request, one answer, all within REQUEST_TIMEOUT; any error ends only this client."""
    with sock, trio.move_on_after(REQUEST_TIMEOUT) as scope:
        try:
            request = await _read_head(sock)
            if request is None:
                return
            # Asked before the request is checked: a gateway answers at once, a supervisor
            # asks its workers, which cannot happen inside respond's synchronous callback.
            document = await source.status_document(0)
            data = respond(request, lambda: render(document))
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

"""TCP flows whose connection is accepted before their way out is opened: sniffing routes,
custom vias, and every route when dial before accept is off.

Theory of operation
-------------------
The default TCP path decides a flow's route when its SYN arrives and dials before it accepts
(``tcp_forward``). Three kinds of flow cannot: a route with ``sniff = true`` needs the client's
first bytes (its TLS SNI or HTTP Host) to know the name, and a client sends nothing before its
handshake is answered; a ``CustomVia`` is an embedder's async function, which needs a task;
and with ``tcp.dial_before_accept = false`` every connection is accepted at once. Those go to
``TcpForwarder.handle`` as an accepted ``LwipTcpStream``, and ``AcceptedForwarding.forward``
takes them from there:

1. **Sniff** (only when the decision is provisional, ``RouteDecision.sniff``): read the
   client's first bytes, at most ``SNIFF_MAX_BYTES``, for at most ``egress.sniff_timeout``
   seconds, and stop as soon as they hold a name or cannot (``sniff.wants_more``), so a
   protocol whose server speaks first (SMTP, SSH) waits the timeout once, then goes on with the
   DNS name. The name is the sniffed one, else the DNS name; the route is decided again with it
   and ``sniffed=True`` (that decision is the one counted).
2. **Open** the way out the route says: ``open_tcp_via`` (direct with its protection, SOCKS5
   with the name for ``remote_dns``, HTTP CONNECT), or the custom via's ``open_tcp``, within the
   dial timeout. ``reject`` resets the client; ``drop`` answers nothing more: the client's bytes
   are read and discarded until it gives up or the dial timeout passes, then it is reset (its
   handshake was answered already, so this is as silent as an accepted connection can be).
   A failed open resets the client (RST: the client was accepted, so no ICMP answer fits) and
   closes the flow with the reason (``errors.dial_failure_reason``); a proxy's failure also
   counts in its route's ``proxy_failures``.
3. **Write the sniffed bytes upstream first**, then relay: a socket (any direct or proxy
   route, or a custom via that returned a ``trio.SocketStream``) goes to the C relay, which
   takes its fd (the stream object must then not be closed: its socket is detached); bytes the
   client sent after the sniff are still unread in the stream and go to C with it. Any other
   stream a custom via returns is relayed in Python (``forward.splice``: 64 KiB per direction at
   most, half-close passed on where the stream has ``send_eof``, both ends closed at the end).

The flow record carries the route's name and the sniffed name (``LiveFlow.route``, ``name``);
the sniffed bytes count in its ``bytes_up``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from ..admission import FD_SHORTAGE
from ..dialer import Dialer
from ..endpoint import Endpoint
from ..errors import LwipError, ProxyError, dial_failure_reason
from ..flows import LiveFlow
from ..forward import splice
from ..sniff import sniff_name, wants_more
from ..tcp import LwipTcpStream
from .custom import CustomVia
from .proxy_dial import open_tcp_via
from .routes import RouteDecision, RouteTable
from .via import Drop, Reject

if TYPE_CHECKING:
    from ..config.sections import GatewayConfig
    from ..relay import Relay

__all__ = ["SNIFF_MAX_BYTES", "AcceptedForwarding", "Sniffed", "sniff_first_bytes"]

log = logging.getLogger("tunlwip.gateway")

#: The most client bytes read for a name: a TLS ClientHello with its SNI (usually under
#: 2 KiB, post-quantum key shares included) or an HTTP request head with its Host line.
SNIFF_MAX_BYTES = 4096
#: The most decisions kept between a SYN accepted first and its connection's task (entries of
#: SYNs that never complete their handshake are dropped oldest first past it).
MAX_AWAITING = 4096

FlowKey = tuple[Endpoint, Endpoint]
#: A connected upstream socket: from ``open_tcp_via`` (stdlib) or a custom via's stream (trio).
AnySocket = socket.socket | trio.socket.SocketType
#: ``TcpForwarder._start_relay``: hand the stream and a connected socket to a C relay.
StartRelay = Callable[[LwipTcpStream, "AnySocket", LiveFlow], "Relay"]


class DialCounters(Protocol):
    """The forwarder's upstream connects by outcome (``tcp_forward.DialCounts``)."""

    ok: int
    refused: int
    failed: int


@dataclasses.dataclass(frozen=True)
class Sniffed:
    """What the sniff read: ``data`` (already taken from the client: it must go upstream
    first), the ``name`` in it if any, and whether the client sent EOF within the sniff."""

    data: bytes
    name: str | None
    eof: bool


async def sniff_first_bytes(stream: trio.abc.ReceiveStream, seconds: float,
                            max_bytes: int = SNIFF_MAX_BYTES) -> Sniffed:  # fmt: skip
    """Read the client's first bytes until they hold a name or cannot, at most ``max_bytes``
    of them, for at most ``seconds``. Nothing read is lost on the timeout (a read that is
    cancelled took nothing)."""
    data = bytearray()
    eof = False
    with trio.move_on_after(seconds):
        while len(data) < max_bytes:
            chunk = await stream.receive_some(max_bytes - len(data))
            if not chunk:
                eof = True
                break
            data += chunk
            if sniff_name(bytes(data)) is not None or not wants_more(bytes(data)):
                break
    first = bytes(data)
    return Sniffed(first, sniff_name(first), eof)


class AcceptedForwarding:
    """The accepted-first path of ``TcpForwarder`` (see the module docstring)."""

    def __init__(self, dialer: Dialer, counts: DialCounters, *, start_relay: StartRelay,
                 fd_shortage: Callable[[OSError], None]) -> None:  # fmt: skip
        self._dialer = dialer
        self._counts = counts
        self._start_relay = start_relay
        self._fd_shortage = fd_shortage
        #: Decisions made at SYN time for connections accepted first, until their task runs
        #: (a custom via's decision is counted then, and must not be made twice).
        self._awaiting: dict[FlowKey, RouteDecision] = {}

    def accept_first(self, key: FlowKey, decision: RouteDecision) -> bool:
        """Is the SYN of ``key``, decided as ``decision``, to be accepted at once (a sniffing
        or custom route)? If so its decision waits here for the connection's task."""
        if not decision.sniff and not isinstance(decision.via, CustomVia):
            return False
        awaiting = self._awaiting
        awaiting.pop(key, None)  # a retransmitted SYN: keep the latest, last in order
        if len(awaiting) >= MAX_AWAITING:
            del awaiting[next(iter(awaiting))]
        awaiting[key] = decision
        return True

    def decision_for(self, key: FlowKey, routes: RouteTable, name: str | None) -> RouteDecision:
        """The decision made for ``key`` at SYN time, else a new one."""
        decision = self._awaiting.pop(key, None)
        if decision is None:
            decision = routes.decide("tcp", key[0], key[1], name)
        return decision

    async def forward(self, stream: LwipTcpStream, flow: LiveFlow, decision: RouteDecision,
                      routes: RouteTable, config: GatewayConfig) -> str | None:  # fmt: skip
        """Carry the accepted ``stream`` by its route (sniffing first when ``decision`` is
        provisional). Returns None once a C relay owns the flow, else why the flow ended."""
        target = stream.local
        first = b""
        if decision.sniff:
            try:
                sniffed = await sniff_first_bytes(stream, config.sniff_timeout)
            except trio.BrokenResourceError:  # the client reset while we listened
                return "reset"
            first = sniffed.data
            if sniffed.name is not None:
                flow.name = sniffed.name
            decision = routes.decide("tcp", stream.remote, target, flow.name, sniffed=True)
        flow.route = decision.name
        via = decision.via
        if isinstance(via, Reject):
            stream.abort()
            return "rejected"
        if isinstance(via, Drop):
            await _discard_until(stream, config.dial_timeout)
            stream.abort()
            return "dropped"
        started = trio.current_time()
        upstream: trio.abc.Stream | socket.socket
        try:
            if isinstance(via, CustomVia):
                with trio.fail_after(config.dial_timeout):
                    upstream = await via.open_tcp(target, flow.name)
            else:
                upstream = await open_tcp_via(
                    via, self._dialer, target, name=flow.name,
                    handshake_timeout=config.proxy_handshake_timeout)  # fmt: skip
        except (OSError, trio.TooSlowError) as exc:
            flow.connect_latency = trio.current_time() - started
            failure = exc if isinstance(exc, OSError) else \
                TimeoutError(errno.ETIMEDOUT, "custom via timed out")  # fmt: skip
            return self._open_failed(stream, decision, failure)
        flow.connect_latency = trio.current_time() - started
        self._counts.ok += 1
        if isinstance(upstream, socket.socket):
            return await self._relay_socket(stream, upstream, first, flow)
        if isinstance(upstream, trio.SocketStream) and \
                upstream.socket.type == socket.SOCK_STREAM:  # fmt: skip
            return await self._relay_socket(stream, upstream.socket, first, flow)
        return await _relay_in_python(stream, upstream, first, config.idle_timeout)

    def _open_failed(self, stream: LwipTcpStream, decision: RouteDecision, exc: OSError) -> str:
        if exc.errno in FD_SHORTAGE:
            self._fd_shortage(exc)
        elif isinstance(exc, ConnectionRefusedError):
            self._counts.refused += 1
        else:
            self._counts.failed += 1
        if isinstance(exc, ProxyError):
            decision.counters.proxy_failures += 1
        log.debug("route %s for %s -> %s failed: %s", decision.name, stream.remote,
                  stream.local, exc)  # fmt: skip
        stream.abort()  # accepted already: RST is the only answer left
        return dial_failure_reason(exc)

    async def _relay_socket(self, stream: LwipTcpStream, sock: AnySocket, first: bytes,
                            flow: LiveFlow) -> str | None:  # fmt: skip
        """The sniffed bytes to ``sock``, then both to a C relay (which takes the fd)."""
        try:
            await _send_all(sock, first)
        except OSError as exc:
            sock.close()
            stream.abort()
            log.debug("upstream of %s -> %s broke: %s", stream.remote, stream.local, exc)
            return "reset"
        try:
            relay = self._start_relay(stream, sock, flow)  # closes the socket if it raises
        except (trio.BrokenResourceError, LwipError):
            return "reset"
        if first:  # read in Python before the relay: C's count starts after them
            counts = relay.byte_counts
            flow.count_bytes_with(lambda: _plus_up(counts(), len(first)))
        return None


def _plus_up(counts: tuple[int, int], extra: int) -> tuple[int, int]:
    return counts[0] + extra, counts[1]


async def _send_all(sock: AnySocket, data: bytes) -> None:
    """All of ``data`` to a connected non-blocking socket (a few KiB into a fresh
    connection's send buffer: one ``send`` in practice)."""
    view = memoryview(data)
    while view:
        if isinstance(sock, socket.socket):
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
        else:
            sent = await sock.send(view)
        view = view[sent:]


async def _discard_until(stream: LwipTcpStream, seconds: float) -> None:
    """Read and drop the client's bytes until it closes, breaks or ``seconds`` pass."""
    with trio.move_on_after(seconds), contextlib.suppress(trio.BrokenResourceError,
                                                          trio.ClosedResourceError):  # fmt: skip
        while await stream.receive_some():
            pass


async def _relay_in_python(client: LwipTcpStream, upstream: trio.abc.Stream, first: bytes,
                           idle_timeout: float | None) -> str:  # fmt: skip
    """Relay a custom via's non-socket stream: ``first`` to it, then both ways in Python until
    both directions finished or one broke; both ends closed afterwards."""
    try:
        try:
            if first:
                await upstream.send_all(first)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            client.abort()
            return "reset"
        result = await splice(client, upstream, idle_timeout=idle_timeout)
        return "reset" if result.reason.startswith("reset") else result.reason
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await upstream.aclose()
        client.close_now()

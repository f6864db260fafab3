"""The upstream transports: DNS over UDP, TCP, TLS (RFC 7858) and HTTPS (RFC 8484).

Theory of operation. UDP queries go out through a pool of rotating protected sockets on random
ports, each with a fresh random ID (``udp_pool``), so an off-path spoofer must guess both;
datagrams that do not answer a query in flight are ignored (counted), and a truncated answer
is asked again over TCP. The three stream transports share one pool
(``_StreamUpstream``): up to ``MAX_IDLE`` idle connections, the most recently used taken
first, none older than ``MAX_IDLE_AGE``; one query at a time on each connection (no
pipelining, so a pooled connection is always clean to reuse); a reused connection that fails
before any byte of the answer arrived is replaced by a new one once, transparently. They
differ only in how a connection is opened (TCP, or TLS on TCP) and in one exchange (a
length-prefixed message, or an HTTP POST, ``doh.py``). Timeouts are the caller's. Every
connection and socket comes from the upstream's dialer (``upstream_via.UpstreamDialer``): the
gateway's protected ``Dialer``, or a proxy's (TLS then goes on top of the proxied stream).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import secrets
import ssl
import struct
from typing import TYPE_CHECKING

import trio

from ..endpoint import Endpoint
from ..errors import TunlwipError
from .udp_pool import UdpSocketPool
from .upstream_via import UpstreamDialer
from .wire import (
    FLAG_TC,
    Question,
    UpstreamError,
    accept,
    describe,
    header_flags,
    parse_request,
    with_id,
)

if TYPE_CHECKING:
    import h11  # DoH's HTTP/1.1: imported with doh.py, by DoH upstreams only (idle memory)

log = logging.getLogger("tunlwip.dns.upstreams")

MAX_IDLE = 4  # idle connections kept per upstream
MAX_IDLE_AGE = 30.0  # seconds; servers close idle DNS connections (RFC 7766 6.2.3)
MAX_CONNECTIONS = 16  # per stream upstream; more queries wait rather than flood the server
RECEIVE_SIZE = 65536
CLOSE_GRACE = 1.0  # seconds aclose() gives a TLS close_notify

# Errors of the transport itself (as opposed to a bad answer): a reused connection failing with
# one of these before any byte of the answer arrived is retried on a new connection.
_TRANSPORT_ERRORS = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError)


# -- UDP -----------------------------------------------------------------------------------


class UdpUpstream:
    """DNS over UDP through a pool of rotating protected sockets (``udp_pool``); truncated
    answers are asked again over TCP."""

    def __init__(self, url: str, dialer: UpstreamDialer, endpoint: Endpoint) -> None:
        self.url = url
        self.endpoint = endpoint
        self._tcp = TcpUpstream(url, dialer, endpoint)
        self.pool = UdpSocketPool(functools.partial(dialer.open_udp, endpoint))
        #: Answers that came back truncated and were asked again over TCP.
        self.tcp_retries = 0

    def __repr__(self) -> str:
        return f"<UdpUpstream {self.url}>"

    async def query(self, request: bytes) -> bytes:
        original_id, question = parse_request(request)
        try:
            answer = await self.pool.exchange(request, question)
        except (OSError, TunlwipError) as exc:  # ECONNREFUSED (a closed port); no socket
            raise UpstreamError(describe(exc)) from exc
        if header_flags(answer) & FLAG_TC:
            return await self.ask_over_tcp(request)
        return with_id(answer, original_id)

    async def ask_over_tcp(self, request: bytes) -> bytes:
        """The answer to ``request`` over TCP, to the same address and port: what a truncated
        answer over UDP is followed by (counted: ``tcp_retries``)."""
        self.tcp_retries += 1
        log.debug("%s: truncated answer, asking again over TCP", self.url)
        return await self._tcp.query(request)

    async def aclose(self) -> None:
        self.pool.close()
        await self._tcp.aclose()


# -- the pool of stream connections ---------------------------------------------------------


class _Connection:
    """A pooled stream plus what was read beyond the current message (and, for HTTPS, the
    HTTP/1.1 state of the connection)."""

    def __init__(self, stream: trio.abc.Stream, http: h11.Connection | None = None) -> None:
        self.stream = stream
        self.http = http
        self.buffer = bytearray()
        self.received = 0  # bytes received during the current exchange
        self.idle_since = 0.0

    async def receive(self) -> bytes | bytearray:
        """The next bytes from the server (b"" at end of stream), counted in ``received``."""
        data = await self.stream.receive_some(RECEIVE_SIZE)
        self.received += len(data)
        return data

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            more = await self.receive()
            if not more:
                raise EOFError("connection closed by the upstream")
            self.buffer += more
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class _StreamUpstream:
    """What tcp, tls and https share: a small pool of idle connections, one query at a time
    on each. Subclasses say how to connect; the exchange is RFC 1035 4.2.2 framing unless
    overridden."""

    def __init__(
        self,
        url: str,
        dialer: UpstreamDialer,
        endpoint: Endpoint,
        *,
        max_idle: int = MAX_IDLE,
        max_idle_age: float = MAX_IDLE_AGE,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.url = url
        self.endpoint = endpoint
        self.max_idle = max_idle
        self.max_idle_age = max_idle_age
        self._dialer = dialer
        self._idle: collections.deque[_Connection] = collections.deque()
        self._limit = trio.Semaphore(max_connections)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def query(self, request: bytes) -> bytes:
        original_id, question = parse_request(request)
        async with self._limit:
            answer = await self._query_pooled(request, question)
        return with_id(answer, original_id)

    async def _query_pooled(self, request: bytes, question: Question) -> bytes:
        conn = await self._take_idle()
        if conn is not None:
            try:
                return await self._use(conn, request, question)
            except _TRANSPORT_ERRORS as exc:
                if conn.received:
                    raise UpstreamError(describe(exc)) from exc
                log.debug("%s: idle connection was closed (%s), using a new one",
                          self.url, describe(exc))  # fmt: skip
        try:
            conn = await self._connect()
            return await self._use(conn, request, question)
        except _TRANSPORT_ERRORS as exc:
            raise UpstreamError(describe(exc)) from exc

    async def _use(self, conn: _Connection, request: bytes, question: Question) -> bytes:
        """One exchange; the connection goes back to the pool only if it ended cleanly."""
        conn.received = 0
        try:
            answer, keep = await self._exchange(conn, request, question)
        except BaseException:  # cancelled mid-exchange included: the stream's state is unknown
            await conn.aclose()
            raise
        if keep:
            await self._release(conn)
        else:
            await conn.aclose()
        return answer

    async def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection, if it is young enough (LIFO keeps the
        connections the server is least likely to have closed)."""
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since <= self.max_idle_age and not conn.buffer:
                return conn
            await conn.aclose()
        return None

    async def _release(self, conn: _Connection) -> None:
        conn.idle_since = now = trio.current_time()
        self._idle.append(conn)
        while self._idle and (
            len(self._idle) > self.max_idle or now - self._idle[0].idle_since > self.max_idle_age
        ):
            await self._idle.popleft().aclose()

    async def aclose(self) -> None:
        """Close the idle connections, gracefully if that is quick (a TLS close_notify)."""
        while self._idle:
            conn = self._idle.popleft()
            # Errors are ignored: the stream is closed anyway (trio's aclose contract).
            ignore_errors = contextlib.suppress(trio.BrokenResourceError, OSError)
            with trio.move_on_after(CLOSE_GRACE), ignore_errors:
                await conn.stream.aclose()
            await conn.aclose()  # a no-op unless the graceful close timed out

    async def _connect(self) -> _Connection:
        raise NotImplementedError

    async def _exchange(
        self, conn: _Connection, request: bytes, question: Question
    ) -> tuple[bytes, bool]:
        """Send ``request`` with a new ID, return (raw answer, whether to keep the connection).

        RFC 1035 4.2.2 / RFC 7858: one length-prefixed query, one length-prefixed answer."""
        message_id = secrets.randbelow(0x10000)
        wire = with_id(request, message_id)
        await conn.stream.send_all(struct.pack("!H", len(wire)) + wire)
        (length,) = struct.unpack("!H", await conn.read_exactly(2))
        answer = await conn.read_exactly(length)
        accept(answer, message_id, question)
        return answer, True


class TcpUpstream(_StreamUpstream):
    """DNS over TCP with pooled connections."""

    async def _connect(self) -> _Connection:
        return _Connection(await self._dialer.open_tcp(self.endpoint))


class _TlsStreamUpstream(_StreamUpstream):
    """A pooled upstream over verified TLS: what DoT and DoH share."""

    #: Whether the server may close without close_notify (HTTP servers do; DoT framing is
    #: explicit, so there a missing close_notify is an error).
    _https_compatible = False

    def __init__(
        self,
        url: str,
        dialer: UpstreamDialer,
        endpoint: Endpoint,
        *,
        server_name: str,
        context: ssl.SSLContext,
        max_idle: int = MAX_IDLE,
        max_idle_age: float = MAX_IDLE_AGE,
    ) -> None:
        super().__init__(url, dialer, endpoint, max_idle=max_idle, max_idle_age=max_idle_age)
        self.server_name = server_name
        self._context = context

    async def _open_tls(self) -> trio.SSLStream[trio.SocketStream]:
        tcp = await self._dialer.open_tcp(self.endpoint)
        stream = trio.SSLStream(tcp, self._context, server_hostname=self.server_name,
                                https_compatible=self._https_compatible)  # fmt: skip
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream

    async def _connect(self) -> _Connection:
        return _Connection(await self._open_tls())


class TlsUpstream(_TlsStreamUpstream):
    """DNS over TLS (RFC 7858): TCP framing inside a verified TLS session."""


class HttpsUpstream(_TlsStreamUpstream):
    """DNS over HTTPS (RFC 8484): POST over HTTP/1.1 (h11) with keep-alive."""

    _https_compatible = True

    def __init__(
        self,
        url: str,
        dialer: UpstreamDialer,
        endpoint: Endpoint,
        *,
        server_name: str,
        host_header: str,
        target: str,
        context: ssl.SSLContext,
        max_idle: int = MAX_IDLE,
        max_idle_age: float = MAX_IDLE_AGE,
    ) -> None:
        super().__init__(url, dialer, endpoint, server_name=server_name, context=context,
                         max_idle=max_idle, max_idle_age=max_idle_age)  # fmt: skip
        self.host_header = host_header
        self.target = target

    async def _connect(self) -> _Connection:
        from . import doh

        return _Connection(await self._open_tls(), doh.new_connection())

    async def _exchange(
        self, conn: _Connection, request: bytes, question: Question
    ) -> tuple[bytes, bool]:
        from . import doh

        assert conn.http is not None
        wire = with_id(request, 0)  # RFC 8484 4.1: ID 0 keeps answers cacheable by HTTP caches
        await conn.stream.send_all(doh.encode_post(conn.http, self.target, self.host_header, wire))
        body, keep = await doh.read_answer(conn.http, conn.receive)
        accept(body, 0, question)
        return body, keep

"""DNS upstreams: send one query over Do53 (UDP/TCP), DoT or DoH, with failover across a list.

URL forms. Addresses are IP literals: an upstream is never found by name resolution, which
would itself need DNS and could leak around the proxy.

``udp://IP[:port]`` (port 53)
    Every query gets a new protected socket (a fresh source port) and a fresh random ID, so an
    off-path spoofer must guess both; datagrams whose ID or question do not match are ignored.
    A truncated (TC) answer is retried over TCP to the same address and port.
``tcp://IP[:port]`` (port 53)
    2-byte length-prefixed messages (RFC 1035 4.2.2).
``tls://IP[:port][#servername]`` (port 853)
    DNS over TLS (RFC 7858). The certificate is verified against ``servername`` if given, else
    against the IP address (the certificate's IP SANs); CAs: the system's, or ``ca_file``.
``https://HOST[:port][/path][#IP]`` (port 443, path ``/dns-query``)
    DNS over HTTPS (RFC 8484): HTTP/1.1 POST of ``application/dns-message``. HOST is the TLS
    server name and the Host header; when it is a name, ``#IP`` is required: the address to
    connect to.

IPv6 addresses go in brackets: ``udp://[fd00:1::2]:53``. Every socket comes from the protected
dialer. TCP, TLS and HTTPS upstreams keep up to 4 idle connections for reuse; one idle for
more than 30 s is closed instead, and a reused connection the server had closed is replaced
by a new one once, transparently.

Every query goes out with a new random ID (0 for DoH, RFC 8484 4.1), the answer must repeat
the ID and the question, and the caller gets it back with its own ID. Timeouts are the
caller's: ``Upstream.query`` waits until cancelled, ``UpstreamSet`` bounds each attempt.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import re
import secrets
import ssl
import struct
import urllib.parse
from collections.abc import Sequence
from typing import Protocol

import dns.flags
import dns.message
import dns.name
import dns.rcode
import trio

from ..dialer import Dialer
from ..endpoint import Endpoint, IPAddress
from ..errors import ConfigError, TunlwipError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}
DOH_PATH = "/dns-query"
HEADER_LEN = 12
MAX_MESSAGE = 65535
MAX_IDLE = 4  # idle connections kept per upstream
MAX_IDLE_AGE = 30.0  # seconds; servers close idle DNS connections (RFC 7766 6.2.3)
MAX_CONNECTIONS = 16  # per stream upstream; more queries wait rather than flood the server
RECEIVE_SIZE = 65536
MAX_HEAD_LINE = 8192
MAX_HEADERS = 100
CLOSE_GRACE = 1.0  # seconds aclose() gives a TLS close_notify

_HEADER = struct.Struct("!HH")  # ID, flags
# Error answers may omit the question: a server that could not parse it cannot repeat it.
_QUESTIONLESS_OK = {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}
_MOVE_ON_RCODES = {dns.rcode.SERVFAIL, dns.rcode.REFUSED}
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.IGNORECASE)
# Errors of the transport itself (as opposed to a bad answer): a reused connection failing with
# one of these before any byte of the answer arrived is retried on a new connection.
_TRANSPORT_ERRORS = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError)

_Question = tuple[tuple[dns.name.Name, int, int], ...]


class UpstreamError(TunlwipError):
    """A query failed on an upstream (from ``UpstreamSet.resolve``: on all of them)."""


class Upstream(Protocol):
    """One configured DNS server; ``query`` is safe to call from many tasks at once."""

    url: str

    async def query(self, request: bytes) -> bytes:
        """The answer to ``request`` (wire format), with the request's ID restored."""
        ...

    async def aclose(self) -> None:
        """Close pooled connections."""
        ...


# -- message checks ------------------------------------------------------------------------


def _parse_request(request: bytes) -> tuple[int, _Question]:
    """The caller's ID and the question an answer must repeat."""
    if len(request) > MAX_MESSAGE:
        raise UpstreamError(f"query too large ({len(request)} bytes)")
    try:
        message = dns.message.from_wire(request, question_only=True)
    except Exception as exc:
        raise UpstreamError(f"malformed query: {exc}") from exc
    return message.id, _question(message)


def _question(message: dns.message.Message) -> _Question:
    return tuple((rrset.name, rrset.rdtype, rrset.rdclass) for rrset in message.question)


def _with_id(wire: bytes, message_id: int) -> bytes:
    return struct.pack("!H", message_id) + wire[2:]


def _flags(wire: bytes) -> int:
    return int(_HEADER.unpack_from(wire)[1])


def _mismatch(wire: bytes, message_id: int, question: _Question) -> str | None:
    """Why ``wire`` is not the answer to our query (None: it is)."""
    if len(wire) < HEADER_LEN:
        return f"short message ({len(wire)} bytes)"
    got_id, flags = _HEADER.unpack_from(wire)
    if got_id != message_id:
        return f"ID {got_id} instead of {message_id}"
    if not flags & dns.flags.QR:
        return "not a response"
    try:
        answer = dns.message.from_wire(wire, question_only=True)
    except Exception as exc:
        return f"unreadable question: {exc}"
    got = _question(answer)
    if got != question and (got or answer.rcode() not in _QUESTIONLESS_OK):
        return "question does not match"
    return None


def _accept(wire: bytes, message_id: int, question: _Question) -> None:
    """Raise UpstreamError unless ``wire`` is a well-formed answer to our query."""
    reason = _mismatch(wire, message_id, question)
    if reason is not None:
        raise UpstreamError(f"unexpected answer: {reason}")
    _validate(wire)


def _validate(wire: bytes) -> None:
    """A malformed answer is the upstream's failure, found here so that the next one is tried.

    Truncated answers may be cut anywhere and signed ones cannot be checked without the key:
    both pass as they are."""
    if _flags(wire) & dns.flags.TC:
        return
    try:
        dns.message.from_wire(wire)
    except dns.message.UnknownTSIGKey:
        pass
    except Exception as exc:
        raise UpstreamError(f"malformed answer: {exc}") from exc


def _describe(exc: BaseException) -> str:
    """The useful part of a transport error (trio wraps TLS errors in BrokenResourceError)."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- UDP -----------------------------------------------------------------------------------


class UdpUpstream:
    """DNS over UDP: one fresh socket per query; truncated answers are retried over TCP."""

    def __init__(self, url: str, dialer: Dialer, endpoint: Endpoint) -> None:
        self.url = url
        self.endpoint = endpoint
        self._dialer = dialer
        self._tcp = TcpUpstream(url, dialer, endpoint)
        #: Answers that came back truncated and were asked again over TCP.
        self.tcp_retries = 0

    def __repr__(self) -> str:
        return f"<UdpUpstream {self.url}>"

    async def query(self, request: bytes) -> bytes:
        original_id, question = _parse_request(request)
        message_id = secrets.randbelow(0x10000)
        try:
            sock = trio.socket.from_stdlib_socket(self._dialer.open_udp(self.endpoint))
        except OSError as exc:
            raise UpstreamError(f"cannot open a socket: {_describe(exc)}") from exc
        with sock:
            try:
                await sock.send(_with_id(request, message_id))
                answer = await self._receive(sock, message_id, question)
            except OSError as exc:  # ECONNREFUSED: the ICMP port unreachable of a closed port
                raise UpstreamError(_describe(exc)) from exc
        if _flags(answer) & dns.flags.TC:
            self.tcp_retries += 1
            log.debug("%s: truncated answer, asking again over TCP", self.url)
            return await self._tcp.query(request)
        _validate(answer)
        return _with_id(answer, original_id)

    async def _receive(
        self, sock: trio.socket.SocketType, message_id: int, question: _Question
    ) -> bytes:
        """The first datagram that answers our query; others may be spoofs and are ignored."""
        while True:
            data = await sock.recv(RECEIVE_SIZE)
            reason = _mismatch(data, message_id, question)
            if reason is None:
                return data
            log.debug("%s: ignoring a datagram: %s", self.url, reason)

    async def aclose(self) -> None:
        await self._tcp.aclose()


# -- connection-oriented upstreams -------------------------------------------------------------


class _Connection:
    """A pooled stream plus what was read beyond the current message."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.received = 0  # bytes received during the current exchange
        self.idle_since = 0.0

    async def _fill(self) -> None:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise EOFError("connection closed by the upstream")
        self.received += len(data)
        self.buffer += data

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_line(self) -> bytes:
        """One line without its CRLF (or bare LF)."""
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MAX_HEAD_LINE:
                raise UpstreamError("HTTP line too long")
            await self._fill()
        line = bytes(self.buffer[:end]).removesuffix(b"\r")
        del self.buffer[: end + 1]
        return line

    async def read_to_eof(self, limit: int) -> bytes:
        try:
            while len(self.buffer) <= limit:
                await self._fill()
        except EOFError:
            return await self.read_exactly(len(self.buffer))
        raise UpstreamError(f"body larger than {limit} bytes")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class _StreamUpstream:
    """What tcp, tls and https share: a small pool of idle connections, one query at a time
    on each (no pipelining: a pooled connection is always clean to reuse)."""

    def __init__(
        self,
        url: str,
        dialer: Dialer,
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
        original_id, question = _parse_request(request)
        async with self._limit:
            answer = await self._query_pooled(request, question)
        return _with_id(answer, original_id)

    async def _query_pooled(self, request: bytes, question: _Question) -> bytes:
        conn = await self._take_idle()
        if conn is not None:
            try:
                return await self._use(conn, request, question)
            except _TRANSPORT_ERRORS as exc:
                if conn.received:
                    raise UpstreamError(_describe(exc)) from exc
                log.debug("%s: idle connection was closed (%s), using a new one",
                          self.url, _describe(exc))  # fmt: skip
        try:
            conn = await self._connect()
            return await self._use(conn, request, question)
        except _TRANSPORT_ERRORS as exc:
            raise UpstreamError(_describe(exc)) from exc

    async def _use(self, conn: _Connection, request: bytes, question: _Question) -> bytes:
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
        self, conn: _Connection, request: bytes, question: _Question
    ) -> tuple[bytes, bool]:
        """Send ``request`` with a new ID, return (raw answer, whether to keep the connection)."""
        raise NotImplementedError


async def _framed_exchange(conn: _Connection, request: bytes, question: _Question) -> bytes:
    """RFC 1035 4.2.2 / RFC 7858: one length-prefixed query, one length-prefixed answer."""
    message_id = secrets.randbelow(0x10000)
    wire = _with_id(request, message_id)
    await conn.stream.send_all(struct.pack("!H", len(wire)) + wire)
    (length,) = struct.unpack("!H", await conn.read_exactly(2))
    answer = await conn.read_exactly(length)
    _accept(answer, message_id, question)
    return answer


async def _open_tls(
    dialer: Dialer, endpoint: Endpoint, context: ssl.SSLContext, server_name: str, *, http: bool
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await dialer.open_tcp(endpoint)
    # https_compatible: HTTP servers may close without close_notify; our framing is explicit.
    stream = trio.SSLStream(tcp, context, server_hostname=server_name, https_compatible=http)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


class TcpUpstream(_StreamUpstream):
    """DNS over TCP with pooled connections."""

    async def _connect(self) -> _Connection:
        return _Connection(await self._dialer.open_tcp(self.endpoint))

    async def _exchange(
        self, conn: _Connection, request: bytes, question: _Question
    ) -> tuple[bytes, bool]:
        return await _framed_exchange(conn, request, question), True


class TlsUpstream(_StreamUpstream):
    """DNS over TLS (RFC 7858): TCP framing inside a verified TLS session."""

    def __init__(
        self,
        url: str,
        dialer: Dialer,
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

    async def _connect(self) -> _Connection:
        tls = await _open_tls(self._dialer, self.endpoint, self._context, self.server_name,
                              http=False)  # fmt: skip
        return _Connection(tls)

    async def _exchange(
        self, conn: _Connection, request: bytes, question: _Question
    ) -> tuple[bytes, bool]:
        return await _framed_exchange(conn, request, question), True


class HttpsUpstream(_StreamUpstream):
    """DNS over HTTPS (RFC 8484): POST over hand-written HTTP/1.1 with keep-alive."""

    def __init__(
        self,
        url: str,
        dialer: Dialer,
        endpoint: Endpoint,
        *,
        server_name: str,
        host_header: str,
        target: str,
        context: ssl.SSLContext,
        max_idle: int = MAX_IDLE,
        max_idle_age: float = MAX_IDLE_AGE,
    ) -> None:
        super().__init__(url, dialer, endpoint, max_idle=max_idle, max_idle_age=max_idle_age)
        self.server_name = server_name
        self.host_header = host_header
        self.target = target
        self._context = context

    async def _connect(self) -> _Connection:
        tls = await _open_tls(self._dialer, self.endpoint, self._context, self.server_name,
                              http=True)  # fmt: skip
        return _Connection(tls)

    async def _exchange(
        self, conn: _Connection, request: bytes, question: _Question
    ) -> tuple[bytes, bool]:
        wire = _with_id(request, 0)  # RFC 8484 4.1: ID 0 keeps answers cacheable by HTTP caches
        head = (
            f"POST {self.target} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            "Content-Type: application/dns-message\r\n"
            "Accept: application/dns-message\r\n"
            f"Content-Length: {len(wire)}\r\n"
            "\r\n"
        )
        await conn.stream.send_all(head.encode("ascii") + wire)
        status, headers, body, keep = await _read_http_response(conn)
        if status != 200:
            raise UpstreamError(f"HTTP status {status}")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/dns-message":
            raise UpstreamError(f"HTTP content-type {content_type or 'missing'!r}")
        _accept(body, 0, question)
        return body, keep


# -- HTTP/1.1 response reading (RFC 9112) --------------------------------------------------


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


async def _read_http_response(conn: _Connection) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers with lower-case names, body, keep-alive) of one response."""
    while True:
        version, status = _status_line(await conn.read_line())
        headers = await _read_headers(conn)
        if not 100 <= status < 200:
            break
        if status == 101:
            raise UpstreamError("HTTP 101: unexpected protocol switch")
        # 1xx: interim (100 Continue, 103 Early Hints); the real response follows.
    keep = version == "HTTP/1.1" and "close" not in _tokens(headers.get("connection", ""))
    encodings = _tokens(headers.get("transfer-encoding", ""))
    if encodings:
        if encodings != ["chunked"]:
            raise UpstreamError(f"HTTP transfer-encoding {headers['transfer-encoding']!r}")
        body = await _read_chunked(conn)
    elif "content-length" in headers:
        lengths = set(_tokens(headers["content-length"]))
        if len(lengths) != 1 or not (text := lengths.pop()).isdigit():
            raise UpstreamError(f"HTTP content-length {headers['content-length']!r}")
        if int(text) > MAX_MESSAGE:
            raise UpstreamError(f"HTTP body too large ({text} bytes)")
        body = await conn.read_exactly(int(text))
    else:
        body = await conn.read_to_eof(MAX_MESSAGE)
        keep = False
    return status, headers, body, keep


def _status_line(line: bytes) -> tuple[str, int]:
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not re.fullmatch(r"\d{3}", parts[1]):
        raise UpstreamError(f"bad HTTP status line {line[:100]!r}")
    return parts[0], int(parts[1])


async def _read_headers(conn: _Connection) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = (await conn.read_line()).decode("latin-1")
        if not line:
            return headers
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise UpstreamError(f"bad HTTP header line {line[:100]!r}")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    raise UpstreamError(f"more than {MAX_HEADERS} HTTP header lines")


async def _read_chunked(conn: _Connection) -> bytes:
    body = bytearray()
    while True:
        size_text = (await conn.read_line()).split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size_text):
            raise UpstreamError(f"bad HTTP chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            await _read_headers(conn)  # trailers, ignored
            return bytes(body)
        if len(body) + size > MAX_MESSAGE:
            raise UpstreamError("HTTP body too large")
        body += await conn.read_exactly(size)
        if await conn.read_exactly(2) != b"\r\n":
            raise UpstreamError("HTTP chunk not followed by CRLF")


# -- configuration -------------------------------------------------------------------------


def parse_upstream(url: str, dialer: Dialer, *, ca_file: str | None = None) -> Upstream:
    """The upstream a URL describes (see the module docstring); ConfigError if invalid.

    TLS settings (the CA file included) are loaded here, so that a bad file fails at start."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    scheme = parts.scheme
    if scheme not in DEFAULT_PORTS:
        raise _bad(url, "the scheme must be udp://, tcp://, tls:// or https://")
    if parts.username is not None or parts.password is not None:
        raise _bad(url, "credentials are not supported")
    host = parts.hostname
    if not host:
        raise _bad(url, "no address")
    if port == 0:
        raise _bad(url, "port 0")
    port = port or DEFAULT_PORTS[scheme]
    if scheme == "https":
        return _parse_https(url, dialer, ca_file, parts, host, port)
    if parts.path not in ("", "/") or parts.query:
        raise _bad(url, "unexpected path or query")
    endpoint = Endpoint(_ip(url, host, "the host"), port)
    if scheme == "tls":
        server_name = parts.fragment or str(endpoint.address)
        if not _valid_server_name(server_name):
            raise _bad(url, f"bad server name {server_name!r}")
        return TlsUpstream(url, dialer, endpoint, server_name=server_name,
                           context=_tls_context(url, ca_file, alpn=None))  # fmt: skip
    if parts.fragment:
        raise _bad(url, f"'#{parts.fragment}' is only meaningful for tls:// and https://")
    if scheme == "udp":
        return UdpUpstream(url, dialer, endpoint)
    return TcpUpstream(url, dialer, endpoint)


def _parse_https(
    url: str,
    dialer: Dialer,
    ca_file: str | None,
    parts: urllib.parse.SplitResult,
    host: str,
    port: int,
) -> HttpsUpstream:
    path = parts.path or DOH_PATH
    if not path.startswith("/") or re.search(r"[\s{}]", path):
        raise _bad(url, f"bad path {path!r} (URI templates are not supported: give the path)")
    target = f"{path}?{parts.query}" if parts.query else path
    try:
        address: IPAddress = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise _bad(url, f"bad host {host!r}") from None
        if not parts.fragment:
            raise _bad(url, "a host name needs '#IP', the address to connect to (upstreams are "
                       "never looked up by name)") from None  # fmt: skip
        address = _ip(url, parts.fragment, "the address after '#'")
    else:
        if parts.fragment and _ip(url, parts.fragment, "the address after '#'") != address:
            raise _bad(url, "the host is an IP address: '#IP' must be the same address or absent")
    host_header = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS["https"]:
        host_header += f":{port}"
    return HttpsUpstream(url, dialer, Endpoint(address, port), server_name=host,
                         host_header=host_header, target=target,
                         context=_tls_context(url, ca_file, alpn=["http/1.1"]))  # fmt: skip


def _bad(url: str, reason: str) -> ConfigError:
    return ConfigError(f"DNS upstream {url!r}: {reason}")


def _ip(url: str, text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _bad(url, f"{what} {text!r} is not an IP address (upstreams are never looked up "
                   "by name)") from None  # fmt: skip


def _valid_server_name(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return _HOSTNAME.fullmatch(name) is not None
    return True


def _tls_context(url: str, ca_file: str | None, *, alpn: list[str] | None) -> ssl.SSLContext:
    """Verification on, host names checked: the defaults of ``ssl.create_default_context``."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as exc:
        raise _bad(url, f"cannot load the CA file {ca_file!r}: {exc}") from None
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


# -- failover ------------------------------------------------------------------------------


class UpstreamSet:
    """The configured upstreams, tried in order until one answers.

    An upstream that fails or stays silent for ``attempt_timeout`` seconds is skipped. An
    answer with SERVFAIL or REFUSED also moves on (another server may well know); if no later
    upstream answers, the last such answer is returned rather than an error."""

    def __init__(self, upstreams: Sequence[Upstream], *, attempt_timeout: float = 2.0) -> None:
        if not attempt_timeout > 0:
            raise ConfigError(f"DNS attempt timeout must be positive, not {attempt_timeout}")
        self.upstreams: tuple[Upstream, ...] = tuple(upstreams)
        self.attempt_timeout = attempt_timeout
        self._counts = dict.fromkeys(("queries", "failures", "timeouts", "bad_rcodes",
                                      "all_failed"), 0)  # fmt: skip

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot: ``queries`` (resolve calls); per attempt: ``failures`` (errors),
        ``timeouts``, ``bad_rcodes`` (SERVFAIL/REFUSED, moved on); ``all_failed`` (resolve
        calls that raised); ``tcp_retries`` (truncated UDP answers asked again over TCP)."""
        retries = sum(u.tcp_retries for u in self.upstreams if isinstance(u, UdpUpstream))
        return {**self._counts, "tcp_retries": retries}

    async def resolve(self, request: bytes) -> tuple[bytes, Upstream]:
        """(answer, the upstream that gave it); UpstreamError if none answered."""
        self._counts["queries"] += 1
        errors: list[str] = []
        fallback: tuple[bytes, Upstream] | None = None
        for upstream in self.upstreams:
            with trio.move_on_after(self.attempt_timeout) as attempt:
                try:
                    answer = await upstream.query(request)
                except UpstreamError as exc:
                    self._counts["failures"] += 1
                    errors.append(f"{upstream.url}: {exc}")
                    log.debug("DNS upstream %s failed: %s", upstream.url, exc)
                    continue
            if attempt.cancelled_caught:
                self._counts["timeouts"] += 1
                errors.append(f"{upstream.url}: no answer within {self.attempt_timeout} s")
                log.debug("DNS upstream %s: no answer within %s s", upstream.url,
                          self.attempt_timeout)  # fmt: skip
                continue
            rcode = _flags(answer) & 0xF
            if rcode not in _MOVE_ON_RCODES:
                return answer, upstream
            self._counts["bad_rcodes"] += 1
            errors.append(f"{upstream.url}: {dns.rcode.to_text(dns.rcode.Rcode(rcode))}")
            fallback = answer, upstream
        if fallback is not None:
            return fallback
        self._counts["all_failed"] += 1
        raise UpstreamError("all upstreams failed: " + ("; ".join(errors) or "none configured"))

    async def aclose(self) -> None:
        for upstream in self.upstreams:
            await upstream.aclose()

"""DNS over HTTPS (RFC 8484): one POST of ``application/dns-message`` and its answer, on an
HTTP/1.1 connection that stays open for the next query.

Theory of operation: h11 does all HTTP/1.1 parsing and framing, sans-IO (status line,
headers, Content-Length or chunked bodies, 1xx interim responses, keep-alive rules of HTTP/1.0
and ``Connection: close``); this module only moves bytes between it and the TLS stream, which
stays the caller's, and says whether the connection may serve another query. Our own limits
sit on top: a response head of at most ``MAX_HEAD`` bytes and a body of at most a DNS message
(``MAX_MESSAGE``), checked as the bytes arrive.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import h11

from .wire import MAX_MESSAGE, UpstreamError

DOH_PATH = "/dns-query"
CONTENT_TYPE = "application/dns-message"
MAX_HEAD = 16384  # bytes of status line and headers (h11's max_incomplete_event_size)


def new_connection() -> h11.Connection:
    """The HTTP/1.1 client state of one new TLS connection."""
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)


def post_request(target: str, host_header: str, length: int) -> h11.Request:
    """The head of a POST of ``length`` bytes to ``target``. Raises ``h11.LocalProtocolError``
    or ``UnicodeError`` if it cannot be sent (``parse_upstream`` tries it once: a bad URL is
    a configuration error, not a failure of every query)."""
    headers = [("Host", host_header), ("Content-Type", CONTENT_TYPE), ("Accept", CONTENT_TYPE),
               ("Content-Length", str(length))]  # fmt: skip
    return h11.Request(method="POST", target=target, headers=headers)


def encode_post(http: h11.Connection, target: str, host_header: str, body: bytes) -> bytes:
    """The bytes of one POST of ``body``, request head and body together."""
    try:
        request = post_request(target, host_header, len(body))
        parts = (http.send(request), http.send(h11.Data(data=body)), http.send(h11.EndOfMessage()))
    except (h11.LocalProtocolError, UnicodeError) as exc:
        raise UpstreamError(f"cannot send the HTTP request: {exc}") from exc
    return b"".join(part or b"" for part in parts)


async def read_answer(
    http: h11.Connection, receive: Callable[[], Awaitable[bytes | bytearray]]
) -> tuple[bytes, bool]:
    """(body, whether the connection may be reused) of the response to the POST just sent.

    ``receive`` returns the next bytes from the server, ``b""`` at end of stream. A status
    other than 200 or another content type is an ``UpstreamError`` (after the whole response
    was read); so is a response h11 cannot parse. The server closing the connection before the
    response is complete raises ``EOFError``, a transport error: a reused connection that
    fails so before any byte arrived is replaced by a new one."""
    status = 0
    content_type = ""
    body = bytearray()
    at_eof = False
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            if at_eof:
                raise EOFError("connection closed by the upstream") from exc
            raise UpstreamError(f"bad HTTP response: {exc}") from exc
        if event is h11.NEED_DATA:
            data = await receive()
            at_eof = not data
            http.receive_data(bytes(data))
        elif isinstance(event, h11.Response):
            status = event.status_code
            content_type = _content_type(event.headers)
            lengths = [value for name, value in event.headers if name == b"content-length"]
            if lengths and int(lengths[0]) > MAX_MESSAGE:
                raise UpstreamError(f"HTTP body too large ({int(lengths[0])} bytes)")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_MESSAGE:
                raise UpstreamError("HTTP body too large")
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed):
            raise EOFError("connection closed by the upstream")
        # h11.InformationalResponse: interim (100 Continue, 103 Early Hints); the answer follows.
    if status != 200:
        raise UpstreamError(f"HTTP status {status}")
    if content_type != CONTENT_TYPE:
        raise UpstreamError(f"HTTP content-type {content_type or 'missing'!r}")
    # Reusable when both sides finished cleanly and nothing beyond the response arrived.
    keep = http.our_state is h11.DONE and http.their_state is h11.DONE
    if keep and not http.trailing_data[0]:
        http.start_next_cycle()
        return bytes(body), True
    return bytes(body), False


def _content_type(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The media type, lower-case and without parameters ("" when absent)."""
    values = [value.decode("latin-1") for name, value in headers if name == b"content-type"]
    return ", ".join(values).split(";")[0].strip().lower()

"""The server name a client announces in its first bytes: TLS SNI or the HTTP/1.x Host header.

Why: the DNS name a client resolved is a guess (several names share an address); the name in
the ClientHello or the Host header is what the client actually asked the server for. Only the
first chunk the gateway read is looked at, never waited for: a ClientHello split over several
segments, or extensions beyond the chunk, simply give no name. The input is untrusted, so every
length is bounds-checked and anything odd gives None, never an exception.
"""

from __future__ import annotations

import ipaddress
import re

from .hostname import MAX_NAME, is_hostname

_HTTP_REQUEST_LINE = re.compile(rb"[A-Z]{3,12} [\x21-\x7e]{1,8000} HTTP/1\.[01]")
#: What an HTTP request can begin with (a method, then maybe a space and the target):
#: enough to keep waiting for the rest of its head.
_HTTP_METHOD_START = re.compile(rb"[A-Z]{1,12}( |$)")
_TLS_HANDSHAKE, _CLIENT_HELLO, _EXT_SERVER_NAME, _HOST_NAME = 0x16, 1, 0, 0


class _Short(Exception):
    """A length field points past the data we have."""


class _Reader:
    """Bounds-checked big-endian reads over ``data[pos:end]``."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else min(end, len(data))

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _Short
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def sub(self, length: int) -> _Reader:
        """A reader over the next ``length`` bytes (cut at what we have), skipped here."""
        inner = _Reader(self.data, self.pos, self.pos + length)
        self.pos = min(self.pos + length, self.end)
        return inner


def sniff_name(data: bytes) -> str | None:
    """The host name in a client's first bytes (TLS SNI or HTTP Host), or None."""
    if not data:
        return None
    try:
        if data[0] == _TLS_HANDSHAKE:
            return tls_server_name(data)
        return http_host(data)
    except (_Short, ValueError):  # (both parsers catch these already; belt and braces)
        return None


def wants_more(data: bytes) -> bool:
    """Could more bytes still bring a name ``sniff_name`` did not find in ``data``? True
    while a TLS record or an HTTP request head has begun and not ended yet; False for
    anything else (another protocol: waiting would only delay it). The caller bounds the
    bytes and the time it waits."""
    if not data:
        return True
    if data[0] == _TLS_HANDSHAKE:
        if len(data) < 5:
            return True
        return len(data) < 5 + int.from_bytes(data[3:5], "big")
    if not _HTTP_METHOD_START.match(data):
        return False
    return b"\r\n\r\n" not in data


def tls_server_name(data: bytes) -> str | None:
    """The SNI host name of a TLS ClientHello starting at ``data[0]`` (partial data is fine:
    what lies past its end is not looked for)."""
    try:
        record = _Reader(data)
        if record.uint(1) != _TLS_HANDSHAKE or record.uint(1) != 3:
            return None
        record.take(1)  # minor version: SSL 3.0 to TLS 1.3 records all say 3.x
        hello = record.sub(record.uint(2))
        if hello.uint(1) != _CLIENT_HELLO:
            return None
        hello = hello.sub(hello.uint(3))
        hello.take(2 + 32)  # legacy_version, random
        hello.take(hello.uint(1))  # legacy_session_id
        hello.take(hello.uint(2))  # cipher_suites
        hello.take(hello.uint(1))  # legacy_compression_methods
        extensions = hello.sub(hello.uint(2))
        while True:
            ext_type = extensions.uint(2)
            body = extensions.sub(extensions.uint(2))
            if ext_type == _EXT_SERVER_NAME:
                names = body.sub(body.uint(2))
                while True:
                    kind = names.uint(1)
                    name = names.take(names.uint(2))
                    if kind == _HOST_NAME:
                        return _valid_name(name)
    except _Short:
        return None


def http_host(data: bytes) -> str | None:
    """The Host header of an HTTP/1.x request, if its line is complete in ``data``."""
    head_end = data.find(b"\r\n\r\n")
    head = data if head_end < 0 else data[:head_end]
    lines = head.split(b"\r\n")
    if head_end < 0:
        lines = lines[:-1]  # the last line may be cut short
    if not lines or not _HTTP_REQUEST_LINE.fullmatch(lines[0]):
        return None
    for line in lines[1:]:
        field, sep, value = line.partition(b":")
        if sep and field.strip().lower() == b"host":
            host = value.strip()
            if host.startswith(b"["):  # an IPv6 literal: no name to report
                return None
            name, colon, port = host.rpartition(b":")
            if colon and port.isdigit():
                host = name
            return _valid_name(host)
    return None


def _valid_name(raw: bytes) -> str | None:
    """``raw`` as a lower-case host name without the final dot; None if it is not one (or is
    an IP address literal)."""
    if not raw or len(raw) > MAX_NAME + 1:
        return None
    try:
        name = raw.decode("ascii").lower().removesuffix(".")
    except UnicodeDecodeError:
        return None
    if not is_hostname(name):
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None

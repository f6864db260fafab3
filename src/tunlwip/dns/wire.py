"""DNS messages in wire format: the header layout, and what makes bytes an upstream sent the
answer to our query.

Why a module of its own: the proxy and every upstream transport (UDP, TCP, TLS, HTTPS) read
the same 12-byte header and must agree on what an acceptable answer is. An answer must repeat
the ID we sent and the question; it must parse (a malformed answer is the upstream's failure,
found here so that the next upstream is tried). Nothing here does I/O.
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import trio

from ..errors import TunlwipError

HEADER_LEN = 12  # RFC 1035 4.1.1: ID, flags, four counts
MAX_MESSAGE = 65535  # the 2-byte length prefix of TCP (and DoH's own limit here)

_HEADER = struct.Struct("!HH")  # ID, flags
# Error answers may omit the question: a server that could not parse it cannot repeat it.
_QUESTIONLESS_OK = {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}

Question = tuple[tuple[dns.name.Name, int, int], ...]


class UpstreamError(TunlwipError):
    """A query failed on an upstream (from ``UpstreamSet.resolve``: on all of them)."""


def parse_request(request: bytes) -> tuple[int, Question]:
    """The caller's ID and the question an answer must repeat."""
    if len(request) > MAX_MESSAGE:
        raise UpstreamError(f"query too large ({len(request)} bytes)")
    try:
        message = dns.message.from_wire(request, question_only=True)
    except Exception as exc:
        raise UpstreamError(f"malformed query: {exc}") from exc
    return message.id, _question(message)


def _question(message: dns.message.Message) -> Question:
    return tuple((rrset.name, rrset.rdtype, rrset.rdclass) for rrset in message.question)


def with_id(wire: bytes, message_id: int) -> bytes:
    """``wire`` with its ID replaced."""
    return struct.pack("!H", message_id) + wire[2:]


def header_flags(wire: bytes) -> int:
    """The flags word of a message at least ``HEADER_LEN`` long (the rcode is its low 4 bits)."""
    return int(_HEADER.unpack_from(wire)[1])


def mismatch(wire: bytes, message_id: int, question: Question) -> str | None:
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


def accept(wire: bytes, message_id: int, question: Question) -> None:
    """Raise UpstreamError unless ``wire`` is a well-formed answer to our query."""
    reason = mismatch(wire, message_id, question)
    if reason is not None:
        raise UpstreamError(f"unexpected answer: {reason}")
    validate(wire)


def validate(wire: bytes) -> None:
    """Raise UpstreamError if the answer ``wire`` does not parse.

    Truncated answers may be cut anywhere and signed ones cannot be checked without the key:
    both pass as they are."""
    if header_flags(wire) & dns.flags.TC:
        return
    try:
        dns.message.from_wire(wire)
    except dns.message.UnknownTSIGKey:
        pass
    except Exception as exc:
        raise UpstreamError(f"malformed answer: {exc}") from exc


def describe(exc: BaseException) -> str:
    """The useful part of a transport error (trio wraps TLS errors in BrokenResourceError)."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""DNS messages in wire format: the header layout, and what makes bytes an upstream sent the
answer to our query.

Why a module of its own: the proxy and every upstream transport (UDP, TCP, TLS, HTTPS) read
the same 12-byte header and must agree on what an acceptable answer is. An answer must repeat
the ID we sent and the question (and be well formed, ``summary``: a malformed answer is the
upstream's failure, so that the next upstream is tried). Nothing here does I/O.

Matching reads only the header and the question section, with a small hand-written reader
(``read_question``, bounds-checked, compression pointers followed only backwards): it runs for
every datagram an upstream socket receives, spoofs included, where a full dnspython parse
would cost more than forwarding the query. The answer's records are walked once, by
``summary.summarize`` (called by ``UpstreamSet``).
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import trio

from ..errors import TunlwipError

HEADER_LEN = 12  # RFC 1035 4.1.1: ID, flags, four counts
MAX_MESSAGE = 65535  # the 2-byte length prefix of TCP (and DoH's own limit here)

_HEADER = struct.Struct("!HH")  # ID, flags
# Header flag bits as plain ints: on the per-datagram paths, dns.flags' enum operators cost
# more than the test itself.
FLAG_QR, FLAG_TC, FLAG_AD, FLAG_CD = 0x8000, 0x0200, 0x0020, 0x0010
# Error answers may omit the question: a server that could not parse it cannot repeat it.
_QUESTIONLESS_OK = {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}

#: The question section as the matching needs it: per question, the name in wire form with
#: ASCII lowercased (RFC 4343: names compare case-insensitively, so a 0x20-randomised spelling
#: still matches), its type and its class.
Question = tuple[tuple[bytes, int, int], ...]

MAX_NAME_WIRE = 255  # RFC 1035 3.1: a name's wire length, length bytes included
_POINTER = 0xC0


class WireError(TunlwipError, ValueError):
    """Bytes that are not a readable DNS message (where the hand-written reader looked)."""


def read_name(wire: bytes, offset: int) -> tuple[bytes, int]:
    """(the name at ``offset`` in wire form, lowercased, without compression; the offset just
    after it). Compression pointers are followed only backwards, so a loop cannot hang us."""
    # The common case first, a name without compression (every question's): one slice.
    position = offset
    size = len(wire)
    while position < size:
        length = wire[position]
        if length == 0:
            if position + 1 - offset > MAX_NAME_WIRE:
                raise WireError("name longer than 255 bytes")
            return wire[offset : position + 1].lower(), position + 1
        if length & _POINTER:
            return _read_compressed_name(wire, offset)
        position += 1 + length
    if position > size:
        raise WireError("label runs past the end of the message")
    raise WireError("name runs past the end of the message")


def _read_compressed_name(wire: bytes, offset: int) -> tuple[bytes, int]:
    """``read_name`` for a name with compression pointers (or a bad label type)."""
    labels = bytearray()
    end = -1  # where the name ends in the message: after its first pointer, if any
    position = offset
    while True:
        if position >= len(wire):
            raise WireError("name runs past the end of the message")
        length = wire[position]
        if length & _POINTER == _POINTER:
            if position + 1 >= len(wire):
                raise WireError("cut compression pointer")
            target = ((length & 0x3F) << 8) | wire[position + 1]
            if end < 0:
                end = position + 2
            if target >= position:
                raise WireError("compression pointer not backwards")
            position = target
            continue
        if length & _POINTER:
            raise WireError(f"unknown label type {length:#x}")
        labels += wire[position : position + 1 + length]
        if len(labels) > MAX_NAME_WIRE:
            raise WireError("name longer than 255 bytes")
        if position + 1 + length > len(wire):
            raise WireError("label runs past the end of the message")
        position += 1 + length
        if length == 0:
            return bytes(labels).lower(), end if end >= 0 else position


def read_question(wire: bytes) -> tuple[Question, int]:
    """(the question section, the offset after it) of a message; WireError if unreadable.
    Reads nothing else: the cheap part of a message, all that matching an answer needs."""
    if len(wire) < HEADER_LEN:
        raise WireError(f"short message ({len(wire)} bytes)")
    count = (wire[4] << 8) | wire[5]
    questions = []
    offset = HEADER_LEN
    for _ in range(count):
        name, offset = read_name(wire, offset)
        if offset + 4 > len(wire):
            raise WireError("question cut short")
        questions.append((name, (wire[offset] << 8) | wire[offset + 1],
                          (wire[offset + 2] << 8) | wire[offset + 3]))  # fmt: skip
        offset += 4
    return tuple(questions), offset


def exact_question(request: bytes, question: Question) -> bytes:
    """The question section of ``request`` as its bytes, when it is one question whose name
    has no compression pointer (every plain query's), else b"". An answer whose question
    section repeats these bytes (and counts one question) repeats the question: matching it
    needs no ``read_question``, the common case, as resolvers echo the question as sent."""
    if len(question) != 1:
        return b""
    name = question[0][0]
    end = HEADER_LEN + len(name) + 4
    exact = request[HEADER_LEN:end]
    if len(exact) != end - HEADER_LEN or exact[:-4].lower() != name:
        return b""
    return exact


class UpstreamError(TunlwipError):
    """A query failed on an upstream (from ``UpstreamSet.resolve``: on all of them)."""


def parse_request(request: bytes) -> tuple[int, Question]:
    """The caller's ID and the question an answer must repeat."""
    if len(request) > MAX_MESSAGE:
        raise UpstreamError(f"query too large ({len(request)} bytes)")
    try:
        question, _ = read_question(request)
    except WireError as exc:
        raise UpstreamError(f"malformed query: {exc}") from exc
    return int.from_bytes(request[:2], "big"), question


def header_answer(query: bytes, rcode: int) -> bytes | None:
    """An answer with ``rcode`` and nothing else, built from the query's header alone (no
    parse, so cheap under load: REFUSED, FORMERR); None for a response or a fragment of a
    header (answering those could make a loop)."""
    if len(query) < HEADER_LEN or query[2] & 0x80:
        return None
    return query[:2] + bytes([0x80 | (query[2] & 0x79), rcode]) + bytes(8)  # opcode, RD kept


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
    return question_mismatch(wire, flags, question)


def question_mismatch(wire: bytes, flags: int, question: Question) -> str | None:
    """Why ``wire`` (its ID already checked, ``flags`` its flags word) is not an answer to
    ``question`` (None: it is)."""
    if not flags & FLAG_QR:
        return "not a response"
    try:
        got, _ = read_question(wire)
    except WireError as exc:
        return f"unreadable question: {exc}"
    if got != question and (got or (flags & 0xF) not in _QUESTIONLESS_OK):
        return "question does not match"
    return None


def accept(wire: bytes, message_id: int, question: Question) -> None:
    """Raise UpstreamError unless ``wire`` answers our query (its ID and question). Whether
    the rest is well formed is checked once, by ``UpstreamSet`` (``summary.summarize``)."""
    reason = mismatch(wire, message_id, question)
    if reason is not None:
        raise UpstreamError(f"unexpected answer: {reason}")


def describe(exc: BaseException) -> str:
    """The useful part of a transport error (trio wraps TLS errors in BrokenResourceError)."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

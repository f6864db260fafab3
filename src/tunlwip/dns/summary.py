"""What the proxy needs of an answer, read from its wire form without building a message.

Why: a forwarded answer goes to the client as the upstream's bytes; the proxy only needs a few
facts about it: its rcode and flags, the smallest TTL (the cache's lifetime and the replay
table's), the negative TTL of an NXDOMAIN/NODATA (RFC 2308), the A/AAAA addresses (which name
a client's later flows belong to) and whether a CNAME or DNAME chain needs the policy's look.
Building a dnspython message for that costs several times what forwarding the answer does;
walking the records does not. The full parse is left to where a message is really needed:
a cached answer being served (``cache``), a CNAME chain under block rules (``policy``), an
answer too large for the client (truncation).

``summarize`` walks every record with bounds checks (names with compression pointers followed
only backwards, A and AAAA of their exact sizes, an SOA whose names and numbers fill its
data, no bytes after the last record): an answer it rejects (``WireError``) is malformed, the
upstream's failure. The data of other record types is not looked into; the client's own
parser judges it, as it would without the proxy.
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

import dns.name

from ..endpoint import IPAddress
from .wire import FLAG_TC, Question, UpstreamError, WireError, read_question

_A, _SOA, _CNAME, _AAAA, _DNAME, _OPT, _TSIG = 1, 6, 5, 28, 39, 41, 250
_POINTER = 0xC0
_PLAIN_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_"
_PLAIN = frozenset(_PLAIN_BYTES)


@dataclasses.dataclass(slots=True)
class AnswerSummary:
    """The facts of one answer (see the module docstring)."""

    #: The header's rcode, with the EDNS extended bits when there is an OPT record.
    rcode: int
    flags: int
    question: Question
    #: Records in the answer section.
    answer_count: int = 0
    #: The smallest TTL of the answer and authority records (None: there are none).
    min_ttl: int | None = None
    #: The smallest TTL of every record but OPT and TSIG (None: there are none).
    min_ttl_all: int | None = None
    #: RFC 2308 5: min(TTL, MINIMUM) of the first SOA in the authority section.
    negative_ttl: int | None = None
    #: (address, TTL) of the A/AAAA records of the answer section.
    addresses: list[tuple[IPAddress, int]] = dataclasses.field(default_factory=list)
    #: Whether the answer section has a CNAME or DNAME (a chain the policy may judge).
    has_alias: bool = False
    #: The text of the (one) question's name, once ``question_name`` was asked for it.
    name: str = ""

    def question_name(self) -> str:
        """The text of the first question's name (``name_text``), worked out once."""
        if not self.name:
            self.name = name_text(self.question[0][0])
        return self.name


def _skip_name(wire: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at ``offset``; WireError if it is
    malformed (its pointers must lead backwards, to a name that ends)."""
    end = -1
    position = offset
    hops = 0
    while True:
        if position >= len(wire):
            raise WireError("name runs past the end of the message")
        length = wire[position]
        if length & _POINTER == _POINTER:
            if position + 1 >= len(wire):
                raise WireError("cut compression pointer")
            target = ((length & 0x3F) << 8) | wire[position + 1]
            if target >= position:
                raise WireError("compression pointer not backwards")
            if end < 0:
                end = position + 2
            hops += 1
            if hops > 127:
                raise WireError("too many compression pointers")
            position = target
            continue
        if length & _POINTER:
            raise WireError(f"unknown label type {length:#x}")
        position += 1 + length
        if length == 0:
            if position > len(wire):
                raise WireError("name runs past the end of the message")
            return end if end >= 0 else position


def summarize(wire: bytes, question: Question | None = None, offset: int = 0) -> AnswerSummary:
    """The summary of an answer; WireError if its records do not walk. ``question`` and
    ``offset``: the question section, already read (``read_question``'s), and where it ends."""
    if question is None:
        question, offset = read_question(wire)
    # An owner name that is a pointer to the first question's name (offset 12, read above
    # and so known to end well): the usual case, skipped without following it.
    to_question = b"\xc0\x0c" if question else b""
    flags = (wire[2] << 8) | wire[3]
    rcode = flags & 0xF
    # (Locals while walking, the summary made at the end: attribute access per record cost
    # more than the walk.)
    min_ttl: int | None = None
    min_ttl_all: int | None = None
    negative_ttl: int | None = None
    addresses: list[tuple[IPAddress, int]] = []
    has_alias = False
    counts = ((wire[6] << 8) | wire[7], (wire[8] << 8) | wire[9], (wire[10] << 8) | wire[11])
    end = len(wire)
    for section, count in enumerate(counts):
        for _ in range(count):
            if to_question and wire.startswith(to_question, offset):
                offset += 2
            else:
                offset = _skip_name(wire, offset)
            if offset + 10 > end:
                raise WireError("record cut short")
            rdtype = (wire[offset] << 8) | wire[offset + 1]
            ttl = int.from_bytes(wire[offset + 4 : offset + 8], "big")
            start = offset + 10
            offset = start + ((wire[offset + 8] << 8) | wire[offset + 9])
            if offset > end:
                raise WireError("record data runs past the end of the message")
            if rdtype == _OPT:
                rcode |= (ttl >> 24) << 4
                continue
            if rdtype == _TSIG:
                continue
            if min_ttl_all is None or ttl < min_ttl_all:
                min_ttl_all = ttl
            if section == 2:
                continue
            if min_ttl is None or ttl < min_ttl:
                min_ttl = ttl
            if section == 0:
                if rdtype in (_A, _AAAA):
                    if offset - start != (4 if rdtype == _A else 16):
                        raise WireError("address record of the wrong size")
                    addresses.append((_address(wire[start:offset]), ttl))
                elif rdtype in (_CNAME, _DNAME):
                    if _skip_name(wire, start) != offset:
                        raise WireError("alias record with bytes beyond its name")
                    has_alias = True
            elif rdtype == _SOA:
                if _skip_name(wire, _skip_name(wire, start)) + 20 != offset:
                    raise WireError("SOA record of the wrong size")
                if negative_ttl is None:
                    minimum = int.from_bytes(wire[offset - 4 : offset], "big")
                    negative_ttl = min(ttl, minimum)
    if offset != end:
        raise WireError(f"{end - offset} bytes after the last record")
    return AnswerSummary(rcode, flags, question, counts[0], min_ttl, min_ttl_all, negative_ttl,
                         addresses, has_alias)  # fmt: skip


#: Addresses met lately, by their 4 or 16 bytes: answers repeat addresses (a CDN's, a name
#: asked by many apps), and an ``ip_address`` costs more to make than to look up.
_addresses: dict[bytes, IPAddress] = {}
_ADDRESSES_KEPT = 4096


def _address(packed: bytes) -> IPAddress:
    """The address of an A (4 bytes) or AAAA (16 bytes) record's data."""
    address = _addresses.get(packed)
    if address is None:
        if len(_addresses) >= _ADDRESSES_KEPT:
            _addresses.clear()
        # (the class's own constructor from the bytes: no guessing)
        address = IPv4Address(packed) if len(packed) == 4 else IPv6Address(packed)
        _addresses[packed] = address
    return address


class QuerySummary(NamedTuple):
    """The facts of a plain query (see ``summarize_query``). A named tuple: one is made per
    query, and a frozen dataclass costs several times as much to make."""

    #: The question's name as text, lowercased, without the final dot.
    name: str
    #: The question: (name in wire form lowercased, type, class).
    question: tuple[bytes, int, int]
    #: The flags word (CD is among them).
    flags: int
    #: The EDNS UDP payload size, or -1 without EDNS.
    payload: int
    #: Whether the EDNS DO bit is set.
    dnssec_ok: bool
    #: Whether an EDNS Client Subnet option is present (RFC 7871).
    client_subnet: bool


_OPTION_ECS = 8


def summarize_query(wire: bytes) -> QuerySummary | None:
    """The summary of a plain query: one question for a name of letters, digits, ``-`` and
    ``_``, opcode QUERY, QR clear, no answer or authority records, at most an EDNS version 0
    OPT record in the additional section, nothing after it. Anything else is None: the
    caller parses it fully (dnspython), for the same answer as before, FORMERR included."""
    try:
        questions, offset = read_question(wire)
    except WireError:
        return None
    flags = (wire[2] << 8) | wire[3]
    if len(questions) != 1 or flags & 0xF800 or wire[6:10] != bytes(4):
        return None  # QR, opcode; answer and authority counts
    name = questions[0][0]
    labels = []
    position = 0
    while length := name[position]:
        label = name[position + 1 : position + 1 + length]
        if label.translate(None, _PLAIN_BYTES):  # what is left is not plain
            return None
        labels.append(label)
        position += 1 + length
    if not labels:
        return None  # the root: dnspython's text of it differs
    additional = (wire[10] << 8) | wire[11]
    payload, dnssec_ok, client_subnet = -1, False, False
    if additional > 1:
        return None
    if additional == 1:
        if wire[offset : offset + 3] != b"\x00\x00\x29" or offset + 11 > len(wire):
            return None  # not an OPT record owned by the root
        payload = (wire[offset + 3] << 8) | wire[offset + 4]
        if wire[offset + 6] != 0:
            return None  # EDNS version other than 0
        dnssec_ok = bool(wire[offset + 7] & 0x80)
        start = offset + 11
        offset = start + ((wire[offset + 9] << 8) | wire[offset + 10])
        position = start
        while position + 4 <= offset:
            code = int.from_bytes(wire[position : position + 2], "big")
            position += 4 + int.from_bytes(wire[position + 2 : position + 4], "big")
            client_subnet = client_subnet or code == _OPTION_ECS
        if position != offset:
            return None  # options that do not fill the record
    if offset != len(wire):
        return None
    # (positional: a named tuple made from keywords costs twice as much)
    return QuerySummary(b".".join(labels).decode("ascii"), questions[0], flags, payload,
                        dnssec_ok, client_subnet)  # fmt: skip


def summarize_answer(wire: bytes, question: Question | None = None,
                     offset: int = 0) -> AnswerSummary | None:  # fmt: skip
    """``summarize`` for an upstream's answer: UpstreamError if it is malformed, None if it
    is truncated (TC: cut anywhere, so it need not walk)."""
    try:
        return summarize(wire, question, offset)
    except WireError as exc:
        if int.from_bytes(wire[2:4], "big") & FLAG_TC:
            return None
        raise UpstreamError(f"malformed answer: {exc}") from exc


def name_text(name: bytes) -> str:
    """The text of a wire-form name (as ``read_question`` gives it), without the final dot:
    what ``dns.name.Name.to_text(omit_final_dot=True)`` gives, quickly for plain names."""
    labels = []
    position = 0
    while position < len(name) and name[position]:
        length = name[position]
        labels.append(name[position + 1 : position + 1 + length])
        position += 1 + length
    if all(_PLAIN.issuperset(label) for label in labels):
        return b".".join(labels).decode("ascii") if labels else "."
    return dns.name.Name([*labels, b""]).to_text(omit_final_dot=True)

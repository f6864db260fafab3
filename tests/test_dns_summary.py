"""The hand-written readers of DNS wire format (``wire.read_question``, ``summary``) against
dnspython, and against malformed and random bytes.

Why: the forwarded path no longer builds a dnspython message, so what it reads from the bytes
(the question it matches, TTLs, addresses, aliases, the negative TTL) must agree with what
dnspython reads; and since every datagram an upstream socket receives goes through them,
spoofs included, no input may make them fail other than with ``WireError``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunlwip.dns.summary import name_text, summarize, summarize_answer
from tunlwip.dns.wire import UpstreamError, WireError, exact_question, read_question

SOA = "ns.example. hostmaster.example. 1 7200 900 1209600 {minimum}"


def response(name: str = "www.example.", rdtype: str = "A") -> dns.message.Message:
    return dns.message.make_response(dns.message.make_query(name, rdtype, use_edns=0))


def test_positive_answer_with_a_cname_chain() -> None:
    r = response("WwW.Example.")
    r.answer.append(dns.rrset.from_text("www.example.", 300, "IN", "CNAME", "web.example."))
    r.answer.append(dns.rrset.from_text("web.example.", 60, "IN", "A", "192.0.2.1", "192.0.2.2"))
    r.authority.append(dns.rrset.from_text("example.", 600, "IN", "NS", "ns.example."))
    r.additional.append(dns.rrset.from_text("ns.example.", 30, "IN", "AAAA", "fd00::1"))
    s = summarize(r.to_wire())
    assert s.question == ((dns.name.from_text("www.example.").to_wire(), 1, 1),)
    assert s.rcode == dns.rcode.NOERROR and s.flags & dns.flags.QR
    assert s.answer_count == 3
    assert s.has_alias
    assert s.min_ttl == 60 and s.min_ttl_all == 30
    assert s.negative_ttl is None
    assert sorted(s.addresses) == [(ipaddress.ip_address("192.0.2.1"), 60),
                                   (ipaddress.ip_address("192.0.2.2"), 60)]  # fmt: skip


def test_nxdomain_negative_ttl_and_extended_rcode() -> None:
    r = response()
    r.set_rcode(dns.rcode.NXDOMAIN)
    r.authority.append(dns.rrset.from_text("example.", 900, "IN", "SOA", SOA.format(minimum=120)))
    s = summarize(r.to_wire())
    assert s.rcode == dns.rcode.NXDOMAIN and s.negative_ttl == 120 and s.answer_count == 0
    r = response()
    r.set_rcode(dns.rcode.BADVERS)  # an extended rcode: its high bits live in the OPT record
    assert summarize(r.to_wire()).rcode == r.rcode()


def test_questionless_error_answer() -> None:
    r = response()
    r.question = []
    r.set_rcode(dns.rcode.FORMERR)
    s = summarize(r.to_wire())
    assert s.question == () and s.rcode == dns.rcode.FORMERR


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"\x00\x01", "short"),
        (bytes(4) + b"\x00\x01" + bytes(6) + b"\x03www", "cut"),  # a question cut short
        (bytes(4) + b"\x00\x01" + bytes(6) + b"\xc0\x0c\x00\x01\x00\x01", "pointer"),  # to itself
        (bytes(4) + b"\x00\x01" + bytes(6) + b"\x80\x00\x00\x01\x00\x01", "label type"),
    ],
)
def test_malformed_questions_are_wire_errors(wire: bytes, why: str) -> None:
    with pytest.raises(WireError):
        read_question(wire)


def test_malformed_answers_are_wire_errors() -> None:
    r = response()
    r.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "A", "192.0.2.1"))
    good = r.to_wire()
    for bad in (good[:-1], good + b"\x00", good[:-6] + b"\x00\x03" + good[-4:-1]):
        with pytest.raises(WireError):
            summarize(bad)
    with pytest.raises(UpstreamError, match="malformed answer"):
        summarize_answer(good[:-1])
    truncated = good[:2] + bytes([good[2] | 0x02]) + good[3:-1]  # TC: may be cut anywhere
    assert summarize_answer(truncated) is None


@pytest.mark.parametrize(
    "name", ["www.example", "a\\.b.example", "x\\032y.example", "_srv._tcp.ex"]
)
def test_name_text_is_dnspythons(name: str) -> None:
    wire_name = dns.name.from_text(name).canonicalize().to_wire()
    assert wire_name is not None
    assert name_text(wire_name) == dns.name.from_text(name).to_text(omit_final_dot=True).lower()


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_give_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):
        summarize(data)


def test_mutated_answers_only_ever_give_wire_errors() -> None:
    r = response("a.b.example.", "AAAA")
    r.answer.append(dns.rrset.from_text("a.b.example.", 60, "IN", "CNAME", "c.b.example."))
    r.answer.append(dns.rrset.from_text("c.b.example.", 60, "IN", "AAAA", "fd00::1"))
    r.authority.append(dns.rrset.from_text("b.example.", 900, "IN", "SOA", SOA.format(minimum=9)))
    good = bytearray(r.to_wire())
    rng = random.Random(17)
    for _ in range(3000):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        with contextlib.suppress(WireError):
            summarize(bytes(bad))


def test_question_matching_ignores_case_only() -> None:
    a = read_question(dns.message.make_query("WwW.ExAmPlE.", "A").to_wire())[0]
    b = read_question(dns.message.make_query("www.example.", "A").to_wire())[0]
    c = read_question(dns.message.make_query("www.example.", "AAAA").to_wire())[0]
    assert a == b != c
    ecs = dns.message.make_query("www.example.", "A", use_edns=0,
                                 options=[dns.edns.ECSOption("192.0.2.0", 24)])  # fmt: skip
    assert read_question(ecs.to_wire())[0] == b


# -- the forwarded path's shortcuts: the question as sent, records walked from after it -------


def _summary_or_error(wire: bytes, *known: object) -> object:
    try:
        return summarize(wire, *known)  # type: ignore[arg-type]
    except WireError:
        return WireError


def test_exact_question_is_the_plain_querys_question_bytes() -> None:
    query = dns.message.make_query("WwW.ExAmPlE.", "A", use_edns=0).to_wire()
    question, end = read_question(query)
    assert exact_question(query, question) == query[12:end]  # as sent, case included
    two = bytearray(query)
    two[5] = 2  # two questions: matching reads them
    assert exact_question(bytes(two), (question[0], question[0])) == b""
    compressed = query[:12] + b"\xc0\x04" + query[end - 4 :]  # a pointer (into the header)
    assert exact_question(compressed, read_question(compressed)[0]) == b""
    # A question that does not belong to these bytes (or bytes cut short) gives nothing.
    assert exact_question(query[: end - 1], question) == b""
    assert exact_question(query[:12], question) == b""
    other = read_question(dns.message.make_query("www.example.net.", "A").to_wire())[0]
    assert exact_question(query, other) == b""


def test_a_known_question_gives_the_summary_of_a_full_read() -> None:
    r = response("a.b.example.", "AAAA")
    r.answer.append(dns.rrset.from_text("a.b.example.", 60, "IN", "CNAME", "c.b.example."))
    r.answer.append(dns.rrset.from_text("c.b.example.", 30, "IN", "AAAA", "fd00::1"))
    r.authority.append(dns.rrset.from_text("b.example.", 900, "IN", "SOA", SOA.format(minimum=9)))
    good = r.to_wire()
    question, offset = read_question(good)
    assert summarize(good, question, offset) == summarize(good)
    # Mutated past the question (so the question is still the one sent): the shortcut and
    # the full read agree, summary or WireError, on every input.
    rng = random.Random(5)
    for _ in range(3000):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(offset, len(bad))] = rng.randrange(256)
        if rng.random() < 0.3:
            bad = bad[: rng.randrange(offset, len(bad) + 1)]
        assert _summary_or_error(bytes(bad), question, offset) == _summary_or_error(bytes(bad))


@pytest.mark.parametrize(
    "records",
    [
        b"\xc0\x0c\x00\x01",  # a pointer owner, the record cut short after it
        b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00",  # data cut short
        b"\xc0",  # half a pointer
        b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x03\xc0\x00\x02",  # A of 3 bytes
        b"\xc0\x0d\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01",  # into a label
    ],
)
def test_pointer_owners_of_hostile_answers_are_wire_errors(records: bytes) -> None:
    query = dns.message.make_query("www.example.", "A").to_wire()
    question, offset = read_question(query)
    answer = bytearray(query[:offset] + records)
    answer[2] |= 0x80
    answer[7] = 1  # one answer record
    with pytest.raises(WireError):
        summarize(bytes(answer), question, offset)
    with pytest.raises(WireError):
        summarize(bytes(answer))


def test_a_pointer_to_offset_12_without_a_question_is_followed_and_refused() -> None:
    """With no question the shortcut does not apply: at offset 12 the pointer points at
    itself."""
    answer = bytes.fromhex("1234 8180 0000 0001 0000 0000") + bytes.fromhex(
        "c00c 0001 0001 0000003c 0004 c0000201"
    )
    with pytest.raises(WireError, match="pointer"):
        summarize(answer)
    with pytest.raises(WireError, match="pointer"):
        summarize(answer, (), 12)


def test_addresses_from_the_table_are_the_records_own() -> None:
    seen = []
    for text in ("192.0.2.1", "192.0.2.2", "192.0.2.1", "fd00::1", "fd00::1"):
        r = response("www.example.", "AAAA" if ":" in text else "A")
        r.answer.append(
            dns.rrset.from_text("www.example.", 60, "IN", "AAAA" if ":" in text else "A", text)
        )
        [(address, ttl)] = summarize(r.to_wire()).addresses
        assert (address, ttl) == (ipaddress.ip_address(text), 60)
        seen.append(address)
    assert seen[0] is seen[2] and seen[3] is seen[4]  # kept, not made again

"""DNS cache: what is cached, for how long, and what a hit looks like to the client.

Why: a cache that keeps an answer too long, caches a failure, or hands one client's ID or
EDNS to another breaks resolution in ways that are hard to see. The clock is a plain number
passed in, as the proxy passes ``trio.current_time()``.
"""

from __future__ import annotations

from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunlwip.dns.cache import DnsCache, cache_key

SOA = "ns.example. hostmaster.example. 1 7200 900 1209600 {minimum}"


def query(
    name: str = "www.example.", rdtype: str = "A", *, qid: int = 1, **kw: object
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    q.id = qid
    return q


def reply(
    q: dns.message.Message,
    answer: list[tuple[str, int, str, str]] = [],  # noqa: B006 (never mutated)
    authority: list[tuple[str, int, str, str]] = [],  # noqa: B006
    additional: list[tuple[str, int, str, str]] = [],  # noqa: B006
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    flags: int = 0,
) -> dns.message.Message:
    """An upstream's response to ``q``; records are (name, ttl, type, rdata text)."""
    r = dns.message.make_response(q, recursion_available=True)
    r.set_rcode(rcode)
    r.flags |= flags
    for section, records in (
        (r.answer, answer),
        (r.authority, authority),
        (r.additional, additional),
    ):
        for name, ttl, rdtype, text in records:
            section.append(dns.rrset.from_text(name, ttl, "IN", rdtype, text))
    return r


def a_reply(q: dns.message.Message, ttl: int = 300) -> dns.message.Message:
    return reply(q, [(q.question[0].name.to_text(), ttl, "A", "192.0.2.1")])


def ttls(m: dns.message.Message) -> list[int]:
    return [rrset.ttl for section in (m.answer, m.authority, m.additional) for rrset in section]


def roundtrip(m: dns.message.Message) -> dns.message.Message:
    return dns.message.from_wire(m.to_wire())


# -- positive answers -------------------------------------------------------------------------


def test_hit_returns_the_answer_with_ttls_aged_in_whole_seconds() -> None:
    cache = DnsCache()
    q = query()
    cache.put(q, a_reply(q, 300), now=1000.0)
    assert len(cache) == 1
    for now, ttl in [(1000.0, 300), (1000.9, 300), (1010.7, 290), (1299.99, 1)]:
        hit = cache.get(query(), now)
        assert hit is not None
        assert ttls(hit) == [ttl]
        assert [r.to_text() for r in hit.answer[0]] == ["192.0.2.1"]
        assert hit.rcode() == dns.rcode.NOERROR
    assert (cache.hits, cache.misses) == (4, 0)


def test_expired_entry_is_removed_and_misses() -> None:
    cache = DnsCache()
    q = query()
    cache.put(q, a_reply(q, 30), now=0.0)
    assert cache.get(q, 30.0) is None
    assert len(cache) == 0
    assert (cache.hits, cache.misses) == (0, 1)
    assert cache.get(q, 1.0) is None  # gone for good, even with an earlier clock
    assert cache.misses == 2


def test_entry_ttl_is_the_smallest_over_answer_and_authority() -> None:
    cache = DnsCache()
    q = query()
    r = reply(
        q,
        answer=[
            ("www.example.", 300, "CNAME", "web.example."),
            ("web.example.", 200, "A", "192.0.2.1"),
        ],
        authority=[("example.", 100, "NS", "ns.example.")],
        additional=[("ns.example.", 50, "A", "192.0.2.53")],
    )
    cache.put(q, r, now=0.0)
    hit = cache.get(q, 60.0)
    assert hit is not None
    assert ttls(hit) == [240, 140, 40, 0]  # additional glue does not set the entry's life
    assert cache.get(q, 99.5) is not None
    assert cache.get(q, 100.0) is None


def test_min_ttl_stretches_short_answers() -> None:
    cache = DnsCache(min_ttl=60)
    q = query()
    cache.put(q, a_reply(q, 5), now=0.0)
    hit = cache.get(q, 10.0)
    assert hit is not None and ttls(hit) == [50]
    assert cache.get(q, 60.0) is None


def test_max_ttl_caps_long_answers() -> None:
    cache = DnsCache(max_ttl=100)
    q = query()
    cache.put(q, a_reply(q, 86_400), now=0.0)
    hit = cache.get(q, 0.0)
    assert hit is not None and ttls(hit) == [100]
    assert cache.get(q, 100.0) is None


def test_ttl_zero_is_not_cached() -> None:
    cache = DnsCache()
    q = query()
    cache.put(q, a_reply(q, 0), now=0.0)
    assert len(cache) == 0
    stretched = DnsCache(min_ttl=10)
    stretched.put(q, a_reply(q, 0), now=0.0)
    assert len(stretched) == 1


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="min_ttl"):
        DnsCache(min_ttl=100, max_ttl=10)
    with pytest.raises(ValueError, match="max_entries"):
        DnsCache(max_entries=-1)


# -- negative answers (RFC 2308) --------------------------------------------------------------


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR])
def test_negative_answer_with_soa_is_cached_for_the_soa_minimum(rcode: dns.rcode.Rcode) -> None:
    cache = DnsCache()
    q = query("nope.example.", "AAAA")
    soa = ("example.", 3600, "SOA", SOA.format(minimum=300))
    cache.put(q, reply(q, authority=[soa], rcode=rcode), now=0.0)
    assert len(cache) == 1
    hit = cache.get(query("nope.example.", "AAAA", qid=7), 100.0)
    assert hit is not None
    assert hit.rcode() == rcode and not hit.answer and hit.id == 7
    [rrset] = hit.authority
    assert rrset.rdtype == dns.rdatatype.SOA and rrset.ttl == 200  # capped to the minimum
    assert cache.get(q, 300.0) is None


def test_negative_ttl_is_the_soa_ttl_when_smaller_than_minimum() -> None:
    cache = DnsCache()
    q = query("nope.example.")
    soa = ("example.", 50, "SOA", SOA.format(minimum=300))
    cache.put(q, reply(q, authority=[soa], rcode=dns.rcode.NXDOMAIN), now=0.0)
    assert cache.get(q, 49.0) is not None
    assert cache.get(q, 50.0) is None


def test_negative_ttl_is_capped_by_max_negative_ttl() -> None:
    cache = DnsCache(max_negative_ttl=100)
    q = query("nope.example.")
    soa = ("example.", 86_400, "SOA", SOA.format(minimum=86_400))
    cache.put(q, reply(q, authority=[soa], rcode=dns.rcode.NXDOMAIN), now=0.0)
    hit = cache.get(q, 0.0)
    assert hit is not None and ttls(hit) == [100]
    assert cache.get(q, 100.0) is None


def test_nxdomain_after_cname_keeps_the_chain() -> None:
    cache = DnsCache()
    q = query("alias.example.")
    r = reply(
        q,
        answer=[("alias.example.", 30, "CNAME", "gone.example.")],
        authority=[("example.", 3600, "SOA", SOA.format(minimum=600))],
        rcode=dns.rcode.NXDOMAIN,
    )
    cache.put(q, r, now=0.0)
    hit = cache.get(q, 10.0)
    assert hit is not None and hit.rcode() == dns.rcode.NXDOMAIN
    assert ttls(hit) == [20, 590]
    assert cache.get(q, 30.0) is None  # the CNAME's TTL bounds the entry


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR])
def test_negative_answer_without_soa_is_not_cached(rcode: dns.rcode.Rcode) -> None:
    cache = DnsCache()
    q = query("nope.example.")
    cache.put(q, reply(q, rcode=rcode), now=0.0)
    referral = reply(q, authority=[("example.", 3600, "NS", "ns.example.")], rcode=rcode)
    cache.put(q, referral, now=0.0)
    assert len(cache) == 0
    assert cache.get(q, 0.0) is None


# -- never cached -----------------------------------------------------------------------------


def test_truncated_response_is_not_cached() -> None:
    cache = DnsCache()
    q = query()
    r = a_reply(q)
    r.flags |= dns.flags.TC
    cache.put(q, r, now=0.0)
    assert len(cache) == 0


@pytest.mark.parametrize(
    "rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR, dns.rcode.NOTIMP]
)
def test_failures_are_not_cached(rcode: dns.rcode.Rcode) -> None:
    cache = DnsCache()
    q = query()
    soa = ("example.", 3600, "SOA", SOA.format(minimum=300))
    cache.put(q, reply(q, authority=[soa], rcode=rcode), now=0.0)
    r = a_reply(q)
    r.set_rcode(rcode)
    cache.put(q, r, now=0.0)
    assert len(cache) == 0


def test_response_to_another_question_is_not_cached() -> None:
    cache = DnsCache()
    q = query("www.example.", "A")
    cache.put(q, a_reply(query("other.example.", "A")), now=0.0)
    cache.put(q, a_reply(query("www.example.", "AAAA")), now=0.0)
    no_question = a_reply(q)
    no_question.question = []
    cache.put(q, no_question, now=0.0)
    assert len(cache) == 0


def test_queries_without_exactly_one_question_are_never_cached() -> None:
    cache = DnsCache()
    q = query()
    two = query()
    two.question.append(query("b.example.").question[0])
    cache.put(two, a_reply(q), now=0.0)
    empty = dns.message.Message(id=5)
    cache.put(empty, a_reply(q), now=0.0)
    assert len(cache) == 0
    cache.put(q, a_reply(q), now=0.0)
    assert cache.get(two, 0.0) is None
    assert cache.get(empty, 0.0) is None
    assert cache.misses == 2


def test_other_opcodes_are_not_cached() -> None:
    cache = DnsCache()
    q = query()
    q.set_opcode(dns.opcode.NOTIFY)
    cache.put(q, a_reply(q), now=0.0)
    assert len(cache) == 0


def test_zero_entries_disables_the_cache() -> None:
    cache = DnsCache(max_entries=0)
    q = query()
    cache.put(q, a_reply(q), now=0.0)
    assert len(cache) == 0 and cache.get(q, 0.0) is None


# -- what a hit looks like ----------------------------------------------------------------------


def test_hit_takes_id_flags_question_and_edns_from_the_new_query() -> None:
    cache = DnsCache()
    first = query(qid=1, use_edns=0, payload=1232)
    upstream = a_reply(first)
    upstream.flags |= dns.flags.AA
    cache.put(first, upstream, now=0.0)

    second = query(qid=999)
    second.flags &= ~dns.flags.RD
    hit = roundtrip(cache.get(second, 1.0))  # type: ignore[arg-type]
    assert hit.id == 999
    assert hit.flags & dns.flags.QR and hit.flags & dns.flags.RA
    assert not hit.flags & dns.flags.RD
    assert not hit.flags & dns.flags.AA  # a cached answer is not authoritative
    assert hit.question == second.question
    assert hit.edns == -1  # the new query has no EDNS, so the answer has none

    third = query(qid=3, use_edns=0, payload=4096)
    hit = roundtrip(cache.get(third, 1.0))  # type: ignore[arg-type]
    assert hit.id == 3 and hit.edns == 0 and hit.flags & dns.flags.RD


def test_opt_in_cached_additional_is_dropped() -> None:
    cache = DnsCache()
    q = query()
    r = a_reply(q)
    r.additional.append(dns.rrset.from_text(".", 0, dns.rdataclass.RdataClass.make(1232), "OPT"))
    r.additional.append(dns.rrset.from_text("ns.example.", 300, "IN", "A", "192.0.2.53"))
    cache.put(q, r, now=0.0)
    hit = cache.get(q, 0.0)
    assert hit is not None
    assert [rrset.rdtype for rrset in hit.additional] == [dns.rdatatype.A]
    assert roundtrip(hit).edns == -1


def test_key_is_case_insensitive_and_hit_uses_the_query_spelling() -> None:
    cache = DnsCache()
    q = query("Example.COM.")
    cache.put(q, a_reply(q), now=0.0)
    hit = cache.get(query("eXample.com."), 0.0)
    assert hit is not None
    assert len(cache) == 1
    assert hit.answer[0].name.to_text() == "eXample.com."
    assert hit.question[0].name.to_text() == "eXample.com."
    cache.put(query("example.com."), a_reply(query("EXAMPLE.com."), 10), now=0.0)
    assert len(cache) == 1  # replaced, not added


def test_key_includes_type_and_class() -> None:
    cache = DnsCache()
    q = query()
    cache.put(q, a_reply(q), now=0.0)
    assert cache.get(query(rdtype="AAAA"), 0.0) is None
    assert cache.get(query(rdclass="CH"), 0.0) is None
    assert cache.get(query(), 0.0) is not None


def test_hits_are_copies() -> None:
    cache = DnsCache()
    q = query()
    upstream = a_reply(q, 300)
    cache.put(q, upstream, now=0.0)
    upstream.answer[0].ttl = 1  # the caller's message is not shared
    upstream.answer.clear()
    hit = cache.get(q, 0.0)
    assert hit is not None
    hit.answer[0].ttl = 7
    hit.answer[0].clear()  # type: ignore[no-untyped-call]
    again = cache.get(q, 0.0)
    assert again is not None and ttls(again) == [300] and len(again.answer[0]) == 1


def test_authenticated_data_only_for_clients_that_ask() -> None:
    cache = DnsCache()
    q = query()
    cache.put(q, reply(q, [("www.example.", 300, "A", "192.0.2.1")], flags=dns.flags.AD), 0.0)
    plain = cache.get(query(), 0.0)
    assert plain is not None and not plain.flags & dns.flags.AD
    with_ad = query()
    with_ad.flags |= dns.flags.AD
    hit = cache.get(with_ad, 0.0)
    assert hit is not None and hit.flags & dns.flags.AD
    q = query(want_dnssec=True)
    cache.put(q, reply(q, [("www.example.", 300, "A", "192.0.2.1")], flags=dns.flags.AD), 0.0)
    with_do = cache.get(query(want_dnssec=True), 0.0)
    assert with_do is not None and with_do.flags & dns.flags.AD


def cd_query(**kw: Any) -> dns.message.Message:
    q = query(**kw)
    q.flags |= dns.flags.CD
    return q


def test_checking_disabled_answer_is_served_only_to_checking_disabled_queries() -> None:
    """A CD=1 answer was not validated upstream (it may be bogus data a validating resolver
    refuses): a query without CD misses and asks the upstream itself; CD queries share it."""
    cache = DnsCache()
    q = cd_query()
    cache.put(q, reply(q, [("www.example.", 300, "A", "192.0.2.66")]), 0.0)
    assert cache.get(query(), 1.0) is None
    hit = cache.get(cd_query(qid=9), 1.0)
    assert hit is not None and hit.id == 9 and hit.answer[0][0].address == "192.0.2.66"
    plain = query()
    cache.put(plain, reply(plain, [("www.example.", 300, "A", "192.0.2.1")]), 2.0)
    answer = cache.get(query(), 3.0)
    assert answer is not None and answer.answer[0][0].address == "192.0.2.1"
    still = cache.get(cd_query(), 3.0)
    assert still is not None and still.answer[0][0].address == "192.0.2.66"
    assert len(cache) == 2


def test_answer_without_dnssec_records_is_not_served_to_a_do_query() -> None:
    """A DO=0 answer has no RRSIGs: a client asking with DO (to validate itself) must get
    the upstream's DO answer, not that one."""
    cache = DnsCache()
    plain = query()
    cache.put(plain, a_reply(plain), 0.0)
    assert cache.get(query(want_dnssec=True), 0.0) is None
    assert cache.get(query(), 0.0) is not None


@pytest.mark.parametrize("subnet", ["198.18.100.0", "fd00:100::"])
def test_answers_to_client_subnet_queries_are_not_cached(subnet: str) -> None:
    """With an EDNS Client Subnet option the answer may be tailored to that subnet (RFC 7871):
    it is never stored, so it reaches neither another subnet nor a query without ECS; a cached
    answer is not handed to an ECS query either (it may be wrong for that subnet)."""
    cache = DnsCache()
    ecs = query(use_edns=0, options=[dns.edns.ECSOption(subnet, 24 if "." in subnet else 56)])
    tailored = reply(ecs, [("www.example.", 300, "A", "192.0.2.100")])
    tailored.use_edns(0, options=[dns.edns.ECSOption(subnet, 24 if "." in subnet else 56, 24)])
    cache.put(ecs, tailored, 0.0)
    assert len(cache) == 0
    assert cache.get(query(use_edns=0), 0.0) is None
    plain = query(use_edns=0)
    cache.put(plain, a_reply(plain), 0.0)
    assert cache.get(ecs, 0.0) is None
    assert cache.get(query(use_edns=0), 0.0) is not None


def test_least_recently_used_entry_is_evicted() -> None:
    cache = DnsCache(max_entries=2)
    qa, qb, qc = query("a.example."), query("b.example."), query("c.example.")
    cache.put(qa, a_reply(qa), now=0.0)
    cache.put(qb, a_reply(qb), now=0.0)
    assert cache.get(qa, 1.0) is not None  # a is now the most recently used
    cache.put(qc, a_reply(qc), now=2.0)
    assert len(cache) == 2
    assert cache.get(qb, 3.0) is None
    assert cache.get(qa, 3.0) is not None
    assert cache.get(qc, 3.0) is not None
    cache.put(qb, a_reply(qb), now=4.0)  # evicts a (c was used after it)
    assert cache.get(qa, 5.0) is None
    assert len(cache) == 2


def test_clear_drops_entries() -> None:
    cache = DnsCache()
    q = query()
    cache.put(q, a_reply(q), now=0.0)
    cache.clear()
    assert len(cache) == 0 and cache.get(q, 0.0) is None


# -- random responses ---------------------------------------------------------------------------

RDATA = {
    "A": st.just("192.0.2.1"),
    "AAAA": st.just("2001:db8::1"),
    "CNAME": st.just("target.example."),
    "NS": st.just("ns.example."),
    "MX": st.just("10 mx.example."),
    "TXT": st.just('"hello"'),
    "SOA": st.integers(0, 2**31 - 1).map(lambda m: SOA.format(minimum=m)),
}
names = st.sampled_from(["www.example.", "WWW.Example.", "other.example.", "example.", "."])
ttl_values = st.one_of(st.integers(0, 600), st.integers(0, 2**31 - 1))


@st.composite
def records(draw: st.DrawFn) -> tuple[str, int, str, str]:
    rdtype = draw(st.sampled_from(sorted(RDATA)))
    return (draw(names), draw(ttl_values), rdtype, draw(RDATA[rdtype]))


@given(
    qname=names,
    qtype=st.sampled_from(["A", "AAAA", "MX", "TXT", "SOA"]),
    rname=st.sampled_from([None, None, None, "other.example."]),  # None: the query's name
    rcode=st.one_of(
        st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN]),
        st.sampled_from(list(dns.rcode.Rcode)),
    ),
    flags=st.sampled_from([0, 0, dns.flags.TC, dns.flags.AA, dns.flags.AD]),
    answer=st.lists(records(), max_size=4),
    authority=st.lists(records(), max_size=3),
    additional=st.lists(records(), max_size=3),
    edns=st.booleans(),
    put_at=st.floats(0, 1e9),
    get_after=st.lists(st.floats(-10, 1000), max_size=4),
    min_ttl=st.integers(0, 100),
    max_ttl=st.integers(100, 1_000_000),
)
def test_random_responses_never_crash_and_hits_never_overstate_ttls(
    qname: str,
    qtype: str,
    rname: str | None,
    rcode: dns.rcode.Rcode,
    flags: int,
    answer: list[tuple[str, int, str, str]],
    authority: list[tuple[str, int, str, str]],
    additional: list[tuple[str, int, str, str]],
    edns: bool,
    put_at: float,
    get_after: list[float],
    min_ttl: int,
    max_ttl: int,
) -> None:
    cache = DnsCache(max_entries=4, min_ttl=min_ttl, max_ttl=max_ttl)
    q = query(qname, qtype, use_edns=0 if edns else None)
    try:
        r = reply(
            query(rname or qname, qtype), answer, authority, additional, rcode=rcode, flags=flags
        )
    except dns.exception.DNSException:
        return  # not a message dnspython can build (e.g. extended rcode without EDNS)
    cache.put(q, r, put_at)
    for after in get_after:
        again = query(qname.upper(), qtype, qid=77)
        hit = cache.get(again, put_at + after)
        if hit is None:
            continue
        assert hit.id == 77 and hit.question == again.question
        assert hit.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
        assert all(0 <= ttl <= max_ttl for ttl in ttls(hit))
        if hit.answer or hit.authority:
            assert max(0, after) < max_ttl
        roundtrip(hit)
    assert len(cache) <= 1


def test_put_wire_serves_what_put_serves_and_drops_what_does_not_parse() -> None:
    """A forwarded answer cached in wire form (parsed when first served) gives the client
    the same answer and TTL aging as one cached as a message."""
    from tunlwip.dns.summary import summarize

    query = dns.message.make_query("www.example.", "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("www.example.", 300, "IN", "A", "192.0.2.1"))
    response.authority.append(dns.rrset.from_text("example.", 60, "IN", "NS", "ns.example."))
    wire = response.to_wire()
    as_message, as_wire = DnsCache(), DnsCache()
    as_message.put(query, dns.message.from_wire(wire), 100.0)
    as_wire.put_wire(cache_key(query), wire, summarize(wire), 100.0)
    for now in (100.0, 130.5):
        a, b = as_message.get(query, now), as_wire.get(query, now)
        assert a is not None and b is not None
        assert a.to_wire() == b.to_wire()
    assert as_wire.get(query, 161.0) is None  # the NS record's 60 s ran out

    nxdomain = dns.message.make_response(query)
    nxdomain.set_rcode(dns.rcode.NXDOMAIN)
    nxdomain.authority.append(dns.rrset.from_text("example.", 900, "IN", "SOA",
                                                  SOA.format(minimum=30)))  # fmt: skip
    wire = nxdomain.to_wire()
    as_wire.put_wire(cache_key(query), wire, summarize(wire), 200.0)
    assert as_wire.get(query, 229.0) is not None
    assert as_wire.get(query, 230.0) is None

    # Walks (the summary reads no MX data) but does not parse: dropped, a miss.
    mx_query = dns.message.make_query("mail.example.", "MX")
    mx = dns.message.make_response(mx_query)
    mx.answer.append(dns.rrset.from_text("mail.example.", 300, "IN", "MX", "10 mx.example."))
    good = mx.to_wire()
    bad = good[:-2] + b"\x3f\x00"  # the exchange name's last label now runs past the end
    as_wire.put_wire(cache_key(mx_query), bad, summarize(good), 300.0)
    assert len(as_wire) == 1
    assert as_wire.get(mx_query, 300.0) is None
    assert len(as_wire) == 0

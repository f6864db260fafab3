"""DNS answer cache: per (name, type, class, CD, DO), honouring TTLs, negative answers included.

Theory of operation
-------------------
The caller passes the clock (``now``, float seconds; the proxy uses ``trio.current_time()``),
so the cache is pure and tests use plain numbers.

``put`` stores a copy of an upstream response's sections under its question. What is kept:

* NOERROR with answers: for ``ttl`` = the smallest TTL of the answer and authority RRsets, each
  RRset's TTL first clamped to ``[min_ttl, max_ttl]``;
* NXDOMAIN, and NODATA (NOERROR, empty answer), per RFC 2308 §5: for ``min(SOA TTL, SOA
  MINIMUM)`` of the SOA in the authority section, capped by ``max_negative_ttl`` (and
  ``max_ttl``; ``min_ttl`` does not stretch negative answers). Every RRset's TTL is capped to
  that, so clients cache the negative answer no longer than we do. Without an SOA the
  response is not cached (RFC 2308 §5: it has no negative TTL).

Never cached: truncated (TC) responses, other rcodes (SERVFAIL, REFUSED, FORMERR, ...),
responses whose question is not the query's, queries without exactly one question, answers to
queries carrying an EDNS Client Subnet option (RFC 7871: the answer may be tailored to that
subnet, so it is not another client's answer), and anything whose TTL is 0 after clamping.

``get`` answers *this* query: a fresh ``make_response(query)`` (its ID, RD, question and EDNS)
with the cached sections copied in, every TTL lowered by the whole seconds since ``put``, so
a cached answer never claims more time than it has left. An expired entry is dropped and is a
miss. RRsets owned by the query name carry the query's spelling of it (clients using 0x20
case randomisation compare it).

``put_wire`` takes a forwarded answer still in wire form, with its ``summary.summarize``: the
same checks and TTL are decided from the summary, and the answer is parsed into RRsets only
when the entry is first served (most forwarded answers never are: the client caches them too,
and repeats within a second are replayed from ``replay``). An answer that then fails to parse
is dropped, a miss.

Size is bounded by ``max_entries``; the least recently used entry (``get`` counts as use)
is evicted first.

The key holds the CD and DO bits: an answer fetched with CD=1 (checking disabled: the upstream
did not validate, so it may be bogus data a validating resolver would refuse) is only ever
served to queries that also set CD, and a DO=0 answer (no RRSIGs) never reaches a client that
asked for DNSSEC records and would fail to validate without them.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import cast

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset

from .summary import AnswerSummary, QuerySummary
from .wire import FLAG_AD, FLAG_CD, FLAG_TC

#: (qname in wire form, lowercased; rdtype, rdclass, the query's CD and DO bits)
CacheKey = tuple[bytes, int, int, int]

_NOT_CACHED_IN_ADDITIONAL = frozenset({dns.rdatatype.OPT, dns.rdatatype.TSIG})


@dataclasses.dataclass(slots=True)  # (not frozen: made per forwarded answer, and a frozen
class _Entry:  # dataclass's __init__ sets each field through object.__setattr__; never changed)
    stored: float  # ``now`` at put
    ttl: int  # seconds the entry lives
    rcode: dns.rcode.Rcode
    authenticated: bool  # the upstream set AD
    answer: tuple[dns.rrset.RRset, ...]
    authority: tuple[dns.rrset.RRset, ...]
    additional: tuple[dns.rrset.RRset, ...]
    #: A ``put_wire`` answer not parsed yet (its sections are empty until then).
    wire: bytes | None = None


#: The rcodes ``put_wire`` keeps, as dnspython's enum (made once, not per answer).
_RCODES = {int(rcode): rcode for rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)}


def has_client_subnet(message: dns.message.Message) -> bool:
    """Does the message carry an EDNS Client Subnet option (RFC 7871)?"""
    return any(option.otype == dns.edns.OptionType.ECS for option in message.options)


def cache_key(query: dns.message.Message) -> CacheKey | None:
    """The cache key of a query, or None if its answer must not be cached (not one question,
    or an EDNS Client Subnet option: the answer may be tailored to that subnet)."""
    if len(query.question) != 1 or has_client_subnet(query):
        return None
    question = query.question[0]
    bits = (1 if query.flags & dns.flags.CD else 0) | (2 if query.ednsflags & dns.flags.DO else 0)
    return (_wire_name(question.name), question.rdtype, question.rdclass, bits)


def summary_cache_key(query: QuerySummary) -> CacheKey | None:
    """``cache_key`` of a query known by its summary (``summary.summarize_query``)."""
    if query.client_subnet:
        return None
    bits = (1 if query.flags & FLAG_CD else 0) | (2 if query.dnssec_ok else 0)
    return (*query.question, bits)


def _wire_name(name: dns.name.Name) -> bytes:
    wire = name.canonicalize().to_wire()
    assert wire is not None  # (only None when writing to a file)
    return wire


def _question_key(message: dns.message.Message) -> tuple[bytes, int, int] | None:
    if len(message.question) != 1:
        return None
    question = message.question[0]
    return (_wire_name(question.name), question.rdtype, question.rdclass)


def _with_ttl(
    rrset: dns.rrset.RRset, ttl: int, name: dns.name.Name | None = None
) -> dns.rrset.RRset:
    copy = cast(dns.rrset.RRset, rrset.copy())  # type: ignore[no-untyped-call]
    copy.ttl = ttl
    if name is not None:
        copy.name = name
    return copy


def _negative_ttl(response: dns.message.Message) -> int | None:
    """RFC 2308 §5: the TTL of a negative answer is min(SOA TTL, SOA MINIMUM); None if the
    authority section has no SOA."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            soa = rrset[0]
            assert isinstance(soa, dns.rdtypes.ANY.SOA.SOA)
            return min(rrset.ttl, soa.minimum)
    return None


class DnsCache:
    """A bounded LRU cache of DNS answers; ``get`` and ``put`` take the caller's clock."""

    def __init__(
        self,
        max_entries: int = 10_000,
        min_ttl: int = 0,
        max_ttl: int = 86_400,
        max_negative_ttl: int = 3_600,
    ) -> None:
        if max_entries < 0 or min_ttl < 0 or max_ttl < min_ttl or max_negative_ttl < 0:
            raise ValueError(
                "DNS cache needs max_entries >= 0, 0 <= min_ttl <= max_ttl, max_negative_ttl >= 0"
            )
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"<DnsCache {len(self)}/{self.max_entries} entries, "
            f"{self.hits} hits, {self.misses} misses>"
        )

    def clear(self) -> None:
        """Drop every entry (the hit and miss counters are kept)."""
        self._entries.clear()

    def get(self, query: dns.message.Message, now: float) -> dns.message.Message | None:
        """A response to ``query`` from the cache, with TTLs aged to ``now``; None on a miss."""
        key = cache_key(query)
        entry = self._entries.get(key) if key is not None else None
        if key is None or entry is None or query.flags & dns.flags.QR:
            self.misses += 1
            return None
        elapsed = int(now - entry.stored) if now > entry.stored else 0
        if elapsed >= entry.ttl:
            del self._entries[key]
            self.misses += 1
            return None
        if entry.wire is not None:
            parsed = self._parsed(key, entry)
            if parsed is None:
                self.misses += 1
                return None
            entry = parsed
        self._entries.move_to_end(key)
        self.hits += 1

        response = dns.message.make_response(query, recursion_available=True)
        response.set_rcode(entry.rcode)
        if entry.authenticated and (
            query.flags & dns.flags.AD or query.ednsflags & dns.flags.DO
        ):  # RFC 6840 §5.8: AD only to clients that asked for it
            response.flags |= dns.flags.AD
        qname = query.question[0].name
        for cached, section in (
            (entry.answer, response.answer),
            (entry.authority, response.authority),
            (entry.additional, response.additional),
        ):
            for rrset in cached:
                section.append(
                    _with_ttl(
                        rrset,
                        max(0, rrset.ttl - elapsed),
                        qname if rrset.name == qname else None,
                    )
                )
        return response

    def put(self, query: dns.message.Message, response: dns.message.Message, now: float) -> None:
        """Remember ``response`` to ``query`` if it may be cached (see the module docstring)."""
        key = cache_key(query)
        if key is None or self.max_entries == 0 or response.flags & dns.flags.TC:
            return
        if query.opcode() != dns.opcode.QUERY or _question_key(response) != key[:3]:
            return
        entry = self._entry(response, now)
        if entry is not None:
            self._store(key, entry)

    def peek(self, key: CacheKey | None, now: float) -> bool:
        """Whether ``get`` would answer a query with this key; a miss is counted as one (a
        hit is counted by the ``get`` that follows). Expired entries are dropped."""
        entry = self._entries.get(key) if key is not None else None
        if key is None or entry is None:
            self.misses += 1
            return False
        if now > entry.stored and int(now - entry.stored) >= entry.ttl:
            del self._entries[key]
            self.misses += 1
            return False
        return True

    def put_wire(self, key: CacheKey | None, answer: bytes, summary: AnswerSummary,
                 now: float) -> None:  # fmt: skip
        """``put`` for an answer still in wire form (``summary`` is its ``summarize``) to a
        QUERY with cache key ``key``: the same checks and TTL, from the summary; the answer is
        parsed only when first served."""
        if key is None or self.max_entries == 0 or summary.flags & FLAG_TC:
            return
        if (summary.flags >> 11) & 0xF or summary.question != (key[:3],):
            return
        rcode = summary.rcode
        if rcode == dns.rcode.NOERROR and summary.answer_count:
            assert summary.min_ttl is not None  # there are answer records
            ttl = max(self.min_ttl, min(self.max_ttl, summary.min_ttl))
        elif rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            if summary.negative_ttl is None:
                return
            ttl = min(summary.negative_ttl, self.max_negative_ttl, self.max_ttl)
            if summary.min_ttl is not None:
                ttl = min(ttl, summary.min_ttl)
        else:
            return
        if ttl <= 0:
            return
        # (positional: from keywords costs more, once per forwarded answer)
        self._store(key, _Entry(now, ttl, _RCODES[rcode], bool(summary.flags & FLAG_AD), (), (),
                                (), answer))  # fmt: skip

    def _store(self, key: CacheKey, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _parsed(self, key: CacheKey, entry: _Entry) -> _Entry | None:
        """The entry of a ``put_wire`` answer with its records parsed (None: it does not parse
        or is not cacheable after all: dropped)."""
        assert entry.wire is not None
        try:
            response = dns.message.from_wire(entry.wire)
        except dns.exception.DNSException:
            response = None
        parsed = self._entry(response, entry.stored) if response is not None else None
        if parsed is None:
            del self._entries[key]
            return None
        self._entries[key] = parsed
        return parsed

    def _entry(self, response: dns.message.Message, now: float) -> _Entry | None:
        """What ``put`` keeps of a response to the right question (None: not cacheable)."""
        if response.opcode() != dns.opcode.QUERY:
            return None
        rcode = response.rcode()
        answer = response.answer
        authority = response.authority
        if rcode == dns.rcode.NOERROR and answer:
            ttls = [rrset.ttl for rrset in answer] + [rrset.ttl for rrset in authority]
            ttl = max(self.min_ttl, min(self.max_ttl, min(ttls)))

            def clamp(rrset: dns.rrset.RRset) -> int:
                return max(self.min_ttl, min(self.max_ttl, rrset.ttl))

        elif rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            negative = _negative_ttl(response)
            if negative is None:
                return None
            cap = min(negative, self.max_negative_ttl, self.max_ttl)
            ttl = min([cap] + [rrset.ttl for rrset in answer] + [rrset.ttl for rrset in authority])

            def clamp(rrset: dns.rrset.RRset) -> int:
                return min(cap, rrset.ttl)

        else:
            return None
        if ttl <= 0:
            return None
        additional = [
            rrset for rrset in response.additional if rrset.rdtype not in _NOT_CACHED_IN_ADDITIONAL
        ]
        return _Entry(
            stored=now,
            ttl=ttl,
            rcode=rcode,
            authenticated=bool(response.flags & dns.flags.AD),
            answer=tuple(_with_ttl(rrset, clamp(rrset)) for rrset in answer),
            authority=tuple(_with_ttl(rrset, clamp(rrset)) for rrset in authority),
            additional=tuple(
                _with_ttl(rrset, min(rrset.ttl, self.max_ttl)) for rrset in additional
            ),
        )

"""A query on its way through the proxy, and the reply it gets.

Why: most queries are plain (one question for an ordinary name, at most an EDNS record), and
for those forwarding needs only a few facts read from the bytes (``summary.summarize_query``):
the name for the policy, the cache key, the client's UDP size. The dnspython message is built
only when something needs it (a blocked or overridden name, a cache hit, SERVFAIL, a
truncated answer); a query that is not plain is parsed at once, as before. Likewise a
forwarded reply stays the upstream's bytes with their summary unless it must be rendered.
"""

from __future__ import annotations

from typing import NamedTuple

import dns.message
import dns.name
import dns.rdatatype

from .cache import CacheKey, cache_key, summary_cache_key
from .summary import AnswerSummary, QuerySummary

UDP_DEFAULT_SIZE = 512  # RFC 1035 4.2.1, for clients without EDNS


class Query:
    """A client's query: its bytes, its summary if it is plain, its message on first use
    (``message`` raises dns.exception.DNSException should a plain query not parse)."""

    __slots__ = ("_key", "_message", "summary", "wire")

    def __init__(self, wire: bytes, summary: QuerySummary | None,
                 message: dns.message.Message | None = None) -> None:  # fmt: skip
        assert summary is not None or message is not None
        self.wire = wire
        self.summary = summary
        self._message = message
        self._key: CacheKey | bool | None = False  # (False: not worked out yet)

    @property
    def message(self) -> dns.message.Message:
        if self._message is None:
            self._message = dns.message.from_wire(self.wire)
        return self._message

    @property
    def name(self) -> str | dns.name.Name:
        """The question's name, for the policy and the log."""
        if self.summary is not None:
            return self.summary.name
        return self.message.question[0].name

    @property
    def rdtype(self) -> dns.rdatatype.RdataType:
        """The question's type, for the log."""
        if self.summary is not None:
            return dns.rdatatype.RdataType.make(self.summary.question[1])
        return self.message.question[0].rdtype

    @property
    def cache_key(self) -> CacheKey | None:
        """The cache key (``cache.cache_key``), worked out once."""
        key = self._key
        if key is False:
            key = self._key = (summary_cache_key(self.summary) if self.summary is not None
                               else cache_key(self.message))  # fmt: skip
        return key  # type: ignore[return-value]

    @property
    def udp_size(self) -> int:
        """The largest answer the client takes over UDP."""
        if self.summary is not None:
            payload = self.summary.payload
        else:
            payload = self.message.payload if self.message.edns >= 0 else -1
        return UDP_DEFAULT_SIZE if payload < 0 else max(UDP_DEFAULT_SIZE, min(payload, 65535))


class Reply(NamedTuple):
    """An answer on its way to the client: a message to render (policy, cache, errors), or an
    upstream's bytes with their summary (forwarded: never rendered again unless too large for
    the client), or both (a forwarded answer the policy had to read whole)."""

    response: dns.message.Message | None
    raw: bytes | None
    summary: AnswerSummary | None
    source: str  # what answered, for the log: a rule, "cache", an upstream's URL

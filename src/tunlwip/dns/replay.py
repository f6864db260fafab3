"""Recent answers replayed to byte-identical queries: the proxy's fast path.

Why: parsing a query, checking policy and cache and rendering the answer with dnspython costs
far more than the packet path around it, and most queries repeat (apps re-resolve the same
names; a client's query for a name is byte-for-byte the previous one except its ID). A query
whose bytes after the ID equal a recent one's gets that answer with its own ID, without being
parsed: same flags, same name spelling, same EDNS options (so the same size limit, DO and AD
handling) — exactly what the full path produced.

An entry lives at most one second and never longer than the answer's smallest TTL, so a
replayed answer claims at most a second more than it has left: the same granularity as the
cache's own aging. Only complete UDP answers of NOERROR or NXDOMAIN are kept (never SERVFAIL,
truncated or refused ones). The policy is by name, so one answer is right for every client;
a policy or upstream change clears the table.
"""

from __future__ import annotations

from collections import OrderedDict

import dns.rcode

from ..endpoint import IPAddress
from .summary import AnswerSummary

#: The longest an answer is replayed, in seconds.
LIFETIME = 1.0
HEADER_ID_LEN = 2


class Replay:
    """A stored answer: everything but the ID, and what the client learns from it."""

    __slots__ = ("addresses", "answer_tail", "expires", "name", "noted_for")

    def __init__(self, expires: float, answer_tail: bytes, name: str,
                 addresses: tuple[tuple[IPAddress, int], ...]) -> None:  # fmt: skip
        self.expires = expires
        self.answer_tail = answer_tail  # the answer from byte 2 on
        self.name = name
        #: (address, TTL) of the A/AAAA records, for the resolved-names table.
        self.addresses = addresses
        #: The client whose resolved names last had these addresses noted from this entry:
        #: its repeats need not note them again (the entry lives a second; names, minutes).
        self.noted_for: IPAddress | None = None


class RecentAnswers:
    """A bounded table of answers keyed by their query's bytes after the ID."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Replay] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, query: bytes, now: float) -> Replay | None:
        """The stored answer for a query with these bytes, if it is still fresh."""
        key = query[HEADER_ID_LEN:]
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            del self._entries[key]
            return None
        return entry

    def put(self, query: bytes, answer: bytes, *, min_ttl: float | None, name: str,
            addresses: tuple[tuple[IPAddress, int], ...], now: float) -> None:  # fmt: skip
        """Keep ``answer`` (to ``query``) for replay; ``min_ttl`` is its smallest TTL (None: it
        has no records)."""
        lifetime = LIFETIME if min_ttl is None else min(LIFETIME, min_ttl)
        if lifetime <= 0 or self.max_entries <= 0 or len(query) <= HEADER_ID_LEN:
            return
        key = query[HEADER_ID_LEN:]
        self._entries.pop(key, None)
        self._entries[key] = Replay(now + lifetime, answer[HEADER_ID_LEN:], name, addresses)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def keep(self, query: bytes, summary: AnswerSummary | None, answer: bytes,
             now: float) -> None:  # fmt: skip
        """Keep ``answer`` to ``query`` (``summary`` its summary) if it is a complete
        NOERROR/NXDOMAIN answer over UDP; not a truncated (TC) one, nor a failure."""
        if summary is None or len(summary.question) != 1 or answer[2] & 0x02:
            return
        if summary.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return
        self.put(query, answer, min_ttl=summary.min_ttl_all, name=summary.question_name(),
                 addresses=tuple(summary.addresses), now=now)  # fmt: skip

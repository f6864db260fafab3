"""What the DNS proxy counts (the statistics schema's ``dns`` section)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DnsCounters:
    queries: int = 0
    blocked: int = 0
    #: Of ``blocked``: answers whose CNAME chain led to a blocked name.
    blocked_cname: int = 0
    overridden: int = 0
    cache_hits: int = 0
    forwarded: int = 0
    #: Queries answered SERVFAIL because every upstream failed or the query timed out.
    upstream_failures: int = 0
    timeouts: int = 0
    truncated: int = 0
    #: Dropped: unparseable, a response instead of a query, or a retransmission in flight.
    malformed: int = 0
    formerr: int = 0
    duplicates: int = 0
    #: Answered REFUSED: ``max_in_flight`` queries in flight (overload), or the client had
    #: its share of them in flight (client_share).
    overload: int = 0
    client_share: int = 0
    #: Answered by replaying a recent answer to a byte-identical query (``dns.replay``).
    replayed: int = 0
    #: TCP connections reset for a query not received, or an answer not taken, within
    #: ``tcp_query_timeout``.
    tcp_timeouts: int = 0

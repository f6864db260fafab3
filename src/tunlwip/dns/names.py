"""Which name each client resolved to which address, from the answers the proxy sent it.

Why: flow records and ``tunlwip status`` show "who talked to what"; an address alone rarely
says what. When a client then connects to an address it got from us, the name it asked for
(the question, not a CNAME target at the end of the chain) names the flow. Entries are per
client address, live as long as the answer's TTL but at least ``min_ttl`` (apps keep using an
address after its TTL ran out), and the table is an LRU of at most ``max_entries``.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

import dns.message
import dns.rdatatype

from ..endpoint import IPAddress

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_V6 = 1 << 128  # set in the key of an IPv6 address: ::c612:1 is not 198.18.0.1


def address_key(address: IPAddress) -> int:
    """An address as a number to key tables with: an ``ip_address`` hashes through ``hex()``
    in Python, an int in C (two per look-up and two per answer record here otherwise)."""
    value = int(address)
    return value | _V6 if type(address) is ipaddress.IPv6Address else value


def answered_addresses(
    response: dns.message.Message,
) -> tuple[str, tuple[tuple[IPAddress, int], ...]]:
    """(the question's name, the (address, TTL) pairs of the A/AAAA answers) of a response
    with one question."""
    name = response.question[0].name.to_text(omit_final_dot=True).lower()
    found = []
    for rrset in response.answer:
        if rrset.rdtype not in _ADDRESS_TYPES:
            continue
        for rdata in rrset:
            try:
                found.append((ipaddress.ip_address(rdata.address), rrset.ttl))
            except (AttributeError, ValueError):
                continue
    return name, tuple(found)


class ResolvedNames:
    """(client address, answered address) -> name, bounded and expiring (trio clock times)."""

    def __init__(self, max_entries: int = 50_000, min_ttl: float = 60.0) -> None:
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        #: (client, address), each as ``_key`` gives it -> (name, expiry).
        self._entries: OrderedDict[tuple[int, int], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, client: IPAddress, response: dns.message.Message, now: float) -> int:
        """Note the A/AAAA addresses of ``response`` as answers to its question for ``client``;
        returns how many."""
        if not response.answer or len(response.question) != 1 or self.max_entries <= 0:
            return 0
        return self.remember_addresses(client, *answered_addresses(response), now)

    def remember_addresses(
        self, client: IPAddress, name: str, addresses: Iterable[tuple[IPAddress, int]], now: float
    ) -> int:
        """Note that ``name`` resolved to these (address, TTL) pairs for ``client``."""
        count = 0
        client_key = address_key(client)
        entries = self._entries
        for address, ttl in addresses:
            key = (client_key, address_key(address))
            entries.pop(key, None)
            entries[key] = (name, now + max(float(ttl), self.min_ttl))
            count += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return count

    def lookup(self, client: IPAddress, address: IPAddress, now: float) -> str | None:
        """The name ``client`` last resolved to ``address``, unless that answer expired."""
        key = (address_key(client), address_key(address))
        entry = self._entries.get(key)
        if entry is None:
            return None
        name, expires = entry
        if now >= expires:
            del self._entries[key]
            return None
        return name

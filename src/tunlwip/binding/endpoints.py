"""Conversions between ``Endpoint`` and C's ``tl_endpoint`` (family, 16 address bytes, port)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from ..endpoint import Endpoint, IPAddress
from .ffi import ffi

#: Addresses made from C's bytes, by family and bytes: a gateway sees few distinct ones (its
#: clients and the destinations they use) many times each, and making one costs more than the
#: lookup. Emptied when full, so it stays small whatever the traffic.
_ADDRESSES: dict[bytes, IPAddress] = {}
_ADDRESSES_KEPT = 4096


def endpoint_from_c(ep: Any) -> Endpoint:
    """The ``Endpoint`` a ``tl_endpoint *`` (or ``tl_endpoint``) holds."""
    family = ep.family
    raw = bytes(ffi.buffer(ep.addr, 4 if family == 4 else 16))
    address = _ADDRESSES.get(raw)
    if address is None:
        address = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
        if len(_ADDRESSES) >= _ADDRESSES_KEPT:
            _ADDRESSES.clear()
        _ADDRESSES[raw] = address
    return Endpoint(address, ep.port)


def endpoint_to_c(endpoint: Endpoint) -> Any:
    """A new ``tl_endpoint *`` holding ``endpoint`` (freed with the returned object)."""
    ep = ffi.new("tl_endpoint *")
    ep.family = endpoint.address.version
    packed = endpoint.address.packed
    ffi.memmove(ep.addr, packed, len(packed))
    ep.port = endpoint.port
    return ep


def addresses_to_c(addresses: Sequence[IPAddress]) -> Any:
    """A new ``tl_endpoint[]`` of ``addresses`` (port 0; at least one element, as C wants)."""
    c_addrs = ffi.new("tl_endpoint[]", max(1, len(addresses)))
    for i, address in enumerate(addresses):
        c_addrs[i].family = address.version
        ffi.memmove(c_addrs[i].addr, address.packed, len(address.packed))
    return c_addrs

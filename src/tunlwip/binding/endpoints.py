"""Conversions between ``Endpoint`` and C's ``tl_endpoint`` (family, 16 address bytes, port)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from ..endpoint import Endpoint, IPAddress
from .ffi import ffi

#: Endpoints made lately from C, by the bytes of their ``tl_endpoint`` (C fills it whole,
#: padding zeroed: ``tl_endpoint_from``): every datagram of a flow names the same two, and an
#: ``ip_address`` and an ``Endpoint`` cost several times a look-up. Cleared when full.
_from_c: dict[bytes, Endpoint] = {}
#: ``tl_endpoint``s made lately for ``endpoint_to_c_shared``, by the ``id`` of their
#: ``Endpoint`` (kept with it, so the id cannot be another's): a flow sends from and to the
#: same two objects, and hashing an Endpoint hashes its ip_address through ``hex()``.
_to_c: dict[int, tuple[Endpoint, Any]] = {}
#: Addresses of those, by their family and address bytes: a client's connections differ only
#: in their port.
_addresses: dict[bytes, IPAddress] = {}
_KEPT = 4096


def endpoint_from_c(ep: Any) -> Endpoint:
    """The ``Endpoint`` a ``tl_endpoint *`` (or a ``tl_endpoint`` inside a struct) holds."""
    if ffi.typeof(ep).kind == "struct":
        ep = ffi.addressof(ep)
    key = ffi.buffer(ep)[:]
    endpoint = _from_c.get(key)
    if endpoint is None:
        address_key = key[:17]  # family and address: a client's new connection, a new port
        address = _addresses.get(address_key)
        if address is None:
            if ep.family == 4:
                address = ipaddress.IPv4Address(address_key[1:5])
            else:
                address = ipaddress.IPv6Address(address_key[1:17])
            if len(_addresses) >= _KEPT:
                _addresses.clear()
            _addresses[address_key] = address
        endpoint = Endpoint(address, ep.port)
        if len(_from_c) >= _KEPT:
            _from_c.clear()
        _from_c[key] = endpoint
    return endpoint


def endpoint_to_c_shared(endpoint: Endpoint) -> Any:
    """``endpoint_to_c`` for a call that only reads it during the call (``const``): one kept
    per endpoint, as the same ones are sent to again and again. Never to be written to."""
    kept = _to_c.get(id(endpoint))
    if kept is not None and kept[0] is endpoint:
        return kept[1]
    ep = endpoint_to_c(endpoint)
    if len(_to_c) >= _KEPT:
        _to_c.clear()
    _to_c[id(endpoint)] = (endpoint, ep)
    return ep


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

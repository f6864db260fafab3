"""SOCKS5 routes dialed in C (``_csrc/socks5_dial.c``): what Python prepares, and what C's
failures mean.

Theory of operation
-------------------
A TCP flow routed to a ``socks5://`` proxy given by address (an IPv4 or IPv6 literal) is dialed
by the C dials when they are on (``TcpRoutes.start``): the proxy connect, the greeting, RFC 1929
authentication and the CONNECT run in C, so the flow costs Python no more than a direct C dial
(its SYN hook and the batched events). What C needs from the route is made once per via and
kept while its table is in use (``CSocks5Route``): the proxy's ``tl_endpoint`` and the RFC 1929
request, built by the same code as the Python client's (``socks5.auth_request``). A proxy given
by host name keeps the Python path (``proxy_dial.open_tcp_via``), which resolves it.

Failures read exactly as the Python client's (``failure``, ``start_failure``): the proxy's own
failures are ``ProxyError`` with the same reason ("proxy: refused", "proxy: handshake timeout",
"proxy: bad version", ...), so flow records and ``proxy_failures`` do not depend on which path
ran; reply codes 3-6 are the destination's failures, raised as the errno a direct dial would see
(reply 5: ``ConnectionRefusedError``, so the client gets RST).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

from ..admission import FD_SHORTAGE, MEMORY_SHORTAGE
from ..binding import dial as cdial
from ..binding.endpoints import endpoint_to_c
from ..endpoint import Endpoint
from ..errors import ProtectError, ProxyError
from ..hostname import is_hostname
from .via import Socks5Proxy

__all__ = ["CSocks5Route", "c_route_for", "failure", "start_failure"]


@dataclasses.dataclass(frozen=True, eq=False)
class CSocks5Route:
    """A SOCKS5 via as C dials it: the proxy (a ``tl_endpoint *``, kept alive here), the RFC
    1929 request (None: no credentials), and whether to send the flow's name."""

    proxy: Any
    auth: bytes | None
    remote_dns: bool

    def name_for(self, name: str | None) -> bytes | None:
        """The CONNECT's host name (ATYP 3) for a flow named ``name``, or None (by address):
        only with ``remote_dns`` and a usable host name, as the Python path does."""
        if not (self.remote_dns and name):
            return None
        name = name.rstrip(".")
        if not is_hostname(name):
            return None
        try:
            raw = name.encode("ascii")
        except UnicodeEncodeError:
            return None
        return raw if 1 <= len(raw) <= 255 else None


def c_route_for(via: Socks5Proxy) -> CSocks5Route | None:
    """The C form of ``via``; None when its proxy is a host name (the Python path resolves it)."""
    try:
        proxy = Endpoint.parse(via.host, via.port)
    except ValueError:
        return None
    auth = None
    if via.username is not None and via.password is not None:
        from . import socks5  # the SOCKS5 codec: only for a proxy with credentials

        auth = socks5.auth_request(via.username, via.password)
    return CSocks5Route(endpoint_to_c(proxy), auth, via.remote_dns)


def failure(reason: int, err: int) -> OSError:
    """The exception a failed C SOCKS5 dial stands for (its event's ``proxy_reason``, errno)."""
    text = cdial.PROXY_REASONS.get(reason, "unknown failure")
    if text is None:  # the destination's failure, by the proxy's word: as a direct dial's
        return OSError(err, os.strerror(err) + " (via SOCKS5)")
    return ProxyError(text, err)


def start_failure(err: int) -> OSError:
    """The exception for a C SOCKS5 dial that could not start (``-errno`` of the start, the
    socket to the proxy refused at once): our own shortages and protection failures as for any
    dial, the rest as the proxy's failure, as ``proxy_dial`` reports them."""
    if err >= cdial.PROTECT_FAILED:
        return ProtectError(f"cannot protect socket: {os.strerror(err - cdial.PROTECT_FAILED)}")
    if err in FD_SHORTAGE or err in MEMORY_SHORTAGE or err == errno.EINVAL:
        return OSError(err, os.strerror(err))
    if err == errno.ECONNREFUSED:
        return ProxyError("refused", err)
    if err == errno.ETIMEDOUT:
        return ProxyError("connect timeout", err)
    return ProxyError("unreachable", err, os.strerror(err))

"""DNS upstreams reached through a ``via``: where an upstream's connections are opened.

Theory of operation
-------------------
Every upstream transport opens its connections through one object with two calls,
``open_tcp(endpoint)`` (a stream, for tcp://, tls:// and https://, TLS going on top) and
``open_udp(endpoint)`` (a connected socket, for udp://'s pool). The gateway's ``Dialer`` is
that object for upstreams reached directly; ``upstream_dialer`` picks the one a ``via``
(the syntax of ``[[route]].via``, ``egress.via``) asks for, so the transports never know:

* ``direct``: the dialer itself; ``direct?fwmark=N`` / ``direct?interface=IF``: a dialer
  with that protector instead (``egress.direct.dialer_for``);
* ``socks5://`` and ``http://``: ``ProxiedDialer``, whose ``open_tcp`` is
  ``egress.proxy_dial.open_tcp_via`` (SOCKS5 CONNECT or HTTP CONNECT to the upstream's
  address, the protected connection to the proxy bounded by its handshake timeout); proxy
  failures are ``ProxyError`` (an ``OSError``), so the upstream counts them as its failures
  and the failover moves on, as for a direct connection that failed.

What is refused, at configuration time (``via_problem``): ``reject``, ``drop`` and custom vias
(blocking names is the lists' job); ``udp://`` through a proxy (a SOCKS5 UDP association per pooled
socket would cost a proxy connection per few dozen queries, and an HTTP proxy carries no UDP:
use ``tcp://`` or ``tls://``, which every proxy carries); and a proxy given by name (upstreams
are never found by name resolution, which could itself go through the proxy being set up, or
leak around it).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import urllib.parse
from typing import Protocol

import trio

from ..dialer import Dialer
from ..egress.direct import dialer_for
from ..egress.via import HANDSHAKE_TIMEOUT, Direct, HttpProxy, Socks5Proxy, Via
from ..endpoint import Endpoint
from ..errors import ProxyError

__all__ = ["ProxiedDialer", "UpstreamDialer", "upstream_dialer", "via_problem"]

log = logging.getLogger("tunlwip.dns.upstreams")


class UpstreamDialer(Protocol):
    """What an upstream opens its connections with (``Dialer`` is one)."""

    async def open_tcp(self, target: Endpoint) -> trio.SocketStream: ...

    def open_udp(self, target: Endpoint) -> socket.socket: ...


class ProxiedDialer:
    """Upstream connections through a SOCKS5 or HTTP CONNECT proxy (TCP only)."""

    def __init__(self, via: Socks5Proxy | HttpProxy, dialer: Dialer, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:  # fmt: skip
        self.via = via
        self._dialer = dialer
        self._handshake_timeout = handshake_timeout
        #: Connections the proxy failed to open (down, refused, broke its protocol, too slow).
        self.failures = 0

    def __repr__(self) -> str:
        return f"<ProxiedDialer {self.via}>"  # (str(via) never shows a password)

    async def open_tcp(self, target: Endpoint) -> trio.SocketStream:
        """A stream to ``target`` through the proxy, positioned after its handshake. Raises
        ProxyError (the proxy failed), ConnectionRefusedError or another OSError (the proxy
        said the upstream refused or is unreachable), ProtectError."""
        # The proxy clients: imported by the first connection through a proxy, not by every
        # gateway (idle memory).
        from ..egress.proxy_dial import open_tcp_via

        try:
            sock = await open_tcp_via(self.via, self._dialer, target,
                                      handshake_timeout=self._handshake_timeout)  # fmt: skip
        except ProxyError as exc:
            self.failures += 1
            log.debug("DNS upstream %s through %s: %s", target, self.via, exc)
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    def open_udp(self, target: Endpoint) -> socket.socket:
        # Refused at configuration time (``via_problem``); reaching this is a bug.
        raise OSError(f"udp:// upstreams cannot go through {self.via}")


def upstream_dialer(via: Via | None, dialer: Dialer) -> UpstreamDialer:
    """The dialer upstreams reached by way of ``via`` use (None: ``dialer`` itself). ValueError
    for a via no upstream can use (``via_problem`` says why)."""
    if via is None:
        return dialer
    if isinstance(via, Direct):
        return dialer_for(via, dialer)
    if isinstance(via, Socks5Proxy | HttpProxy):
        return ProxiedDialer(via, dialer)
    raise ValueError(f"{via}: DNS upstreams are reached directly or through a proxy")


def via_problem(via: object, urls: tuple[str, ...]) -> tuple[str, str] | None:
    """Why upstreams ``urls`` cannot be reached by way of ``via``, as (the key at fault:
    ``"via"`` or ``"upstreams[i]"``, the reason); None when they can."""
    if not isinstance(via, Direct | Socks5Proxy | HttpProxy):
        return ("via", f"{via} is not a way to reach a DNS upstream (direct, direct?fwmark=N, "
                "direct?interface=IF, socks5:// or http://); to refuse names, use "
                "dns.block_lists")  # fmt: skip
    if isinstance(via, Direct):
        return None
    try:
        ipaddress.ip_address(via.host)
    except ValueError:
        return ("via", f"the proxy {via} must be given by IP address: DNS upstreams are never "
                "found by name resolution")  # fmt: skip
    for index, url in enumerate(urls):
        if urllib.parse.urlsplit(url.strip()).scheme == "udp":
            return (f"upstreams[{index}]", f"{url!r} is udp://, which cannot go through the "
                    f"proxy {via}: use tcp:// or tls:// to the same server")  # fmt: skip
    return None

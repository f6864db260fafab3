"""Dial a flow's destination the way its route's ``via`` says: the gateway's one entry point.

Theory of operation
-------------------
``open_tcp_via`` returns what the default forwarder needs for the C relay: a connected,
protected, non-blocking ``socket.socket`` positioned right after any proxy handshake (no byte of
the destination's data consumed), or raises what a direct dial would for the same failure, so
the existing mapping to the client (RST for ``ConnectionRefusedError``, ICMP unreachable for
the rest) holds through a proxy too:

* ``Direct`` (optionally with its own fwmark or interface): the protected connect.
* ``Socks5Proxy``: connect to the proxy (protected, like every socket), then the SOCKS5
  handshake (``socks5_client``), the destination as its address, or as the flow's name when
  one is known and the via says ``remote_dns``.
* ``HttpProxy``: connect to the proxy, then ``CONNECT address:port`` (``http_connect``).
* ``Reject``: ``ConnectionRefusedError`` at once (the client sees a closed port).

``open_udp_via`` opens a SOCKS5 UDP association for one UDP session (``UdpAssociation``).

Bounds: the connect to the proxy and the handshake together end within ``handshake_timeout``
(``HANDSHAKE_TIMEOUT`` by default), a stalled or dripping proxy included; a SOCKS5 reply is at
most 262 bytes by construction, an HTTP response head at most ``http_connect.MAX_HEAD`` bytes
(and ``MAX_HEADS`` interim heads). Failures of the proxy itself are ``ProxyError`` with a short
stable ``reason`` ("proxy: refused", "proxy: handshake timeout", "proxy: bad version", ...),
which a flow record can show and a counter can count; the client then gets the "unreachable"
answer, as the destination's state is unknown.

The proxy's host name, if the via names one, is resolved with ``resolve`` (the system resolver
by default; an embedder whose resolver would loop through the TUN passes its own).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..admission import FD_SHORTAGE
from ..dialer import Dialer
from ..endpoint import Endpoint, IPAddress
from ..errors import ProtectError, ProxyError
from ..hostname import is_hostname
from . import socks5, socks5_client
from .direct import dialer_for
from .sockio import recv_through, send_all
from .socks5 import Address
from .socks5_client import UdpAssociation
from .via import HANDSHAKE_TIMEOUT, Direct, Drop, HttpProxy, Reject, Socks5Proxy, Via

__all__ = ["Resolver", "open_tcp_via", "open_udp_via", "system_resolver"]

Resolver = Callable[[str], Awaitable[Sequence[IPAddress]]]


async def system_resolver(name: str) -> list[IPAddress]:
    """The addresses of ``name`` from the system's resolver (``getaddrinfo``)."""
    infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def open_tcp_via(via: Via, dialer: Dialer, target: Endpoint, *, name: str | None = None,
                       handshake_timeout: float = HANDSHAKE_TIMEOUT,
                       resolve: Resolver = system_resolver) -> socket.socket:  # fmt: skip
    """A connected, protected, non-blocking socket to ``target`` by way of ``via``, ready for
    the C relay. ``name``: the flow's host name if known (SOCKS5 ``remote_dns``). Raises
    ConnectionRefusedError, TimeoutError, OSError (unreachable), ProtectError or ProxyError;
    ValueError for ``Drop`` (nothing to dial: the caller stays silent)."""
    if isinstance(via, Direct):
        return await dialer_for(via, dialer).connect_tcp(target, dialer.connect_timeout)
    if isinstance(via, Reject):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "rejected by route")
    if isinstance(via, Drop):
        raise ValueError("a dropped flow is not dialed")
    deadline = trio.current_time() + handshake_timeout
    sock = await _connect_proxy(via, dialer, deadline, resolve)
    try:
        with trio.move_on_at(deadline) as scope:
            if isinstance(via, Socks5Proxy):
                request = socks5.connect_request(_destination(via, name, target), target.port)
                await socks5_client.handshake(sock, request, username=via.username,
                                              password=via.password)  # fmt: skip
            else:
                await _http_connect(sock, via, target)
        if scope.cancelled_caught:
            raise ProxyError("handshake timeout", errno.ETIMEDOUT)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_udp_via(via: Via, dialer: Dialer, target: Endpoint,
                       *, name: str | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                       resolve: Resolver = system_resolver) -> UdpAssociation:  # fmt: skip
    """A SOCKS5 UDP association to ``target`` for one UDP session (``UdpAssociation``).
    ``Reject`` raises ConnectionRefusedError (ICMP port unreachable for the client), an HTTP
    proxy ``ProxyError("no udp via http proxy")`` (it carries TCP only). ``Direct`` and
    ``Drop`` raise ValueError: a direct route needs no association
    (``dialer_for(via, dialer).open_udp(target)``), a dropped flow nothing at all."""
    if isinstance(via, Reject):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "rejected by route")
    if isinstance(via, HttpProxy):
        raise ProxyError("no udp via http proxy", errno.EPROTONOSUPPORT)
    if not isinstance(via, Socks5Proxy):
        raise ValueError(f"{via}: no association to open (direct: dialer_for; drop: silence)")
    deadline = trio.current_time() + handshake_timeout
    control = await _connect_proxy(via, dialer, deadline, resolve)
    try:
        with trio.move_on_at(deadline) as scope:
            request = socks5.udp_associate_request(6 if control.family == socket.AF_INET6 else 4)
            bound = await socks5_client.handshake(control, request, username=via.username,
                                                  password=via.password)  # fmt: skip
        if scope.cancelled_caught:
            raise ProxyError("handshake timeout", errno.ETIMEDOUT)
        proxy = Endpoint.parse(*control.getpeername()[:2])
        relay = socks5_client.relay_endpoint(bound, proxy)
        udp = dialer.open_udp(relay)
    except BaseException:
        control.close()
        raise
    return UdpAssociation(control, udp, relay, _destination(via, name, target), target.port)


def _destination(via: Socks5Proxy, name: str | None, target: Endpoint) -> Address:
    """The flow's name with ``remote_dns`` when it is a usable host name, else its address
    (a name from a client's bytes is never sent unchecked)."""
    if via.remote_dns and name and is_hostname(name.rstrip(".")):
        return name.rstrip(".")
    return target.address


async def _connect_proxy(via: Socks5Proxy | HttpProxy, dialer: Dialer, deadline: float,
                         resolve: Resolver) -> socket.socket:  # fmt: skip
    """The protected connection to the proxy. Its failures are the proxy's, not the
    destination's: ``ProxyError`` (except ProtectError and a shortage of fds, which the
    gateway handles as for any dial)."""
    proxy = await _proxy_endpoint(via, deadline, resolve)
    timeout = max(0.0, min(deadline - trio.current_time(), dialer.connect_timeout))
    try:
        return await dialer.connect_tcp(proxy, timeout)
    except ProtectError:
        raise
    except ConnectionRefusedError:
        raise ProxyError("refused", errno.ECONNREFUSED, f"proxy {proxy}") from None
    except TimeoutError:
        raise ProxyError("connect timeout", errno.ETIMEDOUT, f"proxy {proxy}") from None
    except OSError as exc:
        if exc.errno in FD_SHORTAGE:
            raise
        raise ProxyError("unreachable", exc.errno, f"proxy {proxy}: {exc}") from None


async def _proxy_endpoint(via: Socks5Proxy | HttpProxy, deadline: float,
                          resolve: Resolver) -> Endpoint:  # fmt: skip
    try:
        return Endpoint.parse(via.host, via.port)
    except ValueError:
        pass  # a name
    addresses: Sequence[IPAddress] = ()
    with trio.move_on_at(deadline):
        try:
            addresses = await resolve(via.host)
        except OSError:
            addresses = ()
    if not addresses:
        raise ProxyError("name not resolved", errno.EHOSTUNREACH, via.host)
    return Endpoint(addresses[0], via.port)


async def _http_connect(sock: socket.socket, via: HttpProxy, target: Endpoint) -> None:
    """CONNECT to ``target`` (by address: the one the client chose) and read the response
    head(s), nothing past them."""
    from . import http_connect  # h11: only for a route through an HTTP proxy (idle memory)

    request = http_connect.connect_request(target.address, target.port, via.username,
                                           via.password)  # fmt: skip
    await send_all(sock, request)
    for _ in range(http_connect.MAX_HEADS):
        head = await recv_through(sock, http_connect.HEAD_END, http_connect.MAX_HEAD)
        if http_connect.parse_response_head(head) >= 200:
            return
    raise ProxyError("bad response", detail="too many interim responses")

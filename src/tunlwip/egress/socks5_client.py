"""The SOCKS5 client under trio: a handshake on a connected socket, and UDP associations.

Theory of operation
-------------------
``handshake`` runs the method negotiation, RFC 1929 authentication when the proxy chose it, and
one request (CONNECT or UDP ASSOCIATE) on a connected, protected, non-blocking socket, reading
exactly the bytes each answer needs (``socks5.reply_length``), so after a CONNECT the socket is
positioned at the destination's first byte, ready for the C relay. Deadlines are the caller's
(``proxy_dial`` runs the whole handshake under one).

``UdpAssociation`` is one UDP ASSOCIATE, for one UDP session: the TCP control connection (the
association lives as long as it does), and a protected UDP socket connected to the relay the
proxy named. Datagrams to the target get the SOCKS5 UDP header (``wrap``); datagrams from the
relay are checked strictly (``unwrap``): fragments, malformed headers and datagrams from any
source but the target are dropped and counted in ``UdpAssociationCounters``. Two ways to drive
it: with tasks (``send``, ``receive``, and ``watch_control`` in a task of its own, which closes
the association when the proxy closes the control connection), or without (the gateway's poll
set watches ``udp_socket`` and ``control_socket``; ``send_nowait``, ``receive_nowait``,
``control_closed``).
"""

from __future__ import annotations

import dataclasses
import errno
import socket

import trio

from ..endpoint import Endpoint
from ..errors import ProxyError
from . import socks5
from .sockio import recv_exactly, send_all
from .socks5 import Address, BoundAddress

__all__ = ["UdpAssociation", "UdpAssociationCounters", "handshake"]

MAX_DATAGRAM = 65535


async def handshake(sock: socket.socket, request: bytes, *, username: str | None = None,
                    password: str | None = None) -> BoundAddress:  # fmt: skip
    """Negotiate (with user/password when given) and send ``request``; the bound address of
    the success reply. Raises ``ProxyError`` or the error a reply code maps to."""
    offer = socks5.greeting(with_password=username is not None)
    await send_all(sock, offer)
    method = socks5.parse_method_choice(await recv_exactly(sock, socks5.METHOD_REPLY_LEN),
                                        offer[2:])  # fmt: skip
    if method == socks5.METHOD_USERPASS:
        assert username is not None and password is not None
        await send_all(sock, socks5.auth_request(username, password))
        socks5.parse_auth_status(await recv_exactly(sock, socks5.AUTH_REPLY_LEN))
    await send_all(sock, request)
    head = await recv_exactly(sock, socks5.REPLY_HEAD)
    rest = await recv_exactly(sock, socks5.reply_length(head) - socks5.REPLY_HEAD)
    return socks5.parse_reply(head + rest)


@dataclasses.dataclass
class UdpAssociationCounters:
    """Datagrams of one association: relayed, and dropped by kind."""

    sent: int = 0
    received: int = 0
    #: Could not be sent (buffer full, too big, relay unreachable).
    send_failed: int = 0
    #: From the relay with FRAG != 0 (not reassembled).
    fragments: int = 0
    #: From the relay with a malformed header.
    malformed: int = 0
    #: From the relay, but naming another source than the target.
    foreign: int = 0


class UdpAssociation:
    """One SOCKS5 UDP association towards one target (see the module's docstring)."""

    def __init__(self, control: socket.socket, udp: socket.socket, relay: Endpoint,
                 target: Address, port: int) -> None:  # fmt: skip
        self.control_socket = control
        self.udp_socket = udp
        #: Where the proxy relays our datagrams.
        self.relay = relay
        self.target = target
        self.port = port
        self.counters = UdpAssociationCounters()
        self._header = socks5.udp_header(target, port)
        self.closed = False

    def __repr__(self) -> str:
        return f"<UdpAssociation to {self.target}:{self.port} via relay {self.relay}>"

    # -- the codec ------------------------------------------------------------------------------
    def wrap(self, payload: bytes) -> bytes:
        """``payload`` as a datagram for the relay."""
        return self._header + payload

    def unwrap(self, datagram: bytes) -> bytes | None:
        """The payload of a datagram from the relay, or None (dropped and counted): a
        fragment, a malformed header, another source than the target. With a target given by
        name the proxy resolved it, so any source address with the target's port is taken."""
        try:
            host, port, payload = socks5.parse_udp_datagram(datagram)
        except ProxyError as exc:
            if exc.reason == "proxy: udp fragment":
                self.counters.fragments += 1
            else:
                self.counters.malformed += 1
            return None
        by_name = isinstance(self.target, str)
        if port != self.port or (not by_name and host != self.target):
            self.counters.foreign += 1
            return None
        self.counters.received += 1
        return payload

    # -- without tasks --------------------------------------------------------------------------
    def send_nowait(self, payload: bytes) -> bool:
        """Send one datagram to the target; False if it was dropped (counted)."""
        try:
            self.udp_socket.send(self.wrap(payload))
        except OSError:
            self.counters.send_failed += 1
            return False
        self.counters.sent += 1
        return True

    def receive_nowait(self) -> bytes | None:
        """The next payload from the target already arrived, or None if there is none now
        (dropped datagrams are skipped). Raises OSError if the relay reported an error (e.g.
        ConnectionRefusedError: ICMP port unreachable from the relay's address)."""
        while True:
            try:
                datagram = self.udp_socket.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return None
            payload = self.unwrap(datagram)
            if payload is not None:
                return payload

    def control_closed(self) -> bool:
        """Has the proxy closed (or reset) the control connection, which ends the
        association? Stray bytes on it are read and ignored (the protocol sends none)."""
        try:
            data = self.control_socket.recv(512)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data

    # -- with tasks -----------------------------------------------------------------------------
    async def send(self, payload: bytes) -> None:
        """Send one datagram to the target (dropped and counted if it cannot go now: UDP)."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        self.send_nowait(payload)

    async def receive(self) -> bytes:
        """The next payload from the target. Raises ``ProxyError("association closed")`` once
        the association ended (``watch_control`` saw the control connection close, or
        ``aclose``)."""
        while True:
            self._check_open()
            payload = self.receive_nowait()
            if payload is not None:
                await trio.lowlevel.checkpoint()
                return payload
            try:
                await trio.lowlevel.wait_readable(self.udp_socket)
            except trio.ClosedResourceError:
                raise _closed() from None

    async def watch_control(self) -> None:
        """Return when the proxy closed the control connection, after closing the association
        (waking any ``receive``). Run it in a task next to the session's."""
        while not self.closed:
            try:
                await trio.lowlevel.wait_readable(self.control_socket)
            except trio.ClosedResourceError:
                return
            if self.control_closed():
                self.close()
                return

    def close(self) -> None:
        """End the association: both sockets closed (the proxy then drops its relay)."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.udp_socket, self.control_socket):
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self.closed:
            raise _closed()


def _closed() -> ProxyError:
    return ProxyError("association closed", errno.ECONNRESET)


def relay_endpoint(bound: BoundAddress, proxy: Endpoint) -> Endpoint:
    """Where to send datagrams: the relay the reply named; an unspecified address (0.0.0.0,
    ::) means the proxy's own address, as clients take it."""
    host = bound.host
    if isinstance(host, str):
        raise ProxyError("bad address", detail="relay named by host name")
    if bound.port == 0:
        raise ProxyError("bad address", detail="relay port 0")
    if host.is_unspecified:
        return Endpoint(proxy.address, bound.port)
    return Endpoint(host, bound.port)

"""The gateway host's own addresses, learned from rtnetlink and kept current.

Why: a client's flow to an address the host owns (the TUN's peer address, docker0, the LAN
address) would be dialed to the host itself and arrive on ``lo``, past firewall rules that
filter by interface. The gateway refuses such destinations (``LwipStack.set_host_addresses``);
this module tells it which they are, for the network namespace its sockets live in.

How: one ``AF_NETLINK`` socket subscribed to ``RTNLGRP_IPV4_IFADDR`` and ``RTNLGRP_IPV6_IFADDR``
first, then an ``RTM_GETADDR`` dump on a second socket, then the subscription's
``RTM_NEWADDR``/``RTM_DELADDR`` messages in order, so no change between the two is missed. If
the kernel drops notifications (``ENOBUFS``) the whole set is dumped again. Stdlib only.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator

import trio

from .endpoint import IPAddress
from .errors import HostAddressError

__all__ = ["HostAddress", "HostAddresses", "dump_addresses", "parse_messages"]

log = logging.getLogger("tunlwip.hostaddrs")

#: One address on one interface: (interface index, prefix length, address). The same address
#: may sit on several interfaces; it stays refused until the last one loses it.
HostAddress = tuple[int, int, IPAddress]

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
_NLMSG = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_RECV_SIZE = 1 << 16
#: A failed subscription socket is reopened after this many seconds.
RETRY_DELAY = 1.0


def _align(n: int) -> int:
    return (n + 3) & ~3


def _address(family: int, payload: bytes) -> IPAddress | None:
    """IFA_LOCAL is the host's own address on a point-to-point link (IFA_ADDRESS is then the
    peer's); elsewhere, and always for IPv6 without a peer, IFA_ADDRESS is."""
    attrs: dict[int, bytes] = {}
    at = _IFADDRMSG.size
    while at + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, at)
        if length < _RTATTR.size or at + length > len(payload):
            break
        attrs[kind] = payload[at + _RTATTR.size : at + length]
        at += _align(length)
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    size = 4 if family == socket.AF_INET else 16
    if raw is None or len(raw) != size:
        return None
    return ipaddress.ip_address(raw)


def parse_messages(data: bytes) -> Iterator[tuple[int, HostAddress | None]]:
    """(message type, address or None) for each netlink message in ``data``; NLMSG_ERROR
    raises the OSError it carries. Truncated or foreign messages are skipped, never fatal."""
    at = 0
    while at + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, at)
        if length < _NLMSG.size or at + length > len(data):
            return
        payload = data[at + _NLMSG.size : at + length]
        at += _align(length)
        if kind == NLMSG_ERROR and len(payload) >= 4:
            code = -struct.unpack_from("=i", payload)[0]
            if code:
                raise OSError(code, f"rtnetlink: {errno.errorcode.get(code, code)}")
            continue
        if kind in (RTM_NEWADDR, RTM_DELADDR) and len(payload) >= _IFADDRMSG.size:
            family, prefixlen, _ifa_flags, _scope, index = _IFADDRMSG.unpack_from(payload)
            if family in (socket.AF_INET, socket.AF_INET6):
                address = _address(family, payload)
                yield kind, None if address is None else (index, prefixlen, address)
                continue
        yield kind, None


def _netlink_socket(groups: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)  # fmt: skip
    try:
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def dump_addresses() -> set[HostAddress]:
    """Every address of every interface in this network namespace (RTM_GETADDR dump)."""
    with _netlink_socket() as sock:
        request = _NLMSG.pack(_NLMSG.size + _IFADDRMSG.size, RTM_GETADDR,
                              NLM_F_REQUEST | NLM_F_DUMP, 1, 0)  # fmt: skip
        sock.send(request + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        found: set[HostAddress] = set()
        while True:
            data = sock.recv(_RECV_SIZE)
            if not data:
                raise OSError(errno.EIO, "rtnetlink: address dump ended early")
            for kind, entry in parse_messages(data):
                if kind == NLMSG_DONE:
                    return found
                if kind == RTM_NEWADDR and entry is not None:
                    found.add(entry)


class HostAddresses:
    """Keeps ``on_change`` told of the set of addresses this network namespace owns."""

    def __init__(self, on_change: Callable[[frozenset[IPAddress]], object]) -> None:
        self._on_change = on_change
        self._entries: set[HostAddress] = set()
        self._pushed: frozenset[IPAddress] | None = None
        #: Full dumps made (1 at start; more after ENOBUFS or a reopened socket).
        self.dumps = 0

    @property
    def addresses(self) -> frozenset[IPAddress]:
        return frozenset(address for _, _, address in self._entries)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dump, report, ``started()``, then follow changes until cancelled. Cannot open or
        dump at start: HostAddressError (the gateway must not run without knowing). A later
        failure is logged and retried; the last known set stays in force meanwhile. On exit
        the set is reported empty, so a stopped gateway leaves nothing behind in the stack."""
        try:
            sock = self._subscribe()
        except OSError as exc:
            raise HostAddressError(f"cannot learn the host's own addresses (rtnetlink): "
                                   f"{exc.strerror or exc}") from exc  # fmt: skip
        try:
            task_status.started()
            while True:
                try:
                    await self._follow(sock)
                except OSError as exc:
                    sock.close()
                    log.error("host addresses: %s; reopening every %g s (the %d known stay "
                              "refused)", exc, RETRY_DELAY, len(self._entries))  # fmt: skip
                sock = await self._resubscribe()
        finally:
            sock.close()
            self._entries.clear()
            self._push()

    def _subscribe(self) -> socket.socket:
        sock = _netlink_socket(RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        try:
            sock.setblocking(False)
            self._redump()
        except BaseException:
            sock.close()
            raise
        return sock

    async def _resubscribe(self) -> socket.socket:
        while True:
            await trio.sleep(RETRY_DELAY)
            try:
                return self._subscribe()
            except OSError as exc:
                log.debug("host addresses: reopening failed: %s", exc)

    def _redump(self) -> None:
        self._entries = dump_addresses()
        self.dumps += 1
        self._push()

    async def _follow(self, sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                while data := sock.recv(_RECV_SIZE):
                    self.apply(parse_messages(data))
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                log.warning("host addresses: notifications lost (ENOBUFS); dumping again")
                self._redump()
            self._push()

    def apply(self, messages: Iterable[tuple[int, HostAddress | None]]) -> None:
        """Apply notifications in order (the set is reported by the caller)."""
        for kind, entry in messages:
            if entry is None:
                continue
            if kind == RTM_NEWADDR:
                self._entries.add(entry)
            elif kind == RTM_DELADDR:
                self._entries.discard(entry)

    def _push(self) -> None:
        current = self.addresses
        if current != self._pushed:
            self._pushed = current
            self._on_change(current)
            shown = sorted(current, key=lambda a: (a.version, a))[:32]
            log.debug("host addresses: %d refused: %s%s", len(current), " ".join(map(str, shown)),
                      " ..." if len(current) > len(shown) else "")  # fmt: skip

"""The protected socket factory: the only place the gateway creates sockets.

A protector runs on every new socket *before* connect(), so the gateway's own traffic never
loops back into the TUN (SO_MARK with a policy-routing rule, SO_BINDTODEVICE, or a callback such
as Android's VpnService.protect). If protection fails, the socket is closed and the dial fails:
there is never a fallback to an unprotected socket.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import weakref
from collections.abc import Callable

import trio

from .endpoint import Endpoint
from .errors import ProtectError

Protector = Callable[[socket.socket], None]

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
#: Linux's ranges for TCP_KEEPIDLE and TCP_KEEPINTVL (seconds), and for TCP_KEEPCNT; the
#: configuration's keepalive keys use them too.
KEEPALIVE_SECONDS = (1, 32767)
KEEPALIVE_PROBES = (1, 127)


@dataclasses.dataclass(frozen=True)
class Keepalive:
    """TCP keepalive timing, seconds: probe after ``idle`` quiet seconds, then every
    ``interval``; after ``count`` unanswered probes the connection is given up (reset).

    Why: a flow should end when one of its ends is really gone, not because it was quiet (an
    idle SSH session or database pool must live as it does on a direct route), and a dead end
    costs a gateway a socket and a PCB until something notices. Used for both halves: the
    kernel's keepalive on upstream sockets, lwIP's toward clients. The ranges are Linux's."""

    idle: int = 120
    interval: int = 15
    count: int = 4

    def __post_init__(self) -> None:
        low, high = KEEPALIVE_SECONDS
        if not (low <= self.idle <= high and low <= self.interval <= high):
            raise ValueError(f"keepalive idle and interval must be between {low} and {high} "
                             "seconds")  # fmt: skip
        if not KEEPALIVE_PROBES[0] <= self.count <= KEEPALIVE_PROBES[1]:
            low, high = KEEPALIVE_PROBES
            raise ValueError(f"keepalive count must be between {low} and {high}")

    @property
    def budget(self) -> int:
        """Seconds from an end's last packet until its connection is given up."""
        return self.idle + self.interval * self.count

    def apply(self, sock: socket.socket) -> None:
        """Turn keepalive on for ``sock`` with this timing (raises OSError)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, self.interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.count)


def no_protection(sock: socket.socket) -> None:
    """For gateways whose sockets cannot loop (e.g. the TUN lives in another namespace)."""


class _Fwmark:
    """Mark sockets so an ``ip rule ... not fwmark MARK`` keeps them out of the TUN."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.__doc__ = f"fwmark {mark:#x}"

    def __call__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)


class _BindInterface:
    """Bind sockets to the real uplink interface so they never route into the TUN."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"bind to {name}"

    def __call__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.name.encode())


def fwmark(mark: int) -> Protector:
    """Mark sockets so an ``ip rule ... not fwmark MARK`` keeps them out of the TUN."""
    return _Fwmark(mark)


def bind_interface(name: str) -> Protector:
    """Bind sockets to the real uplink interface so they never route into the TUN."""
    return _BindInterface(name)


def c_protection(protector: Protector) -> tuple[str, int | str] | None:
    """How C can apply ``protector`` itself: ("none", 0), ("fwmark", mark) or ("interface",
    name); None for a protector only Python can run (a callback)."""
    if protector is no_protection:
        return ("none", 0)
    if isinstance(protector, _Fwmark):
        return ("fwmark", protector.mark)
    if isinstance(protector, _BindInterface):
        return ("interface", protector.name)
    return None


def callback(fn: Callable[[int], bool]) -> Protector:
    """The VpnService.protect shape: ``fn(fd)`` returns True when the fd is protected."""

    def protect(sock: socket.socket) -> None:
        if fn(sock.fileno()) is not True:
            raise ProtectError("protect callback refused the socket")

    protect.__doc__ = "callback"
    return protect


def _flow_key(address: bytes, port: int, peer: Endpoint) -> bytes:
    return address + port.to_bytes(2, "big") + peer.address.packed + peer.port.to_bytes(2, "big")


def describe(protector: Protector) -> str:
    return "none" if protector is no_protection else (protector.__doc__ or "custom")


class Dialer:
    """Creates protected TCP and UDP sockets towards real destinations; TCP ones with
    ``keepalive``, so an upstream that vanished ends its flow (ETIMEDOUT) however quiet."""

    def __init__(self, protector: Protector = no_protection, connect_timeout: float = 30.0,
                 keepalive: Keepalive | None = None) -> None:  # fmt: skip
        self.protector = protector
        self.connect_timeout = connect_timeout
        #: Keepalive of TCP sockets created from now on (None: the kernel's default, off).
        self.keepalive = keepalive
        # (our address, peer) of every TCP/UDP socket handed out and still alive: what its
        # packets look like should they come back through the TUN (``is_own``). Packed into
        # bytes: one entry per flow, and Endpoint objects would double its size.
        self._own: weakref.WeakValueDictionary[bytes, socket.socket] = weakref.WeakValueDictionary()
        #: Also ours: sockets made elsewhere (C's dials), asked after our own.
        self.also_own: Callable[[Endpoint, Endpoint], bool] | None = None

    def with_protector(self, protector: Protector) -> Dialer:
        """A dialer like this one with another protector (a route's ``direct?fwmark=N``),
        whose sockets still count as ours for ``is_own`` (loop detection)."""
        other = Dialer(protector, self.connect_timeout, self.keepalive)
        other._own = self._own
        other.also_own = self.also_own
        return other

    def is_own(self, source: Endpoint, destination: Endpoint, *, also: bool = True) -> bool:
        """Is a packet from ``source`` to ``destination`` one of our own sockets' (so, arriving
        on the TUN, a routing loop: protection is not in effect)? ``also``: ask ``also_own``
        too (C screens held SYNs against its own sockets before Python sees them)."""
        if _flow_key(source.address.packed, source.port, destination) in self._own:
            return True
        return also and self.also_own is not None and self.also_own(source, destination)

    def _remember(self, sock: socket.socket, target: Endpoint) -> None:
        local = sock.getsockname()
        self._own[_flow_key(socket.inet_pton(sock.family, local[0]), local[1], target)] = sock

    def _protected_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A new non-blocking socket, protected; closed again if protection fails."""
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            self.protector(sock)
        except ProtectError:
            sock.close()
            raise
        except Exception as exc:
            sock.close()
            what = describe(self.protector)
            raise ProtectError(f"cannot protect socket ({what}): {exc}") from exc
        return sock

    async def open_tcp(self, target: Endpoint) -> trio.SocketStream:
        """Connect to ``target`` through a protected socket, within ``connect_timeout``.

        Raises ConnectionRefusedError, TimeoutError, other OSErrors (unreachable), or
        ProtectError.
        """
        sock = await self.connect_tcp(target)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    async def connect_tcp(self, target: Endpoint,
                          connect_timeout: float | None = None) -> socket.socket:  # fmt: skip
        """``open_tcp``'s connect, as a plain non-blocking socket (what the C relay takes),
        within ``connect_timeout`` (default: the dialer's); the same errors."""
        sock = self.start_tcp(target)
        try:
            limit = self.connect_timeout if connect_timeout is None else connect_timeout
            with trio.fail_after(limit):
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except trio.TooSlowError:
            sock.close()
            raise TimeoutError(errno.ETIMEDOUT, f"connect to {target} timed out") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def start_tcp(self, target: Endpoint) -> socket.socket:
        """A protected socket with a non-blocking connect to ``target`` under way: the caller
        waits for it to turn writable, then reads SO_ERROR (``tcp_forward``). Raises OSError
        (including ProtectError, or EMFILE when out of file descriptors) if it cannot start."""
        family = socket.AF_INET if target.family == 4 else socket.AF_INET6
        sock = self._protected_socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.keepalive is not None:
                self.keepalive.apply(sock)
            err = sock.connect_ex(target.sockaddr())
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            self._remember(sock, target)
        except BaseException:
            sock.close()
            raise
        return sock

    def open_udp(self, target: Endpoint) -> socket.socket:
        """A protected, non-blocking UDP socket connected to ``target``: it only receives from
        ``target``, and ICMP errors from it surface on ``recv`` (ECONNREFUSED for a closed
        port). Connecting a UDP socket only picks a route, so this does not wait."""
        family = socket.AF_INET if target.family == 4 else socket.AF_INET6
        sock = self._connected(self._protected_socket(family, socket.SOCK_DGRAM),
                               target.sockaddr())  # fmt: skip
        try:
            self._remember(sock, target)
        except BaseException:
            sock.close()
            raise
        return sock

    def open_icmp_echo(self, target: Endpoint) -> socket.socket:
        """A protected, non-blocking ICMP echo ("ping") socket connected to ``target.address``.

        Needs the gateway's group in sysctl ``net.ipv4.ping_group_range`` (PermissionError if
        not). The kernel owns the echo identifier: it replaces ours on send and filters replies.
        """
        if target.family == 4:
            family, proto = socket.AF_INET, socket.IPPROTO_ICMP
        else:
            family, proto = socket.AF_INET6, socket.IPPROTO_ICMPV6
        sock = self._protected_socket(family, socket.SOCK_DGRAM, proto)
        return self._connected(sock, (str(target.address), 0))

    @staticmethod
    def _connected(sock: socket.socket, address: tuple[str, int]) -> socket.socket:
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

"""ICMP echo forwarding: a client's ping reaches the real destination through ping sockets.

In "forward" mode the stack hands every echo request (to an address other than its own) to
``EchoForwarder.on_echo``. Each (client, destination, echo identifier) gets one unprivileged
ICMP datagram socket from the protected dialer, so no raw sockets or root are needed. The
kernel owns the identifier of such a socket: it rewrites ours on send and only delivers the
replies that match, so a reply is turned back into the client's identifier before the stack
sends it to the client from the destination's address. A session ends after ``idle_timeout``
seconds without an echo request.

Ping sockets need the gateway's group in ``net.ipv4.ping_group_range`` (per network namespace;
it covers IPv6 too). ``unavailable_reason`` tells the gateway whether to fall back to "reply".
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import struct
from typing import TYPE_CHECKING

import trio

from .dialer import Dialer
from .endpoint import Endpoint
from .errors import LwipError, TunlwipError
from .packet import ECHO_REPLY, ICMP_HEADER_LEN

if TYPE_CHECKING:
    from .stack import LwipStack

log = logging.getLogger("tunlwip.icmp")

_ECHO_ID = struct.Struct("!H")  # an echo's identifier, at offset 4 of the ICMP header
_ECHO_ID_OFFSET = 4
EchoKey = tuple[Endpoint, Endpoint, int]  # (client, destination, client's identifier)


def unavailable_reason() -> str | None:
    """Why ping sockets cannot be opened here (None when they can)."""
    for family, proto in ((socket.AF_INET, socket.IPPROTO_ICMP),
                          (socket.AF_INET6, socket.IPPROTO_ICMPV6)):  # fmt: skip
        try:
            socket.socket(family, socket.SOCK_DGRAM, proto).close()
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == errno.EAFNOSUPPORT:
                continue  # no IPv6 on this host: IPv4 forwarding still works
            return (f"cannot open an ICMP datagram socket ({exc.strerror}); "
                    "is the gateway's group in sysctl net.ipv4.ping_group_range?")  # fmt: skip
    return None


@dataclasses.dataclass
class EchoCounters:
    sessions: int = 0
    requests: int = 0
    replies: int = 0
    #: Requests dropped: too many sessions, socket errors, or the gateway stopping.
    dropped: int = 0


class _EchoSession:
    def __init__(self, key: EchoKey, idle_timeout: float) -> None:
        self.key = key
        self.pending: list[bytes] = []
        self.wakeup = trio.Event()
        self.scope = trio.CancelScope(deadline=trio.current_time() + idle_timeout)


class EchoForwarder:
    """Forward client echo requests with ping sockets and relay the replies."""

    def __init__(self, stack: LwipStack, dialer: Dialer, *, idle_timeout: float = 30.0,
                 max_sessions: int = 1024) -> None:  # fmt: skip
        self.stack = stack
        self.dialer = dialer
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.counters = EchoCounters()
        self._sessions: dict[EchoKey, _EchoSession] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the session tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def on_echo(self, client: Endpoint, target: Endpoint, message: bytes) -> None:
        """The stack's ``icmp_echo_receiver``: ``message`` is the client's echo request."""
        self.counters.requests += 1
        ident = _ECHO_ID.unpack_from(message, _ECHO_ID_OFFSET)[0]
        key = (client, target, ident)
        session = self._sessions.get(key)
        if session is None:
            if self._nursery is None or len(self._sessions) >= self.max_sessions:
                self.counters.dropped += 1
                return
            session = self._sessions[key] = _EchoSession(key, self.idle_timeout)
            self.counters.sessions += 1
            self._nursery.start_soon(self._run_session, session)
        session.scope.deadline = trio.current_time() + self.idle_timeout
        session.pending.append(message)
        session.wakeup.set()

    async def _run_session(self, session: _EchoSession) -> None:
        client, target, _ = session.key
        try:
            with session.scope:
                try:
                    sock = trio.socket.from_stdlib_socket(self.dialer.open_icmp_echo(target))
                except (OSError, TunlwipError) as exc:
                    log.debug("cannot ping %s for %s: %s", target.address, client.address, exc)
                    self.counters.dropped += len(session.pending)
                    return
                with sock:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._send_requests, session, sock)
                        await self._relay_replies(session, sock)
        finally:
            del self._sessions[session.key]

    async def _send_requests(self, session: _EchoSession, sock: trio.socket.SocketType) -> None:
        while True:
            await session.wakeup.wait()
            session.wakeup = trio.Event()
            batch, session.pending = session.pending, []
            for message in batch:
                try:
                    await sock.send(message)
                except OSError as exc:
                    self.counters.dropped += 1
                    log.debug("ping to %s failed: %s", session.key[1].address, exc)

    async def _relay_replies(self, session: _EchoSession, sock: trio.socket.SocketType) -> None:
        client, target, ident = session.key
        while True:
            try:
                reply = await sock.recv(65535)
            except OSError:
                continue  # an ICMP error about one request; later requests may still succeed
            if len(reply) < ICMP_HEADER_LEN or reply[0] != ECHO_REPLY[target.family]:
                continue
            end = _ECHO_ID_OFFSET + _ECHO_ID.size
            message = reply[:_ECHO_ID_OFFSET] + _ECHO_ID.pack(ident) + reply[end:]
            try:
                self.stack.send_icmp(message, Endpoint(target.address, 0), client)
            except LwipError as exc:
                log.debug("echo reply to %s dropped: %s", client.address, exc)
                continue
            self.counters.replies += 1

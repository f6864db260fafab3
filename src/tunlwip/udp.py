"""UDP sessions: every client flow (client addr:port -> destination addr:port) is a session.

Theory of operation
-------------------
lwIP hands each client datagram to ``UdpSessions.on_datagram`` (via the stack's
``udp_receiver``). The first datagram of a flow opens a ``UdpSession`` and starts the handler
(default: forward through a protected socket, see ``udp_forward``) in its own task;
later datagrams are queued to that session. ``UdpSession.send`` answers the client from the
original destination, whatever address that was.

UDP has no close, so sessions end by inactivity: traffic in *either* direction keeps one alive,
and a sweep every ``sweep_interval`` seconds cancels the ones idle for ``idle_timeout``. The
table is ordered by last activity (to within a millisecond, ``TOUCH_INTERVAL``), so both the
sweep and eviction (at ``max_sessions``, the least recently active session goes) only look at
its front. A session whose handler returns or
is cancelled is removed, and its handler's ``with`` blocks return its socket.

A session relayed in C (``udp_forward``, ``_csrc/udp_relay.c``) is not seen per datagram: its
activity and counts are pulled in batches (``sync``, given as ``sync_activity``) before each
sweep, before choosing a session to evict, and when statistics are read, so the table's order
and the idle timeouts hold for it too, to within the time since the last sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import trio

from .config.sections import UdpConfig as UdpConfig
from .endpoint import Endpoint, IPAddress
from .errors import LwipError
from .packet import HOST_UNREACHABLE, PORT_UNREACHABLE, udp_unreachable
from .shares import ClientKey, client_key

if TYPE_CHECKING:
    from .egress.routes import RouteDecision
    from .stack import LwipStack

log = logging.getLogger("tunlwip.udp")

DNS_PORT = 53
#: Seconds: the table's order by activity is kept to within this (idle timeouts are seconds).
TOUCH_INTERVAL = 0.001
SessionKey = tuple[Endpoint, Endpoint]  # (client, original destination)


@dataclasses.dataclass
class UdpCounters:
    """What happened to sessions and datagrams since the gateway started."""

    opened: int = 0
    expired: int = 0
    evicted: int = 0
    #: New flows refused: ``max_sessions`` open (ICMP unreachable sent), or turned away by the
    #: gateway's admission check (a routing loop).
    refused_full: int = 0
    refused_admission: int = 0
    #: New flows refused because their client holds its share of the sessions
    #: (``max_sessions_per_client``, ``when_full="refuse"``): ICMP unreachable, as at
    #: ``max_sessions``.
    refused_client_share: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0
    #: Client datagrams dropped: the session's queue was full, or the gateway is stopping.
    dropped_from_client: int = 0
    #: Datagrams towards the client that lwIP refused (too big, no memory).
    dropped_to_client: int = 0
    #: Client datagrams the upstream socket refused (buffer full, too big, unreachable).
    dropped_to_upstream: int = 0
    handler_errors: int = 0
    #: Client datagrams of sessions a ``reject`` route refused, each answered with ICMP port
    #: unreachable, and of sessions a ``drop`` route dropped, silently (``egress.udp_routes``).
    refused_by_route: int = 0
    dropped_by_route: int = 0
    #: Sessions through a SOCKS5 proxy that ended because the proxy closed the association.
    ended_by_proxy: int = 0


class UdpSession:
    """One UDP flow. ``receive`` yields the client's datagrams; ``send`` answers the client,
    appearing to come from ``target`` (the address and port the client sent to)."""

    __slots__ = ("_cancel_scope", "_channel", "_client_key", "_diverted", "_moved", "_on_end",
                 "_owner", "_refresh", "bytes_in", "bytes_out", "client", "datagrams_in",
                 "datagrams_out", "end_reason", "idle_timeout", "last_activity", "route",
                 "target")  # fmt: skip

    def __init__(self, owner: UdpSessions, client: Endpoint, target: Endpoint,
                 idle_timeout: float) -> None:  # fmt: skip
        self.client = client
        self._client_key = client_key(client.address)  # its share's key (per datagram: kept)
        self.target = target
        self.idle_timeout = idle_timeout
        self.last_activity = self._moved = trio.current_time()
        self.datagrams_in = self.datagrams_out = self.bytes_in = self.bytes_out = 0
        #: Why the session ended: "closed" (handler returned), "idle", "evicted", "error".
        self.end_reason = ""
        #: The route the forwarder decided for it (``egress.routes.RouteDecision``), if any.
        self.route: RouteDecision | None = None
        self._owner = owner
        # Created on first use: a session relayed without a task (``attach``) needs neither.
        self._channel: tuple[trio.MemorySendChannel[bytes],
                             trio.MemoryReceiveChannel[bytes]] | None = None  # fmt: skip
        self._cancel_scope: trio.CancelScope | None = None
        self._diverted: Callable[[bytes], None] | None = None
        #: Called with the reason when a task-less (attached) session ends.
        self._on_end: Callable[[str], None] | None = None
        #: Brings the counts up to date, for a session whose datagrams Python does not see.
        self._refresh: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<UdpSession {self.client} -> {self.target}>"

    @property
    def counters(self) -> UdpCounters:
        """The gateway-wide UDP counters (for handlers that drop datagrams themselves)."""
        return self._owner.counters

    def byte_counts(self) -> tuple[int, int]:
        """(bytes from the client, bytes to the client) now (a flow record's counts)."""
        if self._refresh is not None:
            self._refresh()
        return self.bytes_in, self.bytes_out

    @property
    def key(self) -> SessionKey:
        return (self.client, self.target)

    @property
    def _queue(self) -> tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]:
        if self._channel is None:
            self._channel = trio.open_memory_channel[bytes](self._owner.config.queue_datagrams)
            if self.end_reason:
                self._channel[0].close()
        return self._channel

    async def receive(self) -> bytes:
        """The next datagram from the client. Raises ``trio.EndOfChannel`` once closed."""
        return await self._queue[1].receive()

    async def send(self, data: bytes) -> None:
        """Send ``data`` to the client from ``target``. Too big or no memory: dropped, counted
        (UDP semantics), logged at debug level."""
        self.send_nowait(data)
        await trio.lowlevel.checkpoint()

    def send_nowait(self, data: bytes) -> None:
        """``send`` without yielding to other tasks (for relays draining a socket in bursts)."""
        self._touch()
        self.datagrams_out += 1
        self.bytes_out += len(data)
        self._owner._send_to_client(self, data)

    def burst(self) -> contextlib.AbstractContextManager[None]:
        """Around several ``send_nowait`` calls: the datagrams may reach the client in one
        write (``LwipStack.output_burst``)."""
        return self._owner.stack.output_burst()

    def divert(self, deliver: Callable[[bytes], None]) -> None:
        """From now on hand each client datagram to ``deliver`` at once, from the stack's
        callback, instead of queueing it for ``receive``: the fast path of the default
        forwarder (no task switch per datagram). Datagrams already queued go first."""
        while self._channel is not None:
            try:
                deliver(self._channel[1].receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._diverted = deliver

    def start_soon(self, async_fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``async_fn`` in a task of the session table: how a task-less session prepares
        its way out (a proxy's association) without holding a task for its whole life. The
        task is the caller's to cancel when the session ends."""
        nursery = self._owner._nursery
        if nursery is None:
            raise RuntimeError("UDP sessions are not running")
        nursery.start_soon(async_fn)

    def send_unreachable(self, why: Literal["port", "host"], datagram: bytes = b"") -> None:
        """Tell the client (ICMP destination unreachable, from ``target``) that ``datagram``
        could not be delivered, so its connected socket fails as on a direct path."""
        kind = PORT_UNREACHABLE if why == "port" else HOST_UNREACHABLE
        message = udp_unreachable(self.client.address.packed, self.target.address.packed,
                                  self.client.port, self.target.port, datagram, kind)  # fmt: skip
        try:
            self._owner.stack.send_icmp(message, Endpoint(self.target.address, 0),
                                        Endpoint(self.client.address, 0))  # fmt: skip
        except LwipError as exc:
            self._owner.counters.dropped_to_client += 1
            log.debug("ICMP %s -> %s dropped: %s", self.target, self.client, exc)

    def close(self, reason: str = "closed") -> None:
        """End the session: the handler is cancelled and ``receive`` stops."""
        if not self.end_reason:
            self.end_reason = reason
        self._owner._table.remove(self)  # the flow's next datagram opens a fresh session
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        on_end, self._on_end = self._on_end, None
        if on_end is not None:  # a task-less session ends here
            self._owner._ended(self)
            on_end(self.end_reason)

    # -- used by UdpSessions ---------------------------------------------------------------------
    def _touch(self) -> None:
        now = self.last_activity = trio.current_time()
        # Its place in the table (by activity) moves at most every TOUCH_INTERVAL: for a busy
        # session (a DNS client's), the moves cost more than the datagrams' other bookkeeping.
        if now - self._moved >= TOUCH_INTERVAL:
            self._moved = now
            self._owner._table.touch(self)

    def _active_at(self, when: float) -> None:
        """Activity seen elsewhere (a C relay) at ``when``: most recent in the table."""
        self.last_activity = max(self.last_activity, when)
        self._owner._table.touch(self)

    def _deliver(self, data: bytes) -> bool:
        self._touch()
        self.datagrams_in += 1
        self.bytes_in += len(data)
        if self._diverted is not None:
            self._diverted(data)
            return True
        try:
            self._queue[0].send_nowait(data)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


class SessionTable:
    """Sessions ordered by last activity (least recent first), overall and per client
    (``shares.client_key``), both kept by add, remove and touch, so a client's count follows
    the table whatever ends a session. Pure bookkeeping, no I/O."""

    def __init__(self) -> None:
        self._sessions: OrderedDict[SessionKey, UdpSession] = OrderedDict()
        self._by_client: dict[ClientKey, OrderedDict[SessionKey, UdpSession]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: SessionKey) -> UdpSession | None:
        return self._sessions.get(key)

    def add(self, session: UdpSession) -> None:
        old = self._sessions.get(session.key)
        if old is not None:
            self.remove(old)
        self._sessions[session.key] = session
        mine = self._by_client.setdefault(session._client_key, OrderedDict())
        mine[session.key] = session

    def remove(self, session: UdpSession) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
            owner = session._client_key
            mine = self._by_client[owner]
            del mine[session.key]
            if not mine:
                del self._by_client[owner]

    def touch(self, session: UdpSession) -> None:
        key = session.key
        if self._sessions.get(key) is session:
            self._sessions.move_to_end(key)
            self._by_client[session._client_key].move_to_end(key)

    def client_count(self, address: IPAddress) -> int:
        """Sessions of ``address``'s client (its IPv4 address or IPv6 /64)."""
        mine = self._by_client.get(client_key(address))
        return len(mine) if mine is not None else 0

    def clients(self) -> int:
        """Clients with at least one session."""
        return len(self._by_client)

    def least_recent_of(self, address: IPAddress) -> UdpSession | None:
        """The least recently active session of ``address``'s client."""
        mine = self._by_client.get(client_key(address))
        return next(iter(mine.values()), None) if mine else None

    def all(self) -> list[UdpSession]:
        return list(self._sessions.values())

    def least_recent(self) -> UdpSession | None:
        return next(iter(self._sessions.values()), None)

    def idle(self, now: float, shortest_timeout: float) -> list[UdpSession]:
        """Sessions idle past their own timeout. The walk stops at the first session active
        within ``shortest_timeout``: every later one was active even more recently."""
        found = []
        for session in self._sessions.values():
            quiet = now - session.last_activity
            if quiet < shortest_timeout:
                break
            if quiet >= session.idle_timeout:
                found.append(session)
        return found


UdpHandler = Callable[[UdpSession], Awaitable[None]]
#: Takes a new session over without a task, or leaves it to the handler (None). An attacher
#: that takes it diverts the session's datagrams and returns what to call with the reason
#: when the session ends (see ``UdpSessions``).
UdpAttacher = Callable[[UdpSession], Callable[[str], None] | None]
#: Decides on a new flow (client, target): True opens a session, False drops the datagram,
#: "reject" answers it with ICMP port unreachable, as a closed port would.
UdpAdmission = Callable[[Endpoint, Endpoint], bool | Literal["reject"]]


class UdpSessions:
    """The gateway's UDP side: the session table, one task per session, and the sweep."""

    def __init__(self, stack: LwipStack, handler: UdpHandler, config: UdpConfig | None = None,
                 *, attach: UdpAttacher | None = None,
                 admit: UdpAdmission | None = None,
                 sync_activity: Callable[[UdpCounters], None] | None = None,
                 ) -> None:  # fmt: skip
        self.stack = stack
        self.handler = handler
        self.attach = attach
        self.admit = admit
        self._sync_activity = sync_activity
        self.config = config or UdpConfig()
        self.counters = UdpCounters()
        self._table = SessionTable()
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self._table)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the session tasks and sweep idle sessions until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.config.sweep_interval)
                    self.sweep()
            finally:
                self._nursery = None
                for session in self._table.all():
                    if session._on_end is not None:
                        session.close("stopped")

    def sync(self) -> None:
        """Bring in what happened in sessions relayed in C (activity, counts)."""
        if self._sync_activity is not None:
            self._sync_activity(self.counters)

    def sweep(self) -> int:
        """Close every session idle past its timeout; returns how many."""
        self.sync()
        shortest = min(self.config.idle_timeout, self.config.dns_idle_timeout)
        idle = self._table.idle(trio.current_time(), shortest)
        for session in idle:
            self.counters.expired += 1
            session.close("idle")
        return len(idle)

    def _refuse(self, client: Endpoint, target: Endpoint, data: bytes) -> None:
        """ICMP port unreachable for a flow refused at ``max_sessions``, at its client's share
        or by ``admit``: the client's socket fails at once (ECONNREFUSED) instead of waiting.
        Sent once lwIP returns: this runs in its UDP callback, which must not send."""
        message = udp_unreachable(client.address.packed, target.address.packed, client.port,
                                  target.port, data, PORT_UNREACHABLE)  # fmt: skip

        def send() -> None:
            try:
                self.stack.send_icmp(message, Endpoint(target.address, 0),
                                     Endpoint(client.address, 0))  # fmt: skip
            except LwipError:
                self.counters.dropped_to_client += 1

        self.stack.call_after_lwip(send)

    # -- from the stack ---------------------------------------------------------------------------
    def on_datagram(self, client: Endpoint, target: Endpoint, data: bytes) -> None:
        """The stack's ``udp_receiver``: deliver to the flow's session, opening it if new."""
        self.counters.datagrams_in += 1
        session = self._table.get((client, target))
        if session is None:
            session = self._open(client, target, data)
            if session is None:
                self.counters.dropped_from_client += 1
                return
        if not session._deliver(data):
            self.counters.dropped_from_client += 1

    def _open(self, client: Endpoint, target: Endpoint, data: bytes) -> UdpSession | None:
        if self._nursery is None:
            return None
        verdict = self.admit(client, target) if self.admit is not None else True
        if verdict is not True:
            self.counters.refused_admission += 1
            if verdict == "reject":
                self._refuse(client, target, data)
            return None
        evict = self.config.when_full == "evict"
        full = len(self._table) >= self.config.max_sessions
        if full and not evict:
            self.counters.refused_full += 1
            self._refuse(client, target, data)
            return None
        # The client's share, once the table had room (a full table is reported as such).
        # A client at its share is refused, or with "evict" replaces its own least recently
        # active session: never another client's.
        victim = None
        if full or self._table.client_count(client.address) >= self.config.session_share:
            self.sync()  # the least recently active, counting activity seen in C
        if self._table.client_count(client.address) >= self.config.session_share:
            if not evict:
                self.counters.refused_client_share += 1
                self._refuse(client, target, data)
                return None
            victim = self._table.least_recent_of(client.address)
        elif full:
            victim = self._table.least_recent()
        if victim is not None:
            self.counters.evicted += 1
            victim.close("evicted")
        timeout = self.config.idle_timeout
        if target.port == DNS_PORT:
            timeout = min(timeout, self.config.dns_idle_timeout)
        session = UdpSession(self, client, target, timeout)
        self._table.add(session)
        self.counters.opened += 1
        if self.attach is not None and callable(on_end := self.attach(session)):
            session._on_end = on_end
            return session
        session._cancel_scope = trio.CancelScope()
        self._nursery.start_soon(self._run_session, session)
        return session

    def _ended(self, session: UdpSession) -> None:
        """A task-less session ended (its attacher closes its socket)."""
        if session._channel is not None:
            session._channel[0].close()
        log.debug("UDP session %s -> %s ended (%s): %d datagrams in, %d out",
                  session.client, session.target, session.end_reason,
                  session.datagrams_in, session.datagrams_out)  # fmt: skip

    async def _run_session(self, session: UdpSession) -> None:
        assert session._cancel_scope is not None
        try:
            with session._cancel_scope:
                await self.handler(session)
        except Exception:
            self.counters.handler_errors += 1
            session.end_reason = session.end_reason or "error"
            log.exception("UDP handler failed for %s -> %s", session.client, session.target)
        finally:
            session.end_reason = session.end_reason or "closed"
            self._table.remove(session)
            if session._channel is not None:
                session._channel[0].close()
                session._channel[1].close()
            log.debug("UDP session %s -> %s ended (%s): %d datagrams in, %d out",
                      session.client, session.target, session.end_reason,
                      session.datagrams_in, session.datagrams_out)  # fmt: skip

    def _send_to_client(self, session: UdpSession, data: bytes) -> None:
        try:
            self.stack.send_udp(data, src=session.target, dst=session.client)
        except LwipError as exc:
            self.counters.dropped_to_client += 1
            log.debug("datagram %s -> %s dropped: %s", session.target, session.client, exc)
        else:
            self.counters.datagrams_out += 1

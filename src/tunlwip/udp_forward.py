"""The gateway's UDP side: each session to the DNS proxy, a custom handler, or an upstream socket.

Theory of operation
-------------------
``UdpSessions`` (``udp``) turns client datagrams into sessions and asks three things of this
module: may a new session start (``admit``: routing loops and rejected DNS over QUIC are turned
away), can it be forwarded without a task (``attach``), and, if not, which task handles it
(``dispatch``).

The default forwarder needs no task: ``attach`` opens a connected, protected UDP socket and
hands it with the session's endpoints to a C relay (``binding.udp_relay``, ``_csrc/udp_relay.c``),
which from then on moves the session's datagrams both ways without Python, batched (sendmmsg,
recvmmsg), mirrors a port unreachable from upstream as ICMP, and counts; ``sync`` brings its
activity and counts into the session table in batches (idle timeouts, eviction, statistics).
Only the session's first datagram, which opened it, goes upstream from Python. Should the C
relay refuse the socket, the stack's poll set watches it instead and a ``DatagramRelay`` copies
datagrams both ways from callbacks (client datagrams are diverted to it before they are
queued). DNS sessions go to the running DNS proxy, which answers their datagrams from
callbacks too (``DnsProxy.attach_udp``). Sessions of a custom ``udp_handler``, and sessions
whose socket could not be opened at once, get a task (``dispatch``), which retries the socket
and relays with ``relay_datagrams``, or answers ICMP host unreachable. A port-unreachable
from upstream is mirrored to the client as ICMP, so the client's connected socket fails as
it would on a direct path.

Routes (``egress.routes``): ``attach`` decides each new session's route once (DNS sessions to
the proxy and a custom handler's sessions are not routed). ``direct`` is the path above, with
the route's own dialer for ``direct?fwmark=N`` / ``?interface=IF``; ``reject``, ``drop`` and
SOCKS5 proxies are ``egress.udp_routes``'s (a proxied session is handed to the same C relay,
which adds and strips the SOCKS5 UDP header).

Every session gets a flow record (``FlowTable.track``) carrying its route, closed with the
session's end reason.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import trio

from .admission import FD_SHORTAGE, Admission
from .binding import udp_relay as cudp
from .dialer import Dialer
from .egress.routes import RouteDecision, RouteTable
from .egress.via import Direct
from .endpoint import Endpoint
from .errors import TunlwipError
from .flows import FlowTable, LiveFlow
from .udp import UdpAttacher, UdpCounters, UdpHandler, UdpSession

if TYPE_CHECKING:
    from .dns.proxy import DnsProxy
    from .egress.udp_routes import UdpRouting
    from .stack import LwipStack

MAX_DATAGRAM = 65535
UDP_BURST = 64  # replies relayed before other tasks get a turn
# The loggers these messages had before they moved here (operators filter on them).
log = logging.getLogger("tunlwip.gateway")
relay_log = logging.getLogger("tunlwip.forward")


class DatagramRelay:
    """Copies datagrams between ``session`` and a connected, non-blocking ``upstream`` socket:
    ``to_upstream`` for each client datagram (the session's ``divert`` target: no task switch),
    ``drain`` whenever the socket is readable (a burst of replies to the client). Errors drop
    the datagram (UDP semantics), counted. A port-unreachable from upstream is mirrored to the
    client as ICMP."""

    __slots__ = ("_last_sent", "session", "upstream")

    def __init__(self, session: UdpSession, upstream: socket.socket) -> None:
        self.session = session
        self.upstream = upstream
        self._last_sent = b""

    def to_upstream(self, data: bytes) -> None:
        try:
            self.upstream.send(data)
            self._last_sent = data
        except OSError as exc:  # buffer full (BlockingIOError), too big, unreachable
            self.session.counters.dropped_to_upstream += 1
            relay_log.debug("UDP %s -> %s: datagram dropped: %s", self.session.client,
                            self.session.target, exc)  # fmt: skip

    def drain(self) -> None:
        with self.session.burst():  # a burst of same-size datagrams: one write (USO)
            self._drain()

    def _drain(self) -> None:
        session = self.session
        for _ in range(UDP_BURST):
            try:
                data = self.upstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # the destination said "port unreachable"
                session.send_unreachable("port", self._last_sent)
                continue
            except OSError as exc:
                relay_log.debug("UDP %s <- %s: receive error: %s", session.client,
                                session.target, exc)  # fmt: skip
                continue
            session.send_nowait(data)


async def relay_datagrams(session: UdpSession, upstream: socket.socket) -> None:
    """Relay between ``session`` and the connected, non-blocking ``upstream`` socket until the
    session is closed (a task per session; the gateway's default path has none, see
    ``UdpForwarder.attach``)."""
    relay = DatagramRelay(session, upstream)
    session.divert(relay.to_upstream)
    while True:
        await trio.lowlevel.wait_readable(upstream)
        relay.drain()


#: A flow record's close reason for a session's end reason, where the two differ.
_CLOSE_REASONS = {"idle": "idle timeout"}


class CRelayedSession:
    """A session relayed in C: its handle, socket and flow record, and the C counts already
    added to the session's (so each sync adds only what is new)."""

    __slots__ = ("closer", "flow", "handle", "seen", "session", "upstream")

    def __init__(self, session: UdpSession, upstream: socket.socket, handle: cudp.UdpRelayHandle,
                 flow: LiveFlow, closer: Callable[[], None]) -> None:  # fmt: skip
        self.session = session
        self.upstream = upstream
        self.handle = handle
        self.flow = flow
        #: Closes the session's way out once C let go of it (the socket; an association).
        self.closer = closer
        self.seen = cudp.UdpRelayCounts(0, 0, 0, 0, 0, 0)

    def absorb(self, now: cudp.UdpRelayCounts) -> tuple[int, int]:
        """Add C's counts since the last call to the session's; returns the new datagrams
        (from the client, to the client)."""
        session, seen = self.session, self.seen
        new_in = now.datagrams_up - seen.datagrams_up
        new_out = now.datagrams_down - seen.datagrams_down
        session.datagrams_in += new_in
        session.datagrams_out += new_out
        session.bytes_in += now.bytes_up - seen.bytes_up
        session.bytes_out += now.bytes_down - seen.bytes_down
        self.seen = now
        return new_in, new_out

    def refresh(self) -> None:
        """The session's counts, now (a flow record asks)."""
        now = cudp.info(self.handle)
        if now is not None:
            self.absorb(now)


class UdpForwarder:
    """The handlers ``UdpSessions`` calls: ``admit``, ``attach`` (with a custom handler, only
    DNS sessions: every other session then gets a task) and ``dispatch``."""

    def __init__(
        self,
        stack: LwipStack,
        dialer: Dialer,
        flows: FlowTable,
        admission: Admission,
        *,
        dns: DnsProxy | None,
        is_dns: Callable[[Endpoint], bool],
        routes: RouteTable | None = None,
        handler: UdpHandler | None = None,
    ) -> None:
        self._stack = stack
        #: The route table new flows are decided by (the gateway swaps it on reconfigure).
        self.routes = routes if routes is not None else RouteTable()
        self._dialer = dialer
        self._flows = flows
        self._admission = admission
        self._dns = dns
        self._is_dns = is_dns
        self._handler = handler or self.forward
        self.attach: UdpAttacher = self._attach_dns if handler else self._attach
        self._in_c: dict[int, CRelayedSession] = {}
        self._next_token = 1
        self._c_drops = (0, 0)  # C's drop counters already added (upstream, to client)

    @functools.cached_property
    def _routing(self) -> UdpRouting:
        """Sessions whose route is not plain ``direct`` (``egress.udp_routes``): made, and its
        module and the proxy clients imported, for the first such session only, so a gateway
        without such routes does not keep them in memory."""
        from .egress.udp_routes import UdpRouting

        return UdpRouting(self._stack, self._dialer, self._flows, self._admission,
                          self._relay_in_c)  # fmt: skip

    def admit(self, client: Endpoint, target: Endpoint) -> bool | Literal["reject"]:
        """A new UDP flow that is one of our own sockets coming back (an upstream's, the DNS
        proxy's) is a loop; DNS over QUIC with ``dns.reject_encrypted`` is rejected."""
        verdict = self._admission.screen("UDP", client, target)
        if verdict == "loop":
            return False
        return "reject" if verdict == "encrypted_dns" else True

    async def dispatch(self, session: UdpSession) -> None:
        """A session's task: the DNS proxy's, the custom handler's, or ``forward``."""
        flow = self._flows.track(session, session.target)
        flow.route = session.route.name if session.route is not None else None
        outcome = "closed"
        try:
            if self._dns is not None and self._is_dns(session.target):
                await self._dns.serve_udp(session)
            else:
                await self._handler(session)
        except trio.Cancelled:
            outcome = "stopped"  # unless the session says why (idle, evicted) below
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            reason = session.end_reason
            self._flows.close(flow, _CLOSE_REASONS.get(reason, reason) if reason else outcome)

    def _attach(self, session: UdpSession) -> Callable[[str], None] | None:
        """The default UDP forwarder without a task: a protected socket watched by the relay
        poll task, datagrams copied by callbacks both ways (``DatagramRelay``); returns what
        ends it. DNS sessions, and sessions whose socket cannot be opened, go to the task path
        instead (None). The session's route is decided here, once."""
        if self._is_dns(session.target):
            return self._attach_dns(session)
        routes = self.routes
        client, target = session.client, session.target
        name = None
        if routes.uses_names and self._dns is not None:
            name = self._dns.name_for(client, target)
        decision = session.route = routes.decide("udp", client, target, name)
        via = decision.via
        if not isinstance(via, Direct):
            return self._routing.attach(session, decision, name)
        try:
            upstream = self._dialer_of(decision).open_udp(target)
        except (OSError, TunlwipError):
            return None  # forward tries again and answers "unreachable"
        relay = DatagramRelay(session, upstream)
        in_c = self._relay_in_c(session, upstream)
        if in_c is not None:
            session.divert(relay.to_upstream)  # the first datagram (later ones: C)
            return in_c
        try:
            token = self._stack.watch_readable(upstream.fileno(), relay.drain)
        except OSError:
            upstream.close()
            return None
        flow = self._flows.track(session, target)
        flow.route = decision.name
        session.divert(relay.to_upstream)
        # A partial, not a closure: one small object per idle session rather than a function
        # and four cells (thousands of sessions stay open for their idle timeout).
        return functools.partial(self._end_attached, upstream, token, flow)

    def _attach_dns(self, session: UdpSession) -> Callable[[str], None] | None:
        """A DNS session without a task: the running proxy answers its datagrams from
        callbacks (``DnsProxy.attach_udp``). Else (None) it gets a task (``dispatch``)."""
        if self._dns is None or not self._is_dns(session.target):
            return None
        if not self._dns.attach_udp(session):
            return None
        return functools.partial(self._end_dns, self._flows.track(session, session.target))

    def _end_dns(self, flow: LiveFlow, reason: str) -> None:
        self._flows.close(flow, _CLOSE_REASONS.get(reason, reason))

    def _dialer_of(self, decision: RouteDecision) -> Dialer:
        """The dialer of a direct route: the gateway's, or the route's fwmark or interface."""
        via = decision.via
        assert isinstance(via, Direct)
        if via.fwmark is None and via.interface is None:
            return self._dialer
        return self._routing.dialer(via)

    def _relay_in_c(self, session: UdpSession, upstream: socket.socket,
                    flow: LiveFlow | None = None, *,
                    closer: Callable[[], None] | None = None,
                    socks5_header: bytes | None = None,
                    any_address: bool = False) -> Callable[[str], None] | None:  # fmt: skip
        """Hand the session to a C relay (through a SOCKS5 relay: with the target's UDP
        header, ``any_address`` when it went by name); returns what ends it, or None if C
        refused it. ``flow``: the session's record (default: opened now). ``closer`` closes
        the way out when the session ends (default: the socket)."""
        token = self._next_token
        try:
            handle = cudp.open_relay(session.client, session.target, upstream.fileno(), token)
        except OSError as exc:
            relay_log.debug("UDP %s -> %s: relayed from Python: %s", session.client,
                            session.target, exc)  # fmt: skip
            return None
        if socks5_header is not None:
            try:
                cudp.set_socks5(handle, socks5_header, any_address=any_address)
            except OSError as exc:
                cudp.close(handle)
                relay_log.debug("UDP %s -> %s: SOCKS5 header refused: %s", session.client,
                                session.target, exc)  # fmt: skip
                return None
        self._next_token += 1
        if flow is None:
            flow = self._flows.track(session, session.target)
            flow.route = session.route.name if session.route is not None else None
        record = CRelayedSession(session, upstream, handle, flow, closer or upstream.close)
        self._in_c[token] = record
        session._refresh = record.refresh
        return functools.partial(self._end_in_c, token)

    def _end_in_c(self, token: int, reason: str) -> None:
        """A session relayed in C ended: close it in C (final counts), its socket, its record."""
        record = self._in_c.pop(token)
        record.session._refresh = None
        final = cudp.close(record.handle)  # its queued datagrams leave first
        if final is not None:
            _add(record.session.counters, record.absorb(final))
        # No after_lwip here: this may run inside lwIP's UDP callback (a new session evicting
        # this one), which must not re-enter lwIP; output it caused wakes the writer itself.
        record.closer()
        self._flows.close(record.flow, _CLOSE_REASONS.get(reason, reason))

    def sync(self, counters: UdpCounters) -> None:
        """Bring in what the C relays did since the last call: each active session's counts
        (and the gateway's, ``counters``), and its last activity into the session table (in
        order of activity)."""
        now = trio.current_time()
        for counts in reversed(cudp.touched()):  # least recently active first
            record = self._in_c.get(counts.token)
            if record is not None:
                _add(counters, record.absorb(counts))
                record.session._active_at(now - counts.idle_ms / 1000)
        c = cudp.counters()
        upstream = c["udp_relay_upstream_full"] + c["udp_relay_upstream_errors"]
        to_client = c["udp_relay_to_client_dropped"]
        seen_up, seen_client = self._c_drops
        if upstream < seen_up or to_client < seen_client:  # the stack restarted
            seen_up = seen_client = 0
        counters.dropped_to_upstream += upstream - seen_up
        counters.dropped_to_client += to_client - seen_client
        self._c_drops = (upstream, to_client)

    def _end_attached(self, upstream: socket.socket, token: int, flow: LiveFlow,
                      reason: str) -> None:  # fmt: skip
        """A task-less session ended: stop watching and close its socket, close its record."""
        self._stack.unwatch(upstream.fileno(), token)
        upstream.close()
        self._flows.close(flow, _CLOSE_REASONS.get(reason, reason))

    async def forward(self, session: UdpSession) -> None:
        """The default forwarder with a task (when ``attach`` could not open the socket)."""
        dialer = self._dialer if session.route is None else self._dialer_of(session.route)
        try:
            upstream = dialer.open_udp(session.target)
        except (OSError, TunlwipError) as exc:
            log.debug("UDP %s -> %s: cannot open upstream: %s", session.client, session.target,
                      exc)  # fmt: skip
            if isinstance(exc, OSError) and exc.errno in FD_SHORTAGE:
                self._admission.fd_shortage(exc)
            session.send_unreachable("host")
            return
        with upstream:
            await relay_datagrams(session, upstream)


def _add(counters: UdpCounters, new: tuple[int, int]) -> None:
    """Datagrams a C relay moved (from the client, to the client) into the gateway's counts."""
    counters.datagrams_in += new[0]
    counters.datagrams_out += new[1]

"""Routes applied to UDP sessions: what a new session does when its route is not plain
``direct`` (``UdpForwarder.attach`` asks ``UdpRouting.attach``).

Theory of operation
-------------------
The forwarder decides each new session's route once, when the session is opened (the first
datagram of the flow), and keeps ``direct`` on its own path (a protected socket and the C
relay; ``direct?fwmark=N`` / ``?interface=IF`` only change the dialer: ``dialer_for``, cached
here per route). Everything else is a task-less session whose datagrams are diverted:

* ``reject``: a flow record ("rejected by route") at once; every datagram of the session is
  answered with ICMP port unreachable (counted: ``UdpCounters.refused_by_route``), so the
  client's connected socket fails with ECONNREFUSED as at a closed port.
* ``drop``: a flow record ("dropped by route") at once; every datagram is dropped silently
  (``UdpCounters.dropped_by_route``). Repeated datagrams of the flow meet the same session, so
  the route is decided and recorded once per session, not per datagram; the session lives in
  the ordinary session table, so its memory is bounded as every session's is (``max_sessions``,
  the client's share, eviction) and it ends after ``idle_timeout`` without datagrams, when the
  flow, if it comes back, is decided and recorded again.
* ``socks5://``: one UDP ASSOCIATE per session (``ProxiedSession``). While the association
  opens (a task, ``proxy_dial.open_udp_via``, bounded by its handshake timeout) the client's
  datagrams wait in a queue of ``PENDING_DATAGRAMS``; more are dropped and counted
  (``dropped_from_client``). Once open, the queued datagrams go through the association and
  the session is handed to the C UDP relay with the target's SOCKS5 UDP header
  (``_csrc/socks5_udp.c``: prepended on send, checked and stripped on receive, bad replies
  dropped and counted by C), so no Python runs per datagram; the task ends. The control
  connection sits in the poll set: when the proxy closes it, the session ends ("proxy closed
  association", ``UdpCounters.ended_by_proxy``); when the session ends (idle, evicted, stopped)
  the association's sockets are closed, which ends it at the proxy. A failed association
  (proxy down, refused, a bad answer, the handshake timeout) answers ICMP host unreachable,
  counts the route's ``proxy_failures``, closes the flow record with the ``ProxyError``'s
  reason and ends the session: the flow's next datagram tries again.

An HTTP proxy carries TCP only (``check-config`` keeps UDP off such routes): should one decide
a UDP session anyway, ``open_udp_via`` fails it like a proxy that is down.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from ..admission import FD_SHORTAGE, Admission
from ..dialer import Dialer
from ..errors import ProxyError, TunlwipError
from ..flows import FlowTable, LiveFlow
from ..udp import UdpSession
from . import socks5
from .custom import CustomVia
from .direct import dialer_for
from .proxy_dial import open_udp_via
from .routes import RouteDecision
from .socks5_client import UdpAssociation
from .via import Direct, Drop, Reject, Via

if TYPE_CHECKING:
    from ..stack import LwipStack

__all__ = ["PENDING_DATAGRAMS", "ProxiedSession", "UdpRouting"]

log = logging.getLogger("tunlwip.forward")

#: Client datagrams a proxied session keeps while its association opens (more are dropped).
PENDING_DATAGRAMS = 64


class HandToC(Protocol):
    """The forwarder's C relay handover (``UdpForwarder._relay_in_c``)."""

    def __call__(self, session: UdpSession, upstream: socket.socket, flow: LiveFlow, *,
                 closer: Callable[[], None] | None = None,
                 socks5_header: bytes | None = None,
                 any_address: bool = False) -> Callable[[str], None] | None: ...  # fmt: skip


class UdpRouting:
    """How a UDP session leaves when its route is not plain ``direct`` (module docstring)."""

    def __init__(self, stack: LwipStack, dialer: Dialer, flows: FlowTable, admission: Admission,
                 hand_to_c: HandToC) -> None:  # fmt: skip
        self._stack = stack
        self._dialer = dialer
        self._flows = flows
        self._admission = admission
        self._hand_to_c = hand_to_c
        self._dialers: dict[Direct, Dialer] = {}

    def dialer(self, via: Direct) -> Dialer:
        """The dialer of a direct route (the gateway's, or one with the route's fwmark or
        interface), made once per route."""
        found = self._dialers.get(via)
        if found is None:
            if len(self._dialers) >= 64:  # routes come from the configuration: reloads only
                self._dialers.clear()
            found = self._dialers[via] = dialer_for(via, self._dialer)
        return found

    def attach(self, session: UdpSession, decision: RouteDecision,
               name: str | None) -> Callable[[str], None]:  # fmt: skip
        """Take over a session whose route rejects, drops or proxies it; what ends it."""
        via = decision.via
        if isinstance(via, Reject | Drop | CustomVia):  # a custom via carries TCP only
            rejected = not isinstance(via, Drop)
            reason = "rejected by route" if rejected else "dropped by route"
            self._flows.failed("udp", session.client, session.target, reason,
                               route=decision.name)  # fmt: skip
            session.divert(self._refuser(session) if rejected else _dropper(session))
            return _nothing
        proxied = ProxiedSession(self, session, decision, name)
        session.divert(proxied.queue)
        proxied.start()
        return proxied.end

    def _refuser(self, session: UdpSession) -> Callable[[bytes], None]:
        """Each datagram of a rejected session answered with ICMP port unreachable (sent once
        lwIP returns: this runs in its UDP callback)."""
        counters = session.counters
        call_after_lwip = self._stack.call_after_lwip

        def refuse(data: bytes) -> None:
            counters.refused_by_route += 1
            call_after_lwip(lambda: session.send_unreachable("port", data))

        return refuse


def _dropper(session: UdpSession) -> Callable[[bytes], None]:
    counters = session.counters

    def drop(data: bytes) -> None:
        counters.dropped_by_route += 1

    return drop


def _nothing(reason: str) -> None:
    """The end of a rejected or dropped session: its flow record is closed already."""


class ProxiedSession:
    """One session through a SOCKS5 proxy: its association's opening (a task, datagrams
    queued), then the C relay's session and the control connection in the poll set."""

    __slots__ = ("_cancel", "_control_token", "_end_in_c", "_ended", "_routing", "association",
                 "decision", "flow", "name", "pending", "session", "via")  # fmt: skip

    def __init__(self, routing: UdpRouting, session: UdpSession, decision: RouteDecision,
                 name: str | None) -> None:  # fmt: skip
        assert not isinstance(decision.via, CustomVia)
        self._routing = routing
        self.session = session
        self.decision = decision
        self.via: Via = decision.via
        self.name = name
        self.flow = routing._flows.track(session, session.target)
        self.flow.route = decision.name
        self.pending: list[bytes] = []
        self.association: UdpAssociation | None = None
        self._cancel = trio.CancelScope()
        self._control_token: int | None = None
        self._end_in_c: Callable[[str], None] | None = None
        self._ended = False

    def start(self) -> None:
        self.session.start_soon(self._open)

    def queue(self, data: bytes) -> None:
        """A client datagram while the association opens: kept, up to ``PENDING_DATAGRAMS``."""
        if len(self.pending) < PENDING_DATAGRAMS:
            self.pending.append(data)
        else:
            self.session.counters.dropped_from_client += 1

    async def _open(self) -> None:
        routing, session = self._routing, self.session
        with self._cancel:
            try:
                association = await open_udp_via(self.via, routing._dialer,
                                                 session.target, name=self.name)  # fmt: skip
            except ProxyError as exc:
                self._failed(exc.reason, exc)
                return
            except (OSError, TunlwipError) as exc:
                if isinstance(exc, OSError) and exc.errno in FD_SHORTAGE:
                    routing._admission.fd_shortage(exc)
                self._failed(f"proxy: {exc.strerror or exc}" if isinstance(exc, OSError)
                             else str(exc), exc)  # fmt: skip
                return
            self._established(association)

    def _established(self, association: UdpAssociation) -> None:
        """The association is open: queued datagrams through it, then the C relay."""
        session, routing = self.session, self._routing
        if self._ended:  # cannot happen without an await since; kept for safety
            association.close()
            return
        self.association = association
        try:
            control = association.control_socket.fileno()
            self._control_token = routing._stack.watch_readable(control, self._control_ready)
        except OSError as exc:
            association.close()
            self._failed("proxy: control connection not watched", exc)
            return
        for data in self.pending:
            association.send_nowait(data)
        self.pending = []
        header = socks5.udp_header(association.target, association.port)
        end = routing._hand_to_c(session, association.udp_socket, self.flow, closer=self._close,
                                 socks5_header=header,
                                 any_address=isinstance(association.target, str))  # fmt: skip
        if end is None:
            self._close()
            self._failed("proxy: relay refused", None)
            return
        self._end_in_c = end
        session.divert(self._send)  # C takes the flow's datagrams from here on

    def _send(self, data: bytes) -> None:
        if self.association is not None:
            self.association.send_nowait(data)

    def _control_ready(self) -> None:
        """The control connection is readable: the proxy closed it (or sent stray bytes)."""
        association = self.association
        if association is None or association.closed or not association.control_closed():
            return
        if self._control_token is not None:  # level-triggered: once is enough
            self._routing._stack.unwatch(association.control_socket.fileno(),
                                         self._control_token)  # fmt: skip
            self._control_token = None
        session = self.session

        def close() -> None:
            if not session.end_reason:
                session.counters.ended_by_proxy += 1
                session.close("proxy closed association")

        self._routing._stack.call_after_lwip(close)  # not from inside the poll round

    def _failed(self, reason: str, exc: BaseException | None) -> None:
        """The association could not be opened: ICMP host unreachable, counted, recorded;
        the session ends (the flow's next datagram tries again)."""
        session = self.session
        log.debug("UDP %s -> %s via %s: %s (%s)", session.client, session.target,
                  self.decision.via, reason, exc)  # fmt: skip
        self.decision.counters.proxy_failures += 1
        session.send_unreachable("host", self.pending[0] if self.pending else b"")
        self.pending = []
        self._ended = True
        self._routing._flows.close(self.flow, reason)
        if not session.end_reason:
            session.close("proxy failed")

    def _close(self) -> None:
        """Close the association (the C relay's session is closed first, by the forwarder)."""
        association = self.association
        if association is None:
            return
        if self._control_token is not None:
            self._routing._stack.unwatch(association.control_socket.fileno(),
                                         self._control_token)  # fmt: skip
            self._control_token = None
        association.close()

    def end(self, reason: str) -> None:
        """The session ended (idle, evicted, stopped, the proxy closed, or failed)."""
        if self._end_in_c is not None:
            end, self._end_in_c = self._end_in_c, None
            end(reason)  # C session, then ``_close``, then the flow record
            return
        if self._ended:
            return
        self._ended = True
        self._cancel.cancel()
        self.pending = []
        self._close()
        self._routing._flows.close(self.flow, "idle timeout" if reason == "idle" else reason)

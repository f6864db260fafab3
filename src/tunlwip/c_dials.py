"""The Python side of the dials C makes (``_csrc/dial.c``): admission counts and flow records.

Theory of operation
-------------------
With dial before accept on a device C reads, a held SYN that Python admits is dialed by C
(``start``): the socket, its protection, the connect and its readiness, releasing the SYN,
claiming the accepted connection and opening its C relay all happen in C, and so does the
relay's end. Python hears of each step in batches (``sync``, after every poll pass and before
anything reads the gateway's state): a connect done, failed (the SYN to answer), unclaimed,
a relay opened, its first bytes (to name the flow), its end. That is when the flow record
is opened and closed and the forwarder's counts change.

A SYN the policy can only admit (no routes, no limit near, not the DNS proxy's) never reaches
Python: C admits and dials it itself (``_csrc/admit.c``, configured by ``admit``), and, relayed,
its flow stays in C too: C keeps its record (endpoints, connect latency, age, bytes) and Python
reads it only when asked for live flows (``snapshots``, as the flow table's ``ElsewhereFlows``)
and at its end, from the ENDED event, which carries all of it; the record is built then, only
for subscribers. A failed or unclaimed one is first heard of at that event. Such a flow is named
at those moments: by its first bytes (which come only when they could name a server: a TLS
handshake record or an HTTP request line; the name is kept here by id) or else by the name the
client had resolved for the address when the flow opened (the DNS proxy's memory, asked as of
that time). What Python keeps per dial
is its key and, once relayed, its ``LiveFlow``. The counts the forwarder admits by (dials
connecting, connected or relayed, by client) are C's (``admit.c``'s table), exact at any moment.

A dial through a SOCKS5 proxy (``start`` with ``socks5``, from ``egress.tcp_routes``) is one
of these too, counted the same; its failure comes with C's reason, read as the Python client's
(``egress.c_socks5.failure``), and the proxy's own failures count in its route's
``proxy_failures``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .binding import admit as cadmit
from .binding import dial as cdial
from .binding.endpoints import endpoint_from_c
from .dialer import Dialer, c_protection
from .egress.c_socks5 import CSocks5Route, failure, start_failure
from .egress.routes import RouteCounters
from .endpoint import Endpoint
from .errors import ProtectError, ProxyError
from .flows import FlowInfo, FlowRecord, FlowTable, LiveFlow
from .relay import REASONS
from .shares import client_key
from .sniff import sniff_name

if TYPE_CHECKING:
    from .stack import LwipStack

log = logging.getLogger("tunlwip.predial")
#: Where the forwarder logs a flow's end (``tcp_forward``): the flows C keeps end there too.
flow_log = logging.getLogger("tunlwip.gateway")

FlowKey = tuple[Endpoint, Endpoint]  # (client, original destination)
Failed = Callable[[FlowKey, bytes, OSError, float, str | None], None]


def dial_error(code: int) -> OSError:
    """The exception a failed dial stands for (``code``: an errno, or PROTECT_FAILED + errno)."""
    if code >= cdial.PROTECT_FAILED:
        err = code - cdial.PROTECT_FAILED
        return ProtectError(f"cannot protect socket: {os.strerror(err)}")
    return OSError(code, os.strerror(code))


class CDials:
    """Dials in C and the flows they became. ``on_failed(key, packet, error, latency,
    route)`` answers a failed dial; ``on_connected()``, ``on_opened(flow)`` and
    ``on_ended(flow, reason, ago)`` let the forwarder count."""

    def __init__(self, flows: FlowTable, *, on_failed: Failed,
                 on_connected: Callable[[], None], on_opened: Callable[[LiveFlow], None],
                 on_ended: Callable[[LiveFlow, str, float], None],
                 on_alone_ended: Callable[[], None]) -> None:  # fmt: skip
        self._flows = flows
        self._on_failed = on_failed
        self._on_connected = on_connected
        self._on_opened = on_opened
        self._on_ended = on_ended
        self._on_alone_ended = on_alone_ended
        #: Names the first bytes of flows C keeps gave, by id, until they end.
        self._named: dict[int, str] = {}
        self._alone_opened = 0
        self._alone_opened_seen = 0
        #: Dials connecting or connected, by id: their key, connect latency and route's name
        #: (kept here, not in C: the flow record is the only one to read it).
        self._dials: dict[int, tuple[FlowKey, float, str | None]] = {}
        self._relayed: dict[int, LiveFlow] = {}
        #: SOCKS5 dials under way, by id: their route's counters (for ``proxy_failures``).
        self._proxied: dict[int, RouteCounters] = {}
        #: The route flows C admitted alone take (the route table's implicit last route).
        self.admitted_route: str | None = None
        self._loops_seen = 0
        self._swallowed_seen = 0
        self._syncing = False

    @staticmethod
    def possible(stack: LwipStack, dialer: Dialer) -> bool:
        """Can C dial for this gateway: C reads the device, and C can protect the sockets?"""
        return stack.reads_device_in_c() and c_protection(dialer.protector) is not None

    @staticmethod
    def configure(dialer: Dialer, claim_timeout: float, *, on: bool = True) -> None:
        """(Re)apply the dialer's protection, keepalive and timeout, and the claim timeout,
        to dials started from now on."""
        how = c_protection(dialer.protector) or ("none", 0)
        kind = {"none": cdial.PROTECT_NONE, "fwmark": cdial.PROTECT_MARK,
                "interface": cdial.PROTECT_INTERFACE}[how[0]]  # fmt: skip
        keep = dialer.keepalive
        cdial.configure(on=on, protect=kind, mark=how[1] if isinstance(how[1], int) else 0,
                        interface=how[1] if isinstance(how[1], str) else None,
                        keepalive=None if keep is None else (keep.idle, keep.interval, keep.count),
                        connect_timeout=dialer.connect_timeout,
                        claim_timeout=claim_timeout)  # fmt: skip

    @staticmethod
    def set_accepting(on: bool) -> None:
        """Off: connected dials are no longer claimed in C (the gateway drains)."""
        cdial.set_accepting(1 if on else 0)

    @staticmethod
    def is_own(local: Endpoint, peer: Endpoint) -> bool:
        return cdial.is_own(local, peer)

    # -- what the forwarder admits by ----------------------------------------------------------
    def __len__(self) -> int:
        """Dials connecting (held SYNs)."""
        return cdial.gauges()[0]

    def connected_count(self) -> int:
        """Dials connected and not yet claimed (relayed ones count as connections)."""
        return cdial.gauges()[1]

    def dialing_for(self, client: Any) -> int:
        return cadmit.client_counts(client_key(client))[0]

    def connected_for(self, client: Any) -> int:
        """The client's dials connected or relayed."""
        return cadmit.client_counts(client_key(client))[1]

    def start(self, key: FlowKey, route: str | None = None, *,
              socks5: tuple[CSocks5Route, bytes | None, RouteCounters] | None = None,
              ) -> OSError | None:  # fmt: skip
        """Dial the SYN being held now (only from the SYN hook) for the route named ``route``
        (through ``socks5``: the proxy, the CONNECT's host name or None, the route's counters);
        the error if it cannot start."""
        if socks5 is None:
            rc = cdial.start()
            if rc < 0:
                return dial_error(-rc)
        else:
            via, name, counters = socks5
            rc = cdial.start_socks5(via.proxy, name, via.auth)
            if rc < 0:
                return start_failure(-rc)
            self._proxied[rc] = counters
        self._dials[rc] = (key, 0.0, route)
        return None

    # -- the events ----------------------------------------------------------------------------
    def sync(self) -> tuple[int, int]:
        """Take C's events and act on them; returns (SYN retransmits swallowed, loops dropped)
        in C since the last call."""
        if not self._syncing:
            self._syncing = True
            try:
                while events := cdial.events():
                    for event in events:
                        self._handle(event)
            finally:
                self._syncing = False
        swallowed, loops = cdial.screened()
        if swallowed < self._swallowed_seen or loops < self._loops_seen:
            self._swallowed_seen = self._loops_seen = 0  # the stack (re)started: counted anew
        swallowed -= self._swallowed_seen
        loops -= self._loops_seen
        self._swallowed_seen += swallowed
        self._loops_seen += loops
        return swallowed, loops

    def _handle(self, event: Any) -> None:
        kind, ident = event.kind, event.id
        if kind == cdial.ENDED:
            flow = self._relayed.pop(ident, None)
            if flow is not None:
                self._on_ended(flow, REASONS.get(event.error, "error"), event.ago_ms / 1000)
            elif event.admitted_in_c:
                self._alone_ended(ident, event)
        elif kind == cdial.OPENED:
            self._opened(ident, event)
        elif kind == cdial.FIRST_DATA:
            flow = self._relayed.get(ident)
            if flow is not None:
                flow.name_from_first_bytes(cdial.data(event))
            elif event.admitted_in_c and (name := sniff_name(cdial.data(event))) is not None:
                self._named[ident] = name
        elif kind == cdial.CONNECTED:  # only of dials started here (``start``)
            if ident in self._dials:
                key, _, route = self._dials[ident]
                self._dials[ident] = (key, event.latency_ms / 1000, route)
                if self._proxied:
                    self._proxied.pop(ident, None)
                self._on_connected()
        elif kind == cdial.FAILED:
            dial = self._dial_of(ident, event)
            if dial is None:
                return
            key, _, route = dial
            counters = self._proxied.pop(ident, None) if self._proxied else None
            if event.error == errno.ECANCELED:  # the gateway stops
                return
            if event.proxy_reason:
                error = failure(event.proxy_reason, event.error)
                if counters is not None and isinstance(error, ProxyError):
                    counters.proxy_failures += 1
            else:
                error = dial_error(event.error)
            self._on_failed(key, cdial.data(event), error, event.latency_ms / 1000, route)
        elif kind == cdial.UNCLAIMED:
            dial = self._dial_of(ident, event)
            if dial is not None:
                log.debug("upstream for %s -> %s unclaimed; closed", *dial[0])

    def _dial_of(self, ident: int, event: Any) -> tuple[FlowKey, float, str | None] | None:
        """The dial an event of its end names, taken from the table: one started here, or
        one C admitted alone, first heard of now (a connected one counts as connected)."""
        dial = self._dials.pop(ident, None)
        if dial is None and event.admitted_in_c:
            key = (endpoint_from_c(event.client), endpoint_from_c(event.target))
            dial = (key, event.latency_ms / 1000, self.admitted_route)
            if event.kind != cdial.FAILED:
                self._on_connected()
        return dial

    def _alone_ended(self, ident: int, event: Any) -> None:
        """A flow C kept ended: its record for subscribers, from the event."""
        name = self._named.pop(ident, None) if self._named else None
        if self._flows.subscribed or flow_log.isEnabledFor(logging.DEBUG):
            client, target = endpoint_from_c(event.client), endpoint_from_c(event.target)
            reason = REASONS.get(event.error, "error")
            flow_log.debug("flow %s -> %s ended: %s", client, target, reason)
            ago, duration = event.ago_ms / 1000, event.duration_ms / 1000
            if name is None:  # by what the client had resolved when the flow opened
                name = self._flows.name_for(client, target, trio.current_time() - ago - duration)
            self._flows.offer(FlowRecord(
                "tcp", client, target, event.bytes_up, event.bytes_down,
                time.time() - ago - duration, duration, event.latency_ms / 1000, reason, name,
                self.admitted_route))  # fmt: skip
        self._on_alone_ended()

    # -- the flows C keeps (``flows.ElsewhereFlows``) -----------------------------------------
    def open_counts(self) -> tuple[int, int]:
        """(flows C kept opened so far, open now)."""
        open_now, opened = cdial.alone()
        if opened < self._alone_opened_seen:  # the stack (re)started: counted anew
            self._alone_opened_seen = 0
        self._alone_opened += opened - self._alone_opened_seen
        self._alone_opened_seen = opened
        return self._alone_opened, open_now

    def snapshots(self, limit: int | None) -> list[FlowInfo]:
        """The flows C keeps, open now, most bytes first (at most ``limit``); each named as it
        would have been when it opened."""
        wall, now = time.time(), trio.current_time()
        named, route, name_for = self._named, self.admitted_route, self._flows.name_for
        return [FlowInfo("tcp", client, target, up, down, wall - age, age, latency,
                         named.get(ident) or name_for(client, target, now - age), route)
                for ident, client, target, latency, age, up, down
                in cdial.flows_alone(limit)]  # fmt: skip

    @staticmethod
    def alone_open() -> int:
        """Flows C keeps, open now."""
        return cdial.alone()[0]

    def _opened(self, ident: int, event: Any) -> None:
        dial = self._dial_of(ident, event)
        if dial is None:
            return  # neither started through ``start`` nor by C (never happens)
        (client, target), latency, route = dial
        flow = self._flows.open_tcp(client, target, functools.partial(cdial.flow_bytes, event.flow))
        ago = event.ago_ms / 1000
        flow.opened -= ago
        flow.started -= ago
        flow.connect_latency = latency
        flow.route = route
        self._relayed[ident] = flow
        self._on_opened(flow)

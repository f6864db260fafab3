"""Routes on the TCP held-SYN path: what a new SYN's route decision makes of it.

Theory of operation
-------------------
``TcpForwarder.on_syn`` asks ``decide`` for each new SYN's route once it has screened the SYN
(loops, encrypted DNS), left the DNS proxy's flows alone and swallowed retransmits of flows
being dialed, and before its limits. The name a domain route matches is the one the client
resolved through the DNS proxy (``name_for``), looked up only when the table has domain
routes, so a gateway without routes pays one ``RouteTable.decide`` and no lookup. What the
decision means for the SYN:

* plain ``direct`` (the implicit ``default`` route among them): the forwarder's own dial, in
  C when C can dial, tagged with the route's name for the flow record.
* ``direct?fwmark=N`` / ``direct?interface=IF``: the held-SYN dial in Python
  (``HeldSynDials``) with a dialer whose protector is the route's (``dialer_for``, one per via,
  rebuilt when the table changes). Why not C: C's dials have one protection for the whole
  gateway, set once (``dial.c``); a per-dial protection would widen its hot path for a rare
  route. The connected socket still goes to the C relay, so only the dial is Python's.
* ``reject``: RST at once (the client sees ECONNREFUSED) and a flow record "rejected".
* ``drop``: no answer and a flow record "dropped". The tuple is remembered for
  ``DROP_MEMORY`` seconds (at most ``MAX_DROPPED`` tuples, oldest forgotten first), so the
  client's SYN retransmits are swallowed (``syn_retransmits_swallowed``) rather than counted as
  new dropped flows; one forgotten early is counted again, never more memory.
* ``socks5://`` / ``http://``: the SYN stays held while a task runs ``open_tcp_via`` (the proxy
  connect and handshake, bounded by its ``handshake_timeout``); retransmits are swallowed
  meanwhile, and the dial counts against ``max_pending_dials`` and the client's shares as any
  other. Connected, the socket is registered as a finished held dial (``HeldSynDials.adopt``)
  and the SYN released: the client's handshake claims it straight into the C relay, so the
  flow's bytes never pass through Python. A SOCKS5 proxy given by address, when C dials are
  on, is dialed in C instead (``egress.c_socks5``: connect, handshake, relay without a task or
  any Python per flow beyond a direct C dial's), counted as a C dial; HTTP proxies, proxies
  given by host name and gateways without C dials keep the task. Failed: the forwarder's
  answer for a failed dial
  (``ConnectionRefusedError``, the proxy's "refused" for the destination: RST; the rest,
  the proxy's own failures included: the configured unreachable answer), the flow record's
  reason the ``ProxyError``'s (``"proxy: refused"``), and the route's ``proxy_failures`` counts
  the proxy's own failures (``ProxyError``).

Sniffing routes and custom vias are accepted first (``on_syn`` returns False before any of
this); ``TcpForwarder.handle`` deals with them.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..binding import admit as cadmit
from ..binding import dial as cdial
from ..dialer import Dialer
from ..endpoint import Endpoint, IPAddress
from ..errors import ProxyError
from ..flows import FlowTable
from ..shares import ClientCounts
from .direct import dialer_for
from .routes import RouteDecision, RouteTable
from .via import HANDSHAKE_TIMEOUT, Direct, Drop, HttpProxy, Reject, Socks5Proxy

if TYPE_CHECKING:
    from ..c_dials import CDials
    from ..held_dials import HeldDial, HeldSynDials
    from .c_socks5 import CSocks5Route

__all__ = ["DROP_MEMORY", "MAX_DROPPED", "TcpRoutes"]

FlowKey = tuple[Endpoint, Endpoint]  # (client, original destination)
#: Seconds a dropped flow's tuple is remembered (Linux retransmits a SYN for 63 s by default).
DROP_MEMORY = 75.0
#: Dropped tuples remembered at most (a flood of new tuples forgets the oldest first).
MAX_DROPPED = 4096

Namer = Callable[[Endpoint, Endpoint], "str | None"]
Answer = Callable[..., None]  # answer(packet, refused=True): RST, else the unreachable answer
Connected = Callable[["HeldDial"], None]
Failed = Callable[[FlowKey, bytes, OSError, float, "str | None"], None]


def is_plain_direct(via: object) -> bool:
    """``direct`` without a protector of its own: the forwarder's usual dial (in C if it can)."""
    return type(via) is Direct and via.fwmark is None and via.interface is None


class TcpRoutes:
    """The route side of ``TcpForwarder.on_syn``: decisions, refusals, drops, dials by another
    protector, and dials through proxies (tasks in ``nursery``, given by ``start_serving``)."""

    def __init__(self, dialer: Dialer, flows: FlowTable, dials: HeldSynDials | None, *,
                 name_for: Namer | None, answer: Answer, on_connected: Connected,
                 on_failed: Failed) -> None:  # fmt: skip
        self._dialer = dialer
        self._flows = flows
        self._dials = dials
        self._name_for = name_for
        self._answer = answer
        self._on_connected = on_connected
        self._on_failed = on_failed
        self.nursery: trio.Nursery | None = None
        #: The C dials, when on (the forwarder sets them from ``start_serving``): SOCKS5
        #: proxies given by address are dialed there.
        self.c_dials: CDials | None = None
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        #: By route index of the table decided last: is its via plain ``direct``?
        self.plain: tuple[bool, ...] = ()
        self._table: RouteTable | None = None
        self._dialers: dict[Direct, Dialer] = {}
        self._c_routes: dict[Socks5Proxy, CSocks5Route | None] = {}
        #: Flows being dialed through a proxy now (their SYNs held). A set the forwarder reads
        #: with ``len``: a method call per SYN costs more than the rest of the check.
        self.proxied: set[FlowKey] = set()
        # Mirrored into C, which admits SYNs by them too (``_csrc/admit.c``).
        self._proxied_per_client = ClientCounts(
            functools.partial(cadmit.python_count, cadmit.PY_DIALING)
        )
        self._dropped: dict[FlowKey, float] = {}

    @property
    def handshake_timeout(self) -> float:
        """``egress.handshake_timeout``: a proxy's connect and handshake together (the
        forwarder sets it from its configuration, again on reconfigure; C's too)."""
        return self._handshake_timeout

    @handshake_timeout.setter
    def handshake_timeout(self, seconds: float) -> None:
        self._handshake_timeout = seconds
        cdial.set_proxy_timeout(max(1, int(seconds * 1000)))

    # -- what the forwarder admits by ---------------------------------------------------------
    def __len__(self) -> int:
        """Proxied dials under way (held SYNs)."""
        return len(self.proxied)

    def dialing_for(self, client: IPAddress) -> int:
        """Proxied dials of ``client`` (its IPv4 address or IPv6 /64) under way."""
        return self._proxied_per_client.count(client) if self.proxied else 0

    def swallows(self, key: FlowKey) -> bool:
        """Is this SYN a retransmit of a flow dialed through a proxy now, or of one dropped?"""
        # Emptiness first: hashing the key (two Endpoints) costs a microsecond, and without
        # proxy or drop routes both are always empty.
        if self.proxied and key in self.proxied:
            return True
        dropped = self._dropped.get(key) if self._dropped else None
        if dropped is None:
            return False
        if trio.current_time() - dropped < DROP_MEMORY:
            return True
        del self._dropped[key]
        return False

    # -- deciding -----------------------------------------------------------------------------
    def decide(self, table: RouteTable, client: Endpoint, target: Endpoint) -> RouteDecision:
        """The route of a new SYN (counted by the table unless provisional)."""
        if table is not self._table:
            self._switch(table)
        name = self._name_for(client, target) if table.uses_names and self._name_for else None
        return table.decide("tcp", client, target, name)

    def _switch(self, table: RouteTable) -> None:
        """A new table (start, reconfigure): new flows take its routes; dialers of its own
        protectors are made anew (the dialer's settings may have changed with it), and the
        drops of the old table are forgotten."""
        self._table = table
        self.plain = tuple(is_plain_direct(via) for via in table.vias)
        self._dialers.clear()
        self._c_routes.clear()
        self._dropped.clear()

    def refuse(self, decision: RouteDecision, key: FlowKey, packet: bytes) -> bool:
        """Answer a ``reject`` (RST) or ``drop`` (silence) decision; False for the others."""
        via = decision.via
        if isinstance(via, Reject):
            self._answer(packet, refused=True)
            self._flows.failed("tcp", key[0], key[1], "rejected", route=decision.name)
            return True
        if isinstance(via, Drop):
            self._remember_drop(key)
            self._flows.failed("tcp", key[0], key[1], "dropped", route=decision.name)
            return True
        return False

    def _remember_drop(self, key: FlowKey) -> None:
        now = trio.current_time()
        dropped = self._dropped
        while dropped:
            oldest_key, at = next(iter(dropped.items()))
            if now - at < DROP_MEMORY and len(dropped) < MAX_DROPPED:
                break
            del dropped[oldest_key]
        dropped[key] = now

    # -- dialing ------------------------------------------------------------------------------
    def start(self, decision: RouteDecision, key: FlowKey, packet: bytes) -> None:
        """Dial a SYN admitted for a route that is neither plain direct nor a refusal."""
        via = decision.via
        if isinstance(via, Direct):
            assert self._dials is not None
            self._dials.start(key, packet, decision.name, self.dialer_for(via))
            return
        if not isinstance(via, Socks5Proxy | HttpProxy) or self.nursery is None:
            # A via this path does not dial (``on_syn`` accepts custom vias first), or no
            # nursery (not serving): say so rather than let the flow leave another way.
            error = OSError(f"route {decision.name}: {via} is not dialed before accept")
            self._on_failed(key, packet, error, 0.0, decision.name)
            return
        name = None
        if isinstance(via, Socks5Proxy) and via.remote_dns and self._name_for is not None:
            name = self._name_for(*key)
        if isinstance(via, Socks5Proxy) and self.c_dials is not None \
                and (c_route := self._c_route(via)) is not None:  # fmt: skip
            socks5 = (c_route, c_route.name_for(name), decision.counters)
            if (failed := self.c_dials.start(key, decision.name, socks5=socks5)) is not None:
                if isinstance(failed, ProxyError):
                    decision.counters.proxy_failures += 1
                self._on_failed(key, packet, failed, 0.0, decision.name)
            return
        self.proxied.add(key)
        self._proxied_per_client.add(key[0].address)
        self.nursery.start_soon(self._dial_via_proxy, decision, key, packet, name)

    def _c_route(self, via: Socks5Proxy) -> CSocks5Route | None:
        """C's form of a SOCKS5 via (cached per table); None: a proxy by host name."""
        try:
            return self._c_routes[via]
        except KeyError:
            from .c_socks5 import c_route_for  # a proxy's modules: only once a flow takes one

            route = self._c_routes[via] = c_route_for(via)
            return route

    def dialer_for(self, via: Direct) -> Dialer:
        """The dialer of a ``direct?fwmark=N`` / ``direct?interface=IF`` route (cached)."""
        dialer = self._dialers.get(via)
        if dialer is None:
            dialer = self._dialers[via] = dialer_for(via, self._dialer)
        return dialer

    async def _dial_via_proxy(self, decision: RouteDecision, key: FlowKey, packet: bytes,
                              name: str | None) -> None:  # fmt: skip
        from .proxy_dial import open_tcp_via  # the proxy clients: only once a flow takes one

        started = trio.current_time()
        via = decision.via
        assert isinstance(via, Socks5Proxy | HttpProxy)
        try:
            try:
                sock = await open_tcp_via(via, self._dialer, key[1], name=name,
                                          handshake_timeout=self.handshake_timeout)  # fmt: skip
            finally:
                self.proxied.discard(key)
                self._proxied_per_client.release(key[0].address)
        except OSError as exc:
            if isinstance(exc, ProxyError):
                decision.counters.proxy_failures += 1
            self._on_failed(key, packet, exc, trio.current_time() - started, decision.name)
            return
        self._connected(decision, key, packet, sock, started)

    def _connected(self, decision: RouteDecision, key: FlowKey, packet: bytes,
                   sock: socket.socket, started: float) -> None:  # fmt: skip
        if self._dials is None:  # pragma: no cover - proxied dials need dial before accept
            sock.close()
            return
        dial = self._dials.adopt(key, packet, sock, started, decision.name)
        self._on_connected(dial)

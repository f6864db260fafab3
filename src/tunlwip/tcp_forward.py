"""The gateway's TCP side: each connection to the DNS proxy, a custom handler, or a C relay.

Theory of operation
-------------------
The stack hands every new connection to ``TcpForwarder.handle`` (a task): port 53 to the DNS
proxy, everything else to the custom ``tcp_handler`` if there is one, else to the default
forwarder, which dials the destination through the protected dialer and hands both ends to a C
relay (``LwipStack.relay``). From then on the relay owns the flow: no task, byte counts read from
the relay, the flow record closed by its ``when_done`` callback.

Dial before accept (on by default with the default forwarder): a new SYN is held
(``on_syn``, the stack's ``syn_interceptor``) while the upstream connect runs; only when the
destination accepted is the SYN fed to lwIP, so the client's handshake succeeds exactly when the
real one did. Refused -> RST (client sees ECONNREFUSED); unreachable or timed out -> ICMP
destination unreachable (or RST, ``unreachable_reply``). SYN retransmits for a tuple being dialed
are swallowed. Each new SYN then takes its route (``egress.tcp_routes``: reject, drop, another
protector, a proxy). Limits are checked before a dial starts (connections open or being dialed, held
SYNs, each client's shares of both); a SYN over one is answered with RST and counted.

The connects of held SYNs run in C (``c_dials``) or, when C cannot make them, without a task
each (``held_dials.HeldSynDials``); the connected socket waits for the client's handshake to
claim it (``take_predialed``, the stack's ``accept_taker``), which hands it straight to a C
relay.

``TcpForwarder`` also counts the flows ``Gateway.drain`` waits for (``active_flows``,
``wait_idle``), those C admitted alone included.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .admission import ENCRYPTED_DNS_PORT, Admission
from .binding import admit as cadmit
from .c_dials import CDials
from .dialer import Dialer
from .egress.routes import RouteTable
from .egress.tcp_routes import TcpRoutes
from .endpoint import Endpoint
from .errors import LwipError, dial_failure_reason
from .flows import FlowTable, LiveFlow
from .held_dials import FlowKey, HeldDial, HeldSynDials
from .packet import PacketError, parse_syn, rst_for_syn, unreachable_for
from .relay import RESET_SIDES, Relay
from .tcp import LwipTcpStream
from .udp import DNS_PORT

if TYPE_CHECKING:
    from .dns.proxy import DnsProxy
    from .egress.accepted import AcceptedForwarding
    from .gateway import GatewayConfig
    from .stack import LwipStack

# The logger these messages had before they moved here (operators filter on it).
log = logging.getLogger("tunlwip.gateway")

TcpHandler = Callable[[LwipTcpStream, Endpoint], Awaitable[None]]


@dataclasses.dataclass
class DialCounts:
    """Upstream connects of the default forwarder, by outcome."""

    ok: int = 0
    refused: int = 0
    failed: int = 0
    #: Client SYN retransmits swallowed while their dial ran.
    swallowed: int = 0


class TcpForwarder:
    """The gateway's TCP connections: ``handle`` (the stack's connection handler), and with
    ``dial_before_accept`` the held-SYN dials (``dials``, ``on_syn``, ``take_predialed``);
    without it ``screen_syn`` only drops looping SYNs and refuses encrypted DNS."""

    def __init__(
        self,
        stack: LwipStack,
        dialer: Dialer,
        flows: FlowTable,
        admission: Admission,
        config: GatewayConfig,
        *,
        dns: DnsProxy | None,
        is_dns: Callable[[Endpoint], bool],
        routes: RouteTable | None = None,
        handler: TcpHandler | None = None,
    ) -> None:
        self._stack = stack
        #: The route table new flows are decided by (the gateway swaps it on reconfigure).
        self.routes = routes if routes is not None else RouteTable()
        self._dialer = dialer
        self._flows = flows
        self._admission = admission
        #: The gateway's settings (the gateway replaces them on reconfigure).
        self.config = config
        self._dns = dns
        self._is_dns = is_dns
        self._custom_handler = handler
        self.counts = DialCounts()
        #: Upstream connects of held SYNs (dial before accept with the default forwarder).
        self.dials: HeldSynDials | None = None
        if handler is None and config.dial_before_accept:
            self.dials = HeldSynDials(stack, dialer, claim_timeout=config.predial_claim_timeout,
                                      on_connected=self._dial_connected,
                                      on_failed=self._dial_failed)  # fmt: skip
        #: What each new SYN's route makes of it (``egress.tcp_routes``).
        self.routing = TcpRoutes(dialer, flows, self.dials, name_for=dns.name_for if dns else None,
                                 answer=self._answer, on_connected=self._dial_connected,
                                 on_failed=self._dial_failed)  # fmt: skip
        self.routing.handshake_timeout = config.proxy_handshake_timeout
        #: Dials in C (``c_dials``): on from ``start_serving`` when C reads the device and can
        #: protect the sockets itself; ``dials`` then only serves what C cannot.
        self.c_dials: CDials | None = None
        #: The flows C admits alone are counted from C (``c_dials``) while this serves.
        self._counting_alone = False
        self._accepting = True
        self._admitted_in_c_seen = 0
        #: Open connections the gateway waits for when it drains (not the DNS proxy's).
        self.active = 0
        #: Set when ``active`` drops to 0; made only while somebody waits (``wait_idle``), as
        #: serial connections would make one per connection.
        self._idle: trio.Event | None = None
        self._serving = False

    @functools.cached_property
    def _accepted(self) -> AcceptedForwarding:
        """Connections accepted before their way out is opened (sniffing routes, custom vias,
        no dial before accept): ``egress.accepted``, made and imported at the first such
        connection, so a gateway that has none does not keep its modules in memory."""
        from .egress.accepted import AcceptedForwarding

        return AcceptedForwarding(self._dialer, self.counts, start_relay=self._start_relay,
                                  fd_shortage=self._admission.fd_shortage)  # fmt: skip

    def start_serving(self, nursery: trio.Nursery | None = None) -> None:
        """The gateway runs: SYNs may be held and dialed from now on (through proxies: in
        tasks of ``nursery``)."""
        self._serving = True
        self.routing.nursery = nursery
        if self.dials is not None and CDials.possible(self._stack, self._dialer):
            self.c_dials = CDials(self._flows, on_failed=self._dial_failed,
                                  on_connected=self._c_connected, on_opened=self._c_opened,
                                  on_ended=self._c_ended,
                                  on_alone_ended=self._maybe_idle)  # fmt: skip
            self._flows.keep_elsewhere(self.c_dials)
            self._counting_alone = True
            self.configure_c_dials()
            self.routing.c_dials = self.c_dials  # SOCKS5 proxies given by address: in C
            CDials.set_accepting(self._accepting)
            self._stack.c_dial_events = self.sync_c_dials
            self._dialer.also_own = CDials.is_own
            self._admitted_in_c_seen = 0  # the stack zeroes C's count as it starts
            self._configure_c_admission()

    def stop_serving(self) -> None:
        """The gateway stopped: C admits nothing more for it (nor, from stale settings, for a
        gateway started next in this process)."""
        self._serving = False
        if self.c_dials is not None:
            cadmit.configure(on=False)
        if self._counting_alone:  # the stack stopped: C's counts are final (and the next
            assert self.c_dials is not None  # gateway's, in this process, are not ours)
            self.counts.ok += self.c_dials.open_counts()[0]
            self._flows.keep_elsewhere(None)  # which folds them into its own
            self._counting_alone = False

    def configure_c_dials(self) -> None:
        """Apply the dialer's and the claim timeout's settings to C's dials, and the routes and
        limits to C's admission (reconfigure of a serving gateway)."""
        if self.c_dials is not None and self._serving:
            CDials.configure(self._dialer, self.config.predial_claim_timeout)
            self._configure_c_admission()

    def _configure_c_admission(self) -> None:
        """Let C admit and dial a SYN without calling ``on_syn`` (``_csrc/admit.c``) while
        ``on_syn`` could only dial it directly: serving and accepting, no route table, its
        port not the DNS proxy's nor refused encrypted DNS, and every limit ``on_syn`` checks
        with room (C checks them by the same counts; a SYN at a limit still comes here)."""
        c = self.c_dials
        if c is None:
            return
        c.admitted_route = self.routes.names[-1]
        ports = [DNS_PORT] if self._dns is not None else []
        if self._admission.reject_encrypted_dns:
            ports.append(ENCRYPTED_DNS_PORT)
        stack = self._stack.config
        cadmit.configure(on=self._serving and self._accepting and len(self.routes) == 0,
                         max_open=stack.max_tcp_connections,
                         max_pending=self.config.max_pending_dials,
                         open_share=stack.connection_share,
                         pending_share=self.config.pending_dial_share,
                         python_ports=ports)  # fmt: skip

    @property
    def accepting(self) -> bool:
        """False once the gateway drains: held SYNs are refused outright."""
        return self._accepting

    @accepting.setter
    def accepting(self, on: bool) -> None:
        self._accepting = on
        if self.c_dials is not None:
            CDials.set_accepting(on)
            self._configure_c_admission()

    def sync_c_dials(self) -> None:
        """Take what C's dials did since the last look (the stack calls it after a pass)."""
        if self.c_dials is None:
            return
        swallowed, loops = self.c_dials.sync()
        self.counts.swallowed += swallowed
        if loops:
            self._admission.loops_dropped_in_c(loops)
        admitted = cadmit.fast_count()
        if admitted < self._admitted_in_c_seen:  # the stack (re)started: counted anew
            self._admitted_in_c_seen = 0
        if admitted != self._admitted_in_c_seen:  # each took the implicit route: count it there
            self.routes.counters[-1].tcp += admitted - self._admitted_in_c_seen
            self._admitted_in_c_seen = admitted

    def pending_dials(self) -> int:
        """SYNs held while their upstream connect runs (in Python or in C)."""
        held = len(self.dials) + len(self.routing.proxied) if self.dials is not None else 0
        return held + (len(self.c_dials) if self.c_dials is not None else 0)

    def _c_connected(self) -> None:
        self.counts.ok += 1

    def _c_opened(self, flow: LiveFlow) -> None:
        self._flow_started()

    def _c_ended(self, flow: LiveFlow, reason: str, ago: float) -> None:
        log.debug("flow %s -> %s ended: %s", flow.client, flow.target, reason)
        self._end_flow(flow, reason, ago=ago)

    # -- the connection handler -----------------------------------------------------------------
    async def handle(self, stream: LwipTcpStream, target: Endpoint) -> None:
        """A new connection's task: the DNS proxy's, the custom handler's or the default
        forwarder's, with its flow record."""
        flow = self._flows.track(stream, target)
        dns = self._dns is not None and self._is_dns(target)
        if not dns:
            self._flow_started()
        outcome: str | None = "closed"
        try:
            if dns:
                assert self._dns is not None
                await self._dns.serve_tcp(stream)
            elif self._custom_handler is not None:
                await self._custom_handler(stream, target)
            else:
                outcome = await self._forward(stream, target, flow)
        except trio.Cancelled:
            outcome = "stopped"
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            outcome = "reset"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            if outcome is not None:  # None: a relay owns the flow now and ends it
                self._end_flow(flow, outcome, counted=not dns)

    def dials_ok(self) -> int:
        """Dials that connected: counted here, plus the flows C admitted and relayed alone."""
        alone = self._alone_counted()
        return self.counts.ok + (alone.open_counts()[0] if alone is not None else 0)

    def active_flows(self) -> int:
        """Connections the gateway forwards, open now: its tasks' and relays', and those C
        admitted and keeps alone."""
        alone = self._alone_counted()
        return self.active + (alone.alone_open() if alone is not None else 0)

    def _alone_counted(self) -> CDials | None:
        """The C dials whose flows kept alone count here now (while serving), else None."""
        return self.c_dials if self._counting_alone else None

    async def wait_idle(self) -> None:
        """Until no connection the gateway forwards is open (it drains)."""
        while self.active_flows():
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def _maybe_idle(self) -> None:
        if self._idle is not None and self.active_flows() == 0:
            self._idle.set()
            self._idle = None

    def _flow_started(self) -> None:
        self.active += 1

    def _end_flow(self, flow: LiveFlow, reason: str, *, counted: bool = True,
                  ago: float = 0.0) -> None:  # fmt: skip
        self._flows.close(flow, reason, ago)
        if counted:
            self.active -= 1
            if self.active == 0:
                self._maybe_idle()

    async def _forward(self, stream: LwipTcpStream, target: Endpoint, flow: LiveFlow) -> str | None:
        """Carry ``stream`` by its route (``egress.accepted``): a C relay then owns the flow
        (returns None), or returns why the flow ended before that (the way out failed)."""
        decision = self._accepted.decision_for((stream.remote, target), self.routes, flow.name)
        return await self._accepted.forward(stream, flow, decision, self.routes, self.config)

    def _start_relay(self, stream: LwipTcpStream, upstream: Any, flow: LiveFlow) -> Relay:
        """Hand ``stream`` and its connected ``upstream`` socket to a C relay, which owns the
        flow from then on. Raises ``trio.BrokenResourceError`` if the client is gone already
        (the socket is closed)."""
        try:
            relay = self._stack.relay(stream, upstream, on_first_data=flow.name_from_first_bytes)
        except BaseException:
            upstream.close()
            raise
        flow.count_bytes_with(relay.byte_counts)
        relay.when_done(functools.partial(self._relay_ended, flow))
        return relay

    def _relay_ended(self, flow: LiveFlow, relay: Relay) -> None:
        up, down = relay.byte_counts()
        reason = relay.reason or "error"
        side = RESET_SIDES.get(relay.reason_code or 0)
        log.debug("flow %s -> %s ended: %s%s, %d bytes up, %d down", flow.client, flow.target,
                  reason, f" by the {side}" if side else "", up, down)  # fmt: skip
        self._end_flow(flow, reason)

    # -- dial before accept ---------------------------------------------------------------------
    def take_predialed(self, stream: LwipTcpStream) -> bool:
        """A new connection whose upstream was dialed before accept goes straight to a relay,
        with no task (the stack's ``StackHooks.accept_taker``). Others get the handler task."""
        assert self.dials is not None
        dial = self.dials.claim((stream.remote, stream.local))
        if dial is None:
            return False
        try:
            flow = self._flows.track(stream, stream.local)
        except BaseException:
            dial.sock.close()  # the claimed upstream is ours to close
            raise
        flow.connect_latency = dial.latency
        flow.route = dial.route
        self._flow_started()
        try:
            self._start_relay(stream, dial.sock, flow)  # closes the socket if it raises
        except (trio.BrokenResourceError, LwipError):
            self._end_flow(flow, "reset")
        return True

    def on_syn(self, packet: bytes, client: Endpoint, target: Endpoint) -> bool:
        """The stack's ``syn_interceptor`` with dial before accept: True if the SYN is taken
        (held while its dial runs, or answered), False to let lwIP accept it at once."""
        if self.screen_syn(packet, client, target):
            return True
        if self._is_dns(target):
            return False  # the proxy answers: accept at once, nothing to dial
        dials = self.dials
        key = (client, target)
        if dials is None or not self._serving:
            return False
        routing = self.routing
        if dials.is_dialing(key) or routing.swallows(key):
            self.counts.swallowed += 1
            return True
        if not self.accepting:  # draining: refuse new flows outright
            self._answer(packet, refused=True)
            return True
        decision = routing.decide(self.routes, client, target)
        plain = routing.plain[decision.index]
        if (decision.sniff or not plain) and self._accepted.accept_first(key, decision):
            return False  # accepted first: handle() sniffs or opens the custom via
        if not plain and routing.refuse(decision, key, packet):
            return True  # reject: RST; drop: silence (counted by the table)
        refused = self._admission.refused
        c = self.c_dials
        opening = self._stack.connection_count() + len(dials) + dials.connected_count()
        opening += len(routing.proxied)
        if c is not None:
            opening += len(c) + c.connected_count()
        if opening >= self._stack.config.max_tcp_connections:
            refused.tcp_connections += 1
            self._answer(packet, refused=True)
            return True
        if self.pending_dials() >= self.config.max_pending_dials:
            refused.pending_dials += 1
            self._answer(packet, refused=True)
            return True
        # The client's shares, once the global limits had room (a full one is reported as
        # such): its connections, open or being dialed, then its held SYNs.
        address = client.address
        dialing = dials.dialing_for(address)
        if routing.proxied:
            dialing += routing.dialing_for(address)
        opening = self._stack.client_connections.count(address) + dials.connected_for(address)
        if c is not None:
            dialing += c.dialing_for(address)
            opening += c.connected_for(address)
        if opening + dialing >= self._stack.config.connection_share:
            refused.client_share_connections += 1
            self._answer(packet, refused=True)
            return True
        if dialing >= self.config.pending_dial_share:
            refused.client_share_dials += 1
            self._answer(packet, refused=True)
            return True
        if not plain:
            routing.start(decision, key, packet)
        elif c is None:
            dials.start(key, packet, decision.name)
        elif (error := c.start(key, decision.name)) is not None:
            self._dial_failed(key, packet, error, 0.0, decision.name)
        return True

    def screen_syn(self, packet: bytes, client: Endpoint, target: Endpoint) -> bool:
        """Take a SYN that must not become a connection: our own, looping back (dropped), or
        encrypted DNS with ``dns.reject_encrypted`` (RST, as from a closed port). The stack's
        ``syn_interceptor`` without dial before accept."""
        verdict = self._admission.screen("TCP", client, target)
        if verdict == "encrypted_dns":
            self._answer(packet, refused=True)
        return verdict is not None

    def _dial_connected(self, dial: HeldDial) -> None:
        self.counts.ok += 1
        self._stack.release_syn(dial.packet)  # lwIP answers SYN-ACK; the ACK claims the dial

    def _dial_failed(self, key: FlowKey, packet: bytes, exc: OSError, latency: float,
                     route: str | None = None) -> None:  # fmt: skip
        if self._admission.shortage(exc):  # file descriptors, memory
            self._answer(packet, refused=True)  # our shortage, not the destination's fault
        elif isinstance(exc, ConnectionRefusedError):
            self.counts.refused += 1
            self._answer(packet, refused=True)
        else:
            self.counts.failed += 1
            log.debug("dial %s for %s failed: %s", key[1], key[0], exc)
            self._answer(packet, refused=self.config.unreachable_reply == "rst")
        # A flow that never got past the dial still gets a record (reason, latency, name).
        client, target = key
        self._flows.failed("tcp", client, target, dial_failure_reason(exc), connect_latency=latency,
                           route=route)  # fmt: skip

    def _answer(self, packet: bytes, *, refused: bool) -> None:
        """Answer a held SYN: RST (``refused``), else ICMP destination unreachable."""
        try:
            syn = parse_syn(packet)
        except PacketError:
            return
        if refused:
            reply = rst_for_syn(syn)
        else:
            cfg = self.config.stack
            reply = unreachable_for(syn, cfg.ipv4_address if syn.version == 4 else cfg.ipv6_address)
        self._stack.send_to_client(reply)

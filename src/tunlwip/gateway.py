"""Gateway: the stack, the protected dialer and the default forwarders wired together.

TCP connections go to ``tcp_handler`` (default: a C relay with a protected upstream connection),
UDP flows become sessions handled by ``udp_handler`` (default: relay through a protected UDP
socket), and echo requests are answered, forwarded with ping sockets, or ignored.

Dial before accept (on by default): a new SYN is held while the upstream connect runs; only when
the destination accepted is the SYN fed to lwIP, so the client's handshake succeeds exactly when
the real one did. Refused -> RST (client sees ECONNREFUSED); unreachable or timed out -> ICMP
destination unreachable (or RST). SYN retransmits for a tuple being dialed are swallowed.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NoReturn

import trio

from .config.sections import GatewayConfig as GatewayConfig
from .device import PacketDevice
from .dialer import Dialer, Protector, describe, no_protection
from .dns.proxy import DnsCounters, DnsProxy
from .endpoint import Endpoint
from .errors import LwipError, ProtectError, TunlwipError
from .flows import DEFAULT_BUFFER, FlowInfo, FlowSubscription, FlowTable, FlowTotals, LiveFlow
from .forward import DatagramRelay, relay_datagrams
from .hostaddrs import HostAddresses
from .icmp import EchoCounters, EchoForwarder, unavailable_reason
from .packet import PacketError, parse_syn, rst_for_syn, unreachable_for
from .predial import FlowKey, HeldDial, HeldSynDials
from .relay import RESET_SIDES, Relay
from .sniff import sniff_name
from .stack import LwipStack, StackHooks, StackStatistics
from .tcp import LwipTcpStream
from .udp import DNS_PORT, UdpCounters, UdpHandler, UdpSession, UdpSessions

log = logging.getLogger("tunlwip.gateway")

TcpHandler = Callable[[LwipTcpStream, Endpoint], Awaitable[None]]
#: DNS over TLS (RFC 7858) over TCP, DNS over QUIC (RFC 9250) and over DTLS over UDP.
ENCRYPTED_DNS_PORT = 853


@dataclasses.dataclass
class RefusedCounters:
    """New flows turned away at a limit (existing flows are never touched for a new one).
    UDP sessions and DNS queries count theirs in ``UdpCounters`` and ``DnsCounters``."""

    #: ``stack.max_tcp_connections`` open or being dialed: RST.
    tcp_connections: int = 0
    #: ``max_pending_dials`` SYNs held while dialing: RST.
    pending_dials: int = 0
    #: No file descriptor left for an upstream socket (EMFILE, ENFILE): RST or ICMP.
    file_descriptors: int = 0
    #: The gateway's own upstream traffic came back through the TUN (protection not in
    #: effect): dropped, so it cannot loop.
    loops: int = 0
    #: TCP or UDP to port 853 (DNS over TLS or QUIC) with ``dns.reject_encrypted``: RST or
    #: ICMP port unreachable, so the client falls back to plain DNS at once.
    encrypted_dns: int = 0
    #: New flows refused because their client (IPv4 address, IPv6 /64) held its share of a
    #: budget while the budget itself had room; each answered as at the global limit:
    #: held SYNs (``max_pending_dials_per_client``): RST;
    client_share_dials: int = 0
    #: connections open or being dialed (``stack.max_tcp_connections_per_client``): RST;
    client_share_connections: int = 0
    #: UDP sessions (``udp.max_sessions_per_client``, also ``udp.refused_client_share``):
    #: ICMP port unreachable;
    client_share_udp_sessions: int = 0
    #: DNS queries in flight (``dns.max_in_flight_per_client``, also ``dns.client_share``):
    #: REFUSED.
    client_share_dns: int = 0


@dataclasses.dataclass(frozen=True)
class GatewayStatistics:
    stack: StackStatistics
    active_flows: int
    pending_dials: int
    dials_ok: int
    dials_refused: int
    dials_failed: int
    syn_retransmits_swallowed: int
    udp_sessions: int
    udp: UdpCounters
    icmp_echo: EchoCounters
    dns: DnsCounters | None
    #: Seconds since ``serve`` started (0 before).
    uptime: float = 0.0
    flows: FlowTotals = dataclasses.field(default_factory=FlowTotals)
    refused: RefusedCounters = dataclasses.field(default_factory=RefusedCounters)


class Gateway:
    """Terminates every client TCP connection and re-creates it through protected sockets."""

    def __init__(
        self,
        device: PacketDevice,
        config: GatewayConfig | None = None,
        *,
        protector: Protector = no_protection,
        tcp_handler: TcpHandler | None = None,
        udp_handler: UdpHandler | None = None,
    ) -> None:
        self.config = config or GatewayConfig()
        self.dialer = Dialer(protector, self.config.dial_timeout, self.config.keepalive)
        stack_config = self.config.stack
        if stack_config.icmp_echo == "forward" and (reason := unavailable_reason()):
            log.warning("ICMP echo forwarding unavailable: %s; falling back to reply", reason)
            stack_config = dataclasses.replace(stack_config, icmp_echo="reply")
            self.config = dataclasses.replace(self.config, stack=stack_config)
        # Dial before accept: SYNs are held while the upstream connect runs. Otherwise SYNs
        # are accepted at once; only our own (looping back) and rejected ones are held.
        predial = tcp_handler is None and self.config.dial_before_accept
        hooks = StackHooks(
            syn_interceptor=self._on_syn if predial else self._screen_syn,
            udp_receiver=self._on_udp_datagram,
            icmp_echo_receiver=self._on_echo if stack_config.icmp_echo == "forward" else None,
            accept_taker=self._take_predialed if predial else None,
        )
        self.stack = LwipStack(device, stack_config, hooks=hooks)
        self.stack.relay_idle_timeout = self.config.idle_timeout
        self.stack.tcp_keepalive = self.config.keepalive
        self._udp_handler = udp_handler or self._forward_udp
        self.udp = UdpSessions(self.stack, self._dispatch_udp, self.config.udp,
                               attach=None if udp_handler else self._attach_udp,
                               admit=self._admit_udp)  # fmt: skip
        #: The DNS proxy (None when ``dns.hijack`` is "off": port 53 is then forwarded).
        self.dns = DnsProxy(self.config.dns, self.dialer) if self.config.dns.hijack != "off" \
            else None  # fmt: skip
        self._dns_addresses = {stack_config.ipv4_address, stack_config.ipv6_address}
        self.echo = EchoForwarder(self.stack, self.dialer,
                                  idle_timeout=self.config.icmp_echo_idle_timeout)  # fmt: skip
        self._custom_handler = tcp_handler
        #: The host's own addresses, refused as destinations (none with forward_local).
        self._host_addresses = None if stack_config.forward_local_destinations else \
            HostAddresses(self.stack.set_host_addresses)  # fmt: skip
        #: Upstream connects of held SYNs (dial before accept with the default forwarder).
        self._dials: HeldSynDials | None = None
        self._flows = FlowTable()
        self._started_at: float | None = None
        #: Wall-clock time ``serve`` started (``time.time()``), None before.
        self.started: float | None = None
        self._nursery: trio.Nursery | None = None
        self._accepting = True
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._counts = dict(ok=0, refused=0, failed=0, swallowed=0)
        self._refused = RefusedCounters()
        self._loop_reported = False
        self._fd_shortage_reported_at = -math.inf
        if predial:
            self._dials = HeldSynDials(self.stack, self.dialer,
                                       claim_timeout=self.config.predial_claim_timeout,
                                       on_connected=self._dial_connected,
                                       on_failed=self._dial_failed)  # fmt: skip

    def _on_udp_datagram(self, client: Endpoint, target: Endpoint, data: bytes) -> None:
        """The stack's ``udp_receiver`` (the session table is created after the stack)."""
        self.udp.on_datagram(client, target, data)

    def _on_echo(self, client: Endpoint, target: Endpoint, message: bytes) -> None:
        """The stack's ``icmp_echo_receiver`` in "forward" mode (the forwarder needs the stack)."""
        self.echo.on_echo(client, target, message)

    @property
    def protect_mode(self) -> str:
        return describe(self.dialer.protector)

    async def serve(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run until cancelled; ``started(self)`` once the device and lwIP are up."""
        self._started_at, self.started = trio.current_time(), time.time()
        self._flows.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._host_addresses is not None:  # before the first client packet
                    await nursery.start(self._host_addresses.run)
                await nursery.start(self.udp.run)
                await nursery.start(self.echo.run)
                if self._dials is not None:
                    await nursery.start(self._dials.run)
                await nursery.start(self.stack.run, self._handle)
                task_status.started(self)
                try:
                    await trio.sleep_forever()
                finally:
                    if self.dns is not None:
                        with trio.CancelScope(shield=True):
                            await self.dns.aclose()
        finally:
            self._flows.end_subscriptions()  # after the last flow's record
        raise AssertionError("unreachable")  # pragma: no cover

    def reconfigure(self, config: GatewayConfig) -> list[str]:
        """Apply ``config`` to the running gateway without dropping flows: DNS policy and
        upstreams, QUIC and ICMP policy, timeouts and limits. Returns the changed settings
        that only take effect after a restart (device, addresses, dial-before-accept, DNS
        hijack). Raises ConfigError, with nothing changed, if the new config cannot be loaded.
        """
        old = self.config
        needs_restart = []
        device_fields = ("mtu", "ipv4_address", "ipv6_address", "client_networks",
                         "verify_checksums", "max_tcp_connections",
                         "max_tcp_connections_per_client", "max_buffered_bytes",
                         "max_buffered_bytes_per_connection")  # fmt: skip
        for name in device_fields:
            if getattr(config.stack, name) != getattr(old.stack, name):
                needs_restart.append(f"stack.{name}")
        if config.dial_before_accept != old.dial_before_accept:
            needs_restart.append("dial_before_accept")
        if config.dns.hijack != old.dns.hijack:
            needs_restart.append("dns.hijack")
        if config.stack.icmp_echo == "forward" and old.stack.icmp_echo != "forward":
            needs_restart.append("stack.icmp_echo (to forward)")
        if self.dns is not None and config.dns.hijack == old.dns.hijack:
            self.dns.reconfigure(config.dns, self.dialer)  # may raise: nothing changed yet
            if self._nursery is not None:
                self._nursery.start_soon(self.dns.close_retired)
        stack = config.stack
        if stack.icmp_echo == "forward" and old.stack.icmp_echo != "forward":
            stack = dataclasses.replace(stack, icmp_echo=old.stack.icmp_echo)
        self.stack.apply_packet_policy(stack)
        self.dialer.connect_timeout = config.dial_timeout
        self.stack.relay_idle_timeout = config.idle_timeout
        self.stack.tcp_keepalive = self.dialer.keepalive = config.keepalive  # new flows
        self.udp.config = config.udp
        if self._dials is not None:
            self._dials.claim_timeout = config.predial_claim_timeout
        self.echo.idle_timeout = config.icmp_echo_idle_timeout
        keep = {name: getattr(old, name) for name in ("dial_before_accept",)}
        keep_dns = dataclasses.replace(config.dns, hijack=old.dns.hijack)
        self.config = dataclasses.replace(config, stack=self.stack.config, dns=keep_dns, **keep)
        return needs_restart

    async def drain(self, grace: float) -> bool:
        """Stop accepting new flows and wait up to ``grace`` s for open ones; True if all ended."""
        self._accepting = False
        self.stack.accepting = False
        with trio.move_on_after(grace):
            await self._idle.wait()
            return True
        return False

    def statistics(self) -> GatewayStatistics:
        stack = self.stack.statistics()
        refused = dataclasses.replace(
            self._refused,
            client_share_connections=self._refused.client_share_connections
            + stack.counters["tcp_refused_client_share"],
            client_share_udp_sessions=self.udp.counters.refused_client_share,
            client_share_dns=self.dns.counters.client_share if self.dns is not None else 0,
        )
        return GatewayStatistics(
            stack=stack,
            active_flows=self._active,
            pending_dials=len(self._dials) if self._dials is not None else 0,
            dials_ok=self._counts["ok"],
            dials_refused=self._counts["refused"],
            dials_failed=self._counts["failed"],
            syn_retransmits_swallowed=self._counts["swallowed"],
            udp_sessions=len(self.udp),
            udp=dataclasses.replace(self.udp.counters),
            icmp_echo=dataclasses.replace(self.echo.counters),
            dns=dataclasses.replace(self.dns.counters) if self.dns is not None else None,
            uptime=self.uptime,
            flows=self._flows.totals(),
            refused=refused,
        )

    @property
    def uptime(self) -> float:
        """Seconds since ``serve`` started (trio's clock), 0 before."""
        return 0.0 if self._started_at is None else trio.current_time() - self._started_at

    def live_flows(self, limit: int | None = None) -> list[FlowInfo]:
        """Snapshots of the open TCP connections and UDP sessions, most bytes first (at most
        ``limit``)."""
        return self._flows.live(limit)

    def flows(self, max_buffer: int = DEFAULT_BUFFER) -> FlowSubscription:
        """An async iterator of a ``FlowRecord`` per flow that closes from now on, until the
        gateway stops. Records a slow consumer has no room for (``max_buffer``) are dropped
        and counted, so a consumer never slows the gateway. Close it (``with``/``aclose``)
        when done::

            with gateway.flows() as records:
                async for record in records:
                    print(json.dumps(record.to_json()))
        """
        return self._flows.subscribe(max_buffer)

    def send_udp(self, data: bytes, *, src: Endpoint, dst: Endpoint) -> None:
        """Send a datagram to client ``dst`` from any address and port ``src`` (no session
        needed). Raises ``LwipError`` if lwIP cannot send it (too big, no memory).

        ``src`` and ``dst`` are keyword-only: both are Endpoints, so a swapped pair would
        type-check and send to the wrong host without any error."""
        self.stack.send_udp(data, src=src, dst=dst)

    # -- flows ----------------------------------------------------------------------------------
    def _is_dns(self, target: Endpoint) -> bool:
        """Is this port-53 flow the proxy's? (All of them with hijack "all".)"""
        if self.dns is None or target.port != DNS_PORT:
            return False
        return self.config.dns.hijack == "all" or target.address in self._dns_addresses

    def _dns_name(self, client: Endpoint, target: Endpoint) -> str | None:
        return self.dns.name_for(client, target) if self.dns is not None else None

    async def _dispatch_udp(self, session: UdpSession) -> None:
        flow = self._flows.open("udp", session.client, session.target,
                                lambda: (session.bytes_in, session.bytes_out),
                                self._dns_name(session.client, session.target))  # fmt: skip
        outcome = "closed"
        try:
            if self.dns is not None and self._is_dns(session.target):
                await self.dns.serve_udp(session)
            else:
                await self._udp_handler(session)
        except trio.Cancelled:
            outcome = "stopped"  # unless the session says why (idle, evicted) below
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            reason = {"idle": "idle timeout"}.get(session.end_reason, session.end_reason)
            self._flows.close(flow, reason or outcome)

    async def _handle(self, stream: LwipTcpStream, target: Endpoint) -> None:
        flow = self._flows.open("tcp", stream.remote, target,
                                lambda: (stream.bytes_received, stream.bytes_sent),
                                self._dns_name(stream.remote, target))  # fmt: skip
        dns = self.dns is not None and self._is_dns(target)
        if not dns:
            self._flow_started()
        outcome: str | None = "closed"
        try:
            if dns:
                assert self.dns is not None
                await self.dns.serve_tcp(stream)
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

    def _flow_started(self) -> None:
        self._active += 1
        if self._active == 1:
            self._idle = trio.Event()

    def _end_flow(self, flow: LiveFlow, reason: str, *, counted: bool = True) -> None:
        self._flows.close(flow, reason)
        if counted:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _forward(self, stream: LwipTcpStream, target: Endpoint, flow: LiveFlow) -> str | None:
        """Hand ``stream`` and its upstream to a C relay, which then owns the flow (returns
        None); or returns why the flow ended before that (the dial failed)."""
        dial_started = trio.current_time()
        try:
            upstream = await self.dialer.open_tcp(target)
        except OSError as exc:
            flow.connect_latency = trio.current_time() - dial_started
            if exc.errno in _FD_SHORTAGE:
                self._fd_shortage(exc)
            else:
                self._counts["failed"] += 1
            log.debug("dial %s for %s failed: %s", target, stream.remote, exc)
            stream.abort()
            return _dial_failure(exc)
        flow.connect_latency = trio.current_time() - dial_started
        self._counts["ok"] += 1
        self._start_relay(stream, upstream.socket, flow)
        return None

    def _start_relay(self, stream: LwipTcpStream, upstream: Any, flow: LiveFlow) -> None:
        """Hand ``stream`` and its connected ``upstream`` socket to a C relay, which owns the
        flow from then on. Raises ``trio.BrokenResourceError`` if the client is gone already
        (the socket is closed)."""

        def name_from_first_bytes(data: bytes) -> None:
            name = sniff_name(data)
            if name is not None:
                flow.name = name  # what the client asked the server for beats the DNS guess

        try:
            relay = self.stack.relay(stream, upstream, on_first_data=name_from_first_bytes)
        except BaseException:
            upstream.close()
            raise
        flow.count_bytes_with(relay.byte_counts)
        relay.when_done(functools.partial(self._relay_ended, flow))

    def _take_predialed(self, stream: LwipTcpStream) -> bool:
        """A new connection whose upstream was dialed before accept goes straight to a relay,
        with no task (``LwipStack.accept_taker``). Others get the handler task."""
        assert self._dials is not None
        dial = self._dials.claim((stream.remote, stream.local))
        if dial is None:
            return False
        try:
            flow = self._flows.open("tcp", stream.remote, stream.local,
                                    lambda: (stream.bytes_received, stream.bytes_sent),
                                    self._dns_name(stream.remote, stream.local))  # fmt: skip
        except BaseException:
            dial.sock.close()  # the claimed upstream is ours to close
            raise
        flow.connect_latency = dial.latency
        self._flow_started()
        try:
            self._start_relay(stream, dial.sock, flow)  # closes the socket if it raises
        except (trio.BrokenResourceError, LwipError):
            self._end_flow(flow, "reset")
        return True

    def _relay_ended(self, flow: LiveFlow, relay: Relay) -> None:
        up, down = relay.byte_counts()
        reason = relay.reason or "error"
        side = RESET_SIDES.get(relay.reason_code or 0)
        log.debug("flow %s -> %s ended: %s%s, %d bytes up, %d down", flow.client, flow.target,
                  reason, f" by the {side}" if side else "", up, down)  # fmt: skip
        self._end_flow(flow, reason)

    def _attach_udp(self, session: UdpSession) -> Callable[[str], None] | None:
        """The default UDP forwarder without a task: a protected socket watched by the relay
        poll task, datagrams copied by callbacks both ways (``DatagramRelay``); returns what
        ends it. DNS sessions, and sessions whose socket cannot be opened, go to the task
        path instead (None)."""
        if self._is_dns(session.target):
            return None
        try:
            upstream = self.dialer.open_udp(session.target)
        except (OSError, TunlwipError):
            return None  # _forward_udp tries again and answers "unreachable"
        relay = DatagramRelay(session, upstream)
        try:
            token = self.stack.watch_readable(upstream.fileno(), relay.drain)
        except OSError:
            upstream.close()
            return None
        flow = self._flows.open("udp", session.client, session.target,
                                lambda: (session.bytes_in, session.bytes_out),
                                self._dns_name(session.client, session.target))  # fmt: skip

        def end(reason: str) -> None:
            self.stack.unwatch(upstream.fileno(), token)
            upstream.close()
            self._flows.close(flow, {"idle": "idle timeout"}.get(reason, reason))

        session.divert(relay.to_upstream)
        return end

    async def _forward_udp(self, session: UdpSession) -> None:
        try:
            upstream = self.dialer.open_udp(session.target)
        except (OSError, TunlwipError) as exc:
            log.debug("UDP %s -> %s: cannot open upstream: %s", session.client, session.target,
                      exc)  # fmt: skip
            if isinstance(exc, OSError) and exc.errno in _FD_SHORTAGE:
                self._fd_shortage(exc)
            session.send_unreachable("host")
            return
        with upstream:
            await relay_datagrams(session, upstream)

    def _admit_udp(self, client: Endpoint, target: Endpoint) -> bool | Literal["reject"]:
        """A new UDP flow that is one of our own sockets coming back (an upstream's, the DNS
        proxy's) is a loop; DNS over QUIC with ``dns.reject_encrypted`` is rejected."""
        if self.dialer.is_own(client, target):
            self._loop_detected("UDP", client, target)
            return False
        if self._rejects_encrypted_dns(target):
            return "reject"
        return True

    def _loop_detected(self, kind: str, client: Endpoint, target: Endpoint) -> None:
        """Our own upstream traffic arrived on the TUN: drop it (forwarding it would dial the
        same destination again, and again), count it, and say once, loudly, what to fix."""
        self._refused.loops += 1
        if not self._loop_reported:
            self._loop_reported = True
            log.error("routing loop: the gateway's own %s traffic %s -> %s came back through "
                      "the TUN, so its sockets are not protected (protect: %s). Set "
                      "protect.fwmark with a matching `ip rule`, or protect.interface, or run "
                      "the gateway where its routes do not lead into the TUN. Looping packets "
                      "are dropped (counted: refused.loops); this is logged once.", kind,
                      client, target, self.protect_mode)  # fmt: skip

    def _fd_shortage(self, exc: OSError) -> None:
        """Out of file descriptors: new flows are refused (counted) until some close; warn at
        most once a minute rather than per flow."""
        self._refused.file_descriptors += 1
        now = trio.current_time()
        if now - self._fd_shortage_reported_at >= 60:
            self._fd_shortage_reported_at = now
            log.warning("out of file descriptors (%s): new flows are refused until some close; "
                        "raise the limit (LimitNOFILE, ulimit -n) or lower tcp.max_connections "
                        "and udp.max_sessions", exc.strerror)  # fmt: skip

    # -- dial before accept ------------------------------------------------------------------
    def _on_syn(self, packet: bytes, client: Endpoint, target: Endpoint) -> bool:
        if self._screen_syn(packet, client, target):
            return True
        if self._is_dns(target):
            return False  # the proxy answers: accept at once, nothing to dial
        dials = self._dials
        key = (client, target)
        if dials is None or self._nursery is None:
            return False
        if dials.is_dialing(key):
            self._counts["swallowed"] += 1
            return True
        if not self._accepting:  # draining: refuse new flows outright
            self._answer(packet, refused=True)
            return True
        opening = self.stack.connection_count() + len(dials) + dials.connected_count()
        if opening >= self.stack.config.max_tcp_connections:
            self._refused.tcp_connections += 1
            self._answer(packet, refused=True)
            return True
        if len(dials) >= self.config.max_pending_dials:
            self._refused.pending_dials += 1
            self._answer(packet, refused=True)
            return True
        # The client's shares, once the global limits had room (a full one is reported as
        # such): its connections, open or being dialed, then its held SYNs.
        address = client.address
        opening = self.stack.client_connections.count(address) + dials.dialing_for(address) \
            + dials.connected_for(address)  # fmt: skip
        if opening >= self.stack.config.connection_share:
            self._refused.client_share_connections += 1
            self._answer(packet, refused=True)
            return True
        if dials.dialing_for(address) >= self.config.pending_dial_share:
            self._refused.client_share_dials += 1
            self._answer(packet, refused=True)
            return True
        dials.start(key, packet)
        return True

    def _screen_syn(self, packet: bytes, client: Endpoint, target: Endpoint) -> bool:
        """Take a SYN that must not become a connection: our own, looping back (dropped), or
        encrypted DNS with ``dns.reject_encrypted`` (RST, as from a closed port)."""
        if self.dialer.is_own(client, target):
            self._loop_detected("TCP", client, target)
            return True
        if self._rejects_encrypted_dns(target):
            self._answer(packet, refused=True)
            return True
        return False

    def _rejects_encrypted_dns(self, target: Endpoint) -> bool:
        """Is this flow DNS over TLS or QUIC (port 853) to be rejected? Counts it if so."""
        if target.port != ENCRYPTED_DNS_PORT or not self.config.dns.reject_encrypted:
            return False
        self._refused.encrypted_dns += 1
        return True

    def _dial_connected(self, dial: HeldDial) -> None:
        self._counts["ok"] += 1
        self.stack.release_syn(dial.packet)  # lwIP answers SYN-ACK; the ACK claims the dial

    def _dial_failed(self, key: FlowKey, packet: bytes, exc: OSError, latency: float) -> None:
        if exc.errno in _FD_SHORTAGE:
            self._fd_shortage(exc)
            self._answer(packet, refused=True)  # our shortage, not the destination's fault
        elif isinstance(exc, ConnectionRefusedError):
            self._counts["refused"] += 1
            self._answer(packet, refused=True)
        else:
            self._counts["failed"] += 1
            log.debug("dial %s for %s failed: %s", key[1], key[0], exc)
            self._answer(packet, refused=self.config.unreachable_reply == "rst")
        self._record_failed_dial(key, exc, latency)

    def _record_failed_dial(self, key: FlowKey, exc: OSError, latency: float) -> None:
        """A flow that never got past the dial still gets a record (reason, latency, name)."""
        client, target = key
        self._flows.failed("tcp", client, target, _dial_failure(exc), connect_latency=latency,
                           name=self._dns_name(client, target))  # fmt: skip

    def _answer(self, packet: bytes, *, refused: bool) -> None:
        try:
            syn = parse_syn(packet)
        except PacketError:
            return
        if refused:
            reply = rst_for_syn(syn)
        else:
            cfg = self.config.stack
            reply = unreachable_for(syn, cfg.ipv4_address if syn.version == 4 else cfg.ipv6_address)
        self.stack.send_to_client(reply)


_FD_SHORTAGE = (errno.EMFILE, errno.ENFILE)


def _dial_failure(exc: OSError) -> str:
    """A flow record's close reason for a failed upstream dial."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "dial timeout"
    if isinstance(exc, ProtectError):
        return "protect failed"
    return "unreachable"

"""Gateway: the stack, the protected dialer and the forwarders wired together.

Theory of operation
-------------------
``Gateway`` builds one ``LwipStack`` on a packet device and connects its hooks to the forwarders:
TCP connections to ``TcpForwarder`` (``tcp_forward``: the DNS proxy, a custom ``tcp_handler``,
or a C relay with a protected upstream connection, dialed before the client's SYN is accepted),
UDP sessions to ``UdpForwarder`` (``udp_forward``: the DNS proxy, a custom ``udp_handler``, or a
protected UDP socket), and echo requests to ``EchoForwarder`` (``icmp``) when they are
forwarded. Both forwarders screen new flows through one ``Admission`` and record them in one
``FlowTable``.

This module keeps what is the gateway's as a whole: wiring, the lifecycle (``serve``,
``drain``), ``reconfigure`` of the running gateway, and the public view of it
(``statistics``, ``live_flows``, ``flows``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import NoReturn

import trio

from .admission import Admission
from .admission import RefusedCounters as RefusedCounters  # re-exported: part of the statistics
from .binding.core import release_free_heap
from .config.sections import GatewayConfig as GatewayConfig
from .device import PacketDevice
from .dialer import Dialer, Protector, describe, no_protection
from .dns.proxy import DnsProxy
from .egress.routes import RouteTable, route_table
from .endpoint import Endpoint
from .flows import DEFAULT_BUFFER, FlowInfo, FlowSubscription, FlowTable
from .hostaddrs import HostAddresses
from .icmp import EchoForwarder, unavailable_reason
from .stack import LwipStack, StackHooks
from .stats import GatewayStatistics as GatewayStatistics  # re-exported: its documented home
from .stats import frozen_copy
from .tcp import LwipTcpStream
from .tcp_forward import TcpForwarder, TcpHandler
from .udp import DNS_PORT, UdpHandler, UdpSessions
from .udp_forward import UdpForwarder

log = logging.getLogger("tunlwip.gateway")


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
        # The stack's hooks, decided here once: dial before accept holds SYNs while the
        # upstream connect runs; otherwise SYNs are accepted at once and only our own (looping
        # back) and rejected ones are taken. The forwarders need the stack, so the hooks are
        # the gateway's methods that hand on to them.
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
        #: The DNS proxy (None when ``dns.hijack`` is "off": port 53 is then forwarded).
        self.dns = DnsProxy(self.config.dns, self.dialer) if self.config.dns.hijack != "off" \
            else None  # fmt: skip
        self._dns_addresses = {stack_config.ipv4_address, stack_config.ipv6_address}
        self._flows = FlowTable(self._dns_name)
        self._admission = Admission(
            self.dialer, reject_encrypted_dns=self.config.dns.reject_encrypted
        )
        #: Where each new flow goes (``[[route]]``, ``egress.proxy``, then direct); both
        #: forwarders decide by it, ``reconfigure`` swaps it whole.
        self.routes: RouteTable = route_table(self.config)
        self._tcp = TcpForwarder(self.stack, self.dialer, self._flows, self._admission,
                                 self.config, dns=self.dns, is_dns=self._is_dns,
                                 handler=tcp_handler, routes=self.routes)  # fmt: skip
        udp_forwarder = UdpForwarder(self.stack, self.dialer, self._flows, self._admission,
                                     dns=self.dns, is_dns=self._is_dns,
                                     handler=udp_handler, routes=self.routes)  # fmt: skip
        self._udp_forwarder = udp_forwarder
        self.udp = UdpSessions(self.stack, udp_forwarder.dispatch, self.config.udp,
                               attach=udp_forwarder.attach, admit=udp_forwarder.admit,
                               sync_activity=udp_forwarder.sync)  # fmt: skip
        self.echo = EchoForwarder(self.stack, self.dialer,
                                  idle_timeout=self.config.icmp_echo_idle_timeout)  # fmt: skip
        #: The host's own addresses, refused as destinations (none with forward_local).
        self._host_addresses = None if stack_config.forward_local_destinations else \
            HostAddresses(self.stack.set_host_addresses)  # fmt: skip
        self._started_at: float | None = None
        #: Wall-clock time ``serve`` started (``time.time()``), None before.
        self.started: float | None = None
        self._nursery: trio.Nursery | None = None

    # -- the stack's hooks (StackHooks), handed on to the forwarders created after the stack --
    def _on_syn(self, packet: bytes, client: Endpoint, target: Endpoint) -> bool:
        return self._tcp.on_syn(packet, client, target)

    def _screen_syn(self, packet: bytes, client: Endpoint, target: Endpoint) -> bool:
        return self._tcp.screen_syn(packet, client, target)

    def _take_predialed(self, stream: LwipTcpStream) -> bool:
        return self._tcp.take_predialed(stream)

    def _on_udp_datagram(self, client: Endpoint, target: Endpoint, data: bytes) -> None:
        self.udp.on_datagram(client, target, data)

    def _on_echo(self, client: Endpoint, target: Endpoint, message: bytes) -> None:
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
                self._tcp.start_serving(nursery)
                if self._host_addresses is not None:  # before the first client packet
                    await nursery.start(self._host_addresses.run)
                await nursery.start(self.udp.run)
                await nursery.start(self.echo.run)
                if self.dns is not None:  # DNS sessions without a task (before any packet)
                    await nursery.start(self.dns.run, self.stack)
                if self._tcp.dials is not None:
                    await nursery.start(self._tcp.dials.run)
                await nursery.start(self.stack.run, self._tcp.handle)
                release_free_heap()  # what startup freed goes back: an idle gateway's RSS
                task_status.started(self)
                try:
                    await trio.sleep_forever()
                finally:
                    if self.dns is not None:
                        with trio.CancelScope(shield=True):
                            await self.dns.aclose()
        finally:
            self._tcp.stop_serving()
            self._flows.end_subscriptions()  # after the last flow's record
        raise AssertionError("unreachable")  # pragma: no cover

    def reconfigure(self, config: GatewayConfig) -> list[str]:
        """Apply ``config`` to the running gateway without dropping flows: DNS policy and
        upstreams, QUIC and ICMP policy, timeouts and limits. Returns the changed settings
        that only take effect after a restart (device, addresses, dial-before-accept, DNS
        hijack). Raises ConfigError, with nothing changed, if the new config cannot be loaded.
        """
        # Routes apply to new flows (the forwarders' ``routes``): nothing needs a restart.
        routes = route_table(config, previous=self.routes)  # may raise: nothing changed yet
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
        if self._tcp.dials is not None:
            self._tcp.dials.claim_timeout = config.predial_claim_timeout
        self._admission.reject_encrypted_dns = config.dns.reject_encrypted
        self.echo.idle_timeout = config.icmp_echo_idle_timeout
        keep = {name: getattr(old, name) for name in ("dial_before_accept",)}
        keep_dns = dataclasses.replace(config.dns, hijack=old.dns.hijack)
        self.config = dataclasses.replace(config, stack=self.stack.config, dns=keep_dns, **keep)
        self._tcp.config = self.config
        self._tcp.routing.handshake_timeout = self.config.proxy_handshake_timeout
        self.routes = self._tcp.routes = self._udp_forwarder.routes = routes
        self._tcp.configure_c_dials()  # after the routes: C admits alone only without any
        return needs_restart

    async def drain(self, grace: float) -> bool:
        """Stop accepting new flows and wait up to ``grace`` s for open ones; True if all ended."""
        self._tcp.accepting = False
        self.stack.accepting = False
        with trio.move_on_after(grace):
            await self._tcp.wait_idle()
            return True
        return False

    def statistics(self) -> GatewayStatistics:
        """A frozen snapshot of every counter (taken now; nothing is kept per call)."""
        self._tcp.sync_c_dials()  # what C's dials did since the last poll pass
        stack = self.stack.statistics()
        self.udp.sync()  # what UDP sessions relayed in C did
        own = self._admission.refused
        refused = dataclasses.replace(
            frozen_copy(own),
            client_share_connections=own.client_share_connections
            + stack.counters["tcp_refused_client_share"],
            client_share_udp_sessions=self.udp.counters.refused_client_share,
            client_share_dns=self.dns.counters.client_share if self.dns is not None else 0,
        )
        return GatewayStatistics(
            stack=stack,
            active_flows=self._tcp.active_flows(),
            pending_dials=self._tcp.pending_dials(),
            dials_ok=self._tcp.dials_ok(),
            dials_refused=self._tcp.counts.refused,
            dials_failed=self._tcp.counts.failed,
            syn_retransmits_swallowed=self._tcp.counts.swallowed,
            udp_sessions=len(self.udp),
            udp=frozen_copy(self.udp.counters),
            icmp_echo=frozen_copy(self.echo.counters),
            dns=frozen_copy(self.dns.counters) if self.dns is not None else None,
            uptime=self.uptime,
            flows=self._flows.totals(),
            refused=refused,
            routes=self.routes.statistics(),
            dns_routes=self.dns.split.statistics() if self.dns is not None else None,
        )

    @property
    def uptime(self) -> float:
        """Seconds since ``serve`` started (trio's clock), 0 before."""
        return 0.0 if self._started_at is None else trio.current_time() - self._started_at

    def live_flows(self, limit: int | None = None) -> list[FlowInfo]:
        """Snapshots of the open TCP connections and UDP sessions, most bytes first (at most
        ``limit``)."""
        self._tcp.sync_c_dials()
        self.stack.tick_clock()  # C reads the ages of the flows it keeps by lwIP's clock
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

    # -- which flows are the DNS proxy's ----------------------------------------------------------
    def _is_dns(self, target: Endpoint) -> bool:
        """Is this port-53 flow the proxy's? (All of them with hijack "all".)"""
        if self.dns is None or target.port != DNS_PORT:
            return False
        return self.config.dns.hijack == "all" or target.address in self._dns_addresses

    def _dns_name(self, client: Endpoint, target: Endpoint, at: float | None = None) -> str | None:
        return self.dns.name_for(client, target, at) if self.dns is not None else None

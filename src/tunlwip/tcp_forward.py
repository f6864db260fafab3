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
are swallowed. Limits are checked before a dial starts (connections open or being dialed, held
SYNs, each client's shares of both); a SYN over one is answered with RST and counted.

The connects of held SYNs run without a task each (``HeldSynDials``): a non-blocking
``connect()`` on a protected socket, watched in the stack's poll set, so one wakeup of the poll
task serves packets, relays and finished dials alike. The connected socket then waits for the
client's handshake to claim it (``take_predialed``, the stack's ``accept_taker``), which hands
it straight to a C relay. One small task enforces the two deadlines: the dial timeout while
connecting and the claim timeout afterwards. Why not a task per dial: the connection rate is the
gateway's per-connection overhead, and a task with its cancel scopes cost more than the whole
dial does here.

``TcpForwarder`` also counts the flows ``Gateway.drain`` waits for (``active``, ``idle``).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .admission import FD_SHORTAGE, Admission
from .c_dials import CDials
from .dialer import Dialer
from .egress.routes import RouteTable
from .endpoint import Endpoint, IPAddress
from .errors import LwipError, ProtectError
from .flows import FlowTable, LiveFlow
from .packet import PacketError, parse_syn, rst_for_syn, unreachable_for
from .relay import RESET_SIDES, Relay
from .shares import ClientCounts
from .sniff import sniff_name
from .tcp import LwipTcpStream

if TYPE_CHECKING:
    from .dns.proxy import DnsProxy
    from .gateway import GatewayConfig
    from .stack import LwipStack

# The loggers these messages had before they moved here (operators filter on them).
log = logging.getLogger("tunlwip.gateway")
dial_log = logging.getLogger("tunlwip.predial")

TcpHandler = Callable[[LwipTcpStream, Endpoint], Awaitable[None]]

FlowKey = tuple[Endpoint, Endpoint]  # (client, original destination)
_MAX_SLEEP = 1.0  # the deadline task looks at least this often


class HeldDial:
    """One upstream connect for a held SYN."""

    __slots__ = ("connected_at", "key", "packet", "sock", "started", "token")

    def __init__(self, key: FlowKey, packet: bytes, sock: socket.socket, started: float):
        self.key = key
        self.packet = packet
        self.sock = sock
        self.started = started
        self.token = 0
        self.connected_at = 0.0

    @property
    def latency(self) -> float:
        return self.connected_at - self.started


Connected = Callable[[HeldDial], None]
Failed = Callable[[FlowKey, bytes, OSError, float], None]


class HeldSynDials:
    """The dials of held SYNs: connecting, then connected and waiting to be claimed.

    ``on_connected(dial)`` runs when a connect succeeded (``TcpForwarder`` releases the SYN);
    ``on_failed(key, packet, error, latency)`` when it failed or timed out (the socket is
    closed already). Both run on the trio thread, outside lwIP's callbacks.
    """

    def __init__(self, stack: LwipStack, dialer: Dialer, *, claim_timeout: float,
                 on_connected: Connected, on_failed: Failed) -> None:  # fmt: skip
        self._stack = stack
        self._dialer = dialer
        self.claim_timeout = claim_timeout
        self._on_connected = on_connected
        self._on_failed = on_failed
        # Both ordered by when they started waiting, so their deadlines are in order too.
        self._dialing: dict[FlowKey, HeldDial] = {}
        self._connected: dict[FlowKey, HeldDial] = {}
        # Both by client (``shares``): changed only by the four helpers below them.
        self._dialing_per_client = ClientCounts()
        self._connected_per_client = ClientCounts()
        self._wake_at = math.inf
        self._poke = trio.Event()

    def __len__(self) -> int:
        """Dials still connecting (the held SYNs)."""
        return len(self._dialing)

    def is_dialing(self, key: FlowKey) -> bool:
        return key in self._dialing

    def connected_count(self) -> int:
        """Upstreams connected and waiting for their client's handshake."""
        return len(self._connected)

    def dialing_for(self, client: IPAddress) -> int:
        """Held SYNs of ``client`` (its IPv4 address or IPv6 /64) still connecting."""
        return self._dialing_per_client.count(client)

    def connected_for(self, client: IPAddress) -> int:
        """Upstreams connected for ``client`` and waiting for its handshake."""
        return self._connected_per_client.count(client)

    def per_client_total(self) -> int:
        """Dials counted by client (equal to ``len(self) + connected_count()``; for tests)."""
        return self._dialing_per_client.total() + self._connected_per_client.total()

    def start(self, key: FlowKey, packet: bytes) -> None:
        """Start connecting to ``key``'s destination; the outcome arrives by callback (an
        immediate failure, such as no free file descriptor, too)."""
        now = trio.current_time()
        try:
            sock = self._dialer.start_tcp(key[1])
        except OSError as exc:
            self._on_failed(key, packet, exc, 0.0)
            return
        dial = HeldDial(key, packet, sock, now)
        try:
            dial.token = self._stack.watch_writable(sock.fileno(), lambda: self._finished(dial))
        except OSError as exc:
            sock.close()
            self._on_failed(key, packet, exc, 0.0)
            return
        self._add_dialing(dial)
        if now + self._dialer.connect_timeout < self._wake_at:
            self._poke.set()

    def claim(self, key: FlowKey) -> HeldDial | None:
        """The connected dial for ``key`` (now the caller's, with its socket), or None."""
        dial = self._connected.get(key)
        if dial is not None:
            self._drop_connected(dial)
        return dial

    def close(self) -> None:
        """Close every socket (the gateway stops)."""
        for dial in (*self._dialing.values(), *self._connected.values()):
            self._unwatch(dial)
            dial.sock.close()
        self._dialing.clear()
        self._connected.clear()
        self._dialing_per_client.clear()
        self._connected_per_client.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Enforce the dial and claim timeouts until cancelled."""
        task_status.started()
        try:
            while True:
                now = trio.current_time()
                self._expire(now)
                self._wake_at = min(now + _MAX_SLEEP, self._next_deadline())
                with trio.move_on_at(self._wake_at):
                    await self._poke.wait()
                self._poke = trio.Event()
        finally:
            self.close()

    # -- internals ------------------------------------------------------------------------------
    def _add_dialing(self, dial: HeldDial) -> None:
        self._dialing[dial.key] = dial
        self._dialing_per_client.add(dial.key[0].address)

    def _drop_dialing(self, dial: HeldDial) -> None:
        del self._dialing[dial.key]
        self._dialing_per_client.release(dial.key[0].address)

    def _add_connected(self, dial: HeldDial) -> None:
        old = self._connected.get(dial.key)
        if old is not None:  # a second SYN of the flow was dialed again: it replaces the first
            self._drop_connected(old)
            old.sock.close()
        self._connected[dial.key] = dial
        self._connected_per_client.add(dial.key[0].address)

    def _drop_connected(self, dial: HeldDial) -> None:
        del self._connected[dial.key]
        self._connected_per_client.release(dial.key[0].address)

    def _finished(self, dial: HeldDial) -> None:
        """The poll set saw the socket writable (or failed): the connect is over."""
        if self._dialing.get(dial.key) is not dial:
            return
        self._drop_dialing(dial)
        self._unwatch(dial)
        err = dial.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        now = trio.current_time()
        if err:
            dial.sock.close()
            self._on_failed(dial.key, dial.packet, _os_error(err), now - dial.started)
            return
        dial.connected_at = now
        self._add_connected(dial)
        self._on_connected(dial)

    def _unwatch(self, dial: HeldDial) -> None:
        if dial.token:
            self._stack.unwatch(dial.sock.fileno(), dial.token)
            dial.token = 0

    def _next_deadline(self) -> float:
        deadline = math.inf
        if self._dialing:
            deadline = next(iter(self._dialing.values())).started + self._dialer.connect_timeout
        if self._connected:
            first = next(iter(self._connected.values()))
            deadline = min(deadline, first.connected_at + self.claim_timeout)
        return deadline

    def _expire(self, now: float) -> None:
        timeout = self._dialer.connect_timeout
        while self._dialing:
            dial = next(iter(self._dialing.values()))
            if dial.started + timeout > now:
                break
            self._drop_dialing(dial)
            self._unwatch(dial)
            dial.sock.close()
            error = TimeoutError(errno.ETIMEDOUT, f"connect to {dial.key[1]} timed out")
            self._on_failed(dial.key, dial.packet, error, now - dial.started)
        while self._connected:
            dial = next(iter(self._connected.values()))
            if dial.connected_at + self.claim_timeout > now:
                break
            self._drop_connected(dial)  # the client never completed its handshake
            dial_log.debug("upstream for %s -> %s unclaimed; closed", *dial.key)
            dial.sock.close()


def _os_error(err: int) -> OSError:
    """The OSError subclass Python raises for ``err`` (ConnectionRefusedError, ...)."""
    return OSError(err, os.strerror(err))


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
        #: Dials in C (``c_dials``): on from ``start_serving`` when C reads the device and can
        #: protect the sockets itself; ``dials`` then only serves what C cannot.
        self.c_dials: CDials | None = None
        self._accepting = True
        #: Open connections the gateway waits for when it drains (not the DNS proxy's).
        self.active = 0
        self.idle = trio.Event()
        self.idle.set()
        self._serving = False

    def start_serving(self) -> None:
        """The gateway runs: SYNs may be held and dialed from now on."""
        self._serving = True
        if self.dials is not None and CDials.possible(self._stack, self._dialer):
            self.c_dials = CDials(self._stack, self._flows, on_failed=self._dial_failed,
                                  on_connected=self._c_connected, on_opened=self._c_opened,
                                  on_ended=self._c_ended)  # fmt: skip
            self.configure_c_dials()
            CDials.set_accepting(self._accepting)
            self._stack.c_dial_events = self.sync_c_dials
            self._dialer.also_own = CDials.is_own

    def configure_c_dials(self) -> None:
        """Apply the dialer's and the claim timeout's settings to C's dials (reconfigure)."""
        if self.c_dials is not None:
            CDials.configure(self._dialer, self.config.predial_claim_timeout)

    @property
    def accepting(self) -> bool:
        """False once the gateway drains: held SYNs are refused outright."""
        return self._accepting

    @accepting.setter
    def accepting(self, on: bool) -> None:
        self._accepting = on
        if self.c_dials is not None:
            CDials.set_accepting(on)

    def sync_c_dials(self) -> None:
        """Take what C's dials did since the last look (the stack calls it after a pass)."""
        if self.c_dials is None:
            return
        swallowed, loops = self.c_dials.sync()
        self.counts.swallowed += swallowed
        if loops:
            self._admission.loops_dropped_in_c(loops)

    def pending_dials(self) -> int:
        """SYNs held while their upstream connect runs (in Python or in C)."""
        held = len(self.dials) if self.dials is not None else 0
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

    def _flow_started(self) -> None:
        self.active += 1
        if self.active == 1:
            self.idle = trio.Event()

    def _end_flow(self, flow: LiveFlow, reason: str, *, counted: bool = True,
                  ago: float = 0.0) -> None:  # fmt: skip
        self._flows.close(flow, reason, ago)
        if counted:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def _forward(self, stream: LwipTcpStream, target: Endpoint, flow: LiveFlow) -> str | None:
        """Hand ``stream`` and its upstream to a C relay, which then owns the flow (returns
        None); or returns why the flow ended before that (the dial failed)."""
        dial_started = trio.current_time()
        try:
            upstream = await self._dialer.open_tcp(target)
        except OSError as exc:
            flow.connect_latency = trio.current_time() - dial_started
            if exc.errno in FD_SHORTAGE:
                self._admission.fd_shortage(exc)
            else:
                self.counts.failed += 1
            log.debug("dial %s for %s failed: %s", target, stream.remote, exc)
            stream.abort()
            return _dial_failure(exc)
        flow.connect_latency = trio.current_time() - dial_started
        self.counts.ok += 1
        self._start_relay(stream, upstream.socket, flow)
        return None

    def _start_relay(self, stream: LwipTcpStream, upstream: Any, flow: LiveFlow) -> None:
        """Hand ``stream`` and its connected ``upstream`` socket to a C relay, which owns the
        flow from then on. Raises ``trio.BrokenResourceError`` if the client is gone already
        (the socket is closed)."""
        # A partial, not a closure: it stays with each idle relay until the client speaks.
        name_from_first_bytes = functools.partial(_name_flow_from_first_bytes, flow)
        try:
            relay = self._stack.relay(stream, upstream, on_first_data=name_from_first_bytes)
        except BaseException:
            upstream.close()
            raise
        flow.count_bytes_with(relay.byte_counts)
        relay.when_done(functools.partial(self._relay_ended, flow))

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
        if dials.is_dialing(key):
            self.counts.swallowed += 1
            return True
        if not self.accepting:  # draining: refuse new flows outright
            self._answer(packet, refused=True)
            return True
        refused = self._admission.refused
        c = self.c_dials
        opening = self._stack.connection_count() + len(dials) + dials.connected_count()
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
        if c is None:
            dials.start(key, packet)
        elif (error := c.start(key)) is not None:
            self._dial_failed(key, packet, error, 0.0)
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

    def _dial_failed(self, key: FlowKey, packet: bytes, exc: OSError, latency: float) -> None:
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
        self._flows.failed("tcp", client, target, _dial_failure(exc), connect_latency=latency)

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


def _dial_failure(exc: OSError) -> str:
    """A flow record's close reason for a failed upstream dial."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "dial timeout"
    if isinstance(exc, ProtectError):
        return "protect failed"
    return "unreachable"


def _name_flow_from_first_bytes(flow: LiveFlow, data: bytes) -> None:
    """Name ``flow`` by the server name in the client's first bytes (TLS SNI, HTTP Host):
    what the client asked the server for beats the DNS guess."""
    name = sniff_name(data)
    if name is not None:
        flow.name = name

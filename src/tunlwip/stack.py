"""LwipStack: one lwIP instance bound to a packet device, driven from trio.

Theory of operation
-------------------
lwIP (NO_SYS) is a single-threaded state machine. Everything that enters it (packets from the
device, timers, writes and window updates from TCP streams) runs on the trio thread, one call at
a time, and lwIP answers by invoking callbacks (``binding.callbacks``, whose ``Sink`` this stack
is). Those callbacks only record events: they queue output packets, buffer received bytes and
unpark waiting tasks. They never enter lwIP again.

Four tasks drive it. The *poller* (``pollset.PollSet``) waits for one epoll set that C keeps:
the device's fd (if the device is an ``FdPacketDevice``: C reads batches of packets into lwIP),
the upstream sockets of C relays (``relay.py``) and watched sockets (UDP sessions); one wakeup
serves them all. For a device without an fd the *reader* feeds packets to lwIP one by one. The
*timer* runs lwIP's timers at most 250 ms apart; the *writer* delivers queued output to the
device (unless the device let C write to its fd directly). lwIP's clock is trio's clock
(``pollset.LwipClock``), so trio's ``autojump_clock`` makes retransmissions and TIME-WAIT
instant in tests.

What the stack does with a packet is fixed at construction: the ``StackHooks`` (held SYNs,
UDP datagrams, forwarded echo requests, accepted connections taken without a task) are passed
to ``LwipStack`` and never change.

lwIP has global state and can be initialised once per process, so one stack runs at a time; a
stack tears down by aborting its connections and removing its netif, after which another stack
may run (tests do this constantly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn

import trio

from .binding import admit as cadmit
from .binding import callbacks, core
from .binding import dial as cdial
from .binding import relay as crelay
from .binding import tcp as ctcp
from .binding import udp_relay as cudp
from .binding.tcp import Pcb
from .config.sections import StackConfig as StackConfig
from .connections import ConnectionTable, CountsInC
from .device import FdPacketDevice, PacketDevice
from .dialer import Keepalive
from .endpoint import Endpoint, IPAddress
from .errors import LwipError, TunlwipError
from .hooks import StackHooks as StackHooks
from .pollset import LwipClock, PollSet
from .relay import FirstDataCallback, Relay
from .shares import client_key
from .snapshot import StackStatistics as StackStatistics
from .tcp import LwipTcpStream

log = logging.getLogger("tunlwip.stack")

TcpHandler = Callable[[LwipTcpStream, Endpoint], Awaitable[None]]

_TIMER_CAP_SECONDS = 0.25
_RELAY_SWEEP_SECONDS = 1.0
_READ_BATCH = 64  # packets read before the reader lets other tasks run


def _apply_keepalive(keepalive: Keepalive | None) -> None:
    if keepalive is None:
        core.set_tcp_keepalive(0, 0, 0)
    else:
        core.set_tcp_keepalive(keepalive.idle * 1000, keepalive.interval * 1000, keepalive.count)


def _hook_set_afterwards(stack: LwipStack, value: object) -> NoReturn:
    raise AttributeError("a stack's hooks are fixed at construction: pass "
                         "LwipStack(device, config, hooks=StackHooks(...))")  # fmt: skip


_active: LwipStack | None = None


class LwipStack:
    """One lwIP instance on one packet device; ``run`` drives it until cancelled."""

    def __init__(
        self,
        device: PacketDevice,
        config: StackConfig | None = None,
        *,
        hooks: StackHooks | None = None,
    ) -> None:
        self.device = device
        self.config = config or StackConfig()
        self._hooks = hooks or StackHooks()
        self._accepted: list[LwipTcpStream] = []
        self._after: list[Callable[[], None]] = []
        #: False: every new connection is refused as at ``max_tcp_connections`` (the gateway
        #: draining before it stops).
        self.accepting = True
        self._connections = ConnectionTable(
            CountsInC(relays=cdial.relayed, held_by=_open_in_c),
            mirror=functools.partial(cadmit.python_count, cadmit.PY_OPEN))  # fmt: skip
        #: Open connections (streams and relays) by client.
        self.client_connections = self._connections.client_connections
        # The table's own dicts (never replaced), looked up by every lwIP callback.
        self._streams = self._connections.streams
        self._relays = self._connections.relays
        #: Let the poll task wait in C while trio is idle (``loopidle``); off: always via trio.
        self.wait_in_c = True
        self._clock = LwipClock()
        self._poll_set = PollSet(device, self._clock, self.after_lwip)
        #: Relays with no byte moved for this long are reset (None: never).
        self.relay_idle_timeout: float | None = None
        self._tcp_keepalive: Keepalive | None = None
        self._outbox: list[bytes] = []
        self._output_ready = trio.Event()
        self._handler: TcpHandler | None = None
        self._handler_nursery: trio.Nursery | None = None
        self._running = False
        self._callback_errors = 0
        self._packets_sent_outside_lwip = 0
        #: Takes the events of C's dials (``c_dials``), set by the forwarder that turned them on.
        self.c_dial_events: Callable[[], None] | None = None

    # -- public API ---------------------------------------------------------------------------
    async def run(
        self,
        tcp_handler: TcpHandler,
        *,
        handler_nursery: trio.Nursery | None = None,
        task_status: trio.TaskStatus[LwipStack] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Drive lwIP until cancelled; each accepted connection runs ``tcp_handler(stream,
        target)`` in ``handler_nursery`` (default: a nursery of this call). ``target`` is the
        original destination the client asked for."""
        global _active
        if _active is not None:
            raise TunlwipError("an LwipStack is already running in this process (lwIP is global)")
        _active = self
        try:
            self._start_lwip()
            self._handler = tcp_handler
            async with trio.open_nursery() as nursery:
                self._handler_nursery = handler_nursery or nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._timer)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._poller)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._stop_lwip()
            _active = None
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def hooks(self) -> StackHooks:
        """Where the stack hands what it does not handle itself, as given at construction."""
        return self._hooks

    # The hooks were once attributes set after construction; setting one now would be ignored
    # silently, so these names refuse it and say what to do instead.
    syn_interceptor = property(lambda self: self._hooks.syn_interceptor, _hook_set_afterwards)
    udp_receiver = property(lambda self: self._hooks.udp_receiver, _hook_set_afterwards)
    icmp_echo_receiver = property(lambda self: self._hooks.icmp_echo_receiver,
                                  _hook_set_afterwards)  # fmt: skip
    accept_taker = property(lambda self: self._hooks.accept_taker, _hook_set_afterwards)

    @property
    def tcp_keepalive(self) -> Keepalive | None:
        """lwIP's keepalive toward clients, for connections accepted from now on (None: off).
        A client that stops answering for ``budget`` seconds gets a RST and its flow ends
        ("client timeout" for a relay: its upstream is reset). Timing runs on lwIP's 500 ms
        slow timer, so each step may come up to half a second late."""
        return self._tcp_keepalive

    @tcp_keepalive.setter
    def tcp_keepalive(self, keepalive: Keepalive | None) -> None:
        self._tcp_keepalive = keepalive
        _apply_keepalive(keepalive)

    def statistics(self) -> StackStatistics:
        counters = core.counters()
        counters["packets_out"] += self._packets_sent_outside_lwip
        counters["callback_errors"] = self._callback_errors
        counters.update(crelay.counters())
        counters.update(cudp.counters())
        counters.update(cdial.counters())
        counters["tcp_refused_at_limit"] = self._connections.refused_at_limit
        counters["tcp_refused_buffers_full"] = self._connections.refused_buffer_full
        counters["tcp_refused_client_share"] = self._connections.refused_client_share
        return StackStatistics(
            tcp_connections=self.connection_count(),
            lwip_tcp_pcbs=core.tcp_pcb_count(),
            counters=counters,
        )

    def reads_device_in_c(self) -> bool:
        """Does C read the device's packets (so a connection may run with no Python)?"""
        device = self.device
        return isinstance(device, FdPacketDevice) and device.direct_input_fd() is not None

    def release_syn(self, packet: bytes) -> None:
        """Feed a SYN that ``syn_interceptor`` held back to lwIP, which then answers it."""
        self._clock.tick()
        core.input_release(packet)
        self.after_lwip()

    def send_to_client(self, packet: bytes) -> None:
        """Queue a packet built outside lwIP (RST or ICMP answering a held SYN)."""
        self._packets_sent_outside_lwip += 1
        self._outbox.append(packet)
        self._output_ready.set()

    def relay(
        self,
        stream: LwipTcpStream,
        upstream: Any,
        *,
        on_first_data: FirstDataCallback | None = None,
    ) -> Relay:
        """Hand ``stream`` and its connected ``upstream`` socket (stdlib or trio; its fd is
        taken over) to the C relay, which forwards both ways with half-close until both ends
        finished, either reset, or the relay idle timeout. The stream is closed afterwards;
        ``on_first_data`` sees the client's first bytes (up to 4 KiB) before they go on.
        Raises ``trio.BrokenResourceError`` if the connection is already gone (the socket is
        then left to the caller) and ``LwipError`` if the relay cannot be set up (both ends
        reset)."""
        conn_id = stream.conn_id
        relay = Relay(stream.remote, stream.local, on_first_data, self.after_lwip)
        self._relays[conn_id] = relay  # first, so the client's share passes to the relay
        try:
            pcb, pending, client_eof = stream.hand_over()
        except BaseException:
            self._relays.pop(conn_id, None)
            self._connections.gone(conn_id)
            raise
        fd = upstream.detach()
        if pending:  # the first bytes arrived before the handover: name the flow now
            self._first_data(relay, pending)
        self._clock.tick()
        try:
            handle = crelay.open_relay(pcb, fd, conn_id, pending, client_eof,
                                       relay.on_first_data is not None)  # fmt: skip
        except LwipError:
            self.after_lwip()
            self._relays.pop(conn_id, None)
            self._connections.gone(conn_id)
            os.close(fd)
            ctcp.abort(pcb)
            self.after_lwip()
            raise
        self.after_lwip()
        if handle is not None:
            relay.started(handle)
        return relay

    def watch_readable(self, fd: int, on_ready: Callable[[], None]) -> int:
        """Call ``on_ready()`` whenever ``fd`` is readable (level-triggered), from the relay
        poll task, with no task of its own: how a UDP session is relayed for a few hundred
        bytes. ``on_ready`` may send to clients. Returns a token for ``unwatch``; unwatch
        before closing the fd. Raises OSError if the fd cannot be watched."""
        return self._poll_set.watch(fd, on_ready, writable=False)

    def watch_writable(self, fd: int, on_ready: Callable[[], None]) -> int:
        """Like ``watch_readable``, for writability (or an error): how a non-blocking
        ``connect()`` is waited for without a task. Unwatch once it fired."""
        return self._poll_set.watch(fd, on_ready, writable=True)

    def unwatch(self, fd: int, token: int) -> None:
        """Stop watching ``fd`` (registered as ``token``); harmless if already stopped."""
        self._poll_set.unwatch(fd, token)

    def send_udp(self, data: bytes, *, src: Endpoint, dst: Endpoint) -> None:
        """Send a datagram to client ``dst`` appearing to come from ``src`` (any address);
        keyword-only, as a swapped pair of Endpoints would fail silently."""
        try:
            core.udp_send(data, src, dst)
        finally:
            self.after_lwip()

    def output_burst(self) -> contextlib.AbstractContextManager[None]:
        """``with stack.output_burst():`` around several ``send_udp`` calls lets a device with
        a virtio-net header take a flow's same-size datagrams in one write (USO)."""
        return core.output_batch()

    def send_icmp(self, message: bytes, src: Endpoint, dst: Endpoint) -> None:
        """Send an ICMP/ICMPv6 message (checksum filled in) to client ``dst`` from ``src``;
        ports are ignored. lwIP fragments it if it exceeds the MTU."""
        try:
            core.icmp_send(message, src, dst)
        finally:
            self.after_lwip()

    def inject_packet(self, packet: bytes) -> None:
        """Process one client packet now (what the reader task does for device packets)."""
        self._clock.tick()
        core.input_packet(packet)
        if core.sleeptime() == 0:
            core.check_timeouts()
        self.after_lwip()

    def set_host_addresses(
        self, addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]
    ) -> int:
        """Refuse client flows to these addresses (the gateway host's own: dialed, they would
        reach the host's services on ``lo``), as loopback is refused; replaces the previous
        set. The stack's own addresses are left out: they are the DNS proxy's. Ignored with
        ``forward_local_destinations``, like loopback. Returns how many were set."""
        own = {self.config.ipv4_address, self.config.ipv6_address}
        chosen = sorted({a for a in addresses if a not in own}, key=lambda a: (a.version, a))
        core.set_host_addresses(chosen)
        return len(chosen)

    # -- lifecycle ----------------------------------------------------------------------------
    def _start_lwip(self) -> None:
        cfg = self.config
        self._clock.start()
        core.init(cfg.mtu, cfg.ipv4_address, cfg.ipv6_address)
        callbacks.set_sink(self)
        core.reset_counters()
        crelay.reset_counters()
        cudp.reset_counters()
        cdial.reset_counters()
        cadmit.reset_counters()
        cadmit.forget_python()  # this stack's tables start empty; a previous stack's are gone
        core.set_checksum_check(cfg.verify_checksums)
        _apply_keepalive(self._tcp_keepalive)  # lwIP is global: another stack may have set it
        core.set_client_networks(cfg.client_networks)
        device = self.device
        if isinstance(device, FdPacketDevice):
            # A device whose packets carry a virtio-net header (a TUN we opened) gets its output
            # coalesced into GSO writes in C; the header applies to the C reader's reads too.
            core.set_vnet_header(device.vnet_header)
            core.set_vnet_offloads(getattr(device, "offloads", 0) if device.vnet_header else 0)
            if (out_fd := device.direct_output_fd()) is not None:
                core.set_output_fd(out_fd)
        else:
            core.set_vnet_header(False)
            core.set_vnet_offloads(0)
            if hasattr(device, "direct_input_fd") or hasattr(device, "direct_output_fd"):
                log.warning("%s offers a direct fd but is not an FdPacketDevice (it needs "
                            "vnet_header, direct_input_fd and direct_output_fd): its packets "
                            "go through Python, one at a time", type(device).__name__)  # fmt: skip
        core.set_hold_syns(self._hooks.syn_interceptor is not None)
        core.set_forward_local(cfg.forward_local_destinations)
        self._apply_packet_policy(cfg, None)
        self._running = True

    def apply_packet_policy(self, config: StackConfig) -> None:
        """Switch the running stack to ``config``'s QUIC and ICMP echo policy and half-open
        limit (the packet filters in C); the other fields (device, addresses, client networks)
        stay as started.
        """
        self._apply_packet_policy(config, self.config)
        self.config = dataclasses.replace(self.config, blocked_udp_ports=config.blocked_udp_ports,
                                          blocked_udp_action=config.blocked_udp_action,
                                          icmp_echo=config.icmp_echo)  # fmt: skip

    def _apply_packet_policy(self, cfg: StackConfig, old: StackConfig | None) -> None:
        if old is not None:
            for port in old.blocked_udp_ports:
                core.set_udp_port_action(port, "off")
        if cfg.blocked_udp_action != "off":
            for port in cfg.blocked_udp_ports:
                core.set_udp_port_action(port, cfg.blocked_udp_action)
        echo = cfg.icmp_echo
        if echo == "forward" and self._hooks.icmp_echo_receiver is None:
            log.warning("icmp_echo is 'forward' but nothing receives echoes; replying instead")
            echo = "reply"
        core.set_icmp_echo_mode(echo)
        core.set_max_half_open(cfg.max_half_open)

    def tick_clock(self) -> None:
        """Bring lwIP's clock to now (C stamps and ages things by it between poll passes)."""
        self._clock.tick()

    def _stop_lwip(self) -> None:
        self._running = False
        cadmit.configure(on=False)  # no SYN of a stopped stack is admitted, nor of the next one
        self._clock.tick()
        self._poll_set.stop()
        crelay.abort_all()  # closes every upstream socket (reported as "stopped")
        cudp.close_all()  # C UDP sessions; their owners close their sockets
        cdial.close_all()
        if self.c_dial_events is not None:
            self.c_dial_events()  # the C relays' ends, before the stack forgets them
        cdial.configure(on=False)
        for stream in list(self._streams.values()):
            stream.on_stack_stopped()
        self._connections.clear()
        self._clock.tick()
        core.deinit()
        callbacks.set_sink(None)
        self._outbox.clear()
        self._accepted.clear()
        self._after.clear()

    # -- tasks --------------------------------------------------------------------------------
    async def _reader(self) -> None:
        device = self.device
        fd = device.direct_input_fd() if isinstance(device, FdPacketDevice) else None
        if fd is None:
            await self._read_packets()
            return
        # The fast path: the poll set reads the device in C (``_poller``), so one wakeup
        # serves client packets and upstream sockets alike.
        self._poll_set.read_device_fd(fd)

    async def _read_packets(self) -> None:
        device = self.device
        burst = 0
        while True:
            try:
                packet = await device.receive_packet()
            except (trio.ClosedResourceError, trio.EndOfChannel):
                log.info("packet device closed; the stack stops reading")
                return
            self.inject_packet(packet)
            burst += 1
            if burst == _READ_BATCH:
                # A device with packets waiting returns without yielding; under a flood the
                # reader would starve every other task (UDP relays, timers, the writer).
                burst = 0
                await trio.lowlevel.checkpoint()

    async def _poller(self) -> None:
        await self._poll_set.run(wait_in_c=self.wait_in_c)

    async def _timer(self) -> None:
        next_sweep = trio.current_time()
        while True:
            self._clock.tick()
            core.check_timeouts()
            if trio.current_time() >= next_sweep:
                next_sweep = trio.current_time() + _RELAY_SWEEP_SECONDS
                self._poll_set.check_device_fd()
                idle = self.relay_idle_timeout
                crelay.sweep(0 if idle is None else max(1, int(idle * 1000)))
            self.after_lwip()
            sleep_ms = core.sleeptime()
            delay = _TIMER_CAP_SECONDS if sleep_ms == core.SLEEPTIME_INFINITE else sleep_ms / 1000
            await trio.sleep(min(delay, _TIMER_CAP_SECONDS))

    async def _writer(self) -> None:
        while True:
            await self._output_ready.wait()
            self._output_ready = trio.Event()
            batch, self._outbox = self._outbox, []
            for packet in batch:
                try:
                    await self.device.send_packet(packet)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                except OSError as exc:
                    log.warning("device write failed, packet dropped: %s", exc)

    # -- the engine streams use (tcp.StreamEngine) and the work queued by callbacks -------------
    @property
    def max_buffered_bytes_per_connection(self) -> int:
        return self.config.max_buffered_bytes_per_connection

    def call_after_lwip(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` as soon as the current lwIP call returns: how a callback (which must
        not re-enter lwIP) gets a packet sent."""
        self._after.append(fn)

    def buffered_bytes(self) -> int:
        """Client bytes received and not yet read, over the Python streams."""
        return self._connections.buffered_bytes()

    def connection_count(self) -> int:
        """Open TCP connections: Python streams and C relays."""
        return len(self._connections)

    def after_lwip(self) -> None:
        """Run what lwIP's callbacks queued during the call just made: dispatch accepted
        connections, deferred calls, wake the writer for output."""
        if self._accepted:
            self._dispatch_accepted()
        if self.c_dial_events is not None and cdial.waiting():
            self.c_dial_events()
        while self._after:
            after, self._after = self._after, []
            for fn in after:
                try:
                    fn()
                except Exception:
                    log.exception("deferred call failed")
        if self._outbox:
            self._output_ready.set()

    def _dispatch_accepted(self) -> None:
        """Give connections accepted during the last lwIP call to ``accept_taker``, else to a
        handler task (lwIP must not be re-entered from its accept callback, hence the list)."""
        accepted, self._accepted = self._accepted, []
        taker = self._hooks.accept_taker
        for stream in accepted:
            taken = False
            if taker is not None:
                try:
                    taken = taker(stream)
                except Exception:
                    log.exception("accept_taker failed for %s -> %s; resetting", stream.remote,
                                  stream.local)  # fmt: skip
                    stream.abort()
                    stream.close_now()
                    continue
            if not taken:
                assert self._handler_nursery is not None
                self._handler_nursery.start_soon(self._run_handler, stream)

    def forget(self, conn_id: int) -> None:
        """A stream ended or was handed over: it is no stream any more."""
        self._connections.forget_stream(conn_id)

    async def _run_handler(self, stream: LwipTcpStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream, stream.local)
        except Exception:
            log.exception("TCP handler failed for %s -> %s; resetting", stream.remote, stream.local)
            stream.abort()
        finally:
            stream.close_now()

    # -- lwIP callbacks (binding.callbacks.Sink); never re-enter lwIP here -----------------------
    def on_accept(self, pcb: Pcb) -> int:
        # 0 refuses: lwIP resets the connection.
        if not self._running or not self._connections.has_room(self.config, self.accepting):
            return 0
        local, client = ctcp.endpoints(pcb)
        conn_id = self._connections.admit(client.address, self.config.connection_share)
        if conn_id == 0:
            return 0
        try:
            stream = LwipTcpStream(self, conn_id, pcb, local, client)
        except BaseException:
            self._connections.gone(conn_id)  # the client's share back
            raise
        self._streams[conn_id] = stream
        self._accepted.append(stream)  # dispatched once lwIP returns (after_lwip)
        return conn_id

    def on_recv(self, conn: int, data: bytes | None, may_defer: bool) -> bool:
        stream = self._streams.get(conn)
        return stream.on_recv(data, may_defer) if stream is not None else True

    def on_sent(self, conn: int, length: int) -> None:
        stream = self._streams.get(conn)
        if stream is not None:
            stream.on_sent(length)

    def on_error(self, conn: int, err: int) -> None:
        stream = self._streams.pop(conn, None)
        if stream is not None:
            self._connections.gone(conn)
            stream.on_error(err)

    def on_output(self, packet: bytes) -> None:
        # Waking the writer here, not only in after_lwip: output can come from a call made
        # inside one of lwIP's callbacks (closing a C UDP session mirrors ICMP), where
        # after_lwip must not run.
        self._outbox.append(packet)
        self._output_ready.set()

    def on_syn(self, packet: bytes, src: Endpoint, dst: Endpoint) -> bool:
        interceptor = self._hooks.syn_interceptor
        return interceptor is not None and interceptor(packet, src, dst)

    def on_udp(self, src: Endpoint, dst: Endpoint, data: bytes) -> bool:
        receiver = self._hooks.udp_receiver
        if receiver is None:
            return False
        receiver(src, dst, data)
        return True

    def on_icmp_echo(self, src: Endpoint, dst: Endpoint, message: bytes) -> None:
        receiver = self._hooks.icmp_echo_receiver
        if receiver is not None:
            receiver(src, dst, message)

    def on_relay_done(self, conn: int, reason: int, bytes_up: int, bytes_down: int) -> None:
        relay = self._relays.pop(conn, None)
        if relay is not None:
            self._connections.gone(conn)
            relay.finish(reason, bytes_up, bytes_down)

    def on_fd_ready(self, token: int) -> None:
        self._poll_set.fd_ready(token)

    def on_relay_first_data(self, conn: int, data: bytes) -> None:
        relay = self._relays.get(conn)
        if relay is not None:
            self._first_data(relay, data)

    @staticmethod
    def _first_data(relay: Relay, data: bytes) -> None:
        callback, relay.on_first_data = relay.on_first_data, None
        if callback is not None:
            try:
                callback(data)
            except Exception:
                log.debug("first-data callback failed", exc_info=True)

    def on_callback_error(self, exc: BaseException) -> None:
        self._callback_errors += 1


def _open_in_c(client: IPAddress) -> int:
    """Connections C dialed for ``client``'s client, connected or relayed."""
    return cadmit.client_counts(client_key(client))[1]

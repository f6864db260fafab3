"""A small TCP client in pure Python that plays "the app" behind the TUN in trio tests.

It speaks to the stack under test through an in-memory device, using only ``packets`` for
building and checking segments, so it shares no code (or bugs) with the stack. It implements
just enough TCP to be a fair, strict peer: handshake with options, windowed sending with
retransmission, in-order delivery with out-of-order buffering, FIN and RST.

Every wait is bounded by ``timeout`` (trio time, so the autojump clock makes it instant), and
retransmission uses a fixed ``rto`` of trio time as well.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from packets import ACK, FIN, PROTO_TCP, PSH, RST, SYN, Parsed, parse, problems, tcp_options
from packets import tcp_packet as build_tcp

_MOD = 1 << 32
_DEFAULT_MSS = {4: 536, 6: 1220}  # RFC 9293 3.7.1 when the SYN-ACK carries no MSS option


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` in 32-bit sequence space."""
    return (a - b + (1 << 31)) % _MOD - (1 << 31)


class PacketDevice(Protocol):
    def inject_packet(self, packet: bytes) -> None: ...

    async def receive_emitted(self) -> bytes: ...


@dataclass(frozen=True)
class InvalidPacket:
    """A packet the stack emitted that a kernel would have dropped."""

    reasons: list[str]
    raw: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"InvalidPacket({self.reasons!r}, raw={self.raw.hex()})"


class PacketWire:
    """Owns the device: reads what the stack emits, checks it and routes TCP to its peer."""

    def __init__(self, device: PacketDevice, *, timeout: float = 30.0) -> None:
        self.device = device
        self.timeout = timeout
        self.invalid: list[InvalidPacket] = []
        self._peers: dict[tuple[str, int, str, int], TcpPeer] = {}
        self._unmatched_send, self._unmatched_receive = trio.open_memory_channel[Parsed](math.inf)
        self._timer_changed = trio.Event()

    def send(self, packet: bytes) -> None:
        self.device.inject_packet(packet)

    async def next_unmatched(self) -> Parsed:
        """The next emitted packet no peer claimed (UDP, ICMP, stray TCP...)."""
        with trio.fail_after(self.timeout):
            packet: Parsed = await self._unmatched_receive.receive()
        return packet

    def unmatched_nowait(self) -> list[Parsed]:
        out: list[Parsed] = []
        while True:
            try:
                out.append(self._unmatched_receive.receive_nowait())
            except trio.WouldBlock:
                return out

    def register(self, peer: TcpPeer) -> None:
        self._peers[peer.key] = peer

    def unregister(self, peer: TcpPeer) -> None:
        self._peers.pop(peer.key, None)

    def timers_changed(self) -> None:
        """Wake the timer task because some peer's retransmission deadline moved."""
        self._timer_changed.set()
        self._timer_changed = trio.Event()

    async def run(self) -> None:
        """Pump emitted packets and fire retransmission timers until the device closes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timer_loop)
            await self._receive_loop()
            nursery.cancel_scope.cancel()

    async def _receive_loop(self) -> None:
        while True:
            try:
                raw = await self.device.receive_emitted()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            reasons = problems(raw)
            if reasons:
                self.invalid.append(InvalidPacket(reasons, raw))
                continue  # a kernel would drop it, so the peer never sees it
            packet = parse(raw)
            peer = None
            if packet.proto == PROTO_TCP and not packet.is_fragment:
                peer = self._peers.get((packet.dst, packet.dport, packet.src, packet.sport))
            if peer is not None:
                peer.on_segment(packet)
            else:
                self._unmatched_send.send_nowait(packet)

    async def _timer_loop(self) -> None:
        while True:
            changed = self._timer_changed
            deadline = min((p.rtx_deadline for p in self._peers.values()), default=math.inf)
            with trio.move_on_at(deadline):
                await changed.wait()
            now = trio.current_time()
            for peer in list(self._peers.values()):
                if peer.rtx_deadline <= now:
                    peer.on_timeout()


class TcpPeer:
    """One client-side TCP connection (the app's end of a flow through the gateway)."""

    def __init__(
        self,
        wire: PacketWire,
        src: str,
        sport: int,
        dst: str,
        dport: int,
        *,
        mss: int = 1460,
        wscale: int | None = 7,
        window: int = 262144,
        isn: int = 1000,
        rto: float = 1.0,
        timeout: float = 30.0,
    ) -> None:
        self.wire = wire
        self.src, self.dst = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
        self.sport, self.dport = sport, dport
        self.mss, self.wscale, self.window, self.isn = mss, wscale, window, isn % _MOD
        self.rto, self.timeout = rto, timeout
        self.key = (self.src, self.sport, self.dst, self.dport)
        self.segments: list[Parsed] = []  # everything the stack sent us, in arrival order
        self.stack_isn: int | None = None
        self.stack_mss: int | None = None
        self.stack_wscale: int | None = None
        self.established = self.eof_received = self.reset_received = self.fin_acked = False
        self.aborted = False  # we sent RST
        self.violations: list[str] = []  # protocol errors the stack made towards us
        self.rtx_deadline = math.inf
        self.retransmissions = 0
        #: Answer keepalive probes (an empty segment below rcv_nxt) with an ACK, as RFC 9293
        #: has every TCP answer an unacceptable segment; off, the peer looks gone to them.
        self.answer_probes = True
        self.probes_answered = 0
        # Send side: _outbuf holds every byte from snd_una on; the first _in_flight are sent.
        self.snd_una = self.isn
        self.snd_wnd = 0  # bytes, already scaled
        self.snd_max = self.isn  # highest sequence number sent, plus one
        self._outbuf = bytearray()
        self._in_flight = 0
        self._fin_queued = self._fin_in_flight = False
        self._fin_seq: int | None = None
        # Receive side.
        self.rcv_nxt = 0
        self._inbuf = bytearray()
        self._ooo: list[tuple[int, bytes, bool]] = []  # (seq, data, fin) beyond rcv_nxt
        self._last_adv = 0
        self._changed = trio.Event()

    # -- state for tests --------------------------------------------------------------------
    @property
    def snd_nxt(self) -> int:
        return (self.snd_una + self._in_flight + self._fin_in_flight) % _MOD

    @property
    def seq(self) -> int:
        return self.snd_nxt

    @property
    def ack(self) -> int:
        return self.rcv_nxt

    @property
    def unacked(self) -> int:
        """Queued or in-flight bytes the stack has not acknowledged yet."""
        return len(self._outbuf)

    def _scaling(self) -> bool:
        return self.wscale is not None and self.stack_wscale is not None

    # -- public API -------------------------------------------------------------------------
    async def connect(self) -> None:
        """Three-way handshake; ``ConnectionRefusedError`` if the stack answers with RST."""
        self.wire.register(self)
        self._send_syn()
        await self._wait(lambda: self.established or self.reset_received)
        if self.reset_received:
            raise ConnectionRefusedError(f"{self.dst}:{self.dport} refused")

    async def send(self, data: bytes) -> None:
        """Queue ``data`` and return once all of it has been transmitted (not necessarily acked)."""
        if self._fin_queued or self.aborted or not self.established:
            raise RuntimeError("send on a connection that is not open for sending")
        self._check_reset()
        self._outbuf += data
        self._push()
        await self._wait(lambda: self._in_flight == len(self._outbuf) or self.reset_received)
        self._check_reset()

    async def wait_acked(self) -> None:
        """Wait until the stack acknowledged everything sent so far, FIN included."""
        await self._wait(
            lambda: (
                self.reset_received
                or (not self._outbuf and (self.fin_acked or not self._fin_queued))
            )
        )
        self._check_reset()

    async def shutdown(self) -> None:
        """Send FIN once queued data is out; returns when the FIN has been transmitted."""
        if self.aborted or not self.established:
            raise RuntimeError("shutdown on a connection that is not open")
        self._fin_queued = True
        self._push()
        await self._wait(lambda: self._fin_seq is not None or self.reset_received)
        self._check_reset()

    def send_rst(self) -> None:
        """Abort: send RST and stop retransmitting."""
        self._emit(RST | ACK, self.snd_nxt)
        self.aborted = True
        self._outbuf.clear()
        self._in_flight = 0
        self._fin_in_flight = False
        self._set_timer(math.inf)

    def detach(self) -> None:
        self.wire.unregister(self)

    async def recv(self, n: int | None = None) -> bytes:
        """Up to ``n`` in-order bytes; waits for at least one. ``b""`` means EOF."""
        await self._wait(lambda: bool(self._inbuf) or self.eof_received or self.reset_received)
        if not self._inbuf:
            self._check_reset()
            return b""
        take = len(self._inbuf) if n is None else n
        data = bytes(self._inbuf[:take])
        del self._inbuf[:take]
        threshold = max(1, self.window // 2)
        if self._last_adv < threshold <= self._free_window():
            self._emit(ACK, self.snd_nxt)  # window update, or the stack stays stalled
        return data

    async def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.recv(n - len(out))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    async def recv_until_eof(self) -> bytes:
        out = bytearray()
        while chunk := await self.recv():
            out += chunk
        return bytes(out)

    # -- waiting ----------------------------------------------------------------------------
    async def wait_reset(self) -> None:
        """Wait until the stack resets the connection (also after EOF, when ``recv`` no
        longer waits)."""
        await self._wait(lambda: self.reset_received)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        with trio.fail_after(self.timeout):
            while not ready():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check_reset(self) -> None:
        if self.reset_received:
            raise ConnectionResetError(f"{self.dst}:{self.dport} reset the connection")

    def _set_timer(self, deadline: float) -> None:
        self.rtx_deadline = deadline
        self.wire.timers_changed()

    # -- sending ----------------------------------------------------------------------------
    def _free_window(self) -> int:
        return max(0, self.window - len(self._inbuf))

    def _emit(self, flags: int, seq: int, payload: bytes = b"", options: bytes = b"") -> None:
        if flags & SYN:
            window = min(self.window, 0xFFFF)  # never scaled in a SYN (RFC 7323 2.2)
        else:
            self._last_adv = self._free_window()
            shift = self.wscale if self._scaling() and self.wscale is not None else 0
            window = min(self._last_adv >> shift, 0xFFFF)
        ack = self.rcv_nxt if flags & ACK else 0
        end = (seq + len(payload) + bool(flags & (SYN | FIN))) % _MOD
        if seq_diff(end, self.snd_max) > 0:
            self.snd_max = end
        packet = build_tcp(
            self.src,
            self.dst,
            self.sport,
            self.dport,
            seq=seq,
            ack=ack,
            flags=flags,
            payload=payload,
            window=window,
            options=options,
        )
        self.wire.send(packet)

    def _send_syn(self) -> None:
        options = tcp_options(mss=self.mss, wscale=self.wscale)
        self._emit(SYN, self.isn, options=options)
        self._set_timer(trio.current_time() + self.rto)

    def _push(self) -> bool:
        """Send whatever the window allows; True if anything went out."""
        if not self.established or self.reset_received or self.aborted:
            return False
        sent = False
        mss = min(self.mss, self.stack_mss or self.mss)
        while True:
            unsent = len(self._outbuf) - self._in_flight
            room = self.snd_wnd - self._in_flight
            if unsent > 0 and room > 0:
                n = min(unsent, mss, room)
                start = self._in_flight
                self._in_flight += n
                flags = ACK | (PSH if n == unsent else 0)
                seq = (self.snd_una + start) % _MOD
                self._emit(flags, seq, bytes(self._outbuf[start : start + n]))
                sent = True
            elif unsent == 0 and self._fin_queued and not (self._fin_in_flight or self.fin_acked):
                self._fin_seq = self.snd_nxt
                self._fin_in_flight = True
                self._emit(FIN | ACK, self._fin_seq)
                sent = True
            else:
                break
        if (self._outbuf or self._fin_in_flight) and self.rtx_deadline == math.inf:
            self._set_timer(trio.current_time() + self.rto)  # retransmit, or probe the window
        self._notify()
        return sent

    def on_timeout(self) -> None:
        """RTO fired: go back to snd_una and resend; probe a zero window with one byte."""
        self.retransmissions += 1
        self._set_timer(math.inf)
        if not self.established:
            if not self.reset_received:
                self._send_syn()
            return
        self._in_flight = 0
        self._fin_in_flight = False
        if not self._push() and self._outbuf:
            self._in_flight = 1  # zero-window probe; the stack ACKs it even if it drops it
            self._emit(ACK, self.snd_una, bytes(self._outbuf[:1]))
        if self._outbuf or (self._fin_seq is not None and not self.fin_acked):
            self._set_timer(trio.current_time() + self.rto)

    # -- receiving --------------------------------------------------------------------------
    def on_segment(self, seg: Parsed) -> None:
        """Handle one valid segment the stack sent on this connection."""
        self.segments.append(seg)
        try:
            if seg.flags & RST:
                self._on_rst(seg)
            elif not self.established:
                self._on_syn_ack(seg)
            else:
                self._on_established(seg)
        finally:
            self._notify()

    def _on_rst(self, seg: Parsed) -> None:
        if not self.established and not (seg.flags & ACK and seg.ack == (self.isn + 1) % _MOD):
            return  # RFC 9293: in SYN-SENT only an RST acking our SYN counts
        self.reset_received = True
        self._set_timer(math.inf)

    def _on_syn_ack(self, seg: Parsed) -> None:
        if seg.flags & (SYN | ACK) != SYN | ACK or seg.ack != (self.isn + 1) % _MOD:
            return
        self.stack_isn = seg.seq
        self.stack_mss = int(seg.tcp_options.get("mss", _DEFAULT_MSS[seg.version]))
        wscale = seg.tcp_options.get("wscale")
        self.stack_wscale = None if wscale is None else int(wscale)
        self.rcv_nxt = (seg.seq + 1) % _MOD
        self.snd_una = (self.isn + 1) % _MOD
        self.snd_wnd = seg.window  # the window in a SYN is never scaled
        self.established = True
        self._set_timer(math.inf)
        self._emit(ACK, self.snd_una)
        self._push()

    def _on_established(self, seg: Parsed) -> None:
        if seg.flags & SYN:
            if seg.seq == self.stack_isn:
                self._emit(ACK, self.snd_nxt)  # our handshake ACK was lost: repeat it
            return
        if seg.flags & ACK:
            self._on_ack(seg)
        seq = seg.seq
        if seg.payload or seg.flags & FIN:
            self._accept(seq, seg.payload, bool(seg.flags & FIN))
            self._emit(ACK, self.snd_nxt)  # every data segment is acked, duplicates too
        elif seq_diff(seq, self.rcv_nxt) < 0 and self.answer_probes:  # a keepalive probe
            self.probes_answered += 1
            self._emit(ACK, self.snd_nxt)

    def _on_ack(self, seg: Parsed) -> None:
        acked = seq_diff(seg.ack, self.snd_una)
        if acked > seq_diff(self.snd_max, self.snd_una):
            self.violations.append(f"ack {seg.ack} of unsent data (snd_max {self.snd_max})")
            return
        if acked < 0:
            return  # an old ACK: its window may be stale too
        shift = self.stack_wscale if self._scaling() and self.stack_wscale is not None else 0
        self.snd_wnd = seg.window << shift
        if acked == 0:
            self._push()  # maybe a window update
            return
        data_acked = min(acked, len(self._outbuf))
        del self._outbuf[:data_acked]
        self._in_flight = max(0, self._in_flight - data_acked)
        self.snd_una = (self.snd_una + data_acked) % _MOD
        if acked > data_acked:
            self.fin_acked, self._fin_in_flight = True, False
            self.snd_una = (self.snd_una + 1) % _MOD
        outstanding = self._outbuf or self._fin_in_flight
        self._set_timer(trio.current_time() + self.rto if outstanding else math.inf)
        self._push()

    def _accept(self, seq: int, data: bytes, fin: bool) -> None:
        """Buffer a segment, trimmed to our window, then deliver whatever is now in order."""
        right_edge = seq_diff(seq, self.rcv_nxt) + len(data)
        excess = right_edge - self._free_window()
        if excess > 0:  # beyond the window (e.g. a zero-window probe): drop that part
            data, fin = data[: max(0, len(data) - excess)], False
        if (data or fin) and not self.eof_received:
            self._ooo.append((seq, data, fin))
        progress = True
        while progress and not self.eof_received:
            progress = False
            for entry in list(self._ooo):
                start, chunk, has_fin = entry
                skip = -seq_diff(start, self.rcv_nxt)
                if skip < 0:
                    continue  # still a hole before it
                self._ooo.remove(entry)
                if skip > len(chunk):
                    continue  # entirely old (a retransmission), FIN included
                self._inbuf += chunk[skip:]
                self.rcv_nxt = (self.rcv_nxt + len(chunk) - skip) % _MOD
                if has_fin:
                    self.eof_received = True
                    self.rcv_nxt = (self.rcv_nxt + 1) % _MOD
                progress = True
        if self.eof_received:
            self._ooo.clear()

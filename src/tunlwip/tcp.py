"""LwipTcpStream: an lwIP TCP connection as a ``trio.abc.HalfCloseableStream``.

Theory of operation
-------------------
The stream's state changes in two ways: the owning task calls methods, and lwIP callbacks
(delivered by the stack on the trio thread) report received bytes, acknowledged bytes, FIN and
errors. Callbacks only update state and unpark waiters; every lwIP call is made by a method.

Invariants:
  * Backpressure both ways. Received bytes are acknowledged to lwIP (``tcp_recved``) only when
    ``receive_some`` hands them out, so the client's window closes while nobody reads and this
    object buffers at most TCP_WND, or ``max_buffered_bytes_per_connection``: beyond it
    ``on_recv`` refuses deliveries, which lwIP keeps and offers again after a read.
    ``send_all`` queues only what ``tcp_sndbuf`` admits and parks until the sent callback
    frees room.
  * The stream talks to its stack only through ``StreamEngine`` (flush work queued by
    lwIP's callbacks, forget a finished connection, the buffer budget); the stack calls the
    stream's ``on_*`` event methods, ``hand_over`` and ``close_now``.
  * ``_pcb`` is None once lwIP no longer owns a connection for us (reset, aborted, or handed
    back to lwIP to finish closing). Before handing it back, every callback is cleared in C.
  * Graceful close: ``send_eof`` shuts down our direction (FIN after queued data); when both
    directions are finished and everything was read, the PCB is given to lwIP to complete
    LAST-ACK/TIME-WAIT. ``aclose`` closes like a kernel socket: FIN, or RST if unread data or
    the client keeps sending.
"""

from __future__ import annotations

import operator
from typing import Protocol

import trio

from .binding import tcp as ctcp
from .binding.err import Err, err_name
from .binding.tcp import Pcb
from .endpoint import Endpoint
from .errors import LwipError

DEFAULT_RECEIVE_SIZE = 65536


class StreamEngine(Protocol):
    """What a stream needs from the stack that owns it (``LwipStack`` implements it)."""

    @property
    def max_buffered_bytes_per_connection(self) -> int:
        """Client bytes one stream holds unread before it refuses deliveries."""
        ...

    def after_lwip(self) -> None:
        """Run what lwIP's callbacks queued during the call just made (output, accepts)."""
        ...

    def forget(self, conn_id: int) -> None:
        """The connection is no stream any more (closed, reset or handed over)."""
        ...


class _ConflictDetector:
    """Raise BusyResourceError when two tasks use the same direction at once."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already {self._what} on this stream")
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class LwipTcpStream(trio.abc.HalfCloseableStream):
    """One client TCP connection terminated by lwIP.

    ``local`` is the original destination the client connected to; ``remote`` is the client.
    """

    def __init__(
        self, engine: StreamEngine, conn_id: int, pcb: Pcb, local: Endpoint, remote: Endpoint
    ) -> None:
        self._engine = engine
        # Read once: the budget is fixed for a stack's life, and on_recv runs per segment.
        self._budget = engine.max_buffered_bytes_per_connection
        #: The stack's id of this connection (lwIP's callbacks name it).
        self.conn_id = conn_id
        self._pcb: Pcb | None = pcb
        self.local = local
        self.remote = remote
        self._recv_buffer = bytearray()
        self._recv_deferred = False  # lwIP holds bytes this stream refused as full
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self._error: str | None = None
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._receive_conflict = _ConflictDetector("receiving")
        self._send_conflict = _ConflictDetector("sending")
        self.bytes_received = 0
        self.bytes_sent = 0

    def __repr__(self) -> str:
        return f"<LwipTcpStream {self.remote} -> {self.local} {self.state}>"

    @property
    def state(self) -> str:
        """lwIP's TCP state, or why the connection is gone."""
        if self._pcb is not None:
            return ctcp.state(self._pcb)
        return self._error or ("CLOSED" if self._closed else "FINISHING")

    @property
    def buffered(self) -> int:
        """Client bytes received and not yet read."""
        return len(self._recv_buffer)

    # -- trio.abc.ReceiveStream -----------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = DEFAULT_RECEIVE_SIZE if max_bytes is None else operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        with self._receive_conflict:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._recv_buffer or self._eof_received:
                    break
                if self._error is not None:
                    raise trio.BrokenResourceError(f"connection {self._error}")
                await self._recv_lot.park()
            with memoryview(self._recv_buffer) as view:
                data = bytes(view[:max_bytes])
            del self._recv_buffer[:max_bytes]
            if data and self._pcb is not None:
                ctcp.recved(self._pcb, len(data))
                if self._recv_deferred:  # room again: lwIP offers what it kept (may recurse
                    self._recv_deferred = False  # into on_recv, which may refuse again)
                    ctcp.offer_deferred(self._pcb)
                self._engine.after_lwip()
            if not self._recv_buffer:
                self._maybe_finish()
            return data

    # -- trio.abc.SendStream --------------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            self._check_can_send()
            await trio.lowlevel.checkpoint()
            total = len(data)
            if total == 0:
                return
            buffer = ctcp.send_buffer(data)
            offset = 0
            while True:
                self._check_can_send()
                if self._pcb is None:
                    raise trio.BrokenResourceError(f"connection {self._error or 'gone'}")
                try:
                    queued = ctcp.write(self._pcb, buffer + offset, total - offset)
                except LwipError as exc:
                    raise trio.BrokenResourceError(f"lwIP write failed: {exc.name}") from None
                finally:
                    self._engine.after_lwip()
                offset += queued
                self.bytes_sent += queued
                if offset >= total:
                    return
                await self._send_lot.park()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            self._check_can_send()
            await trio.lowlevel.checkpoint()
            while self._pcb is not None and not self._closed and ctcp.sndbuf(self._pcb) == 0:
                await self._send_lot.park()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")

    async def send_eof(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            await trio.lowlevel.checkpoint()
            if self._eof_sent:
                return
            self._eof_sent = True
            if self._pcb is None:
                if self._error is not None:
                    raise trio.BrokenResourceError(f"connection {self._error}")
                return
            try:
                ctcp.shutdown_tx(self._pcb)
            except LwipError as exc:
                raise trio.BrokenResourceError(f"lwIP shutdown failed: {exc.name}") from None
            finally:
                self._engine.after_lwip()
            self._maybe_finish()

    # -- closing ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Reset the connection now: the client sees RST (mirrors an upstream reset)."""
        if self._pcb is not None:
            ctcp.abort(self._pcb)
            self._pcb = None
            self._engine.after_lwip()
        if self._error is None:
            self._error = "aborted locally"
        self._engine.forget(self.conn_id)
        self._wake_all()

    def close_now(self) -> None:
        """``aclose`` without the checkpoint (the stack closes streams from plain code)."""
        if self._closed:
            return
        self._closed = True
        if self._pcb is not None:
            # Like close(2): FIN, or RST if the client's bytes were left unread.
            ctcp.close(self._pcb)
            self._pcb = None
            self._engine.after_lwip()
        self._engine.forget(self.conn_id)
        self._wake_all()

    def hand_over(self) -> tuple[Pcb, bytes, bool]:
        """Give the connection to a C relay: returns (PCB, bytes received but not read, client
        EOF seen). The stream is closed afterwards; lwIP's callbacks go to the relay."""
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._pcb is None:
            raise trio.BrokenResourceError(f"connection {self._error or 'gone'}")
        if self._eof_sent or self.bytes_sent:
            raise trio.BusyResourceError("only an untouched stream can be handed over")
        pcb, pending, eof = self._pcb, bytes(self._recv_buffer), self._eof_received
        self._pcb = None
        self._closed = True
        self._recv_buffer.clear()
        self._engine.forget(self.conn_id)
        self._wake_all()
        return pcb, pending, eof

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("cannot send after send_eof")

    def _maybe_finish(self) -> None:
        """Both directions done and everything read: hand the PCB to lwIP to finish closing."""
        if (
            self._pcb is not None
            and self._eof_sent
            and self._eof_received
            and not self._recv_buffer
        ):
            ctcp.close(self._pcb)
            self._pcb = None
            self._engine.after_lwip()
            self._engine.forget(self.conn_id)

    def _wake_all(self) -> None:
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    # -- events from lwIP, delivered by the stack (no lwIP calls here) ---------------------------
    def on_recv(self, data: bytes | None, may_defer: bool) -> bool:
        """Take received bytes, or refuse them (False) while the stream holds its budget and
        lwIP can keep them (``may_defer``): it then offers them again on ``receive_some``."""
        if data is None:
            self._eof_received = True
        else:
            held = len(self._recv_buffer)
            if may_defer and held and held + len(data) > self._budget:
                self._recv_deferred = True
                return False
            self._recv_buffer += data
            self.bytes_received += len(data)
        self._recv_lot.unpark_all()
        return True

    def on_sent(self, length: int) -> None:
        self._send_lot.unpark_all()

    def on_error(self, err: int) -> None:
        self._pcb = None  # lwIP has freed it
        if err == Err.ERR_CLSD:
            # Both FINs exchanged and lwIP finishes on its own (LAST-ACK done, or our FIN went
            # first): a clean end, not an error. Unread bytes stay readable.
            self._eof_received = True
        elif err == Err.ERR_RST:
            self._error = "reset by the client"
        elif err == Err.ERR_ABRT:
            self._error = "aborted (timeout)"
        else:
            self._error = f"failed ({err_name(err) or err})"
        self._wake_all()

    def on_stack_stopped(self) -> None:
        self._pcb = None  # tl_deinit aborts every connection
        if self._error is None:
            self._error = "closed: the stack stopped"
        self._wake_all()

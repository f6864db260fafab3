"""A pool of protected, connected UDP sockets to one DNS upstream, shared by the queries in flight.

Theory of operation
-------------------
Opening, protecting and connecting a socket for every query cost more than the rest of
forwarding it. Instead each plain-UDP upstream keeps up to ``size`` sockets, each connected to
the upstream from a source port the kernel picked at random, and rotates them: a socket takes
at most ``max_uses`` queries and ``max_age`` seconds of new queries, then is retired (closed
once its last query is done) and a new socket, on a new random port, takes its place. So, as
with unbound's outgoing port range, an off-path spoofer must guess the port among the pool's
ever-changing ones as well as the 16-bit ID (from the kernel's CSPRNG, as with ``secrets``;
unique among the queries in flight on that socket), and must repeat the question.

A query takes a random socket of the pool (a new one while the pool is not full), sends, and
waits for its answer. One reader per socket (a trio system task, not a task per query) takes
every datagram: one whose ID is in flight and whose question matches (case-insensitively:
``wire.read_question``) wakes that query; everything else (a wrong ID or question, garbage, an
answer to a query that already gave up) is ignored and counted (``ignored``). The socket is
connected, so the kernel already drops datagrams from any other address or port. An ICMP port
unreachable (ECONNREFUSED) fails every query waiting on that socket: the upstream is closed
for all of them.

Timeouts are the caller's: a query cancelled while waiting frees its ID.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import trio

from .wire import HEADER_LEN, Question, question_mismatch, with_id

log = logging.getLogger("tunlwip.dns.upstreams")

POOL_SIZE = 16  # sockets per upstream
MAX_USES = 64  # queries per socket before it is replaced
MAX_AGE = 10.0  # seconds a socket takes new queries
RECEIVE_SIZE = 65536
RECEIVE_BURST = 64  # datagrams read per wakeup before other tasks get a turn


class _RandomBytes:
    """Unpredictable numbers from the kernel's CSPRNG (what ``secrets`` uses), read 4 KiB at
    a time: ``secrets.randbelow`` makes a getrandom() call per number, two per query here."""

    __slots__ = ("_buffer", "_position")

    def __init__(self) -> None:
        self._buffer = b""
        self._position = 0

    def below(self, limit: int) -> int:
        """A uniform integer in [0, limit), 1 <= limit <= 0x10000 (rejection sampling over
        16-bit draws, so no value is likelier than another)."""
        ceiling = 0x10000 - 0x10000 % limit
        while True:
            if self._position + 2 > len(self._buffer):
                self._buffer, self._position = os.urandom(4096), 0
            value = int.from_bytes(self._buffer[self._position : self._position + 2], "big")
            self._position += 2
            if value < ceiling:
                return value % limit


_random = _RandomBytes()


class _Waiter:
    """One query in flight: its question, and its answer (or error) once there."""

    __slots__ = ("answer", "error", "event", "question")

    def __init__(self, question: Question) -> None:
        self.question = question
        self.answer: bytes | None = None
        self.error: OSError | None = None
        self.event = trio.Event()


class _PooledSocket:
    """A socket of the pool with the queries in flight on it, by the ID they went out with."""

    __slots__ = ("opened", "pending", "retired", "sock", "uses")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.opened = now
        self.uses = 0
        self.retired = False
        self.pending: dict[int, _Waiter] = {}


class UdpSocketPool:
    """Rotating protected sockets to one upstream; ``exchange`` sends a query and waits for
    the datagram that answers it. ``open_socket`` gives a new protected, connected,
    non-blocking socket (OSError if it cannot)."""

    def __init__(
        self,
        open_socket: Callable[[], socket.socket],
        *,
        size: int = POOL_SIZE,
        max_uses: int = MAX_USES,
        max_age: float = MAX_AGE,
    ) -> None:
        self.size = size
        self.max_uses = max_uses
        self.max_age = max_age
        self._open_socket = open_socket
        self._sockets: list[_PooledSocket] = []  # those taking new queries
        self._live: set[_PooledSocket] = set()  # every open one, retired ones included
        self._closing = False
        #: Datagrams that answered no query in flight (wrong ID or question, garbage, late).
        self.ignored = 0
        #: Sockets opened so far (rotation shows here).
        self.opened = 0

    @property
    def sockets(self) -> int:
        """Sockets taking new queries now."""
        return len(self._sockets)

    async def exchange(self, request: bytes, question: Question) -> bytes:
        """Send ``request`` under a fresh ID on a pooled socket and return the datagram that
        answers it (with that ID). OSError: the socket could not be opened, the send failed,
        or the upstream's port is closed."""
        slot = self._take()
        pending = slot.pending
        message_id = _random.below(0x10000)
        while message_id in pending:
            message_id = _random.below(0x10000)
        waiter = _Waiter(question)
        pending[message_id] = waiter
        try:
            slot.sock.send(with_id(request, message_id))
            await waiter.event.wait()
        finally:
            del pending[message_id]
            if slot.retired and not pending:
                self._close(slot)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.answer is not None
        return waiter.answer

    def _take(self) -> _PooledSocket:
        """A socket for the next query: a new one while the pool is not full, else a random
        one, replaced first if it has had its share of queries or time."""
        if self._closing:
            raise OSError("the upstream is closed")
        now = trio.current_time()
        sockets = self._sockets
        if len(sockets) < self.size:
            slot = self._open(now)
            sockets.append(slot)
        else:
            index = _random.below(len(sockets))
            slot = sockets[index]
            if slot.uses >= self.max_uses or now - slot.opened >= self.max_age:
                try:
                    replacement = self._open(now)
                except OSError as exc:  # out of fds, say: better the old port than no answer
                    log.debug("cannot replace a DNS upstream socket: %s", exc)
                else:
                    self._retire(slot)
                    slot = sockets[index] = replacement
        slot.uses += 1
        return slot

    def _open(self, now: float) -> _PooledSocket:
        slot = _PooledSocket(self._open_socket(), now)
        self._live.add(slot)
        self.opened += 1
        trio.lowlevel.spawn_system_task(self._read, slot, name="dns upstream socket reader")
        return slot

    def _retire(self, slot: _PooledSocket) -> None:
        slot.retired = True
        if not slot.pending:
            self._close(slot)

    async def _read(self, slot: _PooledSocket) -> None:
        """The socket's reader, until the socket is closed (a system task: it must not raise).
        The socket lives no longer than its reader: when trio ends, its cancellation closes
        the socket too."""
        sock = slot.sock
        if sock.fileno() < 0:
            return  # closed before this task first ran (the pool closed, say)
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                self._drain(slot)
        except (trio.ClosedResourceError, OSError):
            pass  # closed under us: retired, or the pool closed
        except Exception:  # a bug; the queries on it time out rather than the gateway dying
            log.exception("DNS upstream socket reader failed")
        finally:
            self._close(slot)

    def _drain(self, slot: _PooledSocket) -> None:
        sock = slot.sock
        for _ in range(RECEIVE_BURST):
            if sock.fileno() < 0:
                return  # a waiter woken in this burst cannot close it: closed before
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # ECONNREFUSED: the port is closed, for every query here
                for waiter in slot.pending.values():
                    if waiter.answer is None and waiter.error is None:
                        waiter.error = exc
                        waiter.event.set()
                continue
            self._deliver(slot, data)

    def _deliver(self, slot: _PooledSocket, data: bytes) -> None:
        waiter = None
        if len(data) >= HEADER_LEN:
            waiter = slot.pending.get(int.from_bytes(data[:2], "big"))
        if waiter is None or waiter.answer is not None or waiter.error is not None:
            self.ignored += 1
            log.debug("ignoring a datagram: no query in flight with its ID")
            return
        reason = question_mismatch(data, int.from_bytes(data[2:4], "big"), waiter.question)
        if reason is not None:
            self.ignored += 1
            log.debug("ignoring a datagram: %s", reason)
            return
        waiter.answer = data
        waiter.event.set()

    def close(self) -> None:
        """Take no more queries and retire every socket: the queries in flight still get
        their answers (a configuration reload replaces the pool under them), and each socket
        is closed when its last query is done. Queries that never end are the caller's to
        cancel; when trio ends, the readers' cancellation closes what is left."""
        self._closing = True
        self._sockets = []
        for slot in list(self._live):
            self._retire(slot)

    def _close(self, slot: _PooledSocket) -> None:
        """Close a pooled socket, waking its reader (``notify_closing``) so that it ends."""
        self._live.discard(slot)
        if slot.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(slot.sock)
            slot.sock.close()

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

A query takes a random socket of the pool (a new one while the pool is not full) and sends
(``send``, no task: the answer comes to a callback; ``exchange`` waits for it in a task). Each
socket has one reader, not one per query: with a ``watcher`` (the gateway's poll set, set by
the DNS proxy) a callback run whenever the socket is readable, without trio's scheduler;
otherwise a trio system task. The reader drains the socket: a datagram whose ID is in flight
and whose question matches goes to that query's callback, and its ID is free again at once
(the question is compared as bytes first, ``wire.exact_question``: the usual answer repeats
it as sent; else read and compared case-insensitively, ``wire.read_question``); everything
else (a wrong ID or question, garbage, an answer to a query that already gave up or was
answered) is ignored and counted (``ignored``). The socket is connected, so the kernel
already drops datagrams from any other address or port. An ICMP port unreachable
(ECONNREFUSED) fails every query waiting on that socket: the upstream is closed for all of
them.

Timeouts are the caller's: a query that gives up (``cancel``, or ``exchange`` cancelled) frees
its ID.
"""

from __future__ import annotations

import logging
import os
import socket
from array import array
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .wire import HEADER_LEN, Question, exact_question, question_mismatch

log = logging.getLogger("tunlwip.dns.upstreams")

POOL_SIZE = 16  # sockets per upstream
MAX_USES = 64  # queries per socket before it is replaced
MAX_AGE = 10.0  # seconds a socket takes new queries
RECEIVE_SIZE = 65536
RECEIVE_BURST = 64  # datagrams read per wakeup before other tasks get a turn


class _RandomBytes:
    """Unpredictable numbers from the kernel's CSPRNG (what ``secrets`` uses), read 4 KiB at
    a time: ``secrets.randbelow`` makes a getrandom() call per number, two per query here."""

    __slots__ = ("_position", "_values")

    def __init__(self) -> None:
        self._values = array("H")  # the buffer as 16-bit draws (byte order is no matter)
        self._position = 0

    def below(self, limit: int) -> int:
        """A uniform integer in [0, limit), 1 <= limit <= 0x10000 (rejection sampling over
        16-bit draws, so no value is likelier than another)."""
        ceiling = 0x10000 - 0x10000 % limit
        while True:
            if self._position >= len(self._values):
                self._values, self._position = array("H", os.urandom(4096)), 0
            value = self._values[self._position]
            self._position += 1
            if value < ceiling:
                return value % limit


_random = _RandomBytes()


#: Called once as ``on_result(owner, answer, error)``: the answer (its ID still ours) or the
#: error that ended the query. ``owner`` is the sender's (one bound method serves every query:
#: no closure made per query).
OnResult = Callable[[Any, bytes | None, OSError | None], None]


class Watcher(Protocol):
    """Calls a function whenever a socket is readable, with no task (``LwipStack`` is one)."""

    def watch_readable(self, fd: int, on_ready: Callable[[], None]) -> int: ...

    def unwatch(self, fd: int, token: int) -> None: ...


class Ticket:
    """One query in flight on a pooled socket: what its answer must repeat, where it goes."""

    __slots__ = ("exact", "message_id", "on_result", "owner", "question", "slot")

    def __init__(self, slot: _PooledSocket, message_id: int, question: Question, exact: bytes,
                 on_result: OnResult, owner: Any) -> None:  # fmt: skip
        self.slot = slot
        self.message_id = message_id
        self.question = question
        self.exact = exact  # the question section as sent (``exact_question``), or b""
        self.on_result = on_result
        self.owner = owner


class _PooledSocket:
    """A socket of the pool with the queries in flight on it, by the ID they went out with."""

    __slots__ = ("opened", "pending", "retired", "sock", "token", "uses", "watcher")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.opened = now
        self.uses = 0
        self.retired = False
        self.pending: dict[int, Ticket] = {}
        self.watcher: Watcher | None = None  # what reads it (None: a trio task)
        self.token = 0  # its watch there


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
        #: Watches the sockets opened from now on (None: a trio task reads each).
        self.watcher: Watcher | None = None
        #: Datagrams that answered no query in flight (wrong ID or question, garbage, late).
        self.ignored = 0
        #: Sockets opened so far (rotation shows here).
        self.opened = 0

    @property
    def sockets(self) -> int:
        """Sockets taking new queries now."""
        return len(self._sockets)

    def send(self, request: bytes, question: Question, on_result: OnResult, owner: Any = None,
             exact: bytes | None = None, now: float | None = None) -> Ticket:  # fmt: skip
        """Send ``request`` under a fresh ID on a pooled socket; ``on_result(owner, ...)`` gets
        the datagram that answers it (with that ID), or the error that ended it
        (ECONNREFUSED: the upstream's port is closed), once, from the socket's reader.
        ``exact`` is ``exact_question(request, question)`` if the caller has it; ``now`` the
        trio clock if the caller has it. OSError (raised): the socket could not be opened or
        the send failed; nothing is then in flight."""
        slot = self._take(trio.current_time() if now is None else now)
        pending = slot.pending
        message_id = _random.below(0x10000)
        while message_id in pending:
            message_id = _random.below(0x10000)
        if exact is None:
            exact = exact_question(request, question)
        ticket = Ticket(slot, message_id, question, exact, on_result, owner)
        try:
            slot.sock.send(message_id.to_bytes(2, "big") + request[2:])
        except OSError:
            self._done(slot)
            raise
        pending[message_id] = ticket
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The query gave up: its ID is free, an answer that still comes is ignored."""
        slot = ticket.slot
        if slot.pending.get(ticket.message_id) is ticket:
            del slot.pending[ticket.message_id]
            self._done(slot)

    async def exchange(self, request: bytes, question: Question) -> bytes:
        """``send`` and wait for the answer. OSError as ``send``, or the error that ended
        the query."""
        done = trio.Event()
        result: list[bytes | OSError | None] = [None]

        def on_result(_: object, answer: bytes | None, error: OSError | None) -> None:
            result[0] = answer if error is None else error
            done.set()

        ticket = self.send(request, question, on_result)
        try:
            await done.wait()
        finally:
            self.cancel(ticket)  # (a no-op once answered)
        outcome = result[0]
        if isinstance(outcome, OSError):
            raise outcome
        assert outcome is not None
        return outcome

    def _done(self, slot: _PooledSocket) -> None:
        """A query on ``slot`` is over: a retired socket closes with its last one."""
        if slot.retired and not slot.pending:
            self._close(slot)

    def _take(self, now: float) -> _PooledSocket:
        """A socket for the next query: a new one while the pool is not full, else a random
        one, replaced first if it has had its share of queries or time."""
        if self._closing:
            raise OSError("the upstream is closed")
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
        if self.watcher is not None:
            try:
                slot.token = self.watcher.watch_readable(slot.sock.fileno(),
                                                         lambda: self._drain(slot))  # fmt: skip
            except OSError:
                slot.sock.close()
                raise
            slot.watcher = self.watcher
        else:
            trio.lowlevel.spawn_system_task(self._read, slot, name="dns upstream socket reader")
        self._live.add(slot)
        self.opened += 1
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
        """Take what the socket has (up to a burst), each datagram to its query's callback.
        A callback may end the last query of a retired socket, which then closes. Once no
        query waits on the socket it is not read again (a read that finds nothing costs a
        system call and an exception): what still comes wakes the reader again."""
        sock = slot.sock
        for count in range(RECEIVE_BURST):
            if sock.fileno() < 0 or (count and not slot.pending):
                return  # closed by a callback of this burst; or nothing more to wait for
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # ECONNREFUSED: the port is closed, for every query here
                tickets = list(slot.pending.values())
                slot.pending.clear()
                for ticket in tickets:
                    self._result(ticket, None, exc)
                self._done(slot)
                continue
            self._deliver(slot, data)

    def _deliver(self, slot: _PooledSocket, data: bytes) -> None:
        ticket = None
        if len(data) >= HEADER_LEN:
            ticket = slot.pending.get(int.from_bytes(data[:2], "big"))
        if ticket is None:
            self.ignored += 1
            log.debug("ignoring a datagram: no query in flight with its ID")
            return
        exact = ticket.exact
        if not (exact and data[2] & 0x80 and data[4:6] == b"\x00\x01"
                and data.startswith(exact, HEADER_LEN)):  # fmt: skip
            # Not the question as sent, byte for byte: read it (another case, say).
            reason = question_mismatch(data, int.from_bytes(data[2:4], "big"), ticket.question)
            if reason is not None:
                self.ignored += 1
                log.debug("ignoring a datagram: %s", reason)
                return
        del slot.pending[ticket.message_id]
        self._result(ticket, data, None)
        self._done(slot)

    @staticmethod
    def _result(ticket: Ticket, answer: bytes | None, error: OSError | None) -> None:
        try:
            ticket.on_result(ticket.owner, answer, error)
        except Exception:  # a bug; it must not stop the reader (or the poll set calling it)
            log.exception("DNS upstream answer callback failed")

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
        """Close a pooled socket: out of the poll set first, or its reader task woken
        (``notify_closing``) so that it ends."""
        self._live.discard(slot)
        if slot.sock.fileno() >= 0:
            if slot.watcher is not None:
                slot.watcher.unwatch(slot.sock.fileno(), slot.token)
                slot.watcher = None
            else:
                trio.lowlevel.notify_closing(slot.sock)
            slot.sock.close()

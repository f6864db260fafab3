"""The dials of held SYNs in Python: connecting, then connected and waiting to be claimed.

Theory of operation
-------------------
With dial before accept, a new SYN is held while its upstream connect runs. When C cannot dial
(a protector only Python can run, a device C does not read) or a route asks for another
protector (``egress.tcp_routes``), the connect is Python's: a non-blocking ``connect()`` on a
protected socket, watched in the stack's poll set, so one wakeup of the poll task serves
packets, relays and finished dials alike. The connected socket then waits for the client's
handshake to claim it (``TcpForwarder.take_predialed``), which hands it straight to a C relay;
a socket connected elsewhere (through a proxy) joins it there (``adopt``). One small task
enforces the two deadlines: the dial timeout while connecting and the claim timeout afterwards.
Why not a task per dial: the connection rate is the gateway's per-connection overhead, and a
task with its cancel scopes cost more than the whole dial does here.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .binding import admit as cadmit
from .dialer import Dialer
from .endpoint import Endpoint, IPAddress
from .shares import ClientCounts

if TYPE_CHECKING:
    from .stack import LwipStack

__all__ = ["Connected", "Failed", "FlowKey", "HeldDial", "HeldSynDials"]

# The logger these messages had before they moved here (operators filter on it).
dial_log = logging.getLogger("tunlwip.predial")

FlowKey = tuple[Endpoint, Endpoint]  # (client, original destination)
_MAX_SLEEP = 1.0  # the deadline task looks at least this often


class HeldDial:
    """One upstream connect for a held SYN."""

    __slots__ = ("connected_at", "key", "packet", "route", "sock", "started", "token")

    def __init__(self, key: FlowKey, packet: bytes, sock: socket.socket, started: float,
                 route: str | None = None) -> None:  # fmt: skip
        self.key = key
        self.packet = packet
        self.sock = sock
        self.started = started
        self.route = route  # the name of the route the flow takes
        self.token = 0
        self.connected_at = 0.0

    @property
    def latency(self) -> float:
        return self.connected_at - self.started


Connected = Callable[[HeldDial], None]
Failed = Callable[[FlowKey, bytes, OSError, float, str | None], None]


class HeldSynDials:
    """The dials of held SYNs: connecting, then connected and waiting to be claimed.

    ``on_connected(dial)`` runs when a connect succeeded (``TcpForwarder`` releases the SYN);
    ``on_failed(key, packet, error, latency, route)`` when it failed or timed out (the socket is
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
        # Mirrored into C, which admits SYNs by them too (``_csrc/admit.c``).
        self._dialing_per_client = ClientCounts(
            functools.partial(cadmit.python_count, cadmit.PY_DIALING)
        )
        self._connected_per_client = ClientCounts(
            functools.partial(cadmit.python_count, cadmit.PY_OPEN)
        )
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

    def start(self, key: FlowKey, packet: bytes, route: str | None = None,
              dialer: Dialer | None = None) -> None:  # fmt: skip
        """Start connecting to ``key``'s destination (with ``dialer``: a route's protector);
        the outcome arrives by callback (an immediate failure, such as no free file
        descriptor, too)."""
        now = trio.current_time()
        try:
            sock = (dialer or self._dialer).start_tcp(key[1])
        except OSError as exc:
            self._on_failed(key, packet, exc, 0.0, route)
            return
        dial = HeldDial(key, packet, sock, now, route)
        try:
            dial.token = self._stack.watch_writable(sock.fileno(), lambda: self._finished(dial))
        except OSError as exc:
            sock.close()
            self._on_failed(key, packet, exc, 0.0, route)
            return
        self._add_dialing(dial)
        if now + self._dialer.connect_timeout < self._wake_at:
            self._poke.set()

    def adopt(self, key: FlowKey, packet: bytes, sock: socket.socket, started: float,
              route: str | None) -> HeldDial:  # fmt: skip
        """A socket connected elsewhere (through a proxy) waits here for its client's
        handshake, as a connect of ours that finished would."""
        dial = HeldDial(key, packet, sock, started, route)
        dial.connected_at = trio.current_time()
        self._add_connected(dial)
        return dial

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
            self._on_failed(dial.key, dial.packet, _os_error(err), now - dial.started, dial.route)
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
            self._on_failed(dial.key, dial.packet, error, now - dial.started, dial.route)
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

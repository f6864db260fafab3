"""The stack's open TCP connections, and whether a new one may open.

Why: a connection is first a Python stream (``LwipTcpStream``) and may become a C relay
(``Relay``) when the gateway hands it over; either way it holds one place in the stack's
limits: the global connection limit, the client's share (``shares``), and, while a stream, its
unread bytes in the buffer budget. This table keeps both kinds by the connection id that lwIP's
callbacks name, and gives the client's share back exactly once, when an id has left both.
Connections C dialed and relays itself (``c_dials``) are counted in C; the stack hands this
table what it needs of them (``CountsInC``): how many are open, and how many a client holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from .endpoint import IPAddress
from .shares import ClientCounts, CountMirror

if TYPE_CHECKING:
    from .config.sections import StackConfig
    from .relay import Relay
    from .tcp import LwipTcpStream


def _no_relays() -> int:
    return 0


def _none_held(client: IPAddress) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class CountsInC:
    """What the table needs of the connections C owns: how many relays are open, and how many
    connections (connected or relayed) a client holds there."""

    relays: Callable[[], int] = _no_relays
    held_by: Callable[[IPAddress], int] = _none_held


class ConnectionTable:
    """Streams and relays by connection id, with their clients and the admission counters.
    ``mirror`` is told of every change of the per-client counts (C admits by them too)."""

    def __init__(self, in_c: CountsInC | None = None, mirror: CountMirror | None = None) -> None:
        self.streams: dict[int, LwipTcpStream] = {}
        self.relays: dict[int, Relay] = {}
        #: Open connections (Python's streams and relays) by client.
        self.client_connections = ClientCounts(mirror)
        #: Each open connection's client, by id (released in ``gone``).
        self.clients: dict[int, IPAddress] = {}
        self.refused_at_limit = 0
        self.refused_buffer_full = 0
        self.refused_client_share = 0
        #: Relays C opened for its own dials (``c_dials``): no id, counted in C.
        self.in_c = in_c or CountsInC()
        self._next_id = 1

    def __len__(self) -> int:
        """Open TCP connections: Python streams and C relays."""
        return len(self.streams) + len(self.relays) + self.in_c.relays()

    def buffered_bytes(self) -> int:
        """Client bytes received and not yet read, over the Python streams."""
        return sum(stream.buffered for stream in self.streams.values())

    def has_room(self, config: StackConfig, accepting: bool = True) -> bool:
        """Whether the global limits admit one more connection (a refusal is counted; not
        ``accepting`` is refused as at the connection limit)."""
        if not accepting or len(self) >= config.max_tcp_connections:
            self.refused_at_limit += 1
            return False
        if self.streams and self.buffered_bytes() >= config.max_buffered_bytes:
            self.refused_buffer_full += 1
            return False
        return True

    def admit(self, client: IPAddress, share: int) -> int:
        """A new connection's id, counted against ``client``'s share; 0 if the client holds
        its ``share`` already (counted). The caller files the stream under the id."""
        if self.client_connections.count(client) + self.in_c.held_by(client) >= share:
            self.refused_client_share += 1
            return 0
        conn_id = self._next_id
        self._next_id += 1
        self.clients[conn_id] = client
        self.client_connections.add(client)
        return conn_id

    def forget_stream(self, conn_id: int) -> None:
        """The connection is no stream any more (closed, reset, or handed to a relay)."""
        self.streams.pop(conn_id, None)
        self.gone(conn_id)

    def gone(self, conn_id: int) -> None:
        """Give the client's share back once the connection is neither a stream nor a
        relay (idempotent: every path that ends a connection may call it)."""
        if conn_id in self.streams or conn_id in self.relays:
            return
        address = self.clients.pop(conn_id, None)
        if address is not None:
            self.client_connections.release(address)

    def clear(self) -> None:
        """The stack stopped: lwIP aborted every stream (relays end through their callback)."""
        self.streams.clear()
        self.clients.clear()
        self.client_connections.clear()

"""Flow records: what each TCP connection and UDP session did, for flow logs and ``status``.

Theory of operation
-------------------
The gateway opens a ``LiveFlow`` in ``FlowTable`` (``track``) when it starts handling a
connection or a UDP session and closes it with a reason when the handler ends. A live flow does
not copy byte counts: it reads them on demand from the stream or session that already keeps them
(or, once a C relay owns the flow, from the relay), so the data path pays nothing per byte.
Closing turns the flow into a frozen ``FlowRecord``, offered to every subscriber
(``Gateway.flows()``).

Flows the C dials admitted and relayed without Python (``c_dials``) are kept elsewhere: C holds
their records while they are open, and the table reads them through ``ElsewhereFlows`` when
``live`` or ``totals`` asks; their records are built at close, only for subscribers
(``offer``).

Subscribers each have their own bounded buffer. A consumer that falls behind loses records (each
one counted, on the subscription and in the totals) rather than slowing the gateway or growing
its memory; with no subscriber nothing is buffered at all. Subscriptions are held weakly, so one
an embedder forgot to close stops costing anything once it is garbage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import io
import json
import logging
import os
import stat
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import trio

from .endpoint import Endpoint
from .sniff import sniff_name
from .udp import UdpSession

if TYPE_CHECKING:
    from .tcp import LwipTcpStream

log = logging.getLogger("tunlwip.flows")

FlowProtocol = Literal["tcp", "udp"]
ByteCounts = Callable[[], tuple[int, int]]  # () -> (bytes_up, bytes_down), read when needed


class Namer(Protocol):
    """(client, destination, ``at``: the trio time the flow opened, None: now) -> the name the
    client resolved the destination by, or None."""

    def __call__(self, client: Endpoint, target: Endpoint, at: float | None = None
                 ) -> str | None: ...  # fmt: skip


DEFAULT_BUFFER = 10_000


def _no_bytes() -> tuple[int, int]:
    return (0, 0)


@dataclasses.dataclass(frozen=True)
class FlowRecord:
    """One finished flow.

    ``bytes_up`` went from the client towards the destination, ``bytes_down`` back. ``started``
    is wall-clock time (``time.time()``, for logs); ``duration`` is measured on trio's clock.
    ``connect_latency`` is the upstream dial time of the default TCP forwarder (None for UDP and
    custom handlers). ``name`` is the TLS SNI or HTTP Host the client sent, else the name it
    resolved to this address through the DNS proxy, else None. ``route`` is the name of the
    route (``[[route]]``, ``egress.routes``) the flow took, None where no table decided it.
    """

    protocol: FlowProtocol
    client: Endpoint
    target: Endpoint
    bytes_up: int
    bytes_down: int
    started: float
    duration: float
    connect_latency: float | None
    #: "closed", "reset", "idle timeout", "evicted", "refused", "unreachable", "dial timeout",
    #: "client timeout" / "upstream timeout" (that end stopped answering keepalive probes or
    #: retransmissions), "stopped" (the gateway stopped), "error" (the handler raised).
    close_reason: str
    name: str | None = None
    route: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (endpoints as ``addr:port`` strings), e.g. for a JSON-lines log."""
        return {
            **_flow_json(self),
            "duration": round(self.duration, 6),
            "connect_latency": _round(self.connect_latency),
            "close_reason": self.close_reason,
        }


@dataclasses.dataclass(frozen=True)
class FlowInfo:
    """A snapshot of one live flow: a ``FlowRecord`` without an end (``age`` so far)."""

    protocol: FlowProtocol
    client: Endpoint
    target: Endpoint
    bytes_up: int
    bytes_down: int
    started: float
    age: float
    connect_latency: float | None
    name: str | None = None
    route: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **_flow_json(self),
            "age": round(self.age, 3),
            "connect_latency": _round(self.connect_latency),
        }


@dataclasses.dataclass(frozen=True)
class FlowTotals:
    """Flow counts since the gateway started."""

    live_tcp: int = 0
    live_udp: int = 0
    #: Flows opened (TCP: connections handled plus dials that failed before accepting).
    tcp: int = 0
    udp: int = 0
    #: Records a slow subscriber did not get (summed over subscribers).
    records_dropped: int = 0
    subscribers: int = 0


def _flow_json(flow: FlowRecord | FlowInfo) -> dict[str, Any]:
    """The JSON fields a finished and a live flow share, in the order both print them."""
    return {
        "protocol": flow.protocol,
        "client": str(flow.client),
        "target": str(flow.target),
        "name": flow.name,
        "route": flow.route,
        "bytes_up": flow.bytes_up,
        "bytes_down": flow.bytes_down,
        "started": round(flow.started, 3),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class LiveFlow:
    """A flow in progress (the table's mutable entry; the gateway fills in latency and name)."""

    __slots__ = ("_counts", "client", "connect_latency", "name", "opened", "protocol", "route",
                 "started", "target")  # fmt: skip

    def __init__(self, protocol: FlowProtocol, client: Endpoint, target: Endpoint,
                 counts: ByteCounts, name: str | None) -> None:  # fmt: skip
        self.protocol: FlowProtocol = protocol
        self.client = client
        self.target = target
        self.name = name
        #: The name of the route the flow took (set by the forwarder that decided it).
        self.route: str | None = None
        self.connect_latency: float | None = None
        self.started = time.time()
        self.opened = trio.current_time()
        self._counts = counts

    def __repr__(self) -> str:
        return f"<LiveFlow {self.protocol} {self.client} -> {self.target}>"

    def name_from_first_bytes(self, data: bytes) -> None:
        """Name the flow by the server name in the client's first bytes, if they have one:
        what the client asked the server for beats the DNS guess. (Parsed now, not kept: a
        relay's first bytes are up to 4 KiB, too much to hold per live flow.)"""
        sniffed = sniff_name(data)
        if sniffed is not None:
            self.name = sniffed

    def count_bytes_with(self, counts: ByteCounts) -> None:
        """Read byte counts from ``counts`` from now on (the flow moved to a C relay)."""
        self._counts = counts

    def byte_counts(self) -> tuple[int, int]:
        return self._counts()

    def snapshot(self, now: float) -> FlowInfo:
        up, down = self._counts()
        return FlowInfo(self.protocol, self.client, self.target, up, down, self.started,
                        now - self.opened, self.connect_latency, self.name, self.route)  # fmt: skip

    def record(self, now: float, reason: str) -> FlowRecord:
        up, down = self._counts()
        return FlowRecord(self.protocol, self.client, self.target, up, down, self.started,
                          now - self.opened, self.connect_latency, reason, self.name,
                          self.route)  # fmt: skip


class FlowSubscription:
    """Records of flows as they close, from the moment ``Gateway.flows()`` was called.

    Iterate with ``async for``; iteration ends when the gateway stops. ``aclose()`` (or a
    ``with`` block) unsubscribes at once; an abandoned subscription is dropped when collected.
    ``dropped`` counts records lost because the buffer (``max_buffer`` records) was full.
    """

    def __init__(self, table: FlowTable, max_buffer: int) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        self._table = table
        self._send, self._receive = trio.open_memory_channel[FlowRecord](max_buffer)
        self.dropped = 0

    def __aiter__(self) -> FlowSubscription:
        return self

    async def __anext__(self) -> FlowRecord:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def receive_nowait(self) -> FlowRecord:
        """The next buffered record; ``trio.WouldBlock`` if none, ``trio.EndOfChannel`` once
        the gateway stopped and everything was read (for consumers that write in batches)."""
        try:
            return self._receive.receive_nowait()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None

    def __enter__(self) -> FlowSubscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        """Unsubscribe; records already buffered are discarded."""
        self._table._subscribers.discard(self)
        self._send.close()
        self._receive.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _offer(self, record: FlowRecord) -> bool:
        try:
            self._send.send_nowait(record)
        except trio.WouldBlock:
            if not self.dropped:
                log.warning("flow records dropped: a consumer of Gateway.flows() is too slow")
            self.dropped += 1
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._table._subscribers.discard(self)
        return True

    def _end(self) -> None:
        self._send.close()  # the consumer reads what is buffered, then iteration stops


def _no_name(client: Endpoint, target: Endpoint, at: float | None = None) -> str | None:
    return None


class ElsewhereFlows(Protocol):
    """Open flows whose records another table keeps (the C dials'), for ``FlowTable``."""

    def open_counts(self) -> tuple[int, int]:
        """(TCP flows opened so far, open now)."""
        ...

    def snapshots(self, limit: int | None) -> list[FlowInfo]:
        """The ones open now, most bytes first (at most ``limit``)."""
        ...


class FlowTable:
    """The gateway's live flows and the subscribers to their records.

    ``name_for(client, target)`` names a new flow (the DNS proxy's memory of what the client
    resolved); the gateway passes it once, so every flow is named the same way."""

    def __init__(self, name_for: Namer = _no_name) -> None:
        self._name_for = name_for
        self._live: dict[int, LiveFlow] = {}
        self._subscribers: weakref.WeakSet[FlowSubscription] = weakref.WeakSet()
        self._opened = {"tcp": 0, "udp": 0}
        self._open_now = {"tcp": 0, "udp": 0}
        self._records_dropped = 0
        self._ended = False
        self._elsewhere: ElsewhereFlows | None = None

    def __len__(self) -> int:
        return len(self._live)

    def keep_elsewhere(self, flows: ElsewhereFlows | None) -> None:
        """Count and list ``flows`` with this table's own; None: no more (those opened so far
        stay counted)."""
        if self._elsewhere is not None:
            self._opened["tcp"] += self._elsewhere.open_counts()[0]
        self._elsewhere = flows

    def name_for(self, client: Endpoint, target: Endpoint, at: float | None = None) -> str | None:
        """The name a flow from ``client`` to ``target`` opened at trio time ``at`` (None: now)
        gets: the DNS proxy's memory of what the client resolved, valid then."""
        return self._name_for(client, target, at)

    @property
    def subscribed(self) -> bool:
        """Is anybody taking records (else a flow kept elsewhere need not make one)?"""
        return bool(self._subscribers)

    def offer(self, record: FlowRecord) -> None:
        """A flow kept elsewhere closed: its record to every subscriber."""
        if self._subscribers:
            self._offer(record)

    def open(self, protocol: FlowProtocol, client: Endpoint, target: Endpoint,
             counts: ByteCounts = _no_bytes, name: str | None = None) -> LiveFlow:  # fmt: skip
        flow = LiveFlow(protocol, client, target, counts, name)
        self._live[id(flow)] = flow
        self._opened[protocol] += 1
        self._open_now[protocol] += 1
        return flow

    def track(self, conn: LwipTcpStream | UdpSession, target: Endpoint) -> LiveFlow:
        """Open the record of ``conn`` (a TCP connection or a UDP session) to ``target``: named
        by ``name_for``, its byte counts read from ``conn`` whenever they are needed."""
        if isinstance(conn, UdpSession):
            session = conn
            return self.open("udp", session.client, target,
                             session.byte_counts,
                             self._name_for(session.client, target))  # fmt: skip
        stream = conn
        return self.open("tcp", stream.remote, target,
                         lambda: (stream.bytes_received, stream.bytes_sent),
                         self._name_for(stream.remote, target))  # fmt: skip

    def open_tcp(self, client: Endpoint, target: Endpoint, counts: ByteCounts) -> LiveFlow:
        """Open the record of a TCP connection that has no stream (a C dial's relay), named
        by ``name_for``, its byte counts read from ``counts``."""
        return self.open("tcp", client, target, counts, self._name_for(client, target))

    def close(self, flow: LiveFlow, reason: str, ago: float = 0.0) -> bool:
        """End ``flow`` (``ago`` seconds ago) and offer its record to every subscriber; the
        record is only made when there is one (most gateways have none: no flow log, no
        ``flows()`` consumer). False if it was closed already."""
        if self._live.pop(id(flow), None) is None:
            return False
        self._open_now[flow.protocol] -= 1
        if self._subscribers:
            self._offer(self._record(flow, reason, ago))
        return True

    @staticmethod
    def _record(flow: LiveFlow, reason: str, ago: float) -> FlowRecord:
        # ``ago`` and the opening's own correction are whole ms of lwIP's clock: never end
        # before the start
        return flow.record(max(trio.current_time() - ago, flow.opened), reason)

    def _offer(self, record: FlowRecord) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber._offer(record):
                self._records_dropped += 1

    def failed(
        self,
        protocol: FlowProtocol,
        client: Endpoint,
        target: Endpoint,
        reason: str,
        *,
        connect_latency: float | None = None,
        route: str | None = None,
    ) -> FlowRecord:
        """Record a flow that ended before it was handled (a failed dial before accept, a
        refused or dropped route)."""
        flow = self.open(protocol, client, target, name=self._name_for(client, target))
        flow.route = route
        if connect_latency is not None:
            flow.connect_latency = connect_latency
            flow.opened -= connect_latency
            flow.started -= connect_latency
        self._live.pop(id(flow))
        self._open_now[protocol] -= 1
        record = self._record(flow, reason, 0.0)
        if self._subscribers:
            self._offer(record)
        return record

    def live(self, limit: int | None = None) -> list[FlowInfo]:
        """Snapshots of the live flows, most bytes first; at most ``limit`` of them."""
        flows = self._live.values()
        now = trio.current_time()

        def volume(flow: LiveFlow) -> int:
            return sum(flow.byte_counts())

        chosen = (sorted(flows, key=volume, reverse=True) if limit is None
                  else heapq.nlargest(limit, flows, key=volume))  # fmt: skip
        infos = [flow.snapshot(now) for flow in chosen]
        if self._elsewhere is None or limit == 0:
            return infos
        infos += self._elsewhere.snapshots(limit)

        def info_volume(info: FlowInfo) -> int:
            return info.bytes_up + info.bytes_down

        return (sorted(infos, key=info_volume, reverse=True) if limit is None
                else heapq.nlargest(limit, infos, key=info_volume))  # fmt: skip

    def subscribe(self, max_buffer: int = DEFAULT_BUFFER) -> FlowSubscription:
        subscription = FlowSubscription(self, max_buffer)
        if self._ended:
            subscription._end()
        else:
            self._subscribers.add(subscription)
        return subscription

    def start(self) -> None:
        self._ended = False

    def end_subscriptions(self) -> None:
        """The gateway stopped: let every subscriber's iteration finish."""
        self._ended = True
        for subscriber in list(self._subscribers):
            subscriber._end()
        self._subscribers.clear()

    def totals(self) -> FlowTotals:
        live = self._open_now
        opened_elsewhere, open_elsewhere = (self._elsewhere.open_counts()
                                            if self._elsewhere is not None else (0, 0))  # fmt: skip
        return FlowTotals(live_tcp=live["tcp"] + open_elsewhere, live_udp=live["udp"],
                          tcp=self._opened["tcp"] + opened_elsewhere, udp=self._opened["udp"],
                          records_dropped=self._records_dropped,
                          subscribers=len(self._subscribers))  # fmt: skip


class _FlowSource(Protocol):
    def flows(self, max_buffer: int = DEFAULT_BUFFER) -> FlowSubscription: ...


#: A flow log is created with this mode (less under a stricter umask); an existing one wider
#: than it is narrowed to it: the records carry client and destination addresses.
FLOW_LOG_MODE = 0o640


def open_flow_log(path: str | os.PathLike[str]) -> io.TextIOWrapper:
    """Open ``path`` for appending as the gateway (often root) may: never through a symbolic
    link (``O_NOFOLLOW``: a link planted there would make root append to any file), only a
    regular file, created mode 0640 whatever the umask allows (an existing file's wider mode
    is narrowed). OSError with a message that names the problem otherwise."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, FLOW_LOG_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link (refused: the flow log is opened "
                          "without following links)", os.fspath(path)) from None  # fmt: skip
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from blocking the open
        if st.st_mode & 0o777 & ~FLOW_LOG_MODE:
            os.fchmod(fd, st.st_mode & FLOW_LOG_MODE)
            log.warning("flow log %s was mode %04o: narrowed to %04o", os.fspath(path),
                        st.st_mode & 0o777, st.st_mode & FLOW_LOG_MODE)  # fmt: skip
        return open(fd, "a", encoding="utf-8", closefd=True)
    except BaseException:
        os.close(fd)
        raise


async def write_flow_log(
    gateway: _FlowSource,
    path: str | os.PathLike[str],
    *,
    max_buffer: int = DEFAULT_BUFFER,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Append one JSON line (``FlowRecord.to_json()``) per closed flow to ``path`` until the
    gateway stops or this is cancelled; ``started()`` once the file is open (an OSError before
    that means it cannot be). Lines are written in batches off the trio thread, so a slow disk
    costs dropped records (counted in ``statistics().flows.records_dropped``), never gateway
    speed. Rotate with copytruncate, or restart: the file is opened once (``open_flow_log``).
    """
    log_file = trio.wrap_file(await trio.to_thread.run_sync(open_flow_log, path))
    async with log_file:
        with gateway.flows(max_buffer) as records:
            task_status.started()
            async for record in records:
                lines = [json.dumps(record.to_json())]
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while len(lines) < 1024:
                        lines.append(json.dumps(records.receive_nowait().to_json()))
                await log_file.write("\n".join(lines) + "\n")
                await log_file.flush()

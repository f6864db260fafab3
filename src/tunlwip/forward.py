"""The default forwarders: splice a TCP stream with its upstream, relay a UDP session.

TCP: client EOF becomes upstream ``send_eof`` (shutdown(SHUT_WR)) and vice versa, while the
other direction keeps flowing. A broken direction (RST) ends both: the other side is reset too,
never closed gracefully, so neither end mistakes a failure for a complete transfer.

UDP: datagrams are copied both ways between the session and a connected upstream socket until
the session ends (idle sweep or eviction). A port-unreachable from upstream is mirrored to the
client as ICMP, so the client's connected socket fails as it would on a direct path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .tcp import LwipTcpStream
from .udp import UdpSession

CHUNK = 65536
MAX_DATAGRAM = 65535
UDP_BURST = 64  # replies relayed before other tasks get a turn
log = logging.getLogger("tunlwip.forward")


@dataclass
class SpliceResult:
    """How a splice ended, for logs and flow records."""

    client_to_upstream: int = 0
    upstream_to_client: int = 0
    reason: str = "closed"


def _reset_socket_stream(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0 so the upstream sees RST, mirroring a client reset."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def splice(
    client: LwipTcpStream,
    upstream: trio.SocketStream,
    *,
    idle_timeout: float | None = None,
    on_first_client_data: Callable[[bytes], None] | None = None,
) -> SpliceResult:
    """Copy bytes both ways until both directions finished, one broke, or nothing moved for
    ``idle_timeout`` seconds (None: no idle limit; a vanished end is then found by keepalive,
    which breaks its direction). Closes neither stream; the caller does (after a reset if asked).

    ``on_first_client_data`` sees the first chunk read from the client before it is sent on
    (to name the flow from its TLS SNI or HTTP Host); its errors are logged, never raised."""
    result = SpliceResult()
    broken: list[str] = []
    peek = on_first_client_data

    def idle_deadline() -> float:
        return math.inf if idle_timeout is None else trio.current_time() + idle_timeout

    with trio.CancelScope() as idle_scope:
        idle_scope.deadline = idle_deadline()

        async def pump(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream,
                       counter: str) -> None:  # fmt: skip
            nonlocal peek
            try:
                while True:
                    data = await src.receive_some(CHUNK)
                    if not data:
                        await dst.send_eof()
                        return
                    if peek is not None and src is client:
                        _peek_safely(peek, data)
                        peek = None
                    await dst.send_all(data)
                    setattr(result, counter, getattr(result, counter) + len(data))
                    idle_scope.deadline = idle_deadline()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                broken.append(f"{counter}: {exc}")
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, "client_to_upstream")
            nursery.start_soon(pump, upstream, client, "upstream_to_client")

    if idle_scope.cancelled_caught:
        result.reason = "idle timeout"
        client.abort()
        _reset_socket_stream(upstream)
    elif broken:
        result.reason = "reset (" + broken[0] + ")"
        client.abort()
        _reset_socket_stream(upstream)
    return result


def _peek_safely(peek: Callable[[bytes], None], data: bytes | bytearray) -> None:
    try:
        peek(bytes(data))
    except Exception:
        log.debug("first-data callback failed", exc_info=True)


class DatagramRelay:
    """Copies datagrams between ``session`` and a connected, non-blocking ``upstream`` socket:
    ``to_upstream`` for each client datagram (the session's ``divert`` target: no task switch),
    ``drain`` whenever the socket is readable (a burst of replies to the client). Errors drop
    the datagram (UDP semantics), counted. A port-unreachable from upstream is mirrored to the
    client as ICMP."""

    __slots__ = ("_last_sent", "session", "upstream")

    def __init__(self, session: UdpSession, upstream: socket.socket) -> None:
        self.session = session
        self.upstream = upstream
        self._last_sent = b""

    def to_upstream(self, data: bytes) -> None:
        try:
            self.upstream.send(data)
            self._last_sent = data
        except OSError as exc:  # buffer full (BlockingIOError), too big, unreachable
            self.session.counters.dropped_to_upstream += 1
            log.debug("UDP %s -> %s: datagram dropped: %s", self.session.client,
                      self.session.target, exc)  # fmt: skip

    def drain(self) -> None:
        session = self.session
        for _ in range(UDP_BURST):
            try:
                data = self.upstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # the destination said "port unreachable"
                session.send_unreachable("port", self._last_sent)
                continue
            except OSError as exc:
                log.debug("UDP %s <- %s: receive error: %s", session.client, session.target, exc)
                continue
            session.send_nowait(data)


async def relay_datagrams(session: UdpSession, upstream: socket.socket) -> None:
    """Relay between ``session`` and the connected, non-blocking ``upstream`` socket until the
    session is closed (a task per session; the gateway's default path has none, see
    ``Gateway._attach_udp``)."""
    relay = DatagramRelay(session, upstream)
    session.divert(relay.to_upstream)
    while True:
        await trio.lowlevel.wait_readable(upstream)
        relay.drain()

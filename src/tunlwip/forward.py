"""Splice a TCP stream with its upstream in Python: the building block of custom TCP handlers.

The gateway's default TCP forwarder hands both ends to a C relay instead (``tcp_forward``);
``splice`` is for handlers that look at or change the stream (see examples/).

Client EOF becomes upstream ``send_eof`` (shutdown(SHUT_WR)) and vice versa, while the other
direction keeps flowing; an upstream stream that cannot half-close (a plain
``trio.abc.Stream``, such as a custom via may return) is told nothing of the client's EOF and
ends the splice by its own. A broken direction (RST) ends both: the other side is reset too, never
closed gracefully, so neither end mistakes a failure for a complete transfer.
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

CHUNK = 65536
log = logging.getLogger("tunlwip.forward")


@dataclass
class SpliceResult:
    """How a splice ended, for logs and flow records."""

    client_to_upstream: int = 0
    upstream_to_client: int = 0
    reason: str = "closed"


def _reset_socket_stream(stream: trio.abc.Stream) -> None:
    """Close with SO_LINGER 0 so the upstream sees RST, mirroring a client reset (a stream
    that is no socket is only closed, by the caller)."""
    if not isinstance(stream, trio.SocketStream):
        return
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def splice(
    client: LwipTcpStream,
    upstream: trio.abc.Stream,
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

        async def pump(src: trio.abc.ReceiveStream, dst: trio.abc.SendStream,
                       counter: str) -> None:  # fmt: skip
            nonlocal peek
            try:
                while True:
                    data = await src.receive_some(CHUNK)
                    if not data:
                        if isinstance(dst, trio.abc.HalfCloseableStream):
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

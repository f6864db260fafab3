"""Bounded reads and writes of a proxy handshake on a non-blocking socket, under trio.

Why not trio's streams: the socket must stay a plain, non-blocking ``socket.socket`` the C relay
can take over right after the handshake, and a handshake must never read a byte past its own
answer (that byte belongs to the destination's data). So reads ask for exactly what is missing
(``recv_exactly``), or, for an answer that ends with a marker (an HTTP head), peek for the marker
and consume only up to it (``recv_through``). Deadlines are the caller's (a cancel scope around
the whole handshake); these functions only bound bytes.
"""

from __future__ import annotations

import errno
import socket

import trio

from ..errors import ProxyError

__all__ = ["recv_exactly", "recv_through", "send_all"]


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data`` (a handshake message, a few hundred bytes at most)."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            raise _broken(exc) from exc
        view = view[sent:]


async def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """Exactly ``count`` bytes, never more; ``ProxyError`` if the proxy closes first."""
    parts = bytearray()
    while len(parts) < count:
        parts += await _recv_some(sock, count - len(parts))
    return bytes(parts)


async def recv_through(sock: socket.socket, marker: bytes, limit: int) -> bytes:
    """The bytes up to and including the first ``marker``, at most ``limit`` of them; what
    follows stays in the socket. ``ProxyError("response head too long")`` past ``limit``.

    Each round peeks at what has arrived: if the marker ends in it, exactly that much is
    consumed; if not, all of it is (none of it can be past the marker), and the next round
    waits for more, so a slow sender costs one wakeup per arrival, not a busy loop."""
    head = bytearray()
    while True:
        peeked = await _recv_some(sock, limit - len(head), socket.MSG_PEEK)
        # The marker may straddle what we hold and what we peeked.
        start = max(0, len(head) - len(marker) + 1)
        found = (bytes(head[start:]) + peeked).find(marker)
        take = len(peeked) if found < 0 else found + len(marker) - (len(head) - start)
        head += await recv_exactly(sock, take)
        if found >= 0:
            return bytes(head)
        if len(head) >= limit:
            raise ProxyError("response head too long")


async def _recv_some(sock: socket.socket, most: int, flags: int = 0) -> bytes:
    """At least one byte and at most ``most`` (waiting for them); ``ProxyError`` if the proxy
    closed or the connection broke."""
    while True:
        try:
            chunk = sock.recv(most, flags)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            raise _broken(exc) from exc
        if not chunk:
            raise ProxyError("closed during handshake", errno.ECONNRESET)
        return chunk


def _broken(exc: OSError) -> ProxyError:
    return ProxyError("connection to proxy broken", exc.errno or errno.ECONNRESET, str(exc))

"""The accept loop of the gateway's small local servers: the control socket and the metrics
endpoint.

Why one copy: both must keep serving whatever their clients do. An accept that fails (EMFILE
when the gateway is at its file limit, say) is retried a little later instead of ending the
server, and at most ``max_clients`` are served at once, the rest closed at once, so a pile of
idle connections costs a bounded number of tasks and file descriptors.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

__all__ = ["serve_clients"]

log = logging.getLogger("tunlwip")


async def serve_clients(
    listener: trio.socket.SocketType,
    handle: Callable[[trio.socket.SocketType], Awaitable[None]],
    *,
    max_clients: int,
    what: str,
    started: Callable[[], None],
) -> NoReturn:
    """Accept on ``listener`` until cancelled, each client in its own task (``handle`` owns
    the socket); ``started()`` once accepting. ``what`` names the server in debug logs."""
    clients = 0

    async def serve(sock: trio.socket.SocketType) -> None:
        nonlocal clients
        try:
            await handle(sock)
        finally:
            clients -= 1

    async with trio.open_nursery() as nursery:
        started()
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:  # EMFILE and the like: keep serving, a bit later
                log.debug("%s: accept failed: %s", what, exc)
                await trio.sleep(0.1)
                continue
            if clients >= max_clients:
                log.debug("%s: client refused, %d already connected", what, clients)
                sock.close()
                continue
            clients += 1
            nursery.start_soon(serve, sock)
    raise AssertionError("unreachable")  # pragma: no cover

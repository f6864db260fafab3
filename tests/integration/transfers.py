"""Real programs on both ends of a flow, and byte-verified transfers, shared by the gateway
tests (test_gateway_netns.py, test_faults_netns.py).

Why: a test that breaks one flow on purpose must also show the others kept working, with the
same servers and the same digest check the plain transfer tests use; one copy keeps them in
step.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time
from collections.abc import Callable

from gatewayproc import pattern
from netns import Namespace

__all__ = [
    "SERVER_SCRIPT",
    "SOCK_TIMEOUT",
    "OneShotServer",
    "ParallelUpload",
    "connect",
    "listen",
    "recv_all",
    "start_script_server",
    "upload_and_check_digest",
]

SOCK_TIMEOUT = 30.0

#: asyncio servers on all addresses. "echo" echoes and mirrors EOF; "digest" reads to EOF, then
#: answers "<sha256> <length>\n".
SERVER_SCRIPT = r"""
import asyncio, hashlib, sys

async def echo(r, w):
    try:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()
    finally:
        w.close()

async def digest(r, w):
    h, n = hashlib.sha256(), 0
    try:
        while data := await r.read(1 << 16):
            h.update(data)
            n += len(data)
        w.write(f"{h.hexdigest()} {n}\n".encode())
        await w.drain()
    finally:
        w.close()

async def main():
    handler = {"echo": echo, "digest": digest}[sys.argv[1]]
    server = await asyncio.start_server(handler, None, int(sys.argv[2]), backlog=1024)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def start_script_server(ns: Namespace, mode: str, port: int) -> None:
    ns.popen([sys.executable, "-c", SERVER_SCRIPT, mode, str(port)])
    ns.wait_port(port)


def listen(ns: Namespace, family: int, port: int) -> socket.socket:
    sock = ns.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    sock.listen(64)
    sock.settimeout(SOCK_TIMEOUT)
    return sock


def connect(
    ns: Namespace,
    family: int,
    host: str,
    port: int,
    *,
    timeout: float = SOCK_TIMEOUT,
    bind: str | None = None,
) -> socket.socket:
    sock = ns.socket(family)
    try:
        sock.settimeout(timeout)
        if bind is not None:
            sock.bind((bind, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(SOCK_TIMEOUT)
    return sock


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF (each recv bounded by the socket's timeout)."""
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


class OneShotServer:
    """Accepts one connection on ``listener`` in a daemon thread and runs ``fn`` on it."""

    def __init__(self, listener: socket.socket, fn: Callable[[socket.socket], bytes]) -> None:
        self._listener, self._fn = listener, fn
        self._result: list[bytes] = []
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            with self._listener:
                conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(SOCK_TIMEOUT)
                self._result.append(self._fn(conn))
        except BaseException as exc:
            self._error.append(exc)

    def result(self) -> bytes:
        self._thread.join(timeout=2 * SOCK_TIMEOUT)
        if self._error:
            raise self._error[0]
        assert self._result, "server thread did not finish"
        return self._result[0]


def upload_and_check_digest(sock: socket.socket, payload: bytes, seconds: float = 0.0) -> None:
    """Send ``payload`` to a "digest" server (64 KiB chunks, spread evenly over ``seconds``),
    half-close, and require its answer: the payload's sha256 and length."""
    chunk, view = 1 << 16, memoryview(payload)
    started = time.monotonic()
    for offset in range(0, len(payload), chunk if seconds else len(payload) or 1):
        time.sleep(max(0.0, started + seconds * offset / len(payload) - time.monotonic()))
        sock.sendall(view[offset : offset + (chunk if seconds else len(payload))])
    sock.shutdown(socket.SHUT_WR)
    reply = recv_all(sock).decode()
    assert reply == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n", reply


class ParallelUpload:
    """A healthy flow running alongside a fault: ``size`` bytes from ``ns`` to a "digest"
    server at ``host:port``, spread over ``seconds``, in a daemon thread; ``check`` requires
    that every byte arrived intact."""

    def __init__(self, ns: Namespace, family: int, host: str, port: int, *, size: int,
                 seconds: float, seed: int = 99) -> None:  # fmt: skip
        self._payload = pattern(seed, size)
        self._args = (ns, family, host, port, seconds)
        self._error: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ns, family, host, port, seconds = self._args
        try:
            with connect(ns, family, host, port) as sock:
                upload_and_check_digest(sock, self._payload, seconds)
        except BaseException as exc:
            self._error.append(exc)
        finally:
            self._done.set()

    def running(self) -> bool:
        return not self._done.is_set()

    def check(self, timeout: float = 2 * SOCK_TIMEOUT) -> None:
        self._thread.join(timeout)
        if self._error:
            raise AssertionError(f"the healthy transfer failed: {self._error[0]!r}")
        assert self._done.is_set(), "the healthy transfer did not finish"

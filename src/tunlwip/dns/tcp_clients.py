"""DNS over TCP from clients (RFC 7766): length-prefixed queries, several in flight per
connection, each answered as soon as it is ready, with deadlines against trickling clients.

Why a module of its own: the proxy decides what each query gets (``DnsProxy.answer``); this
is only the connection's framing, pipelining and deadlines, in a task per connection and a
task per query (TCP queries are few: clients fall back to TCP for truncated answers).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..tcp import LwipTcpStream
    from .proxy import DnsProxy

log = logging.getLogger("tunlwip.dns")

TCP_MAX_PIPELINED = 64  # queries per connection answered concurrently before reading pauses


async def serve_tcp_client(proxy: DnsProxy, stream: LwipTcpStream) -> None:
    """RFC 7766: length-prefixed queries, several in flight per connection, each answer
    written as soon as it is ready (so possibly out of order).

    Deadlines, so a client cannot hold a connection and its task by trickling: a query
    must arrive whole within ``tcp_query_timeout`` of its first byte (the idle timeout
    alone restarts with every byte), and each answer must be taken by the client within
    ``tcp_query_timeout`` of being ready (a client that never reads). Past either, the
    connection is reset and counted (``tcp_timeouts``)."""
    client = stream.remote
    send_lock = trio.Lock()
    slots = trio.Semaphore(TCP_MAX_PIPELINED)
    buffer = bytearray()
    config = proxy.config

    def cut_off(why: str) -> None:
        if nursery.cancel_scope.cancel_called:
            return  # already cut off
        proxy.counters.tcp_timeouts += 1
        log.debug("dns %s: TCP connection reset: %s", client, why)
        stream.abort()
        nursery.cancel_scope.cancel()

    async def send(message: bytes) -> None:
        with trio.move_on_after(config.tcp_query_timeout) as sending:
            async with send_lock:
                await stream.send_all(struct.pack("!H", len(message)) + message)
        if sending.cancelled_caught:
            cut_off(f"answer not taken within {config.tcp_query_timeout:g} s")

    async def answer_one(query: bytes) -> None:
        try:
            answer = await proxy.answer(query, client, max_udp_size=False)
        finally:
            proxy.release(query, client)
            slots.release()
        if answer is not None:
            try:
                await send(answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                nursery.cancel_scope.cancel()

    async with stream, trio.open_nursery() as nursery:
        query_started = 0.0  # when the first byte of the partial query in buffer came
        while True:
            if buffer:
                deadline = query_started + config.tcp_query_timeout
            else:
                deadline = trio.current_time() + config.tcp_idle_timeout
            with trio.move_on_at(deadline) as waited:
                data = await _receive_or_eof(stream)
            if waited.cancelled_caught and buffer:
                cut_off(f"query not complete within {config.tcp_query_timeout:g} s")
                break
            if waited.cancelled_caught or data is None:
                break
            if not buffer:
                query_started = trio.current_time()
            buffer += data
            while len(buffer) >= 2:
                (length,) = struct.unpack_from("!H", buffer)
                if len(buffer) < 2 + length:
                    break
                query = bytes(buffer[2 : 2 + length])
                del buffer[: 2 + length]
                query_started = trio.current_time()  # the next query's bytes came now
                admitted, refusal = proxy.admit(query, client)
                if not admitted:
                    if refusal is not None:
                        await send(refusal)
                    continue
                try:
                    await slots.acquire()
                except BaseException:  # cancelled while waiting: never started
                    proxy.release(query, client)
                    raise
                nursery.start_soon(answer_one, query)
        # EOF or idle: the answers still being resolved are written before the close.


async def _receive_or_eof(stream: LwipTcpStream) -> bytes | None:
    try:
        data = await stream.receive_some()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return data or None

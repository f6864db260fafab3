"""Small DNS servers on loopback for the upstream tests (tests/test_dns_upstreams*.py), and
the helpers that make and read their messages.

Why: ID rewriting, answer matching, the TC-to-TCP retry, connection reuse and certificate
checks are only believable on real sockets. The servers here are a few lines of trio and
dnspython each: ``UdpServer`` (with a misbehaving mode each) and ``StreamServer`` (DNS over
TCP, or TLS given a server context); each records what it was asked, for the tests to check.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Callable
from typing import Literal

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import trio

CLIENT_ID = 0x1234
HOST = "127.0.0.1"


def make_query(name: str = "www.test.", message_id: int = CLIENT_ID) -> bytes:
    return dns.message.make_query(name, "A", id=message_id).to_wire()


def answer_for(
    query_wire: bytes,
    address: str = "192.0.2.1",
    *,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    truncated: bool = False,
) -> bytes:
    query = dns.message.from_wire(query_wire)
    response = dns.message.make_response(query)
    if truncated:
        response.flags |= dns.flags.TC
    elif rcode != dns.rcode.NOERROR:
        response.set_rcode(rcode)
    else:
        name = query.question[0].name
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", address))
    return response.to_wire()


def addresses(wire: bytes) -> list[str]:
    message = dns.message.from_wire(wire)
    return [rd.to_text() for rrset in message.answer for rd in rrset]


def message_id(wire: bytes) -> int:
    return int(struct.unpack_from("!H", wire)[0])


class Reader:
    """Buffered reads for the test servers; None at end of stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def read(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not await self._more():
                return None
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def read_until(self, separator: bytes) -> bytes | None:
        while separator not in self.buffer:
            if not await self._more():
                return None
        data, _, self.buffer = self.buffer.partition(separator)
        return data


async def serve_framed(
    stream: trio.abc.Stream, respond: Callable[[bytes], tuple[bytes | None, bool]]
) -> bool:
    """Answer length-prefixed queries until EOF, or until ``respond`` says stop (True)."""
    reader = Reader(stream)
    while (header := await reader.read(2)) is not None:
        query = await reader.read(struct.unpack("!H", header)[0])
        assert query is not None
        answer, stop = respond(query)
        if answer is not None:
            await stream.send_all(struct.pack("!H", len(answer)) + answer)
        if stop:
            return True
    return False


UdpMode = Literal["answer", "noisy", "truncate", "silent", "servfail", "refused"]


class UdpServer:
    """A UDP DNS server; ``truncate`` mode answers with TC and serves TCP on the same port."""

    def __init__(self, mode: UdpMode = "answer", address: str = "192.0.2.1") -> None:
        self.mode = mode
        self.address = address
        self.ids: list[int] = []
        self.source_ports: list[int] = []
        self.tcp_ids: list[int] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"udp://{HOST}:{self.port}"

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((HOST, 0))
            self.port = sock.getsockname()[1]
            async with trio.open_nursery() as nursery:
                if self.mode == "truncate":
                    listeners = await trio.open_tcp_listeners(self.port, host=HOST)
                    nursery.start_soon(trio.serve_listeners, self._serve_tcp, listeners)
                task_status.started()
                while True:
                    data, peer = await sock.recvfrom(65535)
                    await self._answer(sock, data, peer)

    async def _answer(
        self, sock: trio.socket.SocketType, data: bytes, peer: tuple[str, int]
    ) -> None:
        self.ids.append(message_id(data))
        self.source_ports.append(peer[1])
        if self.mode == "silent":
            return
        if self.mode == "noisy":  # what a spoofer or a confused server might send first
            await sock.sendto(b"\x12garbage", peer)
            wrong = (message_id(data) + 1) % 0x10000
            await sock.sendto(struct.pack("!H", wrong) + answer_for(data, "203.0.113.66")[2:], peer)
        rcode = {"servfail": dns.rcode.SERVFAIL, "refused": dns.rcode.REFUSED}.get(
            self.mode, dns.rcode.NOERROR
        )
        answer = answer_for(data, self.address, rcode=rcode, truncated=self.mode == "truncate")
        await sock.sendto(answer, peer)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        def respond(query: bytes) -> tuple[bytes | None, bool]:
            self.tcp_ids.append(message_id(query))
            return answer_for(query, self.address), False

        async with stream:
            await serve_framed(stream, respond)


StreamMode = Literal["answer", "one_per_connection", "silent", "slow"]


class StreamServer:
    """DNS over TCP, or over TLS when given a server context; pipelined queries are answered
    in order. ``one_per_connection`` closes each connection after one answer (an idle
    timeout at its most impatient)."""

    def __init__(self, mode: StreamMode = "answer", tls: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls = tls
        self.connections = 0
        self.ids: list[int] = []
        self.handshake_failures = 0
        self.closed = trio.Event()  # a connection ended
        self.port = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        tcp = await trio.open_tcp_listeners(0, host=HOST)
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
        if self.tls is not None:
            listeners = [trio.SSLListener(t, self.tls, https_compatible=False) for t in tcp]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        def respond(query: bytes) -> tuple[bytes | None, bool]:
            self.ids.append(message_id(query))
            if self.mode == "silent":
                return None, False
            return answer_for(query), self.mode == "one_per_connection"

        self.connections += 1
        try:
            if isinstance(stream, trio.SSLStream):
                await stream.do_handshake()
            if self.mode == "slow":
                await trio.sleep(0.1)
            if await serve_framed(stream, respond):
                await stream.aclose()  # graceful: TLS sends close_notify
        except trio.BrokenResourceError:
            if isinstance(stream, trio.SSLStream) and not self.ids:
                self.handshake_failures += 1
        finally:
            await trio.aclose_forcefully(stream)
            self.closed.set()

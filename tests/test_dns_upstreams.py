"""DNS upstreams against small servers on loopback: UDP, TCP, DoT and DoH, and failover.

Why: ID rewriting, answer matching, the TC-to-TCP retry, connection reuse and certificate
checks are only believable on real sockets. The servers here are a few lines of trio and
dnspython each; the DoT/DoH certificate is made per test module with the openssl CLI.
Timeouts are real but short (tenths of a second): trio's autojump clock would jump while the
kernel is still moving loopback packets.
"""

from __future__ import annotations

import shutil
import ssl
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from tunlwip.dialer import Dialer
from tunlwip.dns.upstreams import (
    HttpsUpstream,
    TcpUpstream,
    TlsUpstream,
    UdpUpstream,
    UpstreamError,
    UpstreamSet,
    parse_upstream,
)
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ConfigError

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


DohMode = Literal["answer", "chunked", "error", "close", "until_close", "too_large"]


class DohServer:
    """A minimal HTTP/1.1 DoH server over TLS with keep-alive; records every request."""

    def __init__(self, tls: ssl.SSLContext, mode: DohMode = "answer") -> None:
        self.tls = tls
        self.mode = mode
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], int]] = []  # request line, headers, ID
        self.port = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        tcp = await trio.open_tcp_listeners(0, host=HOST)
        self.port = tcp[0].socket.getsockname()[1]
        listeners = [trio.SSLListener(t, self.tls, https_compatible=True) for t in tcp]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.connections += 1
        reader = Reader(stream)
        try:
            while (head := await reader.read_until(b"\r\n\r\n")) is not None:
                request_line, *lines = head.decode().split("\r\n")
                fields = (line.split(":", 1) for line in lines)
                headers = {name.strip().lower(): value.strip() for name, value in fields}
                body = await reader.read(int(headers["content-length"]))
                assert body is not None
                self.requests.append((request_line, headers, message_id(body)))
                await stream.send_all(self._response(answer_for(body)))
                if self.mode in ("close", "until_close"):
                    break
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    def _response(self, answer: bytes) -> bytes:
        if self.mode == "error":
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n"
        if self.mode == "until_close":  # HTTP/1.0 without a length: the body ends at EOF
            return b"HTTP/1.0 200 OK\r\nContent-Type: application/dns-message\r\n\r\n" + answer
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\n"
        if self.mode == "too_large":
            return head + b"Content-Length: 65536\r\n\r\n" + answer
        if self.mode == "chunked":
            interim = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            half = len(answer) // 2
            chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (answer[:half],
                              answer[half:]))  # fmt: skip
            return interim + head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        close = b"Connection: close\r\n" if self.mode == "close" else b""
        return head + close + b"Content-Length: %d\r\n\r\n" % len(answer) + answer


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for dot.test and 127.0.0.1 (the key sits beside it)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem",
         "-out", "c.pem", "-days", "1", "-subj", "/CN=dot.test",
         "-addext", "subjectAltName=DNS:dot.test,IP:127.0.0.1"],
        cwd=folder, check=True, capture_output=True,
    )  # fmt: skip
    return folder / "c.pem"


@pytest.fixture
def server_tls(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, cert.parent / "k.pem")
    return context


# -- UDP -----------------------------------------------------------------------------------


async def test_udp_restores_the_callers_id_and_asks_with_fresh_ids_and_ports(
    nursery: trio.Nursery,
) -> None:
    server = UdpServer()
    await nursery.start(server.run)
    upstream = parse_upstream(server.url, Dialer())
    assert isinstance(upstream, UdpUpstream)
    for _ in range(6):
        answer = await upstream.query(make_query())
        assert message_id(answer) == CLIENT_ID
        assert addresses(answer) == ["192.0.2.1"]
    assert len(server.ids) == 6
    assert len(set(server.ids)) > 1, "the same ID went upstream every time"
    assert len(set(server.source_ports)) > 1, "one socket was reused for every query"


async def test_udp_ignores_garbage_and_datagrams_with_the_wrong_id(nursery: trio.Nursery) -> None:
    server = UdpServer("noisy")
    await nursery.start(server.run)
    upstream = parse_upstream(server.url, Dialer())
    with trio.fail_after(2):
        answer = await upstream.query(make_query())
    assert addresses(answer) == ["192.0.2.1"]  # not 203.0.113.66 from the wrong-ID datagram


async def test_udp_truncated_answer_is_asked_again_over_tcp(nursery: trio.Nursery) -> None:
    server = UdpServer("truncate")
    await nursery.start(server.run)
    upstream_set = UpstreamSet([parse_upstream(server.url, Dialer())])
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert used.url == server.url
    assert message_id(answer) == CLIENT_ID
    assert not dns.message.from_wire(answer).flags & dns.flags.TC
    assert addresses(answer) == ["192.0.2.1"]
    assert len(server.ids) == len(server.tcp_ids) == 1
    assert upstream_set.counters["tcp_retries"] == 1
    await upstream_set.aclose()


async def test_udp_closed_port_fails_at_once() -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as probe:
        await probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    upstream = parse_upstream(f"udp://{HOST}:{port}", Dialer())
    with trio.fail_after(2), pytest.raises(UpstreamError, match="ConnectionRefused"):
        await upstream.query(make_query())


async def test_malformed_query_is_an_upstream_error() -> None:
    upstream = parse_upstream("udp://127.0.0.1:9", Dialer())
    with pytest.raises(UpstreamError, match="malformed query"):
        await upstream.query(b"\x00\x01short")


# -- TCP -----------------------------------------------------------------------------------


async def test_tcp_reuses_one_connection_for_sequential_queries(nursery: trio.Nursery) -> None:
    server = StreamServer()
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    assert isinstance(upstream, TcpUpstream)
    for name in ("a.test.", "b.test."):
        answer = await upstream.query(make_query(name))
        assert message_id(answer) == CLIENT_ID
        assert dns.message.from_wire(answer).question[0].name.to_text() == name
    assert server.connections == 1
    assert len(server.ids) == 2
    assert upstream.idle_connections == 1
    await upstream.aclose()
    assert upstream.idle_connections == 0
    with trio.fail_after(2):
        await server.closed.wait()


async def test_tcp_replaces_a_pooled_connection_the_server_closed(nursery: trio.Nursery) -> None:
    server = StreamServer("one_per_connection")
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    for _ in range(3):
        with trio.fail_after(2):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 3
    await upstream.aclose()


async def test_tcp_idle_connection_too_old_is_not_reused(nursery: trio.Nursery) -> None:
    server = StreamServer()
    await nursery.start(server.run)
    upstream = TcpUpstream("tcp://test", Dialer(), Endpoint.parse(HOST, server.port),
                           max_idle_age=0.1)  # fmt: skip
    await upstream.query(make_query())
    await trio.sleep(0.2)
    await upstream.query(make_query())
    assert server.connections == 2
    assert upstream.idle_connections == 1
    await upstream.aclose()


async def test_tcp_keeps_at_most_four_idle_connections(nursery: trio.Nursery) -> None:
    server = StreamServer("slow")
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    assert isinstance(upstream, TcpUpstream)
    with trio.fail_after(2):
        async with trio.open_nursery() as queries:
            for _ in range(6):
                queries.start_soon(upstream.query, make_query())
    assert server.connections == 6
    assert upstream.idle_connections == 4
    await upstream.aclose()


async def test_tcp_cancelled_query_closes_its_connection(nursery: trio.Nursery) -> None:
    server = StreamServer("silent")
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    assert isinstance(upstream, TcpUpstream)
    with trio.move_on_after(0.2) as scope:
        await upstream.query(make_query())
    assert scope.cancelled_caught
    with trio.fail_after(2):
        await server.closed.wait()  # the server saw the connection end
    assert upstream.idle_connections == 0


# -- DoT -----------------------------------------------------------------------------------


async def test_dot_verifies_the_server_name_and_reuses_the_session(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = StreamServer(tls=server_tls)
    await nursery.start(server.run)
    upstream = parse_upstream(f"tls://{HOST}:{server.port}#dot.test", Dialer(), ca_file=str(cert))
    assert isinstance(upstream, TlsUpstream)
    for _ in range(2):
        with trio.fail_after(5):
            answer = await upstream.query(make_query())
        assert message_id(answer) == CLIENT_ID
        assert addresses(answer) == ["192.0.2.1"]
    assert server.connections == 1
    await upstream.aclose()


async def test_dot_without_a_server_name_verifies_the_ip_address(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = StreamServer(tls=server_tls)
    await nursery.start(server.run)
    upstream = parse_upstream(f"tls://{HOST}:{server.port}", Dialer(), ca_file=str(cert))
    with trio.fail_after(5):
        assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    await upstream.aclose()


async def test_dot_replaces_a_pooled_session_the_server_closed(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = StreamServer("one_per_connection", tls=server_tls)
    await nursery.start(server.run)
    upstream = parse_upstream(f"tls://{HOST}:{server.port}", Dialer(), ca_file=str(cert))
    for _ in range(2):
        with trio.fail_after(5):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 2
    await upstream.aclose()


@pytest.mark.parametrize(("fragment", "with_ca"), [("#other.test", True), ("#dot.test", False)])
async def test_dot_refuses_a_certificate_that_does_not_verify(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path, fragment: str, with_ca: bool
) -> None:
    server = StreamServer(tls=server_tls)
    await nursery.start(server.run)
    ca_file = str(cert) if with_ca else None
    upstream = parse_upstream(f"tls://{HOST}:{server.port}{fragment}", Dialer(), ca_file=ca_file)
    with trio.fail_after(5), pytest.raises(UpstreamError, match="certificate verify failed"):
        await upstream.query(make_query())
    assert server.ids == []
    assert isinstance(upstream, TlsUpstream)
    assert upstream.idle_connections == 0


# -- DoH -----------------------------------------------------------------------------------


async def start_doh(nursery: trio.Nursery, tls: ssl.SSLContext, mode: DohMode) -> DohServer:
    server = DohServer(tls, mode)
    await nursery.start(server.run)
    return server


async def test_doh_posts_with_id_zero_and_keeps_the_connection(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "answer")
    url = f"https://dot.test:{server.port}/dns-query#{HOST}"
    upstream = parse_upstream(url, Dialer(), ca_file=str(cert))
    assert isinstance(upstream, HttpsUpstream)
    for _ in range(2):
        with trio.fail_after(5):
            answer = await upstream.query(make_query())
        assert message_id(answer) == CLIENT_ID
        assert addresses(answer) == ["192.0.2.1"]
    assert server.connections == 1
    request_line, headers, sent_id = server.requests[0]
    assert request_line == "POST /dns-query HTTP/1.1"
    assert headers["host"] == f"dot.test:{server.port}"
    assert headers["content-type"] == headers["accept"] == "application/dns-message"
    assert sent_id == 0
    await upstream.aclose()


async def test_doh_to_an_ip_address_with_a_custom_path(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "answer")
    upstream = parse_upstream(f"https://{HOST}:{server.port}/custom?x=1", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    with trio.fail_after(5):
        assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    request_line, headers, _ = server.requests[0]
    assert request_line == "POST /custom?x=1 HTTP/1.1"
    assert headers["host"] == f"{HOST}:{server.port}"
    await upstream.aclose()


async def test_doh_reads_chunked_answers_after_interim_responses(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "chunked")
    upstream = parse_upstream(f"https://dot.test:{server.port}#{HOST}", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    for _ in range(2):
        with trio.fail_after(5):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 1
    await upstream.aclose()


async def test_doh_honours_connection_close(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "close")
    upstream = parse_upstream(f"https://dot.test:{server.port}#{HOST}", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    assert isinstance(upstream, HttpsUpstream)
    for _ in range(2):
        with trio.fail_after(5):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 2
    assert upstream.idle_connections == 0


async def test_doh_reads_a_body_that_ends_with_the_connection(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "until_close")
    upstream = parse_upstream(f"https://dot.test:{server.port}#{HOST}", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    assert isinstance(upstream, HttpsUpstream)
    for _ in range(2):
        with trio.fail_after(5):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 2
    assert upstream.idle_connections == 0


async def test_doh_refuses_a_body_larger_than_a_dns_message(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "too_large")
    upstream = parse_upstream(f"https://dot.test:{server.port}#{HOST}", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    with trio.fail_after(5), pytest.raises(UpstreamError, match=r"HTTP body too large \(65536"):
        await upstream.query(make_query())


async def test_doh_error_status_is_an_upstream_error(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "error")
    upstream = parse_upstream(f"https://dot.test:{server.port}#{HOST}", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    with trio.fail_after(5), pytest.raises(UpstreamError, match="HTTP status 503"):
        await upstream.query(make_query())


async def test_doh_refuses_a_wrong_host_name(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "answer")
    upstream = parse_upstream(f"https://doh.other:{server.port}#{HOST}", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    with trio.fail_after(5), pytest.raises(UpstreamError, match="certificate verify failed"):
        await upstream.query(make_query())
    assert server.requests == []


# -- failover ------------------------------------------------------------------------------


async def start_udp(nursery: trio.Nursery, mode: UdpMode, address: str = "192.0.2.1") -> str:
    server = UdpServer(mode, address)
    await nursery.start(server.run)
    return server.url


async def test_set_skips_an_upstream_that_does_not_answer(nursery: trio.Nursery) -> None:
    silent = await start_udp(nursery, "silent")
    good = await start_udp(nursery, "answer", "192.0.2.2")
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (silent, good)],
                               attempt_timeout=0.3)  # fmt: skip
    started = trio.current_time()
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert 0.3 <= trio.current_time() - started < 1.5
    assert used.url == good
    assert message_id(answer) == CLIENT_ID
    assert addresses(answer) == ["192.0.2.2"]
    assert upstream_set.counters["timeouts"] == 1
    assert upstream_set.counters["queries"] == 1


async def test_set_moves_on_after_servfail(nursery: trio.Nursery) -> None:
    servfail = await start_udp(nursery, "servfail")
    good = await start_udp(nursery, "answer", "192.0.2.2")
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (servfail, good)])
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert used.url == good
    assert addresses(answer) == ["192.0.2.2"]
    assert upstream_set.counters["bad_rcodes"] == 1


async def test_set_returns_the_last_refusal_as_it_is(nursery: trio.Nursery) -> None:
    servfail = await start_udp(nursery, "servfail")
    refused = await start_udp(nursery, "refused")
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (servfail, refused)])
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert used.url == refused
    assert message_id(answer) == CLIENT_ID
    assert dns.message.from_wire(answer).rcode() == dns.rcode.REFUSED


async def test_set_fails_when_every_upstream_fails(nursery: trio.Nursery) -> None:
    silent = await start_udp(nursery, "silent")
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as probe:
        await probe.bind((HOST, 0))
        closed = f"udp://{HOST}:{probe.getsockname()[1]}"
    upstream_set = UpstreamSet([parse_upstream(u, Dialer()) for u in (closed, silent)],
                               attempt_timeout=0.2)  # fmt: skip
    with trio.fail_after(2), pytest.raises(UpstreamError, match="all upstreams failed") as info:
        await upstream_set.resolve(make_query())
    assert closed in str(info.value) and silent in str(info.value)
    counters = upstream_set.counters
    assert (counters["failures"], counters["timeouts"], counters["all_failed"]) == (1, 1, 1)


async def test_empty_set_fails() -> None:
    with pytest.raises(UpstreamError, match="none configured"):
        await UpstreamSet([]).resolve(make_query())


# -- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "endpoint", "detail"),
    [
        ("udp://192.0.2.1", UdpUpstream, "192.0.2.1:53", None),
        ("udp://[fd00:1::2]:5353", UdpUpstream, "[fd00:1::2]:5353", None),
        ("tcp://192.0.2.1:5300", TcpUpstream, "192.0.2.1:5300", None),
        ("tls://192.0.2.1#dns.example", TlsUpstream, "192.0.2.1:853", "dns.example"),
        ("tls://[2001:db8::1]", TlsUpstream, "[2001:db8::1]:853", "2001:db8::1"),
        ("https://dns.example#192.0.2.1", HttpsUpstream, "192.0.2.1:443",
         ("dns.example", "dns.example", "/dns-query")),
        ("https://192.0.2.1:8443/q?x=1", HttpsUpstream, "192.0.2.1:8443",
         ("192.0.2.1", "192.0.2.1:8443", "/q?x=1")),
        ("https://[2001:db8::1]/dns-query", HttpsUpstream, "[2001:db8::1]:443",
         ("2001:db8::1", "[2001:db8::1]", "/dns-query")),
    ],
)  # fmt: skip
def test_parse_upstream_forms(url: str, kind: type, endpoint: str, detail: object) -> None:
    upstream = parse_upstream(url, Dialer())
    assert isinstance(upstream, kind)
    assert upstream.url == url
    assert str(upstream.endpoint) == endpoint  # type: ignore[attr-defined]
    if isinstance(upstream, TlsUpstream):
        assert upstream.server_name == detail
    if isinstance(upstream, HttpsUpstream):
        assert (upstream.server_name, upstream.host_header, upstream.target) == detail


@pytest.mark.parametrize(
    "url",
    [
        "1.1.1.1",
        "dns://1.1.1.1",
        "udp://",
        "udp://dns.google",
        "udp://fd00::1",
        "udp://1.1.1.1:0",
        "udp://1.1.1.1:99999",
        "udp://1.1.1.1:x",
        "udp://user@1.1.1.1",
        "udp://1.1.1.1#name",
        "tcp://1.1.1.1/path",
        "tls://dns.example",
        "tls://1.1.1.1#bad_name!",
        "https://dns.example/dns-query",
        "https://dns.example#not-an-ip",
        "https://1.1.1.1#8.8.8.8",
        "https://dns.google/dns-query{?dns}",
        "https://dns.example/d\u00fcns#192.0.2.1",
    ],
)
def test_parse_upstream_rejects(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_upstream(url, Dialer())
    assert repr(url) in str(info.value)


def test_parse_upstream_rejects_a_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CA file"):
        parse_upstream("tls://192.0.2.1", Dialer(), ca_file=str(tmp_path / "missing.pem"))

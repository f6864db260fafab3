"""DNS over TLS and over HTTPS upstreams against small servers on loopback (servers:
dnsservers.py, and the DoH server here).

Why: an encrypted upstream is only worth it if its certificate is checked (by name, or by IP
address without one) and nothing is sent when it does not verify; a session is reused, and
replaced when the server closed it; DoH speaks enough HTTP/1.1 (keep-alive, chunked bodies,
interim responses, ``Connection: close``, bodies ending with the connection) and refuses what
is not an answer. The certificate is made per test module with the openssl CLI.
Timeouts are real but short (tenths of a second): trio's autojump clock would jump while
the kernel is still moving loopback packets.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Literal

import pytest
import trio

from tunlwip.dialer import Dialer
from tunlwip.dns.upstreams import HttpsUpstream, TlsUpstream, UpstreamError, parse_upstream

from dnsservers import (
    CLIENT_ID,
    HOST,
    Reader,
    StreamServer,
    addresses,
    answer_for,
    make_query,
    message_id,
)

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


def doh_upstream(server: DohServer, cert: Path) -> HttpsUpstream:
    """The DoH upstream of ``server``, reached by a name its certificate holds (``dot.test``)
    at ``HOST``."""
    upstream = parse_upstream(f"https://dot.test:{server.port}#{HOST}", Dialer(),
                              ca_file=str(cert))  # fmt: skip
    assert isinstance(upstream, HttpsUpstream)
    return upstream


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
    upstream = doh_upstream(server, cert)
    for _ in range(2):
        with trio.fail_after(5):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 1
    await upstream.aclose()


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("close", id="connection-close"),
        pytest.param("until_close", id="body-ends-with-the-connection"),
    ],
)
async def test_doh_takes_a_new_connection_after_the_server_closed_one(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path, mode: DohMode
) -> None:
    """``Connection: close``, and a body without a length that ends with the connection."""
    server = await start_doh(nursery, server_tls, mode)
    upstream = doh_upstream(server, cert)
    for _ in range(2):
        with trio.fail_after(5):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 2
    assert upstream.idle_connections == 0


async def test_doh_refuses_a_body_larger_than_a_dns_message(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "too_large")
    upstream = doh_upstream(server, cert)
    with trio.fail_after(5), pytest.raises(UpstreamError, match=r"HTTP body too large \(65536"):
        await upstream.query(make_query())


async def test_doh_error_status_is_an_upstream_error(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, cert: Path
) -> None:
    server = await start_doh(nursery, server_tls, "error")
    upstream = doh_upstream(server, cert)
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

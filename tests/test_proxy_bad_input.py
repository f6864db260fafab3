"""Hostile proxies: small hand-written SOCKS5 and HTTP servers on loopback that answer short,
wrong, huge, slow or not at all. Every case must end in a ``ProxyError`` with its stable
reason, within the handshake deadline (trio's virtual clock), with no socket left open; and a
good answer must leave every byte after it to the destination.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))

from proxyservers import open_fds
from tunlwip.dialer import Dialer
from tunlwip.egress import parse_via, socks5
from tunlwip.egress.proxy_dial import open_tcp_via, open_udp_via
from tunlwip.egress.via import Socks5Proxy
from tunlwip.endpoint import Endpoint, IPAddress
from tunlwip.errors import ProxyError

TARGET = Endpoint.parse("198.18.0.9", 443)
Script = Callable[[trio.SocketStream], Awaitable[None]]
OK_REPLY = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"


async def serve(nursery: trio.Nursery, script: Script) -> int:
    """A one-script server on 127.0.0.1; returns its port."""

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                await script(stream)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return int(listeners[0].socket.getsockname()[1])


async def read(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def socks_after_greeting(answer: bytes, *, then_sleep: bool = True) -> Script:
    """Read the greeting (3 bytes: no auth offered), send ``answer``, then wait."""

    async def script(stream: trio.SocketStream) -> None:
        await read(stream, 3)
        await stream.send_all(answer)
        if then_sleep:
            await trio.sleep_forever()

    return script


def socks_after_request(reply: bytes, *, drip: float = 0.0) -> Script:
    """Accept no-auth, read the CONNECT request (by address: 10 bytes), answer ``reply``
    (byte by byte every ``drip`` seconds if set), then wait."""

    async def script(stream: trio.SocketStream) -> None:
        await read(stream, 3)
        await stream.send_all(b"\x05\x00")
        await read(stream, 10)
        if drip:
            for byte in reply:
                await stream.send_all(bytes([byte]))
                await trio.sleep(drip)
        else:
            await stream.send_all(reply)
        await trio.sleep_forever()

    return script


async def close_at_once(stream: trio.SocketStream) -> None:
    await read(stream, 3)


async def say_nothing(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


SOCKS_CASES = {
    "short reply then close": (socks_after_greeting(b"\x05", then_sleep=False),
                               "closed during handshake"),
    "closing early": (close_at_once, "closed during handshake"),
    "wrong version": (socks_after_greeting(b"\x04\x00"), "bad version"),
    "no acceptable method": (socks_after_greeting(b"\x05\xff"), "no acceptable auth method"),
    "extra bytes after the method choice": (socks_after_greeting(b"\x05\x00" + bytes(8)),
                                            "bad version"),
    "wrong version in the reply": (socks_after_request(b"\x04" + OK_REPLY[1:]), "bad version"),
    "wrong address type": (socks_after_request(b"\x05\x00\x00\x09\x00\x00"), "bad address type"),
    "huge length that never comes": (socks_after_request(b"\x05\x00\x00\x03\xff" + b"a" * 20),
                                     "handshake timeout"),
    "empty name": (socks_after_request(b"\x05\x00\x00\x03\x00\x00\x00"), "bad address"),
    "general failure": (socks_after_request(b"\x05\x01\x00\x01" + bytes(6)), "general failure"),
    "slow drip": (socks_after_request(OK_REPLY, drip=1.0), "handshake timeout"),
    "silence": (say_nothing, "handshake timeout"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SOCKS_CASES))
async def test_hostile_socks5_proxy(autojump_clock: trio.abc.Clock, case: str) -> None:
    script, reason = SOCKS_CASES[case]
    before = open_fds()
    async with trio.open_nursery() as server:
        port = await serve(server, script)
        started = trio.current_time()
        with pytest.raises(ProxyError) as caught:
            await open_tcp_via(parse_via(f"socks5://127.0.0.1:{port}"), Dialer(), TARGET,
                               handshake_timeout=3)  # fmt: skip
        assert caught.value.reason == f"proxy: {reason}"
        assert trio.current_time() - started <= 3.01
        server.cancel_scope.cancel()
    assert open_fds() == before  # the server's sockets closed, and none of ours left


async def test_socks5_reply_leaves_the_destinations_bytes(nursery: trio.Nursery) -> None:
    """A reply with a 255-byte name followed at once by the destination's data: exactly the
    262 reply bytes are taken."""
    reply = b"\x05\x00\x00\x03\xff" + b"n" * 255 + b"\x01\xbb"
    port = await serve(nursery, socks_after_request(reply + b"DESTINATION FIRST"))
    sock = await open_tcp_via(parse_via(f"socks5://127.0.0.1:{port}"), Dialer(), TARGET)
    with sock:
        await trio.lowlevel.wait_readable(sock)
        assert sock.recv(100) == b"DESTINATION FIRST"


def rfc1929_server(status: int, seen: list[bytes]) -> Script:
    """Insist on user/password, record the sub-negotiation, answer ``status``."""

    async def script(stream: trio.SocketStream) -> None:
        assert await read(stream, 4) == b"\x05\x02\x00\x02"
        await stream.send_all(b"\x05\x02")
        head = await read(stream, 2)
        user = await read(stream, head[1])
        length = await read(stream, 1)
        seen.append(head + user + length + await read(stream, length[0]))
        await stream.send_all(bytes([1, status]))
        if status == 0:
            await read(stream, 10)
            await stream.send_all(OK_REPLY)
        await trio.sleep_forever()

    return script


async def test_rfc1929_user_password(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []
    good = await serve(nursery, rfc1929_server(0, seen))
    sock = await open_tcp_via(parse_via(f"socks5://b%40b:p%3Aw@127.0.0.1:{good}"), Dialer(),
                              TARGET)  # fmt: skip
    sock.close()
    assert seen == [b"\x01\x03b@b\x03p:w"]
    bad = await serve(nursery, rfc1929_server(1, seen))
    with pytest.raises(ProxyError, match="authentication failed") as caught:
        await open_tcp_via(parse_via(f"socks5://u:p@127.0.0.1:{bad}"), Dialer(), TARGET)
    assert caught.value.errno == errno.EACCES


# -- HTTP CONNECT --------------------------------------------------------------------------------
def http_answer(answer: bytes, *, drip: float = 0.0) -> Script:
    async def script(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        if drip:
            for byte in answer:
                await stream.send_all(bytes([byte]))
                await trio.sleep(drip)
        else:
            await stream.send_all(answer)
        await trio.sleep_forever()

    return script


HTTP_CASES = {
    "endless head": (http_answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000),
                     "response head too long"),
    "garbage": (http_answer(b"\x05\x00\r\n\r\n"), "bad response"),
    "too many interim heads": (http_answer(b"HTTP/1.1 100 Continue\r\n\r\n" * 5),
                               "bad response"),
    "closing early": (http_answer(b"HTTP/1.1 200"), "handshake timeout"),
    "slow drip": (http_answer(b"HTTP/1.1 200 OK\r\n\r\n", drip=1.0), "handshake timeout"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HTTP_CASES))
async def test_hostile_http_proxy(autojump_clock: trio.abc.Clock, case: str) -> None:
    script, reason = HTTP_CASES[case]
    before = open_fds()
    async with trio.open_nursery() as server:
        port = await serve(server, script)
        started = trio.current_time()
        with pytest.raises(ProxyError) as caught:
            await open_tcp_via(parse_via(f"http://127.0.0.1:{port}"), Dialer(), TARGET,
                               handshake_timeout=3)  # fmt: skip
        assert caught.value.reason == f"proxy: {reason}"
        assert trio.current_time() - started <= 3.01
        server.cancel_scope.cancel()
    assert open_fds() == before


async def test_http_proxy_closing_mid_head(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n")

    port = await serve(nursery, script)
    with pytest.raises(ProxyError, match="closed during handshake"):
        await open_tcp_via(parse_via(f"http://127.0.0.1:{port}"), Dialer(), TARGET)


async def test_http_head_and_destination_bytes_in_one_segment(nursery: trio.Nursery) -> None:
    """The head's end found by peeking: what follows it in the same segment stays put."""
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nSSH-2.0-destination\r\n"
    port = await serve(nursery, http_answer(answer))
    sock = await open_tcp_via(parse_via(f"http://127.0.0.1:{port}"), Dialer(), TARGET)
    with sock:
        await trio.lowlevel.wait_readable(sock)
        assert sock.recv(100) == b"SSH-2.0-destination\r\n"


# -- a hostile UDP relay ---------------------------------------------------------------------
async def test_udp_association_drops_fragments_foreign_and_malformed(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The proxy names 0.0.0.0 as its relay (so its own address is used); the relay answers
    each datagram with a fragment, a foreign source, a malformed header and the real reply."""
    relay = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await relay.bind(("127.0.0.1", 0))
    relay_port = relay.getsockname()[1]
    target = Endpoint.parse("127.0.0.1", 9999)

    async def run_relay() -> None:
        with relay:
            while True:
                data, peer = await relay.recvfrom(65535)
                host, port, payload = socks5.parse_udp_datagram(data)
                assert (host, port) == (target.address, target.port)
                good = socks5.udp_header(target.address, target.port)
                for datagram in (b"\x00\x00\x01" + good[3:] + b"fragment",
                                 socks5.udp_header(target.address, 1) + b"foreign port",
                                 socks5.udp_header(Endpoint.parse("127.0.0.2", 0).address,
                                                   target.port) + b"foreign host",
                                 b"\x00\x00\x00\x07junk", good + b"re: " + payload):  # fmt: skip
                    await relay.sendto(datagram, peer)

    async def control(stream: trio.SocketStream) -> None:
        await read(stream, 3)
        await stream.send_all(b"\x05\x00")
        assert await read(stream, 10) == socks5.udp_associate_request()
        await stream.send_all(b"\x05\x00\x00\x01\x00\x00\x00\x00" + relay_port.to_bytes(2, "big"))
        await trio.sleep(5)  # then the proxy ends the association

    nursery.start_soon(run_relay)
    port = await serve(nursery, control)
    via = parse_via(f"socks5://127.0.0.1:{port}")
    assert isinstance(via, Socks5Proxy)
    before = open_fds()
    association = await open_udp_via(via, Dialer(), target)
    assert association.relay == Endpoint.parse("127.0.0.1", relay_port)
    nursery.start_soon(association.watch_control)
    with trio.fail_after(3):
        await association.send(b"hello")
        assert await association.receive() == b"re: hello"
    counters = association.counters
    assert (counters.fragments, counters.foreign, counters.malformed) == (1, 2, 1)
    with trio.fail_after(10), pytest.raises(ProxyError, match="association closed"):
        await association.receive()
    assert open_fds() == before


async def test_remote_dns_sends_only_a_valid_name(nursery: trio.Nursery) -> None:
    """With ``remote_dns`` the flow's name goes to the proxy (ATYP 3) if it is a host name;
    a name from a client's bytes that is not one falls back to the address (ATYP 1)."""
    requests: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        await read(stream, 3)
        await stream.send_all(b"\x05\x00")
        head = await read(stream, 5)
        rest = await read(stream, head[4] + 2 if head[3] == 3 else 5)
        requests.append(head + rest)
        await stream.send_all(OK_REPLY)
        await trio.sleep_forever()

    port = await serve(nursery, record)
    via = parse_via(f"socks5://127.0.0.1:{port}?remote_dns=true")
    for name in ("Example.ORG.", "bad\r\nname", None):
        sock = await open_tcp_via(via, Dialer(), TARGET, name=name)
        sock.close()
    by_name = socks5.connect_request("Example.ORG", 443)
    by_address = socks5.connect_request(TARGET.address, 443)
    assert requests == [by_name, by_address, by_address]


async def test_what_is_not_dialed() -> None:
    """reject refuses at once; drop and UDP to an HTTP proxy are no dials (nothing opened)."""
    before = open_fds()
    with pytest.raises(ConnectionRefusedError):
        await open_tcp_via(parse_via("reject"), Dialer(), TARGET)
    with pytest.raises(ConnectionRefusedError):
        await open_udp_via(parse_via("reject"), Dialer(), TARGET)
    with pytest.raises(ValueError, match="not dialed"):
        await open_tcp_via(parse_via("drop"), Dialer(), TARGET)
    with pytest.raises(ValueError, match="no association"):
        await open_udp_via(parse_via("direct"), Dialer(), TARGET)
    with pytest.raises(ProxyError, match="no udp via http proxy") as caught:
        await open_udp_via(parse_via("http://127.0.0.1:3128"), Dialer(), TARGET)
    assert caught.value.errno == errno.EPROTONOSUPPORT
    assert open_fds() == before


async def test_proxy_name_not_resolved() -> None:
    async def nothing(name: str) -> list[IPAddress]:
        return []

    with pytest.raises(ProxyError, match="name not resolved"):
        await open_tcp_via(parse_via("socks5://proxy.invalid:1080"), Dialer(), TARGET,
                           resolve=nothing)  # fmt: skip

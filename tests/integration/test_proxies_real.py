"""The proxy clients against real proxies on loopback: danted (SOCKS5: CONNECT by address and
by name, a refused port, UDP ASSOCIATE, user/password) and tinyproxy (HTTP CONNECT, Basic auth,
a refused port), each started by the test (tests/proxyservers.py).

What matters beyond "it connects": the socket handed back is protected, and positioned exactly
after the handshake (a server that speaks first loses no byte), and failures arrive as the
errors a direct dial raises, so the client sees the same thing through a proxy.
"""

from __future__ import annotations

import errno
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxyservers import danted, free_port, open_fds, tcp_echo, tinyproxy, udp_echo
from tunlwip.dialer import Dialer
from tunlwip.egress import parse_via
from tunlwip.egress.proxy_dial import open_tcp_via, open_udp_via
from tunlwip.egress.via import Socks5Proxy
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ProxyError

from harness import Harness
from tcppeer import TcpPeer

GREETING = b"220 hello from the destination\r\n"


@pytest.fixture(autouse=True)
def _need_root_and_programs(netns_available: None, require_tool: Callable[[str], str]) -> None:
    """danted needs root (it switches users); both programs come from make sysdeps."""
    require_tool("danted")
    require_tool("tinyproxy")


class RecordingDialer(Dialer):
    """A dialer whose protector records every socket it protected."""

    def __init__(self) -> None:
        self.protected: list[int] = []
        super().__init__(lambda sock: self.protected.append(sock.fileno()), connect_timeout=5)


def target(port: int) -> Endpoint:
    return Endpoint.parse("127.0.0.1", port)


async def exchange(sock: socket.socket, payload: bytes, expect_first: bytes = b"") -> bytes:
    """Through ``sock`` (as the C relay would use it): read the server's greeting, if any, then
    send ``payload`` and read its echo."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with stream:
        received = b""
        with trio.fail_after(5):
            while len(received) < len(expect_first):
                received += await stream.receive_some(4096)
            assert received == expect_first
            await stream.send_all(payload)
            echoed = b""
            while len(echoed) < len(payload):
                echoed += await stream.receive_some(4096)
    return echoed


# -- SOCKS5 through danted ---------------------------------------------------------------------
async def test_socks5_connect_by_address_keeps_every_destination_byte(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo_port = await tcp_echo(nursery, greeting=GREETING)
    with danted(tmp_path) as port:
        dialer = RecordingDialer()
        sock = await open_tcp_via(parse_via(f"socks5://127.0.0.1:{port}"), dialer,
                                  target(echo_port))  # fmt: skip
        assert sock.fileno() in dialer.protected
        assert not sock.getblocking()
        assert await exchange(sock, b"ping" * 1000, GREETING) == b"ping" * 1000


async def test_socks5_connect_by_name_with_remote_dns(nursery: trio.Nursery,
                                                      tmp_path: Path) -> None:  # fmt: skip
    echo_port = await tcp_echo(nursery)
    with danted(tmp_path) as port:
        via = parse_via(f"socks5://127.0.0.1:{port}?remote_dns=true")
        # The address is deliberately wrong: with remote_dns the proxy resolves the name.
        sock = await open_tcp_via(via, Dialer(), Endpoint.parse("198.18.0.99", echo_port),
                                  name="localhost")  # fmt: skip
        assert await exchange(sock, b"by name") == b"by name"


async def test_socks5_refused_port_is_connection_refused(tmp_path: Path) -> None:
    with danted(tmp_path) as port:
        before = open_fds()
        with pytest.raises(ConnectionRefusedError):
            await open_tcp_via(parse_via(f"socks5://127.0.0.1:{port}"), Dialer(),
                               target(free_port()))  # fmt: skip
        assert open_fds() == before


async def test_socks5_udp_associate_echo(nursery: trio.Nursery, tmp_path: Path) -> None:
    echo_port = await udp_echo(nursery)
    with danted(tmp_path) as port:
        via = parse_via(f"socks5://127.0.0.1:{port}")
        assert isinstance(via, Socks5Proxy)
        dialer = RecordingDialer()
        association = await open_udp_via(via, dialer, target(echo_port))
        assert association.udp_socket.fileno() in dialer.protected
        assert association.control_socket.fileno() in dialer.protected
        try:
            with trio.fail_after(5):
                for size in (1, 512, 1400, 8000):
                    payload = secrets.token_bytes(size)
                    await association.send(payload)
                    assert await association.receive() == payload
        finally:
            await association.aclose()
        assert association.counters.sent == association.counters.received == 4


async def test_socks5_association_ends_when_the_control_connection_closes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo_port = await udp_echo(nursery)
    with danted(tmp_path) as port:
        via = parse_via(f"socks5://127.0.0.1:{port}")
        assert isinstance(via, Socks5Proxy)
        association = await open_udp_via(via, Dialer(), target(echo_port))
        nursery.start_soon(association.watch_control)
    try:
        # danted and its workers are gone: the control connection closed, so a waiting
        # receive ends.
        with trio.fail_after(15), pytest.raises(ProxyError, match="association closed"):
            await association.receive()
        assert association.closed
    finally:
        association.close()


async def test_socks5_over_ipv6(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Proxy and destinations on ::1: replies with IPv6 addresses (ATYP 4), and an association
    over an IPv6 control connection (its request names [::]:0, the family danted wants)."""
    tcp_port = await tcp_echo(nursery, greeting=GREETING, host="::1")
    udp_port = await udp_echo(nursery, host="::1")
    with danted(tmp_path) as port:
        via = parse_via(f"socks5://[::1]:{port}")
        sock = await open_tcp_via(via, Dialer(), Endpoint.parse("::1", tcp_port))
        assert await exchange(sock, b"v6", GREETING) == b"v6"
        assert isinstance(via, Socks5Proxy)
        association = await open_udp_via(via, Dialer(), Endpoint.parse("::1", udp_port))
        try:
            assert association.relay.family == 6
            with trio.fail_after(5):
                await association.send(b"datagram over v6")
                assert await association.receive() == b"datagram over v6"
        finally:
            await association.aclose()


@pytest.fixture
def system_user() -> Iterator[tuple[str, str]]:
    """A uniquely named system user (danted's ``username`` method checks the password
    database), always deleted again."""
    name = f"tlwp{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True)  # fmt: skip
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True)
        yield name, password
    finally:
        subprocess.run(["userdel", name], check=False)


async def test_socks5_username_auth(nursery: trio.Nursery, tmp_path: Path,
                                    system_user: tuple[str, str]) -> None:  # fmt: skip
    echo_port = await tcp_echo(nursery)
    user, password = system_user
    with danted(tmp_path, socksmethod="username") as port:
        good = parse_via(f"socks5://{user}:{password}@127.0.0.1:{port}")
        sock = await open_tcp_via(good, Dialer(), target(echo_port))
        assert await exchange(sock, b"authenticated") == b"authenticated"
        bad = parse_via(f"socks5://{user}:wrong@127.0.0.1:{port}")
        with pytest.raises(ProxyError, match="authentication failed"):
            await open_tcp_via(bad, Dialer(), target(echo_port))
        anonymous = parse_via(f"socks5://127.0.0.1:{port}")
        with pytest.raises(ProxyError, match="no acceptable auth method"):
            await open_tcp_via(anonymous, Dialer(), target(echo_port))


async def test_a_proxy_that_is_down_fails_fast_as_the_proxys_failure() -> None:
    with trio.fail_after(3), pytest.raises(ProxyError, match="proxy: refused") as caught:
        await open_tcp_via(parse_via(f"socks5://127.0.0.1:{free_port()}"), Dialer(), target(80))
    assert caught.value.errno == errno.ECONNREFUSED
    assert not isinstance(caught.value, ConnectionRefusedError)  # the destination may be up


# -- HTTP CONNECT through tinyproxy ----------------------------------------------------------
async def test_http_connect_keeps_every_destination_byte(nursery: trio.Nursery,
                                                         tmp_path: Path) -> None:  # fmt: skip
    echo_port = await tcp_echo(nursery, greeting=GREETING)
    with tinyproxy(tmp_path, [echo_port]) as port:
        dialer = RecordingDialer()
        sock = await open_tcp_via(parse_via(f"http://127.0.0.1:{port}"), dialer,
                                  target(echo_port))  # fmt: skip
        assert sock.fileno() in dialer.protected
        assert await exchange(sock, b"pong" * 3000, GREETING) == b"pong" * 3000


async def test_http_connect_basic_auth(nursery: trio.Nursery, tmp_path: Path) -> None:
    echo_port = await tcp_echo(nursery)
    with tinyproxy(tmp_path, [echo_port], basic_auth=("alice", "s3cret")) as port:
        with pytest.raises(ProxyError, match="proxy authentication required"):
            await open_tcp_via(parse_via(f"http://127.0.0.1:{port}"), Dialer(), target(echo_port))
        sock = await open_tcp_via(parse_via(f"http://alice:s3cret@127.0.0.1:{port}"), Dialer(),
                                  target(echo_port))  # fmt: skip
        assert await exchange(sock, b"with auth") == b"with auth"


async def test_http_connect_refused_port(tmp_path: Path) -> None:
    """tinyproxy answers 500 "Unable to connect" for a refused port and an unresolvable name
    alike, so the truthful mapping is "host unreachable", not "refused"."""
    closed = free_port()
    with tinyproxy(tmp_path, [closed]) as port:
        before = open_fds()
        with pytest.raises(OSError, match="host unreachable") as caught:
            await open_tcp_via(parse_via(f"http://127.0.0.1:{port}"), Dialer(), target(closed))
        assert caught.value.errno == errno.EHOSTUNREACH
        assert open_fds() == before


async def test_http_connect_port_not_allowed_is_forbidden(tmp_path: Path) -> None:
    with (
        tinyproxy(tmp_path, [free_port()]) as port,
        pytest.raises(ProxyError, match="forbidden by proxy"),
    ):
        await open_tcp_via(parse_via(f"http://127.0.0.1:{port}"), Dialer(), target(443))


# -- the C relay takes the proxied socket --------------------------------------------------------
@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_the_c_relay_carries_a_proxied_flow(harness: Harness, nursery: trio.Nursery,
                                                  tmp_path: Path, scheme: str) -> None:  # fmt: skip
    """What the gateway will do with the socket: hand it to the C relay with the client's lwIP
    connection. The destination speaks first; the client gets its greeting, then the echo of
    a transfer larger than the socket buffers, then EOF, with no Python in between."""
    echo_port = await tcp_echo(nursery, greeting=GREETING)
    payload = secrets.token_bytes(3_000_000)
    proxy = danted(tmp_path) if scheme == "socks5" else tinyproxy(tmp_path, [echo_port])
    with proxy as port:
        sock = await open_tcp_via(parse_via(f"{scheme}://127.0.0.1:{port}"), Dialer(),
                                  target(echo_port))  # fmt: skip
        peer = TcpPeer(harness.wire, "198.18.0.2", 40000, "198.18.0.9", echo_port)
        await peer.connect()
        harness.stack.relay(await harness.next_stream(), sock)
        with trio.fail_after(60):
            # Read the echo before closing: tinyproxy ends both directions when the client
            # half-closes (checked with plain sockets: it cuts the echo short), danted not.
            await peer.send(payload)
            assert await peer.recv_exactly(len(GREETING + payload)) == GREETING + payload
            await peer.shutdown()
            assert await peer.recv_until_eof() == b""


# -- direct and reject ---------------------------------------------------------------------------
async def test_direct_and_reject(nursery: trio.Nursery) -> None:
    echo_port = await tcp_echo(nursery, greeting=GREETING)
    sock = await open_tcp_via(parse_via("direct"), Dialer(), target(echo_port))
    assert await exchange(sock, b"direct", GREETING) == b"direct"
    marked = RecordingDialer()
    sock = await open_tcp_via(parse_via("direct?fwmark=0x77"), marked, target(echo_port))
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, 36) == 0x77  # SO_MARK
        assert marked.protected == []  # the route's protector replaced the gateway's
    with pytest.raises(ConnectionRefusedError):
        await open_tcp_via(parse_via("reject"), Dialer(), target(echo_port))

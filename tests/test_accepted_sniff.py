"""The sniff of a connection accepted first (``egress.accepted.sniff_first_bytes``,
``sniff.wants_more``): it stops as soon as the first bytes hold a name or cannot, never reads
past its byte bound, gives up after its time bound without losing a byte, and a real TLS
client's ClientHello split over several reads still gives its SNI."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

from tunlwip.egress.accepted import SNIFF_MAX_BYTES, sniff_first_bytes
from tunlwip.sniff import wants_more


def client_hello(server_hostname: str) -> bytes:
    """The first flight of a real TLS client (the stdlib's OpenSSL) for ``server_hostname``."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_wants_more_only_for_a_begun_tls_record_or_http_head() -> None:
    hello = client_hello("corp.example")
    assert wants_more(b"") and wants_more(hello[:3]) and wants_more(hello[:100])
    assert not wants_more(hello)
    assert wants_more(b"GET") and wants_more(b"GET / HTTP/1.1\r\nHost: a")
    assert not wants_more(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    for other in (b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x01binary", b"hello there"):
        assert not wants_more(other), other


async def test_a_split_client_hello_is_read_whole(nursery: trio.Nursery) -> None:
    hello = client_hello("git.corp.example")
    client, gateway = trio.testing.memory_stream_pair()

    async def send_in_pieces() -> None:
        for start in range(0, len(hello), 100):
            await client.send_all(hello[start : start + 100])
            await trio.sleep(0.01)
        await client.send_all(b"after the hello")

    nursery.start_soon(send_in_pieces)
    with trio.fail_after(5):
        sniffed = await sniff_first_bytes(gateway, 5.0)
    assert sniffed.name == "git.corp.example" and not sniffed.eof
    # It stopped once the name was in (the SNI comes early), before the hello's end.
    assert hello.startswith(sniffed.data) and len(sniffed.data) < len(hello)
    whole = hello + b"after the hello"
    rest = b""
    while len(sniffed.data) + len(rest) < len(whole):  # nothing lost, nothing twice
        rest += await gateway.receive_some()
    assert sniffed.data + rest == whole


async def test_a_silent_client_gives_up_after_the_time_bound() -> None:
    _, gateway = trio.testing.memory_stream_pair()
    started = trio.current_time()
    sniffed = await sniff_first_bytes(gateway, 0.2)
    assert (sniffed.data, sniffed.name, sniffed.eof) == (b"", None, False)
    assert 0.2 <= trio.current_time() - started < 2


async def test_the_byte_bound_holds_for_a_head_without_an_end() -> None:
    client, gateway = trio.testing.memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\nX: " + b"a" * 10_000)
    sniffed = await sniff_first_bytes(gateway, 5.0)
    assert len(sniffed.data) == SNIFF_MAX_BYTES and sniffed.name is None
    assert len(await gateway.receive_some()) > 0  # the rest is still the client's, unread


async def test_eof_and_other_protocols_stop_at_once() -> None:
    client, gateway = trio.testing.memory_stream_pair()
    await client.send_all(b"SSH-2.0-x\r\n")
    with trio.fail_after(1):
        sniffed = await sniff_first_bytes(gateway, 30.0)
    assert sniffed.data == b"SSH-2.0-x\r\n" and sniffed.name is None
    await client.send_all(b"GET / HTTP/1.1\r\nX: y\r\n")
    await client.send_eof()
    with trio.fail_after(1):
        sniffed = await sniff_first_bytes(gateway, 30.0)
    assert sniffed.eof and sniffed.name is None and sniffed.data.endswith(b"X: y\r\n")

#!/usr/bin/env python3
"""atheris harness for the SOCKS5 client's parsers and its handshake's reads.

Input: a mode byte, then the body (the proxy's bytes).
  mode % 5 == 0: the method choice (``parse_method_choice``), offering no auth (mode & 8) or
                 no auth and user/password
  mode % 5 == 1: the authentication status (``parse_auth_status``)
  mode % 5 == 2: a CONNECT / UDP ASSOCIATE reply (``reply_length`` on its first 5 bytes,
                 then ``parse_reply`` on exactly that many, as the client reads it)
  mode % 5 == 3: a datagram from the UDP relay (``parse_udp_datagram``, ``unwrap``)
  mode % 5 == 4: the whole handshake (``socks5_client.handshake``, with credentials when
                 mode & 8) reading from a fake socket; the body's first byte picks how the
                 proxy's bytes are split into arrivals (fake_socket.py)
A finding is any exception but the parsers' own (``ProxyError``, and the OSErrors reply codes
map to), an accepted answer that is not valid SOCKS5 (checked by re-encoding it), or a
handshake that consumed a byte past its answers.

    .venv/bin/python fuzz/socks5_fuzzer.py [libFuzzer options] CORPUS_DIR
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import atheris

with atheris.instrument_imports(include=["tunlwip"]):
    from tunlwip.egress import socks5
    from tunlwip.egress.socks5_client import UdpAssociation, UdpAssociationCounters, handshake
    from tunlwip.endpoint import Endpoint
    from tunlwip.errors import ProxyError

from fake_socket import FakeSocket, run

TARGET = ipaddress.IPv4Address("198.18.0.9")
# The codec of an association (its sockets are never used here).
ASSOCIATION = UdpAssociation(socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                             socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                             Endpoint(TARGET, 1080), TARGET, 53)  # fmt: skip
#: What reply codes map to, besides ProxyError: the errors a direct dial raises.
MAPPED = (ConnectionRefusedError, TimeoutError, OSError)


def _check_reply(data: bytes, bound: socks5.BoundAddress) -> None:
    """An accepted reply re-encodes to itself: version 5, success, RSV 0, a valid address."""
    expected = bytes([5, 0, 0]) + socks5.encode_address(bound.host, bound.port)
    if expected != data:
        raise AssertionError(f"accepted reply {data!r} is not {expected!r}")


def _method(mode: int, body: bytes) -> None:
    offered = b"\x00" if mode & 8 else b"\x00\x02"
    method = socks5.parse_method_choice(body, offered)
    if len(body) != 2 or body[0] != 5 or method not in offered or body[1] != method:
        raise AssertionError(f"accepted method choice {body!r}")


def _auth(body: bytes) -> None:
    socks5.parse_auth_status(body)
    if body != b"\x01\x00":
        raise AssertionError(f"accepted auth status {body!r}")


def _reply(body: bytes) -> None:
    need = socks5.reply_length(body[: socks5.REPLY_HEAD])
    if not 8 <= need <= socks5.MAX_REPLY:  # a 1-byte name .. a 255-byte one
        raise AssertionError(f"reply length {need}")
    if need > len(body):
        return  # the client would wait for the rest (bounded by its deadline)
    _check_reply(body[:need], socks5.parse_reply(body[:need]))


def _datagram(body: bytes) -> None:
    try:
        host, port, payload = socks5.parse_udp_datagram(body)
    except ProxyError:
        pass
    else:
        header = socks5.udp_header(host, port)
        if header + payload != body:
            raise AssertionError(f"accepted datagram {body!r} re-encodes as {header!r}")
    ASSOCIATION.counters = UdpAssociationCounters()
    payload = ASSOCIATION.unwrap(body)
    if payload is not None and not body.startswith(socks5.udp_header(TARGET, 53)):
        raise AssertionError(f"accepted a datagram from elsewhere: {body!r}")


def _handshake(mode: int, body: bytes) -> None:
    if not body:
        return
    sock = FakeSocket(body[1:], bytes([body[0] % 17 + 1, body[0] // 17 + 1]))
    credentials = {"username": "user", "password": "pass"} if mode & 8 else {}
    request = socks5.connect_request(TARGET, 443)
    try:
        bound = run(handshake(sock, request, **credentials))  # type: ignore[arg-type]
    except MAPPED:
        return
    data = sock.data
    used = 2 + (2 if data[1] == 2 else 0)
    reply = data[used : sock.consumed]
    if len(reply) != socks5.reply_length(reply[:5]):
        raise AssertionError(f"consumed {sock.consumed} bytes of {data!r}")
    _check_reply(reply, bound)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    try:
        match mode % 5:
            case 0:
                _method(mode, body)
            case 1:
                _auth(body)
            case 2:
                _reply(body)
            case 3:
                _datagram(body)
            case _:
                _handshake(mode, body)
    except MAPPED:  # ProxyError is an OSError too; anything else is a finding
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""The SOCKS5 and HTTP CONNECT codecs (sans-I/O): the bytes they write, and every answer they
take or refuse, with the error each failure maps to (the client sees what a direct dial gives).
"""

from __future__ import annotations

import base64
import errno
import ipaddress

import pytest

from tunlwip.egress import http_connect, socks5
from tunlwip.egress.socks5_client import relay_endpoint
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ProxyError, TunlwipError

V4 = ipaddress.IPv4Address("198.18.0.7")
V6 = ipaddress.IPv6Address("fd00::7")


def reply(rep: int = 0, address: bytes = b"\x01\xc6\x12\x00\x07", port: int = 1080) -> bytes:
    return bytes([5, rep, 0]) + address + port.to_bytes(2, "big")


def test_proxy_error_is_a_tunlwip_error_and_an_os_error() -> None:
    error = ProxyError("bad version", detail="got 4")
    assert isinstance(error, TunlwipError) and isinstance(error, OSError)
    assert error.reason == "proxy: bad version" and error.errno == errno.EPROTO
    assert "got 4" in str(error)


# -- SOCKS5 requests -----------------------------------------------------------------------------
def test_greeting_offers_user_password_only_with_credentials() -> None:
    assert socks5.greeting(False) == b"\x05\x01\x00"
    assert socks5.greeting(True) == b"\x05\x02\x00\x02"


def test_connect_requests_by_address_and_by_name() -> None:
    assert socks5.connect_request(V4, 443) == b"\x05\x01\x00\x01\xc6\x12\x00\x07\x01\xbb"
    assert socks5.connect_request(V6, 80) == b"\x05\x01\x00\x04" + V6.packed + b"\x00\x50"
    assert socks5.connect_request("example.org", 80) == b"\x05\x01\x00\x03\x0bexample.org\x00\x50"
    with pytest.raises(ValueError, match="1-255"):
        socks5.connect_request("a" * 256, 80)
    assert socks5.udp_associate_request() == b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"
    assert socks5.udp_associate_request(6) == b"\x05\x03\x00\x04" + bytes(18)


def test_auth_request_rfc1929() -> None:
    assert socks5.auth_request("bob", "pw") == b"\x01\x03bob\x02pw"
    with pytest.raises(ValueError, match="1-255 bytes"):
        socks5.auth_request("", "pw")


# -- SOCKS5 answers ------------------------------------------------------------------------------
def test_method_choice() -> None:
    offered = b"\x00\x02"
    assert socks5.parse_method_choice(b"\x05\x00", offered) == 0
    assert socks5.parse_method_choice(b"\x05\x02", offered) == 2
    cases = [(b"\x04\x00", "bad version"), (b"\x05\xff", "no acceptable auth method"),
             (b"\x05\x01", "unoffered method"), (b"\x05", "short reply"),
             (b"\x05\x00\x00", "extra bytes")]  # fmt: skip
    for data, reason in cases:
        with pytest.raises(ProxyError) as caught:
            socks5.parse_method_choice(data, offered)
        assert caught.value.reason == f"proxy: {reason}"
    with pytest.raises(ProxyError, match="unoffered"):
        socks5.parse_method_choice(b"\x05\x02", b"\x00")  # user/password never offered


def test_auth_status() -> None:
    socks5.parse_auth_status(b"\x01\x00")
    with pytest.raises(ProxyError, match="authentication failed") as caught:
        socks5.parse_auth_status(b"\x01\x01")
    assert caught.value.errno == errno.EACCES
    with pytest.raises(ProxyError, match="bad auth version"):
        socks5.parse_auth_status(b"\x05\x00")


def test_reply_lengths_are_known_from_the_first_five_bytes() -> None:
    assert socks5.reply_length(reply()[:5]) == 10
    assert socks5.reply_length(reply(address=b"\x04" + V6.packed)[:5]) == 22
    assert socks5.reply_length(b"\x05\x00\x00\x03\xff") == 4 + 1 + 255 + 2 == socks5.MAX_REPLY
    for head, reason in [(b"\x04\x00\x00\x01\x00", "bad version"),
                         (b"\x05\x00\x01\x01\x00", "bad reserved byte"),
                         (b"\x05\x00\x00\x02\x00", "bad address type"),
                         (b"\x05\x00\x00\x03\x00", "bad address"),
                         (b"\x05\x00\x00", "short reply")]:  # fmt: skip
        with pytest.raises(ProxyError) as caught:
            socks5.reply_length(head)
        assert caught.value.reason == f"proxy: {reason}"


def test_successful_replies_name_the_bound_address() -> None:
    assert socks5.parse_reply(reply()) == socks5.BoundAddress(V4, 1080)
    assert socks5.parse_reply(reply(address=b"\x04" + V6.packed, port=9)).host == V6
    assert socks5.parse_reply(reply(address=b"\x03\x04host")).host == "host"
    with pytest.raises(ProxyError, match="extra bytes"):
        socks5.parse_reply(reply() + b"x")
    with pytest.raises(ProxyError, match="short reply"):
        socks5.parse_reply(reply()[:-1])
    with pytest.raises(ProxyError, match="bad address"):
        socks5.parse_reply(reply(address=b"\x03\x04ho\x00t"))


@pytest.mark.parametrize(
    ("rep", "kind", "err", "reason"),
    [
        (5, ConnectionRefusedError, errno.ECONNREFUSED, None),
        (3, OSError, errno.ENETUNREACH, None),
        (4, OSError, errno.EHOSTUNREACH, None),
        (6, TimeoutError, errno.ETIMEDOUT, None),
        (1, ProxyError, errno.EPROTO, "proxy: general failure"),
        (2, ProxyError, errno.EACCES, "proxy: not allowed by ruleset"),
        (7, ProxyError, errno.EPROTO, "proxy: command not supported"),
        (8, ProxyError, errno.EPROTO, "proxy: address type not supported"),
        (9, ProxyError, errno.EPROTO, "proxy: unknown reply code"),
    ],
)
def test_reply_codes_map_to_what_a_direct_dial_raises(rep: int, kind: type, err: int,
                                                      reason: str | None) -> None:  # fmt: skip
    with pytest.raises(OSError, match=r"SOCKS5|proxy") as caught:
        socks5.parse_reply(reply(rep))
    assert type(caught.value) is kind and caught.value.errno == err
    if reason is not None:
        assert isinstance(caught.value, ProxyError) and caught.value.reason == reason
    else:
        assert not isinstance(caught.value, ProxyError)


def test_udp_header_round_trip_and_strictness() -> None:
    header = socks5.udp_header(V4, 53)
    assert header == b"\x00\x00\x00\x01\xc6\x12\x00\x07\x00\x35"
    assert socks5.parse_udp_datagram(header + b"payload") == (V4, 53, b"payload")
    assert socks5.parse_udp_datagram(socks5.udp_header("dns.test", 53))[:2] == ("dns.test", 53)
    for data, reason in [(b"\x00\x00\x01" + header[3:], "udp fragment"),
                         (b"\x00\x01\x00" + header[3:], "bad udp header"),
                         (header[:6], "short reply"), (b"\x00\x00\x00\x07", "bad udp header"),
                         (b"\x00\x00\x00\x07\x00", "bad address type")]:  # fmt: skip
        with pytest.raises(ProxyError) as caught:
            socks5.parse_udp_datagram(data)
        assert caught.value.reason == f"proxy: {reason}"


def test_relay_endpoint_takes_the_proxys_address_for_an_unspecified_one() -> None:
    proxy = Endpoint.parse("198.18.0.1", 1080)
    bound = socks5.BoundAddress(ipaddress.IPv4Address("0.0.0.0"), 4000)
    assert relay_endpoint(bound, proxy) == Endpoint.parse("198.18.0.1", 4000)
    assert relay_endpoint(socks5.BoundAddress(V4, 5), proxy) == Endpoint(V4, 5)
    with pytest.raises(ProxyError, match="bad address"):
        relay_endpoint(socks5.BoundAddress(V4, 0), proxy)
    with pytest.raises(ProxyError, match="bad address"):
        relay_endpoint(socks5.BoundAddress("relay.test", 5), proxy)


# -- HTTP CONNECT ------------------------------------------------------------------------------
def test_connect_request_with_and_without_basic_auth() -> None:
    assert http_connect.connect_request(V4, 443) == (
        b"CONNECT 198.18.0.7:443 HTTP/1.1\r\nHost: 198.18.0.7:443\r\n\r\n"
    )
    request = http_connect.connect_request(V6, 443, "alice", "p:w")
    token = base64.b64encode(b"alice:p:w")
    assert request.startswith(b"CONNECT [fd00::7]:443 HTTP/1.1\r\nHost: [fd00::7]:443\r\n")
    assert b"Proxy-Authorization: Basic " + token + b"\r\n\r\n" in request
    with pytest.raises(ValueError, match="not a host name"):
        http_connect.connect_request("evil\r\nX: y", 80)


@pytest.mark.parametrize(
    ("head", "kind", "err", "match"),
    [
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", ProxyError, errno.EACCES,
         "proxy authentication required"),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", ProxyError, errno.EACCES, "forbidden"),
        (b"HTTP/1.1 500 Unable to connect\r\n\r\n", OSError, errno.EHOSTUNREACH, "unreachable"),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", OSError, errno.EHOSTUNREACH, "unreachable"),
        (b"HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_CONNECT_FAIL 111\r\n\r\n",
         ConnectionRefusedError, errno.ECONNREFUSED, "refused"),
        (b"HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_DNS_FAIL 0\r\n\r\n", OSError,
         errno.EHOSTUNREACH, "not resolved"),
        (b"HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_CONNECT_FAIL 110\r\n\r\n",
         TimeoutError, errno.ETIMEDOUT, "timed out"),
        (b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", TimeoutError, errno.ETIMEDOUT, "timeout"),
        (b"HTTP/1.1 503 x\r\nX-Squid-Error: ERR_CONNECT_FAIL 2\xb22\r\n\r\n", OSError,
         errno.EHOSTUNREACH, "unreachable"),  # fuzzer: "²" is no errno digit
        (b"HTTP/1.1 404 Not Found\r\n\r\n", ProxyError, errno.EPROTO, "unexpected status"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", ProxyError, errno.EPROTO, "bad response"),
        (b"HTTP/1.1 200 OK\r\n\r\nextra", ProxyError, errno.EPROTO, "bad response"),
        (b"HTTP/1.1 200 OK\r\n", ProxyError, errno.EPROTO, "bad response"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", ProxyError, errno.EPROTO, "bad response"),
        (b"HTTP/2.1 200 OK\r\n\r\n", ProxyError, errno.EPROTO, "HTTP version"),  # fuzzer
    ],
)  # fmt: skip
def test_response_statuses(head: bytes, kind: type, err: int, match: str) -> None:
    with pytest.raises(OSError, match=match) as caught:
        http_connect.parse_response_head(head)
    assert type(caught.value) is kind and caught.value.errno == err


def test_successful_and_interim_responses() -> None:
    assert http_connect.parse_response_head(b"HTTP/1.0 200 Connection established\r\n\r\n") == 200
    head = b"HTTP/1.1 200 OK\r\nProxy-agent: x\r\n\r\n"
    assert http_connect.parse_response_head(head) == 200
    assert http_connect.parse_response_head(b"HTTP/1.1 100 Continue\r\n\r\n") == 100
    with pytest.raises(ProxyError, match="too long"):
        http_connect.parse_response_head(b"HTTP/1.1 200 OK\r\nA: " + b"a" * 9000 + b"\r\n\r\n")

"""SOCKS5 (RFC 1928) and its user/password authentication (RFC 1929), sans-I/O.

Theory of operation
-------------------
This module only turns requests into bytes and bytes into answers; the trio driver
(``socks5_client``) does the reading, and reads exactly as many bytes as each answer needs, so
no byte the destination sends after the handshake is ever taken by it. Every answer has a fixed
or self-described length, and these functions say which:

* the method choice and the authentication status are 2 bytes each;
* a CONNECT / UDP ASSOCIATE reply is ``REPLY_HEAD`` (5) bytes, ``VER REP RSV ATYP`` and the
  address's first byte, after which ``reply_length`` knows the whole length (at most 262 bytes:
  a 255-byte name, so a "huge length" cannot ask for more).

Anything that is not exactly the protocol raises ``ProxyError`` with a short stable reason
(``"proxy: bad version"``, ``"proxy: bad address type"``, ...), fit for a counter. A reply
code other than success raises what a direct dial would have raised for the same failure, so
the client sees the same thing either way (``reply_error``).

UDP: each datagram to or from the proxy's relay carries a header ``RSV(2) FRAG ATYP ADDR PORT``
(``udp_header``, ``parse_udp_datagram``). Fragments (FRAG != 0) are not reassembled: their
``ProxyError`` makes the caller drop and count them, as most clients do.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress

from ..endpoint import IPAddress
from ..errors import ProxyError

__all__ = [
    "AUTH_REPLY_LEN",
    "METHOD_REPLY_LEN",
    "REPLY_HEAD",
    "Address",
    "BoundAddress",
    "auth_request",
    "connect_request",
    "encode_address",
    "greeting",
    "parse_auth_status",
    "parse_method_choice",
    "parse_reply",
    "parse_udp_datagram",
    "reply_error",
    "reply_length",
    "udp_associate_request",
    "udp_header",
]

VERSION = 5
AUTH_VERSION = 1  # RFC 1929's sub-negotiation version
METHOD_NONE = 0x00
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
CMD_UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04
REP_SUCCEEDED = 0x00

METHOD_REPLY_LEN = 2
AUTH_REPLY_LEN = 2
#: VER REP RSV ATYP and the address's first byte (a name's length): enough to know the rest.
REPLY_HEAD = 5
#: The longest reply: the head, a 255-byte name (less the length byte read already), a port.
MAX_REPLY = 4 + 1 + 255 + 2
_ADDRESS_LEN = {ATYP_IPV4: 4, ATYP_IPV6: 16}

#: A destination: an IP address, or a host name the proxy resolves (``remote_dns``).
Address = IPAddress | str


@dataclasses.dataclass(frozen=True)
class BoundAddress:
    """The address a successful reply names: for CONNECT the proxy's outgoing end, for UDP
    ASSOCIATE the relay the client sends its datagrams to."""

    host: Address
    port: int


# -- method negotiation and authentication -----------------------------------------------------
def greeting(with_password: bool) -> bytes:
    """The client's first message: the methods it offers (no auth; user/password too when it
    has credentials)."""
    methods = bytes([METHOD_NONE, METHOD_USERPASS]) if with_password else bytes([METHOD_NONE])
    return bytes([VERSION, len(methods)]) + methods


def parse_method_choice(data: bytes, offered: bytes) -> int:
    """The method the proxy chose from ``offered`` (the greeting's method list)."""
    if len(data) != METHOD_REPLY_LEN:
        raise ProxyError("short reply" if len(data) < METHOD_REPLY_LEN else "extra bytes")
    if data[0] != VERSION:
        raise ProxyError("bad version", detail=f"method choice version {data[0]}")
    method = data[1]
    if method == METHOD_NO_ACCEPTABLE:
        raise ProxyError("no acceptable auth method", errno.EACCES)
    if method not in offered:
        raise ProxyError("unoffered method", detail=f"method {method:#x}")
    return method


def auth_request(username: str, password: str) -> bytes:
    """RFC 1929's request: each of user name and password is 1-255 bytes (UTF-8)."""
    user, secret = username.encode(), password.encode()
    if not (1 <= len(user) <= 255 and 1 <= len(secret) <= 255):
        raise ValueError("SOCKS5 user name and password must be 1-255 bytes each")
    return bytes([AUTH_VERSION, len(user)]) + user + bytes([len(secret)]) + secret


def parse_auth_status(data: bytes) -> None:
    """Returns if the proxy accepted the credentials; ``ProxyError`` otherwise."""
    if len(data) != AUTH_REPLY_LEN:
        raise ProxyError("short reply" if len(data) < AUTH_REPLY_LEN else "extra bytes")
    if data[0] != AUTH_VERSION:
        raise ProxyError("bad auth version", detail=f"version {data[0]}")
    if data[1] != 0:
        raise ProxyError("authentication failed", errno.EACCES)


# -- requests -----------------------------------------------------------------------------------
def encode_address(host: Address, port: int) -> bytes:
    """``ATYP ADDR PORT`` for an IP address or a host name (ATYP 3, 1-255 ASCII bytes)."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    if isinstance(host, ipaddress.IPv4Address):
        head = bytes([ATYP_IPV4]) + host.packed
    elif isinstance(host, ipaddress.IPv6Address):
        head = bytes([ATYP_IPV6]) + host.packed
    else:
        name = host.encode("ascii")
        if not 1 <= len(name) <= 255:
            raise ValueError("a SOCKS5 host name is 1-255 bytes")
        head = bytes([ATYP_DOMAIN, len(name)]) + name
    return head + port.to_bytes(2, "big")


def connect_request(host: Address, port: int) -> bytes:
    """CONNECT to ``host``:``port``."""
    return bytes([VERSION, CMD_CONNECT, 0]) + encode_address(host, port)


def udp_associate_request(version: int = 4) -> bytes:
    """UDP ASSOCIATE, our datagrams' source left unsaid (0.0.0.0:0, or [::]:0 when the control
    connection is IPv6: danted refuses the other family's address type): the relay learns it
    from the first datagram, which is what works behind NAT."""
    unspecified = ipaddress.IPv4Address(0) if version == 4 else ipaddress.IPv6Address(0)
    return bytes([VERSION, CMD_UDP_ASSOCIATE, 0]) + encode_address(unspecified, 0)


# -- replies ------------------------------------------------------------------------------------
def reply_length(head: bytes) -> int:
    """The whole length of the reply whose first ``REPLY_HEAD`` bytes are ``head``, after
    checking what they say (version, reserved byte, address type)."""
    if len(head) < REPLY_HEAD:
        raise ProxyError("short reply")
    if head[0] != VERSION:
        raise ProxyError("bad version", detail=f"reply version {head[0]}")
    if head[2] != 0:
        raise ProxyError("bad reserved byte")
    atyp = head[3]
    if atyp == ATYP_DOMAIN:
        if head[4] == 0:
            raise ProxyError("bad address", detail="empty host name")
        return 4 + 1 + head[4] + 2
    size = _ADDRESS_LEN.get(atyp)
    if size is None:
        raise ProxyError("bad address type", detail=f"ATYP {atyp}")
    return 4 + size + 2


def parse_reply(data: bytes) -> BoundAddress:
    """The bound address of a successful reply of exactly ``len(data)`` bytes; a failure code
    raises ``reply_error``'s exception, a malformed reply ``ProxyError``."""
    need = reply_length(data[:REPLY_HEAD])
    if len(data) != need:
        raise ProxyError("short reply" if len(data) < need else "extra bytes")
    if data[1] != REP_SUCCEEDED:
        raise reply_error(data[1])
    host, port, _ = _address_at(data, 3)
    return BoundAddress(host, port)


def reply_error(code: int) -> OSError:
    """What a direct dial raises for the failure a reply code names, so the client sees the
    same: refused -> ConnectionRefusedError (RST), network / host unreachable -> ENETUNREACH /
    EHOSTUNREACH (ICMP unreachable), TTL expired -> TimeoutError (the configured unreachable
    answer). The proxy's own failures are ``ProxyError``s with a reason."""
    if code == 0x05:
        return ConnectionRefusedError(errno.ECONNREFUSED, "connection refused (via SOCKS5)")
    if code == 0x03:
        return OSError(errno.ENETUNREACH, "network unreachable (via SOCKS5)")
    if code == 0x04:
        return OSError(errno.EHOSTUNREACH, "host unreachable (via SOCKS5)")
    if code == 0x06:
        return TimeoutError(errno.ETIMEDOUT, "TTL expired (via SOCKS5)")
    reason = _REPLY_REASONS.get(code)
    if reason is None:
        return ProxyError("unknown reply code", detail=f"REP {code:#x}")
    return ProxyError(reason, errno.EACCES if code == 0x02 else errno.EPROTO)


_REPLY_REASONS = {
    0x01: "general failure",
    0x02: "not allowed by ruleset",
    0x07: "command not supported",
    0x08: "address type not supported",
}


# -- UDP ----------------------------------------------------------------------------------------
def udp_header(host: Address, port: int) -> bytes:
    """The header of a datagram for ``host``:``port`` (RSV 0, FRAG 0)."""
    return b"\0\0\0" + encode_address(host, port)


def parse_udp_datagram(data: bytes) -> tuple[Address, int, bytes]:
    """(source host, source port, payload) of a datagram from the relay. A fragment, a
    non-zero reserved field or a malformed address raises ``ProxyError`` (drop it)."""
    if len(data) < 4 + 1:
        raise ProxyError("bad udp header", detail="short")
    if data[0] or data[1]:
        raise ProxyError("bad udp header", detail="reserved bytes")
    if data[2]:
        raise ProxyError("udp fragment")
    host, port, end = _address_at(data, 3)
    return host, port, data[end:]


def _address_at(data: bytes, at: int) -> tuple[Address, int, int]:
    """The ``ATYP ADDR PORT`` starting at ``data[at]``: (host, port, offset after it)."""
    if at >= len(data):
        raise ProxyError("short reply")
    atyp = data[at]
    if atyp == ATYP_DOMAIN:
        if at + 1 >= len(data) or data[at + 1] == 0:
            raise ProxyError("bad address", detail="empty or missing host name")
        start, end = at + 2, at + 2 + data[at + 1]
        raw = data[start:end]
        if len(raw) != end - start or not all(0x21 <= b < 0x7F for b in raw):
            raise ProxyError("bad address", detail="host name")
        host: Address = raw.decode("ascii")
    elif atyp in _ADDRESS_LEN:
        start, end = at + 1, at + 1 + _ADDRESS_LEN[atyp]
        raw = data[start:end]
        if len(raw) != end - start:
            raise ProxyError("short reply")
        host = ipaddress.IPv4Address(raw) if atyp == ATYP_IPV4 else ipaddress.IPv6Address(raw)
    else:
        raise ProxyError("bad address type", detail=f"ATYP {atyp}")
    if end + 2 > len(data):
        raise ProxyError("short reply")
    return host, int.from_bytes(data[end : end + 2], "big"), end + 2

"""Pure IPv4/IPv6 header work for the few packets tunlwip writes itself (no I/O, no lwIP).

lwIP builds every packet of a connection it owns. Before a connection exists (dial before
accept) the gateway answers a held SYN itself: a RST when the destination refused, an ICMP
destination-unreachable when it could not be reached.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .errors import TunlwipError

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
TCP_RST, TCP_ACK = 0x04, 0x10
#: ICMP and ICMPv6 share a header: type, code, checksum, then 4 bytes that depend on the
#: type (an echo's identifier and sequence number; unused by destination unreachable).
ICMP_HEADER_LEN = 8
ECHO_REPLY = {4: 0, 6: 129}  # the type of an echo reply, per IP version
#: (type, code) of destination unreachable, per IP version.
PORT_UNREACHABLE = {4: (3, 3), 6: (1, 4)}
HOST_UNREACHABLE = {4: (3, 1), 6: (1, 3)}  # ICMPv6: address unreachable


class PacketError(TunlwipError, ValueError):
    """The bytes are not a packet of the expected shape (a ``ValueError`` too, as it was)."""


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class TcpSyn:
    """The fields of a client's SYN that an answer needs."""

    version: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    raw: bytes


def parse_syn(packet: bytes) -> TcpSyn:
    """Parse a (reassembled, validated) IPv4/IPv6 TCP packet's addresses, ports and sequence."""
    if not packet:
        raise PacketError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        hlen = (packet[0] & 0x0F) * 4
        if len(packet) < hlen + 20 or packet[9] != PROTO_TCP:
            raise PacketError("not an IPv4 TCP packet")
        src, dst = packet[12:16], packet[16:20]
    elif version == 6:
        hlen = 40
        if len(packet) < 60 or packet[6] != PROTO_TCP:
            raise PacketError("not an IPv6 TCP packet without extension headers")
        src, dst = packet[8:24], packet[24:40]
    else:
        raise PacketError(f"IP version {version}")
    sport, dport, seq = struct.unpack_from("!HHI", packet, hlen)
    return TcpSyn(version, src, dst, sport, dport, seq, packet)


def _ip_header(version: int, src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    if version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto,
                             0, src, dst)  # fmt: skip
        return header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, proto, 64, src, dst)


def _pseudo(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def rst_for_syn(syn: TcpSyn) -> bytes:
    """The RST|ACK a closed port sends: the client's connect() fails with ECONNREFUSED."""
    tcp = struct.pack("!HHIIBBHHH", syn.dport, syn.sport, 0, (syn.seq + 1) & 0xFFFFFFFF,
                      5 << 4, TCP_RST | TCP_ACK, 0, 0, 0)  # fmt: skip
    csum = checksum(_pseudo(syn.version, syn.dst, syn.src, PROTO_TCP, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    return _ip_header(syn.version, syn.dst, syn.src, PROTO_TCP, len(tcp)) + tcp


def unreachable_for(syn: TcpSyn, gateway: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """ICMP host unreachable (IPv6: address unreachable) from the gateway's own address,
    quoting the SYN as RFC 792/4443 ask; the client's connect() fails with EHOSTUNREACH."""
    if syn.version == 4:
        quoted = syn.raw[: (syn.raw[0] & 0x0F) * 4 + 8]
        body = _icmp_header(HOST_UNREACHABLE[4]) + quoted
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        return _ip_header(4, gateway.packed, syn.src, PROTO_ICMP, len(body)) + body
    quoted = syn.raw[: 1280 - 48]
    body = _icmp_header(HOST_UNREACHABLE[6]) + quoted
    csum = checksum(_pseudo(6, gateway.packed, syn.src, PROTO_ICMPV6, len(body)) + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    return _ip_header(6, gateway.packed, syn.src, PROTO_ICMPV6, len(body)) + body


_QUOTE_LIMIT = {4: 576 - 20 - 8, 6: 1280 - 40 - 8}  # RFC 1812 4.3.2.3 / RFC 4443 2.4(c)


def udp_unreachable(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
                    kind: dict[int, tuple[int, int]] = PORT_UNREACHABLE) -> bytes:  # fmt: skip
    """The ICMP/ICMPv6 message (no IP header; checksum left 0 for the sender to fill) telling a
    client its datagram ``src:sport -> dst:dport`` could not be delivered. The datagram is gone
    by then, so its IP and UDP headers are rebuilt for the quote: the client's kernel matches
    the quoted addresses and ports to the socket and fails it (ECONNREFUSED for a port)."""
    version = 4 if len(src) == 4 else 6
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = checksum(_pseudo(version, src, dst, PROTO_UDP, len(udp)) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    quoted = (_ip_header(version, src, dst, PROTO_UDP, len(udp)) + udp)[: _QUOTE_LIMIT[version]]
    return _icmp_header(kind[version]) + quoted


def _icmp_header(type_code: tuple[int, int]) -> bytes:
    """An ICMP header of ``ICMP_HEADER_LEN`` bytes with the checksum and the rest zero."""
    return struct.pack("!BBHI", *type_code, 0, 0)

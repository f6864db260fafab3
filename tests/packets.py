"""Build and parse IPv4/IPv6 packets for tests.

This module deliberately shares no code with ``tunlwip``: a checksum or header bug in the code
under test must not be mirrored by the same bug in the code that checks it. Stdlib only.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass, field

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ECE, CWR = 0x40, 0x80
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_FRAG, PROTO_ICMPV6 = 1, 6, 17, 44, 58

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
TCP_HEADER_LEN = 20
UDP_HEADER_LEN = 8
ICMP_HEADER_LEN = 8
FRAG_HEADER_LEN = 8

_MASK32 = 0xFFFFFFFF
_IPV4_DF = 0x4000
_IPV4_MF = 0x2000
_IPV4_OFFSET = 0x1FFF
# IPv6 extension headers the parser walks over: hop-by-hop, routing, destination options.
_V6_SKIPPABLE = frozenset({0, 43, 60})
_ECHO_TYPES = {4: frozenset({0, 8}), 6: frozenset({128, 129})}
_FLAG_LETTERS = (
    (FIN, "F"),
    (SYN, "S"),
    (RST, "R"),
    (PSH, "P"),
    (ACK, "A"),
    (URG, "U"),
    (ECE, "E"),
    (CWR, "C"),
)


# -- checksums ----------------------------------------------------------------------------------
def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum, written out by hand so it cannot share a bug with the stack's."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The pseudo-header TCP, UDP and ICMPv6 checksums cover (RFC 793 / RFC 8200 8.1)."""
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def _addresses(src: str, dst: str) -> tuple[int, bytes, bytes]:
    """Parse both addresses; a v4/v6 mix is a test bug, so refuse it loudly."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"address family mismatch: {src} -> {dst}")
    return s.version, s.packed, d.packed


def _with_checksum(segment: bytes, at: int, checksum: int) -> bytes:
    return segment[:at] + struct.pack("!H", checksum) + segment[at + 2 :]


# -- builders -----------------------------------------------------------------------------------
def ip_packet(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    flags_offset: int = 0,
) -> bytes:
    """Wrap ``payload`` in an IPv4 or IPv6 header (family taken from ``src``).

    ``flags_offset`` is the raw IPv4 flags/fragment-offset word and is ignored for IPv6;
    ``tos`` becomes the IPv6 traffic class.
    """
    version, s, d = _addresses(src, dst)
    if version == 4:
        total = IPV4_HEADER_LEN + len(payload)
        if total > 0xFFFF:
            raise ValueError(f"IPv4 packet too long: {total}")
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, tos, total, ident & 0xFFFF, flags_offset, ttl, proto, 0, s, d
        )
        return _with_checksum(header, 10, internet_checksum(header)) + bytes(payload)
    if len(payload) > 0xFFFF:
        raise ValueError("IPv6 jumbograms are not supported")
    first_word = (6 << 28) | ((tos & 0xFF) << 20)
    return struct.pack("!IHBB16s16s", first_word, len(payload), proto, ttl, s, d) + bytes(payload)


def tcp_options(
    mss: int | None = None, wscale: int | None = None, sack_permitted: bool = False
) -> bytes:
    """Encode SYN options, each NOP-aligned to 4 bytes the way real stacks lay them out."""
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", 2, 4, mss)
    if sack_permitted:
        out += bytes([1, 1, 4, 2])
    if wscale is not None:
        out += bytes([1, 3, 3, wscale])
    return out


def tcp_packet(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    seq: int,
    ack: int = 0,
    flags: int = ACK,
    payload: bytes = b"",
    window: int = 65535,
    options: bytes = b"",
    checksum: int | None = None,
    ttl: int = 64,
) -> bytes:
    """A full IP packet carrying one TCP segment; ``checksum`` overrides it for bad-input tests.

    ``seq`` and ``ack`` are taken modulo 2**32 so callers can do plain arithmetic on them.
    """
    if len(options) % 4 or len(options) > 40:
        raise ValueError(f"TCP options must be a multiple of 4 and at most 40 bytes: {options!r}")
    version, s, d = _addresses(src, dst)
    data_offset = (TCP_HEADER_LEN + len(options)) // 4
    segment = (
        struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq & _MASK32,
            ack & _MASK32,
            data_offset << 4,
            flags & 0xFF,
            window,
            0,
            0,
        )
        + bytes(options)
        + bytes(payload)
    )
    if checksum is None:
        pseudo = _pseudo_header(version, s, d, PROTO_TCP, len(segment))
        checksum = internet_checksum(pseudo + segment)
    return ip_packet(src, dst, PROTO_TCP, _with_checksum(segment, 16, checksum), ttl=ttl)


def udp_packet(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    checksum: int | None = None,
    ttl: int = 64,
) -> bytes:
    """A full IP packet carrying one UDP datagram; ``checksum`` overrides it (0 = none, v4)."""
    version, s, d = _addresses(src, dst)
    length = UDP_HEADER_LEN + len(payload)
    segment = struct.pack("!HHHH", sport, dport, length, 0) + bytes(payload)
    if checksum is None:
        # A computed 0 is sent as 0xFFFF because 0 means "no checksum" (RFC 768).
        checksum = internet_checksum(_pseudo_header(version, s, d, PROTO_UDP, length) + segment)
        checksum = checksum or 0xFFFF
    return ip_packet(src, dst, PROTO_UDP, _with_checksum(segment, 6, checksum), ttl=ttl)


def icmp_packet(
    src: str, dst: str, icmp_type: int, code: int, body: bytes = b"", *, rest: int = 0
) -> bytes:
    """ICMP (v4) or ICMPv6 message; ``rest`` is the 32-bit word after the checksum."""
    version, s, d = _addresses(src, dst)
    message = struct.pack("!BBHI", icmp_type, code, 0, rest & _MASK32) + bytes(body)
    if version == 4:
        proto, covered = PROTO_ICMP, message
    else:
        proto = PROTO_ICMPV6
        covered = _pseudo_header(6, s, d, PROTO_ICMPV6, len(message)) + message
    return ip_packet(src, dst, proto, _with_checksum(message, 2, internet_checksum(covered)))


def icmp_echo(
    src: str, dst: str, ident: int, seq: int, payload: bytes = b"", *, reply: bool = False
) -> bytes:
    """Echo request (type 8 / 128) or, with ``reply``, echo reply (type 0 / 129)."""
    v6 = ipaddress.ip_address(src).version == 6
    icmp_type = (129 if reply else 128) if v6 else (0 if reply else 8)
    return icmp_packet(src, dst, icmp_type, 0, payload, rest=(ident & 0xFFFF) << 16 | seq & 0xFFFF)


def fragment(packet: bytes, mtu: int) -> list[bytes]:
    """Split a packet into fragments of at most ``mtu`` bytes; a packet that fits is returned as-is.

    IPv6 packets must not carry extension headers already (all of the payload is fragmentable).
    """
    packet = bytes(packet)
    if len(packet) <= mtu:
        return [packet]
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        return _fragment_v4(packet, mtu)
    if version == 6:
        return _fragment_v6(packet, mtu)
    raise ValueError(f"not an IP packet (version {version})")


def _fragment_v4(packet: bytes, mtu: int) -> list[bytes]:
    header_len = (packet[0] & 0x0F) * 4
    (total,) = struct.unpack_from("!H", packet, 2)
    (flags_offset,) = struct.unpack_from("!H", packet, 6)
    header, data = packet[:header_len], packet[header_len:total]
    step = (mtu - header_len) // 8 * 8
    if step <= 0:
        raise ValueError(f"mtu {mtu} too small to fragment")
    base = flags_offset & _IPV4_OFFSET  # re-fragmenting a fragment keeps its place
    last_more = flags_offset & _IPV4_MF
    out = []
    for start in range(0, len(data), step):
        chunk = data[start : start + step]
        more = _IPV4_MF if start + step < len(data) else last_more
        piece = bytearray(header)
        struct.pack_into("!H", piece, 2, header_len + len(chunk))
        struct.pack_into("!H", piece, 6, more | (base + start // 8))
        struct.pack_into("!H", piece, 10, 0)
        struct.pack_into("!H", piece, 10, internet_checksum(bytes(piece)))
        out.append(bytes(piece) + chunk)
    return out


def _fragment_v6(packet: bytes, mtu: int) -> list[bytes]:
    (payload_len,) = struct.unpack_from("!H", packet, 4)
    next_header = packet[6]
    header = bytearray(packet[:IPV6_HEADER_LEN])
    data = packet[IPV6_HEADER_LEN : IPV6_HEADER_LEN + payload_len]
    step = (mtu - IPV6_HEADER_LEN - FRAG_HEADER_LEN) // 8 * 8
    if step <= 0:
        raise ValueError(f"mtu {mtu} too small to fragment")
    # Deterministic but packet-dependent, so two packets fragmented in one test do not collide.
    ident = zlib.crc32(packet) or 1
    header[6] = PROTO_FRAG
    out = []
    for start in range(0, len(data), step):
        chunk = data[start : start + step]
        more = 1 if start + step < len(data) else 0
        struct.pack_into("!H", header, 4, FRAG_HEADER_LEN + len(chunk))
        frag_header = struct.pack("!BBHI", next_header, 0, (start // 8) << 3 | more, ident)
        out.append(bytes(header) + frag_header + chunk)
    return out


def with_ipv6_extension(packet: bytes, kind: int) -> bytes:
    """``packet`` (IPv6, no extension headers) with one 8-byte Hop-by-Hop (0), Routing (43) or
    Destination Options (60) header inserted after the IPv6 header (options: one PadN)."""
    if packet[0] >> 4 != 6 or kind not in (0, 43, 60):
        raise ValueError("an IPv6 packet and an extension header kind of 0, 43 or 60")
    inner = packet[6]
    body = bytes([0, 0, 0, 0, 0, 0]) if kind == 43 else bytes([1, 4, 0, 0, 0, 0])
    header = bytearray(packet[:IPV6_HEADER_LEN])
    (payload_len,) = struct.unpack_from("!H", header, 4)
    struct.pack_into("!H", header, 4, payload_len + 8)
    header[6] = kind
    return bytes(header) + bytes([inner, 0]) + body + packet[IPV6_HEADER_LEN:]


def with_ipv4_protocol(packet: bytes, proto: int) -> bytes:
    """An IPv4 packet (or fragment) with another protocol number and its header checksum fixed."""
    header_len = (packet[0] & 0x0F) * 4
    header = bytearray(packet[:header_len])
    header[9] = proto
    struct.pack_into("!H", header, 10, 0)
    struct.pack_into("!H", header, 10, internet_checksum(bytes(header)))
    return bytes(header) + packet[header_len:]


# -- parsing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parsed:
    """One decoded packet; offsets and lengths are checked, checksums only reported."""

    version: int
    src: str
    dst: str
    proto: int  # transport protocol (after IPv6 extension headers)
    ttl: int  # IPv4 TTL / IPv6 hop limit
    payload: bytes  # transport payload; the raw fragment data for non-first/partial fragments
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int  # raw header field, not scaled
    tcp_options: dict[str, int | bool]
    ip_checksum_ok: bool
    l4_checksum_ok: bool  # False only when a checksum was checked and is wrong
    icmp_type: int | None
    icmp_code: int | None
    raw: bytes = field(repr=False)
    ip_ident: int = 0  # IPv4 identification / IPv6 fragment identification
    frag_offset: int = 0  # in bytes
    more_fragments: bool = False
    dont_fragment: bool = False
    icmp_ident: int | None = None  # echo request/reply only
    icmp_seq: int | None = None

    @property
    def is_fragment(self) -> bool:
        return self.more_fragments or self.frag_offset > 0

    def summary(self) -> str:
        """One line, tcpdump-like, for assertion messages."""
        if self.proto == PROTO_TCP and not self.is_fragment:
            return (
                f"TCP {self.src}:{self.sport} > {self.dst}:{self.dport} [{flags_str(self.flags)}]"
                f" seq={self.seq} ack={self.ack} win={self.window} len={len(self.payload)}"
            )
        if self.proto == PROTO_UDP and not self.is_fragment:
            return f"UDP {self.src}:{self.sport} > {self.dst}:{self.dport} len={len(self.payload)}"
        if self.icmp_type is not None:
            return f"ICMP {self.src} > {self.dst} type={self.icmp_type} code={self.icmp_code}"
        frag = f" frag@{self.frag_offset}{'+' if self.more_fragments else ''}"
        return f"IPv{self.version} {self.src} > {self.dst} proto={self.proto}" + (
            frag if self.is_fragment else ""
        )


def flags_str(flags: int) -> str:
    """TCP flags as letters in FSRPAUEC order, e.g. ``"SA"``; ``"-"`` when none are set."""
    return "".join(letter for bit, letter in _FLAG_LETTERS if flags & bit) or "-"


def parse(packet: bytes) -> Parsed:
    """Decode an IP packet; raise ``ValueError`` if it is structurally malformed."""
    return _parse(bytes(packet))[0]


def problems(packet: bytes) -> list[str]:
    """Every reason a receiving kernel (or a strict test) would reject ``packet``; [] if fine."""
    try:
        parsed, issues = _parse(bytes(packet))
    except ValueError as exc:
        return [f"malformed: {exc}"]
    if not parsed.ip_checksum_ok:
        issues.append("bad IPv4 header checksum")
    if not parsed.l4_checksum_ok:
        issues.append(f"bad checksum for protocol {parsed.proto}")
    return issues


def is_valid(packet: bytes) -> bool:
    """True when ``packet`` is well-formed with exact lengths and correct checksums."""
    return not problems(packet)


def _parse(packet: bytes) -> tuple[Parsed, list[str]]:
    """Parse, returning the packet and the non-fatal issues that make it invalid."""
    if not packet:
        raise ValueError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _parse_v4(packet)
    if version == 6:
        return _parse_v6(packet)
    raise ValueError(f"bad IP version {version}")


def _parse_v4(packet: bytes) -> tuple[Parsed, list[str]]:
    if len(packet) < IPV4_HEADER_LEN:
        raise ValueError(f"IPv4 packet too short: {len(packet)}")
    header_len = (packet[0] & 0x0F) * 4
    if header_len < IPV4_HEADER_LEN or header_len > len(packet):
        raise ValueError(f"bad IPv4 header length {header_len}")
    (_, _, total, ident, flags_offset, ttl, proto, _, src, dst) = struct.unpack_from(
        "!BBHHHBBH4s4s", packet
    )
    if total < header_len or total > len(packet):
        raise ValueError(f"bad IPv4 total length {total} (have {len(packet)})")
    issues = []
    if total != len(packet):
        issues.append(f"{len(packet) - total} bytes after the IPv4 total length")
    frag_offset = (flags_offset & _IPV4_OFFSET) * 8
    more = bool(flags_offset & _IPV4_MF)
    data_len = total - header_len
    if more and data_len % 8:
        issues.append("non-final fragment length not a multiple of 8")
    if frag_offset + data_len > 0xFFFF:
        issues.append("fragment extends past 65535 bytes")
    if flags_offset & 0x8000:
        issues.append("reserved IPv4 flag set")
    ip = _IpInfo(
        version=4,
        src=str(ipaddress.IPv4Address(src)),
        dst=str(ipaddress.IPv4Address(dst)),
        src_packed=src,
        dst_packed=dst,
        ttl=ttl,
        ident=ident,
        frag_offset=frag_offset,
        more=more,
        dont_fragment=bool(flags_offset & _IPV4_DF),
        ip_checksum_ok=internet_checksum(packet[:header_len]) == 0,
    )
    return _parse_l4(ip, proto, packet[header_len:total], packet, issues)


def _parse_v6(packet: bytes) -> tuple[Parsed, list[str]]:
    if len(packet) < IPV6_HEADER_LEN:
        raise ValueError(f"IPv6 packet too short: {len(packet)}")
    _, payload_len, next_header, hop_limit, src, dst = struct.unpack_from("!IHBB16s16s", packet)
    end = IPV6_HEADER_LEN + payload_len
    if end > len(packet):
        raise ValueError(f"IPv6 payload length {payload_len} exceeds packet ({len(packet)})")
    issues = []
    if end != len(packet):
        issues.append(f"{len(packet) - end} bytes after the IPv6 payload length")
    offset, ident, frag_offset, more = IPV6_HEADER_LEN, 0, 0, False
    while next_header in _V6_SKIPPABLE or next_header == PROTO_FRAG:
        if next_header == PROTO_FRAG:
            if offset + FRAG_HEADER_LEN > end:
                raise ValueError("truncated IPv6 fragment header")
            next_header, _, word, ident = struct.unpack_from("!BBHI", packet, offset)
            frag_offset, more = (word >> 3) * 8, bool(word & 1)
            offset += FRAG_HEADER_LEN
            if more and (end - offset) % 8:
                issues.append("non-final fragment length not a multiple of 8")
        else:
            if offset + 2 > end:
                raise ValueError("truncated IPv6 extension header")
            length = (packet[offset + 1] + 1) * 8
            next_header = packet[offset]
            offset += length
            if offset > end:
                raise ValueError("IPv6 extension header overruns the packet")
    ip = _IpInfo(
        version=6,
        src=str(ipaddress.IPv6Address(src)),
        dst=str(ipaddress.IPv6Address(dst)),
        src_packed=src,
        dst_packed=dst,
        ttl=hop_limit,
        ident=ident,
        frag_offset=frag_offset,
        more=more,
        dont_fragment=False,
        ip_checksum_ok=True,
    )
    return _parse_l4(ip, next_header, packet[offset:end], packet, issues)


@dataclass(frozen=True)
class _IpInfo:
    """The network-layer facts the transport parser needs."""

    version: int
    src: str
    dst: str
    src_packed: bytes
    dst_packed: bytes
    ttl: int
    ident: int
    frag_offset: int
    more: bool
    dont_fragment: bool
    ip_checksum_ok: bool


def _parse_l4(
    ip: _IpInfo, proto: int, l4: bytes, raw: bytes, issues: list[str]
) -> tuple[Parsed, list[str]]:
    """Decode the transport header (unless this is a fragment that cannot carry one whole)."""
    payload = l4
    sport = dport = seq = ack = flags = window = 0
    options: dict[str, int | bool] = {}
    l4_ok = True
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_ident: int | None = None
    icmp_seq: int | None = None
    pseudo = _pseudo_header(ip.version, ip.src_packed, ip.dst_packed, proto, len(l4))
    if ip.more or ip.frag_offset:
        pass  # the transport header and checksum span the whole datagram
    elif proto == PROTO_TCP:
        if len(l4) < TCP_HEADER_LEN:
            raise ValueError(f"TCP segment too short: {len(l4)}")
        sport, dport, seq, ack, offset_byte, flags, window, _, _ = struct.unpack_from(
            "!HHIIBBHHH", l4
        )
        data_offset = (offset_byte >> 4) * 4
        if data_offset < TCP_HEADER_LEN or data_offset > len(l4):
            raise ValueError(f"bad TCP data offset {data_offset} (segment {len(l4)})")
        payload = l4[data_offset:]
        options = _parse_tcp_options(l4[TCP_HEADER_LEN:data_offset])
        l4_ok = internet_checksum(pseudo + l4) == 0
    elif proto == PROTO_UDP:
        if len(l4) < UDP_HEADER_LEN:
            raise ValueError(f"UDP datagram too short: {len(l4)}")
        sport, dport, length, checksum = struct.unpack_from("!HHHH", l4)
        if length < UDP_HEADER_LEN or length > len(l4):
            raise ValueError(f"bad UDP length {length} (datagram {len(l4)})")
        if length != len(l4):
            issues.append(f"UDP length {length} != IP payload {len(l4)}")
        payload = l4[UDP_HEADER_LEN:length]
        if checksum == 0:
            l4_ok = ip.version == 4  # optional in IPv4, mandatory in IPv6 (RFC 8200 8.1)
        else:
            udp_pseudo = _pseudo_header(ip.version, ip.src_packed, ip.dst_packed, proto, length)
            l4_ok = internet_checksum(udp_pseudo + l4[:length]) == 0
    elif (ip.version, proto) in ((4, PROTO_ICMP), (6, PROTO_ICMPV6)):
        if len(l4) < ICMP_HEADER_LEN:
            raise ValueError(f"ICMP message too short: {len(l4)}")
        icmp_type, icmp_code, _, ident, echo_seq = struct.unpack_from("!BBHHH", l4)
        payload = l4[ICMP_HEADER_LEN:]
        l4_ok = internet_checksum(l4 if ip.version == 4 else pseudo + l4) == 0
        if icmp_type in _ECHO_TYPES[ip.version]:
            icmp_ident, icmp_seq = ident, echo_seq
    parsed = Parsed(
        version=ip.version,
        src=ip.src,
        dst=ip.dst,
        proto=proto,
        ttl=ip.ttl,
        payload=payload,
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        tcp_options=options,
        ip_checksum_ok=ip.ip_checksum_ok,
        l4_checksum_ok=l4_ok,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        raw=raw,
        ip_ident=ip.ident,
        frag_offset=ip.frag_offset,
        more_fragments=ip.more,
        dont_fragment=ip.dont_fragment,
        icmp_ident=icmp_ident,
        icmp_seq=icmp_seq,
    )
    return parsed, issues


def _parse_tcp_options(data: bytes) -> dict[str, int | bool]:
    """Decode MSS, window scale and SACK-permitted; other kinds are skipped by length."""
    options: dict[str, int | bool] = {}
    i = 0
    while i < len(data):
        kind = data[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-op
            i += 1
            continue
        if i + 1 >= len(data):
            raise ValueError(f"TCP option {kind} truncated")
        length = data[i + 1]
        if length < 2 or i + length > len(data):
            raise ValueError(f"bad TCP option length {length} for kind {kind}")
        body = data[i + 2 : i + length]
        if kind == 2:
            if length != 4:
                raise ValueError(f"bad MSS option length {length}")
            options["mss"] = struct.unpack("!H", body)[0]
        elif kind == 3:
            if length != 3:
                raise ValueError(f"bad window scale option length {length}")
            options["wscale"] = body[0]
        elif kind == 4:
            if length != 2:
                raise ValueError(f"bad SACK-permitted option length {length}")
            options["sack_permitted"] = True
        i += length
    return options

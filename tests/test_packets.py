"""Self-tests for the test-side packet builder/parser, so the checker itself is trustworthy."""

from __future__ import annotations

import random
import struct

import pytest

import packets as p

V4 = ("10.0.0.2", "93.184.216.34")
V6 = ("fd00::2", "2001:db8::1")


def _reference_checksum(data: bytes) -> int:
    """Independent oracle: a ones'-complement sum of 16-bit words is the number mod 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    if not any(data):
        return 0xFFFF
    total = int.from_bytes(data, "big") % 0xFFFF or 0xFFFF
    return ~total & 0xFFFF


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: these words sum to 0xDDF2, so the checksum is its complement.
    assert p.internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_checksum_matches_reference() -> None:
    rng = random.Random(1071)
    for length in [0, 1, 2, 3, 19, 20, 1499, 1500]:
        for _ in range(20):
            data = rng.randbytes(length)
            assert p.internet_checksum(data) == _reference_checksum(data)
    assert p.internet_checksum(b"\xff\xff") == 0


def test_known_ipv4_header() -> None:
    # The widely quoted example header (Wikipedia "IPv4 header checksum"): checksum 0xB861.
    known = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert p.internet_checksum(known) == 0xB861
    built = p.ip_packet(
        "192.168.0.1", "192.168.0.199", p.PROTO_UDP, b"\0" * (0x73 - 20), flags_offset=0x4000
    )
    assert built[:20] == known[:10] + b"\xb8\x61" + known[12:]


@pytest.mark.parametrize(("src", "dst"), [V4, V6])
def test_tcp_round_trip(src: str, dst: str) -> None:
    opts = p.tcp_options(mss=1400, wscale=7, sack_permitted=True)
    assert len(opts) % 4 == 0
    pkt = p.tcp_packet(
        src,
        dst,
        40000,
        443,
        seq=2**32 + 5,  # wraps
        ack=77,
        flags=p.SYN | p.ACK,
        payload=b"hello",
        window=1234,
        options=opts,
    )
    assert p.is_valid(pkt), p.problems(pkt)
    got = p.parse(pkt)
    assert (got.version, got.src, got.dst, got.proto) == (
        4 if src == V4[0] else 6,
        src,
        dst,
        p.PROTO_TCP,
    )
    assert (got.sport, got.dport, got.seq, got.ack) == (40000, 443, 5, 77)
    assert (got.flags, got.window, got.payload, got.ttl) == (p.SYN | p.ACK, 1234, b"hello", 64)
    assert got.tcp_options == {"mss": 1400, "wscale": 7, "sack_permitted": True}
    assert got.ip_checksum_ok and got.l4_checksum_ok
    assert got.icmp_type is None and got.raw == pkt
    assert p.flags_str(got.flags) == "SA"
    assert "[SA]" in got.summary()


@pytest.mark.parametrize(("src", "dst"), [V4, V6])
def test_udp_round_trip(src: str, dst: str) -> None:
    pkt = p.udp_packet(src, dst, 5353, 53, b"\x12\x34query")
    assert p.is_valid(pkt), p.problems(pkt)
    got = p.parse(pkt)
    assert (got.proto, got.sport, got.dport, got.payload) == (
        p.PROTO_UDP,
        5353,
        53,
        b"\x12\x34query",
    )
    assert got.l4_checksum_ok


def test_udp_zero_checksum_allowed_only_in_ipv4() -> None:
    assert p.is_valid(p.udp_packet(*V4, 1, 2, b"x", checksum=0))
    assert not p.is_valid(p.udp_packet(*V6, 1, 2, b"x", checksum=0))


def test_checksum_override_is_detected() -> None:
    (correct,) = struct.unpack_from("!H", p.tcp_packet(*V4, 1, 2, seq=0), 20 + 16)
    bad = p.tcp_packet(*V4, 1, 2, seq=0, checksum=correct ^ 0x5555)
    assert not p.parse(bad).l4_checksum_ok
    assert not p.is_valid(bad)


@pytest.mark.parametrize(("src", "dst", "req_type"), [(*V4, 8), (*V6, 128)])
def test_icmp_echo(src: str, dst: str, req_type: int) -> None:
    pkt = p.icmp_echo(src, dst, 0x1234, 7, b"ping")
    assert p.is_valid(pkt), p.problems(pkt)
    got = p.parse(pkt)
    assert (got.icmp_type, got.icmp_code, got.icmp_ident, got.icmp_seq) == (req_type, 0, 0x1234, 7)
    assert got.payload == b"ping" and (got.sport, got.dport) == (0, 0)
    reply = p.parse(p.icmp_echo(dst, src, 0x1234, 7, b"ping", reply=True))
    assert reply.icmp_type == (0 if req_type == 8 else 129)


def _reassemble(frags: list[bytes]) -> bytes:
    pieces = sorted((f.frag_offset, f) for f in map(p.parse, frags))
    data = b""
    for offset, frag in pieces:
        assert offset == len(data)
        data += frag.payload
    assert not pieces[-1][1].more_fragments
    assert all(f.more_fragments for _, f in pieces[:-1])
    return data


@pytest.mark.parametrize(("src", "dst"), [V4, V6])
def test_fragment_reassembles(src: str, dst: str) -> None:
    payload = random.Random(8).randbytes(3000)
    original = p.udp_packet(src, dst, 1000, 2000, payload)
    frags = p.fragment(original, 576)
    assert len(frags) > 1
    for frag in frags:
        assert len(frag) <= 576
        assert p.is_valid(frag), p.problems(frag)
        parsed = p.parse(frag)
        assert parsed.is_fragment and parsed.frag_offset % 8 == 0
        assert parsed.proto == p.PROTO_UDP
    idents = {p.parse(f).ip_ident for f in frags}
    assert len(idents) == 1
    if src == V6[0]:
        assert all(f[6] == p.PROTO_FRAG for f in frags)
        assert idents != {0}
    header = 20 if src == V4[0] else 40
    assert _reassemble(frags) == original[header:]
    assert p.fragment(original, 5000) == [original]
    assert p.fragment(p.fragment(original, 1000)[0], 300)[-1][6] & 0x20  # refragment keeps MF


@pytest.mark.parametrize(("src", "dst"), [V4, V6])
def test_any_corrupted_byte_is_invalid(src: str, dst: str) -> None:
    pkt = p.tcp_packet(src, dst, 1234, 80, seq=1, ack=2, payload=b"some data!", options=b"")
    # IPv6 traffic class, flow label and hop limit are covered by no checksum, and next header
    # 6 -> 7 is simply another (valid) protocol.
    unprotected = {0, 1, 2, 3, 6, 7} if src == V6[0] else set()
    for i in range(len(pkt)):
        if i in unprotected:
            continue
        corrupted = bytearray(pkt)
        corrupted[i] ^= 0x01
        assert not p.is_valid(bytes(corrupted)), i


def test_malformed_raises() -> None:
    pkt = p.tcp_packet(*V4, 1, 2, seq=0, payload=b"abc")
    for cut in [0, 1, 19, 30]:
        with pytest.raises(ValueError, match=r"empty packet|too short|bad IPv4 total length"):
            p.parse(pkt[:cut])
        assert not p.is_valid(pkt[:cut])
    bad_offset = bytearray(pkt)
    bad_offset[32] = 0x40  # data offset 4 words < 5
    with pytest.raises(ValueError, match="bad TCP data offset"):
        p.parse(bytes(bad_offset))
    with pytest.raises(ValueError, match="bad IP version 5"):
        p.parse(b"\x50" + pkt[1:])  # version 5
    short_udp = bytearray(p.udp_packet(*V4, 1, 2, b"abcd"))
    struct.pack_into("!H", short_udp, 24, 9)  # UDP length below the IP payload length
    assert not p.is_valid(bytes(short_udp))
    assert not p.is_valid(pkt + b"\0")  # trailing garbage after the IPv4 total length
    assert p.parse(pkt + b"\0").payload == b"abc"


def test_tcp_options_edge_cases() -> None:
    assert p.tcp_options() == b""
    assert p.parse(
        p.tcp_packet(*V6, 1, 2, seq=0, options=p.tcp_options(wscale=14))
    ).tcp_options == {"wscale": 14}
    with pytest.raises(ValueError, match="multiple of 4"):
        p.tcp_packet(*V4, 1, 2, seq=0, options=b"\x01")
    broken = p.tcp_packet(*V4, 1, 2, seq=0, options=bytes([2, 9, 0, 0]))
    with pytest.raises(ValueError, match="bad TCP option length"):
        p.parse(broken)


def test_flags_str() -> None:
    assert p.flags_str(p.FIN | p.ACK) == "FA"
    assert p.flags_str(p.PSH | p.ACK) == "PA"
    assert p.flags_str(p.RST) == "R"
    assert p.flags_str(0) == "-"

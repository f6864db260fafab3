"""Write seed inputs for the fuzzers: valid conversations in packet_fuzzer.c's input format.

Packet seeds: config byte, then records ctl(1) arg(1) len(2) packet. The gateway's ISN is 0 in
the harness, so a client acknowledges its SYN-ACK with ack = 1. Packets are built with the
test suite's independent builders (tests/packets.py). DNS seeds: see dns_fuzzer.py's format.

    python fuzz/make_seeds.py OUTDIR   # writes OUTDIR/packet/*, dns/*, socks5/*, http_connect/*
    python fuzz/make_seeds.py --regressions   # rewrites fuzz/regressions/packet-ip6-* etc.

Records of kinds VNET, XT_CHAIN, FRAG_TRAIN and SEG (ctl >> 3 of 7 and 29-31) shape their
packet in the harness (a virtio-net header, extension-header chains, fragment trains, segments
aimed at a connection); their packet starts with the shape's description (packet_shapes.c:
vnet_record, build_chain, frag_train, shape_record). The regression inputs use plain records
only, so that the harness of any version (before those kinds existed) replays them.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.rrset  # noqa: E402

import packets as pk  # noqa: E402

C4, G4, T4 = "198.18.0.2", "198.18.0.1", "93.184.216.34"
C6, G6, T6 = "fd00:18::2", "fd00:18::1", "2001:db8::34"

# config bits (packet_fuzzer.c CFG_*)
MTU_MAX, HOLD, CHECKSUMS, CLIENT_NETS, FD_BATCH, UDP_BLOCK = 1, 2, 4, 0x20, 0x40, 0x80
ECHO_OFF, ECHO_REPLY, ECHO_FORWARD = 0 << 3, 1 << 3, 2 << 3
ECHO_REPLY_VNET = 3 << 3  # echo reply, and the device has a virtio-net header (vnet.c)

# application steps (packet_fuzzer.c app_step)
NOP, READ, READ_SOME, WRITE_SMALL, WRITE_BIG, EOF, CLOSE, ABORT = 0, 8, 9, 10, 11, 12, 13, 14
RELAY = 15
UP_SEND, UP_EOF, UP_CLOSE, UP_READ, RELAY_ABORT, SWEEP = 16, 17, 18, 19, 20, 21
RELEASE, DROP_SYN, UDP_REPLY, ECHO_SEND, POLL, WATCH = 22, 23, 24, 25, 26, 28
# record kinds that shape their packet (packet_shapes.c shape_record); PROXY: not a packet, a
# SOCKS5 proxy's answer to a C dial (packet_checks.c fuzz_proxy_answer)
PROXY, VNET, XT_CHAIN, FRAG_TRAIN, SEG = 6, 7, 29, 30, 31
# VNET spec: gso_type (spec & 3), NEEDS_CSUM, DATA_VALID, fix the packet, the hostile field
V_TCP, V_UDP, V_NEEDS_CSUM, V_DATA_VALID, V_FIX = 1, 2, 4, 8, 0x10
# XT_CHAIN spec bits, header kinds (sel & 3) and sel bits
XT_TO_GATEWAY, XT_AIM, XT_FIX_CHECKSUM, XT_TO_FF02_1 = 0x04, 0x08, 0x10, 0x20
HBH, ROUTING, DEST_OPTS, FRAG_HDR = 0, 1, 2, 3
SEL_RAW, SEL_TYPE_LAST = 0x10, 0x20
# FRAG_TRAIN spec bits and protocol selectors (frag_proto)
FT_AIM, FT_FIX_CHECKSUM, FT_TO_GATEWAY, FT_INCOMPLETE, FT_DEST_OPTS = 0x08, 0x10, 0x20, 0x40, 0x80
P_OWN, P_TCP, P_UDP, P_ICMP, P_99, P_0, P_60, P_43 = range(8)
# SEG spec: aim (SEQ_OFFSET index; 7 = window edge), ACK = snd_nxt, fix checksum, half-open limit
AIM_HALF_SPACE, AIM_WINDOW_EDGE, AIM_ACK, AIM_FIX_CHECKSUM = 0, 7, 0x08, 0x10
HALF_OPEN_4 = 4 << 5  # HALF_OPEN[4] == 4
MAX_LEN = 4096  # the length the corpus is cut to (run.sh merge)


def record(packet: bytes, step: int = NOP, arg: int = 0, time: int = 0) -> bytes:
    return bytes([step << 3 | time, arg]) + struct.pack("!H", len(packet)) + packet


def tcp_conversation(c: str, t: str, *, mss: int = 1460, steps: list[int] | None = None) -> list:
    """SYN, ACK, data, FIN from the client; the given application steps in between."""
    steps = steps or [READ, WRITE_SMALL, EOF, NOP]
    opts = pk.tcp_options(mss=mss, wscale=7, sack_permitted=True)
    syn = pk.tcp_packet(c, t, 40000, 443, seq=1000, flags=pk.SYN, options=opts, window=64240)
    ack = pk.tcp_packet(c, t, 40000, 443, seq=1001, ack=1, flags=pk.ACK)
    data = pk.tcp_packet(c, t, 40000, 443, seq=1001, ack=1, flags=pk.ACK | pk.PSH,
                         payload=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip
    fin = pk.tcp_packet(c, t, 40000, 443, seq=1001 + 27, ack=1, flags=pk.ACK | pk.FIN)
    return [syn, ack, data, fin], steps


def socks5_dial_seeds(fam: str, pkts: list[bytes], recs: list[bytes]) -> dict[str, bytes]:
    """C dials through a SOCKS5 "proxy" (socks5_dial.c) whose answers are PROXY records: the
    handshake done (by address, by name with user/password), dripped a byte a record, the
    reply and the destination's first bytes in one answer, and hostile replies (bad version,
    method 0xFF, a failure code, a 255-byte name promised and EOF, silence until the proxy
    timeout)."""
    socks, by_name_auth = 0x86, 0xC7  # tl_py_syn: tl_dial_start_socks5 (0x01 name, 0x40 auth)
    bound = bytes([5, 0, 0, 1, 198, 18, 1, 2, 0x1F, 0x90])
    flow = [*recs[1:3], record(b"", POLL), record(pkts[3], POLL, 0, 3)]
    start = [record(pkts[0], NOP, socks), record(b"", POLL)]

    def answers(*parts: bytes, arg: int = 0) -> list[bytes]:
        return [record(part, PROXY, arg) for part in parts]

    out = {
        "ok": [*start, *answers(b"\x05\x00", bound), *flow],
        "auth_name": [record(pkts[0], NOP, by_name_auth), record(b"", POLL),
                      *answers(b"\x05\x02", b"\x01\x00", bytes([5, 0, 0, 3, 4]) + b"host\x01\xbb"),
                      *flow],
        "dripped": [*start, *answers(*(bytes([b]) for b in b"\x05\x00" + bound)), *flow],
        "eager": [*start, *answers(b"\x05\x00", bound + b"first bytes"), *flow],
        "bad_version": [*start, *answers(b"\x04\x00")],
        "no_method": [*start, *answers(b"\x05\xff")],
        "refused": [*start, *answers(b"\x05\x00", bytes([5, 5]) + bound[2:])],
        "huge_name": [*start, *answers(b"\x05\x00"),
                      *answers(bytes([5, 0, 0, 3, 255]) + b"a" * 10, arg=0x80)],
        "silent": [*start, record(b"", NOP, 0, 7)],
    }  # fmt: skip
    return {f"tcp_{fam}_socks5_{name}": bytes([HOLD]) + b"".join(r) for name, r in out.items()}


def packet_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for fam, (c, g, t) in {"v4": (C4, G4, T4), "v6": (C6, G6, T6)}.items():
        pkts, steps = tcp_conversation(c, t)
        recs = [record(p, s, 0, 2) for p, s in zip(pkts, steps, strict=True)]
        seeds[f"tcp_{fam}"] = bytes([ECHO_REPLY]) + b"".join(recs)
        seeds[f"tcp_{fam}_checked"] = bytes([ECHO_REPLY | CHECKSUMS | CLIENT_NETS]) + b"".join(recs)
        # dial-before-accept: the SYN is held, then released
        held = [record(pkts[0], RELEASE, 1 << 1, 1), *recs[1:]]
        seeds[f"tcp_{fam}_held"] = bytes([HOLD]) + b"".join(held)
        # dialed in C (dial.c, to a socketpair): a retransmit swallowed, the poll releases the
        # SYN, the ACK claims the dial into a C relay, its first bytes, the client's FIN
        cdial = 0x06  # tl_py_syn: tl_dial_start
        seeds[f"tcp_{fam}_c_dial"] = bytes([HOLD]) + b"".join([
            record(pkts[0], NOP, cdial), record(pkts[0], POLL, cdial), *recs[1:3],
            record(b"", POLL), record(pkts[3], POLL, 0, 3)])  # fmt: skip
        # ... the upstream gone at once (EOF), and a dial never claimed (claim timeout)
        seeds[f"tcp_{fam}_c_dial_eof"] = bytes([HOLD | FD_BATCH]) + b"".join([
            record(pkts[0], POLL, cdial | 0x20), *recs[1:], record(b"", POLL)])  # fmt: skip
        seeds[f"tcp_{fam}_c_dial_unclaimed"] = bytes([HOLD]) + b"".join([
            record(pkts[0], POLL, cdial, 7), record(b"", NOP, 0, 7)])  # fmt: skip
        seeds.update(socks5_dial_seeds(fam, pkts, recs))
        # relayed: hand over after the data, the upstream answers and closes
        relay = [
            record(pkts[0]),
            record(pkts[1]),
            record(pkts[2], RELAY, 2, 1),
            record(b"", UP_SEND, 3),
            record(b"", UP_READ),
            record(pkts[3], UP_EOF, 0, 3),
            record(pk.tcp_packet(c, t, 40000, 443, seq=1029, ack=3002, flags=pk.ACK), POLL),
        ]
        seeds[f"tcp_{fam}_relay"] = bytes([FD_BATCH if fam == "v4" else 0]) + b"".join(relay)
        seeds[f"tcp_{fam}_relay_vnet"] = bytes([FD_BATCH | ECHO_REPLY_VNET]) + b"".join(relay)
        # relayed, the upstream sends more than lwIP buffers; a watcher on its socket
        flood = [record(p) for p in pkts[:2]] + [
            record(b"", RELAY),
            record(b"", WATCH),
            record(b"", UP_SEND, 7),
            record(b"", UP_SEND, 7),
            record(pkts[2], UP_READ, 0, 2),
            record(b"", POLL, 0, 5),
        ]
        seeds[f"tcp_{fam}_relay_flood"] = bytes([0]) + b"".join(flood)
        # big writes, then retransmissions and a reset
        big = [
            record(pkts[0]),
            record(pkts[1], WRITE_BIG, 7),
            record(b"", NOP, 0, 7),
            record(pk.tcp_packet(c, t, 40000, 443, seq=1001, ack=1, flags=pk.RST)),
        ]
        seeds[f"tcp_{fam}_big"] = bytes([MTU_MAX]) + b"".join(big)
        seeds[f"tcp_{fam}_big_vnet"] = bytes([FD_BATCH | ECHO_REPLY_VNET]) + b"".join(big)
        # UDP, QUIC blocked, an answer that needs fragments
        udp = [
            record(pk.udp_packet(c, t, 5353, 53, b"\x12\x34" + bytes(30)), UDP_REPLY, 0x7F),
            record(pk.udp_packet(c, t, 5353, 443, bytes(1200))),
            record(pk.udp_packet(c, t, 5353, 80, bytes(10))),
        ]
        seeds[f"udp_{fam}"] = bytes([UDP_BLOCK]) + b"".join(udp)
        # a flow relayed in C (udp_relay.c; arg bit 2 opens it): datagrams batched or not, the
        # upstream answers small and 64 KiB, is read, goes away (ECONNREFUSED: port unreachable
        # to the client), the session's counts are read, it is closed
        flow = [pk.udp_packet(c, t, 6000, 7000, bytes(range(i, i + 100))) for i in range(4)]
        relayed = [
            record(flow[0], NOP, 4),
            record(flow[1], POLL, 0x00),
            record(flow[2], POLL, 0x08),
            record(b"", POLL, 0x01),
            record(b"", POLL, 0x09),
            record(flow[3], POLL, 0x02),
            record(flow[1], POLL, 0x03),
        ]
        seeds[f"udp_relay_{fam}"] = bytes([0]) + b"".join(relayed)
        seeds[f"udp_relay_{fam}_batch"] = bytes([FD_BATCH | ECHO_REPLY_VNET]) + b"".join(relayed)
        # the same through a SOCKS5 relay (arg bit 3; bit 4: the target by name): its answers
        # are the client's last datagram to Python, raw (a header of their own: good, a
        # fragment, junk) or behind the session's header (POLL arg bit 3)
        atyp = b"\x01" if fam == "v4" else b"\x04"
        good = b"\0\0\0" + atyp + ipaddress.ip_address(t).packed + (7000).to_bytes(2, "big")
        for mode, opened in (("address", 0x0C), ("name", 0x1C)):
            socks = [
                record(pk.udp_packet(c, t, 6000, 7000, good + b"answer"), NOP, opened),
                record(b"", POLL, 0x00),
                record(b"", POLL, 0x08),
                record(pk.udp_packet(c, t, 6001, 7000, b"\0\0\x01" + good[3:] + b"x"), POLL, 0),
                record(pk.udp_packet(c, t, 6002, 7000, b"\0\0\0\x07junk"), POLL, 0x04),
                record(pk.udp_packet(c, t, 6000, 7000, b"up, behind the header"), POLL, 0x01),
                record(b"", POLL, 0x03),
            ]
            seeds[f"udp_socks5_{mode}_{fam}"] = bytes([0]) + b"".join(socks)
        # echo to any address, to the gateway, forwarded
        echo = [
            record(pk.icmp_echo(c, t, 7, 1, b"ping" * 10)),
            record(pk.icmp_echo(c, g, 7, 2, b"ping"), ECHO_SEND),
        ]
        seeds[f"echo_{fam}"] = bytes([ECHO_REPLY]) + b"".join(echo)
        seeds[f"echo_{fam}_fwd"] = bytes([ECHO_FORWARD]) + b"".join(
            [record(pk.icmp_echo(c, t, 7, 1, b"ping" * 10), ECHO_SEND)]
        )
        # fragments: a UDP datagram and an echo request, in order and reversed
        frag_udp = pk.fragment(pk.udp_packet(c, t, 5000, 5001, bytes(range(256)) * 12), 600)
        frag_echo = pk.fragment(pk.icmp_echo(c, t, 9, 9, bytes(3000)), 1280)
        seeds[f"frag_udp_{fam}"] = bytes([0]) + b"".join(record(f) for f in frag_udp)
        seeds[f"frag_udp_{fam}_rev"] = bytes([0]) + b"".join(
            record(f, 0, 0, 1) for f in reversed(frag_udp)
        )
        seeds[f"frag_echo_{fam}"] = bytes([ECHO_REPLY]) + b"".join(record(f) for f in frag_echo)
        # a lone first fragment that times out (ICMP time exceeded)
        seeds[f"frag_timeout_{fam}"] = bytes([0]) + record(frag_udp[0], NOP, 0, 7) * 2
        # fragmented TCP SYN + data
        syn_frag = pk.fragment(pkts[2], 56 if fam == "v4" else 64)
        seeds[f"frag_tcp_{fam}"] = bytes([0]) + b"".join(
            [record(pkts[0]), record(pkts[1])] + [record(f, READ) for f in syn_frag]
        )
    return seeds


def xt_chain(packet: bytes, headers: list[tuple[int, bytes]], spec: int = 0) -> bytes:
    """An XT_CHAIN record's packet: spec, then per header sel and its body, then the packet."""
    spec |= len(headers) - 1
    out = bytearray([spec])
    for sel, body in headers:
        size = 8 if sel & 3 == FRAG_HDR else 8 * (1 + (sel >> 2 & 3))
        out += bytes([sel]) + body.ljust(size - 2, b"\0")[: size - 2]
    return bytes(out) + packet


def frag_train(packet: bytes, protos: list[int], spec: int = 0, *, order: list[int] | None = None,
               unit: int = 0, ident: int = 7) -> bytes:  # fmt: skip
    """A FRAG_TRAIN record's packet: len(protos) fragments naming those protocol selectors."""
    order = order or list(range(len(protos)))
    pairs = b"".join(bytes([p, o]) for p, o in zip(protos, order, strict=True))
    return bytes([spec | (len(protos) - 1), unit, ident]) + pairs + packet


def handshake(c: str, g: str, port: int, sport: int = 40000, *, mss: int = 1460) -> list[bytes]:
    """A client's SYN and ACK (ISN 1000; the gateway's is 0): rcv_nxt is then 1001."""
    opts = pk.tcp_options(mss=mss, wscale=7, sack_permitted=True)
    return [
        pk.tcp_packet(c, g, sport, port, seq=1000, flags=pk.SYN, options=opts, window=64240),
        pk.tcp_packet(c, g, sport, port, seq=1001, ack=1, flags=pk.ACK),
    ]


def far(c: str, g: str, port: int, sport: int = 40000, payload: bytes = b"x",
        options: bytes = b"") -> bytes:  # fmt: skip
    """The segment of issue 19: 2^31 from rcv_nxt (1001) of the connection handshake() opens."""
    return pk.tcp_packet(c, g, sport, port, seq=1001 + 2**31, ack=1, flags=pk.ACK | pk.PSH,
                         payload=payload, options=options)  # fmt: skip


def shaped_seeds() -> dict[str, bytes]:
    """Extension-header chains, mixed-protocol fragment trains, segments aimed at connections,
    half-open floods, an MSS of 1, one-byte segments out of order."""
    seeds: dict[str, bytes] = {}
    for fam, (c, g) in {"v4": (C4, G4), "v6": (C6, G6)}.items():
        hs = [record(p) for p in handshake(c, g, 53)]
        data = pk.tcp_packet(c, g, 40000, 53, seq=1001, ack=1, flags=pk.ACK | pk.PSH,
                             payload=b"\0\x1dquery")  # fmt: skip
        # one byte: the shape of segment that made lwIP abort at rcv_nxt + 2^31
        one = pk.tcp_packet(c, g, 40000, 53, seq=1001, ack=1, flags=pk.ACK, payload=b"x")
        # a far segment of an established connection to the gateway's port 53, then more data
        seeds[f"seg_far_{fam}"] = bytes([0]) + b"".join(
            [*hs, shaped(SEG, bytes([AIM_HALF_SPACE]) + one), record(data, READ)]
        )
        seeds[f"seg_aim_{fam}"] = bytes([CHECKSUMS]) + b"".join(
            [*hs] + [shaped(SEG, bytes([i | AIM_ACK | AIM_FIX_CHECKSUM]) + one) for i in range(8)]
        )
        # a SYN flood beyond a half-open limit of 4, then a client completes its handshake
        flood = [shaped(SEG, bytes([HALF_OPEN_4]))]
        flood += [record(handshake(c, g, 80, 41000 + i)[0]) for i in range(10)]
        flood += [record(p) for p in handshake(c, g, 80, 42000)]
        seeds[f"syn_flood_{fam}"] = bytes([0]) + b"".join(flood)
        # a client MSS of 1 (raised to 536), then a large write
        pkts = handshake(c, g, 443, mss=1)
        seeds[f"mss_1_{fam}"] = bytes([0]) + b"".join(
            [record(pkts[0]), record(pkts[1], WRITE_BIG, 3), record(b"", NOP, 0, 5)]
        )
        # one-byte segments out of order (every other byte), as many as fit in 4 KiB
        ooo = [*hs]
        size = 1 + sum(map(len, ooo))
        for i in range(10_000):
            seg = record(
                pk.tcp_packet(
                    c,
                    g,
                    40000,
                    53,
                    seq=1002 + 2 * i,
                    ack=1,
                    flags=pk.ACK,
                    payload=bytes([i & 0xFF]),
                )
            )
            if size + len(seg) > MAX_LEN:
                break
            ooo.append(seg)
            size += len(seg)
        seeds[f"ooo_one_byte_{fam}"] = bytes([0]) + b"".join(ooo)
        # fragment trains of the far byte: the whole TCP header (with four NOPs) in the first
        # fragment of 24 bytes, the byte in the second; TCP first then protocol 99, UDP, ...
        far_byte = far(c, g, 53, options=b"\x01" * 4)
        fragged = far(c, g, 53, payload=b"x" * 24)
        trains = {
            "tcp_99": [P_OWN, P_99],
            "tcp_udp": [P_TCP, P_UDP],
            "99_tcp": [P_99, P_TCP],
            "tcp_60": [P_OWN, P_60],
        }
        for name, protos in trains.items():
            seeds[f"frag_train_{name}_{fam}"] = bytes([0]) + b"".join(
                [
                    *hs,
                    shaped(FRAG_TRAIN, frag_train(far_byte, protos, FT_TO_GATEWAY, unit=3)),
                    record(data, READ),
                ]
            )
        seeds[f"frag_train_icmp_{fam}"] = bytes([0]) + b"".join(
            [*hs, shaped(FRAG_TRAIN, frag_train(fragged, [P_ICMP, P_OWN, P_60])), record(data)]
        )
        seeds[f"frag_train_reversed_{fam}"] = bytes([CHECKSUMS]) + b"".join(
            [
                *hs,
                shaped(
                    FRAG_TRAIN,
                    frag_train(
                        fragged,
                        [P_OWN, P_OWN, P_99, P_OWN],
                        FT_AIM | FT_FIX_CHECKSUM,
                        order=[3, 2, 1, 0],
                    ),
                ),
                record(data, READ),
            ]
        )
        udp8 = pk.udp_packet(c, g, 5353, 53, bytes(8))  # two fragments of 8 bytes
        seeds[f"frag_train_incomplete_{fam}"] = bytes([0]) + b"".join(
            [
                shaped(FRAG_TRAIN, frag_train(udp8, [P_OWN, P_UDP], FT_INCOMPLETE, unit=1)),
                record(b"", NOP, 0, 7),
                record(b"", NOP, 0, 7),
            ]
        )
        udp = pk.udp_packet(c, g, 5353, 53, b"\x12\x34" + bytes(40))
        seeds[f"frag_train_udp_{fam}"] = bytes([0]) + shaped(
            FRAG_TRAIN, frag_train(udp, [P_OWN, P_TCP], FT_DEST_OPTS if fam == "v6" else 0)
        )
        if fam == "v4":
            continue
        # IPv6 extension-header chains to the gateway's own address
        pad = bytes([1, 4])
        chains = {
            "destopts": [(DEST_OPTS, pad)],
            "hbh_destopts": [(HBH, pad), (DEST_OPTS, pad)],
            "routing": [(ROUTING, b"")],
            "atomic_frag": [(FRAG_HDR, b"")],
            "type_last": [(DEST_OPTS | SEL_TYPE_LAST | 4, bytes(13) + b"\xc2")],
            "four": [
                (HBH | 4, b""),
                (ROUTING | SEL_RAW, bytes([0, 0])),
                (DEST_OPTS, b""),
                (FRAG_HDR | SEL_RAW, bytes([0, 8, 0, 0, 0, 9])),
            ],
        }
        syn = handshake(c, g, 53)[0]
        for name, headers in chains.items():
            seeds[f"xt_{name}_syn"] = bytes([0]) + shaped(XT_CHAIN, xt_chain(syn, headers))
            seeds[f"xt_{name}_far"] = bytes([0]) + b"".join(
                [
                    *hs,
                    shaped(XT_CHAIN, xt_chain(one, headers, XT_AIM | XT_TO_GATEWAY)),
                    record(data, READ),
                ]
            )
        # UDP to ff02::1 port 0, bad checksum, behind Destination Options (and checked)
        bad = pk.udp_packet(c, G6, 4000, 0, b"x", checksum=0x1234)
        for cfg in (0, CHECKSUMS):
            seeds[f"xt_udp_ff02_port0_{cfg}"] = bytes([cfg]) + shaped(
                XT_CHAIN, xt_chain(bad, [(DEST_OPTS, pad)], XT_TO_FF02_1)
            )
    return seeds


def vnet(spec: int, gso_size: int, packet: bytes, hostile: int = 0) -> bytes:
    """A VNET record's packet: the packet behind a header vnet_record builds from ``spec``."""
    return struct.pack("!BHH", spec, gso_size, hostile) + packet


def vnet_seeds() -> dict[str, bytes]:
    """Offloaded input: a TCP super-segment into a connection, a UDP super-datagram, each
    also with every field made hostile; read from the device (vnet mode) or handed over."""
    seeds: dict[str, bytes] = {}
    for fam, (c, g) in {"v4": (C4, G4), "v6": (C6, G6)}.items():
        hs = [record(p) for p in handshake(c, g, 53)]
        big = pk.tcp_packet(c, g, 40000, 53, seq=1001, ack=1, flags=pk.ACK | pk.PSH,
                            payload=bytes(range(256)) * 12)  # fmt: skip
        udp = pk.udp_packet(c, g, 5353, 53, bytes(range(200)) * 10)
        tcp_spec, udp_spec = V_TCP | V_NEEDS_CSUM | V_FIX, V_UDP | V_NEEDS_CSUM | V_FIX
        for cfg, how in ((FD_BATCH | ECHO_REPLY_VNET, "device"), (0, "direct")):
            seeds[f"vnet_tcp_{fam}_{how}"] = bytes([cfg]) + b"".join(
                [*hs, shaped(VNET, vnet(tcp_spec, 1000, big)), record(b"", READ)]
            )
            seeds[f"vnet_udp_{fam}_{how}"] = bytes([cfg]) + shaped(VNET, vnet(udp_spec, 500, udp))
        hostile = [shaped(VNET, vnet(tcp_spec | k << 5, 1000, big, h))
                   for k in range(1, 8) for h in (1, 0xFFFF)]  # fmt: skip
        # a UDP answer burst in one batch: same-size datagrams out in one USO write
        seeds[f"vnet_uso_out_{fam}"] = bytes([FD_BATCH | ECHO_REPLY_VNET]) + record(
            pk.udp_packet(c, g, 5353, 9999, b"q"), UDP_REPLY, 0x45
        )
        seeds[f"vnet_hostile_{fam}"] = bytes([FD_BATCH | ECHO_REPLY_VNET]) + b"".join(
            [*hs, *hostile, shaped(VNET, vnet(udp_spec | 4 << 5, 500, udp, 1))]
        )
    return seeds


def shaped(kind: int, packet: bytes, arg: int = 0, time: int = 0) -> bytes:
    """A record of a shaping kind (XT_CHAIN, FRAG_TRAIN, SEG)."""
    return bytes([kind << 3 | time, arg]) + struct.pack("!H", len(packet)) + packet


def regressions() -> dict[str, bytes]:
    """fuzz/regressions/packet-*: the cases of issue 19 as plain records (any harness version
    replays them). Each but the last sends the segment 2^31 from rcv_nxt that aborted lwIP."""
    out: dict[str, bytes] = {}
    hs6, hs4 = handshake(C6, G6, 53), handshake(C4, G4, 53)
    seg6 = far(C6, G6, 53)
    for name, kind in (("destination-options", 60), ("hop-by-hop", 0), ("routing", 43)):
        out[f"packet-ip6-{name}-far-segment"] = bytes([0]) + b"".join(
            record(p) for p in [*hs6, pk.with_ipv6_extension(seg6, kind)]
        )
    # Fragment trains: the first fragment holds the whole TCP header (24 bytes with four NOPs),
    # or lwIP's tcp_input drops the reassembled chain as a short packet; the last holds the
    # byte and names another protocol, which sent it (and the reassembly it completed) through
    # lwIP's own ip4_input/ip6_input before be96f03.
    nops = b"\x01" * 4
    first, last = pk.fragment(far(C4, G4, 53, options=nops), 20 + 24)
    out["packet-ip4-fragment-train-tcp-first-protocol-99-last"] = bytes([0]) + b"".join(
        record(p) for p in [*hs4, first, pk.with_ipv4_protocol(last, 99)]
    )
    # (65 bytes: fragment() would send it whole at any MTU that cuts it after 24 bytes of TCP)
    first, last = pk._fragment_v6(far(C6, G6, 53, options=nops), 48 + 24)
    for nh in (17, 99):
        out[f"packet-ip6-fragment-train-next-header-{nh}-last"] = bytes([0]) + b"".join(
            record(p) for p in [*hs6, first, last[:40] + bytes([nh]) + last[41:]]
        )
    # A second SYN in SYN_RCVD (found in review): lwIP took its MSS option, 1, past the floor.
    syn = pk.tcp_packet(C4, G4, 40001, 80, seq=1000, flags=pk.SYN,
                        options=pk.tcp_options(mss=1460))  # fmt: skip
    again = pk.tcp_packet(C4, G4, 40001, 80, seq=1000, ack=1, flags=pk.SYN | pk.ACK,
                          options=pk.tcp_options(mss=1))  # fmt: skip
    out["packet-tcp-second-syn-lowers-mss"] = bytes([0]) + record(syn) + record(again, WRITE_BIG)
    bad = pk.udp_packet(C6, "ff02::1", 4000, 0, b"x", checksum=0x1234)
    out["packet-ip6-destination-options-udp-ff02-1-port-0"] = bytes([CHECKSUMS]) + record(
        pk.with_ipv6_extension(bad, 60)
    )
    return out


def qlen(wire: bytes) -> int:
    """Length of the first question of a message (uncompressed name, type, class)."""
    i = 12
    while wire[i]:
        i += 1 + wire[i]
    return i + 1 + 4 - 12


def dns_seeds() -> dict[str, bytes]:
    """dns_fuzzer.py format: mode byte, then the query (mode 0) or the upstream's answer."""
    seeds: dict[str, bytes] = {}
    questions = [
        ("example.com.", "A"), ("example.net.", "AAAA"), ("blocked.test.", "A"),
        ("override.test.", "AAAA"), ("example.org.", "TXT"), ("example.com.", "MX"),
    ]  # fmt: skip
    for i, (name, rdtype) in enumerate(questions):
        query = dns.message.make_query(name, rdtype, use_edns=i % 2 == 0)
        query.id = 0x1234
        seeds[f"query_{i}"] = bytes([0]) + query.to_wire()
        response = dns.message.make_response(query)
        if rdtype in ("A", "AAAA"):
            addr = "192.0.2.1" if rdtype == "A" else "2001:db8::1"
            response.answer.append(dns.rrset.from_text(name, 300, "IN", rdtype, addr))
        elif rdtype == "TXT":
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", '"x" "y"'))
        else:
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "MX", "10 mx." + name))
        # answer modes use the harness's own query for entry i of its list (see dns_fuzzer.py)
        seeds[f"answer_{i}"] = bytes([1 | (i << 4)]) + response.to_wire()
        seeds[f"answer_{i}_twice"] = bytes([1 | 8 | (i << 4)]) + response.to_wire()
        wire = response.to_wire()  # spliced: header, then the harness inserts the question
        seeds[f"answer_{i}_splice"] = (
            bytes([1 | 2 | (i << 4)]) + wire[:12] + wire[12 + qlen(wire) :]
        )
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.TC
        seeds[f"answer_{i}_tc"] = bytes([1 | (i << 4)]) + truncated.to_wire()
    return seeds


def socks5_seeds() -> dict[str, bytes]:
    """socks5_fuzzer.py format: mode byte (parser = mode % 5), then the proxy's bytes."""
    v4 = b"\x01\x7f\x00\x00\x01\x04\x38"
    v6 = b"\x04" + bytes(15) + b"\x01\x04\x38"
    name = b"\x03\x0bexample.org\x01\xbb"
    reply = b"\x05\x00\x00" + v4
    return {
        "method_none": b"\x00\x05\x00", "method_userpass": b"\x00\x05\x02",
        "method_refused": b"\x00\x05\xff", "method_only_none": b"\x0a\x05\x02",
        "auth_ok": b"\x01\x01\x00", "auth_failed": b"\x01\x01\x01",
        "reply_v4": b"\x02" + reply, "reply_v6": b"\x02\x05\x00\x00" + v6,
        "reply_name": b"\x02\x05\x00\x00" + name, "reply_refused": b"\x02\x05\x05\x00" + v4,
        "udp_v4": b"\x03\x00\x00\x00\x01\xc6\x12\x00\x09\x00\x35payload",
        "udp_fragment": b"\x03\x00\x00\x01\x01\xc6\x12\x00\x09\x00\x35payload",
        "udp_name": b"\x03\x00\x00\x00" + name + b"payload",
        "handshake_none": b"\x04\x22\x05\x00" + reply + b"destination",
        "handshake_auth": b"\x09\x10\x05\x02\x01\x00" + reply + b"destination",
        "handshake_name": b"\x04\x01\x05\x00\x05\x00\x00" + name + b"destination",
    }  # fmt: skip


def http_connect_seeds() -> dict[str, bytes]:
    """http_connect_fuzzer.py format: mode byte (bit 0: read from a fake socket, arrivals of
    (mode >> 1 & 0x3f) + 1 bytes; 0x80: a small head bound), then the proxy's bytes."""
    ok = b"HTTP/1.1 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n"
    heads = {
        "ok": ok, "ok_http10": b"HTTP/1.0 200 OK\r\n\r\n",
        "auth": b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b"Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n",
        "tinyproxy_500": b"HTTP/1.1 500 Unable to connect\r\nServer: tinyproxy/1.11.1\r\n"
                         b"Content-Type: text/html\r\nConnection: close\r\n\r\n",
        "squid_refused": b"HTTP/1.1 503 Service Unavailable\r\n"
                         b"X-Squid-Error: ERR_CONNECT_FAIL 111\r\n\r\n",
        "squid_dns": b"HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_DNS_FAIL 0\r\n\r\n",
        "timeout": b"HTTP/1.1 504 Gateway Timeout\r\n\r\n",
    }  # fmt: skip
    seeds = {f"head_{k}": b"\x00" + v for k, v in heads.items()}
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    seeds["read_ok"] = b"\x01" + ok + b"SSH-2.0-destination\r\n"
    seeds["read_interim"] = bytes([1 | 3 << 1]) + interim + ok + b"destination"
    seeds["read_drip"] = b"\x01" + interim * 2 + ok
    seeds["read_small_bound"] = bytes([0x81 | 5 << 1]) + ok + b"destination"
    return seeds


def main() -> None:
    if sys.argv[1:] == ["--regressions"]:
        for name, data in regressions().items():
            (ROOT / "fuzz" / "regressions" / name).write_bytes(data)
            print(f"fuzz/regressions/{name}")
        return
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "fuzz" / "build" / "seeds")
    kinds = (("packet", packet_seeds() | shaped_seeds() | vnet_seeds()), ("dns", dns_seeds()),
             ("socks5", socks5_seeds()), ("http_connect", http_connect_seeds()))  # fmt: skip
    for kind, seeds in kinds:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (out / kind / f"seed_{name}").write_bytes(data)
        print(f"{len(seeds)} {kind} seeds in {out / kind}")


if __name__ == "__main__":
    main()

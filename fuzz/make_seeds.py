"""Write seed inputs for the fuzzers: valid conversations in packet_fuzzer.c's input format.

Packet seeds: config byte, then records ctl(1) arg(1) len(2) packet. The gateway's ISN is 0 in
the harness, so a client acknowledges its SYN-ACK with ack = 1. Packets are built with the
test suite's independent builders (tests/packets.py). DNS seeds: see dns_fuzzer.py's format.

    python fuzz/make_seeds.py OUTDIR   # writes OUTDIR/packet/* and OUTDIR/dns/*
"""

from __future__ import annotations

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


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "fuzz" / "build" / "seeds")
    for kind, seeds in (("packet", packet_seeds()), ("dns", dns_seeds())):
        (out / kind).mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (out / kind / f"seed_{name}").write_bytes(data)
        print(f"{len(seeds)} {kind} seeds in {out / kind}")


if __name__ == "__main__":
    main()

"""What a virtio-net header asks of a reader, for packets Python reads itself.

The stack reads a TUN in C (``_csrc/vnet_input.c``), where offloaded packets are checked and
fed to lwIP without copies. ``TunDevice.receive_packet`` is the slow path for embedders that read
packets themselves: with offloads negotiated a read may be a TCP super-segment or a UDP
super-datagram whose checksum the sender's kernel left partial. ``packets_from_read`` turns one
read into the whole, checksummed IP packets it stands for: a TCP super-segment stays one packet
(lwIP takes it whole), a UDP super-datagram becomes its datagrams. A header it cannot make sense
of yields nothing; the packets' own consistency is checked by the stack as for any packet.
"""

from __future__ import annotations

import struct

__all__ = ["VNET_HDR_LEN", "packets_from_read"]

VNET_HDR_LEN = 10  # struct virtio_net_hdr
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 4, 5, 0x80
UDP_GSO_SEGMENTS = 128  # as the C reader: a tiny gso_size must not make thousands of packets
_HEADER = struct.Struct("=BBHHHH")


def _ones_sum(data: bytes | bytearray) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _complete(packet: bytearray, start: int, offset: int) -> None:
    """NEEDS_CSUM: the field holds the pseudo-header's sum; put the whole checksum there."""
    checksum = ~_ones_sum(packet[start:]) & 0xFFFF
    if checksum == 0 and offset == 6:
        checksum = 0xFFFF  # UDP: 0 would mean "no checksum"
    packet[start + offset : start + offset + 2] = struct.pack("!H", checksum)


def _udp_datagrams(packet: bytearray, gso_size: int) -> list[bytes]:
    """A UDP super-datagram (no options, no extension headers) as its datagrams."""
    v6 = packet[0] >> 4 == 6
    hlen = 40 if v6 else (packet[0] & 15) * 4
    payload = packet[hlen + 8 :]
    if not payload or -(-len(payload) // gso_size) > UDP_GSO_SEGMENTS:
        return []
    out = []
    for at in range(0, len(payload), gso_size):
        chunk = payload[at : at + gso_size]
        ulen = 8 + len(chunk)
        head = bytearray(packet[:hlen])
        if v6:
            head[4:6] = struct.pack("!H", ulen)
            pseudo = bytes(head[8:40]) + struct.pack("!I3xB", ulen, 17)
        else:
            head[2:4] = struct.pack("!H", hlen + ulen)
            head[10:12] = b"\0\0"
            head[10:12] = struct.pack("!H", ~_ones_sum(head) & 0xFFFF)
            pseudo = bytes(head[12:20]) + struct.pack("!BBH", 0, 17, ulen)
        udp = bytearray(packet[hlen : hlen + 4]) + struct.pack("!HH", ulen, _ones_sum(pseudo))
        datagram = head + udp + chunk
        _complete(datagram, hlen, 6)
        out.append(bytes(datagram))
    return out


def packets_from_read(data: bytes) -> list[bytes]:
    """The IP packets one read of a TUN with a virtio-net header stands for (see above)."""
    if len(data) < VNET_HDR_LEN:
        return []
    flags, gso_type, _hdr_len, gso_size, start, offset = _HEADER.unpack_from(data)
    packet = bytearray(data[VNET_HDR_LEN:])
    if not packet:
        return []
    gso = gso_type & ~GSO_ECN
    if flags & NEEDS_CSUM:
        if offset not in (6, 16) or start + offset + 2 > len(packet):
            return []
        if gso != GSO_UDP_L4:  # a super-datagram's datagrams get their own
            _complete(packet, start, offset)
    if gso in (GSO_NONE, GSO_TCPV4, GSO_TCPV6):
        return [bytes(packet)]
    if gso == GSO_UDP_L4 and gso_size > 0 and flags & NEEDS_CSUM and offset == 6:
        return _udp_datagrams(packet, gso_size)
    return []

/*
 * Input from a TUN fd with a virtio-net header and offloads negotiated (TUNSETOFFLOAD in
 * device/tun.py): the header in front of every packet is checked against the packet, then the
 * packet goes to lwIP through tl_input.
 *
 * Why: without offloads the client's kernel cuts an upload into MTU-sized segments and
 * computes every checksum, and lwIP then handles each 1460 bytes: one tcp_input, one recv
 * callback, one send() upstream, one checksum pass each. With TSO4/TSO6 and CSUM negotiated
 * the kernel hands over super-segments of up to 64 KiB whose checksum it left partial.
 *
 * TCP super-segments go to lwIP whole. lwIP 2.1.3's tcp_input/tcp_receive take a segment of
 * any length up to what the receive window admits: they never compare it with the MSS they
 * announced (tcp_receive trims what lies beyond the window's right edge), the length is a u16
 * and an IP packet read from the TUN is at most 65535 bytes. TCP_WND is 256 KiB with window
 * scaling (lwipopts.h), so an open window admits a whole super-segment. pbufs are allocated
 * from the heap at the packet's size (tl_input), not from the 1600-byte pool. One tcp_input,
 * one recv callback and one send() upstream then serve up to 44 segments' worth of bytes.
 *
 * UDP super-datagrams (GSO_UDP_L4, a client using UDP_SEGMENT) are split: every gso_size bytes
 * of payload is a message of its own, so each goes in as its own packet, IP and UDP headers
 * rebuilt with its length.
 *
 * Checksums: NEEDS_CSUM says the transport checksum field holds only the pseudo-header's sum,
 * left for the NIC by the client's own kernel, which vouches for the data; DATA_VALID says a
 * kernel verified the checksum. Neither can be checked, nor needs to be: such a packet goes in
 * with tl_input_vouched set and transport_input.c skips its verification. A packet that is
 * not GSO gets its checksum completed in place (as cheap as the verification it replaces), so
 * what Python may keep of it (a held SYN, released later) is a whole, valid packet. IPv4
 * header checksums are always verified.
 *
 * Validation, the security-critical part: any header that does not describe its packet
 * exactly is one drop, counted in drop_vnet_header, before lwIP sees anything:
 *  - unknown flag bits or gso_type; a read shorter than a header;
 *  - NEEDS_CSUM: csum_start must be the transport header (the IPv4 header's length, or 40:
 *    IPv6 extension headers are dropped anyway) and csum_offset the TCP (16) or UDP (6)
 *    checksum, in a packet that is TCP or UDP, no fragment, long enough to hold that field;
 *  - GSO: gso_type TCPV4 with IPv4 TCP, TCPV6 with IPv6 TCP, UDP_L4 with UDP of either, the ECN
 *    bit only with TCP; NEEDS_CSUM set; gso_size not 0; hdr_len within the packet; the IP
 *    length exactly what was read; no fragment; TCP: data, no SYN or RST (the kernel never
 *    segments those); UDP: the UDP length the IP payload's, and at most TL_UDP_GSO_SEGMENTS
 *    datagrams (a tiny gso_size must not make one read thousands of packets).
 * gso_size larger than the payload is a single segment: harmless, taken as it is.
 *
 * Invariant: a packet dropped here counts once in packets_in and once in drop_vnet_header; a
 * packet taken counts in packets_in as tl_input counts it (a UDP super-datagram: each of its
 * datagrams).
 */
#include <string.h>
#include <linux/virtio_net.h>

#include "lwip/inet_chksum.h"

#include "tl_internal.h"

#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5 /* Linux 4.18's; older system headers lack it */
#endif
#define TL_UDP_GSO_SEGMENTS 128 /* the Linux sender's own bound (UDP_MAX_SEGMENTS) */
#define TL_VNET_FLAGS (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)

int tl_input_vouched;

static uint8_t tl_split_buf[65536]; /* one datagram of a UDP super-datagram */

/* What the header says about a packet, once checked against it. */
struct tl_l4_view {
    unsigned ip_hlen;  /* where the transport header starts */
    unsigned ip_len;   /* the IP packet's length by its own header */
    uint8_t proto;     /* 6, 17, or another protocol */
    int v6, fragment;
};

static void tl_view_l4(const uint8_t *d, size_t len, struct tl_l4_view *v)
{
    memset(v, 0, sizeof *v);
    if (len >= 20 && d[0] >> 4 == 4) {
        v->ip_hlen = (d[0] & 15u) * 4u;
        v->ip_len = (unsigned)d[2] << 8 | d[3];
        v->proto = d[9];
        v->fragment = (d[6] & 0x3F) != 0 || d[7] != 0;
        if (v->ip_hlen < 20) v->proto = 0; /* no transport header to speak of */
    } else if (len >= 40 && d[0] >> 4 == 6) {
        v->v6 = 1;
        v->ip_hlen = 40;
        v->ip_len = ((unsigned)d[4] << 8 | d[5]) + 40;
        v->proto = d[6]; /* an extension header is no TCP/UDP here */
    }
}

static int tl_vnet_drop(void)
{
    tl_stats.packets_in++;
    tl_stats.drop_vnet_header++;
    return -1;
}

/* Put the whole checksum where NEEDS_CSUM left the pseudo-header's sum. */
static void tl_complete_checksum(uint8_t *d, size_t len, unsigned start, unsigned offset,
                                 uint8_t proto)
{
    u16_t sum = inet_chksum(d + start, (u16_t)(len - start));
    if (sum == 0 && proto == IP_PROTO_UDP) sum = 0xFFFF; /* 0 would mean "none" */
    memcpy(d + start + offset, &sum, 2);
}

static int tl_feed(const uint8_t *d, size_t len, int vouched)
{
    tl_input_vouched = vouched;
    int r = tl_input(d, len);
    tl_input_vouched = 0;
    return r;
}

/* Each gso_size bytes of a UDP super-datagram's payload as a datagram of its own. */
static int tl_split_udp(const uint8_t *d, const struct tl_l4_view *v, unsigned gso_size)
{
    unsigned hlen = v->ip_hlen + UDP_HLEN, payload = v->ip_len - hlen;
    if (payload == 0 || (payload + gso_size - 1) / gso_size > TL_UDP_GSO_SEGMENTS) return -1;
    tl_stats.input_gso_udp++;
    for (unsigned at = 0; at < payload; at += gso_size) {
        unsigned chunk = payload - at < gso_size ? payload - at : gso_size;
        unsigned total = hlen + chunk;
        uint8_t *s = tl_split_buf;
        memcpy(s, d, hlen);
        memcpy(s + hlen, d + hlen + at, chunk);
        if (v->v6) {
            s[4] = (uint8_t)((total - 40) >> 8);
            s[5] = (uint8_t)(total - 40);
        } else {
            s[2] = (uint8_t)(total >> 8);
            s[3] = (uint8_t)total;
            s[10] = s[11] = 0;
            u16_t check = inet_chksum(s, (u16_t)v->ip_hlen);
            memcpy(s + 10, &check, 2);
        }
        s[v->ip_hlen + 4] = (uint8_t)((chunk + UDP_HLEN) >> 8);
        s[v->ip_hlen + 5] = (uint8_t)(chunk + UDP_HLEN);
        tl_stats.input_gso_udp_datagrams++;
        tl_feed(s, total, 1);
    }
    return 0;
}

int tl_vnet_input(uint8_t *buf, size_t len)
{
    if (len < TL_VNET_HDR_LEN) return tl_vnet_drop();
    struct virtio_net_hdr h;
    memcpy(&h, buf, sizeof h); /* the TUN's byte order is the host's (little-endian virtio) */
    uint8_t *d = buf + TL_VNET_HDR_LEN;
    size_t n = len - TL_VNET_HDR_LEN;
    uint8_t gso = h.gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;
    int ecn = (h.gso_type & VIRTIO_NET_HDR_GSO_ECN) != 0;
    if (h.flags & ~TL_VNET_FLAGS) return tl_vnet_drop();
    if (h.flags == 0 && h.gso_type == VIRTIO_NET_HDR_GSO_NONE) return tl_feed(d, n, 0);

    struct tl_l4_view v;
    tl_view_l4(d, n, &v);
    int tcp = v.proto == IP_PROTO_TCP, udp = v.proto == IP_PROTO_UDP;
    if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        unsigned field = h.csum_start + (unsigned)h.csum_offset;
        if (!(tcp || udp) || v.fragment || h.csum_start != v.ip_hlen ||
            h.csum_offset != (tcp ? 16 : 6) || field + 2 > n || field + 2 > v.ip_len ||
            v.ip_len > n)
            return tl_vnet_drop();
    }
    if (gso == VIRTIO_NET_HDR_GSO_NONE) {
        if (ecn) return tl_vnet_drop();
        if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
            tl_complete_checksum(d, v.ip_len, v.ip_hlen, h.csum_offset, v.proto);
            return tl_feed(d, n, 1);
        }
        /* DATA_VALID: a kernel checked it; a fragment's vouches for no reassembled datagram */
        return tl_feed(d, n, !v.fragment && (tcp || udp));
    }

    int fits = gso == VIRTIO_NET_HDR_GSO_TCPV4   ? tcp && !v.v6
               : gso == VIRTIO_NET_HDR_GSO_TCPV6 ? tcp && v.v6
               : gso == VIRTIO_NET_HDR_GSO_UDP_L4 ? udp && !ecn
                                                   : 0;
    if (!fits || !(h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || h.gso_size == 0 ||
        h.hdr_len > n || v.ip_len != n)
        return tl_vnet_drop();
    if (udp) {
        const uint8_t *u = d + v.ip_hlen;
        if (n < v.ip_hlen + UDP_HLEN || ((unsigned)u[4] << 8 | u[5]) != n - v.ip_hlen)
            return tl_vnet_drop();
        return tl_split_udp(d, &v, h.gso_size) == 0 ? 0 : tl_vnet_drop();
    }
    const uint8_t *t = d + v.ip_hlen;
    if (n < v.ip_hlen + 20u || n <= v.ip_hlen + (t[12] >> 4) * 4u || (t[13] & 0x06) != 0)
        return tl_vnet_drop(); /* no data, or SYN/RST */
    tl_stats.input_gso_tcp++;
    return tl_feed(d, n, 1);
}

void tl_set_vnet_offloads(uint32_t flags) { tl_stats.input_offloads = flags; }

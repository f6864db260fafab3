/*
 * The packet fuzzer's shaped records (harness.h has the layout; fuzz/README.md, "Shaped
 * records"): record kinds 29 to 31 (ctl >> 3) do not take their packet as it is. Their packet
 * starts with a description of a shape, and the harness builds the packet(s) from it and the
 * rest, so that libFuzzer reaches in a few mutations inputs whose lengths, offsets and checksums
 * it would otherwise have to find by itself:
 *   29 XT_CHAIN    an IPv6 packet behind a chain of 1-4 extension headers (build_chain)
 *   30 FRAG_TRAIN  the packet as a train of fragments that may name different protocols
 *   31 SEG         a TCP segment aimed at a connection's sequence space; a half-open limit
 *    7 VNET        the packet behind a virtio-net header (GSO, partial checksums), one field
 *                  of it hostile (vnet_record)
 * Each built packet goes in through packet_fuzzer.c's feed, as a plain record's does.
 */
#include <stdint.h>
#include <string.h>

#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

#include "harness.h"

static const uint32_t HALF_OPEN[8] = {0, 1, 2, 3, 4, 8, 16, 64};
/* seq - rcv_nxt for SEG: the old abort ("insane offset!"), both sides of transport_input.c's
 * 2^30 bound */
static const uint32_t SEQ_OFFSET[8] = {0x80000000u, 0x7FFFFFFFu, 0x80000001u, 0x40000000u,
                                       0x3FFFFFFFu, 0xC0000000u, 0xC0000001u, 0};
static const uint8_t EXT_KIND[4] = {0, 43, 60, 44}; /* Hop-by-Hop, Routing, Dest. Options, Frag. */
static const uint8_t FF02_1[16] = {0xff, 0x02, [15] = 1};
static uint8_t shape_buf[2][65536 + 4 * 32 + 64];

/* The transport header of a packet without extension headers: its offset, or 0. */
static size_t l4_offset(const uint8_t *pkt, size_t len, uint8_t *proto)
{
    if (len >= 20 && pkt[0] >> 4 == 4 && (pkt[0] & 15u) * 4u >= 20 && (pkt[0] & 15u) * 4u <= len) {
        *proto = pkt[9];
        return (pkt[0] & 15u) * 4u;
    }
    if (len >= 40 && pkt[0] >> 4 == 6) {
        *proto = pkt[6];
        return 40;
    }
    return 0;
}

/* Make the IP length fields match `len`, the IPv4 header checksum hold and, with `l4`, the
 * TCP/UDP/ICMP checksum too (over the pseudo header of the packet's own addresses). */
static void fix_lengths(uint8_t *pkt, size_t len, int l4)
{
    uint8_t proto;
    size_t hl = l4_offset(pkt, len, &proto);
    if (hl == 0) return;
    int v6 = pkt[0] >> 4 == 6;
    if (v6) {
        pkt[4] = (uint8_t)((len - 40) >> 8);
        pkt[5] = (uint8_t)(len - 40);
    } else {
        pkt[2] = (uint8_t)(len >> 8);
        pkt[3] = (uint8_t)len;
    }
    size_t tl = len - hl, at = proto == 6 ? 16 : proto == 17 ? 6 : 2;
    int pseudo = proto == 6 || proto == 17 || (v6 && proto == 58);
    if (l4 && (pseudo || proto == 1) && tl >= at + 2) {
        pkt[hl + at] = pkt[hl + at + 1] = 0;
        uint32_t sum = 0;
        if (pseudo) sum = v6 ? ones_sum(pkt + 8, 32, proto + (uint32_t)tl)
                             : ones_sum(pkt + 12, 8, proto + (uint32_t)tl);
        uint16_t c = (uint16_t)~ones_sum(pkt + hl, tl, sum);
        if (proto == 17 && c == 0) c = 0xFFFF;
        pkt[hl + at] = (uint8_t)(c >> 8);
        pkt[hl + at + 1] = (uint8_t)c;
    }
    if (!v6) {
        pkt[10] = pkt[11] = 0;
        uint16_t c = (uint16_t)~ones_sum(pkt, hl, 0);
        pkt[10] = (uint8_t)(c >> 8);
        pkt[11] = (uint8_t)c;
    }
}

static void set_destination(uint8_t *pkt, size_t len, const uint8_t *v4, const uint8_t *v6)
{
    if (len >= 20 && pkt[0] >> 4 == 4 && v4) memcpy(pkt + 16, v4, 4);
    if (len >= 40 && pkt[0] >> 4 == 6 && v6) memcpy(pkt + 24, v6, 16);
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Aim a TCP segment at a connection lwIP holds (tcp_active_pcbs): the one of its ports, else
 * the first of its IP version, whose addresses and ports it then takes. Its sequence number
 * becomes rcv_nxt + SEQ_OFFSET[which & 7] (7: the right edge of the window), with (which & 8)
 * its ACK number snd_nxt. A segment nobody holds a connection for is left alone. */
static void aim_segment(uint8_t *pkt, size_t len, unsigned which)
{
    uint8_t proto;
    size_t hl = l4_offset(pkt, len, &proto);
    if (hl == 0 || proto != 6 || len < hl + 20) return;
    int v6 = pkt[0] >> 4 == 6;
    uint16_t sport = (uint16_t)(pkt[hl] << 8 | pkt[hl + 1]);
    uint16_t dport = (uint16_t)(pkt[hl + 2] << 8 | pkt[hl + 3]);
    struct tcp_pcb *pcb = NULL, *any = NULL;
    for (struct tcp_pcb *c = tcp_active_pcbs; c; c = c->next) {
        if (IP_IS_V6_VAL(c->local_ip) != v6) continue;
        if (any == NULL) any = c;
        if (c->remote_port == sport && c->local_port == dport) {
            pcb = c;
            break;
        }
    }
    if (pcb == NULL && (pcb = any) == NULL) return;
    if (v6) {
        memcpy(pkt + 8, ip_2_ip6(&pcb->remote_ip)->addr, 16);
        memcpy(pkt + 24, ip_2_ip6(&pcb->local_ip)->addr, 16);
    } else {
        memcpy(pkt + 12, &ip_2_ip4(&pcb->remote_ip)->addr, 4);
        memcpy(pkt + 16, &ip_2_ip4(&pcb->local_ip)->addr, 4);
    }
    pkt[hl] = (uint8_t)(pcb->remote_port >> 8); pkt[hl + 1] = (uint8_t)pcb->remote_port;
    pkt[hl + 2] = (uint8_t)(pcb->local_port >> 8); pkt[hl + 3] = (uint8_t)pcb->local_port;
    uint32_t off = (which & 7) == 7 ? pcb->rcv_wnd : SEQ_OFFSET[which & 7];
    put32(pkt + hl + 4, pcb->rcv_nxt + off);
    if (which & 8) {
        put32(pkt + hl + 8, pcb->snd_nxt);
        pkt[hl + 13] |= 0x10; /* ACK */
    }
}

/*
 * XT_CHAIN: `spec [sel body]... packet`. spec & 3: 1-4 headers; 0x04: to the gateway's own
 * address (fd00:18::1), else 0x20: to ff02::1; 0x08: aim_segment first (rcv_nxt + 2^31);
 * 0x10: fix the transport checksum. Per header, sel & 3 its kind (Hop-by-Hop, Routing,
 * Destination Options, Fragment) and (sel >> 2) & 3 its length in 8 bytes beyond the first
 * (a Fragment header is 8 bytes), then its body (6 + 8 * that bytes) from the input: used as it
 * is with sel & 0x10, else options are one PadN (Routing and Fragment: zeros, an atomic
 * fragment) and, with sel & 0x20, the body's last input byte as an option type that ends the
 * header. The packet: IPv6 without extension headers (anything else goes in as it is).
 */
static size_t build_chain(const uint8_t *in, size_t len, uint8_t *out)
{
    if (len < 1) return 0;
    uint8_t spec = in[0];
    size_t n = (spec & 3u) + 1, at = 1, hlen = 0;
    uint8_t hdr[4 * 32];
    uint8_t kinds[4];
    size_t sizes[4], count = 0;
    for (size_t i = 0; i < n && at < len; i++) {
        uint8_t sel = in[at++];
        uint8_t kind = EXT_KIND[sel & 3];
        size_t size = kind == 44 ? 8 : 8 * (1 + ((sel >> 2) & 3u));
        if (at + size - 2 > len) break;
        uint8_t *h = hdr + hlen;
        memcpy(h + 2, in + at, size - 2);
        at += size - 2;
        h[1] = kind == 44 ? 0 : (uint8_t)(size / 8 - 1);
        if (!(sel & 0x10)) {
            uint8_t last = h[size - 1];
            memset(h + 2, 0, size - 2);
            if (kind == 0 || kind == 60) {
                size_t pad = (sel & 0x20) ? size - 3 : size - 2; /* PadN: type 1, length, data */
                if (pad >= 2) {
                    h[2] = 1;
                    h[3] = (uint8_t)(pad - 2);
                }
                if (sel & 0x20) h[size - 1] = last;
            }
        }
        kinds[count] = kind;
        sizes[count++] = size;
        hlen += size;
    }
    size_t plen = len - at;
    uint8_t *pkt = out + hlen; /* the packet, moved up later to make room */
    memcpy(pkt, in + at, plen);
    if (spec & 0x04) set_destination(pkt, plen, GW4, GW6);
    else if (spec & 0x20) set_destination(pkt, plen, NULL, FF02_1);
    if (spec & 0x08) aim_segment(pkt, plen, 0);
    fix_lengths(pkt, plen, (spec & 0x10) != 0);
    if (count == 0 || plen < 40 || pkt[0] >> 4 != 6 || 40 + hlen + (plen - 40) > 65535 + 40) {
        memmove(out, pkt, plen);
        return plen;
    }
    memmove(out, pkt, 40); /* IPv6 header, then the chain, then the rest */
    uint8_t next = out[6];
    out[6] = kinds[0];
    size_t o = 0;
    for (size_t i = 0; i < count; i++) {
        hdr[o] = i + 1 < count ? kinds[i + 1] : next;
        o += sizes[i];
    }
    memcpy(out + 40, hdr, hlen);
    size_t total = 40 + hlen + (plen - 40);
    out[4] = (uint8_t)((total - 40) >> 8);
    out[5] = (uint8_t)(total - 40);
    return total;
}

/* The protocol a FRAG_TRAIN fragment names: 0 its datagram's; 1-7 one of these; more: itself. */
static uint8_t frag_proto(uint8_t sel, uint8_t own, int v6)
{
    static const uint8_t table[8] = {0, 6, 17, 1, 99, 0, 60, 43};
    if (sel == 0) return own;
    if (sel < 8) return sel == 3 && v6 ? 58 : table[sel];
    return sel;
}

/*
 * FRAG_TRAIN: `spec size id [proto pos]... packet`. spec & 7: 1-8 fragments (as many
 * [proto pos] pairs follow); 0x08: aim_segment first (rcv_nxt + 2^31); 0x10: fix the transport
 * checksum; 0x20: to the gateway's own address; 0x40: the train stays incomplete (the last
 * fragment says more follow); 0x80 (IPv6): a Destination Options header goes in front of the
 * transport header, inside the fragmented part. size: bytes per fragment in units of 8 (0:
 * split evenly); id: the identification. Each fragment names protocol frag_proto(proto); they
 * go in ordered by pos (ties: in order). The packet: IPv4, or IPv6 without extension headers.
 */
static void frag_train(const uint8_t *in, size_t len, uint8_t arg)
{
    if (len < 3) return;
    uint8_t spec = in[0], unit = in[1], id = in[2];
    size_t n = (spec & 7u) + 1, at = 3;
    if (at + 2 * n > len) return;
    const uint8_t *sel = in + at;
    at += 2 * n;
    size_t plen = len - at;
    uint8_t *pkt = shape_buf[0], *frag = shape_buf[1];
    memcpy(pkt, in + at, plen);
    uint8_t proto;
    size_t hl = l4_offset(pkt, plen, &proto);
    if (hl == 0) return;
    int v6 = pkt[0] >> 4 == 6;
    if (spec & 0x20) set_destination(pkt, plen, GW4, GW6);
    if (spec & 0x08) aim_segment(pkt, plen, 0);
    fix_lengths(pkt, plen, (spec & 0x10) != 0);
    if (v6 && (spec & 0x80) && plen + 8 <= 65535 + 40) {
        memmove(pkt + 48, pkt + 40, plen - 40);
        static const uint8_t dest_opts[8] = {0, 0, 1, 4, 0, 0, 0, 0};
        memcpy(pkt + 40, dest_opts, 8);
        pkt[40] = proto;
        pkt[6] = proto = 60;
        plen += 8;
        fix_lengths(pkt, plen, 0);
    }
    size_t data_len = plen - hl;
    if (data_len == 0) return;
    size_t step = unit ? (size_t)unit * 8 : ((data_len + n - 1) / n + 7) & ~(size_t)7;
    size_t count = (data_len + step - 1) / step;
    if (count > n) count = n; /* the last fragment takes the rest */
    size_t order[8];
    for (size_t i = 0; i < count; i++) order[i] = i;
    for (size_t i = 1; i < count; i++) /* insertion sort on pos, stable */
        for (size_t j = i; j > 0 && sel[2 * order[j] + 1] < sel[2 * order[j - 1] + 1]; j--) {
            size_t t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    for (size_t k = 0; k < count; k++) {
        size_t i = order[k], start = i * step;
        size_t piece = i + 1 == count ? data_len - start : step;
        int more = i + 1 < count || (spec & 0x40);
        uint8_t p = frag_proto(sel[2 * i], proto, v6);
        size_t flen;
        if (v6) {
            memcpy(frag, pkt, 40);
            frag[6] = 44;
            uint8_t *fh = frag + 40;
            fh[0] = p;
            fh[1] = 0;
            fh[2] = (uint8_t)(start >> 8);
            fh[3] = (uint8_t)((start & 0xF8) | (more ? 1 : 0));
            put32(fh + 4, 0x10000u | id);
            memcpy(frag + 48, pkt + 40 + start, piece);
            flen = 48 + piece;
            frag[4] = (uint8_t)((flen - 40) >> 8);
            frag[5] = (uint8_t)(flen - 40);
        } else {
            memcpy(frag, pkt, hl);
            frag[4] = 0x4A;
            frag[5] = id;
            uint16_t fo = (uint16_t)((start / 8) | (more ? 0x2000 : 0));
            frag[6] = (uint8_t)(fo >> 8);
            frag[7] = (uint8_t)fo;
            frag[9] = p;
            memcpy(frag + hl, pkt + hl + start, piece);
            flen = hl + piece;
            fix_lengths(frag, flen, 0);
        }
        feed(frag, flen, arg, 0);
    }
}

/*
 * VNET: `spec gso_size(2) hostile(2) packet` (big endian), the packet behind a virtio-net
 * header that describes it as the client's kernel would (vnet_input.c), then made hostile:
 *   spec & 3     gso_type: none, TCPV4/TCPV6 by the packet's version, UDP_L4, hostile's low byte
 *   spec & 4     NEEDS_CSUM at the packet's transport checksum; spec & 8 DATA_VALID
 *   spec & 0x10  fix the packet: IP and UDP lengths, the checksum (with NEEDS_CSUM, the pseudo
 *                header's sum only), a TCP segment aimed in order at a connection lwIP holds
 *   spec >> 5    the field that takes `hostile` instead: none, hdr_len, csum_start,
 *                csum_offset, gso_size, flags, gso_type (ECN bit included), or (7) hostile & 255
 *                bytes appended after the packet
 */
static void vnet_record(const uint8_t *in, size_t len, uint8_t arg)
{
    if (len < 5) return;
    uint8_t spec = in[0];
    uint16_t gso_size = (uint16_t)(in[1] << 8 | in[2]), hostile = (uint16_t)(in[3] << 8 | in[4]);
    size_t n = len - 5 > 65400 ? 65400 : len - 5;
    uint8_t *buf = shape_buf[0], *pkt = buf + TL_VNET_HDR_LEN;
    memcpy(pkt, in + 5, n);
    uint8_t proto = 0;
    size_t hl = l4_offset(pkt, n, &proto);
    int v6 = n > 0 && pkt[0] >> 4 == 6;
    unsigned offset = proto == 6 ? 16 : 6;
    if ((spec & 0x10) && hl) {
        if (proto == 6) {
            aim_segment(pkt, n, 8);               /* rcv_nxt + 2^31, ack snd_nxt ... */
            if (n >= hl + 8) put32(pkt + hl + 4, (uint32_t)((uint32_t)pkt[hl + 4] << 24 |
                                                            (uint32_t)pkt[hl + 5] << 16 |
                                                            (uint32_t)pkt[hl + 6] << 8 |
                                                            pkt[hl + 7]) - 0x80000000u);
        }                                         /* ... then rcv_nxt: in order */
        if (proto == 17 && n >= hl + 8) {
            pkt[hl + 4] = (uint8_t)((n - hl) >> 8);
            pkt[hl + 5] = (uint8_t)(n - hl);
        }
        fix_lengths(pkt, n, 1);
        if ((spec & 4) && (proto == 6 || proto == 17) && n >= hl + offset + 2) {
            size_t tl = n - hl;
            uint32_t sum = v6 ? ones_sum(pkt + 8, 32, proto + (uint32_t)tl)
                              : ones_sum(pkt + 12, 8, proto + (uint32_t)tl);
            pkt[hl + offset] = (uint8_t)(sum >> 8);
            pkt[hl + offset + 1] = (uint8_t)sum;
        }
    }
    struct virtio_net_hdr_fields { uint8_t flags, gso_type; uint16_t hdr_len, gso_size,
                                   csum_start, csum_offset; } h = {0};
    _Static_assert(sizeof h == TL_VNET_HDR_LEN, "struct virtio_net_hdr's layout");
    unsigned gso = spec & 3;
    h.gso_type = gso == 0 ? 0 : gso == 1 ? (v6 ? 4 : 1) : gso == 2 ? 5 : (uint8_t)hostile;
    if (spec & 4) {
        h.flags |= 1;
        h.csum_start = (uint16_t)hl;
        h.csum_offset = (uint16_t)offset;
    }
    if (spec & 8) h.flags |= 2;
    h.gso_size = gso_size;
    h.hdr_len = (uint16_t)(hl + (proto == 6 && n >= hl + 13 ? (pkt[hl + 12] >> 4) * 4u : 8u));
    size_t extra = 0;
    switch (spec >> 5) {
    case 1: h.hdr_len = hostile; break;
    case 2: h.csum_start = hostile; break;
    case 3: h.csum_offset = hostile; break;
    case 4: h.gso_size = hostile; break;
    case 5: h.flags = (uint8_t)hostile; break;
    case 6: h.gso_type = (uint8_t)hostile; break;
    case 7: extra = hostile & 255u; memset(pkt + n, 0xA5, extra); break;
    }
    memcpy(buf, &h, TL_VNET_HDR_LEN);
    feed_with_header(buf, TL_VNET_HDR_LEN + n + extra, arg);
}

void shape_record(unsigned kind, const uint8_t *in, size_t len, uint8_t arg)
{
    if (kind == VNET) {
        vnet_record(in, len, arg);
    } else if (kind == XT_CHAIN) {
        size_t n = build_chain(in, len, shape_buf[0]);
        if (n > 0) feed(shape_buf[0], n, arg, 0);
    } else if (kind == FRAG_TRAIN) {
        frag_train(in, len, arg);
    } else if (len >= 1) {
        /* SEG: `spec packet`. spec & 15: aim_segment's which; 0x10: fix the checksum; spec >> 5,
         * if not 0: tl_set_max_half_open(HALF_OPEN[spec >> 5]) first (SYN floods evict). */
        uint8_t spec = in[0];
        if (spec >> 5) {
            tl_set_max_half_open(HALF_OPEN[spec >> 5]);
            if (tl_max_half_open > half_open_bound) half_open_bound = tl_max_half_open;
        }
        if (len == 1) return;
        memcpy(shape_buf[0], in + 1, len - 1);
        aim_segment(shape_buf[0], len - 1, spec & 15u);
        fix_lengths(shape_buf[0], len - 1, (spec & 0x10) != 0);
        feed(shape_buf[0], len - 1, arg, 0);
    }
}

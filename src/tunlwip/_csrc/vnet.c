/*
 * Output to a TUN fd opened with IFF_VNET_HDR: consecutive TCP segments of one connection, and
 * consecutive same-size UDP datagrams of one flow, go to the kernel in a single GSO write.
 *
 * Why: lwIP sends segments no larger than the client's MSS. At MTU 1500 a download cost one
 * write() and one trip through the client kernel's receive path per 1460 bytes, and that is
 * where the CPU went (slirp4netns pays the same). With a virtio-net header in front, one write
 * carries up to 64 KiB of a connection's consecutive segments (gso_type TCPV4/TCPV6, gso_size
 * the segment size): the kernel takes it as one packet, as after GRO on a NIC, and segments it
 * itself if it forwards it on. The header also marks TCP checksums partial (NEEDS_CSUM), so
 * nobody computes them for a local destination; a forwarding kernel fills them in.
 *
 * How: while a batch is open (a poll pass, tl_output_batch_begin/end in netif.c), a TCP data
 * segment that continues the held run is held by reference (pbuf_ref; lwIP keeps its segments
 * for retransmission anyway) instead of written. It continues the run if it has the same
 * addresses, ports, ACK, window and options, the next sequence number, no flag but ACK and PSH,
 * and is no longer than the first segment (a shorter one ends the run). Anything else writes
 * the run first, so packets leave in the order lwIP sent them. A run is one writev: header,
 * the first segment's IP and TCP headers with lengths and checksums adjusted, each segment's
 * payload; no copy. If the kernel refuses a GSO write (EINVAL), the run goes out a packet at a
 * time, and so does every later one.
 *
 * UDP the same way (USO, gso_type UDP_L4): inside a batch, datagrams of one flow (addresses
 * and ports) with the same payload size are held, and leave as one datagram of their joined
 * payloads with the UDP checksum left partial, which the kernel cuts back into datagrams of
 * gso_size bytes (the last may be shorter, and ends the run). Those a burst of lwIP's udp
 * output brings (a batch around it: a relay's pass, Python's burst) then cost one write. A
 * datagram that is not held keeps the checksum lwIP computed. If the kernel refuses a UDP GSO
 * write (EINVAL: before Linux 4.18), UDP goes a datagram at a time from then on; TCP runs go on.
 *
 * Invariant: nothing is held once the outermost batch ends; outside a batch every packet is
 * written at once.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>
#include <linux/virtio_net.h>

#include "lwip/pbuf.h"

#include "tl_internal.h"

_Static_assert(sizeof(struct virtio_net_hdr) == TL_VNET_HDR_LEN, "virtio_net_hdr layout");

#define TL_RUN_MAX 64           /* segments in one write: 64 KiB of 1000-byte segments */
#define TL_IP_MAX 65535         /* an IPv4 total length (and what we allow IPv6 too) */
#define TL_TCP_ACK 0x10
#define TL_TCP_PSH 0x08
#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5 /* Linux 4.18's; older system headers lack it */
#endif

/* Where a TCP or UDP packet's parts are. */
struct tl_l4_view {
    unsigned ip_hlen, l4_hlen;
    size_t payload;
    int v6;
    uint8_t proto; /* 6 or 17 */
};

static struct {
    int n;                            /* segments held; 0: no run */
    struct pbuf *pbuf[TL_RUN_MAX];
    const uint8_t *packet[TL_RUN_MAX]; /* each segment's IP packet, inside its pbuf */
    uint16_t len[TL_RUN_MAX];
    uint8_t head[120];                /* the first segment's IP and TCP headers */
    struct tl_l4_view view;          /* the first segment's */
    size_t total;                     /* the merged packet's IP length */
    uint32_t next_seq;
    uint8_t psh, ended;               /* a later segment had PSH; a short one ended the run */
} tl_run;

static int tl_batch_depth;
static int tl_gso_refused;
static int tl_uso_refused; /* the kernel took no UDP GSO write: UDP one at a time */
tl_vnet_counters tl_vnet_stats;

static uint32_t tl_get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint32_t tl_sum16(const uint8_t *p, size_t len, uint32_t sum)
{
    for (size_t i = 0; i + 1 < len; i += 2) sum += (uint32_t)p[i] << 8 | p[i + 1];
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    return sum;
}

/* 1 if data is a whole, unfragmented TCP packet (view filled), else 0. */
static int tl_view_tcp(const uint8_t *d, size_t len, struct tl_l4_view *v)
{
    if (len < 40) return 0;
    if (d[0] >> 4 == 4) {
        v->ip_hlen = (d[0] & 15u) * 4;
        v->v6 = 0;
        if (v->ip_hlen < 20 || d[9] != 6 || ((size_t)d[2] << 8 | d[3]) != len) return 0;
        if ((d[6] & 0x3F) != 0 || d[7] != 0) return 0; /* a fragment */
    } else if (d[0] >> 4 == 6) {
        v->ip_hlen = 40;
        v->v6 = 1;
        if (len < 60 || d[6] != 6 || ((size_t)d[4] << 8 | d[5]) + 40 != len) return 0;
    } else {
        return 0;
    }
    if (len < v->ip_hlen + 20) return 0;
    v->l4_hlen = (d[v->ip_hlen + 12] >> 4) * 4u;
    if (v->l4_hlen < 20 || len < v->ip_hlen + v->l4_hlen) return 0;
    v->payload = len - v->ip_hlen - v->l4_hlen;
    v->proto = 6;
    return 1;
}

/* 1 if data is a whole, unfragmented UDP datagram (view filled), else 0. */
static int tl_view_udp(const uint8_t *d, size_t len, struct tl_l4_view *v)
{
    if (len < 28) return 0;
    if (d[0] >> 4 == 4) {
        v->ip_hlen = (d[0] & 15u) * 4;
        v->v6 = 0;
        if (v->ip_hlen < 20 || d[9] != 17 || ((size_t)d[2] << 8 | d[3]) != len) return 0;
        if ((d[6] & 0x3F) != 0 || d[7] != 0) return 0; /* a fragment */
    } else if (d[0] >> 4 == 6) {
        v->ip_hlen = 40;
        v->v6 = 1;
        if (len < 48 || d[6] != 17 || ((size_t)d[4] << 8 | d[5]) + 40 != len) return 0;
    } else {
        return 0;
    }
    const uint8_t *u = d + v->ip_hlen;
    if (len < v->ip_hlen + 8 || ((size_t)u[4] << 8 | u[5]) != len - v->ip_hlen) return 0;
    v->l4_hlen = 8;
    v->payload = len - v->ip_hlen - 8;
    v->proto = 17;
    return 1;
}

/* The offset of the checksum field in the transport header. */
static unsigned tl_csum_offset(const struct tl_l4_view *v) { return v->proto == 6 ? 16 : 6; }

/* NEEDS_CSUM wants the checksum field to hold the pseudo-header's sum, not inverted. */
static void tl_set_pseudo_sum(uint8_t *ip, const struct tl_l4_view *v, size_t l4_len)
{
    uint32_t sum = v->v6 ? tl_sum16(ip + 8, 32, v->proto + (uint32_t)l4_len)
                         : tl_sum16(ip + 12, 8, v->proto + (uint32_t)l4_len);
    uint8_t *field = ip + v->ip_hlen + tl_csum_offset(v);
    field[0] = (uint8_t)(sum >> 8);
    field[1] = (uint8_t)sum;
}

static void tl_vnet_tcp_header(struct virtio_net_hdr *h, const struct tl_l4_view *v)
{
    memset(h, 0, sizeof *h);
    h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h->csum_start = (uint16_t)v->ip_hlen;
    h->csum_offset = (uint16_t)tl_csum_offset(v); /* the TCP or UDP checksum */
    h->hdr_len = (uint16_t)(v->ip_hlen + v->l4_hlen);
}

/* 0, or -errno (-EIO for a short write: a TUN takes a packet whole or not at all). */
static int tl_writev(int fd, struct iovec *iov, int count)
{
    size_t total = 0;
    for (int i = 0; i < count; i++) total += iov[i].iov_len;
    ssize_t n;
    do { n = writev(fd, iov, count); } while (n < 0 && errno == EINTR);
    tl_vnet_stats.writes++;
    if (n < 0) return -errno;
    return (size_t)n == total ? 0 : -EIO;
}

/* One packet, no GSO; tcp: its view (checksum partial), or NULL (checksums are complete). */
static unsigned tl_write_one(int fd, const uint8_t *data, size_t len,
                             const struct tl_l4_view *tcp)
{
    struct virtio_net_hdr h;
    if (tcp) tl_vnet_tcp_header(&h, tcp);
    else memset(&h, 0, sizeof h);
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)data, len}};
    return tl_writev(fd, iov, 2) == 0 ? 0 : 1;
}

/* Does the packet at d (a TCP data segment, view v) continue the held run? */
static int tl_continues_run(const uint8_t *d, const struct tl_l4_view *v)
{
    const struct tl_l4_view *r = &tl_run.view;
    const uint8_t *h = tl_run.head, *t = d + v->ip_hlen, *ht = h + r->ip_hlen;
    if (tl_run.ended || tl_run.n == TL_RUN_MAX || v->v6 != r->v6 || v->proto != r->proto)
        return 0;
    if (v->ip_hlen != r->ip_hlen || v->l4_hlen != r->l4_hlen) return 0;
    if (v->payload > r->payload || tl_run.total + v->payload > TL_IP_MAX) return 0;
    if (v->v6 ? memcmp(d + 8, h + 8, 32) != 0 : memcmp(d + 12, h + 12, 8) != 0) return 0;
    if (v->proto == 17) return memcmp(t, ht, 4) == 0; /* ports */
    if (tl_get32(t + 4) != tl_run.next_seq) return 0;
    return memcmp(t, ht, 4) == 0                  /* ports */
        && memcmp(t + 8, ht + 8, 4) == 0          /* acknowledgement */
        && t[12] == ht[12]                        /* header length */
        && memcmp(t + 14, ht + 14, 2) == 0        /* window */
        && memcmp(t + 18, ht + 18, v->l4_hlen - 18) == 0; /* urgent pointer, options */
}

/* A TCP data segment (ACK, maybe PSH, nothing else) or a UDP datagram with data, whose
 * headers fit tl_run.head, to a kernel that has not refused its kind of GSO: may be held. */
static int tl_holdable_segment(const uint8_t *d, const struct tl_l4_view *v)
{
    if (v->payload == 0 || v->ip_hlen + v->l4_hlen > sizeof tl_run.head) return 0;
    if (v->proto == 17) return !tl_uso_refused;
    return !tl_gso_refused && (d[v->ip_hlen + 13] & ~TL_TCP_PSH) == TL_TCP_ACK;
}

static void tl_hold(struct pbuf *p, const uint8_t *d, size_t len, const struct tl_l4_view *v)
{
    int i = tl_run.n++;
    pbuf_ref(p);
    tl_run.pbuf[i] = p;
    tl_run.packet[i] = d;
    tl_run.len[i] = (uint16_t)len;
    if (v->proto == 6 && (d[v->ip_hlen + 13] & TL_TCP_PSH)) tl_run.psh = 1;
    if (i == 0) {
        memcpy(tl_run.head, d, v->ip_hlen + v->l4_hlen);
        tl_run.view = *v;
        tl_run.total = len;
        tl_run.ended = 0;
    } else {
        tl_run.total += v->payload;
        if (v->payload < tl_run.view.payload) tl_run.ended = 1;
    }
    if (v->proto == 6) tl_run.next_seq = tl_get32(d + v->ip_hlen + 4) + (uint32_t)v->payload;
}

static void tl_release_run(void)
{
    for (int i = 0; i < tl_run.n; i++) pbuf_free(tl_run.pbuf[i]);
    tl_run.n = 0;
    tl_run.psh = 0;
}

/* The run as one packet: its segments' payloads behind the first's headers, made to fit. */
static int tl_write_merged(int fd)
{
    const struct tl_l4_view *v = &tl_run.view;
    unsigned hlen = v->ip_hlen + v->l4_hlen;
    uint8_t head[sizeof tl_run.head];
    memcpy(head, tl_run.head, hlen);
    if (v->v6) {
        head[4] = (uint8_t)((tl_run.total - 40) >> 8);
        head[5] = (uint8_t)(tl_run.total - 40);
    } else {
        head[2] = (uint8_t)(tl_run.total >> 8);
        head[3] = (uint8_t)tl_run.total;
        head[10] = head[11] = 0;
        uint16_t check = (uint16_t)~tl_sum16(head, v->ip_hlen, 0);
        head[10] = (uint8_t)(check >> 8);
        head[11] = (uint8_t)check;
    }
    if (tl_run.psh) head[v->ip_hlen + 13] |= TL_TCP_PSH;
    if (v->proto == 17) { /* the joined datagram's length */
        head[v->ip_hlen + 4] = (uint8_t)((tl_run.total - v->ip_hlen) >> 8);
        head[v->ip_hlen + 5] = (uint8_t)(tl_run.total - v->ip_hlen);
    }
    tl_set_pseudo_sum(head, v, tl_run.total - v->ip_hlen);

    struct virtio_net_hdr h;
    tl_vnet_tcp_header(&h, v);
    h.gso_type = v->proto == 17 ? VIRTIO_NET_HDR_GSO_UDP_L4
                 : v->v6        ? VIRTIO_NET_HDR_GSO_TCPV6
                                : VIRTIO_NET_HDR_GSO_TCPV4;
    h.gso_size = (uint16_t)v->payload;
    struct iovec iov[TL_RUN_MAX + 2];
    iov[0] = (struct iovec){&h, sizeof h};
    iov[1] = (struct iovec){head, hlen};
    for (int i = 0; i < tl_run.n; i++)
        iov[i + 2] = (struct iovec){(void *)(tl_run.packet[i] + hlen), tl_run.len[i] - hlen};
    return tl_writev(fd, iov, tl_run.n + 2);
}

static unsigned tl_write_run(int fd)
{
    unsigned lost = 0;
    if (tl_run.n == 0) return 0;
    int udp = tl_run.view.proto == 17;
    if (tl_run.n > 1 && !(udp ? tl_uso_refused : tl_gso_refused)) {
        int err = tl_write_merged(fd);
        if (err == 0) {
            tl_vnet_stats.gso_writes++;
            if (udp) tl_vnet_stats.gso_udp_writes++;
            tl_vnet_stats.segments_coalesced += (uint64_t)(tl_run.n - 1);
            tl_release_run();
            return 0;
        }
        if (err != -EINVAL) {
            lost = (unsigned)tl_run.n;
            tl_release_run();
            return lost;
        }
        tl_vnet_stats.gso_refused++;
        if (udp) tl_uso_refused = 1; /* no UDP GSO from us: a datagram at a time */
        else tl_gso_refused = 1; /* this kernel does not take GSO from us: a packet at a time */
    }
    for (int i = 0; i < tl_run.n; i++) /* UDP: the checksums lwIP computed are whole */
        lost += tl_write_one(fd, tl_run.packet[i], tl_run.len[i], udp ? NULL : &tl_run.view);
    tl_release_run();
    return lost;
}

unsigned tl_vnet_output(int fd, struct pbuf *p, uint8_t *data, size_t len)
{
    struct tl_l4_view v;
    int tcp = tl_view_tcp(data, len, &v);
    if (tcp) tl_set_pseudo_sum(data, &v, len - v.ip_hlen); /* lwIP left it to the kernel */
    else if (len >= 20 && (data[0] >> 4 == 4 ? data[9] : len >= 40 ? data[6] : 0) == 6)
        return tl_write_run(fd) + 1; /* TCP we cannot mark (a fragment): its sum is missing */
    int udp = !tcp && tl_view_udp(data, len, &v);
    int holdable = (tcp || udp) && p != NULL && tl_holdable_segment(data, &v);
    if (holdable && tl_run.n > 0 && tl_continues_run(data, &v)) {
        tl_hold(p, data, len, &v);
        return 0;
    }
    unsigned lost = tl_write_run(fd);
    if (holdable && tl_batch_depth > 0) {
        tl_hold(p, data, len, &v);
        return lost;
    }
    return lost + tl_write_one(fd, data, len, tcp ? &v : NULL);
}

void tl_vnet_batch_begin(void) { tl_batch_depth++; }

unsigned tl_vnet_batch_end(int fd)
{
    if (tl_batch_depth > 0 && --tl_batch_depth > 0) return 0;
    return tl_write_run(fd);
}

int tl_vnet_held(void) { return tl_run.n; }

void tl_vnet_reset(void)
{
    tl_release_run();
    tl_batch_depth = 0;
    tl_gso_refused = 0;
    tl_uso_refused = 0;
}

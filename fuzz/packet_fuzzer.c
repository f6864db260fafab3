/*
 * libFuzzer harness for tunlwip's packet path: the C layer's input hooks (input.c,
 * transport_input.c), lwIP's IPv4/IPv6, TCP, UDP, ICMP and reassembly, and relay.c, under
 * AddressSanitizer and UBSan.
 *
 * The harness plays the embedder (what stack.py, tcp.py and relay.py do): the tl_py_*
 * callbacks only record events, as the real ones must (the C layer's invariant: no re-entry into
 * lwIP from a callback); between packets an "application step" chosen by the input reads,
 * writes, half-closes, closes or aborts a connection, hands it to a C relay over a socketpair,
 * releases a held SYN, answers a UDP datagram or a forwarded echo. Then time advances and the
 * timers run.
 *
 * Input format (see make_seeds.py, which writes seeds in it):
 *   byte 0: configuration (CFG_* bits below)
 *   then records: ctl(1) arg(1) len(2, big endian) packet(len; cut to what is left)
 *     ctl & 7   time step class (TIME_STEPS), ctl >> 3 the application step after the packet
 *     arg       the step's parameter, and the decisions the callbacks make for this packet
 *   ctl >> 3 of 29, 30 and 31 (no application step) instead shape the packet before it goes in:
 *     29 XT_CHAIN    an IPv6 packet behind a chain of 1-4 extension headers (build_chain)
 *     30 FRAG_TRAIN  the packet as a train of fragments that may name different protocols
 *     31 SEG         a TCP segment aimed at a connection's sequence space; a half-open limit
 *   the record's packet then starts with the shape's description (see shape_record).
 *
 * Echo mode 3 (reply, like 1) also gives the device a virtio-net header, as a TUN stack.py
 * opens: packets read by tl_input_fd carry one, and output goes to a socketpair through vnet.c
 * (TCP segments coalesced into GSO writes), where check_vnet_output reads and checks it.
 *
 * The harness is linked with the same C files as the module (build_ffi.OUR_SOURCES, which the
 * Makefile passes) and reaches the per-port catch-all PCB tables and the half-open list through
 * tl_internal.h: lwIP's state must be emptied after every input (otherwise listeners for every
 * port the fuzzer ever used pile up, every later packet walks them, and a crash would depend on
 * inputs run long before it). Randomness is made deterministic: the fuzz build compiles every
 * file with -Dgetrandom=fuzz_getrandom (Makefile), so clock.c draws from fuzz_getrandom below;
 * ISNs are 0, so an input can acknowledge the gateway's SYN-ACK (ack = 1) and reach ESTABLISHED.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/virtio_net.h>

#include "lwip/init.h"
#include "lwip/ip4_frag.h"
#include "lwip/ip6_frag.h"
#include "lwip/priv/tcp_priv.h"
#include "lwip/prot/ip4.h"
#include "lwip/prot/ip6.h"
#include "lwip/prot/tcp.h"
#include "lwip/prot/udp.h"

#include "tl_internal.h"

/* getrandom, as clock.c calls it in the fuzz build (the Makefile's -Dgetrandom=fuzz_getrandom) */
ssize_t fuzz_getrandom(void *buf, size_t len, unsigned int flags)
{
    (void)flags;
    memset(buf, 0, len); /* every ISN and LWIP_RAND() is 0: inputs replay exactly */
    return (ssize_t)len;
}

enum {
    CFG_MTU_MAX = 0x01,       /* MTU 65520 instead of 1500 */
    CFG_HOLD_SYNS = 0x02,     /* dial-before-accept: SYNs go to tl_py_syn first */
    CFG_CHECKSUMS = 0x04,     /* verify checksums (off by default so deep paths are reached) */
    CFG_ECHO_SHIFT = 3,       /* 2 bits: echo mode (3 = reply) */
    CFG_CLIENT_NETS = 0x20,   /* only 198.18.0.0/15 and fd00::/8 are clients */
    CFG_FD_BATCH = 0x40,      /* packets go in through tl_input_fd (relay write deferral) */
    CFG_UDP_BLOCK = 0x80,     /* UDP 443 rejected, UDP 80 dropped */
};

/* record kinds (ctl >> 3) that shape the packet instead of an application step */
enum { XT_CHAIN = 29, FRAG_TRAIN = 30, SEG = 31 };
#define DEFAULT_HALF_OPEN 1024 /* half_open.c's (tcp.max_half_open's) default */
#define MAX_CONNS 32
#define MAX_HELD 8
#define BATCH_MAX 16
static int batch_fd[2] = {-1, -1}; /* a packet device: one datagram per packet */
static int vnet_out[2] = {-1, -1}; /* the device's output side in vnet mode */
static int vnet_mode;
static const uint32_t TIME_STEPS[8] = {0, 10, 100, 250, 500, 1000, 3000, 12000};

struct conn {
    uintptr_t id;          /* 0: free slot */
    void *pcb;             /* NULL once lwIP freed it or we let go of it */
    void *relay;           /* the relay that took the connection over */
    int peer;              /* our end of the relay's socketpair (the "upstream server") */
    size_t unread;         /* bytes received and not yet acknowledged with tl_tcp_recved */
    int eof_in, eof_out, wrote;
    int abort_in_first_data;
};

static struct conn conns[MAX_CONNS];
static uintptr_t next_id;
static uint8_t decide;     /* the current record's arg: what callbacks decide */
static uint16_t cur_mtu;
static unsigned sink;      /* bytes summed so that ASan sees every byte handed to us read */
/* What the half-open count may reach: the limit, or the count when a SEG record lowered the
 * limit below it (lowering evicts nobody; each new half-open connection evicts down to it). */
static uint64_t half_open_bound;

struct held { size_t len; uint8_t *pkt; };
static struct held held[MAX_HELD];
static int held_n;

static tl_endpoint udp_src, udp_dst;   /* the last datagram's endpoints */
static int udp_seen;
static tl_endpoint echo_src, echo_dst; /* the last forwarded echo request */
static uint8_t echo_msg[65536];
static size_t echo_len;
static uint8_t wbuf[300 * 1024];       /* what we write to connections and relays */

static const uint8_t GW4[4] = {198, 18, 0, 1};
static const uint8_t GW6[16] = {0xfd, 0x00, 0x00, 0x18, [15] = 1};

static struct conn *by_id(uintptr_t id)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].id == id && id != 0) return &conns[i];
    return NULL;
}

static void touch(const uint8_t *data, size_t len)
{
    for (size_t i = 0; i < len; i++) sink += data[i];
}

static void free_conn(struct conn *c)
{
    if (c->peer >= 0) close(c->peer);
    memset(c, 0, sizeof *c);
    c->peer = -1;
}

/* ---- the embedder's callbacks (record only, never re-enter lwIP) ---------------------------- */

uintptr_t tl_py_accept(void *pcb)
{
    if ((decide & 0xE0) == 0xE0) return 0; /* connection limit reached: lwIP sends RST */
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i].id != 0) continue;
        tl_endpoint local, remote;
        tl_tcp_endpoints(pcb, &local, &remote);
        if (local.family != remote.family || local.port == 0 || remote.port == 0) abort();
        conns[i].id = ++next_id;
        conns[i].pcb = pcb;
        return conns[i].id;
    }
    return 0;
}

int tl_py_recv(uintptr_t id, const uint8_t *data, size_t len, int may_defer)
{
    struct conn *c = by_id(id);
    if (c == NULL || c->pcb == NULL) abort(); /* tcp_conn.c must not report for a released PCB */
    if (data == NULL) {
        c->eof_in = 1;
        return 1;
    }
    touch(data, len);
    /* tcp.py refuses while the stream holds its per-connection budget: lwIP keeps the data */
    if (may_defer && c->unread > 0 && (decide & 0x18) == 0x18) return 0;
    c->unread += len;
    return 1;
}

void tl_py_sent(uintptr_t id, uint32_t len)
{
    (void)len;
    if (by_id(id) == NULL) abort();
}

void tl_py_error(uintptr_t id, int err)
{
    (void)err;
    struct conn *c = by_id(id);
    if (c == NULL) abort();
    c->pcb = NULL; /* lwIP freed it */
    if (c->relay == NULL) free_conn(c);
}

void tl_py_output(const uint8_t *data, size_t len)
{
    touch(data, len);
    if (len < 20 || len > cur_mtu) abort(); /* lwIP fragments to the MTU */
    if (data[0] >> 4 == 4) {
        if (((size_t)data[2] << 8 | data[3]) != len) abort();
    } else if (data[0] >> 4 == 6) {
        if (len < 40 || ((size_t)data[4] << 8 | data[5]) + 40 != len) abort();
    } else {
        abort();
    }
}

int tl_py_syn(const uint8_t *packet, size_t len, const tl_endpoint *src, const tl_endpoint *dst)
{
    (void)src; (void)dst;
    touch(packet, len);
    if ((decide & 1) || held_n == MAX_HELD) return 0; /* not intercepted: lwIP answers at once */
    held[held_n].pkt = malloc(len);
    if (held[held_n].pkt == NULL) abort();
    memcpy(held[held_n].pkt, packet, len);
    held[held_n].len = len;
    held_n++;
    return 1;
}

int tl_py_udp(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *data, size_t len)
{
    touch(data, len);
    /* the hooks drop datagrams from or to port 0 and to multicast, broadcast or unspecified
     * addresses (behind an extension header they once reached this callback) */
    if (src->port == 0 || dst->port == 0 || src->family != dst->family) abort();
    if (dst->family == 4 ? (dst->addr[0] & 0xF0) == 0xE0 || memcmp(dst->addr, "\0\0\0\0", 4) == 0 ||
                               memcmp(dst->addr, "\xff\xff\xff\xff", 4) == 0
                         : dst->addr[0] == 0xff) abort();
    udp_src = *src;
    udp_dst = *dst;
    udp_seen = 1;
    return (decide & 2) == 0; /* sometimes nobody takes it (counted as unhandled) */
}

void tl_py_icmp_echo(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *msg,
                     size_t len)
{
    touch(msg, len);
    echo_src = *src;
    echo_dst = *dst;
    memcpy(echo_msg, msg, len);
    echo_len = len;
}

void tl_py_relay_done(uintptr_t id, int reason, uint64_t up, uint64_t down)
{
    (void)up; (void)down;
    struct conn *c = by_id(id);
    if (c == NULL || reason < 0 || reason > TL_RELAY_UPSTREAM_TIMEOUT) abort();
    free_conn(c);
}

void tl_py_relay_first_data(uintptr_t id, const uint8_t *data, size_t len)
{
    touch(data, len);
    struct conn *c = by_id(id);
    if (c == NULL) abort();
    /* relay.c supports a first-data callback that aborts the relay (Relay.abort from it). */
    if (c->abort_in_first_data && c->relay) tl_relay_abort(c->relay, TL_RELAY_STOPPED);
}

void tl_py_fd_ready(uintptr_t token)
{
    struct conn *c = by_id(token);
    if (c == NULL || c->peer < 0) return; /* gone earlier in the same poll round */
    uint8_t buf[4096];
    if (recv(c->peer, buf, sizeof buf, MSG_DONTWAIT) == 0) tl_watch_del(c->peer); /* EOF */
}

/* ---- application steps ------------------------------------------------------------------- */

static struct conn *pick(uint8_t arg)
{
    int n = 0;
    struct conn *live[MAX_CONNS];
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].id != 0) live[n++] = &conns[i];
    return n ? live[arg % n] : NULL;
}

/* tcp.py's _maybe_finish: both directions done and all read -> hand the PCB back to lwIP. */
static void maybe_finish(struct conn *c)
{
    if (c->pcb && c->eof_out && c->eof_in && c->unread == 0) {
        tl_tcp_close(c->pcb);
        free_conn(c);
    }
}

static void open_relay(struct conn *c, uint8_t arg)
{
    int sv[2];
    if (c->pcb == NULL || c->eof_out || c->wrote) return; /* only an untouched stream */
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) abort();
    /* small buffers so the upstream side fills up and backpressure paths run */
    int size = 4096;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    void *pcb = c->pcb;
    size_t pending = c->unread;
    c->pcb = NULL; /* the relay owns it now (tcp.py's _hand_over) */
    c->peer = sv[1];
    c->abort_in_first_data = (arg & 4) != 0;
    void *relay = NULL;
    int rc = tl_relay_open(pcb, sv[0], c->id, wbuf, pending, c->eof_in, arg & 2, &relay);
    if (rc != 0) { /* stack.py: close the socket, abort the connection */
        close(sv[0]);
        tl_tcp_abort(pcb);
        free_conn(c);
        return;
    }
    c = by_id(c->id); /* NULL if the relay ended (and was reported) already */
    if (c != NULL) c->relay = relay;
}

/* tcp.py's receive_some after a read: data lwIP kept for a full stream is offered again */
static void offer_deferred(struct conn *c)
{
    if (tl_tcp_offer_deferred(c->pcb) < 0) abort(); /* our callbacks never abort */
}

static void app_step(unsigned step, uint8_t arg)
{
    struct conn *c = pick(arg >> 3);
    switch (step) {
    case 8: /* read everything */
        if (c && c->pcb && c->unread) {
            tl_tcp_recved(c->pcb, c->unread);
            c->unread = 0;
            offer_deferred(c);
        }
        if (c) maybe_finish(c);
        break;
    case 9: /* read a little */
        if (c && c->pcb && c->unread) {
            size_t n = (size_t)(arg & 7) * 700 + 1;
            if (n > c->unread) n = c->unread;
            tl_tcp_recved(c->pcb, n);
            c->unread -= n;
            offer_deferred(c);
        }
        break;
    case 10: case 11: { /* write: a little, or up to more than the send buffer */
        if (!c || !c->pcb || c->eof_out) break;
        size_t n = step == 10 ? (size_t)(arg & 7) * 37 + 1 : (size_t)(arg & 7) * 40000 + 1000;
        int q = tl_tcp_write(c->pcb, wbuf, n);
        if (q > 0) c->wrote = 1;
        (void)tl_tcp_sndbuf(c->pcb);
        break;
    }
    case 12: /* send_eof */
        if (c && c->pcb && !c->eof_out) {
            c->eof_out = 1;
            tl_tcp_shutdown_tx(c->pcb);
            maybe_finish(c);
        }
        break;
    case 13: /* close (FIN, or RST with unread bytes) */
        if (c && c->pcb) {
            tl_tcp_close(c->pcb);
            free_conn(c);
        }
        break;
    case 14: /* abort */
        if (c && c->pcb) {
            tl_tcp_abort(c->pcb);
            free_conn(c);
        }
        break;
    case 15:
        if (c) open_relay(c, arg);
        break;
    case 16: /* the upstream sends */
        if (c && c->relay && c->peer >= 0) {
            /* up to more than lwIP's send buffer: backpressure towards the client */
            size_t len = (arg & 4) ? (size_t)(arg & 3) * 100000 + 1 : (size_t)(arg & 3) * 3000 + 1;
            ssize_t n = send(c->peer, wbuf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
            (void)n;
            tl_relay_poll(64);
        }
        break;
    case 17: /* the upstream half-closes */
        if (c && c->relay && c->peer >= 0) {
            shutdown(c->peer, SHUT_WR);
            tl_relay_poll(64);
        }
        break;
    case 18: /* the upstream goes away */
        if (c && c->relay && c->peer >= 0) {
            close(c->peer);
            c->peer = -1;
            tl_relay_poll(64);
        }
        break;
    case 19: /* the upstream reads what the relay wrote */
        if (c && c->relay && c->peer >= 0) {
            uint8_t buf[8192];
            while (recv(c->peer, buf, sizeof buf, MSG_DONTWAIT) > 0) {}
            tl_relay_poll(64);
        }
        break;
    case 20:
        if (c && c->relay) tl_relay_abort(c->relay, arg & 7);
        break;
    case 21:
        tl_relay_sweep((uint32_t)arg * 100);
        break;
    case 22: case 23: { /* a held SYN: released (upstream answered) or dropped */
        if (held_n == 0) break;
        int i = arg % held_n;
        struct held h = held[i];
        held[i] = held[--held_n];
        if (step == 22) tl_input_release(h.pkt, h.len);
        free(h.pkt);
        break;
    }
    case 24: /* answer the last UDP datagram, possibly too large for one packet */
        if (udp_seen) {
            size_t n = (arg & 0x80) ? 65536 - (size_t)(arg & 0x7F) * 8 : (size_t)arg * 23;
            tl_udp_send(&udp_dst, &udp_src, wbuf, n);
        }
        break;
    case 25: /* answer a forwarded echo request */
        if (echo_len >= 8) {
            echo_msg[0] = echo_src.family == 4 ? 0 : 129;
            tl_icmp_send(&echo_dst, &echo_src, echo_msg, echo_len);
        }
        break;
    case 26:
        if (c && c->relay) {
            tl_relay_stats st;
            tl_relay_info(c->relay, &st);
        }
        tl_relay_poll(64);
        break;
    case 27: /* UDP with mismatched or odd endpoints */
        if (udp_seen) {
            tl_endpoint s = udp_dst;
            s.family = (arg & 1) ? 4 : 6;
            s.port = arg & 2 ? 0 : s.port;
            tl_udp_send(&s, &udp_src, wbuf, arg);
        }
        break;
    case 28: /* a Python watcher on the upstream's socket (as UDP sessions use) */
        if (c && c->relay && c->peer >= 0) {
            if (tl_watch_add(c->peer, c->id, (int)(arg & 1)) != 0) tl_watch_del(c->peer);
            tl_relay_poll(64);
        }
        break;
    default:
        break;
    }
}

/* ---- driving ----------------------------------------------------------------------------- */

static uint32_t ones_sum(const uint8_t *p, size_t len, uint32_t sum)
{
    for (size_t i = 0; i + 1 < len; i += 2) sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (len & 1) sum += (uint32_t)p[len - 1] << 8;
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    return sum;
}

/* Complete a partial TCP checksum as the kernel does (the field holds the pseudo-header's
 * sum; store the complement of the sum from csum_start on), then verify the segment the way a
 * receiver would: pseudo header and segment must sum to 0xFFFF. */
static int partial_checksum_completes(uint8_t *pkt, size_t len, unsigned ip_hlen, int v6)
{
    uint8_t *tcp = pkt + ip_hlen;
    size_t tcp_len = len - ip_hlen;
    uint16_t check = (uint16_t)~ones_sum(tcp, tcp_len, 0);
    tcp[16] = (uint8_t)(check >> 8);
    tcp[17] = (uint8_t)check;
    uint32_t pseudo = v6 ? ones_sum(pkt + 8, 32, 6 + (uint32_t)tcp_len)
                         : ones_sum(pkt + 12, 8, 6 + (uint32_t)tcp_len);
    return ones_sum(tcp, tcp_len, pseudo) == 0xFFFF;
}

/* What vnet.c wrote: a header the kernel would take, then one packet as lwIP sends them (no
 * GSO) or a TCP packet of several whole segments (GSO); every TCP packet's checksum is left
 * partial and completes to a valid one; IPv4 header checksums hold. Nothing may be held
 * between steps, and a socket pair never refuses GSO. */
static void check_vnet_output(void)
{
    static uint8_t buf[TL_VNET_HDR_LEN + 65536];
    if (tl_vnet_held() != 0 || tl_vnet_stats.gso_refused != 0) abort();
    if (!vnet_mode) return;
    for (;;) {
        ssize_t n = recv(vnet_out[1], buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0) return;
        struct virtio_net_hdr h;
        if (n < TL_VNET_HDR_LEN + 20) abort();
        memcpy(&h, buf, sizeof h);
        uint8_t *pkt = buf + TL_VNET_HDR_LEN;
        size_t len = (size_t)n - TL_VNET_HDR_LEN;
        touch(pkt, len);
        int v6 = pkt[0] >> 4 == 6;
        size_t ip_len = v6 ? ((size_t)pkt[4] << 8 | pkt[5]) + 40 : (size_t)pkt[2] << 8 | pkt[3];
        if (ip_len != len || (!v6 && pkt[0] >> 4 != 4)) abort();
        unsigned ip_hlen = v6 ? 40 : (pkt[0] & 15u) * 4;
        if (!v6 && ones_sum(pkt, ip_hlen, 0) != 0xFFFF) abort();
        int tcp = (v6 ? pkt[6] : pkt[9]) == 6;
        if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
            if (h.csum_start != ip_hlen || h.csum_offset != 16 || len < ip_hlen + 20) abort();
            if (!tcp) abort(); /* only TCP's checksum is left partial */
            if (h.hdr_len != ip_hlen + (pkt[ip_hlen + 12] >> 4) * 4u || h.hdr_len > len) abort();
            if (!partial_checksum_completes(pkt, len, ip_hlen, v6)) abort();
        } else if (h.flags != 0 || tcp) {
            abort(); /* lwIP computed no TCP checksum: vnet.c must have marked it partial */
        }
        if (h.gso_type == VIRTIO_NET_HDR_GSO_NONE) {
            if (h.gso_size != 0 || len > cur_mtu) abort(); /* lwIP fragments to the MTU */
            continue;
        }
        if (h.gso_type != (v6 ? VIRTIO_NET_HDR_GSO_TCPV6 : VIRTIO_NET_HDR_GSO_TCPV4)) abort();
        if (!(h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || h.gso_size == 0) abort();
        if (h.hdr_len + h.gso_size > cur_mtu || len - h.hdr_len <= h.gso_size) abort();
        if ((pkt[ip_hlen + 13] & ~0x08) != 0x10) abort(); /* data: ACK, maybe PSH, no more */
    }
}

static void advance(uint32_t ms)
{
    /* in timer-task steps (stack.py runs timers at most 250 ms apart) */
    while (ms > 0) {
        uint32_t step = ms > 250 ? 250 : ms;
        tl_set_now(tl_now() + step);
        ms -= step;
        tl_check_timeouts();
    }
    if (tl_sleeptime() == 0) tl_check_timeouts();
}

static void setup(uint8_t cfg)
{
    cur_mtu = (cfg & CFG_MTU_MAX) ? 65520 : 1500;
    if (tl_init(cur_mtu, GW4, GW6) != 0) abort();
    tl_set_checksum_check((cfg & CFG_CHECKSUMS) != 0);
    tl_set_hold_syns((cfg & CFG_HOLD_SYNS) != 0);
    tl_set_max_half_open(DEFAULT_HALF_OPEN); /* a SEG record may lower it */
    half_open_bound = DEFAULT_HALF_OPEN;
    /* loopback and link-local destinations: dropped at MTU 1500, forwarded at 65520 */
    tl_set_forward_local((cfg & CFG_MTU_MAX) != 0);
    int echo = (cfg >> CFG_ECHO_SHIFT) & 3;
    tl_set_icmp_echo_mode(echo == 3 ? TL_ECHO_REPLY : echo);
    vnet_mode = echo == 3;
    if (vnet_mode) {
        tl_set_vnet_hdr(1);
        tl_set_output_fd(vnet_out[0]);
    }
    if (cfg & CFG_CLIENT_NETS) {
        tl_endpoint nets[2] = {{.family = 4, .addr = {198, 18}}, {.family = 6, .addr = {0xfd}}};
        uint8_t prefixes[2] = {15, 8};
        if (tl_set_client_networks(nets, prefixes, 2) != 0) abort();
    }
    if (cfg & CFG_UDP_BLOCK) {
        tl_set_udp_port_action(443, TL_UDP_REJECT);
        tl_set_udp_port_action(80, TL_UDP_DROP);
    }
    /* keepalive on, as the gateway runs by default, but short: inputs that wait see probes
     * sent and connections given up on (relays ended by TL_RELAY_CLIENT_TIMEOUT) */
    tl_set_tcp_keepalive(1000, 1000, 2);
}

/* Empty lwIP and our tables so the next input starts from the same state. */
static int verbose; /* FUZZ_VERBOSE=1: print what each input reached (checking seeds) */

static void report(void)
{
    const tl_counters *k = tl_get_counters();
    const tl_relay_counters *r = tl_relay_get_counters();
    fprintf(stderr, "in=%lu out=%lu tcp=%lu udp=%lu other=%lu frags=%lu reass=%lu held=%lu "
            "released=%lu accepted=%lu echo=%lu/%lu/%lu relays=%lu "
            "ended=%lu,%lu,%lu,%lu,%lu,%lu,%lu,%lu "
            "drops(hdr=%lu tr=%lu cks=%lu ext=%lu fproto=%lu unsup=%lu port0=%lu addr=%lu) "
            "half-open evicted=%lu gso=%lu+%lu\n",
            k->packets_in, k->packets_out, k->tcp_in, k->udp_in, k->other_in, k->fragments_in,
            k->datagrams_reassembled, k->syn_held, k->syn_released, (unsigned long)next_id,
            k->icmp_echo_in, k->icmp_echo_replied, k->icmp_echo_forwarded, r->opened,
            r->ended[0], r->ended[1], r->ended[2], r->ended[3], r->ended[4], r->ended[5],
            r->ended[6], r->ended[7],
            k->drop_ip_header, k->drop_transport_header, k->drop_transport_checksum,
            k->drop_ip6_extension, k->drop_fragment_protocol, k->drop_unsupported,
            k->drop_port_zero, k->drop_bad_address, k->tcp_half_open_evicted, k->output_writes,
            k->output_gso_writes);
}

static void teardown(void)
{
    if (verbose) report();
    tl_relay_abort_all(); /* reports every relay done: their slots are freed */
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i].id == 0) continue;
        if (conns[i].pcb) tl_tcp_abort(conns[i].pcb);
        free_conn(&conns[i]);
    }
    for (int i = 0; i < held_n; i++) free(held[i].pkt);
    held_n = 0;
    next_id = 0;
    /* age out reassembly (its ICMP time-exceeded still goes out through the netif) */
    for (int i = 0; i <= IP_REASS_MAXAGE; i++) ip_reass_tmr();
    for (int i = 0; i <= IPV6_REASS_MAXAGE; i++) ip6_reass_tmr();
    tl_deinit(); /* aborts what lwIP still holds (closing, TIME-WAIT), removes the netif */
    while (tcp_listen_pcbs.listen_pcbs) {
        struct tcp_pcb_listen *l = tcp_listen_pcbs.listen_pcbs;
        tl_listeners[l->local_port] = NULL;
        tcp_close((struct tcp_pcb *)l);
    }
    while (udp_pcbs) {
        tl_udp_pcbs[udp_pcbs->local_port] = NULL;
        udp_remove(udp_pcbs);
    }
    tl_stats.listeners = tl_stats.udp_ports = 0;
    /* nothing may survive an input: a PCB or relay left here would be a leak in the gateway */
    if (tcp_active_pcbs || tcp_tw_pcbs || tcp_bound_pcbs || tl_relay_count() != 0) abort();
    /* and the half-open list saw every PCB it tracked go */
    if (tl_stats.tcp_half_open != 0 || tl_half_open_oldest || tl_half_open_newest) abort();
    check_vnet_output(); /* and the resets tl_deinit sent */
    vnet_mode = 0;
    tl_reset_counters();
    tl_relay_reset_counters();
    udp_seen = 0;
    echo_len = 0;
    /* the next input starts on a whole second: timers fire at the same offsets every time */
    tl_set_now((tl_now() / 1000 + 3) * 1000);
    tl_check_timeouts();
}


/* The device's queued packets: read by tl_input_fd, or by the poll set (stack.py's fast path,
 * where one tl_relay_poll serves the device and the relays). */
static void drain_batch(int via_poll)
{
    if (!via_poll) {
        tl_input_fd(batch_fd[1], 64);
        return;
    }
    if (tl_poll_set_input(batch_fd[1]) != 0) abort();
    tl_relay_poll(256);
    tl_poll_set_input(-1);
    tl_input_fd(batch_fd[1], 64); /* whatever one poll round left */
}

/* Hand one packet to the stack: at once, or queued on the packet device for a tl_input_fd
 * batch (drained when full or when `flush` says the record ends one). */
static int batch, queued;

static void feed(const uint8_t *pkt, size_t len, uint8_t arg, int flush)
{
    if (!batch) {
        tl_input(pkt, len);
        return;
    }
    /* several packets read by tl_input_fd in one batch, as from the TUN fd */
    static const uint8_t no_gso[TL_VNET_HDR_LEN];
    struct iovec iov[2] = {{(void *)no_gso, vnet_mode ? sizeof no_gso : 0}, {(void *)pkt, len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    if (sendmsg(batch_fd[0], &msg, MSG_DONTWAIT) == (ssize_t)(iov[0].iov_len + len)) queued++;
    if (queued == BATCH_MAX || flush) {
        drain_batch(arg & 0x40);
        queued = 0;
    }
}

/* After every record: no segment reached tcp_input/udp_input except through the hooks'
 * checks (transport_input.c counts one that did as drop_unchecked: that is a bypass, a
 * finding), the half-open count stays within its bound and never grows above the limit, and no
 * connection's MSS is below the floor half_open.c sets at passive open (a later SYN must not
 * lower it). */
static void check_input_checked(void)
{
    if (tl_stats.drop_unchecked != 0) abort();
    if (tl_stats.tcp_half_open > half_open_bound) abort();
    for (struct tcp_pcb *c = tcp_active_pcbs; c; c = c->next)
        if (c->mss < tcp_eff_send_mss(TL_MIN_MSS, &c->local_ip, &c->remote_ip)) abort();
    half_open_bound = tl_stats.tcp_half_open > tl_max_half_open ? tl_stats.tcp_half_open
                                                                : tl_max_half_open;
}

/* ---- shaped records (ctl >> 3 of 29 to 31) ------------------------------------------------ */

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

static void shape_record(unsigned kind, const uint8_t *in, size_t len, uint8_t arg)
{
    if (kind == XT_CHAIN) {
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

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    verbose = getenv("FUZZ_VERBOSE") != NULL;
    signal(SIGPIPE, SIG_IGN); /* as in the Python process that embeds the C layer */
    for (int i = 0; i < MAX_CONNS; i++) conns[i].peer = -1;
    for (size_t i = 0; i < sizeof wbuf; i++) wbuf[i] = (uint8_t)(i * 7 + 1);
    /* the packet device of tl_input_fd: one datagram per packet, like a TUN fd */
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, batch_fd) != 0 ||
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, vnet_out) != 0)
        abort();
    int size = 4 << 20;
    setsockopt(batch_fd[0], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    setsockopt(batch_fd[1], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(vnet_out[0], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    setsockopt(vnet_out[1], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    tl_set_now(1000);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    uint8_t cfg = data[0];
    size_t off = 1;
    setup(cfg);
    batch = (cfg & CFG_FD_BATCH) != 0;
    queued = 0;
    while (off + 4 <= size) {
        uint8_t ctl = data[off], arg = data[off + 1];
        size_t len = (size_t)data[off + 2] << 8 | data[off + 3];
        off += 4;
        if (len > size - off) len = size - off;
        decide = arg;
        unsigned step = ctl >> 3;
        if (step >= XT_CHAIN) {
            shape_record(step, data + off, len, arg);
            if (queued) drain_batch(arg & 0x40);
            queued = 0;
        } else if (len > 0) {
            feed(data + off, len, arg, step >= 8 || off + len + 4 > size);
        }
        off += len;
        advance(TIME_STEPS[ctl & 7]);
        app_step(step, arg);
        check_vnet_output();
        check_input_checked();
    }
    if (queued) drain_batch(0);
    check_vnet_output();
    check_input_checked();
    teardown();
    return 0;
}

/*
 * libFuzzer harness for tunlwip's packet path: glue.c's input hooks, lwIP's IPv4/IPv6, TCP,
 * UDP, ICMP and reassembly, and relay.c, under AddressSanitizer and UBSan.
 *
 * The harness plays the embedder (what stack.py, tcp.py and relay.py do): the tl_py_*
 * callbacks only record events, as the real ones must (glue.c's invariant: no re-entry into
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
 *
 * Echo mode 3 (reply, like 1) also gives the device a virtio-net header, as a TUN stack.py
 * opens: packets read by tl_input_fd carry one, and output goes to a socketpair through vnet.c
 * (TCP segments coalesced into GSO writes), where check_vnet_output reads and checks it.
 *
 * glue.c is included rather than linked so the harness can reach its per-port catch-all PCB
 * tables: lwIP's state must be emptied after every input (otherwise listeners for every port
 * the fuzzer ever used pile up, every later packet walks them, and a crash would depend on
 * inputs run long before it). Its randomness is made deterministic the same way: ISNs are 0,
 * so an input can acknowledge the gateway's SYN-ACK (ack = 1) and reach ESTABLISHED.
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

static ssize_t fuzz_getrandom(void *buf, size_t len, unsigned int flags)
{
    (void)flags;
    memset(buf, 0, len); /* every ISN and LWIP_RAND() is 0: inputs replay exactly */
    return (ssize_t)len;
}
#define getrandom fuzz_getrandom
#include "glue.c"
#undef getrandom

#include "lwip/ip4_frag.h"
#include "lwip/ip6_frag.h"

enum {
    CFG_MTU_MAX = 0x01,       /* MTU 65520 instead of 1500 */
    CFG_HOLD_SYNS = 0x02,     /* dial-before-accept: SYNs go to tl_py_syn first */
    CFG_CHECKSUMS = 0x04,     /* verify checksums (off by default so deep paths are reached) */
    CFG_ECHO_SHIFT = 3,       /* 2 bits: echo mode (3 = reply) */
    CFG_CLIENT_NETS = 0x20,   /* only 198.18.0.0/15 and fd00::/8 are clients */
    CFG_FD_BATCH = 0x40,      /* packets go in through tl_input_fd (relay write deferral) */
    CFG_UDP_BLOCK = 0x80,     /* UDP 443 rejected, UDP 80 dropped */
};

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
    if (c == NULL || c->pcb == NULL) abort(); /* glue.c must not report for a released PCB */
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
            "ended=%lu,%lu,%lu,%lu,%lu,%lu,%lu,%lu drops(hdr=%lu tr=%lu cks=%lu) gso=%lu+%lu\n",
            k->packets_in, k->packets_out, k->tcp_in, k->udp_in, k->other_in, k->fragments_in,
            k->datagrams_reassembled, k->syn_held, k->syn_released, (unsigned long)next_id,
            k->icmp_echo_in, k->icmp_echo_replied, k->icmp_echo_forwarded, r->opened,
            r->ended[0], r->ended[1], r->ended[2], r->ended[3], r->ended[4], r->ended[5],
            r->ended[6], r->ended[7],
            k->drop_ip_header, k->drop_transport_header, k->drop_transport_checksum,
            k->output_writes, k->output_gso_writes);
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

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    verbose = getenv("FUZZ_VERBOSE") != NULL;
    signal(SIGPIPE, SIG_IGN); /* as in the Python process that embeds glue.c */
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
    int queued = 0;
    while (off + 4 <= size) {
        uint8_t ctl = data[off], arg = data[off + 1];
        size_t len = (size_t)data[off + 2] << 8 | data[off + 3];
        off += 4;
        if (len > size - off) len = size - off;
        decide = arg;
        if (len > 0) {
            if (cfg & CFG_FD_BATCH) {
                /* several packets read by tl_input_fd in one batch, as from the TUN fd */
                static const uint8_t no_gso[TL_VNET_HDR_LEN];
                struct iovec iov[2] = {{(void *)no_gso, vnet_mode ? sizeof no_gso : 0},
                                       {(void *)(data + off), len}};
                struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
                if (sendmsg(batch_fd[0], &msg, MSG_DONTWAIT) == (ssize_t)(iov[0].iov_len + len))
                    queued++;
                if (queued == BATCH_MAX || (ctl >> 3) >= 8 || off + len + 4 > size) {
                    drain_batch(arg & 0x40);
                    queued = 0;
                }
            } else {
                tl_input(data + off, len);
            }
        }
        off += len;
        advance(TIME_STEPS[ctl & 7]);
        app_step(ctl >> 3, arg);
        check_vnet_output();
    }
    if (queued) drain_batch(0);
    check_vnet_output();
    teardown();
    return 0;
}

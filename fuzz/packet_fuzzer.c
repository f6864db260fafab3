/*
 * libFuzzer harness for tunlwip's packet path: the C layer's input hooks (input.c,
 * transport_input.c), lwIP's IPv4/IPv6, TCP, UDP, ICMP and reassembly, relay.c and udp_relay.c
 * (a UDP flow's session relayed in C, opened from tl_py_udp when the record's arg says so), under
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
 *   and ctl >> 3 of 7 (VNET) puts the packet behind a virtio-net header (offloaded input,
 *   vnet_input.c) that describes it, then makes one field hostile.
 *   the record's packet then starts with the shape's description (see shape_record in
 *   packet_shapes.c).
 *
 * Echo mode 3 (reply, like 1) also gives the device a virtio-net header, as a TUN stack.py
 * opens: packets read by tl_input_fd carry one, and output goes to a socketpair through vnet.c
 * (TCP segments coalesced into GSO writes), where check_vnet_output reads and checks it.
 *
 * This file is the driver: configuration, the application steps, setup and teardown around
 * each input, feeding packets in, and the libFuzzer entry points; it defines the state the
 * other files share. The callbacks and the checks are in packet_checks.c, the shaped records
 * in packet_shapes.c; harness.h is what crosses.
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

#include "harness.h"

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

#define DEFAULT_HALF_OPEN 1024 /* half_open.c's (tcp.max_half_open's) default */
#define BATCH_MAX 16
static int batch_fd[2] = {-1, -1}; /* a packet device: one datagram per packet */
int vnet_out[2] = {-1, -1};        /* the device's output side in vnet mode */
int vnet_mode;
static const uint32_t TIME_STEPS[8] = {0, 10, 100, 250, 500, 1000, 3000, 12000};

struct conn conns[MAX_CONNS];
uintptr_t next_id;
uint8_t decide;  /* the current record's arg: what callbacks decide */
uint16_t cur_mtu;
unsigned sink;   /* bytes summed so that ASan sees every byte handed to us read */
/* What the half-open count may reach: the limit, or the count when a SEG record lowered the
 * limit below it (lowering evicts nobody; each new half-open connection evicts down to it). */
uint64_t half_open_bound;

struct held held[MAX_HELD];
int held_n;

tl_endpoint udp_src, udp_dst;          /* the last datagram's endpoints */
int udp_seen;
tl_endpoint echo_src, echo_dst;        /* the last forwarded echo request */
uint8_t echo_msg[65536];
size_t echo_len;
static uint8_t wbuf[300 * 1024];       /* what we write to connections and relays */

const uint8_t GW4[4] = {198, 18, 0, 1};
const uint8_t GW6[16] = {0xfd, 0x00, 0x00, 0x18, [15] = 1};

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
        if (udp_seen && (arg & 0xC0) == 0x40) {
            /* a burst in one output batch (a relay's pass): same-size datagrams, then a shorter
             * one, may leave as one USO write (vnet.c) */
            size_t n = (size_t)(arg & 0x3F) * 23 + 1;
            tl_output_batch_begin();
            for (unsigned i = 0; i < (arg & 7u) + 2; i++)
                tl_udp_send(&udp_dst, &udp_src, wbuf + i, i == (arg & 7u) + 1 ? n / 2 : n);
            tl_output_batch_end();
        } else if (udp_seen) {
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
        udp_session_step(arg); /* a UDP session relayed in C, if any */
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
    tl_dial_expire();
}

static void setup(uint8_t cfg)
{
    cur_mtu = (cfg & CFG_MTU_MAX) ? 65520 : 1500;
    if (tl_init(cur_mtu, GW4, GW6) != 0) abort();
    tl_set_checksum_check((cfg & CFG_CHECKSUMS) != 0);
    tl_set_hold_syns((cfg & CFG_HOLD_SYNS) != 0);
    if (cfg & CFG_HOLD_SYNS) { /* and dials in C, to socketpairs (packet_checks.c) */
        tl_dial_connector = fuzz_dial_connector;
        tl_dial_configure(1, TL_PROTECT_NONE, 0, NULL, 0, 0, 0, 3000, 1000);
        tl_dial_set_proxy_timeout(2000); /* a SOCKS5 dial's connect and handshake */
        if (cfg & CFG_CLIENT_NETS) { /* and admission in C, with limits a few SYNs reach */
            static const uint16_t python_ports[] = {53, 853};
            tl_admit_configure(1, 8, 4, 4, 2, python_ports, 2);
        }
    }
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

static int verbose; /* FUZZ_VERBOSE=1: print what each input reached (checking seeds) */

static void report(void)
{
    const tl_counters *k = tl_get_counters();
    const tl_relay_counters *r = tl_relay_get_counters();
    fprintf(stderr, "in=%lu out=%lu tcp=%lu udp=%lu other=%lu frags=%lu reass=%lu held=%lu "
            "released=%lu accepted=%lu echo=%lu/%lu/%lu relays=%lu "
            "ended=%lu,%lu,%lu,%lu,%lu,%lu,%lu,%lu "
            "drops(hdr=%lu tr=%lu cks=%lu ext=%lu fproto=%lu unsup=%lu port0=%lu addr=%lu) "
            "half-open evicted=%lu gso=%lu+%lu offloaded=%lu,%lu/%lu vnet-drops=%lu\n",
            k->packets_in, k->packets_out, k->tcp_in, k->udp_in, k->other_in, k->fragments_in,
            k->datagrams_reassembled, k->syn_held, k->syn_released, (unsigned long)next_id,
            k->icmp_echo_in, k->icmp_echo_replied, k->icmp_echo_forwarded, r->opened,
            r->ended[0], r->ended[1], r->ended[2], r->ended[3], r->ended[4], r->ended[5],
            r->ended[6], r->ended[7],
            k->drop_ip_header, k->drop_transport_header, k->drop_transport_checksum,
            k->drop_ip6_extension, k->drop_fragment_protocol, k->drop_unsupported,
            k->drop_port_zero, k->drop_bad_address, k->tcp_half_open_evicted, k->output_writes,
            k->output_gso_writes, k->input_gso_tcp, k->input_gso_udp,
            k->input_gso_udp_datagrams, k->drop_vnet_header);
    const tl_dial_counters *d = tl_dial_get_counters();
    fprintf(stderr, "c dials=%lu swallowed=%lu loops=%lu dialing=%lu connected=%lu relays=%lu "
            "flows kept alone (whole run)=%lu\n", d->started, d->swallowed, d->loops, d->dialing,
            d->connected, d->relayed, (unsigned long)fuzz_flows_alone);
    const tl_udp_relay_counters *u = tl_udp_relay_get_counters();
    fprintf(stderr, "udp relays=%lu up=%lu down=%lu socks5 malformed=%lu fragments=%lu "
            "foreign=%lu\n", (unsigned long)u->opened, (unsigned long)u->datagrams_up,
            (unsigned long)u->datagrams_down, (unsigned long)u->socks5_malformed,
            (unsigned long)u->socks5_fragments, (unsigned long)u->socks5_foreign);
    fprintf(stderr, "socks5 dials=%lu connected=%lu dialing=%lu failed by reason:",
            d->socks5_started, d->socks5_connected, d->proxied);
    for (int i = 0; i < TL_SOCKS5_REASONS; i++)
        if (d->socks5_failures[i]) fprintf(stderr, " %d:%lu", i, d->socks5_failures[i]);
    fprintf(stderr, "\n");
}

/* Empty lwIP and our tables so the next input starts from the same state. */
static void teardown(void)
{
    if (verbose) report();
    tl_relay_abort_all(); /* reports every relay done: their slots are freed */
    udp_sessions_teardown(); /* before tl_deinit: sessions send through lwIP */
    fuzz_dial_teardown();
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

void feed(const uint8_t *pkt, size_t len, uint8_t arg, int flush)
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

/* A read with its own virtio-net header: queued on the packet device if it has the header
 * (vnet mode, batched), else straight into vnet_input.c as tl_input_fd would hand it. */
void feed_with_header(const uint8_t *buf, size_t len, uint8_t arg)
{
    if (!(batch && vnet_mode)) {
        tl_vnet_input((uint8_t *)buf, len);
        return;
    }
    if (send(batch_fd[0], buf, len, MSG_DONTWAIT) == (ssize_t)len) queued++;
    drain_batch(arg & 0x40);
    queued = 0;
}

/* After every record: no segment reached tcp_input/udp_input except through the hooks'
 * checks (transport_input.c counts one that did as drop_unchecked: that is a bypass, a
 * finding), the half-open count stays within its bound and never grows above the limit, and no
 * connection's MSS is below the floor half_open.c sets at passive open (a later SYN must not
 * lower it). */

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
        if (step == PROXY) {
            fuzz_proxy_answer(data + off, len, arg); /* not a packet: a proxy's answer */
        } else if (step >= XT_CHAIN || step == VNET) {
            if (step == VNET && queued) drain_batch(arg & 0x40); /* aim at what came before */
            queued = 0;
            shape_record(step, data + off, len, arg);
            if (queued) drain_batch(arg & 0x40);
            queued = 0;
        } else if (len > 0) {
            feed(data + off, len, arg, step >= 8 || off + len + 4 > size);
        }
        off += len;
        advance(TIME_STEPS[ctl & 7]);
        app_step(step, arg);
        fuzz_dial_events();
        check_vnet_output();
        check_input_checked();
    }
    if (queued) drain_batch(0);
    check_vnet_output();
    check_input_checked();
    teardown();
    return 0;
}

/*
 * UDP session relays: the default UDP forwarder's datagrams moved in C, both ways, batched.
 *
 * Theory of operation
 * -------------------
 * Python decides a new UDP session (admission, limits, shares, the protected socket from the
 * Dialer, the flow record) and hands the connected upstream socket's fd and the session's two
 * endpoints to tl_udp_relay_open. From then on no Python runs per datagram:
 *  - client -> upstream: udp_icmp.c's receive callback looks the (client, target) pair up in
 *    a hash table (tl_udp_relay_take). Inside an input batch (tl_udp_relay_defer_begin/end,
 *    around tl_input_fd's reads) the datagram's pbuf is kept and queued; the end of the batch
 *    sends each session's run of queued datagrams with one sendmmsg. Outside a batch it is sent
 *    at once. A full socket buffer drops the rest of the run, counted, as a router would.
 *  - upstream -> client: the socket sits in the poll set (a struct beginning with a
 *    tl_poll_entry of kind TL_POLL_UDP_RELAY); when readable, recvmmsg takes up to
 *    TL_UDP_RECV_BATCH datagrams and each goes to the client through lwIP's UDP output from the
 *    target's address (inside the poll pass's output batch, so the device may coalesce them).
 *  - A port unreachable from upstream (ECONNREFUSED on the connected socket, on receive or on
 *    send) is mirrored to the client as ICMP port/destination unreachable quoting the flow's
 *    IP and UDP headers, so the client's connected socket fails as on a direct path.
 *  - Activity: every datagram stamps the session (last_active) and puts it on the "touched"
 *    list; Python collects that list (tl_udp_relay_touched) when it sweeps for idle sessions,
 *    chooses a session to evict, or reports statistics. So idle timeouts, eviction of the least
 *    recently active session, reconfiguration and flow byte counts stay in Python's one session
 *    table, at a cost per active session per sweep, not per datagram.
 *  - Through a SOCKS5 proxy (tl_udp_relay_set_socks5, right after open): the socket is
 *    connected to the proxy's UDP relay, each datagram up gets the session's fixed SOCKS5 UDP
 *    header as its first iovec (no copy), and each datagram down must carry a header naming
 *    the target (socks5_udp.c), which is stripped; a malformed header, a fragment or another
 *    source is dropped and counted. A port unreachable from the relay is counted, not
 *    mirrored: the proxy's relay port closed, which says nothing of the target's port.
 *  - A session ends only when Python closes it (tl_udp_relay_close: idle, evicted, stopped),
 *    which returns its final counts. Python owns the socket and closes it afterwards.
 *
 * Invariants: single-threaded (the trio thread); a session is freed by tl_udp_relay_close
 * (never by C itself), after its queued datagrams are sent, so no queue entry or poll event
 * outlives it... except an event already returned by the current epoll_wait: a session closed
 * inside a poll round (by a Python callback, e.g. an eviction for a new session) waits on a
 * graveyard until tl_udp_relay_bury at the end of that round, as relay.c's do; one closed
 * outside a round (sweeps, stop) is freed at once, as no event array exists then.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sendmmsg, recvmmsg */
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "lwip/inet_chksum.h"
#include "lwip/sys.h"

#include "tl_internal.h"

#define TL_UDP_QUEUE 128       /* client datagrams queued in one input batch */
#define TL_UDP_QUEUE_IOV 512   /* their pieces (a reassembled datagram is a pbuf chain) */
#define TL_UDP_RECV_BATCH 64   /* upstream datagrams per recvmmsg */
#define TL_UDP_MAX_DATAGRAM 65535
/* The upstream socket's receive buffer: room for a burst while the gateway is not scheduled
 * (the default, about 200 KiB, is 5 ms at 300 Mbit/s). Only queued bytes are charged, and the
 * kernel's udp_mem bounds them all together. */
#define TL_UDP_RCVBUF (2 << 20)

struct tl_udp_relay {
    struct tl_poll_entry entry; /* first: the poll set's pointer (kind TL_POLL_UDP_RELAY) */
    int fd;
    uintptr_t token;
    tl_endpoint key[2];         /* client, target: the lookup key (padding zeroed) */
    ip_addr_t client_ip, target_ip;
    tl_udp_relay_stats stats;   /* token, counts; idle_ms filled when asked */
    uint8_t *socks5;            /* the SOCKS5 UDP header sent before each datagram, or NULL */
    u16_t socks5_len;
    u8_t socks5_any_address;    /* the target went by name: replies from any address */
    u32_t last_active;
    u8_t closed;
    struct tl_udp_relay *hash_next;
    struct tl_udp_relay *touched_prev, *touched_next; /* on tl_touched while touched_in */
    u8_t touched_in;
    struct tl_udp_relay *prev, *next;                   /* every open session */
};

static struct tl_udp_relay **tl_buckets;
static u32_t tl_bucket_mask; /* buckets - 1 (a power of two), 0 before the first session */
static u32_t tl_hash_seed;
static u32_t tl_udp_relay_n;
static struct tl_udp_relay *tl_udp_relays;
static struct tl_udp_relay *tl_touched;
static struct tl_udp_relay *tl_udp_graveyard; /* closed, linked by hash_next, until bury */
static tl_udp_relay_counters tl_ustats;

/* ---- the table ---------------------------------------------------------------------------- */

/* FNV-1a over the key, seeded at random: a client choosing its ports cannot pile its sessions
 * into one bucket on purpose. */
/* A flow's lookup key, field by field over zeroed memory: keys are hashed and compared with
 * memcmp, so the padding byte must be zero, which neither a struct copy nor the endpoints
 * lwIP's callback hands over promise. */
static void tl_make_key(tl_endpoint key[2], const tl_endpoint *client, const tl_endpoint *target)
{
    memset(key, 0, 2 * sizeof *key);
    key[0].family = client->family;
    key[1].family = target->family;
    memcpy(key[0].addr, client->addr, 16);
    memcpy(key[1].addr, target->addr, 16);
    key[0].port = client->port;
    key[1].port = target->port;
}

static u32_t tl_key_hash(const tl_endpoint key[2])
{
    const uint8_t *b = (const uint8_t *)key;
    u32_t h = 2166136261u ^ tl_hash_seed;
    for (size_t i = 0; i < 2 * sizeof(tl_endpoint); i++) h = (h ^ b[i]) * 16777619u;
    return h ^ (h >> 16);
}

static int tl_table_grow(void)
{
    u32_t size = tl_bucket_mask ? (tl_bucket_mask + 1) * 2 : 256;
    struct tl_udp_relay **b = calloc(size, sizeof *b);
    if (b == NULL) return -1;
    if (tl_bucket_mask == 0) tl_hash_seed = tl_random32();
    for (struct tl_udp_relay *r = tl_udp_relays; r != NULL; r = r->next) {
        u32_t i = tl_key_hash(r->key) & (size - 1);
        r->hash_next = b[i];
        b[i] = r;
    }
    free(tl_buckets);
    tl_buckets = b;
    tl_bucket_mask = size - 1;
    return 0;
}

static struct tl_udp_relay *tl_lookup(const tl_endpoint key[2])
{
    if (tl_bucket_mask == 0) return NULL;
    for (struct tl_udp_relay *r = tl_buckets[tl_key_hash(key) & tl_bucket_mask]; r; r = r->hash_next)
        if (memcmp(r->key, key, sizeof r->key) == 0) return r;
    return NULL;
}

static void tl_unhash(struct tl_udp_relay *r)
{
    struct tl_udp_relay **link = &tl_buckets[tl_key_hash(r->key) & tl_bucket_mask];
    while (*link != r) link = &(*link)->hash_next;
    *link = r->hash_next;
}

static void tl_untouch(struct tl_udp_relay *r);

/* Stamp the session active: most recent first on the touched list, so the list is in order of
 * last activity (Python replays it oldest first into its table's order). */
static void tl_touch(struct tl_udp_relay *r)
{
    r->last_active = sys_now();
    if (tl_touched == r) return;
    tl_untouch(r);
    r->touched_in = 1;
    r->touched_prev = NULL;
    r->touched_next = tl_touched;
    if (tl_touched) tl_touched->touched_prev = r;
    tl_touched = r;
}

static void tl_untouch(struct tl_udp_relay *r)
{
    if (!r->touched_in) return;
    if (r->touched_prev) r->touched_prev->touched_next = r->touched_next;
    else tl_touched = r->touched_next;
    if (r->touched_next) r->touched_next->touched_prev = r->touched_prev;
    r->touched_in = 0;
}

/* ---- port unreachable --------------------------------------------------------------------- */

/* Tell the client its flow's destination port is closed: ICMP type 3 code 3 (ICMPv6 type 1
 * code 4) from the target's address, quoting the IP and UDP headers of a datagram of the flow
 * (RFC 792's "IP header + 64 bits", which the client's kernel matches to its socket). */
static void tl_udp_relay_unreachable(struct tl_udp_relay *r)
{
    uint8_t msg[8 + 40 + 8];
    const tl_endpoint *client = &r->key[0], *target = &r->key[1];
    size_t ip_len = client->family == 4 ? 20 : 40;
    memset(msg, 0, sizeof msg);
    uint8_t *ip = msg + 8, *udp = ip + ip_len;
    if (client->family == 4) {
        msg[0] = 3;
        msg[1] = 3;
        ip[0] = 0x45;
        ip[3] = 28; /* total length: header and UDP header */
        ip[8] = 64;
        ip[9] = IP_PROTO_UDP;
        memcpy(ip + 12, client->addr, 4);
        memcpy(ip + 16, target->addr, 4);
        u16_t sum = inet_chksum(ip, 20);
        memcpy(ip + 10, &sum, 2);
    } else {
        msg[0] = 1;
        msg[1] = 4;
        ip[0] = 0x60;
        ip[5] = 8; /* payload length: the UDP header */
        ip[6] = IP_PROTO_UDP;
        ip[7] = 64;
        memcpy(ip + 8, client->addr, 16);
        memcpy(ip + 24, target->addr, 16);
    }
    udp[0] = (uint8_t)(client->port >> 8);
    udp[1] = (uint8_t)client->port;
    udp[2] = (uint8_t)(target->port >> 8);
    udp[3] = (uint8_t)target->port;
    udp[5] = 8;
    tl_endpoint from = *target, to = *client;
    from.port = to.port = 0;
    if (tl_icmp_send(&from, &to, msg, 8 + ip_len + 8) == ERR_OK) tl_ustats.port_unreachable++;
    else tl_ustats.drop_to_client++;
}

/* ECONNREFUSED on the session's socket: mirrored on a direct session; through a proxy it is
 * the relay's port that is closed (the association is gone), which the client must not read
 * as its target's answer: counted only, the control connection's end closes the session. */
static void tl_udp_relay_refused(struct tl_udp_relay *r)
{
    if (r->socks5 != NULL) tl_ustats.socks5_relay_refused++;
    else tl_udp_relay_unreachable(r);
}

/* ---- client -> upstream ------------------------------------------------------------------- */

static struct {
    struct tl_udp_relay *relay;
    struct pbuf *p;
    u16_t iov_first, iov_count;
} tl_queue[TL_UDP_QUEUE];
static int tl_queued;
static struct iovec tl_queue_iov[TL_UDP_QUEUE_IOV];
static int tl_queue_iov_used;
static int tl_udp_deferring;

/* Send a run of one session's datagrams (queue entries first .. first+count-1). */
static void tl_send_run(int first, int count)
{
    struct tl_udp_relay *r = tl_queue[first].relay;
    struct mmsghdr msgs[TL_UDP_QUEUE];
    memset(msgs, 0, sizeof(struct mmsghdr) * (size_t)count);
    for (int i = 0; i < count; i++) {
        msgs[i].msg_hdr.msg_iov = &tl_queue_iov[tl_queue[first + i].iov_first];
        msgs[i].msg_hdr.msg_iovlen = tl_queue[first + i].iov_count;
    }
    int done = 0;
    while (done < count) {
        int n = sendmmsg(r->fd, msgs + done, (unsigned)(count - done), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            for (int i = done; i < done + n; i++) {
                r->stats.datagrams_up++;
                r->stats.bytes_up += tl_queue[first + i].p->tot_len;
            }
            tl_ustats.datagrams_up += (uint64_t)n;
            tl_ustats.send_calls++;
            done += n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) {
            tl_ustats.drop_upstream_full += (uint64_t)(count - done); /* back-pressure: drop */
            break;
        }
        if (n < 0 && errno == ECONNREFUSED) tl_udp_relay_refused(r); /* the port is closed */
        tl_ustats.drop_upstream_error++; /* too big, unreachable, ...: this one is lost */
        done++;
    }
}

/* Send everything queued: each session's consecutive datagrams in one sendmmsg. */
static void tl_udp_relay_flush(void)
{
    int i = 0;
    while (i < tl_queued) {
        int run = 1;
        while (i + run < tl_queued && tl_queue[i + run].relay == tl_queue[i].relay) run++;
        tl_send_run(i, run);
        i += run;
    }
    for (i = 0; i < tl_queued; i++) pbuf_free(tl_queue[i].p);
    tl_queued = 0;
    tl_queue_iov_used = 0;
}

/* udp_icmp.c's receive callback: a datagram of a relayed session goes upstream, without
 * Python. Returns 1 if taken (p is then ours), 0 if no C session has the flow. */
int tl_udp_relay_take(const tl_endpoint *src, const tl_endpoint *dst, struct pbuf *p)
{
    if (tl_udp_relay_n == 0) return 0;
    tl_endpoint key[2];
    tl_make_key(key, src, dst);
    struct tl_udp_relay *r = tl_lookup(key);
    if (r == NULL) return 0;
    tl_touch(r);
    int pieces = r->socks5 != NULL; /* the SOCKS5 header goes first, as its own piece */
    for (struct pbuf *q = p; q != NULL; q = q->next) pieces++;
    if (pieces > TL_UDP_QUEUE_IOV) { /* not from lwIP's reassembly; never queued */
        tl_ustats.drop_upstream_error++;
        pbuf_free(p);
        return 1;
    }
    if (tl_queued == TL_UDP_QUEUE || tl_queue_iov_used + pieces > TL_UDP_QUEUE_IOV)
        tl_udp_relay_flush();
    int k = tl_queued++;
    tl_queue[k].relay = r;
    tl_queue[k].p = p;
    tl_queue[k].iov_first = (u16_t)tl_queue_iov_used;
    tl_queue[k].iov_count = (u16_t)pieces;
    if (r->socks5 != NULL) {
        tl_queue_iov[tl_queue_iov_used].iov_base = r->socks5;
        tl_queue_iov[tl_queue_iov_used].iov_len = r->socks5_len;
        tl_queue_iov_used++;
    }
    for (struct pbuf *q = p; q != NULL; q = q->next) {
        tl_queue_iov[tl_queue_iov_used].iov_base = q->payload;
        tl_queue_iov[tl_queue_iov_used].iov_len = q->len;
        tl_queue_iov_used++;
    }
    if (!tl_udp_deferring) tl_udp_relay_flush();
    return 1;
}

void tl_udp_relay_defer_begin(void) { tl_udp_deferring = 1; }

void tl_udp_relay_defer_end(void)
{
    tl_udp_deferring = 0;
    tl_udp_relay_flush();
}

/* ---- upstream -> client ------------------------------------------------------------------- */

static uint8_t tl_recv_bufs[TL_UDP_RECV_BATCH][TL_UDP_MAX_DATAGRAM];

static void tl_udp_relay_deliver(struct tl_udp_relay *r, const uint8_t *data, size_t len)
{
    struct udp_pcb *pcb = tl_udp_for_port(r->key[1].port);
    struct pbuf *p = pcb != NULL ? pbuf_alloc(PBUF_TRANSPORT, (u16_t)len, PBUF_RAM) : NULL;
    if (p == NULL) {
        tl_ustats.drop_to_client++;
        return;
    }
    memcpy(p->payload, data, len);
    err_t err = udp_sendto_if_src(pcb, p, &r->client_ip, r->key[0].port, &tl_netif,
                                  &r->target_ip);
    pbuf_free(p);
    if (err != ERR_OK) {
        tl_ustats.drop_to_client++;
        return;
    }
    r->stats.datagrams_down++;
    r->stats.bytes_down += len;
    tl_ustats.datagrams_down++;
}

/* The poll set reported the socket readable (or an error): one recvmmsg batch. Level-
 * triggered, so what is left is read in the next pass, after the other sessions had theirs. */
void tl_udp_relay_on_ready(struct tl_udp_relay *r, uint32_t events)
{
    LWIP_UNUSED_ARG(events);
    if (r->closed) return;
    static struct mmsghdr msgs[TL_UDP_RECV_BATCH];
    static struct iovec iov[TL_UDP_RECV_BATCH];
    for (int i = 0; i < TL_UDP_RECV_BATCH; i++) {
        iov[i].iov_base = tl_recv_bufs[i];
        iov[i].iov_len = TL_UDP_MAX_DATAGRAM;
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int n = recvmmsg(r->fd, msgs, TL_UDP_RECV_BATCH, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == ECONNREFUSED) tl_udp_relay_refused(r); /* a datagram met a closed port */
        else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            tl_ustats.recv_errors++; /* other ICMP errors: the flow goes on, as before */
        return;
    }
    tl_ustats.recv_calls++;
    if (n > 0) tl_touch(r);
    for (int i = 0; i < n; i++) {
        size_t len = msgs[i].msg_len;
        const uint8_t *data = tl_recv_bufs[i];
        if (r->socks5 != NULL && !(msgs[i].msg_hdr.msg_flags & MSG_TRUNC)) {
            int at = tl_socks5_udp_payload(data, len, r->socks5, r->socks5_len,
                                           r->socks5_any_address);
            if (at < 0) {
                if (at == TL_SOCKS5_FRAGMENT) tl_ustats.socks5_fragments++;
                else if (at == TL_SOCKS5_FOREIGN) tl_ustats.socks5_foreign++;
                else tl_ustats.socks5_malformed++;
                continue;
            }
            data += at;
            len -= (size_t)at;
        }
        /* Never longer than what lwIP can carry toward an IPv4 client. */
        if (len > 0xFFFF - 8 - 20 || (msgs[i].msg_hdr.msg_flags & MSG_TRUNC)) {
            tl_ustats.drop_to_client++;
            continue;
        }
        tl_udp_relay_deliver(r, data, len);
    }
}

/* ---- API ---------------------------------------------------------------------------------- */

int tl_udp_relay_open(const tl_endpoint *client, const tl_endpoint *target, int fd,
                      uintptr_t token, void **out)
{
    *out = NULL;
    if (client->family != target->family || (client->family != 4 && client->family != 6))
        return -EINVAL;
    if (tl_relay_epoll_fd() < 0) return -errno;
    tl_endpoint key[2];
    tl_make_key(key, client, target);
    if (tl_lookup(key) != NULL) return -EEXIST;
    if (tl_udp_relay_n >= tl_bucket_mask && tl_table_grow() != 0) return -ENOMEM;
    struct tl_udp_relay *r = calloc(1, sizeof *r);
    if (r == NULL) return -ENOMEM;
    r->entry.kind = TL_POLL_UDP_RELAY;
    r->fd = fd;
    r->token = token;
    memcpy(r->key, key, sizeof key);
    tl_endpoint_to(&r->client_ip, &key[0]);
    tl_endpoint_to(&r->target_ip, &key[1]);
    r->stats.token = token;
    int rcvbuf = TL_UDP_RCVBUF; /* beyond net.core.rmem_max if we may (CAP_NET_ADMIN) */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = r};
    if (tl_poll_ctl(EPOLL_CTL_ADD, fd, &ev) != 0) {
        int err = errno;
        free(r);
        return -err;
    }
    r->last_active = sys_now();
    u32_t i = tl_key_hash(r->key) & tl_bucket_mask;
    r->hash_next = tl_buckets[i];
    tl_buckets[i] = r;
    r->next = tl_udp_relays;
    if (tl_udp_relays) tl_udp_relays->prev = r;
    tl_udp_relays = r;
    tl_udp_relay_n++;
    tl_ustats.opened++;
    *out = r;
    return 0;
}

static void tl_fill_stats(struct tl_udp_relay *r, tl_udp_relay_stats *out)
{
    *out = r->stats;
    out->idle_ms = sys_now() - r->last_active;
}

/* The session goes through a SOCKS5 relay: ``header`` before each datagram up, checked and
 * stripped from each datagram down (see the top). Called once, right after open. */
int tl_udp_relay_set_socks5(void *relay, const uint8_t *header, size_t len, int any_address)
{
    struct tl_udp_relay *r = (struct tl_udp_relay *)relay;
    /* the shortest header: a one-byte name (8 bytes); the longest: a 255-byte name (262) */
    if (r->closed || r->socks5 != NULL || len < 8 || len > 262) return -EINVAL;
    uint8_t *copy = malloc(len);
    if (copy == NULL) return -ENOMEM;
    memcpy(copy, header, len);
    r->socks5 = copy;
    r->socks5_len = (u16_t)len;
    r->socks5_any_address = any_address != 0;
    return 0;
}

void tl_udp_relay_info(void *relay, tl_udp_relay_stats *out)
{
    tl_fill_stats((struct tl_udp_relay *)relay, out);
}

/* The sessions active since the last call, most recently active first. */
int tl_udp_relay_touched(tl_udp_relay_stats *out, int max)
{
    int n = 0;
    while (n < max && tl_touched != NULL) {
        struct tl_udp_relay *r = tl_touched;
        tl_untouch(r);
        tl_fill_stats(r, &out[n++]);
    }
    return n;
}

/* A session's memory: it and its SOCKS5 header, whichever way it is freed. */
static void tl_udp_relay_free(struct tl_udp_relay *r)
{
    free(r->socks5);
    free(r);
}

void tl_udp_relay_bury(void)
{
    while (tl_udp_graveyard != NULL) {
        struct tl_udp_relay *r = tl_udp_graveyard;
        tl_udp_graveyard = r->hash_next;
        tl_udp_relay_free(r);
    }
}

/* End a session: its queued datagrams go first, then it leaves the poll set and the table.
 * The fd stays open (Python owns it). Freed at once outside a poll round, else after it. */
void tl_udp_relay_close(void *relay, tl_udp_relay_stats *out)
{
    struct tl_udp_relay *r = (struct tl_udp_relay *)relay;
    if (r->closed) return;
    for (int i = 0; i < tl_queued; i++)
        if (tl_queue[i].relay == r) {
            tl_udp_relay_flush();
            break;
        }
    tl_poll_ctl(EPOLL_CTL_DEL, r->fd, NULL);
    tl_unhash(r);
    tl_untouch(r);
    if (r->prev) r->prev->next = r->next; else tl_udp_relays = r->next;
    if (r->next) r->next->prev = r->prev;
    tl_udp_relay_n--;
    tl_ustats.closed++;
    if (out != NULL) tl_fill_stats(r, out);
    r->closed = 1;
    /* Out of the poll set, the table, the touched and open lists and the queue: outside a
     * poll round nothing names it any more; inside, this round's events still may. */
    if (!tl_polling) {
        tl_udp_relay_free(r);
        return;
    }
    r->hash_next = tl_udp_graveyard; /* freed at the end of this round */
    tl_udp_graveyard = r;
}

void tl_udp_relay_close_all(void)
{
    while (tl_udp_relays != NULL) tl_udp_relay_close(tl_udp_relays, NULL);
    tl_udp_relay_bury();
    free(tl_buckets);
    tl_buckets = NULL;
    tl_bucket_mask = 0;
}

uint32_t tl_udp_relay_count(void) { return tl_udp_relay_n; }

const tl_udp_relay_counters *tl_udp_relay_get_counters(void) { return &tl_ustats; }

void tl_udp_relay_reset_counters(void) { memset(&tl_ustats, 0, sizeof tl_ustats); }

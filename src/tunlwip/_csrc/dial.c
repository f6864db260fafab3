/*
 * Dials in C: the default forwarder's upstream connects for held SYNs, and the handover of
 * each connected one to a C relay when the client's handshake completes. Python's policy
 * decides whether a SYN may be dialed (admission: applied by admit.c for plain SYNs, else by
 * Python's SYN hook) and Python hears of the rest in batches (events).
 *
 * Theory of operation
 * -------------------
 * transport_input.c holds a new SYN. First tl_dial_intercept looks at it: a retransmit of a
 * tuple being dialed here is swallowed, and a SYN that is one of our own sockets' packets
 * coming back (a routing loop) is dropped, both counted, without Python. Otherwise the SYN
 * stays "current" while admit.c, or else Python's SYN hook, decides. Admitted, it is dialed
 * (tl_dial_start_admitted from admit.c, tl_dial_start from Python): the SYN is copied and a
 * non-blocking connect starts on a new socket (dial_socket.c: protected with SO_MARK or
 * SO_BINDTODEVICE, TCP_NODELAY, keepalive as configured), watched in the poll
 * set (kind TL_POLL_DIAL). When the socket turns writable: SO_ERROR 0 releases the SYN into
 * lwIP (tl_input_release), which answers SYN-ACK; an error becomes a FAILED event carrying the
 * SYN, which Python answers (RST or ICMP) and records. When lwIP accepts the connection
 * (tcp_conn.c), tl_dial_claim finds the connected dial by its tuple and opens a relay (relay.c)
 * on the PCB and the socket. The dial then lives on as the flow's record in C: the relay
 * reports its first bytes and its end here (tl_dial_first_data, tl_dial_relay_ended). Every
 * dial's client is counted in admit.c's table (dialing; connected or relayed) until it ends.
 *
 * Through a SOCKS5 proxy (tl_dial_start_socks5): the socket connects to the proxy instead, and
 * socks5_dial.c runs the handshake on it; done, the dial is connected like any other (the SYN
 * released, the connection claimed into a relay); failed, its FAILED event also carries the
 * reason (TL_SOCKS5_*). The own table holds the socket's real peer (the proxy).
 *
 * Deadlines are FIFO: dials in the order they started (connect timeout; those through a proxy
 * in a FIFO of their own, with the proxy timeout for connect and handshake together) and
 * connected dials in the order they connected (claim timeout), so tl_dial_expire only looks at
 * list heads.
 *
 * Events (CONNECTED, FAILED, UNCLAIMED, OPENED, FIRST_DATA, ENDED) go to a growable array that
 * Python takes whole (tl_dial_events) after a poll pass. A dial admit.c started makes neither
 * CONNECTED nor OPENED: C keeps its flow's record (the tl_alone list, read by
 * tl_dial_flows_alone when Python asks for live flows) and Python first hears of it at its
 * end (ENDED, UNCLAIMED or FAILED, with its endpoints, latency and duration). A relay's first
 * bytes make FIRST_DATA only when they could name a server (TLS, HTTP). What events point to
 * (a failed SYN, first bytes, an ended flow) is freed by the next take. A FAILED event, or
 * many waiting, counts as a Python call, so the C poll loop (poll.c's tl_relay_run) hands
 * control back soon.
 *
 * Every event but FIRST_DATA is one Python must see, or a flow record stays open, a count stays
 * high and the dial is never freed. So a dial reserves its slots when it starts: at most three
 * (CONNECTED, OPENED, ENDED; or CONNECTED, UNCLAIMED; or FAILED), given back as it emits them or
 * ends; a dial admit.c started owes only its end and reserves that one slot. The array being
 * filled always has room for what it holds plus every reservation
 * (tl_events_n + tl_reserved <= tl_events_cap); a dial that cannot grow it to that does not
 * start (-ENOMEM: Python answers RST and counts a resource shortage), and a take swaps in the
 * other array only once that one has room for the reservations too (else the events wait for a
 * later take). FIRST_DATA only names the flow: it uses room beyond the reservations or is
 * dropped (counted in events_lost). The cost: both arrays grow to the reservations of the live
 * dials (one 72-byte slot per relayed flow, three per dial in progress) and are kept.
 *
 * Invariants: single-threaded; a dial is in the tuple table while dialing or connected, in the
 * own table (loop detection) while its socket is open; every socket created here is closed
 * exactly once, by this file or by the relay that took it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "lwip/sys.h"

#include "tl_internal.h"

enum { TL_DIALING = 0, TL_CONNECTED = 1, TL_RELAYED = 2, TL_FINISHED = 3 };

struct tl_dial {
    struct tl_poll_entry entry; /* first: the poll set's pointer (kind TL_POLL_DIAL) */
    int fd;                     /* -1 once closed or handed to the relay */
    uint8_t state, own_linked, tuple_linked;
    uint8_t reserved;           /* event slots still reserved for it (see the top) */
    uint8_t admitted_in_c;      /* admit.c started it: Python never saw its SYN */
    uint8_t registered;         /* connected, its socket still in the poll set (disarmed) */
    uint64_t id;
    tl_endpoint client, target, local, peer; /* peer: target, or the proxy */
    struct tl_socks5 *socks;               /* the handshake through a proxy, while dialing */
    int proxy_reason;                      /* TL_SOCKS5_* of a failed one */
    u32_t started_ms, connected_ms, opened_ms; /* opened: relayed */
    struct tl_dial *tuple_next, *own_next; /* hash chains */
    struct tl_dial *prev, *next;           /* the FIFO of its state (dialing, connected, alone) */
    struct tl_relay *relay;                /* while relayed */
    uint64_t bytes_up, bytes_down;         /* once the relay ended */
    uint8_t *packet;                       /* the held SYN, until released or failed */
    uint32_t packet_len;
};

struct tl_fifo {
    struct tl_dial *head, *tail;
};

#define TL_DIAL_BUCKETS 16384 /* per table; chains grow past that, lookups stay correct */
static struct tl_dial *tl_by_tuple[TL_DIAL_BUCKETS], *tl_by_own[TL_DIAL_BUCKETS];
static struct tl_fifo tl_dialing, tl_connected, tl_proxied;
static struct tl_fifo tl_alone; /* relayed flows admit.c started: C keeps their records */
static tl_dial_counters tl_dstats;
static uint64_t tl_next_id = 1;
static u32_t tl_hash_seed;

/* Settings (tl_dial_configure). */
static int tl_dial_on, tl_dial_accepting = 1;
static uint32_t tl_connect_ms = 30000, tl_claim_ms = 10000;
static uint32_t tl_proxy_ms = 10000; /* a proxy's connect and handshake (tl_dial_set_proxy_timeout) */

/* The SYN being held while Python's hook runs (tl_dial_intercept .. tl_dial_current_end). */
static const uint8_t *tl_cur_packet;
static size_t tl_cur_len;
static const tl_endpoint *tl_cur_src, *tl_cur_dst;

/* Events, taken whole by Python; what they point to is freed on the next take. */
static tl_dial_event *tl_events;
static size_t tl_events_n, tl_events_cap;
static tl_dial_event *tl_taken;
static size_t tl_taken_n, tl_taken_cap;
static size_t tl_reserved;                 /* slots the live dials may still need */
static size_t tl_slot_limit = (size_t)-1;  /* tl_dial_limit_event_slots (tests) */
#define TL_EVENTS_SOON 256 /* this many waiting: hand control back to Python */
#define TL_EVENTS_FIRST 256 /* an event array's first size */
#define TL_DIAL_SLOTS 3     /* the most events a dial must deliver (see the top) */

/* ---- tables ------------------------------------------------------------------------------ */

static int tl_ep_eq(const tl_endpoint *a, const tl_endpoint *b)
{
    return a->family == b->family && a->port == b->port &&
           memcmp(a->addr, b->addr, a->family == 4 ? 4 : 16) == 0;
}

static u32_t tl_ep_hash(u32_t h, const tl_endpoint *e)
{
    int n = e->family == 4 ? 4 : 16;
    for (int i = 0; i < n; i++) h = (h ^ e->addr[i]) * 16777619u;
    h = (h ^ (e->port & 0xFF)) * 16777619u;
    return (h ^ (e->port >> 8)) * 16777619u;
}

static u32_t tl_pair_bucket(const tl_endpoint *a, const tl_endpoint *b)
{
    if (tl_hash_seed == 0) tl_hash_seed = tl_random32() | 1;
    return tl_ep_hash(tl_ep_hash(tl_hash_seed ^ 2166136261u, a), b) & (TL_DIAL_BUCKETS - 1);
}

static void tl_unlink_chain(struct tl_dial **head, struct tl_dial *d, int own)
{
    for (struct tl_dial **link = head; *link; link = own ? &(*link)->own_next : &(*link)->tuple_next) {
        if (*link == d) {
            *link = own ? d->own_next : d->tuple_next;
            return;
        }
    }
}

static void tl_tuple_unlink(struct tl_dial *d)
{
    if (!d->tuple_linked) return;
    tl_unlink_chain(&tl_by_tuple[tl_pair_bucket(&d->client, &d->target)], d, 0);
    d->tuple_linked = 0;
}

static void tl_own_unlink(struct tl_dial *d)
{
    if (!d->own_linked) return;
    tl_unlink_chain(&tl_by_own[tl_pair_bucket(&d->local, &d->peer)], d, 1);
    d->own_linked = 0;
}

/* The dial of this tuple in `state`, or NULL. */
static struct tl_dial *tl_find(const tl_endpoint *client, const tl_endpoint *target, int state)
{
    for (struct tl_dial *d = tl_by_tuple[tl_pair_bucket(client, target)]; d; d = d->tuple_next)
        if (d->state == state && tl_ep_eq(&d->client, client) && tl_ep_eq(&d->target, target))
            return d;
    return NULL;
}

static void tl_fifo_push(struct tl_fifo *f, struct tl_dial *d)
{
    d->next = NULL;
    d->prev = f->tail;
    if (f->tail) f->tail->next = d;
    else f->head = d;
    f->tail = d;
}

static void tl_fifo_remove(struct tl_fifo *f, struct tl_dial *d)
{
    if (d->prev) d->prev->next = d->next; else f->head = d->next;
    if (d->next) d->next->prev = d->prev; else f->tail = d->prev;
    d->prev = d->next = NULL;
}

/* ---- events ------------------------------------------------------------------------------ */

static void tl_dial_free(struct tl_dial *d)
{
    if (d->socks) tl_socks5_free(d->socks);
    free(d->packet);
    free(d);
}

/* Make *array hold at least `need` events (doubling); -1 if it cannot (no memory, or past the
 * test limit), the array unchanged. */
static int tl_events_room(tl_dial_event **array, size_t *cap, size_t need)
{
    if (need > tl_slot_limit) return -1;
    if (need <= *cap) return 0;
    size_t size = *cap ? *cap : TL_EVENTS_FIRST;
    while (size < need) size *= 2;
    if (size > tl_slot_limit) size = tl_slot_limit;
    tl_dial_event *grown = realloc(*array, size * sizeof *grown);
    if (grown == NULL) return -1;
    *array = grown;
    *cap = size;
    return 0;
}

static int tl_event_required(int kind) { return kind != TL_DIAL_FIRST_DATA; }

static int tl_event_final(int kind)
{
    return kind == TL_DIAL_FAILED || kind == TL_DIAL_UNCLAIMED || kind == TL_DIAL_ENDED;
}

/* Queue an event; data (malloc'd, or NULL) is freed with the batch. A required event takes one
 * of its dial's reserved slots, which are there by the invariant at the top; FIRST_DATA takes
 * room beyond every reservation or is dropped (counted), its data freed. */
static void tl_event(struct tl_dial *d, int kind, int error, uint8_t *data, uint32_t len)
{
    if (tl_event_required(kind) && d->reserved > 0) {
        d->reserved--;
        tl_reserved--;
    } else if (tl_events_room(&tl_events, &tl_events_cap, tl_events_n + tl_reserved + 1) != 0) {
        tl_dstats.events_lost++; /* FIRST_DATA; a required event always had its slot */
        free(data);
        return;
    }
    if (tl_event_final(kind)) { /* nothing more from this dial: its other slots go back */
        tl_reserved -= d->reserved;
        d->reserved = 0;
    }
    tl_dial_event *e = &tl_events[tl_events_n++];
    memset(e, 0, sizeof *e);
    e->id = d->id;
    e->kind = kind;
    e->error = error;
    e->flow = d;
    e->client = d->client;
    e->target = d->target;
    e->admitted_in_c = d->admitted_in_c;
    e->at_ms = sys_now();
    e->data = data;
    e->len = len;
    if (kind == TL_DIAL_FAILED) e->proxy_reason = d->proxy_reason;
    /* every event but FAILED comes after the connect */
    e->latency_ms = (kind == TL_DIAL_FAILED ? sys_now() : d->connected_ms) - d->started_ms;
    if (kind == TL_DIAL_ENDED) {
        e->bytes_up = d->bytes_up;
        e->bytes_down = d->bytes_down;
        e->duration_ms = e->at_ms - d->opened_ms;
    }
    if (kind == TL_DIAL_FAILED || tl_events_n >= TL_EVENTS_SOON) tl_python_calls++;
}

static void tl_free_taken(void)
{
    for (size_t i = 0; i < tl_taken_n; i++) {
        tl_dial_event *e = &tl_taken[i];
        free((void *)e->data);
        if (e->kind == TL_DIAL_ENDED || e->kind == TL_DIAL_FAILED || e->kind == TL_DIAL_UNCLAIMED)
            tl_dial_free((struct tl_dial *)e->flow);
    }
    tl_taken_n = 0;
}

int tl_dial_events(tl_dial_event **out)
{
    *out = NULL;
    if (tl_polling) return 0; /* a poll round may still name a dial freed here: after it */
    tl_free_taken();
    /* The array Python gave back becomes the one filled: room for every reservation first. No
     * memory: the events wait in theirs (which has room by the invariant) for a later take. */
    if (tl_events_n == 0 || tl_events_room(&tl_taken, &tl_taken_cap, tl_reserved) != 0) return 0;
    tl_dial_event *swap = tl_taken;
    size_t cap = tl_taken_cap;
    tl_taken = tl_events;
    tl_taken_cap = tl_events_cap;
    tl_taken_n = tl_events_n;
    tl_events = swap;
    tl_events_cap = cap;
    tl_events_n = 0;
    u32_t now = sys_now();
    for (size_t i = 0; i < tl_taken_n; i++) tl_taken[i].ago_ms = now - tl_taken[i].at_ms;
    *out = tl_taken;
    return (int)tl_taken_n;
}

int tl_dial_events_waiting(void) { return (int)tl_events_n; }

/* ---- the dial's end before a relay ------------------------------------------------------- */

static void tl_close_socket(struct tl_dial *d)
{
    if (d->fd < 0) return;
    /* Still registered (dialing, or connected with its registration kept for the relay):
     * take it out before closing, as a forked child's copy of the fd would keep it there,
     * naming this dial once freed. */
    if ((d->state == TL_DIALING || d->registered) && tl_epoll_fd >= 0)
        tl_poll_ctl(EPOLL_CTL_DEL, d->fd, NULL);
    close(d->fd);
    d->fd = -1;
    tl_own_unlink(d);
}

/* Leave the tables; the dial goes with the event (freed when Python took it). */
static void tl_dial_finish(struct tl_dial *d, int kind, int error)
{
    if (d->state == TL_DIALING || d->state == TL_CONNECTED)
        tl_admit_count(&d->client, d->state == TL_DIALING ? TL_ADMIT_C_DIALING : TL_ADMIT_C_OPEN, -1);
    if (d->state == TL_DIALING) {
        tl_fifo_remove(d->socks ? &tl_proxied : &tl_dialing, d);
        tl_dstats.dialing--;
        tl_dstats.proxied -= d->socks != NULL;
        if (d->proxy_reason > 0 && d->proxy_reason < TL_SOCKS5_REASONS)
            tl_dstats.socks5_failures[d->proxy_reason]++;
    } else if (d->state == TL_CONNECTED) {
        tl_fifo_remove(&tl_connected, d);
        tl_dstats.connected--;
    }
    tl_close_socket(d);
    tl_tuple_unlink(d);
    d->state = TL_FINISHED;
    uint8_t *packet = NULL;
    uint32_t len = 0;
    if (kind == TL_DIAL_FAILED) { /* Python answers the SYN */
        packet = d->packet;
        len = d->packet_len;
        d->packet = NULL;
    }
    tl_event(d, kind, error, packet, len);
}

/* ---- from the input path ----------------------------------------------------------------- */

int tl_dial_intercept(const uint8_t *packet, size_t len, const tl_endpoint *src,
                      const tl_endpoint *dst)
{
    if (!tl_dial_on) return 0;
    if (tl_find(src, dst, TL_DIALING) != NULL) {
        tl_dstats.swallowed++;
        return 1;
    }
    if (tl_dial_is_own(src, dst)) {
        tl_dstats.loops++;
        tl_python_calls++; /* Python says so, once, loudly */
        return 1;
    }
    tl_cur_packet = packet;
    tl_cur_len = len;
    tl_cur_src = src;
    tl_cur_dst = dst;
    return 0;
}

void tl_dial_current_end(void) { tl_cur_packet = NULL; }

/* Dial the current SYN: the socket to `peer` (its destination, or a proxy with `socks`). */
static int64_t tl_dial_begin(const tl_endpoint *peer, struct tl_socks5 *socks, int in_c)
{
    /* The events this dial will owe Python, before anything that would need them. */
    /* One admit.c started owes only its end (ENDED, UNCLAIMED or FAILED): see the top. */
    size_t slots = in_c ? 1 : TL_DIAL_SLOTS;
    if (tl_events_room(&tl_events, &tl_events_cap, tl_events_n + tl_reserved + slots) != 0)
        return -ENOMEM;
    struct tl_dial *d = calloc(1, sizeof *d);
    uint8_t *packet = malloc(tl_cur_len);
    if (d == NULL || packet == NULL) {
        free(d);
        free(packet);
        return -ENOMEM;
    }
    memcpy(packet, tl_cur_packet, tl_cur_len);
    int fd = tl_dial_connector(peer, &d->local);
    if (fd < 0) {
        free(d);
        free(packet);
        return fd;
    }
    /* A direct dial hears its connect's outcome once (EPOLLONESHOT): the registration then
     * stays, disarmed, and is handed to the relay (tl_relay_adopt), with no DEL and ADD. */
    struct epoll_event ev = {.events = EPOLLOUT | (socks ? 0 : EPOLLONESHOT), .data.ptr = d};
    if (tl_relay_epoll_fd() < 0 || tl_poll_ctl(EPOLL_CTL_ADD, fd, &ev) != 0) {
        int err = errno;
        close(fd);
        free(d);
        free(packet);
        return -err;
    }
    d->entry.kind = TL_POLL_DIAL;
    d->fd = fd;
    d->peer = *peer;
    d->socks = socks;
    d->id = tl_next_id++;
    d->client = *tl_cur_src;
    d->target = *tl_cur_dst;
    d->packet = packet;
    d->packet_len = (uint32_t)tl_cur_len;
    d->started_ms = sys_now();
    d->state = TL_DIALING;
    d->admitted_in_c = (uint8_t)in_c;
    tl_admit_count(&d->client, TL_ADMIT_C_DIALING, 1);
    d->reserved = (uint8_t)slots;
    tl_reserved += slots;
    u32_t b = tl_pair_bucket(&d->client, &d->target);
    d->tuple_next = tl_by_tuple[b];
    tl_by_tuple[b] = d;
    d->tuple_linked = 1;
    b = tl_pair_bucket(&d->local, &d->peer);
    d->own_next = tl_by_own[b];
    tl_by_own[b] = d;
    d->own_linked = 1;
    tl_fifo_push(socks ? &tl_proxied : &tl_dialing, d);
    tl_dstats.dialing++;
    tl_dstats.started++;
    if (socks) {
        tl_dstats.proxied++;
        tl_dstats.socks5_started++;
    }
    return (int64_t)d->id;
}

int64_t tl_dial_start(void)
{
    if (!tl_dial_on || tl_cur_packet == NULL) return -EINVAL;
    return tl_dial_begin(tl_cur_dst, NULL, 0);
}

int64_t tl_dial_start_admitted(void)
{
    if (!tl_dial_on || !tl_dial_accepting || tl_cur_packet == NULL) return -EINVAL;
    return tl_dial_begin(tl_cur_dst, NULL, 1);
}

int64_t tl_dial_start_socks5(const tl_endpoint *proxy, const char *name, const uint8_t *auth,
                             size_t auth_len)
{
    if (!tl_dial_on || tl_cur_packet == NULL) return -EINVAL;
    int err = 0;
    struct tl_socks5 *socks = tl_socks5_new(tl_cur_dst, name, auth, auth_len, &err);
    if (socks == NULL) return -err;
    int64_t rc = tl_dial_begin(proxy, socks, 0);
    if (rc < 0) tl_socks5_free(socks);
    return rc;
}

void tl_dial_set_proxy_timeout(uint32_t ms) { tl_proxy_ms = ms ? ms : 1; }

int tl_dial_is_own(const tl_endpoint *local, const tl_endpoint *peer)
{
    for (struct tl_dial *d = tl_by_own[tl_pair_bucket(local, peer)]; d; d = d->own_next)
        if (tl_ep_eq(&d->local, local) && tl_ep_eq(&d->peer, peer)) return 1;
    return 0;
}

/* ---- the connect's outcome --------------------------------------------------------------- */

void tl_dial_on_ready(struct tl_dial *d, uint32_t events)
{
    if (d->state != TL_DIALING) return;
    int err = 0;
    if (d->socks != NULL) { /* through a proxy: its handshake says when we are connected */
        int rc = tl_socks5_ready(d->socks, d->fd, events, d, &err);
        if (rc == 0) return;
        if (rc < 0) {
            d->proxy_reason = -rc;
            tl_dial_finish(d, TL_DIAL_FAILED, err);
            return;
        }
    } else if (events != EPOLLOUT) { /* writable alone: connected (no error to read) */
        socklen_t len = sizeof err;
        if (getsockopt(d->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        if (err == 0 && !(events & EPOLLOUT)) err = ECONNRESET;
        if (err != 0) {
            tl_dial_finish(d, TL_DIAL_FAILED, err);
            return;
        }
    }
    if (d->socks != NULL) { /* watched for the handshake: stop until the relay takes it */
        tl_poll_ctl(EPOLL_CTL_DEL, d->fd, NULL);
        tl_fifo_remove(&tl_proxied, d);
        tl_dstats.proxied--;
        tl_dstats.socks5_connected++;
        tl_socks5_free(d->socks);
        d->socks = NULL;
    } else {
        d->registered = 1;
        tl_fifo_remove(&tl_dialing, d);
    }
    tl_dstats.dialing--;
    /* A second SYN of the flow dialed again: the newer connected dial replaces the older. */
    struct tl_dial *old = tl_find(&d->client, &d->target, TL_CONNECTED);
    if (old != NULL) tl_dial_finish(old, TL_DIAL_UNCLAIMED, 0);
    tl_admit_count(&d->client, TL_ADMIT_C_OPEN, 1); /* first: the client's entry stays */
    tl_admit_count(&d->client, TL_ADMIT_C_DIALING, -1);
    d->state = TL_CONNECTED;
    d->connected_ms = sys_now();
    tl_fifo_push(&tl_connected, d);
    tl_dstats.connected++;
    /* Python started it: it hears now. One admit.c started is first heard of at its end
     * (ENDED, UNCLAIMED or FAILED), which carries the latency too. */
    if (!d->admitted_in_c) tl_event(d, TL_DIAL_CONNECTED, 0, NULL, 0);
    uint8_t *packet = d->packet;
    d->packet = NULL;
    tl_input_release(packet, d->packet_len); /* lwIP answers SYN-ACK; the ACK claims us */
    free(packet);
}

/* ---- the handover to a relay ------------------------------------------------------------- */

int tl_dial_claim(struct tcp_pcb *pcb)
{
    if (!tl_dial_on || !tl_dial_accepting || tl_connected.head == NULL) return 0;
    tl_endpoint client, target;
    tl_endpoint_from(&client, &pcb->remote_ip, pcb->remote_port);
    tl_endpoint_from(&target, &pcb->local_ip, pcb->local_port);
    struct tl_dial *d = tl_find(&client, &target, TL_CONNECTED);
    if (d == NULL) return 0;
    tl_fifo_remove(&tl_connected, d);
    tl_dstats.connected--;
    tl_tuple_unlink(d);
    d->state = TL_RELAYED;
    tl_dstats.relayed++;
    d->opened_ms = sys_now();
    if (d->admitted_in_c) { /* Python reads it when it asks (tl_dial_flows_alone) or at ENDED */
        tl_fifo_push(&tl_alone, d);
        tl_dstats.alone++;
        tl_dstats.alone_opened++;
    } else {
        tl_event(d, TL_DIAL_OPENED, 0, NULL, 0);
    }
    int fd = d->fd;
    d->fd = -1; /* the relay's now; it tells us when it closed it (tl_dial_relay_ended) */
    int outcome = tl_relay_adopt(pcb, fd, d, d->registered);
    return outcome == 2 ? -1 : 1;
}

void tl_dial_relay_opened(struct tl_dial *d, struct tl_relay *r) { d->relay = r; }

/* Could these first bytes name a server (what Python's sniff_name parses: a TLS handshake
 * record, or an HTTP/1.x request line, whose method is 3+ capital letters)? Others make no
 * event: most flows' first bytes name nothing, and Python would parse them for nothing. */
static int tl_first_bytes_may_name(const uint8_t *data, size_t len)
{
    if (len >= 1 && data[0] == 0x16) return 1;
    if (len < 3) return 0;
    for (int i = 0; i < 3; i++)
        if (data[i] < 'A' || data[i] > 'Z') return 0;
    return 1;
}

void tl_dial_first_data(struct tl_dial *d, const uint8_t *data, size_t len)
{
    if (!tl_first_bytes_may_name(data, len)) return;
    uint8_t *copy = malloc(len ? len : 1);
    if (copy == NULL) { /* the flow goes unnamed */
        tl_dstats.events_lost++;
        return;
    }
    memcpy(copy, data, len);
    tl_event(d, TL_DIAL_FIRST_DATA, 0, copy, (uint32_t)len);
}

void tl_dial_relay_ended(struct tl_dial *d, int reason, uint64_t up, uint64_t down)
{
    d->relay = NULL;
    d->bytes_up = up;
    d->bytes_down = down;
    tl_own_unlink(d); /* the relay closed the socket */
    tl_dstats.relayed--;
    if (d->admitted_in_c) {
        tl_fifo_remove(&tl_alone, d);
        tl_dstats.alone--;
    }
    tl_admit_count(&d->client, TL_ADMIT_C_OPEN, -1);
    d->state = TL_FINISHED;
    tl_event(d, TL_DIAL_ENDED, reason, NULL, 0);
}

int tl_dial_flows_alone(tl_dial_flow *out, int max)
{
    u32_t now = sys_now();
    int n = 0;
    for (struct tl_dial *d = tl_alone.head; d != NULL && n < max; d = d->next, n++) {
        tl_dial_flow *f = &out[n];
        tl_relay_stats stats;
        tl_dial_flow_bytes(d, &stats);
        f->id = d->id;
        f->client = d->client;
        f->target = d->target;
        f->latency_ms = d->connected_ms - d->started_ms;
        f->age_ms = now - d->opened_ms;
        f->bytes_up = stats.bytes_up;
        f->bytes_down = stats.bytes_down;
    }
    return n;
}

void tl_dial_flow_bytes(void *flow, tl_relay_stats *out)
{
    struct tl_dial *d = (struct tl_dial *)flow;
    if (d->relay != NULL) {
        tl_relay_info(d->relay, out);
        return;
    }
    out->bytes_up = d->bytes_up;
    out->bytes_down = d->bytes_down;
    out->idle_ms = 0;
}

/* ---- deadlines --------------------------------------------------------------------------- */

uint32_t tl_dial_expire(void)
{
    u32_t now = sys_now();
    while (tl_dialing.head && now - tl_dialing.head->started_ms >= tl_connect_ms)
        tl_dial_finish(tl_dialing.head, TL_DIAL_FAILED, ETIMEDOUT);
    while (tl_proxied.head && now - tl_proxied.head->started_ms >= tl_proxy_ms) {
        tl_proxied.head->proxy_reason = tl_socks5_timeout_reason(tl_proxied.head->socks);
        tl_dial_finish(tl_proxied.head, TL_DIAL_FAILED, ETIMEDOUT);
    }
    while (tl_connected.head && now - tl_connected.head->connected_ms >= tl_claim_ms)
        tl_dial_finish(tl_connected.head, TL_DIAL_UNCLAIMED, 0); /* the handshake never came */
    u32_t due = 0xFFFFFFFFu;
    if (tl_dialing.head) due = tl_dialing.head->started_ms + tl_connect_ms - now;
    if (tl_proxied.head) {
        u32_t proxy = tl_proxied.head->started_ms + tl_proxy_ms - now;
        if (proxy < due) due = proxy;
    }
    if (tl_connected.head) {
        u32_t claim = tl_connected.head->connected_ms + tl_claim_ms - now;
        if (claim < due) due = claim;
    }
    return due;
}

/* ---- settings and the rest --------------------------------------------------------------- */

int tl_dial_configure(int on, int protect, uint32_t mark, const char *ifname,
                      uint32_t keep_idle, uint32_t keep_intvl, uint32_t keep_cnt,
                      uint32_t connect_ms, uint32_t claim_ms)
{
    int rc = tl_dial_socket_configure(protect, mark, ifname, keep_idle, keep_intvl, keep_cnt);
    if (rc != 0) return rc;
    tl_dial_on = on ? 1 : 0;
    tl_connect_ms = connect_ms ? connect_ms : 1;
    tl_claim_ms = claim_ms ? claim_ms : 1;
    return 0;
}

void tl_dial_set_accepting(int on) { tl_dial_accepting = on ? 1 : 0; }

const tl_dial_counters *tl_dial_get_counters(void)
{
    tl_dstats.python_calls = tl_python_calls;
    return &tl_dstats;
}

void tl_dial_close_all(void)
{
    while (tl_dialing.head) tl_dial_finish(tl_dialing.head, TL_DIAL_FAILED, ECANCELED);
    while (tl_proxied.head) tl_dial_finish(tl_proxied.head, TL_DIAL_FAILED, ECANCELED);
    while (tl_connected.head) tl_dial_finish(tl_connected.head, TL_DIAL_UNCLAIMED, 0);
}

/* Zero the counts (the gauges stay). */
void tl_dial_reset_counters(void)
{
    tl_dstats.started = tl_dstats.swallowed = tl_dstats.loops = tl_dstats.events_lost = 0;
    tl_dstats.alone_opened = 0;
    tl_dstats.socks5_started = tl_dstats.socks5_connected = 0;
    memset(tl_dstats.socks5_failures, 0, sizeof tl_dstats.socks5_failures);
}

/* Tests: the most events either array may hold, as if memory ran out beyond (0: no limit). */
void tl_dial_limit_event_slots(size_t slots) { tl_slot_limit = slots ? slots : (size_t)-1; }

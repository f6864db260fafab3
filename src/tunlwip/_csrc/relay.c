/*
 * Relays: the default TCP forwarder in C. A relay owns one lwIP connection and the upstream
 * socket dialed for it, and moves bytes between them without entering Python.
 *
 * Theory of operation
 * -------------------
 * Python dials the upstream (protect, connect, dial-before-accept) and then hands the
 * connection's PCB and the socket's fd to tl_relay_open. From then on:
 *  - client -> upstream: lwIP's recv callback queues the pbufs and writes them to the socket
 *    (writev); whatever the socket does not take stays queued, EPOLLOUT is watched, and the
 *    client's window only reopens (tcp_recved) for bytes the socket took. A client FIN becomes
 *    shutdown(SHUT_WR) once the queue is empty.
 *  - upstream -> client: when the socket is readable, read at most what lwIP's send buffer
 *    admits and tcp_write it; with no room, stop watching EPOLLIN until lwIP's sent callback
 *    reports acknowledged bytes. EOF becomes our FIN after the queued data.
 *  - Readiness comes from one epoll set (tl_relay_epoll_fd): Python's single poll task waits
 *    for it with trio and calls tl_relay_poll. No task, no Python object per byte or packet.
 *  - A reset on either side resets the other: client RST -> upstream sees RST (SO_LINGER 0);
 *    upstream RST or error -> tcp_abort, the client sees RST. Never a clean close after a
 *    failure, so neither end mistakes a broken transfer for a complete one.
 *  - When both directions are finished the socket is closed and the PCB is handed back to lwIP
 *    to finish its close (LAST-ACK/TIME-WAIT); tl_py_relay_done reports the end exactly once,
 *    after which its pointer must not be used (the memory is freed after the poll round).
 *
 * Invariants: single-threaded (the trio thread); a relay is in the epoll set while it wants an
 * event, or with no events to hear an upstream that fails meanwhile (tl_relay_update_watch),
 * but never once a hang-up is normal (so a hung-up socket never spins the poll loop); bytes are
 * acknowledged to the client only once the upstream socket has accepted them.
 *
 * At about 680 lines the longest file of the layer, on purpose: one state machine (struct tl_relay
 * and its steps), which a split would have to expose to other files.
 *
 * The poll set itself, and the loop that serves it, are poll.c: it hands each relay's events to
 * tl_relay_on_ready and frees ended relays (tl_relay_bury) after every round.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "lwip/sys.h"
#include "lwip/priv/tcp_priv.h" /* tcp_keepalive, tcp_ticks: probing in FIN-WAIT-2 */

#include "tl_internal.h"

#define TL_RELAY_IOV 64
#define TL_RELAY_FIRST_DATA_MAX 4096

struct tl_relay;
static void tl_relay_drop_up_queue(struct tl_relay *r);

struct tl_relay {
    struct tl_poll_entry entry; /* first: the poll set's pointer (kind TL_POLL_RELAY) */
    struct tcp_pcb *pcb;      /* NULL once lwIP let go of it */
    int fd;                   /* -1 once closed */
    uintptr_t conn;
    struct tl_dial *flow;     /* opened by dial.c (no Python): its record, else NULL */
    struct pbuf *up_queue;    /* client bytes the socket has not taken yet (tl_relay_queue_up) */
    struct pbuf *up_tail;     /* its last pbuf */
    u16_t up_tail_room;       /* bytes free after up_tail's data when it is ours to fill */
    uint8_t *down_spill;      /* upstream bytes read but not taken by lwIP (rare) */
    u32_t down_spill_len;
    u32_t watching;           /* epoll events registered */
    u8_t in_set;              /* in the poll set (with watching 0: only for errors) */
    u8_t no_error_watch;      /* a hang-up without error came: never watch for errors only */
    u8_t client_eof, upstream_shut, upstream_eof, client_shut, want_first_data, dirty, ended;
    u8_t drained;             /* the socket had nothing more to read; epoll says when it has */
    uint64_t bytes_up, bytes_down;
    u32_t last_active;
    struct tl_relay *prev, *next;
    struct tl_relay *dirty_next; /* on tl_dirty: client bytes to write after the input batch */
    struct tl_relay *grave_next; /* on tl_graveyard once ended, until tl_relay_bury */
};

static struct tl_relay *tl_relays;
static struct tl_relay *tl_dirty;  /* relays with client bytes queued during an input batch */
/* Ended relays are freed only between poll rounds: an event for one may still be pending in
 * the batch epoll_wait returned (the device's packets can end relays mid-batch). */
static struct tl_relay *tl_graveyard;
static int tl_deferring;
static u32_t tl_relay_n;
static uint8_t tl_relay_buf[65536];
static tl_relay_counters tl_rstats;

static int tl_relay_update_watch(struct tl_relay *r);
static int tl_relay_settle(struct tl_relay *r);
static void tl_relay_release_pcb(struct tl_relay *r);

/* ---- lifecycle ---------------------------------------------------------------------------- */

static void tl_relay_touch(struct tl_relay *r) { r->last_active = sys_now(); }

/* Close the socket; with reset, SO_LINGER 0 makes the upstream see RST instead of FIN. */
static void tl_relay_close_fd(struct tl_relay *r, int reset)
{
    if (r->fd < 0) return;
    /* Not left to close(): another fd of the file (a dup, a forked child's copy) would keep
     * the registration, naming the relay once freed. */
    if (r->in_set) tl_poll_ctl(EPOLL_CTL_DEL, r->fd, NULL);
    r->watching = 0;
    r->in_set = 0;
    if (reset) {
        struct linger lg = {1, 0};
        setsockopt(r->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(r->fd);
    r->fd = -1;
}

/* The last step of every relay: report, unlink, and leave it to tl_relay_bury. Returns 1 if
 * the PCB was aborted, which an lwIP callback must answer with ERR_ABRT. */
static int tl_relay_end(struct tl_relay *r, int reason)
{
    int aborted = 0;
    if (r->ended) return 0; /* ended already (re-entered from a Python callback) */
    tl_relay_close_fd(r, reason != TL_RELAY_CLOSED);
    if (r->pcb != NULL) {
        struct tcp_pcb *pcb = r->pcb;
        r->pcb = NULL;
        tl_tcp_forget(pcb);
        if (reason != TL_RELAY_CLOSED || tcp_close(pcb) != ERR_OK) {
            tcp_abort(pcb); /* the client sees RST */
            aborted = 1;
        }
    }
    if (r->dirty) {
        struct tl_relay **link = &tl_dirty;
        while (*link != r) link = &(*link)->dirty_next;
        *link = r->dirty_next;
    }
    tl_relay_drop_up_queue(r);
    free(r->down_spill);
    if (r->prev) r->prev->next = r->next; else tl_relays = r->next;
    if (r->next) r->next->prev = r->prev;
    tl_relay_n--;
    tl_rstats.ended[reason]++;
    r->ended = 1;
    r->grave_next = tl_graveyard;
    tl_graveyard = r;
    if (r->flow != NULL) tl_dial_relay_ended(r->flow, reason, r->bytes_up, r->bytes_down);
    else TL_PY(tl_py_relay_done(r->conn, reason, r->bytes_up, r->bytes_down));
    return aborted;
}

void tl_relay_bury(void)
{
    while (tl_graveyard != NULL) {
        struct tl_relay *r = tl_graveyard;
        tl_graveyard = r->grave_next;
        free(r);
    }
}

/* Outcome of a step: the relay goes on, ended, or ended by aborting the PCB. */
enum { TL_GOES_ON = 0, TL_ENDED = 1, TL_ABORTED = 2 };

static int tl_relay_fail(struct tl_relay *r, int reason)
{
    return tl_relay_end(r, reason) ? TL_ABORTED : TL_ENDED;
}

/* Why a socket error ends a relay: the upstream reset it (ECONNRESET, EPIPE), or the kernel
 * gave up on an upstream that stopped answering (keepalive or retransmissions: ETIMEDOUT, or
 * the ICMP error seen meanwhile, which only a timeout makes fatal on a connected socket). */
static int tl_relay_upstream_failure(int err)
{
    switch (err) {
    case ETIMEDOUT: case EHOSTUNREACH: case ENETUNREACH: case EHOSTDOWN:
        return TL_RELAY_UPSTREAM_TIMEOUT;
    default:
        return TL_RELAY_UPSTREAM_RESET;
    }
}

/* Both directions finished: close the socket, hand the PCB to lwIP to finish closing. */
static int tl_relay_maybe_finish(struct tl_relay *r)
{
    if (r->upstream_shut && r->client_shut && r->up_queue == NULL && r->down_spill_len == 0)
        return tl_relay_fail(r, TL_RELAY_CLOSED);
    return TL_GOES_ON;
}

/* ---- client -> upstream ------------------------------------------------------------------- */

/*
 * The queue of client bytes for the socket. Appending is O(1) (a tail pointer, never
 * pbuf_cat's walk to the end), and a small segment is copied into the tail pbuf instead of
 * queued as a pbuf of its own: a client sending one-byte segments would otherwise queue a pbuf
 * (about 100 bytes) per byte, megabytes for one connection's window. The queue thus holds at
 * most one pbuf per TL_RELAY_SMALL bytes plus one per larger segment, within the window.
 */
#define TL_RELAY_SMALL 512
#define TL_RELAY_COALESCE 4096

static void tl_relay_append_up(struct tl_relay *r, struct pbuf *q, u16_t room)
{
    q->next = NULL;
    q->tot_len = q->len;
    if (r->up_tail) r->up_tail->next = q;
    else r->up_queue = q;
    r->up_tail = q;
    r->up_tail_room = room;
}

/* Takes the chain p. */
static void tl_relay_queue_up(struct tl_relay *r, struct pbuf *p)
{
    while (p != NULL) {
        struct pbuf *q = p;
        p = p->next;
        if (q->len == 0) {
            q->next = NULL;
            pbuf_free(q);
            continue;
        }
        if (q->len < TL_RELAY_SMALL && r->up_tail_room < q->len) {
            struct pbuf *c = pbuf_alloc(PBUF_RAW, TL_RELAY_COALESCE, PBUF_RAM);
            if (c != NULL) {
                c->len = 0;
                tl_relay_append_up(r, c, TL_RELAY_COALESCE);
            }
        }
        if (q->len < TL_RELAY_SMALL && r->up_tail_room >= q->len) {
            struct pbuf *t = r->up_tail;
            memcpy((u8_t *)t->payload + t->len, q->payload, q->len);
            t->len = (u16_t)(t->len + q->len);
            t->tot_len = t->len;
            r->up_tail_room = (u16_t)(r->up_tail_room - q->len);
            q->next = NULL;
            pbuf_free(q);
        } else {
            tl_relay_append_up(r, q, 0);
        }
    }
}

static void tl_relay_drop_up_queue(struct tl_relay *r)
{
    if (r->up_queue) pbuf_free(r->up_queue);
    r->up_queue = r->up_tail = NULL;
    r->up_tail_room = 0;
}

/* Write queued client bytes to the socket; reopen the client's window for what it took. */
static int tl_relay_flush_up(struct tl_relay *r)
{
    while (r->up_queue != NULL) {
        struct iovec iov[TL_RELAY_IOV];
        int n_iov = 0;
        for (struct pbuf *q = r->up_queue; q != NULL && n_iov < TL_RELAY_IOV; q = q->next) {
            if (q->len == 0) continue;
            iov[n_iov].iov_base = q->payload;
            iov[n_iov].iov_len = q->len;
            n_iov++;
        }
        if (n_iov == 0) { /* only empty pbufs left */
            tl_relay_drop_up_queue(r);
            break;
        }
        struct msghdr msg = {0};
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)n_iov;
        ssize_t n = sendmsg(r->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                tl_rstats.upstream_full++;
                break;
            }
            return tl_relay_fail(r, tl_relay_upstream_failure(errno)); /* EPIPE, ... */
        }
        size_t left = (size_t)n;
        while (left > 0) {
            u16_t step = left > 0xFFFF ? 0xFFFF : (u16_t)left;
            r->up_queue = pbuf_free_header(r->up_queue, step);
            if (r->pcb) tcp_recved(r->pcb, step);
            left -= step;
        }
        if (r->up_queue == NULL) tl_relay_drop_up_queue(r); /* the tail went with it */
        r->bytes_up += (uint64_t)n;
        tl_relay_touch(r);
    }
    if (r->up_queue == NULL && r->client_eof && !r->upstream_shut) {
        shutdown(r->fd, SHUT_WR);
        r->upstream_shut = 1;
    }
    return TL_GOES_ON;
}

static err_t tl_relay_on_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err)
{
    struct tl_relay *r = (struct tl_relay *)arg;
    if (p == NULL) {
        r->client_eof = 1;
    } else {
        if (err != ERR_OK) { /* never happens in lwIP 2.1.3; keep the window honest anyway */
            tcp_recved(pcb, p->tot_len);
            pbuf_free(p);
            return ERR_OK;
        }
        if (r->want_first_data) {
            r->want_first_data = 0;
            u16_t n = pbuf_copy_partial(p, tl_relay_buf,
                                        p->tot_len < TL_RELAY_FIRST_DATA_MAX ? p->tot_len
                                                                             : TL_RELAY_FIRST_DATA_MAX, 0);
            if (r->flow != NULL) tl_dial_first_data(r->flow, tl_relay_buf, n);
            else TL_PY(tl_py_relay_first_data(r->conn, tl_relay_buf, n));
            if (r->ended) { /* the callback aborted the relay (and the PCB) */
                pbuf_free(p);
                return ERR_ABRT;
            }
        }
        tl_relay_queue_up(r, p);
    }
    if (p == NULL) tl_relay_release_pcb(r); /* at once: lwIP may free a TIME-WAIT PCB */
    if (tl_deferring) { /* one write per relay per input batch (tl_relay_defer_end) */
        if (!r->dirty) {
            r->dirty = 1;
            r->dirty_next = tl_dirty;
            tl_dirty = r;
        }
        return ERR_OK;
    }
    int outcome = tl_relay_flush_up(r);
    if (outcome == TL_GOES_ON) outcome = tl_relay_settle(r);
    return outcome == TL_ABORTED ? ERR_ABRT : ERR_OK;
}

/* Batching: while lwIP processes a batch of input packets, client bytes are only queued;
 * the end of the batch writes each relay's queue with one sendmsg (and reopens the client's
 * window once), instead of one write per segment. */
void tl_relay_defer_begin(void) { tl_deferring = 1; }

void tl_relay_defer_end(void)
{
    tl_deferring = 0;
    while (tl_dirty != NULL) {
        struct tl_relay *r = tl_dirty;
        tl_dirty = r->dirty_next;
        r->dirty = 0;
        if (tl_relay_flush_up(r) != TL_GOES_ON) continue;
        tl_relay_settle(r);
    }
}

/* ---- upstream -> client ------------------------------------------------------------------- */

/* Read from the socket while lwIP has room (spilled bytes first); EOF -> FIN, error -> reset.
 * A short read means the socket is empty: no second recv() to hear EAGAIN, and none when lwIP
 * reports room again (the sent callback) until epoll (level-triggered) says there is more. */
static int tl_relay_pump_down(struct tl_relay *r)
{
    if (r->pcb == NULL) return TL_GOES_ON;
    if (r->down_spill_len > 0) {
        int queued = tl_tcp_write(r->pcb, r->down_spill, r->down_spill_len);
        if (queued < 0) return tl_relay_fail(r, TL_RELAY_ERROR);
        memmove(r->down_spill, r->down_spill + queued, r->down_spill_len - (u32_t)queued);
        r->down_spill_len -= (u32_t)queued;
        if (r->down_spill_len > 0) {
            tcp_output(r->pcb);
            return TL_GOES_ON;
        }
        free(r->down_spill);
        r->down_spill = NULL;
    }
    while (!r->upstream_eof && !r->drained) {
        u32_t room = tl_tcp_sndbuf(r->pcb);
        if (room == 0) {
            tl_rstats.client_full++;
            break;
        }
        size_t want = room < sizeof tl_relay_buf ? room : sizeof tl_relay_buf;
        ssize_t n = recv(r->fd, tl_relay_buf, want, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                r->drained = 1;
                break;
            }
            return tl_relay_fail(r, tl_relay_upstream_failure(errno));
        }
        if (n > 0 && (size_t)n < want) r->drained = 1;
        if (n == 0) {
            r->upstream_eof = 1;
            if (tcp_shutdown(r->pcb, 0, 1) != ERR_OK) return tl_relay_fail(r, TL_RELAY_ERROR);
            r->client_shut = 1;
            break;
        }
        r->bytes_down += (uint64_t)n;
        r->no_error_watch = 0; /* (tl_relay_on_socket_error) */
        tl_relay_touch(r);
        int queued = tl_tcp_write(r->pcb, tl_relay_buf, (size_t)n);
        if (queued < 0) return tl_relay_fail(r, TL_RELAY_ERROR);
        if (queued < n) { /* lwIP ran out of segments: keep the rest, never drop it */
            r->down_spill = malloc((size_t)n - (size_t)queued);
            if (r->down_spill == NULL) return tl_relay_fail(r, TL_RELAY_ERROR);
            memcpy(r->down_spill, tl_relay_buf + queued, (size_t)n - (size_t)queued);
            r->down_spill_len = (u32_t)(n - queued);
            tl_rstats.spills++;
            break;
        }
    }
    tcp_output(r->pcb);
    return TL_GOES_ON;
}

static err_t tl_relay_on_sent(void *arg, struct tcp_pcb *pcb, u16_t len)
{
    struct tl_relay *r = (struct tl_relay *)arg;
    LWIP_UNUSED_ARG(pcb); LWIP_UNUSED_ARG(len);
    int outcome = tl_relay_pump_down(r);
    if (outcome == TL_GOES_ON) outcome = tl_relay_settle(r);
    return outcome == TL_ABORTED ? ERR_ABRT : ERR_OK;
}

static void tl_relay_on_error(void *arg, err_t err)
{
    struct tl_relay *r = (struct tl_relay *)arg;
    r->pcb = NULL; /* lwIP has freed it */
    if (err == ERR_CLSD && r->client_eof && r->client_shut) {
        tl_relay_settle(r); /* lwIP finished its side cleanly; the socket side goes on */
        return;
    }
    /* ERR_ABRT from lwIP itself: its slow timer gave up on the client (keepalive probes or
     * retransmissions unanswered) and sent it a RST; the upstream is reset in turn. */
    tl_relay_end(r, err == ERR_RST ? TL_RELAY_CLIENT_RESET
                    : err == ERR_ABRT ? TL_RELAY_CLIENT_TIMEOUT : TL_RELAY_ERROR);
}

/* ---- epoll -------------------------------------------------------------------------------- */

/* Watch what the relay waits for. A poll set that refuses the fd ends the relay: it would
 * never be woken again. Waiting for nothing (the upstream sent EOF, or the client's window is
 * full), the socket stays in the set with no events, for errors only (epoll always reports
 * EPOLLERR and EPOLLHUP): an upstream that dies meanwhile, reset or given up by keepalive,
 * must still reset a quiet client, as there may be no idle limit to end the flow. Not once
 * both directions of the socket are shut: that hang-up is normal and would spin the loop. */
static int tl_relay_update_watch(struct tl_relay *r)
{
    u32_t want = 0;
    if (r->up_queue != NULL) want |= EPOLLOUT;
    if (r->pcb != NULL && !r->upstream_eof && r->down_spill_len == 0 && tl_tcp_sndbuf(r->pcb) > 0)
        want |= EPOLLIN | EPOLLRDHUP;
    u8_t in_set = want != 0 || !(r->no_error_watch || (r->upstream_eof && r->upstream_shut));
    if (want == r->watching && in_set == r->in_set) return TL_GOES_ON;
    struct epoll_event ev = {.events = want, .data.ptr = r};
    int rc = !in_set ? tl_poll_ctl(EPOLL_CTL_DEL, r->fd, NULL)
                     : tl_poll_ctl(r->in_set ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, r->fd, &ev);
    if (rc != 0 && want == 0 && in_set) { /* no room to watch for errors only: do without */
        if (r->in_set) tl_poll_ctl(EPOLL_CTL_DEL, r->fd, NULL);
        r->no_error_watch = 1;
        in_set = 0;
    } else if (rc != 0 && in_set) {
        tl_rstats.poll_errors++;
        return tl_relay_fail(r, TL_RELAY_ERROR);
    }
    r->watching = want;
    r->in_set = in_set;
    return TL_GOES_ON;
}

/* An error or hang-up while the relay waited for nothing else (tl_relay_update_watch): end
 * it with the socket's error. Not while the socket still holds bytes the upstream sent before
 * (the client's window is full): those go first, as on a direct path, and reading them
 * resumes the error watch (tl_relay_pump_down); reading SO_ERROR would clear the error and
 * turn the reset into a clean EOF. Without an error (a hang-up of a clean close under way),
 * stop watching for errors only: the level-triggered hang-up would spin the poll loop. */
static int tl_relay_on_socket_error(struct tl_relay *r)
{
    int queued = 0;
    if (!r->upstream_eof && ioctl(r->fd, FIONREAD, &queued) == 0 && queued > 0) {
        r->no_error_watch = 1;
        return tl_relay_settle(r);
    }
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(r->fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0)
        return tl_relay_fail(r, tl_relay_upstream_failure(err));
    r->no_error_watch = 1;
    return tl_relay_settle(r);
}

/* Both FINs are exchanged: lwIP now finishes the connection on its own (LAST-ACK, CLOSING,
 * TIME-WAIT) and frees the PCB without telling us, possibly while the upstream socket has not
 * yet taken the client's last bytes. Let go of the PCB now; the relay goes on for the socket.
 * In these states tcp_close only marks the PCB as closed by us (no RST, no callback). */
static void tl_relay_release_pcb(struct tl_relay *r)
{
    if (r->pcb == NULL || !r->client_eof || !r->client_shut) return;
    if (r->pcb->state == ESTABLISHED || r->pcb->state == CLOSE_WAIT) return;
    struct tcp_pcb *pcb = r->pcb;
    r->pcb = NULL;
    tl_tcp_forget(pcb);
    tcp_close(pcb);
}

/* After any step: release a finished PCB, end if all is done, else watch what is still
 * awaited (in that order: a relay about to close its socket needs no new watch). */
static int tl_relay_settle(struct tl_relay *r)
{
    tl_relay_release_pcb(r);
    int outcome = tl_relay_maybe_finish(r);
    return outcome == TL_GOES_ON ? tl_relay_update_watch(r) : outcome;
}

/* The poll set reported events for a relay (poll.c's tl_relay_poll). */
void tl_relay_on_ready(struct tl_relay *r, uint32_t ev)
{
    if (r->ended) return;
    if ((ev & (EPOLLERR | EPOLLHUP)) && r->watching == 0) { /* waiting for nothing else */
        tl_relay_on_socket_error(r);
        return;
    }
    if ((ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && r->up_queue != NULL &&
        tl_relay_flush_up(r) != TL_GOES_ON)
        return;
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) {
        r->drained = 0;
        if (tl_relay_pump_down(r) != TL_GOES_ON) return;
    }
    tl_relay_settle(r);
}

/* ---- API ---------------------------------------------------------------------------------- */

/* Take over a connection and its upstream socket, for Python (conn) or for dial.c (flow).
 * Returns TL_GOES_ON, TL_ENDED or TL_ABORTED with *out set to the relay while it goes on, or
 * -1 if nothing was taken over (no memory). */
static int tl_relay_start(struct tcp_pcb *pcb, int fd, uintptr_t conn, struct tl_dial *flow,
                          const uint8_t *pending, size_t len, int client_eof,
                          int want_first_data, int registered, struct tl_relay **out)
{
    *out = NULL;
    if (tl_relay_epoll_fd() < 0) return -1;
    struct tl_relay *r = calloc(1, sizeof *r);
    if (r == NULL) return -1;
    r->entry.kind = TL_POLL_RELAY;
    if (len > 0) {
        /* Bytes the Python stream buffered before the handover (not yet acknowledged). */
        while (len > 0) {
            u16_t step = len > 0xFFFF ? 0xFFFF : (u16_t)len;
            struct pbuf *p = pbuf_alloc(PBUF_RAW, step, PBUF_RAM);
            if (p == NULL) {
                tl_relay_drop_up_queue(r);
                free(r);
                return -1;
            }
            memcpy(p->payload, pending, step);
            tl_relay_append_up(r, p, 0);
            pending += step;
            len -= step;
        }
    }
    r->pcb = pcb;
    r->fd = fd;
    if (registered) { /* in the set, disarmed: the first tl_relay_update_watch re-arms (MOD) */
        r->in_set = 1;
        r->watching = EPOLLONESHOT; /* no events: never equal to what it will want */
    }
    /* A socket that just connected has mostly nothing to read yet: rather than a recv that
     * finds nothing, let the (level-triggered) watch report what a server sent first. */
    if (flow != NULL) r->drained = 1;
    r->conn = conn;
    r->flow = flow;
    r->client_eof = client_eof ? 1 : 0;
    r->want_first_data = want_first_data && !r->up_queue ? 1 : 0;
    tl_relay_touch(r);
    r->next = tl_relays;
    if (tl_relays) tl_relays->prev = r;
    tl_relays = r;
    tl_relay_n++;
    tl_rstats.opened++;
    if (flow != NULL) tl_dial_relay_opened(flow, r);
    tcp_arg(pcb, r);
    tcp_recv(pcb, tl_relay_on_recv);
    tcp_sent(pcb, tl_relay_on_sent);
    tcp_err(pcb, tl_relay_on_error);
    int outcome = tl_relay_flush_up(r);
    if (outcome == TL_GOES_ON) outcome = tl_relay_pump_down(r);
    if (outcome == TL_GOES_ON) outcome = tl_relay_settle(r);
    if (outcome == TL_GOES_ON) *out = r;
    return outcome;
}

int tl_relay_open(void *pcb_, int fd, uintptr_t conn, const uint8_t *pending, size_t len,
                  int client_eof, int want_first_data, void **out)
{
    struct tl_relay *r;
    int outcome = tl_relay_start((struct tcp_pcb *)pcb_, fd, conn, NULL, pending, len,
                                 client_eof, want_first_data, 0, &r);
    *out = r;
    return outcome < 0 ? -1 : 0;
}

/* dial.c's handover, from lwIP's accept callback: TL_ABORTED means the PCB is gone (answer
 * ERR_ABRT). Out of memory: the socket is closed, the flow reported ended, and the PCB is
 * aborted too. */
int tl_relay_adopt(struct tcp_pcb *pcb, int fd, struct tl_dial *flow, int registered)
{
    struct tl_relay *r;
    int outcome = tl_relay_start(pcb, fd, 0, flow, NULL, 0, 0, 1, registered, &r);
    if (outcome >= 0) return outcome;
    close(fd);
    tl_dial_relay_ended(flow, TL_RELAY_ERROR, 0, 0);
    tl_tcp_forget(pcb);
    tcp_abort(pcb);
    return TL_ABORTED;
}

void tl_relay_info(void *relay, tl_relay_stats *out)
{
    struct tl_relay *r = (struct tl_relay *)relay;
    out->bytes_up = r->bytes_up;
    out->bytes_down = r->bytes_down;
    out->idle_ms = sys_now() - r->last_active;
}

void tl_relay_abort(void *relay, int reason)
{
    if (reason <= TL_RELAY_CLOSED || reason > TL_RELAY_STOPPED) reason = TL_RELAY_STOPPED;
    tl_relay_end((struct tl_relay *)relay, reason); /* never a clean close: both ends reset */
}

/* lwIP probes only in ESTABLISHED and CLOSE-WAIT. After the upstream's EOF (our FIN sent
 * and acknowledged) the PCB waits in FIN-WAIT-2 for the client's, which a vanished client
 * never sends: with no idle limit the flow would be held forever. So probe there as lwIP's
 * slow timer does elsewhere, with the PCB's own timing (pcb->tmr: the last segment received;
 * keep_cnt_sent is reset by any segment). Returns 1 if the client was given up. */
static int tl_relay_probe_half_closed(struct tl_relay *r)
{
    struct tcp_pcb *pcb = r->pcb;
    if (pcb == NULL || pcb->state != FIN_WAIT_2 || !ip_get_option(pcb, SOF_KEEPALIVE)) return 0;
    u32_t quiet_ms = (u32_t)(tcp_ticks - pcb->tmr) * TCP_SLOW_INTERVAL;
    if (quiet_ms > pcb->keep_idle + pcb->keep_cnt * pcb->keep_intvl) {
        tl_relay_end(r, TL_RELAY_CLIENT_TIMEOUT); /* RST to the client, the upstream reset */
        return 1;
    }
    if (quiet_ms > pcb->keep_idle + pcb->keep_cnt_sent * pcb->keep_intvl &&
        tcp_keepalive(pcb) == ERR_OK)
        pcb->keep_cnt_sent++;
    return 0;
}

/* Reset relays idle for idle_ms or more (0: no idle limit), and probe half-closed clients
 * (tl_relay_probe_half_closed); returns how many ended. Called about once a second. */
int tl_relay_sweep(uint32_t idle_ms)
{
    int ended = 0;
    u32_t now = sys_now();
    struct tl_relay *r = tl_relays;
    while (r != NULL) {
        struct tl_relay *next = r->next;
        if (idle_ms > 0 && (u32_t)(now - r->last_active) >= idle_ms) {
            tl_relay_end(r, TL_RELAY_IDLE);
            ended++;
        } else {
            ended += tl_relay_probe_half_closed(r);
        }
        r = next;
    }
    tl_relay_bury();
    tl_dial_expire();
    return ended;
}

void tl_relay_abort_all(void)
{
    while (tl_relays != NULL) tl_relay_end(tl_relays, TL_RELAY_STOPPED);
    tl_relay_bury();
}

uint32_t tl_relay_count(void) { return tl_relay_n; }

const tl_relay_counters *tl_relay_get_counters(void) { return &tl_rstats; }

void tl_relay_reset_counters(void) { memset(&tl_rstats, 0, sizeof tl_rstats); }

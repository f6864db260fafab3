/*
 * TCP connections handed to Python: the per-port catch-all listeners, lwIP's callbacks of an
 * accepted connection, keepalive toward clients, and the flat wrappers Python calls (write,
 * recved, shutdown, close, abort).
 *
 * Theory of operation
 * -------------------
 * The input path (transport_input.c) makes sure a listener exists for a SYN's destination port
 * (tl_ensure_listener): one per port, bound to any address, kept for the life of the process.
 * lwIP then accepts with the client's destination as the connection's local address. An
 * accepted PCB gets a connection id from Python (tl_py_accept) as its tcp_arg, and its
 * recv/sent/err callbacks forward to Python, which only records the event. A C relay
 * (relay.c) may later take the PCB over with callbacks of its own.
 *
 * Invariants: a connection PCB handed to Python carries its connection id as tcp_arg; before
 * Python lets go of a PCB (close/abort) every callback is cleared (tl_tcp_forget) so no late
 * event reaches a dead object. Callbacks never re-enter lwIP input or timers.
 */
#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

/* Per-port catch-all listeners, kept for the life of the process: at most one per port (so
 * bounded), and a listener never closed never strands a half-open connection it spawned (lwIP
 * hands those to their listener's accept callback when the handshake completes). */
struct tcp_pcb *tl_listeners[65536];

/* Scratch buffer for flattening a received pbuf chain (single-threaded, never re-entered;
 * udp_icmp.c uses it too). */
uint8_t tl_in_scratch[65536];

/* Drop every callback of a PCB before letting it go (relay.c uses it too). */
void tl_tcp_forget(struct tcp_pcb *pcb)
{
    tcp_arg(pcb, NULL);
    if (pcb->state != LISTEN) {
        tcp_recv(pcb, NULL);
        tcp_sent(pcb, NULL);
        tcp_err(pcb, NULL);
        tcp_poll(pcb, NULL, 0);
    }
}

static err_t tl_on_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err)
{
    LWIP_UNUSED_ARG(pcb);
    uintptr_t conn = (uintptr_t)arg;
    if (p == NULL) {
        if (conn == 0) return ERR_OK;
        TL_PY(tl_py_recv(conn, NULL, 0, 0));
        if (pcb->state != ESTABLISHED && pcb->state != CLOSE_WAIT) {
            /* Our FIN went out first: lwIP finishes (CLOSING, TIME-WAIT) and frees the PCB on
             * its own, with no callback, while Python may still hold unread bytes. Let go of
             * it now (tcp_close only marks it closed in these states) and tell Python the
             * connection ended cleanly. */
            tl_tcp_forget(pcb);
            tcp_close(pcb);
            TL_PY(tl_py_error(conn, ERR_CLSD));
        }
        return ERR_OK;
    }
    if (err != ERR_OK || conn == 0) {
        /* No owner any more: treat the data as consumed so lwIP does not stall the window. */
        tcp_recved(pcb, p->tot_len);
        pbuf_free(p);
        return ERR_OK;
    }
    /* Data lwIP keeps (refused) is offered again only on an active PCB, and a PCB entering
     * TIME-WAIT drops it (tcp_pcb_purge) with no callback. A segment carrying the client's
     * FIN can move the PCB there before this callback (FIN-WAIT-2, or FIN-WAIT-1 -> CLOSING
     * -> TIME-WAIT on a bare ACK later): defer only where no FIN of the client's can follow
     * the kept data through tcp_process. */
    int may_defer = pcb->state == ESTABLISHED || pcb->state == FIN_WAIT_1 ||
                    pcb->state == FIN_WAIT_2 || pcb->state == CLOSE_WAIT;
    int taken;
    if (p->next == NULL) {
        taken = TL_PY(tl_py_recv(conn, (const uint8_t *)p->payload, p->len, may_defer));
    } else {
        u16_t n = pbuf_copy_partial(p, tl_in_scratch, p->tot_len, 0);
        taken = TL_PY(tl_py_recv(conn, tl_in_scratch, n, may_defer));
    }
    if (!taken) {
        /* The stream holds its per-connection budget: lwIP keeps the data (refused_data) and
         * offers it again once Python reads (tl_tcp_recved) or on its fast timer. */
        tl_stats.tcp_recv_deferred++;
        return ERR_MEM;
    }
    pbuf_free(p);
    return ERR_OK;
}

static err_t tl_on_sent(void *arg, struct tcp_pcb *pcb, u16_t len)
{
    LWIP_UNUSED_ARG(pcb);
    if (arg) TL_PY(tl_py_sent((uintptr_t)arg, len));
    return ERR_OK;
}

static void tl_on_error(void *arg, err_t err)
{
    /* lwIP has freed (or is freeing) the PCB: only tell Python, never touch it. */
    if (arg) TL_PY(tl_py_error((uintptr_t)arg, err));
}

/* ---- keepalive toward clients ------------------------------------------------------------ */

/* lwIP's keepalive timing for connections accepted from now on (idle_ms 0: none). Why per
 * accepted PCB: a flow should end when its client is gone, not when it is quiet, and lwIP
 * only probes PCBs with SOF_KEEPALIVE set. */
static u32_t tl_keep_idle_ms, tl_keep_intvl_ms, tl_keep_cnt;

void tl_set_tcp_keepalive(uint32_t idle_ms, uint32_t interval_ms, uint32_t count)
{
    tl_keep_idle_ms = idle_ms;
    tl_keep_intvl_ms = interval_ms > 0 ? interval_ms : 1000;
    tl_keep_cnt = count > 0 ? count : 1;
}

/* Called by the accept callback below for every new connection. */
static void tl_tcp_keepalive_apply(struct tcp_pcb *pcb)
{
    if (tl_keep_idle_ms == 0) {
        ip_reset_option(pcb, SOF_KEEPALIVE);
        return;
    }
    ip_set_option(pcb, SOF_KEEPALIVE);
    pcb->keep_idle = tl_keep_idle_ms;
    pcb->keep_intvl = tl_keep_intvl_ms;
    pcb->keep_cnt = tl_keep_cnt;
}

static err_t tl_on_accept(void *arg, struct tcp_pcb *newpcb, err_t err)
{
    LWIP_UNUSED_ARG(arg);
    if (err != ERR_OK || newpcb == NULL) return ERR_VAL;
    tl_half_open_done(newpcb);
    tcp_nagle_disable(newpcb);
    tl_tcp_keepalive_apply(newpcb);
    /* lwIP 2.1.3 sizes segments to min(MSS, largest window seen / 2), and to the MSS while that
     * half is 0. A client whose SYN offered a window of 0 or 1 thus got MSS-sized segments
     * queued, and a later small window made tcp_write find a queued segment larger than its new
     * size: the assertion "mss_local is too small" (abort; found by fuzz/packet_fuzzer.c). The
     * largest window only ever grows, so starting it at 2 * MSS keeps the size where lwIP's
     * fallback put it; it sizes segments and nothing else. */
    if (newpcb->snd_wnd_max < 2) newpcb->snd_wnd_max = (tcpwnd_size_t)(2 * newpcb->mss);
    int claimed = tl_dial_claim(newpcb); /* dialed in C: a C relay takes it, no Python */
    if (claimed < 0) return ERR_ABRT;
    if (claimed > 0) return ERR_OK;
    uintptr_t conn = TL_PY(tl_py_accept(newpcb));
    if (conn == 0) return ERR_MEM; /* lwIP aborts the new connection (RST) for us */
    tcp_arg(newpcb, (void *)conn);
    tcp_recv(newpcb, tl_on_recv);
    tcp_sent(newpcb, tl_on_sent);
    tcp_err(newpcb, tl_on_error);
    return ERR_OK;
}

int tl_ensure_listener(u16_t port)
{
    if (tl_listeners[port]) return 0;
    struct tcp_pcb *pcb = tcp_new_ip_type(IPADDR_TYPE_ANY);
    if (pcb == NULL) return -1;
    if (tcp_bind(pcb, IP_ANY_TYPE, port) != ERR_OK) {
        tcp_close(pcb);
        return -1;
    }
    tcp_ext_arg_set_callbacks(pcb, tl_ext_id, &tl_half_open_callbacks); /* tcp_listen copies it */
    err_t err;
    struct tcp_pcb *lpcb = tcp_listen_with_backlog_and_err(pcb, TCP_DEFAULT_LISTEN_BACKLOG, &err);
    if (lpcb == NULL) {
        tcp_close(pcb);
        return -1;
    }
    tcp_accept(lpcb, tl_on_accept);
    tl_listeners[port] = lpcb;
    tl_stats.listeners++;
    return 0;
}

/* ---- TCP wrappers ------------------------------------------------------------------------- */

void tl_tcp_endpoints(void *pcb_, tl_endpoint *local, tl_endpoint *remote)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    tl_endpoint_from(local, &pcb->local_ip, pcb->local_port);
    tl_endpoint_from(remote, &pcb->remote_ip, pcb->remote_port);
}

uint32_t tl_tcp_sndbuf(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    if (tcp_sndqueuelen(pcb) >= TCP_SND_QUEUELEN - 4) return 0;
    return tcp_sndbuf(pcb);
}

/* Queue as much of data as lwIP takes now (16-bit calls), then push it out. Returns bytes
 * queued (possibly 0) or a negative err_t when the connection cannot send. */
int tl_tcp_write(void *pcb_, const uint8_t *data, size_t len)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    size_t done = 0;
    err_t err = ERR_OK;
    while (done < len) {
        u32_t room = tl_tcp_sndbuf(pcb);
        if (room == 0) break;
        size_t chunk = len - done;
        if (chunk > room) chunk = room;
        if (chunk > 0xFFFF) chunk = 0xFFFF;
        u8_t flags = TCP_WRITE_FLAG_COPY | (done + chunk < len ? TCP_WRITE_FLAG_MORE : 0);
        err = tcp_write(pcb, data + done, (u16_t)chunk, flags);
        if (err == ERR_MEM) { err = ERR_OK; break; }
        if (err != ERR_OK) break;
        done += chunk;
    }
    if (done > 0) {
        tl_output_batch_begin(); /* the segments leave together (vnet.c) */
        tcp_output(pcb);
        tl_output_batch_end();
    }
    if (done == 0 && err != ERR_OK) return err;
    return (int)done;
}

void tl_tcp_recved(void *pcb_, size_t len)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    while (len > 0) {
        u16_t chunk = len > 0xFFFF ? 0xFFFF : (u16_t)len;
        tcp_recved(pcb, chunk);
        len -= chunk;
    }
}

int tl_tcp_offer_deferred(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    if (pcb->refused_data == NULL) return 0;
    /* Calls the recv callback again, now that the stream has room (it may refuse again). */
    return tcp_process_refused_data(pcb) == ERR_ABRT ? -1 : 1;
}

int tl_tcp_shutdown_tx(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    err_t err = tcp_shutdown(pcb, 0, 1);
    if (err == ERR_OK) tcp_output(pcb);
    return err;
}

void tl_tcp_close(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    tl_tcp_forget(pcb);
    if (tcp_close(pcb) != ERR_OK) tcp_abort(pcb);
}

void tl_tcp_abort(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    tl_tcp_forget(pcb);
    tcp_abort(pcb);
}

int tl_tcp_state(void *pcb_) { return ((struct tcp_pcb *)pcb_)->state; }

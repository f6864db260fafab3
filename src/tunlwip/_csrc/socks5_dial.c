/*
 * SOCKS5 CONNECT for the C dials: the handshake's state machine on a dial's socket to the proxy.
 *
 * Theory of operation
 * -------------------
 * A held SYN routed to a SOCKS5 proxy given by address is dialed by dial.c like any other, but
 * its socket connects to the proxy (tl_dial_start_socks5), and the dial carries one of these.
 * dial.c hands every readiness of that socket here (tl_socks5_ready) until the handshake is
 * done (1: the dial is connected, exactly as a direct dial whose connect succeeded) or failed
 * (-reason, with an errno). The steps (RFC 1928, RFC 1929):
 *
 *   CONNECTING  the non-blocking connect to the proxy: SO_ERROR says how it went (refused,
 *               timed out, unreachable are the proxy's own failures);
 *   METHOD      greeting sent (method 00, and 02 when the route has credentials); 2 bytes back;
 *   AUTH        the user/password request (built by Python once per route) sent; 2 bytes back;
 *   REPLY_HEAD  CONNECT sent (the destination's address, or its name as ATYP 3 when Python
 *               passed one); 5 bytes back: VER REP RSV ATYP and the address's first byte,
 *               which is enough to know the reply's whole length;
 *   REPLY_REST  the rest of the reply: the bound address (4, 16 or 1 + len bytes) and the port.
 *
 * Reads ask for exactly what the current answer still owes (recv with the remaining length), so
 * a byte the destination sent right after the reply (in the same segment) stays in the socket
 * for the relay. A reply is at most 262 bytes by construction (a 255-byte name), so a hostile
 * length cannot make us read more. Writes are a few hundred bytes at most and go out at once
 * on a connected socket; what the kernel does not take now waits for EPOLLOUT.
 *
 * Failures carry the reasons the Python client (egress/socks5_client.py, egress/socks5.py)
 * gives, in the same order of checks (version, reserved byte, address type, then the reply
 * code, then the bound name's characters), so a flow record reads the same whichever path
 * dialed it: TL_SOCKS5_* in tunlwip_glue.h, turned into text by binding/dial.py. Reply codes
 * 3-6 name the destination's failure (unreachable, refused, TTL expired), not the proxy's: their
 * errno is what a direct dial would have seen, so the client gets the same answer.
 *
 * Deadlines are dial.c's: the connect and the handshake together end within the proxy timeout
 * (tl_dial_set_proxy_timeout); tl_socks5_timeout_reason says which of the two it cut short.
 * Invariants: single-threaded; this file never closes the socket (dial.c owns it); the state is
 * one malloc, freed by dial.c with tl_socks5_free.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "tl_internal.h"

enum { TL_S5_CONNECTING, TL_S5_METHOD, TL_S5_AUTH, TL_S5_REPLY_HEAD, TL_S5_REPLY_REST };

#define TL_S5_MAX_REPLY (4 + 1 + 255 + 2)
#define TL_S5_MAX_AUTH (1 + 1 + 255 + 1 + 255)

struct tl_socks5 {
    uint8_t phase, with_auth;
    uint32_t watching;           /* the epoll events asked for now */
    uint16_t out_len, out_sent;  /* the message being sent */
    uint16_t need, have;         /* the answer being read */
    uint16_t request_len, auth_len;
    uint8_t out[TL_S5_MAX_AUTH];
    uint8_t in[TL_S5_MAX_REPLY];
    uint8_t request[TL_S5_MAX_REPLY];
    uint8_t auth[TL_S5_MAX_AUTH];
};

struct tl_socks5 *tl_socks5_new(const tl_endpoint *target, const char *name, const uint8_t *auth,
                                size_t auth_len, int *err)
{
    size_t name_len = name ? strlen(name) : 0;
    if ((name && (name_len == 0 || name_len > 255)) || auth_len > TL_S5_MAX_AUTH ||
        (auth_len > 0 && auth == NULL)) {
        *err = EINVAL;
        return NULL;
    }
    struct tl_socks5 *s = calloc(1, sizeof *s);
    if (s == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    uint8_t *r = s->request;
    *r++ = 5;
    *r++ = 1; /* CONNECT */
    *r++ = 0;
    if (name) {
        *r++ = 3;
        *r++ = (uint8_t)name_len;
        memcpy(r, name, name_len);
        r += name_len;
    } else {
        *r++ = target->family == 4 ? 1 : 4;
        memcpy(r, target->addr, target->family == 4 ? 4 : 16);
        r += target->family == 4 ? 4 : 16;
    }
    *r++ = (uint8_t)(target->port >> 8);
    *r++ = (uint8_t)(target->port & 0xFF);
    s->request_len = (uint16_t)(r - s->request);
    s->with_auth = auth_len > 0;
    if (auth_len) memcpy(s->auth, auth, auth_len);
    s->auth_len = (uint16_t)auth_len;
    s->phase = TL_S5_CONNECTING;
    s->watching = EPOLLOUT;
    return s;
}

void tl_socks5_free(struct tl_socks5 *s) { free(s); }

int tl_socks5_timeout_reason(const struct tl_socks5 *s)
{
    return s->phase == TL_S5_CONNECTING ? TL_SOCKS5_CONNECT_TIMEOUT : TL_SOCKS5_HANDSHAKE_TIMEOUT;
}

/* Queue a message and the answer it waits for. */
static void tl_s5_send(struct tl_socks5 *s, const uint8_t *msg, size_t len, int phase, int need)
{
    memcpy(s->out, msg, len);
    s->out_len = (uint16_t)len;
    s->out_sent = 0;
    s->phase = (uint8_t)phase;
    s->need = (uint16_t)need;
    s->have = 0;
}

static int tl_s5_fail(int reason, int errnum, int *err)
{
    *err = errnum;
    return -reason;
}

/* The reason and errno of a reply code other than success (egress/socks5.py's reply_error). */
static int tl_s5_reply_failure(uint8_t rep, int *err)
{
    switch (rep) {
    case 1: return tl_s5_fail(TL_SOCKS5_GENERAL_FAILURE, EPROTO, err);
    case 2: return tl_s5_fail(TL_SOCKS5_NOT_ALLOWED, EACCES, err);
    case 3: return tl_s5_fail(TL_SOCKS5_NET_UNREACHABLE, ENETUNREACH, err);
    case 4: return tl_s5_fail(TL_SOCKS5_HOST_UNREACHABLE, EHOSTUNREACH, err);
    case 5: return tl_s5_fail(TL_SOCKS5_DEST_REFUSED, ECONNREFUSED, err);
    case 6: return tl_s5_fail(TL_SOCKS5_TTL_EXPIRED, ETIMEDOUT, err);
    case 7: return tl_s5_fail(TL_SOCKS5_COMMAND_NOT_SUPPORTED, EPROTO, err);
    case 8: return tl_s5_fail(TL_SOCKS5_ATYP_NOT_SUPPORTED, EPROTO, err);
    default: return tl_s5_fail(TL_SOCKS5_UNKNOWN_REPLY, EPROTO, err);
    }
}

/* A whole answer arrived: the next step (0), done (1), or -reason. */
static int tl_s5_answer(struct tl_socks5 *s, int *err)
{
    const uint8_t *in = s->in;
    switch (s->phase) {
    case TL_S5_METHOD:
        if (in[0] != 5) return tl_s5_fail(TL_SOCKS5_BAD_VERSION, EPROTO, err);
        if (in[1] == 0xFF) return tl_s5_fail(TL_SOCKS5_NO_METHOD, EACCES, err);
        if (in[1] == 2 && s->with_auth) {
            tl_s5_send(s, s->auth, s->auth_len, TL_S5_AUTH, 2);
            return 0;
        }
        if (in[1] != 0) return tl_s5_fail(TL_SOCKS5_UNOFFERED_METHOD, EPROTO, err);
        tl_s5_send(s, s->request, s->request_len, TL_S5_REPLY_HEAD, 5);
        return 0;
    case TL_S5_AUTH:
        if (in[0] != 1) return tl_s5_fail(TL_SOCKS5_BAD_AUTH_VERSION, EPROTO, err);
        if (in[1] != 0) return tl_s5_fail(TL_SOCKS5_AUTH_FAILED, EACCES, err);
        tl_s5_send(s, s->request, s->request_len, TL_S5_REPLY_HEAD, 5);
        return 0;
    case TL_S5_REPLY_HEAD:
        if (in[0] != 5) return tl_s5_fail(TL_SOCKS5_BAD_VERSION, EPROTO, err);
        if (in[2] != 0) return tl_s5_fail(TL_SOCKS5_BAD_RESERVED, EPROTO, err);
        if (in[3] == 1) s->need = 4 + 4 + 2;
        else if (in[3] == 4) s->need = 4 + 16 + 2;
        else if (in[3] != 3) return tl_s5_fail(TL_SOCKS5_BAD_ADDRESS_TYPE, EPROTO, err);
        else if (in[4] == 0) return tl_s5_fail(TL_SOCKS5_BAD_ADDRESS, EPROTO, err);
        else s->need = (uint16_t)(4 + 1 + in[4] + 2);
        s->phase = TL_S5_REPLY_REST; /* need > 5 in every case: more to read */
        return 0;
    default: /* TL_S5_REPLY_REST: the whole reply */
        if (in[1] != 0) return tl_s5_reply_failure(in[1], err);
        if (in[3] == 3)
            for (int i = 0; i < in[4]; i++)
                if (in[5 + i] < 0x21 || in[5 + i] >= 0x7F)
                    return tl_s5_fail(TL_SOCKS5_BAD_ADDRESS, EPROTO, err);
        return 1;
    }
}

/* The connect's outcome: the proxy's own failure, or 0 (the greeting queued). */
static int tl_s5_connected(struct tl_socks5 *s, int fd, uint32_t events, int *err)
{
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) soerr = errno;
    if (soerr == 0 && !(events & EPOLLOUT)) soerr = ECONNRESET;
    if (soerr == ECONNREFUSED) return tl_s5_fail(TL_SOCKS5_REFUSED, ECONNREFUSED, err);
    if (soerr == ETIMEDOUT) return tl_s5_fail(TL_SOCKS5_CONNECT_TIMEOUT, ETIMEDOUT, err);
    if (soerr != 0) return tl_s5_fail(TL_SOCKS5_UNREACHABLE, soerr, err);
    static const uint8_t plain[] = {5, 1, 0}, with_auth[] = {5, 2, 0, 2};
    if (s->with_auth) tl_s5_send(s, with_auth, sizeof with_auth, TL_S5_METHOD, 2);
    else tl_s5_send(s, plain, sizeof plain, TL_S5_METHOD, 2);
    return 0;
}

static void tl_s5_watch(struct tl_socks5 *s, int fd, void *owner, uint32_t want)
{
    if (want == s->watching) return;
    struct epoll_event ev = {.events = want, .data.ptr = owner};
    if (tl_epoll_fd >= 0 && tl_poll_ctl(EPOLL_CTL_MOD, fd, &ev) == 0) s->watching = want;
}

int tl_socks5_ready(struct tl_socks5 *s, int fd, uint32_t events, void *owner, int *err)
{
    *err = 0;
    if (s->phase == TL_S5_CONNECTING) {
        int rc = tl_s5_connected(s, fd, events, err);
        if (rc != 0) return rc;
    }
    for (;;) {
        if (s->out_sent < s->out_len) {
            ssize_t n = send(fd, s->out + s->out_sent, s->out_len - s->out_sent,
                             MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                tl_s5_watch(s, fd, owner, EPOLLOUT);
                return 0;
            }
            if (n < 0) return tl_s5_fail(TL_SOCKS5_BROKEN, errno, err);
            s->out_sent = (uint16_t)(s->out_sent + n);
            continue;
        }
        /* exactly what the answer still owes: nothing past it is taken from the socket */
        ssize_t n = recv(fd, s->in + s->have, s->need - s->have, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            tl_s5_watch(s, fd, owner, EPOLLIN);
            return 0;
        }
        if (n < 0) return tl_s5_fail(TL_SOCKS5_BROKEN, errno, err);
        if (n == 0) return tl_s5_fail(TL_SOCKS5_CLOSED, ECONNRESET, err);
        s->have = (uint16_t)(s->have + n);
        if (s->have < s->need) continue;
        int rc = tl_s5_answer(s, err);
        if (rc != 0) return rc;
    }
}

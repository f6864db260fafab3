/*
 * The packet fuzzer's checks (harness.h has the layout): the embedder's callbacks and what the
 * harness asserts about everything the stack hands out.
 *
 * The tl_py_* callbacks are what stack.py, tcp.py and relay.py provide. Like the real ones they
 * only record events (the C layer's invariant: no re-entry into lwIP from a callback; the one
 * exception relay.c supports, aborting a relay from its first-data callback, is exercised) and
 * decide from the current record's arg: accept or refuse a connection, hold a SYN, take a
 * datagram. They abort on anything the C layer must never hand the embedder: a released
 * connection, a packet longer than the MTU or with an inconsistent IP length, a datagram from or
 * to port 0 or to a multicast address.
 *
 * After every record, packet_fuzzer.c calls check_vnet_output (what vnet.c wrote to the device
 * in virtio-net mode) and check_input_checked (no hook bypass, the half-open bound, the MSS
 * floor).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/virtio_net.h>

#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

#include "harness.h"

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
    if ((decide & 0x06) == 0x06 && fuzz_dial_start(dst) > 0) return 1; /* dialed in C (dial.c) */
    if ((decide & 1) || held_n == MAX_HELD) return 0; /* not intercepted: lwIP answers at once */
    held[held_n].pkt = malloc(len);
    if (held[held_n].pkt == NULL) abort();
    memcpy(held[held_n].pkt, packet, len);
    held[held_n].len = len;
    held_n++;
    return 1;
}

/* The last client datagram: what the "relay" of a SOCKS5 session answers, so the fuzzer's
 * bytes reach socks5_udp.c's header check as they are (or behind the session's own header). */
static uint8_t udp_last[65536];
static size_t udp_last_len;

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
    udp_last_len = len < sizeof udp_last ? len : sizeof udp_last;
    memcpy(udp_last, data, udp_last_len); /* a SOCKS5 relay's answer, below */
    if (decide & 4) udp_session_open(src, dst); /* udp_forward.py: the flow is relayed in C */
    return (decide & 2) == 0; /* sometimes nobody takes it (counted as unhandled) */
}

/* ---- UDP sessions relayed in C (udp_forward.py's default path) ---------------------------- */

#define MAX_UDP_SESSIONS 8
static struct {
    void *relay;
    int fd, peer;
    uint8_t socks5[262]; /* through a SOCKS5 relay: the header C prepends (socks5_len > 0) */
    size_t socks5_len;
} udp_sessions[MAX_UDP_SESSIONS];
static int udp_sessions_n;

/* The SOCKS5 UDP header of a session to dst: by address, or (decide & 0x10) by a name, as
 * udp_routes.py asks (the name's replies may then come from any address). */
static size_t socks5_header(uint8_t *h, const tl_endpoint *dst, int *any_address)
{
    size_t n = 3;
    memset(h, 0, 3);
    *any_address = (decide & 0x10) != 0;
    if (*any_address) {
        h[n++] = 3;
        h[n++] = 6;
        memcpy(h + n, "x.test", 6);
        n += 6;
    } else {
        h[n++] = dst->family == 4 ? 1 : 4;
        memcpy(h + n, dst->addr, dst->family == 4 ? 4 : 16);
        n += dst->family == 4 ? 4 : 16;
    }
    h[n++] = (uint8_t)(dst->port >> 8);
    h[n++] = (uint8_t)dst->port;
    return n;
}

/* A session for the flow, its "upstream" a datagram socketpair whose other end we play; with
 * decide & 8, through a SOCKS5 relay (the header added and checked in C). */
void udp_session_open(const tl_endpoint *src, const tl_endpoint *dst)
{
    if (udp_sessions_n == MAX_UDP_SESSIONS) return;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) return;
    void *relay = NULL;
    int rc = tl_udp_relay_open(src, dst, sv[0], (uintptr_t)udp_sessions_n + 1, &relay);
    if (rc != 0) { /* the flow has a session (-EEXIST) or the poll set refused it */
        close(sv[0]);
        close(sv[1]);
        return;
    }
    udp_sessions[udp_sessions_n].relay = relay;
    udp_sessions[udp_sessions_n].fd = sv[0];
    udp_sessions[udp_sessions_n].peer = sv[1];
    udp_sessions[udp_sessions_n].socks5_len = 0;
    if (decide & 8) {
        int any_address;
        size_t n = socks5_header(udp_sessions[udp_sessions_n].socks5, dst, &any_address);
        if (tl_udp_relay_set_socks5(relay, udp_sessions[udp_sessions_n].socks5, n, any_address) != 0)
            abort(); /* a header of 8 to 262 bytes on a fresh session is always taken */
        udp_sessions[udp_sessions_n].socks5_len = n;
    }
    udp_sessions_n++;
}

static void udp_session_close(int i)
{
    tl_udp_relay_stats st;
    tl_udp_relay_close(udp_sessions[i].relay, &st); /* then its owner closes the socket */
    close(udp_sessions[i].fd);
    if (udp_sessions[i].peer >= 0) close(udp_sessions[i].peer);
    udp_sessions[i] = udp_sessions[--udp_sessions_n];
}

/* An application step on a session: the upstream answers (a datagram of a size from arg, up to
 * more than a client can take), reads what the relay sent it or goes away, the session's
 * counts are read, or the session is closed (idle, evicted). */
void udp_session_step(uint8_t arg)
{
    if (udp_sessions_n == 0) return;
    int i = (arg >> 4) % udp_sessions_n;
    static uint8_t buf[65536];
    switch (arg & 3) {
    case 0: {
        size_t len = (arg & 8) ? 65536 - (size_t)(arg & 4) * 2 : (size_t)(arg & 0xF4) * 11;
        const uint8_t *answer = buf;
        size_t hl = udp_sessions[i].socks5_len;
        if (hl > 0) { /* a SOCKS5 relay answers the client's last datagram: raw, or headed */
            answer = udp_last;
            len = udp_last_len;
            static uint8_t headed[262 + sizeof udp_last];
            if (arg & 8) {
                memcpy(headed, udp_sessions[i].socks5, hl);
                memcpy(headed + hl, udp_last, len);
                answer = headed;
                len += hl;
            }
        }
        for (int k = 0; k < 1 + (arg & 4); k++)
            (void)send(udp_sessions[i].peer, answer, len, MSG_DONTWAIT);
        tl_relay_poll(64);
        tl_udp_relay_bury();
        break;
    }
    case 1:
        if (arg & 8) { /* the upstream goes away: sends fail, ECONNREFUSED as a closed port */
            if (udp_sessions[i].peer >= 0) close(udp_sessions[i].peer);
            udp_sessions[i].peer = -1;
            break;
        }
        while (recv(udp_sessions[i].peer, buf, sizeof buf, MSG_DONTWAIT) > 0) {}
        break;
    case 2: {
        tl_udp_relay_stats st[4];
        tl_udp_relay_info(udp_sessions[i].relay, &st[0]);
        while (tl_udp_relay_touched(st, 4) == 4) {}
        break;
    }
    default:
        udp_session_close(i);
        break;
    }
}

void udp_sessions_teardown(void)
{
    while (udp_sessions_n > 0) udp_session_close(udp_sessions_n - 1);
    tl_udp_relay_close_all();
    if (tl_udp_relay_count() != 0) abort(); /* a session left here would be a leak */
    tl_udp_relay_reset_counters();
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

/* ---- checks after every record ------------------------------------------------------------ */

/* The Internet checksum's ones' complement sum of `p`, added to `sum`, folded to 16 bits. */
uint32_t ones_sum(const uint8_t *p, size_t len, uint32_t sum)
{
    for (size_t i = 0; i + 1 < len; i += 2) sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (len & 1) sum += (uint32_t)p[len - 1] << 8;
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    return sum;
}

/* Complete a partial TCP checksum as the kernel does (the field holds the pseudo-header's
 * sum; store the complement of the sum from csum_start on), then verify the segment the way a
 * receiver would: pseudo header and segment must sum to 0xFFFF. */
static int partial_checksum_completes(uint8_t *pkt, size_t len, unsigned ip_hlen, int v6,
                                      uint8_t proto)
{
    uint8_t *l4 = pkt + ip_hlen;
    size_t l4_len = len - ip_hlen;
    unsigned at = proto == 6 ? 16 : 6;
    uint16_t check = (uint16_t)~ones_sum(l4, l4_len, 0);
    l4[at] = (uint8_t)(check >> 8);
    l4[at + 1] = (uint8_t)check;
    uint32_t pseudo = v6 ? ones_sum(pkt + 8, 32, proto + (uint32_t)l4_len)
                         : ones_sum(pkt + 12, 8, proto + (uint32_t)l4_len);
    return ones_sum(l4, l4_len, pseudo) == 0xFFFF;
}

/* What vnet.c wrote: a header the kernel would take, then one packet as lwIP sends them (no
 * GSO), a TCP packet of several whole segments or a UDP datagram of several same-size ones
 * (GSO); every TCP packet's checksum and a joined datagram's is left partial and completes
 * to a valid one; IPv4 header checksums hold. Nothing may be held between steps, and a
 * socket pair never refuses GSO. */
void check_vnet_output(void)
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
        uint8_t proto = v6 ? pkt[6] : pkt[9];
        int tcp = proto == 6, uso = h.gso_type == 5; /* VIRTIO_NET_HDR_GSO_UDP_L4 */
        if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
            if (h.csum_start != ip_hlen || h.csum_offset != (tcp ? 16 : 6)) abort();
            if (!tcp && !uso) abort(); /* only TCP's and a joined datagram's are partial */
            if (len < ip_hlen + (tcp ? 20u : 8u)) abort();
            unsigned l4_hlen = tcp ? (pkt[ip_hlen + 12] >> 4) * 4u : 8u;
            if (h.hdr_len != ip_hlen + l4_hlen || h.hdr_len > len) abort();
            if (!partial_checksum_completes(pkt, len, ip_hlen, v6, proto)) abort();
        } else if (h.flags != 0 || tcp) {
            abort(); /* lwIP computed no TCP checksum: vnet.c must have marked it partial */
        }
        if (h.gso_type == VIRTIO_NET_HDR_GSO_NONE) {
            if (h.gso_size != 0 || len > cur_mtu) abort(); /* lwIP fragments to the MTU */
            continue;
        }
        if (uso) { /* one flow's datagrams of gso_size bytes, the last maybe shorter */
            if (proto != 17 || h.gso_size == 0 || h.hdr_len + h.gso_size > cur_mtu) abort();
            if (((size_t)pkt[ip_hlen + 4] << 8 | pkt[ip_hlen + 5]) != len - ip_hlen) abort();
            if (len - h.hdr_len <= h.gso_size) abort(); /* more than one datagram */
            continue;
        }
        if (h.gso_type != (v6 ? VIRTIO_NET_HDR_GSO_TCPV6 : VIRTIO_NET_HDR_GSO_TCPV4)) abort();
        if (!(h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || h.gso_size == 0) abort();
        if (h.hdr_len + h.gso_size > cur_mtu || len - h.hdr_len <= h.gso_size) abort();
        if ((pkt[ip_hlen + 13] & ~0x08) != 0x10) abort(); /* data: ACK, maybe PSH, no more */
    }
}

/* After every record: no segment reached tcp_input/udp_input except through the hooks'
 * checks (transport_input.c counts one that did as drop_unchecked: that is a bypass, a
 * finding), the half-open count stays within its bound and never grows above the limit, and no
 * connection's MSS is below the floor half_open.c sets at passive open (a later SYN must not
 * lower it). */
void check_input_checked(void)
{
    if (tl_stats.drop_unchecked != 0) abort();
    if (tl_stats.tcp_half_open > half_open_bound) abort();
    /* a UDP super-datagram never becomes more datagrams than vnet_input.c's bound (128) */
    if (tl_stats.input_gso_udp_datagrams > 128 * tl_stats.input_gso_udp) abort();
    for (struct tcp_pcb *c = tcp_active_pcbs; c; c = c->next)
        if (c->mss < tcp_eff_send_mss(TL_MIN_MSS, &c->local_ip, &c->remote_ip)) abort();
    half_open_bound = tl_stats.tcp_half_open > tl_max_half_open ? tl_stats.tcp_half_open
                                                                : tl_max_half_open;
}


/* ---- dials in C (dial.c): their upstreams are socketpairs, nothing connects anywhere ------ */

#define MAX_DIAL_PEERS 16
static int dial_peers[MAX_DIAL_PEERS]; /* the "servers" of dials, closed at teardown */
static int dial_peers_n;
static uint16_t dial_port;

int fuzz_dial_connector(const tl_endpoint *dst, tl_endpoint *local)
{
    if ((decide & 0x18) == 0x18) return -EMFILE; /* no socket: answered at once */
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) return -errno;
    if (dial_peers_n < MAX_DIAL_PEERS && !(decide & 0x20)) dial_peers[dial_peers_n++] = sv[1];
    else close(sv[1]); /* the upstream went away at once: EOF */
    *local = *dst; /* our "address": the destination's, another port (loops can be aimed at it) */
    dial_port = (uint16_t)(dial_port + 1) ? (uint16_t)(dial_port + 1) : 1;
    local->port = dial_port;
    return sv[0];
}

/* Dial the held SYN in C: directly, or (0x80) through a SOCKS5 "proxy" whose answers are the
 * PROXY records' bytes, by name (0x01) and offering user/password (0x40). */
static const uint8_t FUZZ_AUTH[] = {1, 4, 'u', 's', 'e', 'r', 4, 'p', 'a', 's', 's'};

int64_t fuzz_dial_start(const tl_endpoint *dst)
{
    if (!(decide & 0x80)) return tl_dial_start();
    return tl_dial_start_socks5(dst, (decide & 0x01) ? "example.com" : NULL,
                                (decide & 0x40) ? FUZZ_AUTH : NULL,
                                (decide & 0x40) ? sizeof FUZZ_AUTH : 0);
}

/* A PROXY record: the dial "server" picked by arg reads what it was sent (the greeting, the
 * requests) and answers the record's bytes, then maybe (0x80) half-closes; one poll round lets
 * the dials read it. Many small records drip a reply; one record may carry the reply and the
 * destination's first bytes together. */
void fuzz_proxy_answer(const uint8_t *data, size_t len, uint8_t arg)
{
    if (dial_peers_n == 0) return;
    int peer = dial_peers[(arg & 0x7F) % dial_peers_n];
    uint8_t buf[4096];
    while (recv(peer, buf, sizeof buf, MSG_DONTWAIT) > 0) {}
    if (len > 0) {
        ssize_t n = send(peer, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)n;
    }
    if (arg & 0x80) shutdown(peer, SHUT_WR);
    tl_relay_poll(64);
}

/* Take dial.c's events, as c_dials.py does after a pass; check what they carry. */
void fuzz_dial_events(void)
{
    tl_dial_event *e;
    int n = tl_dial_events(&e);
    for (int i = 0; i < n; i++) {
        if (e[i].kind < TL_DIAL_CONNECTED || e[i].kind > TL_DIAL_ENDED || e[i].id == 0) abort();
        if (e[i].len) touch(e[i].data, e[i].len);
        if (e[i].kind == TL_DIAL_FAILED && e[i].len < 20) abort(); /* the held SYN */
        if (e[i].proxy_reason < 0 || e[i].proxy_reason >= TL_SOCKS5_REASONS ||
            (e[i].proxy_reason && e[i].kind != TL_DIAL_FAILED)) abort();
        if (e[i].kind == TL_DIAL_OPENED) {
            tl_relay_stats st;
            tl_dial_flow_bytes(e[i].flow, &st);
        }
    }
    const tl_dial_counters *c = tl_dial_get_counters();
    if (c->dialing + c->connected > c->started) abort();
    if (c->proxied > c->dialing || c->socks5_connected > c->socks5_started) abort();
    uint64_t failed = 0;
    for (int i = 0; i < TL_SOCKS5_REASONS; i++) failed += c->socks5_failures[i];
    if (failed + c->socks5_connected + c->proxied > c->socks5_started) abort();
    uint64_t admit_totals[TL_ADMIT_KINDS]; /* admit.c's counts of C's dials, always exact */
    tl_admit_get_totals(admit_totals);
    if (admit_totals[TL_ADMIT_C_DIALING] != c->dialing ||
        admit_totals[TL_ADMIT_C_OPEN] != c->connected + c->relayed) abort();
    /* The flows C keeps alone: a subset of its relays, all of them listed, each readable. */
    if (c->alone > c->relayed || c->alone > c->alone_opened) abort();
    tl_dial_flow alone[64];
    int listed = tl_dial_flows_alone(alone, 64);
    if ((uint64_t)listed != (c->alone < 64 ? c->alone : 64)) abort();
    for (int i = 0; i < listed; i++)
        if (alone[i].id == 0 || alone[i].client.family != alone[i].target.family) abort();
}

uint64_t fuzz_flows_alone; /* flows C admitted and kept alone, over the whole run (report) */

void fuzz_dial_teardown(void)
{
    tl_dial_close_all(); /* relays were aborted already: every dial reports its end */
    fuzz_dial_events();
    fuzz_dial_events(); /* frees the last batch */
    const tl_dial_counters *c = tl_dial_get_counters();
    fuzz_flows_alone += c->alone_opened;
    if (c->dialing || c->connected || c->relayed || c->proxied || c->alone) abort(); /* nothing left */
    tl_admit_configure(0, 0, 0, 0, 0, NULL, 0);
    tl_admit_reset_counters();
    for (int i = 0; i < dial_peers_n; i++) close(dial_peers[i]);
    dial_peers_n = 0;
    tl_dial_configure(0, TL_PROTECT_NONE, 0, NULL, 0, 0, 0, 30000, 10000);
    tl_dial_set_proxy_timeout(10000);
    tl_dial_reset_counters();
}

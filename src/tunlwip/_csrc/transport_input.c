/*
 * The transport step of the input path: TCP, UDP and ICMP echo checks, then lwIP's tcp_input,
 * udp_input or icmp_input; and the TCP hook every segment passes inside lwIP.
 *
 * Theory of operation
 * -------------------
 * input.c has validated the IP header, reassembled fragments and filled ip_data, and calls
 * tl_transport_input with p->payload on the transport header. Here the header, ports, checksum
 * and TCP options are checked; a SYN gets a catch-all listener for its port (tcp_conn.c), or is
 * held to be dialed first (admit.c, else Python: tl_py_syn); a UDP port may be blocked or rejected; an echo
 * request is answered, forwarded or ignored (tl_set_icmp_echo_mode). Only then does lwIP see
 * the segment, with tl_checked_input set: lwIP's TCP hook (tl_hook_tcp_inpacket) and the UDP
 * callback (udp_icmp.c) drop anything that arrives without it.
 *
 * Invariants: every packet dropped here increments exactly one counter in tl_stats; the checks
 * keep lwIP 2.1.3's known flaws (option parsing, sequence ambiguity, MSS changes) out of any
 * client's reach (see each check).
 */
#include <string.h>

#include "lwip/icmp.h"
#include "lwip/icmp6.h"
#include "lwip/inet_chksum.h"
#include "lwip/priv/tcp_priv.h"
#include "lwip/prot/icmp.h"
#include "lwip/prot/icmp6.h"
#include "lwip/prot/ip6.h"
#include "lwip/prot/tcp.h"
#include "lwip/prot/udp.h"

#include "tl_internal.h"

int tl_releasing; /* tl_input_release: a held SYN comes back, never held again */

/* Set only while tl_transport_input hands a checked segment to tcp_input/udp_input: lwIP's
 * TCP hook and our UDP callback drop anything that arrives without it (tl_hook_tcp_inpacket). */
int tl_checked_input;

/* Is the unfragmented ICMP/ICMPv6 message at `icmp` (len bytes) an echo request? */
int tl_is_echo_request(const uint8_t *icmp, size_t len, int family)
{
    return len >= 1 && icmp[0] == (family == 4 ? ICMP_ECHO : ICMP6_TYPE_EREQ);
}

/*
 * An echo request to any address, once p->payload sits on the ICMP header and ip_data is
 * filled. Echo to the gateway's own address is always answered. Consumes p.
 */
static int tl_icmp_echo_input(struct pbuf *p, struct netif *inp, int family)
{
    u16_t len = p->tot_len;
    const ip_addr_t *src = ip_current_src_addr(), *dst = ip_current_dest_addr();
    if (len < 8) return tl_drop(p, &tl_stats.drop_transport_header);
    if (!tl_is_echo_request((const uint8_t *)p->payload, len, family))
        return tl_drop(p, &tl_stats.drop_unsupported); /* a reassembled non-echo ICMP message */
    u16_t sum = family == 4 ? inet_chksum_pbuf(p) : ip_chksum_pseudo(p, IP6_NEXTH_ICMP6, len, src, dst);
    if (tl_checksum_check && sum != 0) return tl_drop(p, &tl_stats.drop_transport_checksum);
    tl_stats.icmp_echo_in++;
    int own = family == 4 ? ip4_addr_cmp(ip_2_ip4(dst), netif_ip4_addr(inp))
                          : netif_get_ip6_addr_match(inp, ip_2_ip6(dst)) >= 0;
    if (tl_icmp_echo_mode == TL_ECHO_OFF && !own) return tl_drop(p, &tl_stats.drop_echo_off);
    if (tl_icmp_echo_mode == TL_ECHO_FORWARD && !own) {
        tl_endpoint s, d;
        tl_endpoint_from(&s, src, 0);
        tl_endpoint_from(&d, dst, 0);
        tl_stats.icmp_echo_forwarded++;
        /* p is one flat pbuf */
        TL_PY(tl_py_icmp_echo(&s, &d, (const uint8_t *)p->payload, len));
        pbuf_free(p);
        return 1;
    }
    /* lwIP answers from ip_current_dest_addr(), i.e. from the address the client pinged. */
    tl_stats.icmp_echo_replied++;
    if (family == 4) icmp_input(p, inp);
    else icmp6_input(p, inp);
    return 0;
}

/*
 * Two lwIP 2.1.3 flaws in tcp_parseopt, both found by fuzz/packet_fuzzer.c:
 *  - it reads an option's length byte before checking that it lies inside the header: a header
 *    whose last option byte is a kind other than EOL/NOP makes it read one byte past the
 *    options, which is past the packet when no data follows (heap over-read). Such a header is
 *    malformed: returns 0.
 *  - it takes an MSS option from any segment, not only a SYN: a smaller MSS mid-connection
 *    leaves queued data larger than the new MSS, and the next tcp_write fails the assertion
 *    "inconsistent oversize vs. space" (abort). The MSS option only counts in a SYN (RFC 9293
 *    3.7.1), so elsewhere it is overwritten with NOPs (the checksum was verified already and
 *    lwIP does not check it again).
 * Walks the options as lwIP will.
 */
static int tl_tcp_options_ok(u8_t *opt, u16_t optlen, int syn)
{
    u16_t i = 0;
    while (i < optlen) {
        u8_t kind = opt[i];
        if (kind == 0) return 1;          /* EOL: lwIP stops */
        if (kind == 1) { i++; continue; } /* NOP */
        if (i + 1 >= optlen) return 0;    /* the length byte lwIP reads is outside */
        u8_t len = opt[i + 1];
        if (len < 2) return 1;            /* lwIP stops at a bad length */
        if ((kind == 2 && len != 4) || (kind == 3 && len != 3) || (kind == 4 && len != 2))
            return 1;                     /* MSS, window scale, SACK-permitted: lwIP stops */
        if (kind == 2 && !syn && i + 4 <= optlen) memset(opt + i, 1, 4);
        i = (u16_t)(i + len);
    }
    return 1;
}

/* Overwrite MSS and window-scale options with NOPs (lwIP does not check the checksum again).
 * Walks exactly as far as lwIP's tcp_parseopt does and stops where it stops: a malformed
 * option must stay where it is, or lwIP would read on into options tl_tcp_options_ok never
 * looked at (found by fuzz/packet_fuzzer.c: a bad-length MSS option turned into NOPs let lwIP
 * read the length byte of a last-byte option past the packet). */
static void tl_tcp_options_neutralise(u8_t *opt, u16_t optlen)
{
    u16_t i = 0;
    while (i < optlen) {
        u8_t kind = opt[i];
        if (kind == 0) return;
        if (kind == 1) { i++; continue; }
        if (i + 1 >= optlen) return;
        u8_t len = opt[i + 1];
        if (len < 2 || i + len > optlen) return;
        if ((kind == 2 && len != 4) || (kind == 3 && len != 3) || (kind == 4 && len != 2))
            return; /* lwIP stops here */
        if (kind == 2 || kind == 3) memset(opt + i, 1, len);
        i = (u16_t)(i + len);
    }
}

/*
 * lwIP 2.1.3's tcp_receive compares sequence numbers with TCP_SEQ_BETWEEN, which is ambiguous
 * at half the sequence space: a segment of sequence length 1 (one byte, or a bare SYN or FIN)
 * starting exactly 2^31 before rcv_nxt passes for one that overlaps rcv_nxt, and lwIP fails the
 * assertion "insane offset!" (abort(); without assertions it would take the byte as in order).
 * Any client can send it (found by fuzz/packet_fuzzer.c). No valid segment lies 2^30 or more
 * from rcv_nxt (windows stay below 2^30, RFC 7323 2.3), so such segments of a connection are
 * dropped before lwIP sees them; lwIP would at most have answered them with an ACK.
 */
static int tl_tcp_seq_far(const struct tcp_pcb *pcb, const struct tcp_hdr *th)
{
    if (pcb->state == LISTEN || pcb->state == TIME_WAIT) return 0; /* no tcp_receive there */
    if ((TCPH_FLAGS(th) & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN)) == TCP_SYN)
        return 0; /* lwIP ignores a pure SYN's number */
    u32_t d = th->seqno - pcb->rcv_nxt; /* tcp_input turned the header to host order */
    return d >= 0x40000000UL && d <= 0xC0000000UL;
}

/*
 * LWIP_HOOK_TCP_INPACKET_PCB: tcp_input found the segment's PCB (a connection, a TIME-WAIT or
 * a listener) and asks whether to go on. This is the single point every TCP segment passes
 * before lwIP parses its options or sequence numbers, whatever path led into tcp_input, so it
 * is where the checks that keep lwIP's assertions out of reach are enforced:
 *  - the segment came through tl_transport_input (header, ports, checksum and options checked):
 *    a segment lwIP reached by its own IP input (an extension header or fragment train the
 *    hooks let through) is dropped and counted as drop_unchecked, which must stay 0;
 *  - its sequence number is not half the sequence space away (tl_tcp_seq_far); the PCB is at
 *    hand here, so this costs no list walk.
 * Returning anything but ERR_OK makes lwIP drop the segment.
 */
s8_t tl_hook_tcp_inpacket(struct tcp_pcb *pcb, struct tcp_hdr *hdr, u16_t optlen, u16_t opt1len,
                          u8_t *opt2, struct pbuf *p)
{
    LWIP_UNUSED_ARG(p);
    if (!tl_checked_input) {
        tl_stats.drop_unchecked++;
        return ERR_VAL;
    }
    if (tl_tcp_seq_far(pcb, hdr)) {
        tl_stats.drop_transport_header++;
        return ERR_VAL;
    }
    /* lwIP parses the options of every segment to a PCB in SYN_RCVD, and takes MSS and window
     * scale from any that carries SYN: a second SYN (or a SYN|ACK) would undo the MSS floor set
     * at passive open (MSS 1: a segment per byte) or switch window scaling on after the SYN-ACK
     * said otherwise. Only the first SYN, seen by the listener, negotiates them. */
    if (pcb->state != LISTEN && (TCPH_FLAGS(hdr) & TCP_SYN)) {
        if (opt2 != NULL || opt1len != optlen) return ERR_VAL; /* our pbufs are never split */
        tl_tcp_options_neutralise((u8_t *)hdr + TCP_HLEN, optlen);
    }
    return ERR_OK;
}

/*
 * Common transport step, once p->payload sits on the TCP/UDP header and ip_data is filled.
 * `packet`/`packet_len` is the whole IP packet (for a held SYN). Consumes p.
 */
int tl_transport_input(struct pbuf *p, struct netif *inp, u8_t proto, int family,
                              const uint8_t *packet, size_t packet_len)
{
    u16_t len = p->tot_len;
    const ip_addr_t *src = ip_current_src_addr(), *dst = ip_current_dest_addr();
    if (proto == IP_PROTO_TCP) {
        if (len < TCP_HLEN) return tl_drop(p, &tl_stats.drop_transport_header);
        const struct tcp_hdr *th = (const struct tcp_hdr *)p->payload;
        u16_t hdrlen = (u16_t)(TCPH_HDRLEN(th) * 4);
        if (hdrlen < TCP_HLEN || hdrlen > len) return tl_drop(p, &tl_stats.drop_transport_header);
        if (th->src == 0 || th->dest == 0) return tl_drop(p, &tl_stats.drop_port_zero);
        if (tl_checksum_check && !tl_input_vouched &&
            ip_chksum_pseudo(p, IP_PROTO_TCP, len, src, dst) != 0)
            return tl_drop(p, &tl_stats.drop_transport_checksum);
        u8_t flags = TCPH_FLAGS(th);
        if (!tl_tcp_options_ok((u8_t *)p->payload + TCP_HLEN, (u16_t)(hdrlen - TCP_HLEN),
                               flags & TCP_SYN))
            return tl_drop(p, &tl_stats.drop_transport_header);
        u16_t dport = lwip_ntohs(th->dest);
        if ((flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN)) == TCP_SYN) {
            /* A new SYN for a 4-tuple lwIP still holds in TIME-WAIT: lwIP would only ACK it
             * (tcp_timewait_input) and the client, reusing its port, would stall until the
             * TIME-WAIT ends. Like Linux (tcp_timewait_state_process), let the new connection
             * replace it. */
            u16_t sport_tw = lwip_ntohs(th->src);
            tl_trim_time_wait(0); /* keeps this walk and tcp_input's short */
            for (struct tcp_pcb *tw = tcp_tw_pcbs; tw; tw = tw->next) {
                if (tw->local_port == dport && tw->remote_port == sport_tw &&
                    ip_addr_cmp(&tw->local_ip, dst) && ip_addr_cmp(&tw->remote_ip, src)) {
                    tcp_abort(tw); /* TIME-WAIT: removed and freed, no RST */
                    tl_stats.time_wait_recycled++;
                    break;
                }
            }
            if (tl_hold_syns && !tl_releasing) {
                int known = 0;
                u16_t sport = lwip_ntohs(th->src);
                for (struct tcp_pcb *c = tcp_active_pcbs; c && !known; c = c->next)
                    known = c->local_port == dport && c->remote_port == sport &&
                            ip_addr_cmp(&c->local_ip, dst) && ip_addr_cmp(&c->remote_ip, src);
                if (!known) {
                    tl_endpoint s, d;
                    tl_endpoint_from(&s, src, sport);
                    tl_endpoint_from(&d, dst, dport);
                    int held = tl_dial_intercept(packet, packet_len, &s, &d); /* dial.c */
                    if (!held) held = tl_admit_try(&s, &d);                   /* admit.c */
                    if (!held) held = TL_PY(tl_py_syn(packet, packet_len, &s, &d));
                    tl_dial_current_end();
                    if (held) {
                        tl_stats.syn_held++;
                        pbuf_free(p);
                        return 1;
                    }
                }
            }
            if (tl_ensure_listener(dport) != 0) return tl_drop(p, &tl_stats.drop_no_memory);
        }
        if (tl_releasing) tl_stats.syn_released++;
        tl_stats.tcp_in++;
        tl_checked_input = 1;
        tcp_input(p, inp);
        tl_checked_input = 0;
        return 0;
    }
    if (proto == (family == 4 ? IP_PROTO_ICMP : IP6_NEXTH_ICMP6))
        return tl_icmp_echo_input(p, inp, family);
    /* UDP */
    if (len < UDP_HLEN) return tl_drop(p, &tl_stats.drop_transport_header);
    const struct udp_hdr *uh = (const struct udp_hdr *)p->payload;
    u16_t ulen = lwip_ntohs(uh->len);
    if (ulen < UDP_HLEN || ulen > len) return tl_drop(p, &tl_stats.drop_transport_header);
    if (ulen < len) {
        pbuf_realloc(p, ulen);
        len = ulen;
    }
    if (uh->src == 0 || uh->dest == 0) return tl_drop(p, &tl_stats.drop_port_zero);
    if (tl_checksum_check && !tl_input_vouched && (uh->chksum != 0 || family == 6) &&
        ip_chksum_pseudo(p, IP_PROTO_UDP, len, src, dst) != 0)
        return tl_drop(p, &tl_stats.drop_transport_checksum);
    u16_t dport = lwip_ntohs(uh->dest);
    if (tl_udp_port_actions[dport] == TL_UDP_DROP)
        return tl_drop(p, &tl_stats.drop_udp_port_blocked);
    if (tl_udp_port_actions[dport] == TL_UDP_REJECT) {
        /* As a closed port would: ICMP port unreachable quoting the datagram, so a client's
         * connected socket fails at once (QUIC clients then fall back to TCP). */
        tl_stats.udp_port_rejected++;
        pbuf_add_header_force(p, ip_current_header_tot_len());
        if (family == 4) icmp_dest_unreach(p, ICMP_DUR_PORT);
        else icmp6_dest_unreach(p, ICMP6_DUR_PORT);
        pbuf_free(p);
        return 1;
    }
    if (tl_udp_for_port(dport) == NULL) return tl_drop(p, &tl_stats.drop_no_memory);
    tl_stats.udp_in++;
    tl_checked_input = 1;
    udp_input(p, inp);
    tl_checked_input = 0;
    return 0;
}

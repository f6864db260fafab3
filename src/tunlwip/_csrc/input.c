/*
 * The input path: packets from the device into lwIP, through the accept-any IPv4/IPv6 input
 * hooks.
 *
 * Theory of operation
 * -------------------
 * Stock lwIP only accepts packets addressed to its netif. The IPv4/IPv6 input hooks below claim
 * every unicast TCP/UDP packet instead: they validate what ip4_input/ip6_input would, reassemble
 * fragments with lwIP's own ip4_reass/ip6_reass, make sure a catch-all PCB exists for the
 * destination port (a listener on a pure SYN, a UDP PCB bound to any address), fill ip_data the way
 * ip4_input/ip6_input do and call tcp_input/udp_input directly. lwIP then creates connections whose
 * local address is the original destination, so every reply leaves with the right source.
 * ICMP/ICMPv6 echo requests to any address are claimed the same way and answered by lwIP's own
 * icmp_input/icmp6_input (which reply from the address asked for), handed to Python for
 * forwarding, or ignored (tl_set_icmp_echo_mode). UDP to blocked ports (QUIC) is answered with
 * port unreachable or dropped before any PCB exists (tl_set_udp_port_action).
 * Everything else (other ICMP to the gateway address, ...) falls through to lwIP's normal path.
 * The transport step (checks, catch-all PCBs, lwIP's transport input) is transport_input.c;
 * the fragment-train table is frag_train.c.
 *
 * Invariants:
 *  - Only the trio thread calls in here, and never re-entrantly: Python callbacks record events
 *    and return; they never call back into lwIP input or timers.
 *  - Every packet dropped here increments exactly one counter in tl_stats.
 *  - ip_data is cleared again once a claimed packet has been handled (tl_clear_ip_data).
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "lwip/icmp.h"
#include "lwip/icmp6.h"
#include "lwip/inet_chksum.h"
#include "lwip/ip4_frag.h"
#include "lwip/ip6_frag.h"
#include "lwip/prot/icmp.h"
#include "lwip/prot/icmp6.h"
#include "lwip/prot/ip4.h"
#include "lwip/prot/ip6.h"
#include "lwip/prot/tcp.h"
#include "lwip/prot/udp.h"
#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

#define TL_IPPROTO_FRAGMENT 44

/* tl_input_fd's read: a header and an IP packet of up to 64 KiB (a GSO super-segment);
 * tl_input copies the packet out first */
static uint8_t tl_read_buf[TL_VNET_HDR_LEN + 65536];

int tl_drop(struct pbuf *p, uint64_t *counter)
{
    (*counter)++;
    pbuf_free(p);
    return 1;
}

/* Make the whole packet one contiguous pbuf (reassembly returns chains). */
static struct pbuf *tl_flatten(struct pbuf *p)
{
    if (p->next == NULL) return p;
    struct pbuf *q = pbuf_clone(PBUF_RAW, PBUF_RAM, p);
    pbuf_free(p);
    return q;
}

static void tl_clear_ip_data(void)
{
    ip_data.current_netif = NULL;
    ip_data.current_input_netif = NULL;
    ip_data.current_ip4_header = NULL;
    ip_data.current_ip6_header = NULL;
    ip_data.current_ip_header_tot_len = 0;
    ip_addr_set_zero(&ip_data.current_iphdr_src);
    ip_addr_set_zero(&ip_data.current_iphdr_dest);
}

/*
 * A packet to a local destination (loopback, link-local, 0/8, an address the gateway host owns)
 * is refused the way a closed or unreachable destination refuses it, so the client fails at once
 * instead of after its timeouts: TCP with a reset (ECONNREFUSED), UDP with ICMP port unreachable,
 * an echo request with ICMP host (IPv6: address) unreachable. Fragments, resets, malformed
 * headers and bad checksums get no answer. Counted in drop_local_destination either way.
 * p->payload is on the IP header (the hooks checked it); consumes p and clears ip_data.
 */
static int tl_refuse_local(struct pbuf *p, struct netif *inp, int family, u8_t proto,
                           int fragment)
{
    tl_stats.drop_local_destination++;
    u16_t hlen = IP6_HLEN;
    if (family == 4) {
        const struct ip_hdr *iph = (const struct ip_hdr *)p->payload;
        hlen = (u16_t)IPH_HL_BYTES(iph);
        ip_addr_copy_from_ip4(ip_data.current_iphdr_src, iph->src);
        ip_addr_copy_from_ip4(ip_data.current_iphdr_dest, iph->dest);
    } else {
        const struct ip6_hdr *ip6h = (const struct ip6_hdr *)p->payload;
        ip_addr_copy_from_ip6_packed(ip_data.current_iphdr_src, ip6h->src);
        ip_addr_copy_from_ip6_packed(ip_data.current_iphdr_dest, ip6h->dest);
    }
    ip_data.current_netif = inp; /* icmp6_dest_unreach answers through it */
    ip_data.current_input_netif = inp;
    const ip_addr_t *src = ip_current_src_addr(), *dst = ip_current_dest_addr();
    u16_t len = (u16_t)(p->tot_len - hlen);
    const u8_t *t = (const u8_t *)p->payload + hlen;
    if (fragment || p->len < hlen + 8) goto out; /* 8: a UDP header, an echo header */
    if (proto != IP_PROTO_ICMP && proto != IP6_NEXTH_ICMP6 &&
        ((t[0] | t[1]) == 0 || (t[2] | t[3]) == 0))
        goto out; /* port zero */
    const struct tcp_hdr *th = (const struct tcp_hdr *)t;
    if (proto == IP_PROTO_TCP) {
        if (p->len < hlen + TCP_HLEN || (TCPH_FLAGS(th) & TCP_RST) ||
            TCPH_HDRLEN(th) * 4 < TCP_HLEN || TCPH_HDRLEN(th) * 4 > len)
            goto out;
    } else if (proto == IP_PROTO_UDP) {
        u16_t ulen = (u16_t)(t[4] << 8 | t[5]);
        if (ulen < UDP_HLEN || ulen > len) goto out;
        if (ulen < len) pbuf_realloc(p, (u16_t)(hlen + ulen)); /* the checksum covers ulen */
        len = ulen;
    }
    if (tl_checksum_check && !tl_input_vouched) {
        pbuf_remove_header(p, hlen);
        int ok = proto == IP_PROTO_ICMP ? inet_chksum_pbuf(p) == 0
                 : (proto == IP_PROTO_UDP && family == 4 && (t[6] | t[7]) == 0) ||
                   ip_chksum_pseudo(p, proto, len, src, dst) == 0;
        pbuf_add_header_force(p, hlen);
        if (!ok) goto out;
    }
    if (proto == IP_PROTO_TCP) {
        u8_t flags = TCPH_FLAGS(th);
        u32_t seglen = (u32_t)(len - TCPH_HDRLEN(th) * 4) + ((flags & TCP_SYN) ? 1U : 0U) +
                       ((flags & TCP_FIN) ? 1U : 0U);
        /* as lwIP answers a segment without a connection (tcp_input) */
        tcp_rst(NULL, lwip_ntohl(th->ackno), lwip_ntohl(th->seqno) + seglen, dst, src,
                lwip_ntohs(th->dest), lwip_ntohs(th->src));
    } else if (family == 4) {
        icmp_dest_unreach(p, proto == IP_PROTO_UDP ? ICMP_DUR_PORT : ICMP_DUR_HOST);
    } else {
        icmp6_dest_unreach(p, proto == IP_PROTO_UDP ? ICMP6_DUR_PORT : ICMP6_DUR_ADDRESS);
    }
out:
    pbuf_free(p);
    tl_clear_ip_data();
    return 1;
}

int tl_hook_ip4_input(struct pbuf *p, struct netif *inp)
{
    if (p->len < IP_HLEN) return tl_drop(p, &tl_stats.drop_too_short);
    const struct ip_hdr *iph = (const struct ip_hdr *)p->payload;
    u16_t hlen = (u16_t)IPH_HL_BYTES(iph);
    u16_t totlen = lwip_ntohs(IPH_LEN(iph));
    if (hlen < IP_HLEN || hlen > p->len || totlen < hlen || totlen > p->tot_len)
        return tl_drop(p, &tl_stats.drop_ip_header);
    if (totlen < p->tot_len) pbuf_realloc(p, totlen);
    if (tl_checksum_check && inet_chksum(iph, hlen) != 0)
        return tl_drop(p, &tl_stats.drop_ip_checksum);

    u8_t proto = IPH_PROTO(iph);
    ip4_addr_t s, d;
    ip4_addr_copy(s, iph->src);
    ip4_addr_copy(d, iph->dest);
    if (!tl_is_client(4, (const uint8_t *)&s.addr)) return tl_drop(p, &tl_stats.drop_not_client);
    int fragment = (IPH_OFFSET(iph) & PP_HTONS(IP_OFFMASK | IP_MF)) != 0;
    /* Every fragment is reassembled here, never by ip4_input: what it reassembled would reach
     * tcp_input/udp_input past these checks. */
    if (fragment && proto != IP_PROTO_TCP && proto != IP_PROTO_UDP && proto != IP_PROTO_ICMP)
        return tl_drop(p, &tl_stats.drop_unsupported);
    int claimed = proto == IP_PROTO_TCP || proto == IP_PROTO_UDP ||
                  (proto == IP_PROTO_ICMP &&
                   (fragment || tl_is_echo_request((const uint8_t *)p->payload + hlen,
                                                   (size_t)(p->len - hlen), 4)));
    if (!claimed) {
        tl_stats.other_in++;
        return 0; /* lwIP's own path: other ICMP to the gateway address, errors, drops */
    }
    if (ip4_addr_isany_val(s) || ip4_addr_isbroadcast(&s, inp) || ip4_addr_ismulticast(&s) ||
        ip4_addr_isany_val(d) || ip4_addr_isbroadcast(&d, inp) || ip4_addr_ismulticast(&d))
        return tl_drop(p, &tl_stats.drop_bad_address);
    /* The gateway host's own loopback and link-local networks and its own addresses are never
     * a client's destination: forwarding them would open the host's local services (and a
     * cloud's metadata address, 169.254.169.254) to every client. Routers do not forward them
     * either. */
    if (!tl_forward_local &&
        (ip4_addr_isloopback(&d) || ip4_addr_islinklocal(&d) || ip4_addr_get_byte(&d, 0) == 0 ||
         tl_is_host_address(4, &d.addr)))
        return tl_refuse_local(p, inp, 4, proto, fragment);

    if (fragment) {
        u32_t id = IPH_ID(iph);
        if (tl_frag_protocol_differs(4, &s.addr, &d.addr, id, proto))
            return tl_drop(p, &tl_stats.drop_fragment_protocol);
        tl_stats.fragments_in++;
        ip_data.current_input_netif = inp;
        p = ip4_reass(p);
        ip_data.current_input_netif = NULL;
        if (p == NULL) return 1;
        p = tl_flatten(p);
        if (p == NULL) {
            tl_stats.drop_no_memory++;
            return 1;
        }
        tl_stats.datagrams_reassembled++;
        iph = (const struct ip_hdr *)p->payload;
        hlen = (u16_t)IPH_HL_BYTES(iph);
        proto = IPH_PROTO(iph); /* the header of the fragment at offset 0 */
        int first = tl_frag_train_end(4, &s.addr, &d.addr, id);
        if (first >= 0 && first != proto) return tl_drop(p, &tl_stats.drop_fragment_protocol);
    }

    const uint8_t *packet = (const uint8_t *)p->payload;
    size_t packet_len = p->tot_len;
    ip_data.current_netif = inp;
    ip_data.current_input_netif = inp;
    ip_data.current_ip4_header = iph;
    ip_data.current_ip6_header = NULL;
    ip_data.current_ip_header_tot_len = hlen;
    ip_addr_copy_from_ip4(ip_data.current_iphdr_src, iph->src);
    ip_addr_copy_from_ip4(ip_data.current_iphdr_dest, iph->dest);
    pbuf_remove_header(p, hlen);
    tl_transport_input(p, inp, proto, 4, packet, packet_len);
    tl_clear_ip_data();
    return 1;
}

int tl_hook_ip6_input(struct pbuf *p, struct netif *inp)
{
    if (p->len < IP6_HLEN) return tl_drop(p, &tl_stats.drop_too_short);
    struct ip6_hdr *ip6h = (struct ip6_hdr *)p->payload;
    u16_t plen = IP6H_PLEN(ip6h);
    if (plen == 0 || (u32_t)plen + IP6_HLEN > p->tot_len)
        return tl_drop(p, &tl_stats.drop_ip_header);
    if ((u32_t)plen + IP6_HLEN < p->tot_len) pbuf_realloc(p, (u16_t)(plen + IP6_HLEN));
    if (!tl_is_client(6, (const uint8_t *)ip6h->src.addr))
        return tl_drop(p, &tl_stats.drop_not_client);

    u8_t nexth = IP6H_NEXTH(ip6h);
    int fragmented = 0;
    if (nexth == TL_IPPROTO_FRAGMENT) {
        if (p->len < IP6_HLEN + 8) return tl_drop(p, &tl_stats.drop_ip_header);
        const struct ip6_frag_hdr *fh = (const struct ip6_frag_hdr *)((u8_t *)p->payload + IP6_HLEN);
        nexth = IP6_FRAG_NEXTH(fh);
        fragmented = 1;
    }
    /* Hop-by-Hop, Routing and Destination Options headers are dropped, and so is a fragment of
     * anything but TCP, UDP or ICMPv6: ip6_input would walk or reassemble them and hand what
     * follows to tcp_input/udp_input past these checks (and its option walk reads a byte past
     * a header that ends in an option type). Hosts do not send them to unicast peers. */
    if (nexth == IP6_NEXTH_HOPBYHOP || nexth == IP6_NEXTH_ROUTING || nexth == IP6_NEXTH_DESTOPTS ||
        nexth == TL_IPPROTO_FRAGMENT)
        return tl_drop(p, &tl_stats.drop_ip6_extension);
    if (fragmented && nexth != IP_PROTO_TCP && nexth != IP_PROTO_UDP && nexth != IP6_NEXTH_ICMP6)
        return tl_drop(p, &tl_stats.drop_unsupported);
    int claimed = nexth == IP_PROTO_TCP || nexth == IP_PROTO_UDP ||
                  (nexth == IP6_NEXTH_ICMP6 &&
                   (fragmented || tl_is_echo_request((const uint8_t *)p->payload + IP6_HLEN,
                                                     (size_t)(p->len - IP6_HLEN), 6)));
    if (!claimed) {
        tl_stats.other_in++;
        return 0; /* other ICMPv6, extension headers: lwIP's own path */
    }
    ip_addr_copy_from_ip6_packed(ip_data.current_iphdr_src, ip6h->src);
    ip_addr_copy_from_ip6_packed(ip_data.current_iphdr_dest, ip6h->dest);
    const ip6_addr_t *s = ip_2_ip6(&ip_data.current_iphdr_src);
    const ip6_addr_t *d = ip_2_ip6(&ip_data.current_iphdr_dest);
    if (ip6_addr_isany(s) || ip6_addr_ismulticast(s) || ip6_addr_isipv4mappedipv6(s) ||
        ip6_addr_isany(d) || ip6_addr_ismulticast(d) || ip6_addr_isipv4mappedipv6(d)) {
        tl_clear_ip_data();
        return tl_drop(p, &tl_stats.drop_bad_address);
    }
    if (!tl_forward_local &&
        (ip6_addr_isloopback(d) || ip6_addr_islinklocal(d) || tl_is_host_address(6, d->addr)))
        return tl_refuse_local(p, inp, 6, nexth, fragmented); /* as IPv4 */

    u16_t hlen = IP6_HLEN;
    if (fragmented) {
        const struct ip6_frag_hdr *fh = (const struct ip6_frag_hdr *)((u8_t *)p->payload + IP6_HLEN);
        if ((fh->_fragment_offset & PP_HTONS(IP6_FRAG_OFFSET_MASK | IP6_FRAG_MORE_FLAG)) == 0) {
            hlen = IP6_HLEN + 8; /* atomic fragment: just skip the header */
        } else {
            if (IP6_FRAG_MBIT(fh) && (plen & 0x7)) {
                tl_clear_ip_data();
                return tl_drop(p, &tl_stats.drop_ip_header);
            }
            u32_t id = fh->_identification;
            if (tl_frag_protocol_differs(6, s->addr, d->addr, id, nexth)) {
                tl_clear_ip_data();
                return tl_drop(p, &tl_stats.drop_fragment_protocol);
            }
            tl_stats.fragments_in++;
            ip_data.current_netif = inp;
            ip_data.current_input_netif = inp;
            ip_data.current_ip6_header = ip6h;
            ip_data.current_ip4_header = NULL;
            ip_data.current_ip_header_tot_len = IP6_HLEN + 8;
            pbuf_remove_header(p, IP6_HLEN);
            p = ip6_reass(p);
            if (p == NULL) {
                tl_clear_ip_data();
                return 1;
            }
            p = tl_flatten(p);
            if (p == NULL) {
                tl_clear_ip_data();
                tl_stats.drop_no_memory++;
                return 1;
            }
            tl_stats.datagrams_reassembled++;
            ip6h = (struct ip6_hdr *)p->payload;
            nexth = IP6H_NEXTH(ip6h); /* the first fragment's (ip6_reass) */
            int first = tl_frag_train_end(6, s->addr, d->addr, id);
            if ((first >= 0 && first != nexth) ||
                (nexth != IP_PROTO_TCP && nexth != IP_PROTO_UDP && nexth != IP6_NEXTH_ICMP6)) {
                tl_clear_ip_data();
                return tl_drop(p, &tl_stats.drop_fragment_protocol);
            }
        }
    }

    const uint8_t *packet = (const uint8_t *)p->payload;
    size_t packet_len = p->tot_len;
    ip_data.current_netif = inp;
    ip_data.current_input_netif = inp;
    ip_data.current_ip6_header = ip6h;
    ip_data.current_ip4_header = NULL;
    ip_data.current_ip_header_tot_len = hlen;
    pbuf_remove_header(p, hlen);
    tl_transport_input(p, inp, nexth, 6, packet, packet_len);
    tl_clear_ip_data();
    return 1;
}

/* ---- packet input ------------------------------------------------------------------------- */

int tl_input(const uint8_t *data, size_t len)
{
    tl_stats.packets_in++;
    tl_stats.bytes_in += len;
    if (!tl_netif_added) return -1;
    if (len < 1) { tl_stats.drop_too_short++; return -1; }
    if (len > 0xFFFF) { tl_stats.drop_too_long++; return -1; }
    u8_t version = data[0] >> 4;
    if (version != 4 && version != 6) { tl_stats.drop_bad_version++; return -1; }
    if (len < (version == 4 ? IP_HLEN : IP6_HLEN)) { tl_stats.drop_too_short++; return -1; }
    struct pbuf *p = pbuf_alloc(PBUF_RAW, (u16_t)len, PBUF_RAM);
    if (p == NULL) { tl_stats.drop_no_memory++; return -1; }
    memcpy(p->payload, data, len);
    tl_netif.input(p, &tl_netif);
    return 0;
}

/* Read up to max_packets packets from a non-blocking packet fd and feed each to lwIP: the
 * reader's hot loop without a Python call per packet. Returns the number read (fewer than
 * max_packets: the fd is drained) or -errno if the first read failed. */
int tl_input_fd(int fd, int max_packets)
{
    int count = 0, err = 0;
    tl_output_batch_begin(); /* what the batch makes lwIP send may leave in fewer writes */
    tl_relay_defer_begin(); /* relays write what the batch brought once, at its end */
    tl_udp_relay_defer_begin(); /* UDP sessions too: one sendmmsg per session */
    while (count < max_packets) {
        ssize_t n = read(fd, tl_read_buf, sizeof tl_read_buf);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) err = errno;
            break;
        }
        if (n == 0) {
            err = EPIPE;
            break;
        }
        count++;
        if ((size_t)n > sizeof tl_read_buf) {
            /* The kernel reports a packet's whole length even when it copied only what fit
             * (a GSO super-datagram over 64 KiB): never look past what was read. */
            tl_stats.packets_in++;
            tl_stats.drop_too_long++;
            continue;
        }
        if (tl_vnet_hdr) tl_vnet_input(tl_read_buf, (size_t)n); /* offloads: vnet_input.c */
        else tl_input(tl_read_buf, (size_t)n);
    }
    tl_relay_defer_end();
    tl_udp_relay_defer_end();
    tl_output_batch_end();
    return count > 0 || err == 0 ? count : -err;
}

int tl_input_release(const uint8_t *data, size_t len)
{
    tl_releasing = 1;
    int r = tl_input(data, len);
    tl_releasing = 0;
    return r;
}

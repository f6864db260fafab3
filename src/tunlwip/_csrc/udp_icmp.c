/*
 * UDP and ICMP toward clients: the per-port catch-all UDP PCBs and their receive callback, and
 * sending a datagram or an ICMP message to a client from any address.
 *
 * Theory of operation
 * -------------------
 * A UDP PCB bound to any address exists for every port a client sent to (tl_udp_for_port, made
 * by the input path) or that Python sends from; lwIP's udp_input hands it every datagram to
 * that port, whatever the address, and the callback hands it to its session's C relay
 * (udp_relay.c) or, for a flow without one, to Python with both endpoints.
 * Sending builds the datagram (or ICMP message) with lwIP's output functions and an explicit
 * source address, so replies leave from the address the client spoke to.
 *
 * Invariant: a datagram that reached udp_input by a path that skipped the input hooks' checks
 * (tl_checked_input unset) is dropped and counted (drop_unchecked), as for TCP.
 */
#include <string.h>

#include "lwip/icmp.h"
#include "lwip/inet_chksum.h"
#include "lwip/prot/icmp.h"
#include "lwip/prot/icmp6.h"

#include "tl_internal.h"

/* Per-port catch-all UDP PCBs, kept for the life of the process: at most one per port, made
 * on the first datagram to it, so their number is bounded and no lookup ever misses one. */
struct udp_pcb *tl_udp_pcbs[65536];

static void tl_on_udp(void *arg, struct udp_pcb *pcb, struct pbuf *p, const ip_addr_t *addr,
                      u16_t port)
{
    LWIP_UNUSED_ARG(arg);
    if (!tl_checked_input) { /* see tl_hook_tcp_inpacket */
        tl_stats.drop_unchecked++;
        pbuf_free(p);
        return;
    }
    tl_endpoint src, dst;
    tl_endpoint_from(&src, addr, port);
    tl_endpoint_from(&dst, ip_current_dest_addr(), pcb->local_port);
    if (tl_udp_relay_take(&src, &dst, p)) return; /* a session relayed in C */
    const uint8_t *data;
    if (p->next == NULL) {
        data = (const uint8_t *)p->payload;
    } else {
        pbuf_copy_partial(p, tl_in_scratch, p->tot_len, 0);
        data = tl_in_scratch;
    }
    if (!TL_PY(tl_py_udp(&src, &dst, data, p->tot_len))) tl_stats.udp_unhandled++;
    pbuf_free(p);
}

struct udp_pcb *tl_udp_for_port(u16_t port)
{
    if (tl_udp_pcbs[port]) return tl_udp_pcbs[port];
    struct udp_pcb *pcb = udp_new_ip_type(IPADDR_TYPE_ANY);
    if (pcb == NULL) return NULL;
    if (udp_bind(pcb, IP_ANY_TYPE, port) != ERR_OK) {
        udp_remove(pcb);
        return NULL;
    }
    udp_recv(pcb, tl_on_udp, NULL);
    tl_udp_pcbs[port] = pcb;
    tl_stats.udp_ports++;
    return pcb;
}

int tl_udp_send(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *data, size_t len)
{
    ip_addr_t sip, dip;
    if (!tl_netif_added) return ERR_CONN;
    if (tl_endpoint_to(&sip, src) || tl_endpoint_to(&dip, dst) || src->family != dst->family)
        return ERR_ARG;
    if (src->port == 0 || dst->port == 0) return ERR_ARG;
    if (len > 0xFFFF - 8 - (src->family == 4 ? 20 : 0)) return ERR_VAL;
    struct udp_pcb *pcb = tl_udp_for_port(src->port);
    if (pcb == NULL) return ERR_MEM;
    struct pbuf *p = pbuf_alloc(PBUF_TRANSPORT, (u16_t)len, PBUF_RAM);
    if (p == NULL) return ERR_MEM;
    if (len) memcpy(p->payload, data, len);
    err_t err = udp_sendto_if_src(pcb, p, &dip, dst->port, &tl_netif, &sip);
    pbuf_free(p);
    return err;
}

/* An ICMP/ICMPv6 message (checksum filled in here) to a client from any address; lwIP
 * fragments it if it exceeds the MTU. */
int tl_icmp_send(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *msg, size_t len)
{
    ip_addr_t sip, dip;
    if (!tl_netif_added) return ERR_CONN;
    if (tl_endpoint_to(&sip, src) || tl_endpoint_to(&dip, dst) || src->family != dst->family)
        return ERR_ARG;
    if (len < 8 || len > 0xFFFF - 20) return ERR_VAL;
    struct pbuf *p = pbuf_alloc(PBUF_IP, (u16_t)len, PBUF_RAM);
    if (p == NULL) return ERR_MEM;
    memcpy(p->payload, msg, len);
    u8_t *icmp = (u8_t *)p->payload;
    icmp[2] = icmp[3] = 0;
    err_t err;
    if (src->family == 4) {
        u16_t sum = inet_chksum(icmp, (u16_t)len);
        memcpy(icmp + 2, &sum, 2);
        err = ip4_output_if_src(p, ip_2_ip4(&sip), ip_2_ip4(&dip), ICMP_TTL, 0, IP_PROTO_ICMP,
                                &tl_netif);
    } else {
        u16_t sum = ip_chksum_pseudo(p, IP6_NEXTH_ICMP6, (u16_t)len, &sip, &dip);
        memcpy(icmp + 2, &sum, 2);
        err = ip6_output_if_src(p, ip_2_ip6(&sip), ip_2_ip6(&dip), LWIP_ICMP6_HL, 0,
                                IP6_NEXTH_ICMP6, &tl_netif);
    }
    pbuf_free(p);
    return err;
}

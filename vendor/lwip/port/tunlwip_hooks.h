/* Prototypes of tunlwip's lwIP hooks (named by LWIP_HOOK_FILENAME in lwipopts.h). */
#ifndef TUNLWIP_HOOKS_H
#define TUNLWIP_HOOKS_H

#include "lwip/arch.h"

struct pbuf;
struct netif;
struct ip_addr;   /* ip_addr_t, IPv4+IPv6 build */
struct tcp_pcb;
struct tcp_hdr;

int tl_hook_ip4_input(struct pbuf *p, struct netif *inp);
int tl_hook_ip6_input(struct pbuf *p, struct netif *inp);
u32_t tl_hook_tcp_isn(const struct ip_addr *local_ip, u16_t local_port,
                      const struct ip_addr *remote_ip, u16_t remote_port);

/* an err_t: ERR_OK lets lwIP process the segment, anything else drops it */
s8_t tl_hook_tcp_inpacket(struct tcp_pcb *pcb, struct tcp_hdr *hdr, u16_t optlen, u16_t opt1len,
                          u8_t *opt2, struct pbuf *p);

#endif /* TUNLWIP_HOOKS_H */

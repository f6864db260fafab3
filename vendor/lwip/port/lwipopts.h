/*
 * lwIP options for tunlwip: a userspace TUN gateway that terminates TCP/UDP for any address.
 *
 * Why these values (each is also explained where it is set):
 *  - NO_SYS, single netif, no link layer: lwIP runs on one trio thread behind a TUN.
 *  - Heap allocation everywhere (MEM_LIBC_MALLOC + MEMP_MEM_MALLOC): pools would kill live
 *    connections when exhausted; tunlwip enforces its own caps instead.
 *  - One build serves any MTU up to 65520: TCP_MSS is large and every option that lwIP would
 *    derive from TCP_MSS is set explicitly.
 */
#ifndef TUNLWIP_LWIPOPTS_H
#define TUNLWIP_LWIPOPTS_H

/* ---- system ---------------------------------------------------------------------------- */
#define NO_SYS                          1
#define SYS_LIGHTWEIGHT_PROT            0
#define LWIP_TIMERS                     1
#define LWIP_NETCONN                    0
#define LWIP_SOCKET                     0
#define LWIP_NETIF_API                  0
#define LWIP_DONT_PROVIDE_BYTEORDER_FUNCTIONS 1

/* ---- memory ---------------------------------------------------------------------------- */
#define MEM_LIBC_MALLOC                 1
#define MEMP_MEM_MALLOC                 1
#define MEM_ALIGNMENT                   8
#define PBUF_LINK_HLEN                  0
#define PBUF_LINK_ENCAPSULATION_HLEN    0
#define PBUF_POOL_SIZE                  16
#define PBUF_POOL_BUFSIZE               1600

/* ---- interfaces ------------------------------------------------------------------------ */
#define LWIP_ARP                        0
#define LWIP_ETHERNET                   0
#define LWIP_SINGLE_NETIF               1
#define LWIP_NETIF_LOOPBACK             0
#define LWIP_HAVE_LOOPIF                0
#define LWIP_NETIF_TX_SINGLE_PBUF       1
#define LWIP_CHECKSUM_CTRL_PER_NETIF    1

/* ---- protocols ------------------------------------------------------------------------- */
#define LWIP_IPV4                       1
#define LWIP_IPV6                       1
#define LWIP_TCP                        1
#define LWIP_UDP                        1
#define LWIP_ICMP                       1
#define LWIP_ICMP6                      1
#define LWIP_RAW                        0
#define LWIP_DNS                        0
#define LWIP_DHCP                       0
#define LWIP_AUTOIP                     0
#define LWIP_IGMP                       0
#define LWIP_UDPLITE                    0
#define LWIP_ALTCP                      0
#define IP_FORWARD                      0
#define LWIP_IPV6_FORWARD               0

/* IPv6 on a point-to-point TUN: no ND, MLD, SLAAC or DAD chatter. */
#define LWIP_IPV6_MLD                   0
#define LWIP_IPV6_AUTOCONFIG            0
#define LWIP_IPV6_SEND_ROUTER_SOLICIT   0
#define LWIP_IPV6_DHCP6                 0
#define LWIP_ND6_QUEUEING               0
#define LWIP_ND6_ALLOW_RA_UPDATES       0
#define LWIP_IPV6_DUP_DETECT_ATTEMPTS   0

/* Fragments: UDP (DNS, games) needs reassembly in and fragmentation out. */
#define IP_REASSEMBLY                   1
#define IP_FRAG                         1
#define LWIP_IPV6_REASS                 1
#define LWIP_IPV6_FRAG                  1
#define IPV6_FRAG_COPYHEADER            1   /* required on 64-bit hosts */
#define IP_REASS_MAX_PBUFS              1024
#define IP_REASS_MAXAGE                 15
#define IPV6_REASS_MAXAGE               60

/* ---- TCP ------------------------------------------------------------------------------- */
#define TCP_MSS                         65480   /* 65520 - 40: the MTU decides per netif */
#define LWIP_WND_SCALE                  1
#define TCP_RCV_SCALE                   7
#define TCP_WND                         (256 * 1024)
#define TCP_SND_BUF                     (256 * 1024)
#define TCP_SND_QUEUELEN                2048
#define TCP_SNDQUEUELOWAT               (TCP_SND_QUEUELEN / 2)
#define TCP_SNDLOWAT                    (16 * 1024)   /* netconn-only; not compiled here */
/* init.c's "TCP_SNDLOWAT 4*MSS below 65535" check cannot hold with a 64 KiB MSS, and the
 * option is unused without netconn. The checks that matter are kept in netif.c as static asserts. */
#define LWIP_DISABLE_TCP_SANITY_CHECKS  1
#define TCP_WND_UPDATE_THRESHOLD        (16 * 1024)
#define TCP_OVERSIZE                    TCP_MSS
#define TCP_QUEUE_OOSEQ                 1
#define TCP_OOSEQ_MAX_BYTES             TCP_WND
/* Segments held out of order per connection, whatever their size: lwIP walks this list on every
 * insert, so 40,000 one-byte segments cost milliseconds each and megabytes. 256 covers a full
 * window of 1,460-byte segments with room to spare; beyond it lwIP drops the highest. */
#define TCP_OOSEQ_MAX_PBUFS             256
#define LWIP_TCP_SACK_OUT               1
#define LWIP_TCP_MAX_SACK_NUM           4
#define LWIP_TCP_TIMESTAMPS             0
#define TCP_LISTEN_BACKLOG              0
/* One extension slot per PCB: half_open.c tracks half-open connections (SYN_RCVD) through its
 * passive-open and destroy callbacks, to bound them and evict the oldest. */
#define LWIP_TCP_PCB_NUM_EXT_ARGS       1
#define TCP_MSL                         5000UL  /* TIME-WAIT lasts 2*MSL = 10 s */
/* Keepalive toward clients: per-PCB timing (keep_idle, keep_intvl, keep_cnt), set on each
 * accepted connection from tcp.keepalive_* (relay.c tl_tcp_keepalive_apply), so an idle flow
 * ends when its client is gone, not when it is quiet. lwIP checks it on its 500 ms slow timer. */
#define LWIP_TCP_KEEPALIVE              1
#define LWIP_CALLBACK_API               1

/* ---- checksums ------------------------------------------------------------------------- */
/* Not on copy: with a virtio-net header (src/tunlwip/_csrc/vnet.c) TCP checksums are left to
 * the kernel, and summing every byte as tcp_write copies it would be wasted; without one, lwIP
 * sums a segment once as it sends it, which costs the same. */
#define LWIP_CHECKSUM_ON_COPY           0
#define LWIP_CHKSUM_ALGORITHM           3
#define CHECKSUM_GEN_IP                 1
#define CHECKSUM_GEN_UDP                1
#define CHECKSUM_GEN_TCP                1
#define CHECKSUM_GEN_ICMP               1
#define CHECKSUM_GEN_ICMP6              1
#define CHECKSUM_CHECK_IP               1
#define CHECKSUM_CHECK_UDP              1
#define CHECKSUM_CHECK_TCP              1
#define CHECKSUM_CHECK_ICMP             1
#define CHECKSUM_CHECK_ICMP6            1

/* ---- statistics and debugging ---------------------------------------------------------- */
/* Statistics: only reassembly's, so fragments lwIP drops (overlaps, overflow) are counted. */
#define LWIP_STATS                      1
#define LWIP_STATS_LARGE                1   /* 32-bit counters */
#define IPFRAG_STATS                    1
#define IP6_FRAG_STATS                  1
#define LINK_STATS                      0
#define IP_STATS                        0
#define ICMP_STATS                      0
#define UDP_STATS                       0
#define TCP_STATS                       0
#define MEM_STATS                       0
#define MEMP_STATS                      0
#define SYS_STATS                       0
#define IP6_STATS                       0
#define ICMP6_STATS                     0
#define ND6_STATS                       0
#define MIB2_STATS                      0
#define LWIP_DEBUG                      0

/* ---- our hooks ------------------------------------------------------------------------- */
#define LWIP_HOOK_FILENAME              "tunlwip_hooks.h"
#define LWIP_HOOK_IP4_INPUT(p, inp)     tl_hook_ip4_input((p), (inp))
#define LWIP_HOOK_IP6_INPUT(p, inp)     tl_hook_ip6_input((p), (inp))
#define LWIP_HOOK_TCP_ISN(lip, lport, rip, rport) tl_hook_tcp_isn((lip), (lport), (rip), (rport))
/* Every segment tcp_input matched to a PCB: proof that it came through our checks, and the
 * checks that need the PCB. */
#define LWIP_HOOK_TCP_INPACKET_PCB(pcb, hdr, optlen, opt1len, opt2, p) \
    tl_hook_tcp_inpacket((pcb), (hdr), (optlen), (opt1len), (opt2), (p))

#endif /* TUNLWIP_LWIPOPTS_H */

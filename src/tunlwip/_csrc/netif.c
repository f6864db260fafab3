/*
 * The lwIP netif that stands for the TUN device: lwIP's start (tl_init) and stop (tl_deinit),
 * and every packet lwIP sends (netif output).
 *
 * Theory of operation
 * -------------------
 * One point-to-point netif, the default route, with the gateway's own IPv4 and IPv6 address
 * (what ICMP to the gateway is answered from). The input hooks (input.c) claim packets for any
 * address before lwIP's routing looks at them, so the netif's addresses matter only there.
 * Output goes, in order of preference: to the device fd with a virtio-net header through vnet.c
 * (coalesced into GSO writes inside an output batch), to the device fd directly, or to Python
 * (tl_py_output). lwIP computes TCP checksums unless vnet.c marks them partial for the kernel.
 *
 * Invariants: lwIP keeps every pbuf it outputs (TCP retransmits it): output only copies out or
 * references it, and a write error is counted, never reported to lwIP. tl_deinit aborts every
 * connection lwIP still holds after clearing its callbacks, so no callback reaches Python late.
 */
#include <errno.h>
#include <malloc.h>
#include <string.h>
#include <unistd.h>

#include "lwip/init.h"
#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

/* The TCP sanity checks of lwIP's init.c that still apply (lwipopts.h disables the set). */
_Static_assert(TCP_SND_BUF >= 2 * TCP_MSS, "TCP_SND_BUF too small for TCP_MSS");
_Static_assert(TCP_SND_QUEUELEN >= 2 * (TCP_SND_BUF / TCP_MSS), "TCP_SND_QUEUELEN too small");
_Static_assert(TCP_SND_QUEUELEN <= 0xFFFF, "TCP_SND_QUEUELEN must fit in 16 bits");
_Static_assert(TCP_SNDQUEUELOWAT < TCP_SND_QUEUELEN, "TCP_SNDQUEUELOWAT too large");
_Static_assert(TCP_WND <= (0xFFFFUL << TCP_RCV_SCALE), "TCP_WND too large for TCP_RCV_SCALE");

struct netif tl_netif;
int tl_netif_added;
static int tl_lwip_initialised;
static int tl_output_fd = -1;
int tl_vnet_hdr; /* the device's packets carry a virtio-net header (vnet.c) */

/* Scratch buffer for flattening pbuf chains (single-threaded, never re-entered). */
static uint8_t tl_out_scratch[65536];

/* lwIP computes TCP checksums unless the kernel is told they are partial (vnet.c). */
static void tl_apply_checksum_ctrl(void)
{
    /* The hook verifies TCP/UDP checksums itself (and counts failures); lwIP checks the rest. */
    u16_t flags = NETIF_CHECKSUM_GEN_IP | NETIF_CHECKSUM_GEN_UDP | NETIF_CHECKSUM_GEN_ICMP |
                  NETIF_CHECKSUM_GEN_ICMP6 | NETIF_CHECKSUM_CHECK_ICMP | NETIF_CHECKSUM_CHECK_ICMP6;
    if (!(tl_vnet_hdr && tl_output_fd >= 0)) flags |= NETIF_CHECKSUM_GEN_TCP;
    if (tl_netif_added) NETIF_SET_CHECKSUM_CTRL(&tl_netif, flags);
}

void tl_set_output_fd(int fd)
{
    tl_vnet_reset();
    tl_output_fd = fd;
    tl_apply_checksum_ctrl();
}

void tl_set_vnet_hdr(int on)
{
    tl_vnet_reset();
    tl_vnet_hdr = on ? 1 : 0;
    tl_apply_checksum_ctrl();
}

/* Output inside a batch may be held and coalesced (vnet.c) until the batch ends. */
void tl_output_batch_begin(void) { tl_vnet_batch_begin(); }

void tl_output_batch_end(void)
{
    unsigned lost = tl_vnet_batch_end(tl_output_fd);
    tl_stats.output_errors += lost;
}

static void tl_emit(struct pbuf *p)
{
    const uint8_t *data;
    u16_t len = p->tot_len;
    if (p->next == NULL) {
        data = (const uint8_t *)p->payload;
    } else {
        pbuf_copy_partial(p, tl_out_scratch, len, 0);
        data = tl_out_scratch;
    }
    tl_stats.packets_out++;
    tl_stats.bytes_out += len;
    if (tl_output_fd >= 0 && tl_vnet_hdr) {
        tl_stats.output_errors += tl_vnet_output(tl_output_fd, p->next == NULL ? p : NULL,
                                                 (uint8_t *)data, len);
    } else if (tl_output_fd >= 0) {
        ssize_t n;
        do { n = write(tl_output_fd, data, len); } while (n < 0 && errno == EINTR);
        if (n != (ssize_t)len) tl_stats.output_errors++;
    } else {
        TL_PY(tl_py_output(data, len));
    }
}

/* lwIP keeps the pbuf (TCP retransmits it): we only copy out, and a drop still returns ERR_OK. */
static err_t tl_output4(struct netif *netif, struct pbuf *p, const ip4_addr_t *next_hop)
{
    LWIP_UNUSED_ARG(netif); LWIP_UNUSED_ARG(next_hop);
    tl_emit(p);
    return ERR_OK;
}

static err_t tl_output6(struct netif *netif, struct pbuf *p, const ip6_addr_t *dest)
{
    LWIP_UNUSED_ARG(netif); LWIP_UNUSED_ARG(dest);
    tl_emit(p);
    return ERR_OK;
}

static err_t tl_netif_init(struct netif *netif)
{
    netif->name[0] = 't';
    netif->name[1] = 'l';
    netif->output = tl_output4;
    netif->output_ip6 = tl_output6;
    netif->flags = 0; /* no broadcast, no ARP, no MLD: a point-to-point TUN */
    return ERR_OK;
}

int tl_init(uint16_t mtu, const uint8_t *ip4, const uint8_t *ip6)
{
    ip4_addr_t addr, mask, gw;
    if (tl_netif_added) return -1;
    if (!tl_lwip_initialised) {
        /* lwIP takes every pbuf from malloc (MEM_LIBC_MALLOC), so a 64 KiB MTU frees and
         * allocates 64 KiB buffers all the time. glibc hands the top of its heap back to the
         * kernel once more than M_TRIM_THRESHOLD (128 KiB by default) is free there; whether
         * that happens on every such free depends on what else sits on the heap, and then each
         * new buffer is a fresh sbrk whose pages fault on the first copy (measured: a 4-stream
         * upload at MTU 65520 lost a quarter of its throughput to them). Keeping up to 4 MiB
         * at the top makes it independent of the heap's layout, for at most 4 MiB of RSS.
         * Setting it stops glibc's dynamic mmap threshold, so that one is set too: blocks up
         * to 1 MiB come from the heap, as the dynamic threshold arranges after the first
         * large free, instead of an mmap and page faults each. */
#if defined(M_TRIM_THRESHOLD) && defined(M_MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, 4 << 20);
        mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
        lwip_init();
        tl_ext_id = tcp_ext_arg_alloc_id();
        tl_frag_seed = tl_random32();
        tl_lwip_initialised = 1;
    }
    memcpy(&addr.addr, ip4, 4);
    IP4_ADDR(&mask, 255, 255, 255, 255);
    ip4_addr_set_zero(&gw);
    if (netif_add(&tl_netif, &addr, &mask, &gw, NULL, tl_netif_init, ip_input) == NULL) return -2;
    tl_netif.mtu = mtu; /* without RA updates IPv6 uses netif->mtu too */
    ip6_addr_t a6;
    memcpy(a6.addr, ip6, 16);
    ip6_addr_clear_zone(&a6);
    netif_ip6_addr_set(&tl_netif, 0, &a6);
    netif_ip6_addr_set_state(&tl_netif, 0, IP6_ADDR_PREFERRED);
    netif_set_default(&tl_netif);
    netif_set_up(&tl_netif);
    netif_set_link_up(&tl_netif);
    tl_netif_added = 1;
    tl_apply_checksum_ctrl();
    return 0;
}

/* Startup (imports, the configuration, building the gateway) frees most of what it allocated,
 * but in holes below live blocks that glibc never hands back by itself; and the trim threshold
 * set above keeps up to 4 MiB free at the top. Called once the gateway serves: those pages go
 * back to the kernel now, for an idle gateway's sake; traffic takes them again as it needs. */
void tl_release_free_heap(void)
{
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
}

void tl_deinit(void)
{
    if (!tl_netif_added) return;
    while (tcp_active_pcbs) {
        struct tcp_pcb *pcb = tcp_active_pcbs;
        tl_tcp_forget(pcb);
        tcp_abort(pcb);
    }
    while (tcp_tw_pcbs) tcp_abort(tcp_tw_pcbs);
    netif_remove(&tl_netif);
    tl_netif_added = 0;
    tl_vnet_reset();
    tl_output_fd = -1;
    tl_vnet_hdr = 0;
    tl_settings_reset(); /* hold_syns, client networks, echo mode, UDP port actions */
}

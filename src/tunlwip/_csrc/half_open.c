/*
 * Half-open TCP connections (SYN_RCVD): bounded like a kernel's SYN queue, and given an MSS
 * floor at passive open.
 *
 * Theory of operation: below. The list is reached through lwIP's per-PCB extension slot
 * (tl_ext_id, allocated once by tl_init); the listeners tcp_conn.c creates carry
 * tl_half_open_callbacks, which lwIP copies to every PCB a listener spawns.
 *
 * Invariant: tl_stats.tcp_half_open is the length of the list; a PCB leaves it when accepted
 * (tl_half_open_done) or freed (its destroy callback), whichever comes first.
 */
#include <stdlib.h>

#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

u8_t tl_ext_id = LWIP_TCP_PCB_NUM_EXT_ARG_ID_INVALID; /* half-open tracking's PCB slot */

/*
 * A SYN lwIP takes at once (not held for a dial: port 53 under hijack, dial-before-accept off,
 * a custom handler) leaves a PCB in SYN_RCVD for up to 20 s, and lwIP walks its list of PCBs
 * for every segment: 30,000 spoofed SYNs would make each packet cost a millisecond. They are
 * bounded as a kernel bounds its SYN queue. Each half-open PCB sits in a list (newest first)
 * through lwIP's per-PCB extension slot, from the passive-open callback until it is accepted
 * or freed (destroy callback); when the list is full the oldest is reset to admit the new one
 * (a real client retransmits its SYN; a flood only pushes out its own).
 * The same passive-open callback raises the client's MSS to at least TL_MIN_MSS: lwIP takes
 * any non-zero MSS, and an MSS of 1 would turn every byte we send into a segment.
 */

struct tl_half_open {
    struct tcp_pcb *pcb;
    struct tl_half_open *newer, *older;
};
struct tl_half_open *tl_half_open_newest, *tl_half_open_oldest;
u32_t tl_max_half_open = 1024;

void tl_set_max_half_open(uint32_t count) { tl_max_half_open = count ? count : 1; }

static void tl_half_open_unlink(struct tl_half_open *h)
{
    if (h->newer) h->newer->older = h->older;
    else tl_half_open_newest = h->older;
    if (h->older) h->older->newer = h->newer;
    else tl_half_open_oldest = h->newer;
    tl_stats.tcp_half_open--;
    free(h);
}

static void tl_half_open_destroyed(u8_t id, void *data)
{
    LWIP_UNUSED_ARG(id);
    if (data) tl_half_open_unlink((struct tl_half_open *)data);
}

/* The handshake completed: the PCB is a connection now, no longer counted. */
void tl_half_open_done(struct tcp_pcb *pcb)
{
    struct tl_half_open *h = (struct tl_half_open *)tcp_ext_arg_get(pcb, tl_ext_id);
    if (h == NULL) return;
    tcp_ext_arg_set(pcb, tl_ext_id, NULL);
    tl_half_open_unlink(h);
}

static err_t tl_half_open_passive_open(u8_t id, struct tcp_pcb_listen *lpcb, struct tcp_pcb *pcb);

const struct tcp_ext_arg_callbacks tl_half_open_callbacks = {
    tl_half_open_destroyed, tl_half_open_passive_open,
};

static err_t tl_half_open_passive_open(u8_t id, struct tcp_pcb_listen *lpcb, struct tcp_pcb *pcb)
{
    LWIP_UNUSED_ARG(lpcb);
    u16_t floor = tcp_eff_send_mss(TL_MIN_MSS, &pcb->local_ip, &pcb->remote_ip);
    if (pcb->mss < floor) pcb->mss = floor;
    while (tl_stats.tcp_half_open >= tl_max_half_open && tl_half_open_oldest != NULL) {
        tl_stats.tcp_half_open_evicted++;
        tcp_abort(tl_half_open_oldest->pcb); /* RST; its destroy callback unlinks it */
    }
    struct tl_half_open *h = (struct tl_half_open *)malloc(sizeof *h);
    if (h == NULL) return ERR_MEM; /* lwIP drops the new PCB; the client retransmits */
    h->pcb = pcb;
    h->newer = NULL;
    h->older = tl_half_open_newest;
    if (tl_half_open_newest) tl_half_open_newest->newer = h;
    else tl_half_open_oldest = h;
    tl_half_open_newest = h;
    tl_stats.tcp_half_open++;
    tcp_ext_arg_set_callbacks(pcb, id, &tl_half_open_callbacks);
    tcp_ext_arg_set(pcb, id, h);
    return ERR_OK;
}

/*
 * lwIP's clock, randomness and timers: sys_now(), the TCP ISN hook, and the timer run.
 *
 * Theory of operation
 * -------------------
 * lwIP has no clock of its own here: sys_now() returns what the embedder last set (tl_set_now;
 * Python from trio.current_time(), the C poll loop from CLOCK_MONOTONIC), so lwIP's timers run
 * on the event loop's time. Randomness (ISNs, lwIP's LWIP_RAND, the fragment-train hash seed)
 * comes from getrandom() in blocks; the packet fuzzer links a getrandom that returns zeros
 * (fuzz/packet_fuzzer.c), which makes its inputs replay exactly. A timer run also bounds the
 * TIME-WAIT list (tl_trim_time_wait).
 *
 * Invariants: sys_now() returns the clock Python sets from trio.current_time(); no ISN is ever
 * predictable (no entropy source at all aborts).
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/random.h>

#include "lwip/timeouts.h"
#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

static u32_t tl_clock_ms;

u32_t sys_now(void) { return tl_clock_ms; }
void tl_set_now(uint32_t ms) { tl_clock_ms = ms; }
uint32_t tl_now(void) { return tl_clock_ms; }

uint32_t tl_random32(void)
{
    static uint32_t pool[64];
    static size_t left;
    if (left == 0) {
        size_t got = 0;
        while (got < sizeof pool) {
            ssize_t n = getrandom((uint8_t *)pool + got, sizeof pool - got, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                abort(); /* no entropy source at all: refuse to run with predictable ISNs */
            }
            got += (size_t)n;
        }
        left = 64;
    }
    return pool[--left];
}

u32_t tl_hook_tcp_isn(const ip_addr_t *local_ip, u16_t local_port,
                      const ip_addr_t *remote_ip, u16_t remote_port)
{
    LWIP_UNUSED_ARG(local_ip); LWIP_UNUSED_ARG(local_port);
    LWIP_UNUSED_ARG(remote_ip); LWIP_UNUSED_ARG(remote_port);
    return tl_random32();
}

uint32_t tl_sleeptime(void) { return sys_timeouts_sleeptime(); }

/*
 * At most this many connections stay in TIME-WAIT; the oldest beyond it are dropped, as Linux
 * does past tcp_max_tw_buckets. lwIP finds a segment's PCB by walking lists, and every new SYN
 * walks the whole TIME-WAIT list twice (tl_transport_input's reuse check, then tcp_input):
 * at thousands of connections a second, 2*MSL (10 s) would keep tens of thousands there, and
 * even a few hundred PCBs scattered over the heap cost ~10 us of cache misses per SYN. On a
 * point-to-point TUN nothing lingers in flight, a client that reuses a port replaces its
 * TIME-WAIT anyway, and all a dropped one loses is the re-ACK of a retransmitted FIN (the
 * client then gets RST in LAST-ACK, after all its data was acknowledged).
 */
#ifndef TL_MAX_TIME_WAIT /* the packet fuzzer builds with 2, so its trims happen */
#define TL_MAX_TIME_WAIT 64
#endif

/* tcp_tw_pcbs as the last trim left it: lwIP adds PCBs at the head only, so an unchanged head
 * means nothing entered TIME-WAIT since (a freed head's address reused for a new one only
 * delays the trim to the next change or timer tick). */
static uintptr_t tl_tw_head_trimmed;

void tl_trim_time_wait(int force)
{
    if (!force && (uintptr_t)tcp_tw_pcbs == tl_tw_head_trimmed) return;
    struct tcp_pcb *keep = tcp_tw_pcbs; /* newest first */
    for (unsigned n = 1; keep != NULL && n < TL_MAX_TIME_WAIT; n++) keep = keep->next;
    if (keep != NULL && keep->next != NULL) {
        struct tcp_pcb *kept = tcp_tw_pcbs, *drop = keep->next;
        keep->next = NULL;
        /* tcp_abort unlinks from tcp_tw_pcbs by walking it unless the PCB is its head: make
         * each dropped PCB the head for its abort, so trimming costs no walk per PCB. */
        while (drop != NULL) {
            tcp_tw_pcbs = drop;
            drop = drop->next;
            tcp_abort(tcp_tw_pcbs); /* TIME-WAIT: unlinked and freed, no RST, no callback */
            tl_stats.time_wait_trimmed++;
        }
        tcp_tw_pcbs = kept;
    }
    tl_tw_head_trimmed = (uintptr_t)tcp_tw_pcbs;
}

void tl_check_timeouts(void)
{
    /* Not in an output batch: a held segment is busy to lwIP (pbuf ref), and tcp_slowtmr would
     * skip retransmitting a connection whose segments tcp_fasttmr just sent and vnet.c holds. */
    sys_check_timeouts();
    tl_trim_time_wait(1);
}

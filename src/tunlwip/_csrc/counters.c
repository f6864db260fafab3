/*
 * The packet path's counters (tl_counters): one struct every C file counts into, read and reset
 * by Python (tl_get_counters, tl_reset_counters).
 *
 * Theory of operation
 * -------------------
 * Most fields are incremented where the event happens (tl_stats, declared in tl_internal.h).
 * A few come from elsewhere and are filled in when read: lwIP's own reassembly drops, and the
 * virtio-net output counters of vnet.c. Gauges (listeners, udp_ports, tcp_half_open) describe
 * state, not events, and survive a reset.
 *
 * Invariant: every packet dropped before lwIP saw it increments exactly one counter here.
 */
#include <string.h>

#include "lwip/stats.h"
#include "lwip/priv/tcp_priv.h"

#include "tl_internal.h"

tl_counters tl_stats;

/* Fragments lwIP's reassembly discarded (overlapping, too many queued, IPv4 options), counted
 * by lwIP's own statistics; `base` makes them start from zero at each reset. */
static uint64_t tl_reass_dropped(void)
{
    return (uint64_t)lwip_stats.ip_frag.drop + lwip_stats.ip6_frag.drop;
}
static uint64_t tl_reass_dropped_base;

const tl_counters *tl_get_counters(void)
{
    tl_stats.drop_fragment = tl_reass_dropped() - tl_reass_dropped_base;
    tl_stats.output_writes = tl_vnet_stats.writes;
    tl_stats.output_gso_writes = tl_vnet_stats.gso_writes;
    tl_stats.output_segments_coalesced = tl_vnet_stats.segments_coalesced;
    tl_stats.output_gso_refused = tl_vnet_stats.gso_refused;
    tl_stats.output_gso_udp_writes = tl_vnet_stats.gso_udp_writes;
    return &tl_stats;
}

void tl_reset_counters(void)
{
    uint64_t listeners = tl_stats.listeners, udp_ports = tl_stats.udp_ports;
    uint64_t half_open = tl_stats.tcp_half_open, offloads = tl_stats.input_offloads;
    tl_reass_dropped_base = tl_reass_dropped();
    memset(&tl_stats, 0, sizeof tl_stats);
    memset(&tl_vnet_stats, 0, sizeof tl_vnet_stats);
    tl_stats.listeners = listeners;
    tl_stats.udp_ports = udp_ports;
    tl_stats.tcp_half_open = half_open;
    tl_stats.input_offloads = offloads;
}

uint32_t tl_tcp_pcb_count(void)
{
    uint32_t n = 0;
    for (struct tcp_pcb *p = tcp_active_pcbs; p; p = p->next) n++;
    for (struct tcp_pcb *p = tcp_tw_pcbs; p; p = p->next) n++;
    return n;
}

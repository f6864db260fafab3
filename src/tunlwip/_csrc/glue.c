/*
 * tunlwip's C layer: accept-any input hooks, netif output, time, ISN, and thin wrappers.
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
 *
 * Invariants:
 *  - Only the trio thread calls in here, and never re-entrantly: Python callbacks record events
 *    and return; they never call back into lwIP input or timers.
 *  - Every packet dropped here increments exactly one counter in tl_stats.
 *  - A connection PCB handed to Python carries its connection id as tcp_arg; before Python lets go
 *    of a PCB (close/abort) every callback is cleared so no late event reaches a dead object.
 *  - sys_now() returns the clock Python sets from trio.current_time().
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/random.h>

#include "lwip/init.h"
#include "lwip/ip.h"
#include "lwip/ip4_frag.h"
#include "lwip/ip6_frag.h"
#include "lwip/icmp.h"
#include "lwip/icmp6.h"
#include "lwip/inet_chksum.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/stats.h"
#include "lwip/tcp.h"
#include "lwip/udp.h"
#include "lwip/timeouts.h"
#include "lwip/priv/tcp_priv.h"
#include "lwip/prot/icmp.h"
#include "lwip/prot/icmp6.h"
#include "lwip/prot/ip4.h"
#include "lwip/prot/ip6.h"
#include "lwip/prot/tcp.h"
#include "lwip/prot/udp.h"

#include "tunlwip_glue.h"
#include "tl_vnet.h"

/* The TCP sanity checks of lwIP's init.c that still apply (lwipopts.h disables the set). */
_Static_assert(TCP_SND_BUF >= 2 * TCP_MSS, "TCP_SND_BUF too small for TCP_MSS");
_Static_assert(TCP_SND_QUEUELEN >= 2 * (TCP_SND_BUF / TCP_MSS), "TCP_SND_QUEUELEN too small");
_Static_assert(TCP_SND_QUEUELEN <= 0xFFFF, "TCP_SND_QUEUELEN must fit in 16 bits");
_Static_assert(TCP_SNDQUEUELOWAT < TCP_SND_QUEUELEN, "TCP_SNDQUEUELOWAT too large");
_Static_assert(TCP_WND <= (0xFFFFUL << TCP_RCV_SCALE), "TCP_WND too large for TCP_RCV_SCALE");

/* Implemented in Python (cffi extern "Python+C"). */
uintptr_t tl_py_accept(void *pcb);
/* 0: the stream is full, offer the bytes again later (only asked when may_defer) */
int tl_py_recv(uintptr_t conn, const uint8_t *data, size_t len, int may_defer);
void tl_py_sent(uintptr_t conn, uint32_t len);
void tl_py_error(uintptr_t conn, int err);
void tl_py_output(const uint8_t *data, size_t len);
int tl_py_syn(const uint8_t *packet, size_t len, const tl_endpoint *src, const tl_endpoint *dst);
int tl_py_udp(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *data, size_t len);
void tl_py_icmp_echo(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *msg,
                     size_t len);

/* Calls into Python so far. Python has work queued after one (a task woken, a packet to
 * send), so the poll loop in C (tl_relay_run) hands control back after a pass that made one. */
uint64_t tl_python_calls;
#define TL_PY(call) (tl_python_calls++, (call))

#define TL_MAX_CLIENT_NETS 16
#define TL_IPPROTO_FRAGMENT 44

static struct netif tl_netif;
static int tl_netif_added;
static int tl_lwip_initialised;
static u32_t tl_clock_ms;
static int tl_output_fd = -1;
static int tl_vnet_hdr; /* the device's packets carry a virtio-net header (vnet.c) */
static int tl_checksum_check = 1;
static int tl_hold_syns;
static int tl_forward_local; /* loopback and link-local destinations: tests on one host only */
static int tl_releasing;
/* Set only while tl_transport_input hands a checked segment to tcp_input/udp_input: lwIP's
 * TCP hook and our UDP callback drop anything that arrives without it (tl_hook_tcp_inpacket). */
static int tl_checked_input;
static int tl_icmp_echo_mode = TL_ECHO_REPLY;
static uint8_t tl_udp_port_actions[65536];
static tl_counters tl_stats;
static tl_endpoint tl_client_nets[TL_MAX_CLIENT_NETS];
static uint8_t tl_client_prefix[TL_MAX_CLIENT_NETS];
static int tl_client_net_count;
static u32_t tl_frag_seed; /* keys the fragment-train table's hash (tl_frag_train) */
static u8_t tl_ext_id = LWIP_TCP_PCB_NUM_EXT_ARG_ID_INVALID; /* half-open tracking's PCB slot */

/* Per-port catch-all PCBs, kept for the life of the process (lwip-notes §2.4). */
static struct tcp_pcb *tl_listeners[65536];
static struct udp_pcb *tl_udp_pcbs[65536];

/* Scratch buffers for flattening pbuf chains (single-threaded, never re-entered). */
static uint8_t tl_out_scratch[65536];
static uint8_t tl_in_scratch[65536];
static uint8_t tl_read_buf[65536]; /* tl_input_fd's packet; tl_input copies it out first */

/* ---- time, randomness -------------------------------------------------------------------- */

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
 * does past tcp_max_tw_buckets. lwIP finds a segment's PCB by walking lists, and every SYN
 * walks the whole TIME-WAIT list: at a thousand connections a second, 2*MSL (10 s) would keep
 * ten thousand there and cost ~100 us per new connection. On a point-to-point TUN nothing
 * lingers in flight for long, and a client that reuses a port replaces its TIME-WAIT anyway.
 */
#define TL_MAX_TIME_WAIT 256

static void tl_trim_time_wait(void)
{
    struct tcp_pcb *keep = tcp_tw_pcbs; /* newest first: lwIP registers at the head */
    for (unsigned n = 1; keep != NULL && n < TL_MAX_TIME_WAIT; n++) keep = keep->next;
    if (keep == NULL) return;
    while (keep->next != NULL) {
        tcp_abort(keep->next); /* TIME-WAIT: unlinked and freed, no RST */
        tl_stats.time_wait_trimmed++;
    }
}

void tl_check_timeouts(void)
{
    /* Not in an output batch: a held segment is busy to lwIP (pbuf ref), and tcp_slowtmr would
     * skip retransmitting a connection whose segments tcp_fasttmr just sent and vnet.c holds. */
    sys_check_timeouts();
    tl_trim_time_wait();
}
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
    return &tl_stats;
}

void tl_reset_counters(void)
{
    uint64_t listeners = tl_stats.listeners, udp_ports = tl_stats.udp_ports;
    uint64_t half_open = tl_stats.tcp_half_open;
    tl_reass_dropped_base = tl_reass_dropped();
    memset(&tl_stats, 0, sizeof tl_stats);
    memset(&tl_vnet_stats, 0, sizeof tl_vnet_stats);
    tl_stats.listeners = listeners;
    tl_stats.udp_ports = udp_ports;
    tl_stats.tcp_half_open = half_open;
}

uint32_t tl_tcp_pcb_count(void)
{
    uint32_t n = 0;
    for (struct tcp_pcb *p = tcp_active_pcbs; p; p = p->next) n++;
    for (struct tcp_pcb *p = tcp_tw_pcbs; p; p = p->next) n++;
    return n;
}

void tl_set_checksum_check(int on) { tl_checksum_check = on; }
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

void tl_set_forward_local(int on) { tl_forward_local = on ? 1 : 0; }

void tl_set_hold_syns(int on) { tl_hold_syns = on; }

int tl_set_icmp_echo_mode(int mode)
{
    if (mode != TL_ECHO_OFF && mode != TL_ECHO_REPLY && mode != TL_ECHO_FORWARD) return -1;
    tl_icmp_echo_mode = mode;
    return 0;
}

int tl_set_udp_port_action(uint16_t port, int action)
{
    if (action != TL_UDP_PASS && action != TL_UDP_REJECT && action != TL_UDP_DROP) return -1;
    tl_udp_port_actions[port] = (uint8_t)action;
    return 0;
}

/* ---- addresses ---------------------------------------------------------------------------- */

static void tl_endpoint_from(tl_endpoint *ep, const ip_addr_t *ip, u16_t port)
{
    memset(ep, 0, sizeof *ep);
    if (IP_IS_V6(ip)) {
        ep->family = 6;
        memcpy(ep->addr, ip_2_ip6(ip)->addr, 16);
    } else {
        ep->family = 4;
        memcpy(ep->addr, &ip_2_ip4(ip)->addr, 4);
    }
    ep->port = port;
}

static int tl_endpoint_to(ip_addr_t *ip, const tl_endpoint *ep)
{
    memset(ip, 0, sizeof *ip);
    if (ep->family == 4) {
        IP_SET_TYPE_VAL(*ip, IPADDR_TYPE_V4);
        memcpy(&ip_2_ip4(ip)->addr, ep->addr, 4);
        return 0;
    }
    if (ep->family == 6) {
        IP_SET_TYPE_VAL(*ip, IPADDR_TYPE_V6);
        memcpy(ip_2_ip6(ip)->addr, ep->addr, 16);
        return 0;
    }
    return -1;
}

int tl_set_client_networks(const tl_endpoint *networks, const uint8_t *prefixes, int count)
{
    if (count < 0 || count > TL_MAX_CLIENT_NETS) return -1;
    for (int i = 0; i < count; i++) {
        if ((networks[i].family == 4 && prefixes[i] > 32) ||
            (networks[i].family == 6 && prefixes[i] > 128) ||
            (networks[i].family != 4 && networks[i].family != 6))
            return -1;
    }
    memcpy(tl_client_nets, networks, sizeof *networks * (size_t)count);
    memcpy(tl_client_prefix, prefixes, (size_t)count);
    tl_client_net_count = count;
    return 0;
}

static int tl_prefix_match(const uint8_t *a, const uint8_t *net, unsigned bits)
{
    unsigned whole = bits / 8, rest = bits % 8;
    if (memcmp(a, net, whole) != 0) return 0;
    if (rest == 0) return 1;
    uint8_t mask = (uint8_t)(0xFF << (8 - rest));
    return (a[whole] & mask) == (net[whole] & mask);
}

static int tl_is_client(int family, const uint8_t *src)
{
    if (tl_client_net_count == 0) return 1;
    for (int i = 0; i < tl_client_net_count; i++)
        if (tl_client_nets[i].family == family &&
            tl_prefix_match(src, tl_client_nets[i].addr, tl_client_prefix[i]))
            return 1;
    return 0;
}

/*
 * The gateway host's own addresses (every interface of the namespace its sockets live in, kept
 * current by Python from rtnetlink): a client's flow to one would be dialed to the host itself
 * and arrive on `lo`, past firewall rules that filter by interface. A sorted array of
 * family-tagged keys, looked up by binary search on every claimed packet.
 */
#define TL_MAX_HOST_ADDRS (1 << 20)
typedef struct { uint8_t key[17]; } tl_host_key; /* family, then 16 address bytes */
static tl_host_key *tl_host_addrs;
static size_t tl_host_addr_count;

static void tl_host_key_of(tl_host_key *k, int family, const void *addr)
{
    memset(k, 0, sizeof *k);
    k->key[0] = (uint8_t)family;
    memcpy(k->key + 1, addr, family == 4 ? 4 : 16);
}

static int tl_host_key_cmp(const void *a, const void *b) { return memcmp(a, b, 17); }

int tl_set_host_addresses(const tl_endpoint *addrs, int count)
{
    if (count < 0 || count > TL_MAX_HOST_ADDRS) return -1;
    for (int i = 0; i < count; i++)
        if (addrs[i].family != 4 && addrs[i].family != 6) return -1;
    tl_host_key *keys = NULL;
    if (count > 0 && (keys = malloc(sizeof *keys * (size_t)count)) == NULL) return -2;
    for (int i = 0; i < count; i++) tl_host_key_of(&keys[i], addrs[i].family, addrs[i].addr);
    if (count > 1) qsort(keys, (size_t)count, sizeof *keys, tl_host_key_cmp);
    free(tl_host_addrs);
    tl_host_addrs = keys;
    tl_host_addr_count = (size_t)count;
    return 0;
}

static int tl_is_host_address(int family, const void *addr)
{
    if (tl_host_addr_count == 0) return 0;
    tl_host_key k;
    tl_host_key_of(&k, family, addr);
    return bsearch(&k, tl_host_addrs, tl_host_addr_count, sizeof k, tl_host_key_cmp) != NULL;
}

/* ---- netif output ------------------------------------------------------------------------- */

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

/* Drop every callback of a PCB before letting it go (relay.c uses it too). */
void tl_tcp_forget(struct tcp_pcb *pcb)
{
    tcp_arg(pcb, NULL);
    if (pcb->state != LISTEN) {
        tcp_recv(pcb, NULL);
        tcp_sent(pcb, NULL);
        tcp_err(pcb, NULL);
        tcp_poll(pcb, NULL, 0);
    }
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
    tl_hold_syns = 0;
    tl_client_net_count = 0;
    tl_icmp_echo_mode = TL_ECHO_REPLY;
    memset(tl_udp_port_actions, TL_UDP_PASS, sizeof tl_udp_port_actions);
}

/* ---- half-open connections --------------------------------------------------------------- */

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
#define TL_MIN_MSS 536 /* RFC 9293's default MSS; a TUN's MTU (>= 576) always carries it */

struct tl_half_open {
    struct tcp_pcb *pcb;
    struct tl_half_open *newer, *older;
};
static struct tl_half_open *tl_half_open_newest, *tl_half_open_oldest;
static u32_t tl_max_half_open = 1024;

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
static void tl_half_open_done(struct tcp_pcb *pcb)
{
    struct tl_half_open *h = (struct tl_half_open *)tcp_ext_arg_get(pcb, tl_ext_id);
    if (h == NULL) return;
    tcp_ext_arg_set(pcb, tl_ext_id, NULL);
    tl_half_open_unlink(h);
}

static err_t tl_half_open_passive_open(u8_t id, struct tcp_pcb_listen *lpcb, struct tcp_pcb *pcb);

static const struct tcp_ext_arg_callbacks tl_half_open_callbacks = {
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

/* ---- TCP callbacks ------------------------------------------------------------------------ */

static err_t tl_on_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err)
{
    LWIP_UNUSED_ARG(pcb);
    uintptr_t conn = (uintptr_t)arg;
    if (p == NULL) {
        if (conn == 0) return ERR_OK;
        TL_PY(tl_py_recv(conn, NULL, 0, 0));
        if (pcb->state != ESTABLISHED && pcb->state != CLOSE_WAIT) {
            /* Our FIN went out first: lwIP finishes (CLOSING, TIME-WAIT) and frees the PCB on
             * its own, with no callback, while Python may still hold unread bytes. Let go of
             * it now (tcp_close only marks it closed in these states) and tell Python the
             * connection ended cleanly. */
            tl_tcp_forget(pcb);
            tcp_close(pcb);
            TL_PY(tl_py_error(conn, ERR_CLSD));
        }
        return ERR_OK;
    }
    if (err != ERR_OK || conn == 0) {
        /* No owner any more: treat the data as consumed so lwIP does not stall the window. */
        tcp_recved(pcb, p->tot_len);
        pbuf_free(p);
        return ERR_OK;
    }
    /* Data lwIP keeps (refused) is offered again only on an active PCB, and a PCB entering
     * TIME-WAIT drops it (tcp_pcb_purge) with no callback. A segment carrying the client's
     * FIN can move the PCB there before this callback (FIN-WAIT-2, or FIN-WAIT-1 -> CLOSING
     * -> TIME-WAIT on a bare ACK later): defer only where no FIN of the client's can follow
     * the kept data through tcp_process. */
    int may_defer = pcb->state == ESTABLISHED || pcb->state == FIN_WAIT_1 ||
                    pcb->state == FIN_WAIT_2 || pcb->state == CLOSE_WAIT;
    int taken;
    if (p->next == NULL) {
        taken = TL_PY(tl_py_recv(conn, (const uint8_t *)p->payload, p->len, may_defer));
    } else {
        u16_t n = pbuf_copy_partial(p, tl_in_scratch, p->tot_len, 0);
        taken = TL_PY(tl_py_recv(conn, tl_in_scratch, n, may_defer));
    }
    if (!taken) {
        /* The stream holds its per-connection budget: lwIP keeps the data (refused_data) and
         * offers it again once Python reads (tl_tcp_recved) or on its fast timer. */
        tl_stats.tcp_recv_deferred++;
        return ERR_MEM;
    }
    pbuf_free(p);
    return ERR_OK;
}

static err_t tl_on_sent(void *arg, struct tcp_pcb *pcb, u16_t len)
{
    LWIP_UNUSED_ARG(pcb);
    if (arg) TL_PY(tl_py_sent((uintptr_t)arg, len));
    return ERR_OK;
}

static void tl_on_error(void *arg, err_t err)
{
    /* lwIP has freed (or is freeing) the PCB: only tell Python, never touch it. */
    if (arg) TL_PY(tl_py_error((uintptr_t)arg, err));
}

void tl_tcp_keepalive_apply(struct tcp_pcb *pcb); /* relay.c: tcp.keepalive_* */

static err_t tl_on_accept(void *arg, struct tcp_pcb *newpcb, err_t err)
{
    LWIP_UNUSED_ARG(arg);
    if (err != ERR_OK || newpcb == NULL) return ERR_VAL;
    tl_half_open_done(newpcb);
    uintptr_t conn = TL_PY(tl_py_accept(newpcb));
    if (conn == 0) return ERR_MEM; /* lwIP aborts the new connection (RST) for us */
    tcp_arg(newpcb, (void *)conn);
    tcp_recv(newpcb, tl_on_recv);
    tcp_sent(newpcb, tl_on_sent);
    tcp_err(newpcb, tl_on_error);
    tcp_nagle_disable(newpcb);
    tl_tcp_keepalive_apply(newpcb);
    /* lwIP 2.1.3 sizes segments to min(MSS, largest window seen / 2), and to the MSS while that
     * half is 0. A client whose SYN offered a window of 0 or 1 thus got MSS-sized segments
     * queued, and a later small window made tcp_write find a queued segment larger than its new
     * size: the assertion "mss_local is too small" (abort; found by fuzz/packet_fuzzer.c). The
     * largest window only ever grows, so starting it at 2 * MSS keeps the size where lwIP's
     * fallback put it; it sizes segments and nothing else. */
    if (newpcb->snd_wnd_max < 2) newpcb->snd_wnd_max = (tcpwnd_size_t)(2 * newpcb->mss);
    return ERR_OK;
}

static int tl_ensure_listener(u16_t port)
{
    if (tl_listeners[port]) return 0;
    struct tcp_pcb *pcb = tcp_new_ip_type(IPADDR_TYPE_ANY);
    if (pcb == NULL) return -1;
    if (tcp_bind(pcb, IP_ANY_TYPE, port) != ERR_OK) {
        tcp_close(pcb);
        return -1;
    }
    tcp_ext_arg_set_callbacks(pcb, tl_ext_id, &tl_half_open_callbacks); /* tcp_listen copies it */
    err_t err;
    struct tcp_pcb *lpcb = tcp_listen_with_backlog_and_err(pcb, TCP_DEFAULT_LISTEN_BACKLOG, &err);
    if (lpcb == NULL) {
        tcp_close(pcb);
        return -1;
    }
    tcp_accept(lpcb, tl_on_accept);
    tl_listeners[port] = lpcb;
    tl_stats.listeners++;
    return 0;
}

/* ---- UDP ---------------------------------------------------------------------------------- */

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

static struct udp_pcb *tl_udp_for_port(u16_t port)
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

/* ---- fragment trains ---------------------------------------------------------------------- */

/*
 * lwIP's reassembly matches fragments on addresses and identification only and takes the
 * protocol from one of them (IPv4: the fragment at offset 0; IPv6: the first to arrive), so a
 * train whose fragments name different protocols would reassemble into a datagram no single
 * fragment announced. The protocol of each datagram's first fragment is kept here; a later
 * fragment naming another is dropped (drop_fragment_protocol), and the whole datagram must
 * name it too. A direct-mapped table under a random hash seed: a colliding datagram only
 * replaces an entry, and whatever happens the transport checks run on the protocol the
 * reassembled header names, so a lost entry costs the check, never safety.
 */
#define TL_FRAG_SLOTS 256
#define TL_FRAG_KEY 37 /* family, source, destination (16 bytes each), identification */

struct tl_frag_train {
    uint8_t key[TL_FRAG_KEY];
    uint8_t proto;
    u32_t expires; /* sys_now() by which lwIP has given up on the datagram */
};
static struct tl_frag_train tl_frag_trains[TL_FRAG_SLOTS];

static struct tl_frag_train *tl_frag_train(int family, const void *src, const void *dst, u32_t id,
                                           uint8_t *key, int *live)
{
    size_t alen = family == 4 ? 4 : 16;
    memset(key, 0, TL_FRAG_KEY);
    key[0] = (uint8_t)family;
    memcpy(key + 1, src, alen);
    memcpy(key + 17, dst, alen);
    memcpy(key + 33, &id, 4);
    u32_t h = tl_frag_seed ^ 2166136261u; /* FNV-1a */
    for (int i = 0; i < TL_FRAG_KEY; i++) h = (h ^ key[i]) * 16777619u;
    struct tl_frag_train *t = &tl_frag_trains[h % TL_FRAG_SLOTS];
    *live = (s32_t)(t->expires - sys_now()) > 0 && memcmp(t->key, key, TL_FRAG_KEY) == 0;
    return t;
}

/* A fragment arrives: 1 if it names another protocol than its datagram's first fragment. */
static int tl_frag_protocol_differs(int family, const void *src, const void *dst, u32_t id,
                                    u8_t proto)
{
    uint8_t key[TL_FRAG_KEY];
    int live;
    struct tl_frag_train *t = tl_frag_train(family, src, dst, id, key, &live);
    if (live) return t->proto != proto;
    memcpy(t->key, key, TL_FRAG_KEY);
    t->proto = proto;
    t->expires = sys_now() + 1000u * (family == 4 ? IP_REASS_MAXAGE : IPV6_REASS_MAXAGE) + 1000u;
    return 0;
}

/* The datagram is whole: forget its train; its first fragment's protocol, or -1 if unknown. */
static int tl_frag_train_end(int family, const void *src, const void *dst, u32_t id)
{
    uint8_t key[TL_FRAG_KEY];
    int live;
    struct tl_frag_train *t = tl_frag_train(family, src, dst, id, key, &live);
    if (!live) return -1;
    t->expires = sys_now();
    return t->proto;
}

/* ---- input hooks -------------------------------------------------------------------------- */

static int tl_drop(struct pbuf *p, uint64_t *counter)
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
    if (tl_checksum_check) {
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

/* Is the unfragmented ICMP/ICMPv6 message at `icmp` (len bytes) an echo request? */
static int tl_is_echo_request(const uint8_t *icmp, size_t len, int family)
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
static int tl_transport_input(struct pbuf *p, struct netif *inp, u8_t proto, int family,
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
        if (tl_checksum_check && ip_chksum_pseudo(p, IP_PROTO_TCP, len, src, dst) != 0)
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
                    if (TL_PY(tl_py_syn(packet, packet_len, &s, &d))) {
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
    if (tl_checksum_check && (uh->chksum != 0 || family == 6) &&
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
        int header = tl_vnet_hdr ? tl_vnet_check_input(tl_read_buf, (size_t)n) : 0;
        if (header == 0) {
            size_t skip = tl_vnet_hdr ? TL_VNET_HDR_LEN : 0;
            tl_input(tl_read_buf + skip, (size_t)n - skip);
        } else {
            tl_stats.packets_in++;
            if (header == -1) tl_stats.drop_too_short++;
            else tl_stats.drop_unsupported++; /* GSO: we never offered to take it */
        }
    }
    tl_relay_defer_end();
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

/* ---- TCP wrappers ------------------------------------------------------------------------- */

void tl_tcp_endpoints(void *pcb_, tl_endpoint *local, tl_endpoint *remote)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    tl_endpoint_from(local, &pcb->local_ip, pcb->local_port);
    tl_endpoint_from(remote, &pcb->remote_ip, pcb->remote_port);
}

uint32_t tl_tcp_sndbuf(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    if (tcp_sndqueuelen(pcb) >= TCP_SND_QUEUELEN - 4) return 0;
    return tcp_sndbuf(pcb);
}

/* Queue as much of data as lwIP takes now (16-bit calls), then push it out. Returns bytes
 * queued (possibly 0) or a negative err_t when the connection cannot send. */
int tl_tcp_write(void *pcb_, const uint8_t *data, size_t len)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    size_t done = 0;
    err_t err = ERR_OK;
    while (done < len) {
        u32_t room = tl_tcp_sndbuf(pcb);
        if (room == 0) break;
        size_t chunk = len - done;
        if (chunk > room) chunk = room;
        if (chunk > 0xFFFF) chunk = 0xFFFF;
        u8_t flags = TCP_WRITE_FLAG_COPY | (done + chunk < len ? TCP_WRITE_FLAG_MORE : 0);
        err = tcp_write(pcb, data + done, (u16_t)chunk, flags);
        if (err == ERR_MEM) { err = ERR_OK; break; }
        if (err != ERR_OK) break;
        done += chunk;
    }
    if (done > 0) {
        tl_output_batch_begin(); /* the segments leave together (vnet.c) */
        tcp_output(pcb);
        tl_output_batch_end();
    }
    if (done == 0 && err != ERR_OK) return err;
    return (int)done;
}

void tl_tcp_recved(void *pcb_, size_t len)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    while (len > 0) {
        u16_t chunk = len > 0xFFFF ? 0xFFFF : (u16_t)len;
        tcp_recved(pcb, chunk);
        len -= chunk;
    }
}

int tl_tcp_offer_deferred(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    if (pcb->refused_data == NULL) return 0;
    /* Calls the recv callback again, now that the stream has room (it may refuse again). */
    return tcp_process_refused_data(pcb) == ERR_ABRT ? -1 : 1;
}

int tl_tcp_shutdown_tx(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    err_t err = tcp_shutdown(pcb, 0, 1);
    if (err == ERR_OK) tcp_output(pcb);
    return err;
}

void tl_tcp_close(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    tl_tcp_forget(pcb);
    if (tcp_close(pcb) != ERR_OK) tcp_abort(pcb);
}

void tl_tcp_abort(void *pcb_)
{
    struct tcp_pcb *pcb = (struct tcp_pcb *)pcb_;
    tl_tcp_forget(pcb);
    tcp_abort(pcb);
}

int tl_tcp_state(void *pcb_) { return ((struct tcp_pcb *)pcb_)->state; }

/*
 * Policy the embedder sets (tl_set_*): which sources are clients, which destinations are the
 * gateway host's own, what happens to ICMP echo and to UDP per port, whether SYNs are held and
 * checksums verified; and the conversions between tl_endpoint and lwIP's ip_addr_t.
 *
 * Theory of operation
 * -------------------
 * Settings are plain variables the input path (input.c, transport_input.c) reads for every
 * packet; the lookups they need (client networks, host addresses) are here so the input path
 * asks one question (tl_is_client, tl_is_host_address). tl_deinit puts everything back to the
 * defaults through tl_settings_reset, so a stack started again starts clean.
 *
 * Invariant: only the trio thread sets or reads these, never while a packet is being processed
 * (Python calls here between packets).
 */
#include <stdlib.h>
#include <string.h>

#include "tl_internal.h"

#define TL_MAX_CLIENT_NETS 16

int tl_checksum_check = 1;
int tl_hold_syns;
int tl_forward_local; /* loopback and link-local destinations: tests on one host only */
int tl_icmp_echo_mode = TL_ECHO_REPLY;
uint8_t tl_udp_port_actions[65536];
static tl_endpoint tl_client_nets[TL_MAX_CLIENT_NETS];
static uint8_t tl_client_prefix[TL_MAX_CLIENT_NETS];
static int tl_client_net_count;

void tl_set_checksum_check(int on) { tl_checksum_check = on; }

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

void tl_endpoint_from(tl_endpoint *ep, const ip_addr_t *ip, u16_t port)
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

int tl_endpoint_to(ip_addr_t *ip, const tl_endpoint *ep)
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

int tl_is_client(int family, const uint8_t *src)
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

int tl_is_host_address(int family, const void *addr)
{
    if (tl_host_addr_count == 0) return 0;
    tl_host_key k;
    tl_host_key_of(&k, family, addr);
    return bsearch(&k, tl_host_addrs, tl_host_addr_count, sizeof k, tl_host_key_cmp) != NULL;
}

/* tl_deinit: the policy a new stack starts with (host addresses stay: Python sets them again). */
void tl_settings_reset(void)
{
    tl_hold_syns = 0;
    tl_client_net_count = 0;
    tl_icmp_echo_mode = TL_ECHO_REPLY;
    memset(tl_udp_port_actions, TL_UDP_PASS, sizeof tl_udp_port_actions);
}

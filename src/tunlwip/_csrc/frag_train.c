/*
 * Fragment trains: the protocol each fragmented datagram's first fragment named, so a train
 * that mixes protocols is dropped (input.c asks before and after lwIP's reassembly).
 *
 * Theory of operation: below. The hash seed (tl_frag_seed) is drawn once by tl_init.
 */
#include <string.h>

#include "lwip/ip4_frag.h"
#include "lwip/ip6_frag.h"
#include "lwip/sys.h"

#include "tl_internal.h"

u32_t tl_frag_seed; /* keys the fragment-train table's hash (tl_frag_train) */

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
int tl_frag_protocol_differs(int family, const void *src, const void *dst, u32_t id,
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
int tl_frag_train_end(int family, const void *src, const void *dst, u32_t id)
{
    uint8_t key[TL_FRAG_KEY];
    int live;
    struct tl_frag_train *t = tl_frag_train(family, src, dst, id, key, &live);
    if (!live) return -1;
    t->expires = sys_now();
    return t->proto;
}

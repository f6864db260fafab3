/*
 * Admission in C: the held SYNs Python would only admit and dial directly are dialed without
 * calling Python at all. Python keeps the policy; C only spares it the call when the answer
 * cannot be anything but "dial it".
 *
 * Theory of operation
 * -------------------
 * Python turns the fast path on (tl_admit_configure) only while every SYN it would see is a
 * plain direct dial in C: dials in C, no route table, serving and accepting. It gives C the
 * limits it checks (connections open or being dialed, held SYNs, and each client's shares of
 * both) and the destination ports it must see itself (the DNS proxy's 53, encrypted DNS it
 * refuses). The counts those limits are checked against live here, per client, in two halves:
 * C's own dials (dialing; connected or relayed), kept by dial.c as its dials change state, and
 * Python's flows (its streams, its held dials, its proxy dials), mirrored by Python's client
 * tables as they change (tl_admit_python). A client is its IPv4 address or its IPv6 /64, as in
 * shares.py.
 *
 * A SYN that dial.c did not swallow comes to tl_admit_try. It is dialed here only if the fast
 * path is on, its port is not Python's, its client has no dial Python is making (a retransmit
 * of one must reach Python, which swallows it), and every limit has room counting both
 * halves; and only if the dial starts. Anything else goes to Python's SYN hook as before,
 * which decides, refuses and counts exactly as it always did: C never refuses, so a limit
 * reached is always answered (and counted) by Python.
 *
 * Invariants: single-threaded; counts never go below zero (a release of what was never
 * counted is ignored); a client entry exists while any of its counts is non-zero; a count
 * lost for want of memory stops admission here until the next stack (tl_admit_unsure).
 *
 * Known gap: a SYN of one of Python's own sockets coming back through the TUN (protection not
 * in effect) is not screened here as Python's hook would; the dial C makes for it loops back
 * too and is dropped as C's own (counted and logged as a loop), so the loop ends one hop
 * later.
 */
#include <stdlib.h>
#include <string.h>

#include "tl_internal.h"

struct tl_admit_client {
    uint64_t key; /* IPv4 address, or the /64 of an IPv6 address */
    uint8_t family;
    uint32_t counts[TL_ADMIT_KINDS]; /* by TL_ADMIT_* */
    struct tl_admit_client *next;
};

#define TL_ADMIT_BUCKETS 4096
static struct tl_admit_client *tl_admit_table[TL_ADMIT_BUCKETS];
static uint64_t tl_admit_totals[TL_ADMIT_KINDS];
static uint64_t tl_admit_fast; /* SYNs dialed without Python (counts) */

static int tl_admit_on;
static int tl_admit_unsure; /* a count was lost (no memory): no admission until a new stack */
static uint32_t tl_max_open, tl_max_pending, tl_open_share, tl_pending_share;
static uint8_t tl_python_ports[65536 / 8]; /* destination ports Python must see */

static uint64_t tl_key_of(const tl_endpoint *e)
{
    const uint8_t *a = e->addr;
    int n = e->family == 4 ? 4 : 8;
    uint64_t key = 0;
    for (int i = 0; i < n; i++) key = (key << 8) | a[i];
    return key;
}

static struct tl_admit_client **tl_bucket(int family, uint64_t key)
{
    uint64_t h = (key ^ (uint64_t)family) * 0x9E3779B97F4A7C15ull;
    return &tl_admit_table[(h >> 40) & (TL_ADMIT_BUCKETS - 1)];
}

/* The client's entry; with `create`, made if missing (NULL only if out of memory). */
static struct tl_admit_client *tl_client(int family, uint64_t key, int create)
{
    struct tl_admit_client **head = tl_bucket(family, key);
    for (struct tl_admit_client *c = *head; c; c = c->next)
        if (c->key == key && c->family == family) return c;
    if (!create) return NULL;
    struct tl_admit_client *c = calloc(1, sizeof *c);
    if (c == NULL) return NULL;
    c->key = key;
    c->family = (uint8_t)family;
    c->next = *head;
    *head = c;
    return c;
}

static void tl_forget_if_empty(struct tl_admit_client *c)
{
    for (int k = 0; k < TL_ADMIT_KINDS; k++)
        if (c->counts[k]) return;
    for (struct tl_admit_client **link = tl_bucket(c->family, c->key); *link; link = &(*link)->next) {
        if (*link == c) {
            *link = c->next;
            free(c);
            return;
        }
    }
}

static void tl_adjust(int family, uint64_t key, int kind, int delta)
{
    if (kind < 0 || kind >= TL_ADMIT_KINDS || delta == 0) return;
    struct tl_admit_client *c = tl_client(family, key, delta > 0);
    if (c == NULL) {
        /* Out of memory for a new client: its count is lost, so admission here stops until
         * the next stack starts with empty tables (tl_admit_forget_python); every SYN goes to
         * Python, whose own counts stay exact. */
        if (delta > 0) tl_admit_unsure = 1;
        return;
    }
    if (delta < 0 && (uint32_t)-delta > c->counts[kind]) delta = -(int)c->counts[kind];
    c->counts[kind] += delta;
    tl_admit_totals[kind] += delta;
    if (delta < 0) tl_forget_if_empty(c);
}

void tl_admit_count(const tl_endpoint *client, int kind, int delta)
{
    tl_adjust(client->family, tl_key_of(client), kind, delta);
}

void tl_admit_python(int family, uint64_t key, int kind, int delta)
{
    if (kind == TL_ADMIT_C_DIALING || kind == TL_ADMIT_C_OPEN) return; /* C's own */
    tl_adjust(family, key, kind, delta);
}

void tl_admit_client_counts(int family, uint64_t key, uint32_t out[TL_ADMIT_KINDS])
{
    struct tl_admit_client *c = tl_client(family, key, 0);
    for (int k = 0; k < TL_ADMIT_KINDS; k++) out[k] = c ? c->counts[k] : 0;
}

void tl_admit_configure(int on, uint32_t max_open, uint32_t max_pending, uint32_t open_share,
                        uint32_t pending_share, const uint16_t *python_ports, size_t n_ports)
{
    tl_max_open = max_open;
    tl_max_pending = max_pending;
    tl_open_share = open_share;
    tl_pending_share = pending_share;
    memset(tl_python_ports, 0, sizeof tl_python_ports);
    for (size_t i = 0; i < n_ports; i++)
        tl_python_ports[python_ports[i] >> 3] |= (uint8_t)(1u << (python_ports[i] & 7));
    tl_admit_on = on ? 1 : 0;
}

void tl_admit_forget_python(void)
{
    tl_admit_unsure = 0; /* a new stack: C's dials are gone, Python's tables start empty */
    for (size_t b = 0; b < TL_ADMIT_BUCKETS; b++) {
        for (struct tl_admit_client *c = tl_admit_table[b], *next; c; c = next) {
            next = c->next;
            for (int k = TL_ADMIT_PY_DIALING; k < TL_ADMIT_KINDS; k++) {
                tl_admit_totals[k] -= c->counts[k];
                c->counts[k] = 0;
            }
            tl_forget_if_empty(c);
        }
    }
}

uint64_t tl_admit_fast_count(void) { return tl_admit_fast; }

void tl_admit_get_totals(uint64_t out[TL_ADMIT_KINDS])
{
    memcpy(out, tl_admit_totals, sizeof tl_admit_totals);
}

void tl_admit_reset_counters(void) { tl_admit_fast = 0; }

int tl_admit_try(const tl_endpoint *client, const tl_endpoint *target)
{
    if (!tl_admit_on || tl_admit_unsure) return 0;
    if (tl_python_ports[target->port >> 3] & (1u << (target->port & 7))) return 0;
    const uint64_t *t = tl_admit_totals;
    uint64_t dialing = t[TL_ADMIT_C_DIALING] + t[TL_ADMIT_PY_DIALING];
    if (dialing + t[TL_ADMIT_C_OPEN] + t[TL_ADMIT_PY_OPEN] >= tl_max_open) return 0;
    if (dialing >= tl_max_pending) return 0;
    struct tl_admit_client *c = tl_client(client->family, tl_key_of(client), 0);
    if (c != NULL) {
        if (c->counts[TL_ADMIT_PY_DIALING]) return 0; /* maybe a retransmit: Python's */
        uint64_t own_dialing = c->counts[TL_ADMIT_C_DIALING];
        uint64_t own = own_dialing + c->counts[TL_ADMIT_C_OPEN] + c->counts[TL_ADMIT_PY_OPEN];
        if (own >= tl_open_share || own_dialing >= tl_pending_share) return 0;
    }
    if (tl_dial_start_admitted() < 0) return 0; /* Python answers (and counts) what stopped it */
    tl_admit_fast++;
    return 1;
}

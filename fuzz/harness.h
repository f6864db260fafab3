/*
 * What the packet fuzzer's files share: the embedder's state, the small helpers every part
 * uses, and the few functions that cross files. Internal to the harness (fuzz/README.md).
 *
 * The harness is split by job:
 *   packet_fuzzer.c  the driver: input format and configuration, the application steps, setup
 *                    and teardown around each input, feeding packets in, the libFuzzer entry
 *                    points; it defines the state declared here
 *   packet_checks.c  the embedder's callbacks (tl_py_*: record events, check what they are
 *                    handed) and the checks after every record (the device's output, hook
 *                    bypasses, the half-open bound, the MSS floor)
 *   packet_shapes.c  the shaped records (XT_CHAIN, FRAG_TRAIN, SEG): packets built from a
 *                    description in the input, then fed in
 *
 * The three small helpers are static inline: every file inlines them, as the one file did.
 */
#ifndef TUNLWIP_FUZZ_HARNESS_H
#define TUNLWIP_FUZZ_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "tl_internal.h"

/* record kinds (ctl >> 3) that shape the packet instead of an application step; VNET takes
 * kind 7, one of the eight that had no application step (0-7); PROXY (6) is not a packet: its
 * bytes are what a SOCKS5 proxy of a C dial answers (packet_checks.c, fuzz_proxy_answer) */
enum { PROXY = 6, VNET = 7, XT_CHAIN = 29, FRAG_TRAIN = 30, SEG = 31 };
#define MAX_CONNS 32
#define MAX_HELD 8

struct conn {
    uintptr_t id;          /* 0: free slot */
    void *pcb;             /* NULL once lwIP freed it or we let go of it */
    void *relay;           /* the relay that took the connection over */
    int peer;              /* our end of the relay's socketpair (the "upstream server") */
    size_t unread;         /* bytes received and not yet acknowledged with tl_tcp_recved */
    int eof_in, eof_out, wrote;
    int abort_in_first_data;
};

struct held { size_t len; uint8_t *pkt; };

/* ---- state (defined in packet_fuzzer.c) ------------------------------------------------- */

extern struct conn conns[MAX_CONNS];
extern uintptr_t next_id;
extern uint8_t decide;          /* the current record's arg: what callbacks decide */
extern uint16_t cur_mtu;
extern unsigned sink;           /* bytes summed so that ASan sees every byte handed to us read */
extern uint64_t half_open_bound; /* what the half-open count may reach (packet_fuzzer.c) */
extern struct held held[MAX_HELD]; /* SYNs tl_py_syn held, for an application step to release */
extern int held_n;
extern tl_endpoint udp_src, udp_dst;   /* the last datagram's endpoints */
extern int udp_seen;
extern tl_endpoint echo_src, echo_dst; /* the last forwarded echo request */
extern uint8_t echo_msg[65536];
extern size_t echo_len;
extern int vnet_out[2];         /* the device's output side in vnet mode */
extern int vnet_mode;
extern const uint8_t GW4[4];    /* the gateway's own addresses */
extern const uint8_t GW6[16];

/* ---- helpers ------------------------------------------------------------------------------ */

static inline struct conn *by_id(uintptr_t id)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].id == id && id != 0) return &conns[i];
    return NULL;
}

static inline void touch(const uint8_t *data, size_t len)
{
    for (size_t i = 0; i < len; i++) sink += data[i];
}

static inline void free_conn(struct conn *c)
{
    if (c->peer >= 0) close(c->peer);
    memset(c, 0, sizeof *c);
    c->peer = -1;
}

/* ---- what crosses files ------------------------------------------------------------------- */

/* packet_fuzzer.c: hand one packet to the stack, at once or batched on the packet device */
void feed(const uint8_t *pkt, size_t len, uint8_t arg, int flush);
/* the same for a read that starts with its own virtio-net header (a VNET record) */
void feed_with_header(const uint8_t *buf, size_t len, uint8_t arg);

/* packet_checks.c: after every record and at teardown; and the checksum sum (also for the
 * shaped records' fix_lengths) */
void check_vnet_output(void);
void check_input_checked(void);
uint32_t ones_sum(const uint8_t *p, size_t len, uint32_t sum);
/* packet_checks.c: UDP sessions relayed in C (opened from tl_py_udp when the record's arg
 * says so), an application step on one, and their end at teardown */
void udp_session_open(const tl_endpoint *src, const tl_endpoint *dst);
void udp_session_step(uint8_t arg);
void udp_sessions_teardown(void);

/* packet_shapes.c: build and feed the packet(s) of a record of kind VNET or XT_CHAIN to SEG */
void shape_record(unsigned kind, const uint8_t *in, size_t len, uint8_t arg);

/* ---- dials in C (packet_checks.c) ---------------------------------------------------------- */

int fuzz_dial_connector(const tl_endpoint *dst, tl_endpoint *local);
void fuzz_dial_events(void);
void fuzz_dial_teardown(void);
extern uint64_t fuzz_flows_alone;
int64_t fuzz_dial_start(const tl_endpoint *dst);
void fuzz_proxy_answer(const uint8_t *data, size_t len, uint8_t arg);

#endif

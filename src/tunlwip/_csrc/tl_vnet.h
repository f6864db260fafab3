/*
 * Output to a TUN fd with a virtio-net header (vnet.c): TCP segments coalesced into GSO writes.
 * Internal to the C layer (glue.c, relay.c); Python sees only tl_set_vnet_hdr and the counters.
 */
#ifndef TUNLWIP_VNET_H
#define TUNLWIP_VNET_H

#include <stddef.h>
#include <stdint.h>

struct pbuf;

#define TL_VNET_HDR_LEN 10 /* struct virtio_net_hdr, the TUN default (TUNSETVNETHDRSZ) */

typedef struct {
    uint64_t writes;              /* write calls made */
    uint64_t gso_writes;          /* of which carried several segments */
    uint64_t segments_coalesced;  /* segments that rode in another's write */
    uint64_t gso_refused;         /* GSO writes the kernel refused (then: one write a packet) */
} tl_vnet_counters;

extern tl_vnet_counters tl_vnet_stats;

/* glue.c's scope around work that may send many packets (a poll pass, a write; not the
 * timers, where a held segment would make tcp_slowtmr skip its retransmission):
 * output to a device with the header may be held inside it and coalesced (below). */
void tl_output_batch_begin(void);
void tl_output_batch_end(void);

/* Write (or, inside a batch, maybe hold) one output packet. p is the single pbuf holding data
 * (NULL if data is a copy: never held). Returns the number of packets lost to write errors. */
unsigned tl_vnet_output(int fd, struct pbuf *p, uint8_t *data, size_t len);
/* Batches nest; the outermost end writes what is held. Both return packets lost. */
void tl_vnet_batch_begin(void);
unsigned tl_vnet_batch_end(int fd);
/* Segments held now (0 whenever no batch is open). */
int tl_vnet_held(void);
/* Let go of anything held without writing it (the stack stops); GSO is tried again. */
void tl_vnet_reset(void);
/* A packet read from the device: 0 if its header is one we can take, -1 if it is shorter than
 * a header, -2 if it is a GSO packet (we never offered to take those: TUNSETOFFLOAD). */
int tl_vnet_check_input(const uint8_t *buf, size_t len);

#endif

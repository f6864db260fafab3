/*
 * What crosses files inside tunlwip's C layer. Python never sees this header: its API is
 * tunlwip_glue.h (also the cffi cdef). Every C file of the layer includes this one header and
 * declares nothing of another file's itself.
 *
 * The files, by job (each starts with its own theory of operation):
 *   clock.c            sys_now(), randomness and the TCP ISN, lwIP's timers, TIME-WAIT bound
 *   counters.c         tl_stats and the counters Python reads
 *   settings.c         policy set by Python (clients, host addresses, echo, UDP ports, ...)
 *   netif.c            lwIP's start and stop, the netif and every packet lwIP outputs
 *   input.c            packets into lwIP: the accept-any IPv4/IPv6 input hooks
 *   frag_train.c       the protocol of each fragmented datagram's first fragment
 *   transport_input.c  TCP/UDP/ICMP checks, then lwIP's transport input; lwIP's TCP hook
 *   half_open.c        connections in SYN_RCVD: bounded, MSS floor
 *   tcp_conn.c         listeners, accepted connections' callbacks, keepalive, TCP wrappers
 *   udp_icmp.c         UDP PCBs and their callback, UDP and ICMP sent to clients
 *   poll.c             the epoll set (device, relays, Python watchers) and the C poll loop
 *   relay.c            the C relay between an lwIP connection and its upstream socket
 *   vnet.c             output with a virtio-net header: TCP segments coalesced into GSO writes
 *   udp_relay.c        UDP sessions relayed in C: hash lookup, sendmmsg/recvmmsg batches
 *   socks5_udp.c       the SOCKS5 UDP header of a proxy relay's datagram, checked and measured
 *   vnet_input.c       input with a virtio-net header: offloaded super-segments checked, fed
 *   dial.c             upstream connects of held SYNs in C, their handover to relays, events
 *   dial_socket.c      a C dial's socket: protection, options, the non-blocking connect
 *   socks5_dial.c      the SOCKS5 CONNECT handshake of a C dial through a proxy
 *   admit.c            plain held SYNs admitted and dialed without Python: limits, counts
 *
 * Invariant of the whole layer: only the trio thread calls in, and never re-entrantly; Python
 * callbacks (tl_py_*) record events and return, they never call back into lwIP input or timers.
 */
#ifndef TUNLWIP_INTERNAL_H
#define TUNLWIP_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "lwip/ip.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/tcp.h"
#include "lwip/udp.h"

#include "tunlwip_glue.h"

/* ---- Python (cffi extern "Python+C", declared to cffi by build_ffi.py) ------------------ */

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
void tl_py_relay_done(uintptr_t conn, int reason, uint64_t bytes_up, uint64_t bytes_down);
void tl_py_relay_first_data(uintptr_t conn, const uint8_t *data, size_t len);
void tl_py_fd_ready(uintptr_t token);

/* Every call into Python goes through TL_PY, which counts it (poll.c's tl_python_calls). */
extern uint64_t tl_python_calls;
#define TL_PY(call) (tl_python_calls++, (call))

/* ---- clock.c ----------------------------------------------------------------------------- */

uint32_t tl_random32(void);
/* Drop the oldest TIME-WAIT PCBs beyond a small bound (only when some entered since, unless
 * force). */
void tl_trim_time_wait(int force);

/* ---- counters.c -------------------------------------------------------------------------- */

extern tl_counters tl_stats;

/* ---- settings.c -------------------------------------------------------------------------- */

extern int tl_checksum_check;
extern int tl_hold_syns;
extern int tl_forward_local;
extern int tl_icmp_echo_mode;
extern uint8_t tl_udp_port_actions[65536]; /* TL_UDP_* by destination port */
void tl_settings_reset(void);
void tl_endpoint_from(tl_endpoint *ep, const ip_addr_t *ip, u16_t port);
int tl_endpoint_to(ip_addr_t *ip, const tl_endpoint *ep);
int tl_is_client(int family, const uint8_t *src);
int tl_is_host_address(int family, const void *addr);

/* ---- netif.c ----------------------------------------------------------------------------- */

extern struct netif tl_netif;
extern int tl_netif_added;
extern int tl_vnet_hdr; /* the device's packets carry a virtio-net header (vnet.c) */

/* A scope around work that may send many packets (a poll pass, a write; not the timers, where
 * a held segment would make tcp_slowtmr skip its retransmission): output to a device with the
 * header may be held inside it and coalesced (vnet.c). */
void tl_output_batch_begin(void);
void tl_output_batch_end(void);

/* ---- input.c ----------------------------------------------------------------------------- */

/* Count the drop in *counter and free p; returns 1 (the hooks' "consumed"). */
int tl_drop(struct pbuf *p, uint64_t *counter);

/* ---- frag_train.c ------------------------------------------------------------------------ */

extern u32_t tl_frag_seed;
int tl_frag_protocol_differs(int family, const void *src, const void *dst, u32_t id, u8_t proto);
int tl_frag_train_end(int family, const void *src, const void *dst, u32_t id);

/* ---- transport_input.c ------------------------------------------------------------------- */

extern int tl_releasing;      /* a held SYN comes back (tl_input_release) */
extern int tl_checked_input;  /* a checked segment is on its way into tcp_input/udp_input */
int tl_is_echo_request(const uint8_t *icmp, size_t len, int family);
int tl_transport_input(struct pbuf *p, struct netif *inp, u8_t proto, int family,
                       const uint8_t *packet, size_t packet_len);

/* ---- half_open.c ------------------------------------------------------------------------- */

#define TL_MIN_MSS 536 /* RFC 9293's default MSS; a TUN's MTU (>= 576) always carries it */
struct tl_half_open;
extern u8_t tl_ext_id;
extern u32_t tl_max_half_open;
extern struct tl_half_open *tl_half_open_newest, *tl_half_open_oldest;
extern const struct tcp_ext_arg_callbacks tl_half_open_callbacks;
void tl_half_open_done(struct tcp_pcb *pcb);

/* ---- tcp_conn.c -------------------------------------------------------------------------- */

extern struct tcp_pcb *tl_listeners[65536];
extern uint8_t tl_in_scratch[65536];
void tl_tcp_forget(struct tcp_pcb *pcb);
int tl_ensure_listener(u16_t port);

/* ---- udp_icmp.c -------------------------------------------------------------------------- */

extern struct udp_pcb *tl_udp_pcbs[65536];
struct udp_pcb *tl_udp_for_port(u16_t port);

/* ---- poll.c and relay.c ------------------------------------------------------------------ */

extern int tl_epoll_fd; /* the poll set, -1 until tl_relay_epoll_fd makes it */
struct epoll_event;
/* epoll_ctl on the poll set and on the wait set tl_relay_run waits on: every registration of
 * the poll set goes through it. 0, or -1 with errno (a failed ADD/MOD: in neither set). */
int tl_poll_ctl(int op, int fd, struct epoll_event *ev);

/* What a poll-set entry's epoll data points at, when it is a pointer: every struct C puts in
 * the poll set begins with one of these, so tl_relay_poll can tell them apart. (The device and
 * Python's watchers are tagged integers with the low bit set; pointers never have it.) */
enum tl_poll_kind { TL_POLL_RELAY = 2, TL_POLL_DIAL = 3, TL_POLL_UDP_RELAY = 4 };
struct tl_poll_entry {
    uint32_t kind; /* enum tl_poll_kind */
};

struct tl_relay;
void tl_relay_on_ready(struct tl_relay *r, uint32_t events);
void tl_relay_bury(void);
extern int tl_polling; /* inside a round of the poll set's events (poll.c) */

/* ---- dial.c ------------------------------------------------------------------------------ */

struct tl_dial;
/* A held SYN, before Python's hook: 1 if taken here (a retransmit of a tuple being dialed, or
 * our own socket's packet looping back); else it is the "current" SYN until
 * tl_dial_current_end, which tl_dial_start may dial. */
int tl_dial_intercept(const uint8_t *packet, size_t len, const tl_endpoint *src,
                      const tl_endpoint *dst);
void tl_dial_current_end(void);
void tl_dial_on_ready(struct tl_dial *d, uint32_t events);
/* From lwIP's accept callback: 1 a relay took the PCB, 0 not ours, -1 the PCB was aborted. */
int tl_dial_claim(struct tcp_pcb *pcb);
/* Check the deadlines; ms until the next one (UINT32_MAX: none). */
uint32_t tl_dial_expire(void);
/* tl_dial_start for a SYN admit.c admitted (its events say so) */
int64_t tl_dial_start_admitted(void);
/* ---- admit.c ----------------------------------------------------------------------------- */
/* Dial the current SYN without Python if policy allows it: 1 if dialed, 0 for Python's hook. */
int tl_admit_try(const tl_endpoint *client, const tl_endpoint *target);
/* One of C's dials of `client` changed state (kind TL_ADMIT_C_*). */
void tl_admit_count(const tl_endpoint *client, int kind, int delta);
/* ---- dial_socket.c: what makes a dial's socket --------------------------------------------- */

/* A protected, connecting socket to dst (its address in *local), or -errno (protection:
 * -(TL_DIAL_PROTECT_FAILED + errno)). The packet fuzzer swaps in socketpairs. */
extern int (*tl_dial_connector)(const tl_endpoint *dst, tl_endpoint *local);
/* The protection and keepalive of sockets made from now on (-EINVAL: bad values). */
int tl_dial_socket_configure(int protect, uint32_t mark, const char *ifname, uint32_t keep_idle,
                             uint32_t keep_intvl, uint32_t keep_cnt);
/* From relay.c, for relays it opened for a dial (tl_relay_adopt); registered: the socket is
 * in the poll set already, disarmed (EPOLLONESHOT fired), for the relay to re-arm (MOD). */
int tl_relay_adopt(struct tcp_pcb *pcb, int fd, struct tl_dial *flow, int registered);
void tl_dial_relay_opened(struct tl_dial *d, struct tl_relay *r);
void tl_dial_first_data(struct tl_dial *d, const uint8_t *data, size_t len);
void tl_dial_relay_ended(struct tl_dial *d, int reason, uint64_t up, uint64_t down);

/* ---- socks5_dial.c ----------------------------------------------------------------------- */

struct tl_socks5;
/* The handshake of a dial to `target` (by `name` when not NULL) with optional RFC 1929 `auth`;
 * NULL with *err (EINVAL, ENOMEM). */
struct tl_socks5 *tl_socks5_new(const tl_endpoint *target, const char *name, const uint8_t *auth,
                                size_t auth_len, int *err);
void tl_socks5_free(struct tl_socks5 *s);
/* The dial's socket `fd` (in the poll set with `owner` as its pointer) is ready: 0 more to do,
 * 1 the handshake is done (the socket is at the destination's first byte), -TL_SOCKS5_* with
 * *err an errno when it failed. */
int tl_socks5_ready(struct tl_socks5 *s, int fd, uint32_t events, void *owner, int *err);
/* TL_SOCKS5_CONNECT_TIMEOUT or TL_SOCKS5_HANDSHAKE_TIMEOUT, by the step it is at. */
int tl_socks5_timeout_reason(const struct tl_socks5 *s);

/* ---- vnet.c: output to a TUN fd with a virtio-net header --------------------------------- */

#define TL_VNET_HDR_LEN 10 /* struct virtio_net_hdr, the TUN default (TUNSETVNETHDRSZ) */

typedef struct {
    uint64_t writes;              /* write calls made */
    uint64_t gso_writes;          /* of which carried several segments */
    uint64_t segments_coalesced;  /* segments that rode in another's write */
    uint64_t gso_refused;         /* GSO writes the kernel refused (then: one write a packet) */
    uint64_t gso_udp_writes;      /* GSO writes of UDP datagrams (USO) */
} tl_vnet_counters;

extern tl_vnet_counters tl_vnet_stats;

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

/* ---- vnet_input.c: input from a TUN fd with a virtio-net header -------------------------- */

/* Set while a packet whose transport checksum a kernel vouched for (NEEDS_CSUM, DATA_VALID)
 * is in tl_input: transport_input.c does not verify it. */
extern int tl_input_vouched;
/* One read of the device (header and packet, len bytes; the packet may be rewritten in place):
 * checked and fed to lwIP, a UDP super-datagram split. 0, or -1 if it was dropped. */
int tl_vnet_input(uint8_t *buf, size_t len);

/* ---- udp_relay.c: UDP sessions relayed in C ---------------------------------------------- */

struct tl_udp_relay;
/* A client datagram of a relayed session: 1 if taken (p is then the relay's), else 0. */
int tl_udp_relay_take(const tl_endpoint *src, const tl_endpoint *dst, struct pbuf *p);
/* Around an input batch: client datagrams are queued, then sent with sendmmsg at the end. */
void tl_udp_relay_defer_begin(void);
void tl_udp_relay_defer_end(void);
void tl_udp_relay_on_ready(struct tl_udp_relay *r, uint32_t events);
void tl_udp_relay_bury(void); /* free closed sessions: after every poll round */

/* ---- socks5_udp.c: the SOCKS5 UDP header of a relay's datagram --------------------------- */

#define TL_SOCKS5_MALFORMED (-1) /* short, reserved bytes set, unknown address type, bad name */
#define TL_SOCKS5_FRAGMENT (-2)  /* FRAG != 0: not reassembled */
#define TL_SOCKS5_FOREIGN (-3)   /* another source than the session's target */
/* The payload's offset in datagram d (len bytes) from the relay of a session whose own header
 * is ours (ours_len bytes); any_address: the target was sent by name, so only its port must
 * match. Or one of the TL_SOCKS5_* reasons (drop the datagram). */
int tl_socks5_udp_payload(const uint8_t *d, size_t len, const uint8_t *ours, size_t ours_len,
                          int any_address);

#endif

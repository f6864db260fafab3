/*
 * The flat C API tunlwip's Python side sees (this file is also the cffi cdef: declarations only,
 * no preprocessor lines other than the include guard, which build_ffi.py strips).
 * lwIP structures stay opaque: a TCP connection is a `void *`.
 */
#ifndef TUNLWIP_GLUE_H
#define TUNLWIP_GLUE_H

typedef struct {
    uint8_t family;     /* 4 or 6 */
    uint8_t addr[16];   /* network byte order; IPv4 uses the first 4 bytes */
    uint16_t port;      /* host byte order */
} tl_endpoint;

typedef struct {
    uint64_t packets_in, bytes_in, packets_out, bytes_out;
    uint64_t tcp_in, udp_in, other_in;
    uint64_t drop_too_short, drop_too_long, drop_bad_version, drop_ip_header, drop_ip_checksum;
    uint64_t drop_bad_address, drop_local_destination, drop_not_client, drop_port_zero;
    uint64_t drop_transport_header;
    uint64_t drop_transport_checksum, drop_unsupported, drop_no_memory, drop_no_listener;
    uint64_t fragments_in, datagrams_reassembled, drop_fragment;
    uint64_t syn_held, syn_released, time_wait_recycled, time_wait_trimmed;
    uint64_t udp_unhandled, output_errors;
    uint64_t udp_port_rejected, drop_udp_port_blocked;
    uint64_t icmp_echo_in, icmp_echo_replied, icmp_echo_forwarded, drop_echo_off;
    uint64_t tcp_recv_deferred; /* deliveries a full Python stream refused (lwIP keeps them) */
    /* a device with a virtio-net header: writes made, of which several segments in one (GSO),
     * segments that rode in another's write, GSO writes the kernel refused */
    uint64_t output_writes, output_gso_writes, output_segments_coalesced, output_gso_refused;
    /* a TCP/UDP segment that reached lwIP by a path that skipped the input hooks' checks (0
     * unless lwIP grows a new path), IPv6 extension headers, a fragment whose protocol differs
     * from its datagram's first fragment, the oldest half-open connection evicted at the limit */
    uint64_t drop_unchecked, drop_ip6_extension, drop_fragment_protocol, tcp_half_open_evicted;
    uint64_t listeners, udp_ports, tcp_half_open; /* gauges, kept by tl_reset_counters */
    /* offloaded input (vnet_input.c): TCP super-segments taken whole, UDP super-datagrams
     * split and the datagrams they made, packets whose virtio-net header did not describe them;
     * input_offloads: the TUN_F_* flags the device negotiated (a gauge, kept by reset) */
    uint64_t input_gso_tcp, input_gso_udp, input_gso_udp_datagrams, drop_vnet_header;
    uint64_t input_offloads;
    /* of output_gso_writes, those of joined UDP datagrams (USO) */
    uint64_t output_gso_udp_writes;
} tl_counters;

/* lifecycle and time */
int tl_init(uint16_t mtu, const uint8_t *ip4, const uint8_t *ip6);
void tl_deinit(void);
/* hand the heap's free pages back to the kernel (once the gateway serves: startup's garbage) */
void tl_release_free_heap(void);
void tl_set_now(uint32_t ms);
uint32_t tl_now(void);
uint32_t tl_sleeptime(void);
void tl_check_timeouts(void);
const tl_counters *tl_get_counters(void);
void tl_reset_counters(void);
uint32_t tl_tcp_pcb_count(void);
/* the sha256 of the C sources the module was compiled from (tunlwip/_stamp.py): the package
 * refuses to import a module built from other sources than its own (a stale build) */
const char *tl_build_stamp(void);

/* policy knobs */
void tl_set_checksum_check(int on);
void tl_set_output_fd(int fd);
/* the device's packets carry a virtio-net header (a TUN opened with IFF_VNET_HDR): reads skip
 * it, and output to the fd coalesces TCP segments into GSO writes */
void tl_set_vnet_hdr(int on);
/* the TUN_F_* offloads the device negotiated (TUNSETOFFLOAD), reported as input_offloads */
void tl_set_vnet_offloads(uint32_t flags);
/* a scope around a burst of output (datagrams sent one by one): with a virtio-net header, what
 * lwIP sends inside may leave coalesced, at the outermost end (nests; keep it short) */
void tl_output_batch_begin(void);
void tl_output_batch_end(void);
void tl_set_hold_syns(int on);
void tl_set_forward_local(int on);
/* at most this many connections in SYN_RCVD at once; the oldest is reset to admit a new one */
void tl_set_max_half_open(uint32_t count);
/* the gateway host's own addresses (port ignored), refused like loopback unless forward_local;
 * replaces the previous set: 0, -1 bad family or count, -2 out of memory */
int tl_set_host_addresses(const tl_endpoint *addrs, int count);
int tl_set_client_networks(const tl_endpoint *networks, const uint8_t *prefixes, int count);
/* UDP to a destination port: pass (default), reject with port unreachable, or drop */
enum { TL_UDP_PASS = 0, TL_UDP_REJECT = 1, TL_UDP_DROP = 2 };
int tl_set_udp_port_action(uint16_t port, int action);
/* ICMP echo to addresses other than the gateway's: ignore, answer, or hand to tl_py_icmp_echo */
enum { TL_ECHO_OFF = 0, TL_ECHO_REPLY = 1, TL_ECHO_FORWARD = 2 };
int tl_set_icmp_echo_mode(int mode);

/* packet input: 0 when handed on, a negative value when dropped before lwIP saw it */
int tl_input(const uint8_t *data, size_t len);
int tl_input_release(const uint8_t *data, size_t len);
/* read and input up to max_packets from a non-blocking fd: count read (< max: drained) or -errno */
int tl_input_fd(int fd, int max_packets);

/* TCP connections (pcb is opaque) */
void tl_tcp_endpoints(void *pcb, tl_endpoint *local, tl_endpoint *remote);
int tl_tcp_write(void *pcb, const uint8_t *data, size_t len);
uint32_t tl_tcp_sndbuf(void *pcb);
void tl_tcp_recved(void *pcb, size_t len);
/* Offer data a full stream refused again: 0 none held, 1 offered, -1 the PCB was aborted */
int tl_tcp_offer_deferred(void *pcb);
int tl_tcp_shutdown_tx(void *pcb);
void tl_tcp_close(void *pcb);
void tl_tcp_abort(void *pcb);
int tl_tcp_state(void *pcb);

/* UDP: send a datagram to a client from any address and port */
int tl_udp_send(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *data, size_t len);

/* ICMP: send a message (type, code, checksum filled here, rest) to a client from any address */
int tl_icmp_send(const tl_endpoint *src, const tl_endpoint *dst, const uint8_t *msg, size_t len);

/* Relays (relay.c): the default forwarder, bytes moved between a connection and its upstream
 * socket in C. Python waits for tl_relay_epoll_fd to be readable and calls tl_relay_poll. */
enum { TL_RELAY_CLOSED = 0, TL_RELAY_CLIENT_RESET = 1, TL_RELAY_UPSTREAM_RESET = 2,
       TL_RELAY_ERROR = 3, TL_RELAY_IDLE = 4, TL_RELAY_STOPPED = 5,
       /* lwIP gave up on the client, the kernel on the upstream (keepalive, retransmissions) */
       TL_RELAY_CLIENT_TIMEOUT = 6, TL_RELAY_UPSTREAM_TIMEOUT = 7 };
typedef struct {
    uint64_t opened, spills;
    uint64_t upstream_full, client_full; /* backpressure: socket or lwIP send buffer full */
    uint64_t poll_errors;                /* relays ended because epoll refused their fd */
    uint64_t ended[8]; /* by reason */
} tl_relay_counters;
typedef struct {
    uint64_t bytes_up, bytes_down; /* client -> upstream, upstream -> client */
    uint32_t idle_ms;
} tl_relay_stats;
int tl_relay_epoll_fd(void);
int tl_relay_open(void *pcb, int fd, uintptr_t conn, const uint8_t *pending, size_t len,
                  int client_eof, int want_first_data, void **out);
int tl_relay_poll(int max_events);
/* The poll loop in C while the event loop is idle; why it returned: */
enum { TL_RUN_PYTHON = 0, TL_RUN_LOOP = 1, TL_RUN_TIMEOUT = 2, TL_RUN_SIGNAL = 3,
       TL_RUN_PASSES = 256 };
int tl_relay_wait_with(int loop_fd); /* the event loop's epoll fd, once per run; -1: none */
int tl_relay_run(int timeout_ms, uint32_t clock_base_ms, double clock_origin);
void tl_relay_info(void *relay, tl_relay_stats *out);
void tl_relay_abort(void *relay, int reason);
int tl_relay_sweep(uint32_t idle_ms); /* 0: no idle limit (half-closed flows still probed) */
void tl_relay_abort_all(void);
/* lwIP keepalive toward clients, for connections accepted from now on (idle_ms 0: off) */
void tl_set_tcp_keepalive(uint32_t idle_ms, uint32_t interval_ms, uint32_t count);
uint32_t tl_relay_count(void);
const tl_relay_counters *tl_relay_get_counters(void);
void tl_relay_reset_counters(void);
void tl_relay_defer_begin(void);
void tl_relay_defer_end(void);
/* Python watchers on the same poll set: tl_py_fd_ready(token) when fd is readable (or
 * writable) */
int tl_watch_add(int fd, uintptr_t token, int writable);
int tl_watch_del(int fd);
/* the packet device read from the same poll set (-1: stop); why it stopped (errno) or 0 */
int tl_poll_set_input(int fd);
int tl_poll_input_error(void);

/* UDP session relays (udp_relay.c): the default UDP forwarder's datagrams moved in C. Python
 * opens one per session with its connected upstream fd (kept and closed by Python), collects
 * the sessions active since the last call (tl_udp_relay_touched: counts, idle time) and closes
 * them (idle, evicted, stopped). */
typedef struct {
    uintptr_t token;
    uint64_t datagrams_up, bytes_up, datagrams_down, bytes_down;
    uint32_t idle_ms;
} tl_udp_relay_stats;
typedef struct {
    uint64_t opened, closed, datagrams_up, datagrams_down;
    uint64_t send_calls, recv_calls;  /* sendmmsg / recvmmsg calls that moved datagrams */
    uint64_t drop_upstream_full;      /* client datagrams dropped: the socket's buffer was full */
    uint64_t drop_upstream_error;     /* client datagrams the socket refused (too big, ...) */
    uint64_t drop_to_client;          /* upstream datagrams lwIP could not send to the client */
    uint64_t recv_errors, port_unreachable; /* ICMP errors read; port unreachable mirrored */
    /* through a SOCKS5 relay: datagrams down dropped for a malformed header, a fragment,
     * another source than the target; port unreachable from the relay itself */
    uint64_t socks5_malformed, socks5_fragments, socks5_foreign, socks5_relay_refused;
} tl_udp_relay_counters;
/* 0 with *out set, or -errno (-EEXIST: the flow has a session already) */
int tl_udp_relay_open(const tl_endpoint *client, const tl_endpoint *target, int fd,
                      uintptr_t token, void **out);
/* the session goes through a SOCKS5 UDP relay: header before each datagram up, replies'
 * headers checked and stripped (any_address: the target went by name). 0 or -errno. */
int tl_udp_relay_set_socks5(void *relay, const uint8_t *header, size_t len, int any_address);
void tl_udp_relay_close(void *relay, tl_udp_relay_stats *out);
void tl_udp_relay_close_all(void);
void tl_udp_relay_info(void *relay, tl_udp_relay_stats *out);
int tl_udp_relay_touched(tl_udp_relay_stats *out, int max);
uint32_t tl_udp_relay_count(void);
const tl_udp_relay_counters *tl_udp_relay_get_counters(void);
void tl_udp_relay_reset_counters(void);
/* Dials in C (dial.c): with dial before accept on a device C reads, Python admits a held SYN
 * and calls tl_dial_start; C connects, releases the SYN, and relays the accepted connection.
 * Python hears of each step in batches (tl_dial_events). */
enum { TL_DIAL_CONNECTED = 1, TL_DIAL_FAILED = 2, TL_DIAL_UNCLAIMED = 3, TL_DIAL_OPENED = 4,
       TL_DIAL_FIRST_DATA = 5, TL_DIAL_ENDED = 6 };
enum { TL_PROTECT_NONE = 0, TL_PROTECT_MARK = 1, TL_PROTECT_INTERFACE = 2 };
enum { TL_DIAL_PROTECT_FAILED = 4096 }; /* tl_dial_start: -(this + errno) */
typedef struct {
    uint64_t id;
    int kind;          /* TL_DIAL_* */
    int error;         /* FAILED: errno; ENDED: the relay's reason (TL_RELAY_*) */
    void *flow;        /* for tl_dial_flow_bytes, from OPENED until its ENDED is taken */
    uint32_t at_ms, ago_ms, latency_ms; /* lwIP clock; ago: before the take; the connect's
                                         * (FAILED: until it failed) */
    uint64_t bytes_up, bytes_down;      /* ENDED */
    const uint8_t *data; /* FAILED: the held SYN; FIRST_DATA: the client's first bytes */
    uint32_t len;
    int proxy_reason;    /* FAILED through a SOCKS5 proxy: TL_SOCKS5_* (else 0) */
    tl_endpoint client, target;
    int admitted_in_c;   /* admit.c dialed it: Python's SYN hook never saw it */
    uint32_t duration_ms; /* ENDED: since the relay opened */
} tl_dial_event;
/* A relayed flow admit.c started, as tl_dial_flows_alone lists it (C keeps its record). */
typedef struct {
    uint64_t id;
    tl_endpoint client, target;
    uint32_t latency_ms, age_ms; /* the connect; since the relay opened */
    uint64_t bytes_up, bytes_down;
} tl_dial_flow;
/* Why a dial through a SOCKS5 proxy failed (socks5_dial.c); binding/dial.py has their texts.
 * The reply codes 3-6 (NET_UNREACHABLE .. TTL_EXPIRED) are the destination's failures. */
enum { TL_SOCKS5_REFUSED = 1, TL_SOCKS5_CONNECT_TIMEOUT = 2, TL_SOCKS5_UNREACHABLE = 3,
       TL_SOCKS5_HANDSHAKE_TIMEOUT = 4, TL_SOCKS5_CLOSED = 5, TL_SOCKS5_BROKEN = 6,
       TL_SOCKS5_BAD_VERSION = 7, TL_SOCKS5_NO_METHOD = 8, TL_SOCKS5_UNOFFERED_METHOD = 9,
       TL_SOCKS5_BAD_AUTH_VERSION = 10, TL_SOCKS5_AUTH_FAILED = 11, TL_SOCKS5_BAD_RESERVED = 12,
       TL_SOCKS5_BAD_ADDRESS_TYPE = 13, TL_SOCKS5_BAD_ADDRESS = 14,
       TL_SOCKS5_GENERAL_FAILURE = 15, TL_SOCKS5_NOT_ALLOWED = 16,
       TL_SOCKS5_NET_UNREACHABLE = 17, TL_SOCKS5_HOST_UNREACHABLE = 18,
       TL_SOCKS5_DEST_REFUSED = 19, TL_SOCKS5_TTL_EXPIRED = 20,
       TL_SOCKS5_COMMAND_NOT_SUPPORTED = 21, TL_SOCKS5_ATYP_NOT_SUPPORTED = 22,
       TL_SOCKS5_UNKNOWN_REPLY = 23, TL_SOCKS5_REASONS = 24 };
typedef struct {
    uint64_t started, swallowed, loops; /* counts */
    uint64_t events_lost; /* FIRST_DATA dropped for want of memory (the flow goes unnamed) */
    uint64_t dialing, connected, relayed;            /* gauges */
    uint64_t python_calls; /* calls from C into Python, all of them (a cost, for tests) */
    uint64_t socks5_started, socks5_connected;       /* dials through a SOCKS5 proxy */
    uint64_t socks5_failures[TL_SOCKS5_REASONS];     /* by TL_SOCKS5_* */
    uint64_t proxied;                                /* gauge: SOCKS5 dials under way */
    uint64_t alone, alone_opened; /* relayed flows admit.c started: open now, opened */
} tl_dial_counters;
int tl_dial_configure(int on, int protect, uint32_t mark, const char *ifname,
                      uint32_t keep_idle, uint32_t keep_intvl, uint32_t keep_cnt,
                      uint32_t connect_ms, uint32_t claim_ms);
void tl_dial_set_accepting(int on);
/* Dial the SYN held now (only from Python's SYN hook): the dial's id, or -errno */
int64_t tl_dial_start(void);
/* The same through the SOCKS5 proxy at `proxy`: CONNECT to the SYN's destination, or to `name`
 * (ATYP 3; NULL: by address); `auth`: the RFC 1929 request to send if the proxy asks for it
 * (NULL, 0: offer no authentication). The dial's id, or -errno */
int64_t tl_dial_start_socks5(const tl_endpoint *proxy, const char *name, const uint8_t *auth,
                             size_t auth_len);
/* The connect to a proxy and its handshake together end within this (dials started after) */
void tl_dial_set_proxy_timeout(uint32_t ms);
int tl_dial_is_own(const tl_endpoint *local, const tl_endpoint *peer);
/* The events since the last take; they, and what they point to, live until the next take */
int tl_dial_events(tl_dial_event **out);
int tl_dial_events_waiting(void);
void tl_dial_flow_bytes(void *flow, tl_relay_stats *out);
/* Up to max of the open flows admit.c started (Python hears of them only at their ENDED),
 * oldest first; how many were written */
int tl_dial_flows_alone(tl_dial_flow *out, int max);
const tl_dial_counters *tl_dial_get_counters(void);
void tl_dial_reset_counters(void);
/* Close every socket still dialing or unclaimed (reported as FAILED ECANCELED, UNCLAIMED) */
void tl_dial_close_all(void);
/* Tests: the most events either event array may hold, as if memory ran out beyond (0: none) */
void tl_dial_limit_event_slots(size_t slots);

/* Admission in C (admit.c): plain SYNs dialed without calling Python, against the limits and
 * counts Python gives. Counts per client (IPv4 address, or IPv6 /64 as the key's top bits). */
enum { TL_ADMIT_C_DIALING = 0, TL_ADMIT_C_OPEN = 1, TL_ADMIT_PY_DIALING = 2, TL_ADMIT_PY_OPEN = 3,
       TL_ADMIT_KINDS = 4 };
void tl_admit_configure(int on, uint32_t max_open, uint32_t max_pending, uint32_t open_share,
                        uint32_t pending_share, const uint16_t *python_ports, size_t n_ports);
/* Python's own flows of a client (kind TL_ADMIT_PY_*), as its tables change */
void tl_admit_python(int family, uint64_t key, int kind, int delta);
void tl_admit_forget_python(void);
void tl_admit_client_counts(int family, uint64_t key, uint32_t out[4]);
uint64_t tl_admit_fast_count(void); /* SYNs dialed without Python */
void tl_admit_reset_counters(void);
void tl_admit_get_totals(uint64_t out[4]); /* every client's counts summed, by kind */

#endif

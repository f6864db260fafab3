/*
 * The SOCKS5 UDP request header (RFC 1928 section 7) of a datagram from a proxy's UDP relay:
 * checked and measured, so the C UDP relay can strip it without Python.
 *
 * Theory of operation
 * -------------------
 * A session routed through a SOCKS5 proxy (udp_forward.py, egress/udp_routes.py) is relayed by
 * udp_relay.c like a direct one, over a UDP socket connected to the proxy's relay. Every
 * datagram we send carries the fixed header Python built for the session's target
 * (RSV RSV FRAG=0 ATYP ADDR PORT, prepended as its own iovec); every datagram the relay sends
 * back carries a header naming its source, which this file checks before the payload goes to
 * the client:
 *  - RSV must be zero and the header complete (ATYP 1: 10 bytes, 4: 22, 3: 7 + name length,
 *    a name of 1-255 printable ASCII bytes), else TL_SOCKS5_MALFORMED;
 *  - FRAG must be zero (fragments are not reassembled, as most clients do), else
 *    TL_SOCKS5_FRAGMENT;
 *  - the source must be the session's target: with a target given by address the header must
 *    equal ours byte for byte; with a target given by name (remote DNS: the proxy resolved it)
 *    any address with the target's port is taken. Else TL_SOCKS5_FOREIGN.
 * The same rules as egress/socks5.py's parse_udp_datagram and socks5_client.UdpAssociation's
 * unwrap, which the Python relay uses. Pure function: no state, no allocation; it reads at
 * most len bytes of the datagram (the fuzzer's packet harness feeds it arbitrary replies).
 */
#include <string.h>

#include "tl_internal.h"

int tl_socks5_udp_payload(const uint8_t *d, size_t len, const uint8_t *ours, size_t ours_len,
                          int any_address)
{
    if (len < 5 || d[0] != 0 || d[1] != 0) return TL_SOCKS5_MALFORMED;
    if (d[2] != 0) return TL_SOCKS5_FRAGMENT;
    size_t head;
    switch (d[3]) {
    case 1:
        head = 4 + 4 + 2;
        break;
    case 4:
        head = 4 + 16 + 2;
        break;
    case 3:
        if (d[4] == 0) return TL_SOCKS5_MALFORMED;
        head = 4 + 1 + (size_t)d[4] + 2;
        if (len < head) return TL_SOCKS5_MALFORMED;
        for (size_t i = 5; i < 5 + (size_t)d[4]; i++)
            if (d[i] < 0x21 || d[i] >= 0x7F) return TL_SOCKS5_MALFORMED;
        break;
    default:
        return TL_SOCKS5_MALFORMED;
    }
    if (len < head) return TL_SOCKS5_MALFORMED;
    if (any_address) {
        if (ours_len < 2 || memcmp(d + head - 2, ours + ours_len - 2, 2) != 0)
            return TL_SOCKS5_FOREIGN;
    } else if (head != ours_len || memcmp(d, ours, head) != 0) {
        return TL_SOCKS5_FOREIGN;
    }
    return (int)head;
}

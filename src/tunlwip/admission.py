"""Admission of new flows: the checks both forwarders make, and the count of flows turned away.

Theory of operation
-------------------
Every new TCP connection (its SYN) and UDP session passes ``Admission.screen`` before anything
is opened for it: the gateway's own upstream traffic coming back through the TUN is a routing
loop (dropped, or it would be dialed again and again), and DNS over TLS or QUIC is refused when
``dns.reject_encrypted`` asks for it (so the client falls back to plain DNS at once). The
forwarders turn the verdict into their protocol's answer (RST, ICMP, a silent drop).

Flows refused elsewhere (at a limit, at a client's share, for want of a file descriptor) are
counted here too, in ``RefusedCounters``: one record of every new flow the gateway turned away,
whichever path refused it. Problems the operator must fix are logged rarely, never per flow.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
from typing import Literal

import trio

from .dialer import Dialer, describe
from .endpoint import Endpoint

# The gateway's logger: these messages kept their logger name when they moved here.
log = logging.getLogger("tunlwip.gateway")

#: DNS over TLS (RFC 7858) over TCP, DNS over QUIC (RFC 9250) and over DTLS over UDP.
ENCRYPTED_DNS_PORT = 853
#: The errnos of "no file descriptor left" (per process, system-wide).
FD_SHORTAGE = (errno.EMFILE, errno.ENFILE)
#: The errnos of "no memory for the new flow's state" (e.g. a C dial's events, socket buffers).
MEMORY_SHORTAGE = (errno.ENOMEM, errno.ENOBUFS)

Verdict = Literal["loop", "encrypted_dns"] | None


@dataclasses.dataclass
class RefusedCounters:
    """New flows turned away at a limit (existing flows are never touched for a new one).
    UDP sessions and DNS queries count theirs in ``UdpCounters`` and ``DnsCounters``."""

    #: ``stack.max_tcp_connections`` open or being dialed: RST.
    tcp_connections: int = 0
    #: ``max_pending_dials`` SYNs held while dialing: RST.
    pending_dials: int = 0
    #: No file descriptor left for an upstream socket (EMFILE, ENFILE): RST or ICMP.
    file_descriptors: int = 0
    #: No memory for the new flow's state (ENOMEM, ENOBUFS; e.g. a C dial's events): RST.
    memory: int = 0
    #: The gateway's own upstream traffic came back through the TUN (protection not in
    #: effect): dropped, so it cannot loop.
    loops: int = 0
    #: TCP or UDP to port 853 (DNS over TLS or QUIC) with ``dns.reject_encrypted``: RST or
    #: ICMP port unreachable, so the client falls back to plain DNS at once.
    encrypted_dns: int = 0
    #: New flows refused because their client (IPv4 address, IPv6 /64) held its share of a
    #: budget while the budget itself had room; each answered as at the global limit:
    #: held SYNs (``max_pending_dials_per_client``): RST;
    client_share_dials: int = 0
    #: connections open or being dialed (``stack.max_tcp_connections_per_client``): RST;
    client_share_connections: int = 0
    #: UDP sessions (``udp.max_sessions_per_client``, also ``udp.refused_client_share``):
    #: ICMP port unreachable;
    client_share_udp_sessions: int = 0
    #: DNS queries in flight (``dns.max_in_flight_per_client``, also ``dns.client_share``):
    #: REFUSED.
    client_share_dns: int = 0


class Admission:
    """Screens new flows and counts the refused ones (``refused``)."""

    def __init__(self, dialer: Dialer, *, reject_encrypted_dns: bool) -> None:
        self._dialer = dialer
        #: ``dns.reject_encrypted`` (the gateway updates it on reconfigure).
        self.reject_encrypted_dns = reject_encrypted_dns
        self.refused = RefusedCounters()
        self._loop_reported = False
        self._fd_shortage_reported_at = -math.inf
        self._memory_shortage_reported_at = -math.inf

    def screen(self, kind: str, client: Endpoint, target: Endpoint) -> Verdict:
        """Why the new ``kind`` ("TCP", "UDP") flow must not start, counted; None if it may."""
        if self._dialer.is_own(client, target, also=kind != "TCP"):
            self._loop_detected(kind, client, target)
            return "loop"
        if target.port == ENCRYPTED_DNS_PORT and self.reject_encrypted_dns:
            self.refused.encrypted_dns += 1
            return "encrypted_dns"
        return None

    def shortage(self, exc: OSError) -> bool:
        """Is ``exc`` the gateway's own shortage (file descriptors, memory) rather than the
        destination's answer? If so it is counted (and warned about, rarely)."""
        if exc.errno in FD_SHORTAGE:
            self.fd_shortage(exc)
            return True
        if exc.errno in MEMORY_SHORTAGE:
            self.refused.memory += 1
            now = trio.current_time()
            if now - self._memory_shortage_reported_at >= 60:
                self._memory_shortage_reported_at = now
                log.warning("out of memory for new flows (%s): they are refused until some "
                            "memory is free", exc.strerror)  # fmt: skip
            return True
        return False

    def fd_shortage(self, exc: OSError) -> None:
        """Out of file descriptors: new flows are refused (counted) until some close; warn at
        most once a minute rather than per flow."""
        self.refused.file_descriptors += 1
        now = trio.current_time()
        if now - self._fd_shortage_reported_at >= 60:
            self._fd_shortage_reported_at = now
            log.warning("out of file descriptors (%s): new flows are refused until some close; "
                        "raise the limit (LimitNOFILE, ulimit -n) or lower tcp.max_connections "
                        "and udp.max_sessions", exc.strerror)  # fmt: skip

    def loops_dropped_in_c(self, count: int) -> None:
        """C dropped ``count`` held SYNs of its own dials' sockets (``c_dials``)."""
        self.refused.loops += count - 1
        self._loop_detected("TCP", "(in C)", "(in C)")

    def _loop_detected(self, kind: str, client: object, target: object) -> None:
        """Our own upstream traffic arrived on the TUN: drop it (forwarding it would dial the
        same destination again, and again), count it, and say once, loudly, what to fix."""
        self.refused.loops += 1
        if not self._loop_reported:
            self._loop_reported = True
            log.error("routing loop: the gateway's own %s traffic %s -> %s came back through "
                      "the TUN, so its sockets are not protected (protect: %s). Set "
                      "protect.fwmark with a matching `ip rule`, or protect.interface, or run "
                      "the gateway where its routes do not lead into the TUN. Looping packets "
                      "are dropped (counted: refused.loops); this is logged once.", kind,
                      client, target, describe(self._dialer.protector))  # fmt: skip

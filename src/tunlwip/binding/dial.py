"""The dials in C (``_csrc/dial.c``, ``_csrc/socks5_dial.c``): held SYNs' upstream connects,
directly or through a SOCKS5 proxy, and their relays, no Python.

Conventions: ``configure`` and ``start`` use ``-errno`` (``start``: the dial's id, or ``-errno``
returned as it is, since a failed dial is an outcome to answer, not an exception; a failed
protection is ``-(PROTECT_FAILED + errno)``); ``events`` returns the batch of events since the
last take, valid until the next take; the rest return counts or nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..endpoint import Endpoint
from .check import check_errno
from .endpoints import endpoint_from_c, endpoint_to_c
from .ffi import ffi, lib

CONNECTED: int = lib.TL_DIAL_CONNECTED
FAILED: int = lib.TL_DIAL_FAILED
UNCLAIMED: int = lib.TL_DIAL_UNCLAIMED
OPENED: int = lib.TL_DIAL_OPENED
FIRST_DATA: int = lib.TL_DIAL_FIRST_DATA
ENDED: int = lib.TL_DIAL_ENDED
PROTECT_NONE: int = lib.TL_PROTECT_NONE
PROTECT_MARK: int = lib.TL_PROTECT_MARK
PROTECT_INTERFACE: int = lib.TL_PROTECT_INTERFACE
PROTECT_FAILED: int = lib.TL_DIAL_PROTECT_FAILED

#: Dial the SYN Python's SYN hook is looking at: the dial's id, or ``-errno``.
start: Callable[[], int] = lib.tl_dial_start
#: The connect to a proxy and its handshake together end within this many ms (new dials).
set_proxy_timeout: Callable[[int], None] = lib.tl_dial_set_proxy_timeout
#: Events waiting to be taken.
waiting: Callable[[], int] = lib.tl_dial_events_waiting
#: Let dials be claimed by accepted connections (off: the gateway drains).
set_accepting: Callable[[int], None] = lib.tl_dial_set_accepting
#: Close every socket still dialing or unclaimed (reported as events).
close_all: Callable[[], None] = lib.tl_dial_close_all
reset_counters: Callable[[], None] = lib.tl_dial_reset_counters
#: Tests only: let either event array hold at most this many events, as if memory ran out
#: beyond (0: no limit), so a dial that cannot reserve its events is refused at start.
limit_event_slots: Callable[[int], None] = lib.tl_dial_limit_event_slots


def configure(*, on: bool, protect: int = 0, mark: int = 0, interface: str | None = None,
              keepalive: tuple[int, int, int] | None = None, connect_timeout: float = 30.0,
              claim_timeout: float = 10.0) -> None:  # fmt: skip
    """Switch the C dials on or off, with the protection and keepalive (idle, interval, count
    in seconds; None: the kernel's default) of their sockets and their two deadlines.
    ``-errno``: raises ``OSError``."""
    idle, interval, count = keepalive or (0, 0, 0)
    name = ffi.NULL if interface is None else interface.encode()
    rc = lib.tl_dial_configure(1 if on else 0, protect, mark, name, idle, interval, count,
                               max(1, int(connect_timeout * 1000)),
                               max(1, int(claim_timeout * 1000)))  # fmt: skip
    check_errno(rc, "cannot configure the C dials")


def start_socks5(proxy: Any, name: bytes | None, auth: bytes | None) -> int:
    """Dial the held SYN through the SOCKS5 proxy ``proxy`` (a ``tl_endpoint *``, see
    ``endpoint_to_c``): CONNECT to ``name`` (ATYP 3) if given, else to the SYN's destination;
    ``auth`` the RFC 1929 request if the proxy asks for it. The dial's id, or ``-errno``."""
    return int(lib.tl_dial_start_socks5(proxy, ffi.NULL if name is None else name,
                                        ffi.NULL if auth is None else auth,
                                        0 if auth is None else len(auth)))  # fmt: skip


#: A failed SOCKS5 dial's ``proxy_reason``: the reason the Python client gives for the same
#: failure (``egress.socks5``, ``egress.proxy_dial``), or None when the reply code names the
#: destination's failure (its errno then says which, as a direct dial's would).
PROXY_REASONS: dict[int, str | None] = {
    lib.TL_SOCKS5_REFUSED: "refused",
    lib.TL_SOCKS5_CONNECT_TIMEOUT: "connect timeout",
    lib.TL_SOCKS5_UNREACHABLE: "unreachable",
    lib.TL_SOCKS5_HANDSHAKE_TIMEOUT: "handshake timeout",
    lib.TL_SOCKS5_CLOSED: "closed during handshake",
    lib.TL_SOCKS5_BROKEN: "connection to proxy broken",
    lib.TL_SOCKS5_BAD_VERSION: "bad version",
    lib.TL_SOCKS5_NO_METHOD: "no acceptable auth method",
    lib.TL_SOCKS5_UNOFFERED_METHOD: "unoffered method",
    lib.TL_SOCKS5_BAD_AUTH_VERSION: "bad auth version",
    lib.TL_SOCKS5_AUTH_FAILED: "authentication failed",
    lib.TL_SOCKS5_BAD_RESERVED: "bad reserved byte",
    lib.TL_SOCKS5_BAD_ADDRESS_TYPE: "bad address type",
    lib.TL_SOCKS5_BAD_ADDRESS: "bad address",
    lib.TL_SOCKS5_GENERAL_FAILURE: "general failure",
    lib.TL_SOCKS5_NOT_ALLOWED: "not allowed by ruleset",
    lib.TL_SOCKS5_NET_UNREACHABLE: None,
    lib.TL_SOCKS5_HOST_UNREACHABLE: None,
    lib.TL_SOCKS5_DEST_REFUSED: None,
    lib.TL_SOCKS5_TTL_EXPIRED: None,
    lib.TL_SOCKS5_COMMAND_NOT_SUPPORTED: "command not supported",
    lib.TL_SOCKS5_ATYP_NOT_SUPPORTED: "address type not supported",
    lib.TL_SOCKS5_UNKNOWN_REPLY: "unknown reply code",
}


def events() -> Any:
    """The events since the last take (a cdata array of ``tl_dial_event``, indexable), valid
    until the next call; what they point to is freed then."""
    out = ffi.new("tl_dial_event **")
    n = lib.tl_dial_events(out)
    first = out[0]
    return [first[i] for i in range(n)]


def data(event: Any) -> bytes:
    """The bytes a FAILED (the held SYN) or FIRST_DATA event carries."""
    return bytes(ffi.buffer(event.data, event.len)) if event.len else b""


#: An open flow admit.c started: (id, client, target, connect latency s, age s, bytes up, down).
AloneFlow = tuple[int, Endpoint, Endpoint, float, float, int, int]


def flows_alone(limit: int | None = None) -> list[AloneFlow]:
    """The open flows admit.c started (C keeps their records until they end), most bytes first
    (at most ``limit``)."""
    count = int(lib.tl_dial_get_counters().alone)
    if count == 0 or limit == 0:
        return []
    out = ffi.new("tl_dial_flow[]", count)
    listed = [out[i] for i in range(lib.tl_dial_flows_alone(out, count))]
    listed.sort(key=lambda f: f.bytes_up + f.bytes_down, reverse=True)
    return [(int(f.id), endpoint_from_c(f.client), endpoint_from_c(f.target), f.latency_ms / 1000,
             f.age_ms / 1000, int(f.bytes_up), int(f.bytes_down))
            for f in listed[:limit]]  # fmt: skip


def alone() -> tuple[int, int]:
    """(flows admit.c started open now, opened since the counters were reset)."""
    c = lib.tl_dial_get_counters()
    return int(c.alone), int(c.alone_opened)


def flow_bytes(flow: Any) -> tuple[int, int]:
    """(client -> upstream, upstream -> client) bytes of a relayed dial so far."""
    stats = ffi.new("tl_relay_stats *")
    lib.tl_dial_flow_bytes(flow, stats)
    return int(stats.bytes_up), int(stats.bytes_down)


def is_own(local: Endpoint, peer: Endpoint) -> bool:
    """Is ``local`` -> ``peer`` one of the C dials' sockets?"""
    return bool(lib.tl_dial_is_own(endpoint_to_c(local), endpoint_to_c(peer)))


def counters() -> dict[str, int]:
    c = lib.tl_dial_get_counters()
    return {"c_dials": int(c.started), "c_dial_swallowed": int(c.swallowed),
            "c_dial_loops": int(c.loops), "c_dial_events_lost": int(c.events_lost),
            "c_dialing": int(c.dialing), "c_dial_connected": int(c.connected),
            "c_relays": int(c.relayed), "python_calls": int(c.python_calls),
            "c_admitted": int(lib.tl_admit_fast_count()),
            "c_socks5_dials": int(c.socks5_started),
            "c_socks5_connected": int(c.socks5_connected),
            "c_socks5_failures": sum(int(n) for n in c.socks5_failures),
            "c_socks5_dialing": int(c.proxied)}  # fmt: skip


def socks5_failures() -> dict[str, int]:
    """SOCKS5 dials failed in C so far, by reason (the texts of ``PROXY_REASONS``; a reply
    code naming the destination's failure as ``"reply N"``), only those that happened."""
    c = lib.tl_dial_get_counters()
    out: dict[str, int] = {}
    for code, text in PROXY_REASONS.items():
        if count := int(c.socks5_failures[code]):
            key = text if text is not None else f"reply {code - lib.TL_SOCKS5_NET_UNREACHABLE + 3}"
            out[key] = count
    return out


def screened() -> tuple[int, int]:
    """(SYN retransmits swallowed, looping SYNs dropped) in C so far."""
    c = lib.tl_dial_get_counters()
    return int(c.swallowed), int(c.loops)


def relayed() -> int:
    """Relays C opened for its own dials, open now."""
    return int(lib.tl_dial_get_counters().relayed)


def gauges() -> tuple[int, int]:
    """(dials connecting, dials connected and not yet claimed)."""
    c = lib.tl_dial_get_counters()
    return int(c.dialing), int(c.connected)

"""UDP session relays in C (``_csrc/udp_relay.c``): a session's datagrams moved both ways
without Python, in batches (sendmmsg, recvmmsg), its socket in the shared poll set.

Conventions: ``open_relay`` uses ``-errno`` (``OSError``); ``close`` and ``info`` return a
session's counts; ``touched`` the counts of the sessions active since its last call. A handle
is valid until ``close`` or ``close_all`` (the stack stops): a handle from before a
``close_all`` is recognised and ignored, never passed to C.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from typing import Any

from ..endpoint import Endpoint
from .check import check_errno
from .endpoints import endpoint_to_c
from .ffi import ffi, lib

_TOUCHED_BATCH = 256
_generation = 0  # bumped by close_all: older handles are gone


@dataclasses.dataclass(frozen=True, slots=True)
class UdpRelayCounts:
    """A session's totals since it was handed to C, and how long it has been quiet."""

    token: int
    datagrams_up: int
    bytes_up: int
    datagrams_down: int
    bytes_down: int
    idle_ms: int


class UdpRelayHandle:
    """A C UDP session (``struct tl_udp_relay *``), opaque, and the stack run it belongs to."""

    __slots__ = ("_generation", "_ptr")

    def __init__(self, ptr: Any) -> None:
        self._ptr = ptr
        self._generation = _generation

    def _live(self) -> Any:
        """The C pointer, or None once closed (or freed by ``close_all``)."""
        return self._ptr if self._ptr is not None and self._generation == _generation else None


def _counts(stats: Any) -> UdpRelayCounts:
    return UdpRelayCounts(int(stats.token), int(stats.datagrams_up), int(stats.bytes_up),
                          int(stats.datagrams_down), int(stats.bytes_down),
                          int(stats.idle_ms))  # fmt: skip


def open_relay(client: Endpoint, target: Endpoint, fd: int, token: int) -> UdpRelayHandle:
    """Relay the session ``client`` -> ``target`` through the connected socket ``fd`` (which
    the caller keeps and closes after ``close``). ``-errno``: raises ``OSError`` (EEXIST: the
    flow has a C session already)."""
    out = ffi.new("void **")
    rc = lib.tl_udp_relay_open(endpoint_to_c(client), endpoint_to_c(target), fd, token, out)
    check_errno(rc, f"UDP relay {client} -> {target}")
    return UdpRelayHandle(out[0])


def set_socks5(handle: UdpRelayHandle, header: bytes, *, any_address: bool) -> None:
    """The session's socket is connected to a SOCKS5 UDP relay: C prepends ``header`` (the
    target's SOCKS5 UDP request header) to each datagram up, and checks and strips the header
    of each datagram down (``any_address``: the target went by name, only its port must
    match). Call right after ``open_relay``. ``-errno``: raises ``OSError``."""
    ptr = handle._live()
    if ptr is None:
        raise OSError(errno.EBADF, "UDP relay closed")
    check_errno(lib.tl_udp_relay_set_socks5(ptr, header, len(header), int(any_address)),
                "UDP relay SOCKS5 header")  # fmt: skip


def close(handle: UdpRelayHandle) -> UdpRelayCounts | None:
    """End the session (its queued datagrams are sent first); its final counts, or None if it
    was closed already."""
    ptr = handle._live()
    handle._ptr = None
    if ptr is None:
        return None
    stats = ffi.new("tl_udp_relay_stats *")
    lib.tl_udp_relay_close(ptr, stats)
    return _counts(stats)


def info(handle: UdpRelayHandle) -> UdpRelayCounts | None:
    """The session's counts now, or None once closed."""
    ptr = handle._live()
    if ptr is None:
        return None
    stats = ffi.new("tl_udp_relay_stats *")
    lib.tl_udp_relay_info(ptr, stats)
    return _counts(stats)


def touched() -> list[UdpRelayCounts]:
    """The sessions with a datagram either way since the last call (each once), most recently
    active first."""
    found: list[UdpRelayCounts] = []
    out = ffi.new("tl_udp_relay_stats[]", _TOUCHED_BATCH)
    while True:
        n = lib.tl_udp_relay_touched(out, _TOUCHED_BATCH)
        found.extend(_counts(out[i]) for i in range(n))
        if n < _TOUCHED_BATCH:
            return found


def close_all() -> None:
    """End every C session (the stack stops); their handles become void."""
    global _generation
    lib.tl_udp_relay_close_all()
    _generation += 1


#: C sessions open now.
count: Callable[[], int] = lib.tl_udp_relay_count
#: Zero the counters.
reset_counters: Callable[[], None] = lib.tl_udp_relay_reset_counters


def counters() -> dict[str, int]:
    """The C UDP relay counters (``tl_udp_relay_counters``), by their report names."""
    c = lib.tl_udp_relay_get_counters()
    return {
        "udp_relays_opened": int(c.opened),
        "udp_relay_datagrams_up": int(c.datagrams_up),
        "udp_relay_datagrams_down": int(c.datagrams_down),
        "udp_relay_send_calls": int(c.send_calls),
        "udp_relay_recv_calls": int(c.recv_calls),
        "udp_relay_upstream_full": int(c.drop_upstream_full),
        "udp_relay_upstream_errors": int(c.drop_upstream_error),
        "udp_relay_to_client_dropped": int(c.drop_to_client),
        "udp_relay_recv_errors": int(c.recv_errors),
        "udp_relay_port_unreachable": int(c.port_unreachable),
        "udp_relay_socks5_malformed": int(c.socks5_malformed),
        "udp_relay_socks5_fragments": int(c.socks5_fragments),
        "udp_relay_socks5_foreign": int(c.socks5_foreign),
        "udp_relay_socks5_relay_refused": int(c.socks5_relay_refused),
    }

"""One lwIP TCP connection, as the C glue exposes it: an opaque PCB pointer.

Conventions: ``write`` and ``shutdown_tx`` return lwIP ``err_t`` (checked: ``LwipError``);
the rest return counts or states, or nothing. ``recved``, ``sndbuf``, ``close``, ``abort`` and
``offer_deferred`` are the C functions themselves (no Python frame: they run per read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NewType

from ..endpoint import Endpoint
from .check import check_err
from .endpoints import endpoint_from_c
from .ffi import ffi, lib

#: An lwIP ``struct tcp_pcb *``, opaque to Python; only valid while lwIP owns it for us.
Pcb = NewType("Pcb", object)
#: Bytes lwIP may read while the call runs: a ``cdata uint8_t[]`` (``send_buffer``), or bytes.
SendBuffer = Any

# lwIP TCP states (tcpbase.h), for diagnostics.
TCP_STATES = [
    "CLOSED",
    "LISTEN",
    "SYN_SENT",
    "SYN_RCVD",
    "ESTABLISHED",
    "FIN_WAIT_1",
    "FIN_WAIT_2",
    "CLOSE_WAIT",
    "CLOSING",
    "LAST_ACK",
    "TIME_WAIT",
]

#: Acknowledge ``length`` bytes read, opening the client's window again.
recved: Callable[[Pcb, int], None] = lib.tl_tcp_recved
#: Bytes ``write`` would queue now (0: wait for the sent callback).
sndbuf: Callable[[Pcb], int] = lib.tl_tcp_sndbuf
#: Offer data a full stream refused again: 0 none held, 1 offered, -1 the PCB was aborted.
offer_deferred: Callable[[Pcb], int] = lib.tl_tcp_offer_deferred
#: Like close(2): FIN, or RST if the client's bytes were left unread; lwIP owns the PCB after.
close: Callable[[Pcb], None] = lib.tl_tcp_close
#: RST now; the PCB is freed.
abort: Callable[[Pcb], None] = lib.tl_tcp_abort


def send_buffer(data: bytes | bytearray | memoryview) -> SendBuffer:
    """``data`` as C bytes without a copy (valid while ``data`` lives); add an int to skip."""
    return ffi.from_buffer("uint8_t[]", data)


def write(pcb: Pcb, data: SendBuffer, length: int) -> int:
    """Queue up to ``length`` bytes; returns how many were queued (0: the send buffer is
    full). lwIP ``err_t``: raises ``LwipError`` when nothing could be queued."""
    queued: int = lib.tl_tcp_write(pcb, data, length)
    if queued < 0:
        check_err(queued, "write")
    return queued


def shutdown_tx(pcb: Pcb) -> None:
    """FIN after the queued data. lwIP ``err_t``: raises ``LwipError``."""
    check_err(lib.tl_tcp_shutdown_tx(pcb), "shutdown")


def state(pcb: Pcb) -> str:
    """lwIP's TCP state name (``"ESTABLISHED"``, ...)."""
    return TCP_STATES[int(lib.tl_tcp_state(pcb))]


def endpoints(pcb: Pcb) -> tuple[Endpoint, Endpoint]:
    """(local, remote) of a connection: the destination the client asked for, the client."""
    local = ffi.new("tl_endpoint *")
    remote = ffi.new("tl_endpoint *")
    lib.tl_tcp_endpoints(pcb, local, remote)
    return endpoint_from_c(local), endpoint_from_c(remote)

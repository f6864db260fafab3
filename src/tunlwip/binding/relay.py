"""The C relays (``_csrc/relay.c``) and the poll set they share with the device and watchers.

A relay moves a connection's bytes between lwIP and its upstream socket in C. All relayed
sockets, the packet device's fd and Python's watched fds sit in one epoll set that C keeps;
Python waits for that set's fd and lets C serve it (``poll``, or ``run`` while trio is idle).

Conventions: ``open_relay`` fails as lwIP ``ERR_MEM`` (``LwipError``); ``watch_add``,
``epoll_fd``, ``set_input`` and ``wait_with`` use ``-errno`` (checked: ``OSError``, or False);
``run`` returns why it stopped (``RUN_*``); ``poll`` and the rest return counts or nothing.
``poll`` and ``run`` are the C functions themselves: they are the poll loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NewType

from .check import check_err, check_errno
from .err import Err
from .ffi import ffi, lib
from .tcp import Pcb

#: A C relay (``struct tl_relay *``), opaque; valid until its done callback.
RelayHandle = NewType("RelayHandle", object)

# Why a relay ended (``tl_py_relay_done``'s reason).
CLOSED: int = lib.TL_RELAY_CLOSED
CLIENT_RESET: int = lib.TL_RELAY_CLIENT_RESET
UPSTREAM_RESET: int = lib.TL_RELAY_UPSTREAM_RESET
ERROR: int = lib.TL_RELAY_ERROR
IDLE: int = lib.TL_RELAY_IDLE
STOPPED: int = lib.TL_RELAY_STOPPED
CLIENT_TIMEOUT: int = lib.TL_RELAY_CLIENT_TIMEOUT
UPSTREAM_TIMEOUT: int = lib.TL_RELAY_UPSTREAM_TIMEOUT

#: ``run`` returned because Python has work (the other values: trio's loop has I/O, a
#: timeout, a signal).
RUN_PYTHON: int = lib.TL_RUN_PYTHON


def open_relay(
    pcb: Pcb, fd: int, conn: int, pending: bytes, client_eof: bool, want_first_data: bool
) -> RelayHandle | None:
    """Relay connection ``conn`` (its PCB) to the connected socket ``fd``, starting with the
    client's unread ``pending`` bytes. Returns the relay, or None if it already ended (its
    done callback ran). 0/-1 (out of memory, or no poll set): raises ``LwipError(ERR_MEM)``,
    and the caller still owns ``fd`` and the PCB."""
    out = ffi.new("void **")
    rc = lib.tl_relay_open(pcb, fd, conn, pending, len(pending), client_eof,
                           want_first_data, out)  # fmt: skip
    if rc != 0:
        check_err(Err.ERR_MEM, "relay setup")
    return None if out[0] == ffi.NULL else RelayHandle(out[0])


def byte_counts(relay: RelayHandle) -> tuple[int, int]:
    """(client -> upstream, upstream -> client) bytes so far."""
    stats = ffi.new("tl_relay_stats *")
    lib.tl_relay_info(relay, stats)
    return int(stats.bytes_up), int(stats.bytes_down)


#: End a relay now with this reason (RST both ways); reported through its done callback.
abort: Callable[[RelayHandle, int], None] = lib.tl_relay_abort
#: End every relay ("stopped"), closing their upstream sockets.
abort_all: Callable[[], None] = lib.tl_relay_abort_all
#: Reset relays idle this long (ms; 0: no limit) and probe half-closed ones.
sweep: Callable[[int], int] = lib.tl_relay_sweep
#: Relays open now.
count: Callable[[], int] = lib.tl_relay_count
#: Zero the relay counters.
reset_counters: Callable[[], None] = lib.tl_relay_reset_counters


def counters() -> dict[str, int]:
    """The relay counters the stack reports (``tl_relay_counters``), by their report names."""
    c = lib.tl_relay_get_counters()
    return {
        "relays_opened": int(c.opened),
        "relay_spills": int(c.spills),
        "relay_upstream_full": int(c.upstream_full),
        "relay_client_full": int(c.client_full),
        "relay_poll_errors": int(c.poll_errors),
    }


# -- the poll set ------------------------------------------------------------------------------
def epoll_fd() -> int:
    """The poll set's fd (created on first use). ``-errno``: raises ``OSError``."""
    return check_errno(lib.tl_relay_epoll_fd(), "cannot create the poll set")


#: Serve up to this many ready events: device packets, relays, watchers.
poll: Callable[[int], int] = lib.tl_relay_poll
#: Wait and serve in C for up to ``timeout_ms`` (clock base, clock origin); returns ``RUN_*``.
run: Callable[[int, int, float], int] = lib.tl_relay_run


def wait_with(loop_fd: int) -> bool:
    """Let ``run`` also wait for the event loop's epoll fd (-1: forget it). ``-errno``:
    False when it cannot (then ``run`` must not be used)."""
    return bool(lib.tl_relay_wait_with(loop_fd) == 0)


def set_input(fd: int) -> None:
    """Read packets from ``fd`` in the poll set (-1: stop, and clear its error). ``-errno``:
    raises ``OSError``."""
    check_errno(lib.tl_poll_set_input(fd), "poll")


def stop_input() -> None:
    """Stop reading the input fd and clear its error (never fails)."""
    lib.tl_poll_set_input(-1)


#: Why reading the input fd stopped (a positive errno; EPIPE: end of file), or 0.
input_error: Callable[[], int] = lib.tl_poll_input_error


def watch_add(fd: int, token: int, writable: bool) -> None:
    """Report ``fd`` readable (or writable) as ``Sink.on_fd_ready(token)``. ``-errno``:
    raises ``OSError``."""
    check_errno(lib.tl_watch_add(fd, token, 1 if writable else 0), f"cannot watch fd {fd}")


def watch_del(fd: int) -> None:
    """Stop watching ``fd`` (harmless if it is not watched)."""
    lib.tl_watch_del(fd)

"""lwIP itself: lifecycle, clock, counters, policy knobs, packet input, UDP and ICMP output.

lwIP is global (one instance per process): these functions act on it, not on an object.
Each says which return-code convention it uses; calls that return nothing to check, or a
plain number, are the C functions themselves.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

from ..endpoint import Endpoint, IPAddress
from ..errors import TunlwipError
from .check import check_err
from .endpoints import addresses_to_c, endpoint_to_c, endpoint_to_c_shared
from .ffi import ffi, lib

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UdpPortAction = Literal["reject", "drop", "off"]
EchoMode = Literal["reply", "forward", "off"]

UDP_PORT_ACTIONS: dict[str, int] = {
    "reject": lib.TL_UDP_REJECT,
    "drop": lib.TL_UDP_DROP,
    "off": lib.TL_UDP_PASS,
}
ECHO_MODES: dict[str, int] = {
    "reply": lib.TL_ECHO_REPLY,
    "forward": lib.TL_ECHO_FORWARD,
    "off": lib.TL_ECHO_OFF,
}
#: ``sleeptime()`` when no lwIP timer is pending.
SLEEPTIME_INFINITE = 0xFFFFFFFF
#: The names of the C counters (``tl_counters``), in declaration order.
COUNTER_FIELDS: list[str] = [name for name, _ in ffi.typeof("tl_counters").fields]

# -- clock and timers (no return codes) --------------------------------------------------------
#: Set lwIP's clock (ms, wrapping at 2**32).
set_now: Callable[[int], None] = lib.tl_set_now
#: lwIP's clock (ms).
now: Callable[[], int] = lib.tl_now
#: ms until lwIP's next timer is due (``SLEEPTIME_INFINITE``: none).
sleeptime: Callable[[], int] = lib.tl_sleeptime
#: Run lwIP's due timers.
check_timeouts: Callable[[], None] = lib.tl_check_timeouts
#: TCP PCBs lwIP holds (all states).
tcp_pcb_count: Callable[[], int] = lib.tl_tcp_pcb_count


# -- lifecycle ---------------------------------------------------------------------------------
def init(mtu: int, ipv4: ipaddress.IPv4Address, ipv6: ipaddress.IPv6Address) -> None:
    """Initialise lwIP and add the netif (0, or -1 already added, -2 netif_add failed):
    raises ``TunlwipError`` naming the code."""
    rc = lib.tl_init(mtu, ipv4.packed, ipv6.packed)
    if rc != 0:
        raise TunlwipError(f"lwIP netif setup failed ({rc})")


#: Abort every connection and remove the netif; ``init`` may run again afterwards.
deinit: Callable[[], None] = lib.tl_deinit
#: Give the C heap's free pages back to the kernel (what startup freed; glibc keeps them).
release_free_heap: Callable[[], None] = lib.tl_release_free_heap


# -- counters ----------------------------------------------------------------------------------
def counters() -> dict[str, int]:
    """The C packet counters (``tl_counters``) by name."""
    c = lib.tl_get_counters()
    return {name: int(getattr(c, name)) for name in COUNTER_FIELDS}


#: Zero the counters (the gauges stay).
reset_counters: Callable[[], None] = lib.tl_reset_counters


# -- policy knobs (no return codes unless said) ------------------------------------------------
def set_checksum_check(on: bool) -> None:
    lib.tl_set_checksum_check(1 if on else 0)


def set_vnet_header(on: bool) -> None:
    """The device's packets carry a virtio-net header: reads check it (and take offloaded
    super-segments), output is coalesced into GSO writes."""
    lib.tl_set_vnet_hdr(1 if on else 0)


#: Report these ``TUN_F_*`` offloads as negotiated (the ``input_offloads`` counter).
set_vnet_offloads: Callable[[int], None] = lib.tl_set_vnet_offloads


@contextlib.contextmanager
def output_batch() -> Iterator[None]:
    """Around a burst of sends: with a virtio-net header, what lwIP outputs inside may be held
    and leave coalesced (GSO: TCP segments, same-size UDP datagrams of a flow) at the end."""
    lib.tl_output_batch_begin()
    try:
        yield
    finally:
        lib.tl_output_batch_end()


#: Write output packets to this fd from C (instead of ``Sink.on_output``).
set_output_fd: Callable[[int], None] = lib.tl_set_output_fd


def set_hold_syns(on: bool) -> None:
    """Offer new SYNs to ``Sink.on_syn`` before lwIP sees them."""
    lib.tl_set_hold_syns(1 if on else 0)


def set_forward_local(on: bool) -> None:
    """Forward to loopback, link-local and host addresses instead of refusing them."""
    lib.tl_set_forward_local(1 if on else 0)


#: At most this many connections in SYN_RCVD; the oldest is reset to admit a new one.
set_max_half_open: Callable[[int], None] = lib.tl_set_max_half_open


def set_tcp_keepalive(idle_ms: int, interval_ms: int, count: int) -> None:
    """lwIP's keepalive toward clients, for connections accepted from now on (idle 0: off)."""
    lib.tl_set_tcp_keepalive(idle_ms, interval_ms, count)


def set_udp_port_action(port: int, action: UdpPortAction) -> None:
    """UDP to ``port`` is rejected (ICMP port unreachable), dropped, or passed ("off")."""
    lib.tl_set_udp_port_action(port, UDP_PORT_ACTIONS[action])


def set_icmp_echo_mode(mode: EchoMode) -> None:
    """Echo to other addresses than the stack's: answered, handed to ``Sink.on_icmp_echo``,
    or ignored."""
    lib.tl_set_icmp_echo_mode(ECHO_MODES[mode])


def set_client_networks(networks: Sequence[IPNetwork]) -> None:
    """Only packets from these sources are processed (empty: any). 0/-1: raises
    ``TunlwipError`` for an invalid set (a bad family, more than 16)."""
    c_nets = ffi.new("tl_endpoint[]", max(1, len(networks)))
    prefixes = ffi.new("uint8_t[]", max(1, len(networks)))
    for i, net in enumerate(networks):
        packed = net.network_address.packed
        c_nets[i].family = net.version
        ffi.memmove(c_nets[i].addr, packed, len(packed))
        prefixes[i] = net.prefixlen
    if lib.tl_set_client_networks(c_nets, prefixes, len(networks)) != 0:
        raise TunlwipError("invalid client networks")


def set_host_addresses(addresses: Sequence[IPAddress]) -> None:
    """Refuse flows to these addresses like loopback; replaces the previous set. 0, -1 bad
    count, -2 out of memory: raises ``TunlwipError`` naming which."""
    err = lib.tl_set_host_addresses(addresses_to_c(addresses), len(addresses))
    if err != 0:
        why = "out of memory" if err == -2 else "too many (at most 1048576)"
        raise TunlwipError(f"cannot refuse {len(addresses)} host addresses: {why}")


# -- packets -----------------------------------------------------------------------------------
def input_packet(packet: bytes) -> None:
    """Process one client packet. A packet dropped before lwIP saw it is counted in C
    (``drop_*``), so the result needs no check."""
    lib.tl_input(packet, len(packet))


def input_release(packet: bytes) -> None:
    """Feed a held SYN back to lwIP (counted in C like ``input_packet``)."""
    lib.tl_input_release(packet, len(packet))


def udp_send(data: bytes, src: Endpoint, dst: Endpoint) -> None:
    """A datagram to client ``dst`` from ``src``. lwIP ``err_t``: raises ``LwipError``."""
    err = lib.tl_udp_send(endpoint_to_c_shared(src), endpoint_to_c_shared(dst), data, len(data))
    if err != 0:  # the message is only formatted for a failure
        check_err(err, f"UDP send {src} -> {dst}")


def icmp_send(message: bytes, src: Endpoint, dst: Endpoint) -> None:
    """An ICMP message (checksum filled in) to client ``dst``. lwIP ``err_t``: ``LwipError``."""
    err = lib.tl_icmp_send(endpoint_to_c(src), endpoint_to_c(dst), message, len(message))
    if err != 0:
        check_err(err, f"ICMP send {src.address} -> {dst.address}")

"""StackHooks: where an ``LwipStack`` hands on what it does not handle itself.

Why a frozen object given to the constructor: what happens to a packet (a held SYN, a UDP
datagram, a forwarded echo request, an accepted connection taken without a task) is then
decided once, where the stack is created, and can be read there; nothing re-wires a running
stack. The gateway passes its own methods (``Gateway.__init__``); a bare stack passes what
it needs, or nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .endpoint import Endpoint
from .tcp import LwipTcpStream

SynInterceptor = Callable[[bytes, Endpoint, Endpoint], bool]
UdpReceiver = Callable[[Endpoint, Endpoint, bytes], None]
EchoReceiver = Callable[[Endpoint, Endpoint, bytes], None]
AcceptTaker = Callable[[LwipTcpStream], bool]


@dataclasses.dataclass(frozen=True)
class StackHooks:
    """Where the stack hands what it does not handle itself. The first three are called from
    inside an lwIP callback (record and wake, never re-enter the stack's input)."""

    #: Called for each new SYN; returning True means "held" (dial before accept: the caller
    #: feeds it back with ``release_syn``). None: lwIP answers every SYN at once.
    syn_interceptor: SynInterceptor | None = None
    #: Called for every UDP datagram from a client; None drops (and counts) them.
    udp_receiver: UdpReceiver | None = None
    #: Called with (client, destination, ICMP message) for echo requests in "forward" mode.
    icmp_echo_receiver: EchoReceiver | None = None
    #: Offered each new connection, outside lwIP's callbacks, before a handler task is
    #: started; returning True means it took the stream (no task): how the gateway hands
    #: a connection whose upstream is already connected straight to a C relay.
    accept_taker: AcceptTaker | None = None

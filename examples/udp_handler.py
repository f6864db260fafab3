"""A custom UDP handler: an endpoint-independent ("full-cone") relay that logs every session.

Why: the built-in UDP forwarder connects each session's upstream socket to the destination, so
only the destination can answer. Peer-to-peer protocols (STUN, games, WebRTC) expect replies
from *other* addresses too. This handler gives each session an unconnected socket: datagrams
from the client (``UdpSession.receive``) go to the destination; replies from the destination
go back with ``UdpSession.send`` (which also keeps the session alive), and datagrams from
anyone else go back with ``Gateway.send_udp``, appearing to the client to come from their real
sender. Port 53 still goes to the built-in DNS proxy.

Run it on a TUN prepared by ``tunlwip route up --iface dmesh1`` (as root)::

    python examples/udp_handler.py --iface dmesh1 --fwmark 0x1d
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket

import trio

from tunlwip import (
    Endpoint,
    Gateway,
    GatewayConfig,
    LwipError,
    StackConfig,
    TunDevice,
    UdpConfig,
    UdpSession,
)
from tunlwip.dialer import Protector, fwmark, no_protection

log = logging.getLogger("example.udp")
MAX_DATAGRAM = 65535


def protected_udp_socket(gateway: Gateway, family: int) -> trio.socket.SocketType:
    """An *unconnected* UDP socket, protected like every socket the gateway makes.

    ``gateway.dialer.open_udp`` connects its sockets (which filters out other senders), so
    apply the gateway's protector ourselves, before the first send, as the dialer does.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        gateway.dialer.protector(sock)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def main(args: argparse.Namespace) -> None:
    udp = UdpConfig(idle_timeout=args.udp_idle_timeout,
                    sweep_interval=min(30.0, args.udp_idle_timeout / 2))  # fmt: skip
    config = GatewayConfig(stack=StackConfig(mtu=args.mtu), udp=udp)
    protector: Protector = fwmark(args.fwmark) if args.fwmark else no_protection
    device = TunDevice.open(args.iface)

    async def full_cone(session: UdpSession) -> None:
        """One task per session; the gateway cancels it when the session idles out."""
        family = socket.AF_INET if session.target.family == 4 else socket.AF_INET6
        try:
            sock = protected_udp_socket(gateway, family)
        except OSError as exc:
            log.info("udp %s -> %s: no socket: %s", session.client, session.target, exc)
            session.send_unreachable("host")  # the client's connected socket fails fast
            return
        others = 0
        started = trio.current_time()
        log.info("udp %s -> %s: session open", session.client, session.target)

        async def from_client(done: trio.CancelScope) -> None:
            while True:
                try:
                    data = await session.receive()
                except trio.EndOfChannel:  # the session is over
                    done.cancel()
                    return
                try:
                    await sock.sendto(data, session.target.sockaddr())
                except OSError as exc:  # UDP semantics: drop, note it
                    log.debug("udp %s -> %s: dropped: %s", session.client, session.target, exc)

        async def from_anyone() -> None:
            nonlocal others
            while True:
                data, address = await sock.recvfrom(MAX_DATAGRAM)
                sender = Endpoint.parse(address[0], address[1])
                if sender == session.target:
                    await session.send(data)  # from the destination; counts as activity
                    continue
                others += 1
                log.info("udp %s <- %s: %d bytes from a third party", session.client, sender,
                         len(data))  # fmt: skip
                try:
                    gateway.send_udp(data, src=sender, dst=session.client)  # from the real sender
                except LwipError as exc:  # too big, no memory: dropped
                    log.debug("udp %s <- %s: dropped: %s", session.client, sender, exc)

        try:
            with sock:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(from_client, nursery.cancel_scope)
                    await from_anyone()
        finally:
            log.info("udp %s -> %s: session closed after %.1f s: %d datagrams in, %d out, "
                     "%d from third parties, %d bytes in, %d out", session.client,
                     session.target, trio.current_time() - started, session.datagrams_in,
                     session.datagrams_out, others, session.bytes_in,
                     session.bytes_out)  # fmt: skip

    gateway = Gateway(device, config, protector=protector, udp_handler=full_cone)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            log.info("serving on %s (protect: %s)", device.name, gateway.protect_mode)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: stopping (%d UDP sessions open)", signal.Signals(signum).name,
                             gateway.statistics().udp_sessions)  # fmt: skip
                    break
            nursery.cancel_scope.cancel()
    finally:
        await device.aclose()
    log.info("stopped")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iface", required=True, help="TUN interface (created if missing)")
    parser.add_argument("--mtu", type=int, default=1500, help="the interface's MTU (1500)")
    parser.add_argument("--fwmark", type=lambda s: int(s, 0), help="SO_MARK for upstream sockets")
    parser.add_argument("--udp-idle-timeout", type=float, default=60.0,
                        help="close sessions idle this long in both directions (60)")  # fmt: skip
    return parser.parse_args()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trio.run(main, parse_args())

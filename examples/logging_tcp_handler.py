"""A gateway whose TCP handler logs every connection and forwards it through protected sockets.

Why: ``Gateway(tcp_handler=...)`` is the hook for policy, accounting or proxying. This handler
does what the built-in forwarder does (dial the original destination with the gateway's
protected dialer, then ``tunlwip.forward.splice`` with half-close), and logs one line per
connection: client, destination, bytes each way, duration and how it ended.

A custom handler replaces dial-before-accept: the client's handshake completes first, and a
failed dial resets the connection. Port 53 still goes to the built-in DNS proxy.

Run it on a TUN prepared by ``tunlwip route up --iface dmesh1`` (as root)::

    python examples/logging_tcp_handler.py --iface dmesh1 --fwmark 0x1d
"""

from __future__ import annotations

import argparse
import logging
import signal

import trio

from tunlwip import Endpoint, Gateway, GatewayConfig, LwipTcpStream, StackConfig, TunDevice
from tunlwip.dialer import Protector, fwmark, no_protection
from tunlwip.forward import splice

log = logging.getLogger("example.tcp")


async def main(args: argparse.Namespace) -> None:
    config = GatewayConfig(stack=StackConfig(mtu=args.mtu), idle_timeout=args.idle_timeout)
    protector: Protector = fwmark(args.fwmark) if args.fwmark else no_protection
    device = TunDevice.open(args.iface)

    async def log_and_forward(stream: LwipTcpStream, target: Endpoint) -> None:
        # stream.remote is the client; target (== stream.local) is where it wanted to go.
        started = trio.current_time()
        try:
            upstream = await gateway.dialer.open_tcp(target)  # protected before connect()
        except OSError as exc:  # refused, unreachable, timed out, or protect failed
            log.info("tcp %s -> %s: dial failed: %s", stream.remote, target, exc)
            stream.abort()  # the client sees a reset
            return
        async with upstream:
            result = await splice(stream, upstream, idle_timeout=config.idle_timeout)
        # The stack closes `stream` when this handler returns.
        log.info("tcp %s -> %s: %d bytes up, %d down, %.3f s, %s", stream.remote, target,
                 result.client_to_upstream, result.upstream_to_client,
                 trio.current_time() - started, result.reason)  # fmt: skip

    gateway = Gateway(device, config, protector=protector, tcp_handler=log_and_forward)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            log.info("serving on %s (protect: %s)", device.name, gateway.protect_mode)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info(
                        "%s: stopping (%d connections open)",
                        signal.Signals(signum).name,
                        gateway.statistics().active_flows,
                    )
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
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help="reset flows idle this many seconds (default: no limit; "
                        "keepalive ends flows whose end vanished)")  # fmt: skip
    return parser.parse_args()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trio.run(main, parse_args())

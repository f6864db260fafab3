"""A gateway whose routes are written in code, with two ways out of its own (``CustomVia``), and
a log line per finished flow saying which route it took.

Why: a program embedding tunlwip may carry some flows its own way (a mesh client, an SSH
channel, a tunnel library) while the gateway does the rest. A ``CustomVia`` is an async
function that opens the flow's upstream and returns a ``trio.abc.Stream``; a ``Route`` built in
code says which flows take it. The routes here, first match wins:

* ``lab``: TCP to ``--lab-port``: the opener dials through the gateway's protected dialer and
  returns its ``trio.SocketStream``; the gateway hands that socket to its C relay, as for a
  direct flow (no Python per byte).
* ``counted``: TCP to ``--counted-port``: the same dial, wrapped in a stream that counts the
  bytes each way. That is no socket, so the gateway relays it in Python (both ways, half-close
  passed on) and the wrapper logs its counts when the gateway closes it.
* everything else: ``default`` (direct), the route every table ends with.

Run it on a TUN prepared by ``tunlwip route up --iface dmesh1`` (as root)::

    python examples/custom_route.py --iface dmesh1 --fwmark 0x1d --lab-port 8080 \\
        --counted-port 8081
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal

import trio

from tunlwip import (
    CustomVia,
    Endpoint,
    FlowRecord,
    Gateway,
    GatewayConfig,
    Route,
    StackConfig,
    TunDevice,
)
from tunlwip.dialer import Dialer, Protector, fwmark, no_protection

log = logging.getLogger("example.route")


class CountingStream(trio.abc.HalfCloseableStream):
    """A stream around another that counts what passes each way (and is therefore no socket:
    the gateway relays it in Python)."""

    def __init__(self, inner: trio.SocketStream, target: Endpoint) -> None:
        self.inner = inner
        self.target = target
        self.sent = self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()
        log.info("counted stream to %s closed: %d bytes sent, %d received", self.target,
                 self.sent, self.received)  # fmt: skip


def routes_for(dialer: Dialer, args: argparse.Namespace) -> tuple[Route, ...]:
    """The table: one route per custom way out, matched by destination port. ``dialer`` is the
    gateway's protected dialer (its sockets never loop back into the TUN)."""

    async def open_lab(target: Endpoint, name: str | None) -> trio.abc.Stream:
        # Raise as a dial would (ConnectionRefusedError, OSError): the client is then reset.
        return await dialer.open_tcp(target)

    async def open_counted(target: Endpoint, name: str | None) -> trio.abc.Stream:
        return CountingStream(await dialer.open_tcp(target), target)

    return (
        Route(name="lab", ports=((args.lab_port, args.lab_port),), protocols=("tcp",),
              via=CustomVia("lab", open_lab)),
        Route(name="counted", ports=((args.counted_port, args.counted_port),),
              protocols=("tcp",), via=CustomVia("counted", open_counted)),
    )  # fmt: skip


async def log_flows(gateway: Gateway) -> None:
    with gateway.flows() as records:
        async for record in records:
            log_flow(record)


def log_flow(record: FlowRecord) -> None:
    log.info("flow %s %s -> %s route=%s name=%s: %d bytes up, %d down, %s", record.protocol,
             record.client, record.target, record.route, record.name, record.bytes_up,
             record.bytes_down, record.close_reason)  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    protector: Protector = fwmark(args.fwmark) if args.fwmark else no_protection
    device = TunDevice.open(args.iface)
    config = GatewayConfig(stack=StackConfig(mtu=args.mtu))
    gateway = Gateway(device, config, protector=protector)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            # The routes need the gateway's dialer, so they go in once it serves: reconfigure
            # swaps the route table of a running gateway (open flows keep their way out).
            gateway.reconfigure(dataclasses.replace(config, routes=routes_for(gateway.dialer,
                                                                              args)))  # fmt: skip
            nursery.start_soon(log_flows, gateway)
            log.info("serving on %s: routes %s", device.name, ", ".join(gateway.routes.names))
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
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
    parser.add_argument("--lab-port", type=int, default=8080,
                        help="TCP port the 'lab' route takes (C relay)")  # fmt: skip
    parser.add_argument("--counted-port", type=int, default=8081,
                        help="TCP port the 'counted' route takes (Python relay)")  # fmt: skip
    return parser.parse_args()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trio.run(main, parse_args())

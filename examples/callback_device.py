"""A gateway on a ``CallbackDevice``: the shape of mobile VPN code.

Why: on Android (``VpnService``) and iOS (``NEPacketTunnelFlow``) the app already owns the
tunnel. What it can hand to tunlwip is four callables: a *blocking* ``read_packet()``,
``write_packet(bytes)``, ``protect(fd) -> bool`` (keep a socket out of the tunnel, like
``VpnService.protect``) and ``close()``. Here a Linux TUN fd plays the app's tunnel:

* ``read_packet`` polls the blocking fd together with a wake-up pipe, then ``os.read``s one
  packet. The pipe matters: closing a TUN fd does not wake a thread blocked in ``read(2)``
  on it, so ``close()`` writes to the pipe and ``read_packet`` returns None (device closed).
* ``write_packet`` is ``os.write`` (it runs on the trio thread; a TUN write does not block).
* ``protect`` sets SO_MARK (``--fwmark``; pair it with ``ip rule add not fwmark N table T``
  as ``tunlwip route up`` does), or accepts every socket when the gateway's sockets cannot
  loop anyway (the TUN lives in another namespace).

Run it on a TUN prepared by ``tunlwip route up --iface dmesh1`` (as root)::

    python examples/callback_device.py --iface dmesh1 --fwmark 0x1d
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import select
import signal
import socket
import struct
from collections.abc import Callable

import trio

from tunlwip import CallbackDevice, Gateway, GatewayConfig, StackConfig
from tunlwip.dialer import no_protection

log = logging.getLogger("example.mobile")
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
SO_MARK = getattr(socket, "SO_MARK", 36)


def open_tun(name: str) -> int:
    """A *blocking* packet fd for TUN ``name`` (what ``VpnService.establish()`` returns)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


class TunnelFd:
    """The app's side: a blocking tunnel fd plus a wake-up pipe for ``close()``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._wake_read, self._wake_write = os.pipe()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(self._wake_read, select.POLLIN)

    def read_packet(self) -> bytes | None:
        """Block until a packet arrives (in the device's reader thread); None once closed."""
        while True:
            ready = dict(self._poll.poll())
            if self._wake_read in ready:
                return None
            if ready.get(self.fd, 0) & (select.POLLERR | select.POLLHUP):
                return None  # the interface went away
            if self.fd in ready:
                return os.read(self.fd, 65535)

    def write_packet(self, packet: bytes) -> None:
        os.write(self.fd, packet)

    def close(self) -> None:
        """Make a blocked ``read_packet`` return; the fds are released by ``release``."""
        os.write(self._wake_write, b"\0")

    def release(self) -> None:
        """Close the fds, once the device's reader thread is gone (after ``aclose``)."""
        for fd in (self.fd, self._wake_read, self._wake_write):
            os.close(fd)


def make_protect(mark: int | None) -> Callable[[int], bool]:
    """``protect(fd) -> bool`` as a mobile app implements it (here: SO_MARK, or nothing)."""

    def protect(fd: int) -> bool:
        if mark is None:
            return True  # nothing to protect from: the gateway's sockets cannot loop
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:  # a dup shares the socket
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as exc:
            log.warning("protect(%d) failed: %s", fd, exc)
            return False  # the gateway closes the socket and the dial fails
        return True

    return protect


async def main(args: argparse.Namespace) -> None:
    tunnel = TunnelFd(open_tun(args.iface))
    device = CallbackDevice(tunnel.read_packet, tunnel.write_packet, make_protect(args.fwmark),
                            tunnel.close, mtu=args.mtu)  # fmt: skip
    gateway = Gateway(device, GatewayConfig(stack=StackConfig(mtu=args.mtu)),
                      protector=device.protector or no_protection)  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            log.info("serving on %s (protect: %s)", args.iface,
                     f"fwmark {args.fwmark:#x}" if args.fwmark else "none")  # fmt: skip
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await device.aclose()  # calls tunnel.close() and waits for the reader thread
        tunnel.release()
    stats = gateway.statistics()
    log.info("stopped: packets in %d out %d, dials ok %d failed %d, udp sessions %d",
             stats.stack.counters["packets_in"], stats.stack.counters["packets_out"],
             stats.dials_ok, stats.dials_failed, stats.udp.opened)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iface", required=True, help="TUN interface (created if missing)")
    parser.add_argument("--mtu", type=int, default=1500, help="the interface's MTU (1500)")
    parser.add_argument("--fwmark", type=lambda s: int(s, 0), help="protect with this SO_MARK")
    return parser.parse_args()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trio.run(main, parse_args())

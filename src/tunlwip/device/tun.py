"""Linux TUN device: open or create by name, or adopt an fd (a mobile VPN fd, say).

Packets are whole IP packets (``IFF_TUN | IFF_NO_PI``). The fd is non-blocking; reads wait with
``trio.lowlevel.wait_readable``. Writing to a TUN fd enters the kernel's receive path and does
not block in practice, so the stack may write to it straight from C (``direct_output_fd``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import trio

from ..errors import DeviceError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_READ_SIZE = 65536


class TunDevice:
    """A TUN interface's packet fd."""

    def __init__(self, fd: int, name: str = "", *, owns_fd: bool = True) -> None:
        self._fd = fd
        self.name = name
        self._owns_fd = owns_fd
        self._closed = False
        os.set_blocking(fd, False)

    @classmethod
    def open(cls, name: str) -> TunDevice:
        """Attach to TUN interface ``name``, creating it if it does not exist."""
        if not name or len(name.encode()) > 15:
            raise DeviceError(f"invalid interface name {name!r} (1-15 bytes)")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(
                f"cannot open /dev/net/tun for {name!r}: {exc.strerror} (needs CAP_NET_ADMIN)"
            ) from exc
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
            result = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            hint = " (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
            raise DeviceError(f"cannot attach TUN {name!r}: {exc.strerror}{hint}") from exc
        actual = result[:16].rstrip(b"\0").decode()
        return cls(fd, actual)

    @classmethod
    def from_fd(cls, fd: int, *, name: str = "", owns_fd: bool = True) -> TunDevice:
        """Adopt an already configured packet fd (e.g. Android's VpnService fd)."""
        try:
            os.fstat(fd)
        except OSError as exc:
            raise DeviceError(f"fd {fd} is not open: {exc.strerror}") from exc
        return cls(fd, name, owns_fd=owns_fd)

    def fileno(self) -> int:
        return self._fd

    def direct_input_fd(self) -> int | None:
        """The fd the stack may read packets from in C, in batches (waiting with trio)."""
        return None if self._closed else self._fd

    def direct_output_fd(self) -> int | None:
        """The fd the stack may write output packets to directly from C."""
        return None if self._closed else self._fd

    async def receive_packet(self) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("TUN device closed")
            try:
                return os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("TUN fd was closed") from exc
                raise DeviceError(f"TUN read failed: {exc.strerror}") from exc
            await trio.lowlevel.wait_readable(self._fd)

    async def send_packet(self, packet: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TUN device closed")
        while True:
            try:
                os.write(self._fd, packet)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._fd)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                    return  # the kernel rejected this packet; drop it like a wire would
                raise DeviceError(f"TUN write failed: {exc.strerror}") from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._fd)
            if self._owns_fd:
                os.close(self._fd)
        await trio.lowlevel.checkpoint()

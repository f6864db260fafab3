"""Linux TUN device: open or create by name, or adopt an fd (a mobile VPN fd, say).

Packets are whole IP packets (``IFF_TUN | IFF_NO_PI``). The fd is non-blocking; reads wait with
``trio.lowlevel.wait_readable``. Writing to a TUN fd enters the kernel's receive path and does
not block in practice, so the stack may write to it straight from C (``direct_output_fd``).

A TUN we open ourselves also gets a virtio-net header on every packet (``IFF_VNET_HDR``,
``vnet_header``): it lets the stack hand the kernel many TCP segments of a connection in one
write (GSO) with checksums left to the kernel, which is what makes downloads at MTU 1500 cheap
(docs/performance.md). An adopted fd (a mobile VPN fd) has no header: the kernel decided that
when it was opened.

The header also lets the kernel hand us offloaded packets (``TUNSETOFFLOAD``, ``offloads``): an
upload then arrives as TCP super-segments of up to 64 KiB with checksums left partial, which
lwIP takes whole, and UDP sent with ``UDP_SEGMENT`` as super-datagrams, split in C
(``_csrc/vnet_input.c``). The flags are negotiated down when a kernel refuses some
(``negotiate_offloads``).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import struct

import trio

from ..errors import DeviceError
from ..ifname import is_interface_name
from .vnet import VNET_HDR_LEN, packets_from_read

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUNSETVNETHDRSZ = 0x400454D8
TUNGETVNETHDRSZ = 0x800454D7
TUNSETOFFLOAD = 0x400454D0
# TUN_F_*: what the kernel may hand us. TUN_F_UFO (IP-fragmented UDP) is never asked for: no
# kernel since 4.14 makes such packets, and the reader does not take them.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
_OFFLOAD_NAMES = {TUN_F_CSUM: "csum", TUN_F_TSO4: "tso4", TUN_F_TSO6: "tso6",
                  TUN_F_TSO_ECN: "tso_ecn", TUN_F_USO4: "uso4", TUN_F_USO6: "uso6"}  # fmt: skip
_TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
#: What to ask for, best first: a kernel that refuses a set (EINVAL: USO is Linux 6.2+) gets
#: the next. The last, no offload at all, always works.
OFFLOAD_CHOICES = (_TSO | TUN_F_USO4 | TUN_F_USO6, _TSO, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
                   TUN_F_CSUM, 0)  # fmt: skip

_NO_VNET_HDR = bytes(VNET_HDR_LEN)  # no GSO, checksums complete
_READ_SIZE = VNET_HDR_LEN + 65536  # a header and a super-segment


def _check_vnet_header_size(fd: int, name: str) -> None:
    """A TUN whose header is not the 10 bytes we parse would have every packet misread. An
    fd that is no TUN (a test's socket pair) cannot say, and is taken at its word."""
    try:
        size = struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, struct.pack("i", 0)))[0]
    except OSError:
        return
    if size != VNET_HDR_LEN:
        raise DeviceError(
            f"TUN {name or fd}: virtio-net header of {size} bytes; tunlwip reads {VNET_HDR_LEN}"
            " (set it with TUNSETVNETHDRSZ)"
        )


def _queue_mode_hint(name: str, multi_queue: bool) -> str:
    """Why TUNSETIFF said EINVAL, most likely: an existing (persistent) TUN created with the
    other queue mode."""
    if multi_queue:
        return (f" (it exists without multi-queue support: recreate it with `ip tuntap add dev "
                f"{name} mode tun multi_queue`, or run with one worker)")  # fmt: skip
    return " (if it was created with multi_queue, run with --workers 2 or more, or recreate it)"


def offload_names(flags: int) -> list[str]:
    """The ``TUN_F_*`` flags in ``flags`` by name (``["csum", "tso4", ...]``)."""
    return [name for bit, name in _OFFLOAD_NAMES.items() if flags & bit]


def negotiate_offloads(fd: int, choices: tuple[int, ...] = OFFLOAD_CHOICES) -> int:
    """Ask the TUN behind ``fd`` (opened with ``IFF_VNET_HDR``) for the first set of offloads in
    ``choices`` that it takes; returns that set. Offloads are the device's, not the fd's: every
    queue of a multi-queue TUN shares them."""
    for flags in choices:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return 0


class TunDevice(trio.abc.AsyncResource):
    """A TUN interface's packet fd; ``async with TunDevice.open(name) as device`` closes it
    on the way out."""

    def __init__(
        self,
        fd: int,
        name: str = "",
        *,
        owns_fd: bool = True,
        vnet_header: bool = False,
        offloads: int = 0,
    ) -> None:
        self._fd = fd
        self.name = name
        self._owns_fd = owns_fd
        #: Every packet read or written starts with a ``struct virtio_net_hdr``.
        self.vnet_header = vnet_header
        #: The ``TUN_F_*`` offloads negotiated: packets read may be GSO super-segments with
        #: partial checksums (``offload_names`` says which).
        self.offloads = offloads
        self._pending: collections.deque[bytes] = collections.deque()  # a split read's rest
        self._closed = False
        os.set_blocking(fd, False)

    @classmethod
    def open(cls, name: str, *, offload: bool = True, multi_queue: bool = False) -> TunDevice:
        """Attach to TUN interface ``name``, creating it if it does not exist.

        ``offload`` opens it with a virtio-net header (``vnet_header``): TCP output is
        coalesced into GSO writes, and input offloads are negotiated (``offloads``: TSO,
        partial checksums, USO where the kernel has it). Turn it off to see exactly the packets
        lwIP sends (one write each, checksums complete), e.g. when debugging with a capture on
        the TUN.

        ``multi_queue`` (``IFF_MULTI_QUEUE``): each call attaches one more queue of the same
        device, and the kernel spreads flows over the queues by their hash (``--workers``). A
        device's queue mode is fixed when it is created: attaching with the other mode fails
        (EINVAL), reported as such.
        """
        if not is_interface_name(name):
            raise DeviceError(f"invalid interface name {name!r} (1-15 bytes, no '/', ':' or "
                              "whitespace)")  # fmt: skip
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(
                f"cannot open /dev/net/tun for {name!r}: {exc.strerror} (needs CAP_NET_ADMIN)"
            ) from exc
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            flags |= IFF_MULTI_QUEUE if multi_queue else 0
            ifr = struct.pack("16sH22x", name.encode(), flags)
            result = fcntl.ioctl(fd, TUNSETIFF, ifr)
            offloads = 0
            if offload:  # the size is the device's, not the fd's: another user may have set it
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                offloads = negotiate_offloads(fd)
            else:  # a device an earlier run left offloaded would send us super-segments bare
                negotiate_offloads(fd, (0,))
        except OSError as exc:
            os.close(fd)
            hint = " (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
            if exc.errno == errno.EINVAL:
                hint = _queue_mode_hint(name, multi_queue)
            raise DeviceError(f"cannot attach TUN {name!r}: {exc.strerror}{hint}") from exc
        actual = result[:16].rstrip(b"\0").decode()
        return cls(fd, actual, vnet_header=offload, offloads=offloads)

    @classmethod
    def from_fd(
        cls,
        fd: int,
        *,
        name: str = "",
        owns_fd: bool = True,
        vnet_header: bool = False,
        offloads: int = 0,
    ) -> TunDevice:
        """Adopt an already configured packet fd (e.g. Android's VpnService fd).
        ``vnet_header``: it was opened with ``IFF_VNET_HDR`` (header size 10); ``offloads``:
        the ``TUN_F_*`` set negotiated on its device (``negotiate_offloads``)."""
        try:
            os.fstat(fd)
        except OSError as exc:
            raise DeviceError(f"fd {fd} is not open: {exc.strerror}") from exc
        if vnet_header:
            _check_vnet_header_size(fd, name)
        return cls(fd, name, owns_fd=owns_fd, vnet_header=vnet_header, offloads=offloads)

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
            if self._pending:
                return self._pending.popleft()
            try:
                packet = os.read(self._fd, _READ_SIZE)
                if not self.vnet_header:
                    return packet
                # Partial checksums completed, a UDP super-datagram split (device/vnet.py).
                self._pending.extend(packets_from_read(packet))
                continue
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
                if self.vnet_header:
                    os.writev(self._fd, (_NO_VNET_HDR, packet))
                else:
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

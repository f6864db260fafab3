"""The packet devices as async context managers, and the interface names TunDevice accepts.

Why: ``async with`` is how an embedder should hold a device (closed however the block ends,
the fd released); the name check runs before /dev/net/tun is opened, so it needs no root.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from tunlwip import CallbackDevice, DeviceError, MemoryDevice, TunDevice
from tunlwip.ifname import is_interface_name


async def test_memory_device_closes_when_the_block_ends() -> None:
    async with MemoryDevice() as device:
        device.inject_packet(b"\x45packet")
        assert await device.receive_packet() == b"\x45packet"
    with pytest.raises(trio.ClosedResourceError):
        await device.receive_packet()


async def test_memory_device_closes_when_the_block_raises() -> None:
    with pytest.raises(KeyError):
        async with MemoryDevice() as device:
            raise KeyError("boom")
    with pytest.raises(trio.ClosedResourceError):
        await device.receive_packet()


async def test_tun_device_from_fd_releases_its_fd_when_the_block_ends() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        async with TunDevice.from_fd(ours.detach(), name="pair") as device:
            fd = device.fileno()
            theirs.send(b"\x45one")
            with trio.fail_after(5):
                assert await device.receive_packet() == b"\x45one"
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
        with pytest.raises(trio.ClosedResourceError):
            await device.receive_packet()


async def test_callback_device_calls_close_once_when_the_block_ends() -> None:
    closed: list[bool] = []
    async with CallbackDevice(lambda: None, lambda packet: None,
                              close=lambda: closed.append(True)) as device:  # fmt: skip
        assert isinstance(device, CallbackDevice)
    assert closed == [True]
    with pytest.raises(trio.ClosedResourceError):
        await device.send_packet(b"\x45")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a:b", "a b", "tab\t", "x" * 16, "é" * 8])
def test_tun_open_refuses_a_name_the_kernel_would(name: str) -> None:
    assert not is_interface_name(name)
    with pytest.raises(DeviceError, match="invalid interface name"):
        TunDevice.open(name)


@pytest.mark.parametrize("name", ["tun0", "x" * 15, "dmesh-1.uplink", "a_b"])
def test_interface_names_the_kernel_takes(name: str) -> None:
    assert is_interface_name(name)

"""A packet device made of plain callables: the shape mobile VPN code already implements.

Android's ``VpnService`` and iOS's ``NEPacketTunnelFlow`` adapters usually offer four things: a
*blocking* ``read_packet()``, a ``write_packet(bytes)``, ``protect(fd) -> bool`` (keep a socket
out of the tunnel) and ``close()``. ``CallbackDevice`` turns them into a ``PacketDevice``.

Theory of operation
-------------------
``read_packet`` blocks, so it must not run on the trio thread. One dedicated reader thread calls
it in a loop and appends packets to a bounded queue; the trio side pops them without any thread
hop. The thread wakes trio (``TrioToken.run_sync_soon``) only when the trio side is parked on an
empty queue, so under load packets arrive in batches for the price of one wake-up. When the
queue is full the thread waits: the app's own buffer (the kernel's TUN queue) absorbs the burst,
never our memory.

``write_packet`` runs on the trio thread, between lwIP calls: it must not block for long (a
write to a TUN fd does not). ``OSError`` from it drops that packet (the stack logs it); any other
exception is a bug in the adapter and stops the stack with ``DeviceError``.

The reader thread ends when ``read_packet`` returns ``None``/``b""`` (the stack then sees
``trio.ClosedResourceError``) or raises (the stack sees ``DeviceError``, logged once here).
``aclose`` calls ``close()`` once and waits up to ``close_timeout`` for the thread, so
``close()`` must make a blocked ``read_packet`` return or raise. Note: on Linux, closing a TUN fd
does *not* wake a thread blocked in ``read(2)`` on it (the read holds its own reference to the
file); poll the fd together with a wake-up pipe that ``close()`` writes to, as
``examples/callback_device.py`` does. Release the fd itself only after ``aclose`` returned.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable

import trio

from ..dialer import Protector, callback
from ..errors import DeviceError

log = logging.getLogger("tunlwip.device")


class CallbackDevice(trio.abc.AsyncResource):
    """A ``PacketDevice`` built from ``read_packet``/``write_packet``/``protect``/``close``;
    ``async with CallbackDevice(...) as device`` calls ``aclose`` on the way out.

    One task (the stack's reader) may wait in ``receive_packet`` at a time. Use a device in one
    trio run only: the reader thread starts on the first ``receive_packet`` and wakes that run.
    """

    def __init__(
        self,
        read_packet: Callable[[], bytes | None],
        write_packet: Callable[[bytes], object],
        protect: Callable[[int], bool] | None = None,
        close: Callable[[], object] | None = None,
        *,
        mtu: int = 1500,
        queue_packets: int = 256,
        close_timeout: float = 5.0,
    ) -> None:
        if queue_packets < 1:
            raise ValueError("queue_packets must be >= 1")
        self.mtu = mtu
        self.close_timeout = close_timeout
        self._read = read_packet
        self._write = write_packet
        self._protect = protect
        self._close_fn = close
        self._capacity = queue_packets
        #: Wake-ups the reader thread sent to trio (fewer than packets under load: batching).
        self.wakeups = 0
        # Shared with the reader thread; guarded by _lock.
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._queue: collections.deque[bytes] = collections.deque()
        self._waiting = False  # the trio side is parked on _ready and must be woken
        self._stopping = False  # aclose() began: the thread must not deliver more
        self._finished = False  # the reader thread ended ...
        self._error: BaseException | None = None  # ... because read_packet raised this
        # Trio side only.
        self._ready: trio.Event | None = None
        self._reader_done: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_called = False

    @property
    def protector(self) -> Protector | None:
        """The ``protect`` callable as a dialer protector (``Gateway(protector=...)``), or None.

        A socket whose ``protect(fd)`` does not return True is closed and its dial fails.
        """
        return None if self._protect is None else callback(self._protect)

    # -- PacketDevice ---------------------------------------------------------------------------
    async def receive_packet(self) -> bytes:
        if self._thread is None and not self._closed:
            self._start_reader()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("callback device closed")
            ready: trio.Event | None = None
            error: BaseException | None = None
            with self._lock:
                if self._queue:
                    packet = self._queue.popleft()
                    if len(self._queue) == self._capacity - 1:
                        self._not_full.notify()
                else:
                    packet = None
                    error = self._error
                    if not self._finished:
                        self._waiting = True
                        ready = self._ready = trio.Event()
            if packet is not None:
                # Like TunDevice: no forced yield per packet (the stack yields every burst).
                await trio.lowlevel.checkpoint_if_cancelled()
                return packet
            if ready is None:
                await trio.lowlevel.checkpoint()
                if error is None:
                    raise trio.ClosedResourceError("read_packet reported the device closed")
                raise DeviceError(f"read_packet failed: {error!r}") from error
            await ready.wait()

    async def send_packet(self, packet: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("callback device closed")
        try:
            self._write(packet)
        except OSError:
            raise  # the stack drops this one packet and logs why
        except Exception as exc:
            raise DeviceError(f"write_packet failed: {exc!r}") from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Call ``close()`` (once), wake a waiting ``receive_packet`` (it raises
        ``ClosedResourceError``) and wait up to ``close_timeout`` for the reader thread to end,
        so the app may release its fd afterwards."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with self._lock:
            self._stopping = True
            self._not_full.notify_all()  # a reader thread waiting for room gives up
        if self._ready is not None:
            self._ready.set()
        if self._close_fn is not None and not self._close_called:
            self._close_called = True
            try:
                self._close_fn()
            except Exception:
                log.warning("callback device: close() raised", exc_info=True)
        done = self._reader_done
        if done is None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(self.close_timeout):
            await done.wait()
        if done.is_set():
            assert self._thread is not None
            self._thread.join()  # its last act was to set `done`: this returns at once
        else:
            log.warning("callback device: read_packet still blocked %g s after close(); "
                        "abandoning the reader thread (close() must make read_packet return)",
                        self.close_timeout)  # fmt: skip

    # -- the reader thread ----------------------------------------------------------------------
    def _start_reader(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._reader_done = trio.Event()
        # A daemon: if close() cannot unblock read_packet, the process may still exit.
        self._thread = threading.Thread(
            target=self._read_loop, name="tunlwip-callback-reader", daemon=True
        )
        self._thread.start()

    def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                packet = self._read()
                if not packet:
                    break
                if type(packet) is not bytes:
                    packet = bytes(packet)
                with self._lock:
                    while len(self._queue) >= self._capacity and not self._stopping:
                        self._not_full.wait()
                    if self._stopping:
                        break
                    self._queue.append(packet)
                    wake = self._ready if self._waiting else None
                    self._waiting = False
                if wake is not None:
                    self.wakeups += 1
                    self._in_trio(wake.set)
        except BaseException as exc:
            error = exc
            if self._stopping:  # close() made read_packet raise, as documented
                log.debug("callback device: read_packet raised after close(): %r", exc)
            else:
                log.error("callback device: read_packet raised; the device stops",
                          exc_info=exc)  # fmt: skip
        finally:
            with self._lock:
                self._finished, self._error = True, error
                wake = self._ready if self._waiting else None
                self._waiting = False
            done = self._reader_done
            self._in_trio(lambda: self._reader_finished(wake, done))

    @staticmethod
    def _reader_finished(wake: trio.Event | None, done: trio.Event | None) -> None:
        if wake is not None:
            wake.set()
        if done is not None:
            done.set()

    def _in_trio(self, fn: Callable[[], object]) -> None:
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody waits
            self._token.run_sync_soon(fn)

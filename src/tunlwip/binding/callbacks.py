"""lwIP's calls into Python: the ``extern "Python"`` callbacks and the ``Sink`` they feed.

Theory of operation: lwIP calls back into Python (accept, recv, sent, err, output, held SYN,
UDP datagram, relay events) from inside an lwIP call that the stack made on the trio thread. Each
callback converts its C arguments to Python values and forwards them to the one active ``Sink``
(the stack). Callbacks never raise into C: an exception is logged and handed to the sink, and the C
side sees a safe default (reject the connection, pass the SYN, drop the datagram). Sinks must not
call back into lwIP input or timers from these methods; they record events and wake tasks.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Protocol

from ..endpoint import Endpoint
from .endpoints import endpoint_from_c
from .ffi import ffi
from .tcp import Pcb

__all__ = ["Sink", "set_sink"]

log = logging.getLogger("tunlwip.lwip")


class Sink(Protocol):
    """Where lwIP's events go (the running ``LwipStack``); ``conn`` is the id the sink gave
    the connection in ``on_accept`` (0 refuses it)."""

    def on_accept(self, pcb: Pcb) -> int: ...
    def on_recv(self, conn: int, data: bytes | None, may_defer: bool) -> bool: ...
    def on_sent(self, conn: int, length: int) -> None: ...
    def on_error(self, conn: int, err: int) -> None: ...
    def on_output(self, packet: bytes) -> None: ...
    def on_syn(self, packet: bytes, src: Endpoint, dst: Endpoint) -> bool: ...
    def on_udp(self, src: Endpoint, dst: Endpoint, data: bytes) -> bool: ...
    def on_icmp_echo(self, src: Endpoint, dst: Endpoint, message: bytes) -> None: ...
    def on_relay_done(self, conn: int, reason: int, bytes_up: int, bytes_down: int) -> None: ...
    def on_relay_first_data(self, conn: int, data: bytes) -> None: ...
    def on_fd_ready(self, token: int) -> None: ...
    def on_callback_error(self, exc: BaseException) -> None: ...


_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    """Route lwIP's callbacks to ``sink`` (the running stack), or nowhere."""
    global _sink
    _sink = sink


def _onerror(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    log.error("exception in an lwIP callback", exc_info=(exc_type, exc, tb))
    if _sink is not None:
        try:
            _sink.on_callback_error(exc)
        except Exception:  # pragma: no cover - last line of defence, never raise into C
            log.exception("sink failed to record a callback error")


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_accept(pcb: Any) -> int:
    return _sink.on_accept(pcb) if _sink is not None else 0


@ffi.def_extern(onerror=_onerror, error=1)  # type: ignore[untyped-decorator]
def tl_py_recv(conn: int, data: Any, length: int, may_defer: int) -> int:
    """1: the bytes were taken; 0 (only if ``may_defer``): the stream is full, lwIP keeps
    them and offers them again."""
    if _sink is None:
        return 1
    payload = None if data == ffi.NULL else bytes(ffi.buffer(data, length))
    return _sink.on_recv(conn, payload, bool(may_defer))


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_sent(conn: int, length: int) -> None:
    if _sink is not None:
        _sink.on_sent(conn, length)


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_error(conn: int, err: int) -> None:
    if _sink is not None:
        _sink.on_error(conn, err)


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_output(data: Any, length: int) -> None:
    if _sink is not None:
        _sink.on_output(bytes(ffi.buffer(data, length)))


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_syn(packet: Any, length: int, src: Any, dst: Any) -> int:
    if _sink is None:
        return 0
    held = _sink.on_syn(
        bytes(ffi.buffer(packet, length)), endpoint_from_c(src), endpoint_from_c(dst)
    )
    return 1 if held else 0


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_udp(src: Any, dst: Any, data: Any, length: int) -> int:
    if _sink is None:
        return 0
    handled = _sink.on_udp(
        endpoint_from_c(src), endpoint_from_c(dst), bytes(ffi.buffer(data, length))
    )
    return 1 if handled else 0


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_icmp_echo(src: Any, dst: Any, message: Any, length: int) -> None:
    if _sink is not None:
        _sink.on_icmp_echo(
            endpoint_from_c(src), endpoint_from_c(dst), bytes(ffi.buffer(message, length))
        )


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_relay_done(conn: int, reason: int, bytes_up: int, bytes_down: int) -> None:
    if _sink is not None:
        _sink.on_relay_done(conn, reason, bytes_up, bytes_down)


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_relay_first_data(conn: int, data: Any, length: int) -> None:
    if _sink is not None:
        _sink.on_relay_first_data(conn, bytes(ffi.buffer(data, length)))


@ffi.def_extern(onerror=_onerror)  # type: ignore[untyped-decorator]
def tl_py_fd_ready(token: int) -> None:
    if _sink is not None:
        _sink.on_fd_ready(token)
